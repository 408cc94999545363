"""The seed's formulas, hard numerics, layouts, in-place gradients and poisoned outputs.

Tests of the fused forward run on both of its paths (the conftest fixture fused_path).
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from helpers import TOL, assert_close, poisoned, rel_err
from test_cross_entropy import check, make_case, reference

import softmax_ce_gpu as sc
from softmax_ce_gpu import _backend, _ops as sc_ops, reference as ref_backend


@pytest.mark.usefixtures("fused_path")
def test_sum_gradient_is_softmax_minus_onehot():
    """dL/dx = p - e_y for reduction='sum' (the seed's formula, in float64)."""
    x, t, _ = make_case(6, 200, torch.float32)
    _, grad = sc.cross_entropy_with_grad(x, t, reduction="sum")
    expected = torch.softmax(x.double(), dim=1) - F.one_hot(t, 200).double()
    assert_close(grad, expected, torch.float32)


@pytest.mark.usefixtures("fused_path")
def test_gradient_is_jacobian_transpose_product():
    """dL/dx = J^T dL/dp with J = diag(p) - p p^T, dL/dp = -y / p, built explicitly per row."""
    x, t, w = make_case(3, 12, torch.float32, weight=True)
    _, grad = sc.cross_entropy_with_grad(x, t, w, reduction="sum", label_smoothing=0.2)
    for r in range(3):
        p = torch.softmax(x[r].double(), dim=0)
        J = torch.diag(p) - torch.outer(p, p)
        y = 0.2 / 12 * w.double()
        y[t[r]] += 0.8 * w[t[r]].double()
        assert_close(grad[r], J.T @ (-y / p), torch.float32)


@pytest.mark.usefixtures("fused_path")
def test_padding_with_minus_inf_contributes_nothing():
    V, pad = 300, 45
    x, t, _ = make_case(5, V, torch.float32)
    xp = torch.cat([x, torch.full((5, pad), float("-inf"), device=DEVICE)], dim=1)
    for kw in (dict(), dict(softcap=7.0), dict(z_loss=1e-3), dict(weight=None)):
        loss, grad = sc.cross_entropy_with_grad(xp, t, reduction="none", **kw)
        ref_loss, ref_grad = sc.cross_entropy_with_grad(x, t, reduction="none", **kw)
        assert_close(loss, ref_loss, torch.float32)
        assert_close(grad[:, :V], ref_grad, torch.float32)
        assert torch.count_nonzero(grad[:, V:]) == 0
    # probability targets that are 0 on the padding: finite, equal to the unpadded loss
    # (torch returns NaN here: 0 * log(0); this is the documented deviation)
    p = torch.rand(5, V, device=DEVICE).softmax(1)
    pp = torch.cat([p, torch.zeros(5, pad, device=DEVICE)], dim=1)
    loss, grad = sc.cross_entropy_with_grad(xp, pp)
    ref, x64 = reference(x, p)
    ref.backward()
    assert_close(loss, ref, torch.float32)
    assert_close(grad[:, :V], x64.grad, torch.float32)
    assert torch.count_nonzero(grad[:, V:]) == 0


@pytest.mark.usefixtures("fused_path")
def test_label_smoothing_on_padding_is_infinite_like_torch():
    x = torch.tensor([[0.0, float("-inf"), 1.0]], device=DEVICE)
    t = torch.tensor([0], device=DEVICE)
    loss = sc.cross_entropy(x, t, label_smoothing=0.1)
    assert loss.item() == float("inf") == F.cross_entropy(x, t, label_smoothing=0.1).item()


@pytest.mark.usefixtures("fused_path")
@pytest.mark.parametrize("scale", [1e3, 1e5])
def test_huge_logits(scale):
    x, t, _ = make_case(5, 500, torch.float32, scale=scale)
    check(x, t, dtype=torch.float32, reduction="none")
    check(x, t, dtype=torch.float32, label_smoothing=0.1, z_loss=1e-4)


@pytest.mark.usefixtures("fused_path")
@pytest.mark.parametrize("margin", [12.0, 30.0, 60.0])
def test_confident_prediction_keeps_true_class_gradient(margin):
    """p_c -> 1: the true-class gradient p_c - 1 must keep its digits, not cancel to 0."""
    N, V = 4, 1000
    x = torch.randn(N, V, device=DEVICE)
    t = torch.randint(0, V, (N,), device=DEVICE)
    x[torch.arange(N), t] = margin
    x = x.bfloat16()
    loss, grad = sc.cross_entropy_with_grad(x, t, reduction="sum")
    x64 = x.double()
    p = torch.softmax(x64, 1)
    # 1 - p_c = sum of the other p_j: no cancellation, even in float64 at margin 60
    exp_col = -p.scatter(1, t[:, None], 0.0).sum(1)
    expected = p.scatter(1, t[:, None], exp_col[:, None])
    true_col = grad[torch.arange(N), t].double()
    assert (exp_col < 0).all()
    assert rel_err(true_col, exp_col) < TOL[torch.bfloat16]
    ref_rows = F.cross_entropy(x64, t, reduction="none")
    assert rel_err(sc.cross_entropy(x, t, reduction="none").double(), ref_rows) < TOL[torch.bfloat16]
    assert_close(grad, expected, torch.bfloat16)


@pytest.mark.usefixtures("fused_path")
def test_row_strided_input_needs_no_copy():
    base = torch.randn(6, 333, device=DEVICE)
    x = base[:, 7:7 + 300]                     # row stride 333, no copy
    t = torch.randint(0, 300, (6,), device=DEVICE)
    check(x, t, dtype=torch.float32, label_smoothing=0.1)
    check(x, torch.rand(6, 300, device=DEVICE)[:, :].t().contiguous().t(), dtype=torch.float32)


def test_column_major_input():
    x = torch.randn(300, 7, device=DEVICE).t()  # strides (1, 7)
    t = torch.randint(0, 300, (7,), device=DEVICE)
    check(x, t, dtype=torch.float32, reduction="none", z_loss=1e-3)


_INT64_SCRIPT = r"""
import sys, torch
sys.path.insert(0, {tests!r})
import softmax_ce_gpu as sc
from softmax_ce_gpu.kernels import tuning
from test_cross_entropy import reference
from helpers import assert_close
torch.manual_seed(0)
N, V, big, dev = {N}, {V}, 2 ** 30 + 16, {device!r}
try:
    storage = torch.empty(4 * big + 64 + N * V, dtype=torch.bfloat16, device=dev)
except (RuntimeError, MemoryError):
    print("NO-MEMORY"); sys.exit(0)
x = storage.as_strided((N, V), {strides})
x.copy_(torch.randn(N, V, device=dev).bfloat16())
storage[64:64 + V] = 50.0  # where a wrapped int32 offset of index 4 would land
t = torch.randint(0, V, (N,), device=dev)
with tuning.use_fused_path({path!r}, segment={segment}):
    loss, grad = sc.cross_entropy_with_grad(x, t, reduction="none")
ref, x64 = reference(x.clone(), t, reduction="none")
ref.sum().backward()
assert_close(loss, ref, torch.bfloat16)
assert_close(grad, x64.grad, torch.bfloat16)
print("OK")
"""


@pytest.mark.parametrize("path", ["two-sweep", "single"])
@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_int64_offsets(layout, path):
    """Rows (or columns) k * (2^30 + 16) elements apart: past index 1 an int32 offset wraps.

    An int32 offset makes index 2 negative (a crash) or index 4 land on index 0's data
    (a wrong answer), so the case runs in a child process that must print OK. The 8 GiB
    storage is reserved, never touched beyond the elements written.
    """
    import os
    import subprocess
    import sys

    big = 2 ** 30 + 16
    N, V, strides = (5, 64, (big, 1)) if layout == "rows" else (3, 5, (1, big))
    script = _INT64_SCRIPT.format(tests=os.path.dirname(__file__), device=DEVICE, N=N, V=V,
                                  strides=strides, path=path,
                                  segment=16 if path == "single" else None)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=600)
    if "NO-MEMORY" in run.stdout:
        pytest.skip("cannot reserve 8 GiB of address space here")
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stderr[-2000:]


