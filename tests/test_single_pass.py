"""The single-pass fused forward (kernels/cross_entropy_single.py) against torch in float64.

Rows are split into segments of SEGMENT columns (a small segment, set through
kernels.tuning.use_fused_path, so that rows of a few hundred logits become several
programs that exchange their statistics; the full-vocabulary cases use the tuning
table's segments). Every case checks the loss and the gradient of
cross_entropy_with_grad (the fused forward) against torch on float64 copies, at the
tolerances of tests/helpers.py, and that the single-pass launcher ran.

Under Triton's interpreter the exchange runs as two launches (publish; finish) of the
same kernel; the single-launch kernel, whose programs wait for each other, runs only
on a GPU (test_single_launch_kernel_on_gpu, skipped without one). The compiled-code
evidence for it is in test_inspect.py, the byte count in test_bytes.py.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, two_sweep_grad_position
from helpers import DTYPES, TOL, assert_close, poisoned, rel_err
from test_cross_entropy import check, make_case, reference

import softmax_ce_gpu as sc
from softmax_ce_gpu import kernels
from softmax_ce_gpu.kernels import tuning

SEGMENT = 64


@pytest.fixture
def single(monkeypatch):
    """The single-pass path with SEGMENT-column segments; yields the list of its launches'
    logits shapes, and fails the test if a fused forward took the two-sweep path."""
    calls, fallbacks = [], []
    launcher, two_sweep = kernels.cross_entropy_single_fwd, kernels._two_sweep_fwd

    def spy_single(logits, *args, **kw):
        calls.append(tuple(logits.shape))
        return launcher(logits, *args, **kw)

    at = two_sweep_grad_position()

    def spy_two_sweep(*args):
        if args[at] is not None:
            fallbacks.append(tuple(args[0].shape))
        return two_sweep(*args)

    monkeypatch.setattr(kernels, "cross_entropy_single_fwd", spy_single)
    monkeypatch.setattr(kernels, "_two_sweep_fwd", spy_two_sweep)
    with tuning.use_fused_path("single", segment=SEGMENT):
        yield calls
    assert not fallbacks, fallbacks


def with_grad_vs_reference(x, t, w=None, *, dtype, **kw):
    """cross_entropy_with_grad (the fused forward) against the float64 reference."""
    loss, grad = sc.cross_entropy_with_grad(x, t, w, **kw)
    ref, x64 = reference(x, t, w, **kw)
    ref.sum().backward()
    assert loss.dtype == x.dtype and grad.dtype == x.dtype and grad.shape == x.shape
    assert_close(loss, ref, dtype)
    assert_close(grad, x64.grad, dtype)
    return loss, grad


# ----------------------------------------------------------------------------- segments


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [
    40,    # below one segment: K = 1, no exchange
    64,    # exactly one segment
    100,   # not a multiple of 16: K = 2, the second segment 36 columns
    256,   # exactly K = 4 segments
    257,   # K segments plus one element: a fifth segment of a single column
])
def test_segment_boundaries(single, dtype, V):
    x, t, _ = make_case(5, V, dtype, ignore=True)
    t[1] = V - 1       # the target in the last segment (for 257, the one-column segment)
    t[3] = SEGMENT - 1 if V > SEGMENT else 0  # the last column of the first segment
    for reduction in ("mean", "sum", "none"):
        with_grad_vs_reference(x, t, dtype=dtype, reduction=reduction)
    assert single and all(shape == (5, V) for shape in single)


@pytest.mark.parametrize("N", [0, 1, 7])
def test_batch_sizes(single, N):
    x, t, _ = make_case(N, 200, torch.float32)
    loss, grad = sc.cross_entropy_with_grad(x, t, reduction="sum")
    assert grad.shape == (N, 200)
    if N == 0:
        assert loss.item() == 0.0 and not single  # nothing to launch
        return
    with_grad_vs_reference(x, t, dtype=torch.float32)
    assert single


# ----------------------------------------------------------------------------- options

CLASS_OPTIONS = [
    dict(weight=True),
    dict(ignore=True, weight=True),
    dict(label_smoothing=0.1),
    dict(label_smoothing=0.3, weight=True, ignore=True),
    dict(label_smoothing=1.0),
    dict(ignore_index=3),
    dict(z_loss=1e-3),
    dict(softcap=5.0),
    dict(z_loss=1e-2, softcap=3.0, label_smoothing=0.1, weight=True, ignore=True),
]


def _opt_id(o):
    return "-".join(f"{k}={v}" for k, v in o.items())


# the reduction only changes the gradient's scale (and 'none' the host's sum): two suffice,
# test_segment_boundaries runs all three
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("opts", CLASS_OPTIONS, ids=_opt_id)
def test_class_target_options(single, dtype, reduction, opts):
    opts = dict(opts)
    x, t, w = make_case(5, 257, dtype, ignore=opts.pop("ignore", False),
                        weight=opts.pop("weight", False))
    if "ignore_index" in opts:
        t[1] = opts["ignore_index"]
    with_grad_vs_reference(x, t, w, dtype=dtype, reduction=reduction, **opts)
    assert single


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("opts", [
    dict(),
    dict(kind="prob_unnorm", weight=True),
    dict(label_smoothing=0.2),
    dict(kind="prob_unnorm", weight=True, label_smoothing=0.2, z_loss=1e-3, softcap=4.0),
], ids=lambda o: _opt_id(o) or "plain")
def test_probability_target_options(single, dtype, reduction, opts):
    opts = dict(opts)
    x, t, w = make_case(3, 200, dtype, target=opts.pop("kind", "prob"),
                        weight=opts.pop("weight", False))
    with_grad_vs_reference(x, t, w, dtype=dtype, reduction=reduction, **opts)
    assert single


def test_autograd_uses_the_single_path(single):
    """cross_entropy's fused gradient (reduction 'mean', bf16) comes from the new path too."""
    x, t, w = make_case(5, 257, torch.bfloat16, weight=True, ignore=True)
    check(x, t, w, dtype=torch.bfloat16, label_smoothing=0.1, z_loss=1e-3)
    assert single


