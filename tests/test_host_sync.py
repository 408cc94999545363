"""No entry point reads device data on the host (no .item(), .tolist(), bool(tensor)).

The CUDA path's host code is run, without a GPU, on meta tensors: they have shapes,
strides and dtypes but no data, so any read of a value on the host raises. The kernels'
launchers run as they would on CUDA, with every @triton.jit kernel replaced by a stub
(bench/overhead.py), and the branches taken are the non-CPU ones (device-side asserts,
never a host check). Forward and backward of every entry point, every reduction, the
options, in place, the fused and the late paths.
"""

import pytest
import torch

import softmax_ce_gpu as sc
from softmax_ce_gpu import _backend, _ops, kernels
from softmax_ce_gpu import _linear_ops

try:
    from softmax_ce_gpu.bench import overhead
except ImportError:  # running from a checkout without the package installed
    from bench import overhead

META = torch.device("meta")


@pytest.fixture
def meta_kernels(monkeypatch):
    """The kernels' launchers for meta tensors, their kernels stubbed; _assert_async recorded
    (it has no meta implementation) and required to receive a tensor, never a Python bool."""
    for mod in (_backend, _ops, _linear_ops):
        monkeypatch.setattr(mod, "backend_for", lambda fn, x: kernels)
    asserts = []

    def assert_async(t, msg=""):
        assert isinstance(t, torch.Tensor) and t.device == META, t
        asserts.append(msg)

    monkeypatch.setattr(torch, "_assert_async", assert_async)
    with overhead.stubbed_kernels([0]):
        yield asserts


def _leaf(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device=META).requires_grad_()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0),
                                  dict(weight=True, ignore_index=3), dict(prob=True),
                                  dict(inplace_backward=True)],
                         ids=["plain", "ls-z-softcap", "weight", "prob", "inplace"])
def test_cross_entropy_reads_nothing_on_the_host(meta_kernels, reduction, dtype, opts):
    opts = dict(opts)
    N, V = 8, 1000
    x = _leaf(N, V, dtype=dtype)
    logits = x * 1.0
    prob = opts.pop("prob", False)
    t = (torch.empty(N, V, dtype=dtype, device=META) if prob
         else torch.empty(N, dtype=torch.int64, device=META))
    w = torch.empty(V, device=META) if opts.pop("weight", False) else None
    loss = sc.cross_entropy(logits, t, w, reduction=reduction, **opts)
    loss.sum().backward()
    assert x.grad is not None and x.grad.shape == (N, V)
    if not prob:
        assert meta_kernels, "the class-id range is never checked"
    loss, grad = sc.cross_entropy_with_grad(logits.detach(), t, w, reduction=reduction)
    assert grad.shape == (N, V)
    sc.CrossEntropyLoss(w, reduction=reduction)(logits.detach(), t)


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_softmax_reads_nothing_on_the_host(meta_kernels, op):
    x = _leaf(4, 6, 300)
    for dim in (-1, 1):
        getattr(sc, op)(x, dim=dim).sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_reads_nothing_on_the_host(meta_kernels, reduction):
    h, W = _leaf(16, 32), _leaf(1000, 32)
    t = torch.empty(16, dtype=torch.int64, device=META)
    loss = sc.linear_cross_entropy(h, W, t, reduction=reduction, chunk_size=8)
    loss.sum().backward()
    assert h.grad.shape == h.shape and W.grad.shape == W.shape