@pytest.mark.usefixtures("fused_path")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_with_grad_writes_every_element_and_nothing_else(reduction):
    """out is a NaN-poisoned view inside a larger NaN buffer: all of it written, the guards not."""
    x, t, w = make_case(5, 260, torch.bfloat16, weight=True, ignore=True)
    big = poisoned((7, 300), torch.bfloat16, DEVICE)
    out = big[1:6, 20:280]
    loss, grad = sc.cross_entropy_with_grad(x, t, w, reduction=reduction, label_smoothing=0.1,
                                            out=out)
    assert grad.data_ptr() == out.data_ptr()
    assert torch.isfinite(out).all()
    guard = torch.ones_like(big, dtype=torch.bool)
    guard[1:6, 20:280] = False
    assert torch.isnan(big[guard]).all()
    ref, x64 = reference(x, t, w, reduction=reduction, label_smoothing=0.1)
    ref.sum().backward()
    assert_close(loss, ref, torch.bfloat16)
    assert_close(grad, x64.grad, torch.bfloat16)


@pytest.mark.usefixtures("fused_path")
def test_with_grad_in_place_into_logits():
    x, t, _ = make_case(4, 100, torch.float16)
    x0 = x.clone()
    loss, grad = sc.cross_entropy_with_grad(x, t, out=x)
    assert grad.data_ptr() == x.data_ptr()
    ref, x64 = reference(x0, t)
    ref.backward()
    assert_close(loss, ref, torch.float16)
    assert_close(x, x64.grad, torch.float16)


@pytest.mark.usefixtures("fused_path")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward(reduction, dtype):
    x, t, _ = make_case(5, 150, dtype, ignore=True)
    leaf = x.clone().requires_grad_()
    logits = leaf * 1.0                         # a non-leaf, like a model's output
    loss = sc.cross_entropy(logits, t, reduction=reduction, inplace_backward=True,
                            label_smoothing=0.1)
    ref, x64 = reference(x, t, reduction=reduction, label_smoothing=0.1)
    assert_close(loss, ref, dtype)
    up = (torch.rand_like(ref) + 0.5).to(dtype)  # the same values reach both
    loss.backward(up)
    ref.backward(up.double())
    assert_close(leaf.grad, x64.grad, dtype)
    # the gradient went into the logits' storage
    assert_close(logits.detach(), x64.grad, dtype)