def test_statistics_and_target_gradients_take_the_two_sweep_path(monkeypatch):
    """return_stats and a probability target that requires grad are not covered by the
    single-pass kernel: asked for the single path, those calls take the two-sweep one (and
    are right there); the same call without them takes the single path."""
    taken = []
    single, two_sweep = kernels.cross_entropy_single_fwd, kernels._two_sweep_fwd
    monkeypatch.setattr(kernels, "cross_entropy_single_fwd",
                        lambda *a, **k: taken.append("single") or single(*a, **k))
    monkeypatch.setattr(kernels, "_two_sweep_fwd",
                        lambda *a, **k: taken.append("two-sweep") or two_sweep(*a, **k))
    x, t, _ = make_case(5, 257, torch.float32)
    with tuning.use_fused_path("single", segment=SEGMENT):
        loss, grad, stats = sc.cross_entropy_with_grad(x, t, return_stats=True)
        assert taken == ["two-sweep"]
        ref, x64 = reference(x, t)
        ref.backward()
        assert_close(loss, ref, torch.float32)
        assert_close(grad, x64.grad, torch.float32)
        assert_close(stats.lse, torch.logsumexp(x.double(), 1), torch.float32)
        taken.clear()
        sc.cross_entropy_with_grad(x, t)
        assert taken == ["single"]
        taken.clear()
        p = torch.rand(5, 257, device=DEVICE).softmax(1).requires_grad_()
        xg = x.clone().requires_grad_()
        sc.cross_entropy(xg, p).backward()
        assert taken == ["two-sweep"] and p.grad is not None and xg.grad is not None


# ----------------------------------------------------------------------------- layouts


