"""Test set-up: Triton's interpreter on machines without a GPU.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, that is,
before softmax_ce_gpu is imported: pytest loads this file first. With a CUDA
device the kernels are compiled and tests run on the GPU (DEVICE = "cuda");
without one they run on CPU tensors through the interpreter (DEVICE = "cpu").
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The fused forward (loss + gradient) has two paths (kernels/tuning.py): a test that takes
# the fixture `fused_path` runs on each. The single-pass path gets SMALL_SEGMENT-column
# segments, so that the rows of a few hundred logits used by most tests are split across
# programs and exchange their statistics (V = 257: two full segments and one of a single
# column); `fused_path_tuned` keeps the tuning table's segments (8192 bf16 columns), for
# full vocabularies.
FUSED_PATHS = ("two-sweep", "single")
SMALL_SEGMENT = 128


def two_sweep_grad_position():
    """The position of ``grad`` among the arguments of kernels._two_sweep_fwd (the
    two-sweep launcher kernels.cross_entropy.cross_entropy_fwd, which kernels.cross_entropy_fwd
    calls with every argument positional)."""
    import inspect

    from softmax_ce_gpu import kernels

    return list(inspect.signature(kernels._two_sweep_fwd).parameters).index("grad")


def _run_on_path(monkeypatch, path, segment):
    """Enter the path for one test; on 'single', fail if a fused forward went elsewhere."""
    from softmax_ce_gpu import kernels
    from softmax_ce_gpu.kernels import tuning

    fallbacks = []
    if path == "single":
        two_sweep = kernels._two_sweep_fwd
        at = two_sweep_grad_position()

        def spy(*args):
            if args[at] is not None:
                fallbacks.append(args[0].shape)
            return two_sweep(*args)

        monkeypatch.setattr(kernels, "_two_sweep_fwd", spy)
    return tuning.use_fused_path(path, segment=segment), fallbacks


@pytest.fixture(params=FUSED_PATHS)
def fused_path(request, monkeypatch):
    path = request.param
    ctx, fallbacks = _run_on_path(monkeypatch, path, SMALL_SEGMENT if path == "single" else None)
    with ctx:
        yield path
    assert not fallbacks, f"fused forwards of shapes {fallbacks} took the two-sweep path"


@pytest.fixture(params=FUSED_PATHS)
def fused_path_tuned(request, monkeypatch):
    ctx, fallbacks = _run_on_path(monkeypatch, request.param, None)
    with ctx:
        yield request.param
    assert not fallbacks, f"fused forwards of shapes {fallbacks} took the two-sweep path"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "fused_by_autograd: the test reaches the fused forward only through "
        "cross_entropy's autograd, which takes the backward-time path for fp16 logits and for "
        "reduction 'none': those cases have no fused forward to run on the single-pass path")


def pytest_collection_modifyitems(config, items):
    """Deselect the single-pass variants that would only repeat the two-sweep variant."""
    import torch as _torch

    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        single = "single" in (params.get("fused_path"), params.get("fused_path_tuned"))
        no_fused = params.get("dtype") is _torch.float16 or params.get("reduction") == "none"
        if single and no_fused and item.get_closest_marker("fused_by_autograd"):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