def test_inplace_backward_makes_stale_uses_fail_loudly():
    x, t, _ = make_case(4, 50, torch.float32)
    leaf = x.clone().requires_grad_()
    logits = leaf * 1.0
    other = (logits * logits).sum()             # saves logits for its backward
    loss = sc.cross_entropy(logits, t, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


def test_inplace_backward_without_grad_leaves_logits_alone():
    x, t, _ = make_case(4, 50, torch.float32)
    x0 = x.clone()
    sc.cross_entropy(x, t, inplace_backward=True)
    assert torch.equal(x, x0)


@pytest.mark.usefixtures("fused_path")
def test_default_path_never_writes_the_callers_tensors():
    x, t, w = make_case(4, 80, torch.bfloat16, weight=True)
    xg = x.clone().requires_grad_()
    copies = (xg.detach().clone(), t.clone(), w.clone())
    sc.cross_entropy(xg, t, w, reduction="none").sum().backward()
    sc.cross_entropy_with_grad(xg.detach(), t, w)
    for a, b in zip((xg.detach(), t, w), copies):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pure_pytorch_path_matches_torch(monkeypatch, dtype):
    """The reference backend (CPU without the interpreter) has the same semantics."""
    monkeypatch.setattr(sc_ops, "backend_for", lambda fn, logits: ref_backend)
    for kw in (dict(weight=True, ignore=True), dict(target="prob")):
        x, t, w = make_case(5, 120, dtype, **kw)
        for reduction in ("mean", "sum", "none"):
            check(x, t, w, dtype=dtype, reduction=reduction, label_smoothing=0.1)
    x, t, _ = make_case(4, 90, dtype)
    check(x, t, dtype=dtype, z_loss=1e-3, softcap=5.0)
    xp = torch.cat([x, torch.full((4, 10), float("-inf"), device=DEVICE, dtype=dtype)], 1)
    _, grad = sc.cross_entropy_with_grad(xp, t)
    assert torch.count_nonzero(grad[:, 90:]) == 0


def test_backend_choice():
    x = torch.randn(2, 3, device=DEVICE)
    assert _backend.backend_for("f", x.double()) is ref_backend
    if DEVICE == "cuda":
        assert _backend.backend_for("f", x) is _backend.kernels
    else:
        assert _backend.kernels.INTERPRETER
        assert _backend.backend_for("f", x) is _backend.kernels


@pytest.mark.usefixtures("fused_path")
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (host-sync detection)")
def test_no_host_sync_on_cuda():
    x, t, w = make_case(64, 4096, torch.bfloat16, weight=True, ignore=True)
    for reduction in ("mean", "sum", "none"):
        for inplace in (False, True):
            xg = x.clone().requires_grad_()
            logits = xg * 1.0
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                loss = sc.cross_entropy(logits, t, w, reduction=reduction, label_smoothing=0.1,
                                        z_loss=1e-4, inplace_backward=inplace)
                loss.sum().backward()
            finally:
                torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()


def test_uint8_class_ids_above_127_are_not_ignore_index():
    """-100 in uint8 would wrap to 156: the host and the kernel must both see class 156."""
    x, _, _ = make_case(3, 200, torch.float32)
    t = torch.tensor([156, 3, 7], device=DEVICE)
    for reduction in ("mean", "none"):
        ref, _ = reference(x, t, reduction=reduction)
        assert_close(sc.cross_entropy(x, t.to(torch.uint8), reduction=reduction), ref,
                     torch.float32)


def test_fp16_gradient_survives_a_loss_scale():
    """With a GradScaler-like upstream gradient, fp16 entries of size (p / N) * scale must
    not be flushed to zero by rounding p / N to fp16 before the scale is applied."""
    N, V, scale = 1024, 16, 16384.0
    x = torch.randn(N, V, device=DEVICE)
    t = torch.randint(0, V, (N,), device=DEVICE)
    x[torch.arange(N), t] = 12.0
    x = x.half()
    xg = x.clone().requires_grad_()
    (sc.cross_entropy(xg, t) * scale).backward()
    ref, x64 = reference(x, t)
    (ref * scale).backward()
    representable = x64.grad.abs() > 1e-7  # above fp16's smallest subnormal, 6e-8
    assert (xg.grad[representable] != 0).all()
    assert_close(xg.grad, x64.grad, torch.float16)


def test_plus_inf_logit_gives_nan_like_torch():
    for V in (3, 5000):  # the +inf in the only chunk, or in an early one
        x = torch.randn(2, V, device=DEVICE)
        x[0, 1] = float("inf")
        t = torch.tensor([0, 2], device=DEVICE)
        loss = sc.cross_entropy(x, t, reduction="none")
        ref = F.cross_entropy(x.double(), t, reduction="none")
        assert torch.isnan(loss[0]) and torch.isnan(ref[0])
        assert_close(loss[1:], ref[1:], torch.float32)