def test_row_strided_and_column_major_inputs(single):
    base = torch.randn(6, 333, device=DEVICE)
    x = base[:, 7:7 + 300]  # row stride 333: read in place
    t = torch.randint(0, 300, (6,), device=DEVICE)
    with_grad_vs_reference(x, t, dtype=torch.float32, label_smoothing=0.1)
    xc = torch.randn(300, 7, device=DEVICE).t()  # strides (1, 7)
    tc = torch.randint(0, 300, (7,), device=DEVICE)
    with_grad_vs_reference(xc, tc, dtype=torch.float32, reduction="none", z_loss=1e-3)
    assert len(single) == 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_into_the_logits(single, dtype):
    """out=logits: every segment's logits are read before any gradient of its row is written."""
    x, t, _ = make_case(5, 257, dtype, ignore=True)
    x0 = x.clone()
    loss, grad = sc.cross_entropy_with_grad(x, t, out=x, label_smoothing=0.1)
    assert grad.data_ptr() == x.data_ptr()
    ref, x64 = reference(x0, t, label_smoothing=0.1)
    ref.backward()
    assert_close(loss, ref, dtype)
    assert_close(x, x64.grad, dtype)
    assert single


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_inplace_backward(single, reduction):
    x, t, _ = make_case(5, 257, torch.bfloat16, ignore=True)
    leaf = x.clone().requires_grad_()
    logits = leaf * 1.0
    loss = sc.cross_entropy(logits, t, reduction=reduction, inplace_backward=True, softcap=4.0)
    ref, x64 = reference(x, t, reduction=reduction, softcap=4.0)
    assert_close(loss, ref, torch.bfloat16)
    loss.backward()
    ref.backward()
    assert_close(leaf.grad, x64.grad, torch.bfloat16)
    assert_close(logits.detach(), x64.grad, torch.bfloat16)
    assert single


def test_every_element_written_and_nothing_else(single):
    """A NaN-poisoned out= view inside a larger NaN buffer: all of it written, the guards not."""
    x, t, w = make_case(5, 257, torch.bfloat16, weight=True, ignore=True)
    big = poisoned((7, 300), torch.bfloat16, DEVICE)
    out = big[1:6, 20:277]
    sc.cross_entropy_with_grad(x, t, w, label_smoothing=0.1, out=out)
    assert torch.isfinite(out).all()
    guard = torch.ones_like(big, dtype=torch.bool)
    guard[1:6, 20:277] = False
    assert torch.isnan(big[guard]).all()
    assert single


# ----------------------------------------------------------------------------- hard values


@pytest.mark.parametrize("opts", [dict(), dict(softcap=7.0), dict(z_loss=1e-3),
                                  dict(label_smoothing=0.0, weight=True)],
                         ids=lambda o: _opt_id(o) or "plain")
def test_minus_inf_padding_whole_segments(single, opts):
    """-inf padding filling whole segments (3 of 5): an empty segment's partials (max
    -FLT_MAX, s = -1) must not change the row's statistics; its gradient is 0."""
    opts = dict(opts)
    V, pad = 120, 200
    x, t, w = make_case(4, V, torch.float32, weight=opts.pop("weight", False))
    xp = torch.cat([x, torch.full((4, pad), float("-inf"), device=DEVICE)], dim=1)
    wp = None if w is None else torch.cat([w, torch.ones(pad, device=DEVICE)])
    loss, grad = sc.cross_entropy_with_grad(xp, t, wp, reduction="none", **opts)
    ref, x64 = reference(x, t, w, reduction="none", **opts)
    ref.sum().backward()
    assert_close(loss, ref, torch.float32)
    assert_close(grad[:, :V], x64.grad, torch.float32)
    assert torch.count_nonzero(grad[:, V:]) == 0
    # probability targets 0 on the padding (the documented deviation: finite, not NaN)
    p = torch.rand(4, V, device=DEVICE).softmax(1)
    pp = torch.cat([p, torch.zeros(4, pad, device=DEVICE)], dim=1)
    loss, grad = sc.cross_entropy_with_grad(xp, pp, **opts)
    ref, x64 = reference(x, p, **opts)
    ref.backward()
    assert_close(loss, ref, torch.float32)
    assert_close(grad[:, :V], x64.grad, torch.float32)
    assert torch.count_nonzero(grad[:, V:]) == 0
    assert single


def test_ignored_rows(single):
    x, t, w = make_case(5, 257, torch.float32, weight=True)
    t[:] = -100
    for weight in (None, w):
        loss, grad = sc.cross_entropy_with_grad(x, t, weight, label_smoothing=0.1)
        assert torch.isnan(loss) and torch.isnan(F.cross_entropy(x, t, weight))
        assert torch.count_nonzero(grad) == 0
    t[2] = 200
    loss, grad = sc.cross_entropy_with_grad(x, t, reduction="none")
    assert torch.count_nonzero(loss[[0, 1, 3, 4]]) == 0
    assert torch.count_nonzero(grad[[0, 1, 3, 4]]) == 0
    with_grad_vs_reference(x, t, w, dtype=torch.float32, z_loss=1e-3, softcap=9.0)
    assert single


@pytest.mark.parametrize("margin", [12.0, 30.0, 60.0])
def test_confident_prediction_across_segments(single, margin):
    """p_c -> 1 with the max in one segment and the rest of the row in others: s = d - 1
    combined across segments keeps the digits of 1 - p_c."""
    N, V = 4, 257
    x = torch.randn(N, V, device=DEVICE)
    t = torch.tensor([0, 100, 200, 256], device=DEVICE)
    x[torch.arange(N), t] = margin
    x = x.bfloat16()
    loss, grad = sc.cross_entropy_with_grad(x, t, reduction="sum")
    p = torch.softmax(x.double(), 1)
    exp_col = -p.scatter(1, t[:, None], 0.0).sum(1)
    assert rel_err(grad[torch.arange(N), t].double(), exp_col) < TOL[torch.bfloat16]
    rows = sc.cross_entropy_with_grad(x, t, reduction="none")[0]
    assert rel_err(rows.double(), F.cross_entropy(x.double(), t, reduction="none")) \
        < TOL[torch.bfloat16]
    assert single


@pytest.mark.parametrize("scale", [1e3, 1e5])
def test_huge_logits(single, scale):
    x, t, _ = make_case(5, 257, torch.float32, scale=scale)
    with_grad_vs_reference(x, t, dtype=torch.float32, reduction="none")
    with_grad_vs_reference(x, t, dtype=torch.float32, label_smoothing=0.1, z_loss=1e-4)
    assert single


def test_plus_inf_logit_gives_nan_like_torch(single):
    x = torch.randn(3, 257, device=DEVICE)
    x[0, 200] = float("inf")  # in the fourth segment; the target is in the first
    t = torch.tensor([0, 2, 256], device=DEVICE)
    loss, _ = sc.cross_entropy_with_grad(x, t, reduction="none")
    ref = F.cross_entropy(x.double(), t, reduction="none")
    assert torch.isnan(loss[0]) and torch.isnan(ref[0])
    assert_close(loss[1:], ref[1:], torch.float32)
    assert single


@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1)], ids=_opt_id)
@pytest.mark.parametrize("case", ["nan-alone-in-last-segment", "nan-and-minus-inf-segment",
                                  "one-nan-among-minus-inf"])
def test_nan_logit_in_a_segment_without_finite_logits_gives_nan(single, case, opts):
    """tl.max skips NaN: a segment whose only values are NaN and -inf has max -inf, like a
    segment of padding. Its NaN must still make the row NaN, as in torch (found by an
    adversarial test: the row came out finite, with one NaN in its gradient)."""
    x = torch.randn(3, 2 * SEGMENT + 1, device=DEVICE)
    if case == "nan-alone-in-last-segment":  # the last segment is one column
        x[0, 2 * SEGMENT] = float("nan")
    elif case == "nan-and-minus-inf-segment":
        x[0, SEGMENT:2 * SEGMENT] = float("nan")
        x[0, SEGMENT] = float("-inf")
    else:
        x[0, SEGMENT:2 * SEGMENT] = float("-inf")
        x[0, SEGMENT + 5] = float("nan")
    t = torch.tensor([0, 2, 2 * SEGMENT], device=DEVICE)
    loss, grad = sc.cross_entropy_with_grad(x, t, reduction="none", **opts)
    ref, x64 = reference(x, t, reduction="none", **opts)
    ref.sum().backward()
    assert torch.isnan(loss[0]) and torch.isnan(ref[0])
    assert torch.isnan(grad[0]).all() and torch.isnan(x64.grad[0]).all()
    assert_close(loss[1:], ref[1:], torch.float32)
    assert_close(grad[1:], x64.grad[1:], torch.float32)
    assert single


# ----------------------------------------------------------------------------- full vocabularies


@pytest.mark.parametrize("dtype,V,N,opts", [
    (torch.bfloat16, 128256, 2, dict()),                                 # K = 16 of 8192
    (torch.bfloat16, 256000, 1, dict()),                                 # K = 32, the last 2048
    (torch.float32, 128256, 1, dict(label_smoothing=0.1, softcap=30.0)),  # K = 32 of 4096
])
def test_full_vocabulary_with_the_tuning_tables_segments(monkeypatch, dtype, V, N, opts):
    calls = []
    launcher = kernels.cross_entropy_single_fwd
    monkeypatch.setattr(kernels, "cross_entropy_single_fwd",
                        lambda *a, **k: calls.append(1) or launcher(*a, **k))
    x, t, _ = make_case(N, V, dtype)
    with tuning.use_fused_path("single"):
        with_grad_vs_reference(x, t, dtype=dtype, **opts)
    assert calls


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device: the single-launch kernel's "
                    "programs wait for each other, which Triton's interpreter cannot run")
@pytest.mark.parametrize("V", [32000, 128256, 256000])
def test_single_launch_kernel_on_gpu(V):
    """The single-launch kernel (publish, wait, combine) with the tuning table's segments,
    against torch; enough rows that many rows are in flight and programs of a row land on
    different SMs; then the heaviest option set, and in place."""
    N = 512 if V < 200000 else 256
    x, t, w = make_case(N, V, torch.bfloat16, ignore=True, weight=True)
    with tuning.use_fused_path("single"):
        assert tuning.fused_path(V, 2, kernels._flags(t, None, 0.0, 0.0, None),
                                 kernels._resident_programs(x.device)) == "single"
        with_grad_vs_reference(x, t, dtype=torch.bfloat16)
        with_grad_vs_reference(x, t, w, dtype=torch.bfloat16, label_smoothing=0.1, z_loss=1e-4,
                               softcap=30.0)
        x0 = x.clone()
        loss, grad = sc.cross_entropy_with_grad(x, t, out=x)
        ref, x64 = reference(x0, t)
        ref.backward()
        assert_close(loss, ref, torch.bfloat16)
        assert_close(x, x64.grad, torch.bfloat16)
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- the switch


def test_the_switch(monkeypatch):
    flags = dict(HAS_WEIGHT=False, PROB_TARGET=False, HAS_SMOOTHING=False, HAS_Z_LOSS=False,
                 HAS_SOFTCAP=False)
    monkeypatch.delenv(tuning.FUSED_PATH_ENV, raising=False)
    for auto_single, expected in ((False, "two-sweep"), (True, "single")):
        monkeypatch.setattr(tuning, "AUTO_SINGLE", auto_single)
        assert tuning.fused_path(128256, 2, flags) == expected
    monkeypatch.setattr(tuning, "AUTO_SINGLE", False)
    for value, expected in (("single", "single"), ("two-sweep", "two-sweep"),
                            (" Single ", "single"), ("", "two-sweep")):
        monkeypatch.setenv(tuning.FUSED_PATH_ENV, value)
        assert tuning.fused_path(128256, 2, flags) == expected
    # use_fused_path wins over the environment
    monkeypatch.setenv(tuning.FUSED_PATH_ENV, "single")
    with tuning.use_fused_path("two-sweep"):
        assert tuning.fused_path(128256, 2, flags) == "two-sweep"
    # more segments than programs the device holds at once: the two-sweep path
    segment, _ = tuning.single_config(128256, 2, **flags)
    K = -(-128256 // segment)
    assert tuning.fused_path(128256, 2, flags, max_programs=K) == "single"
    assert tuning.fused_path(128256, 2, flags, max_programs=K - 1) == "two-sweep"
    monkeypatch.setenv(tuning.FUSED_PATH_ENV, "fast")
    with pytest.raises(ValueError, match="SOFTMAX_CE_GPU_FUSED_PATH"):
        tuning.fused_path(128256, 2, flags)
    with pytest.raises(ValueError, match="path must be one of"):
        with tuning.use_fused_path("fast"):
            pass
    with pytest.raises(ValueError, match="power of two"):
        with tuning.use_fused_path("single", segment=100):
            pass


@pytest.mark.parametrize("V", [32000, 50257, 128256, 256000])
@pytest.mark.parametrize("element_size", [4, 2])
@pytest.mark.parametrize("heavy", [False, True])
def test_single_config_covers_the_row(V, element_size, heavy):
    flags = dict(HAS_WEIGHT=heavy, PROB_TARGET=heavy, HAS_SMOOTHING=heavy, HAS_Z_LOSS=heavy,
                 HAS_SOFTCAP=heavy)
    segment, num_warps = tuning.single_config(V, element_size, **flags)
    assert segment & (segment - 1) == 0 and num_warps in (4, 8, 16)
    per_thread = segment // (32 * num_warps)
    assert per_thread >= 1
    K = -(-V // segment)
    assert (K - 1) * segment < V <= K * segment and K <= 132  # an H200 holds them all
