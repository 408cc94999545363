"""linear_cross_entropy against F.linear then F.cross_entropy on float64 copies.

Loss and all three gradients (input, linear_weight, linear_bias) with a random upstream
gradient, every reduction and option, chunk sizes that force several chunks; torch's own
OpInfo samples for F.linear_cross_entropy; and, on CPU, proofs that no N x V tensor is
ever made and that no host-syncing op runs once the computation has started.
"""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from helpers import TOL, OpRecorder, assert_close, rel_err

from softmax_ce_gpu._linear_ops import _default_chunk_size
from softmax_ce_gpu.linear import LinearCrossEntropyLoss, linear_cross_entropy

REDUCTIONS = ("mean", "sum", "none")
needs_torch_lce = pytest.mark.skipif(
    not hasattr(torch.nn, "LinearCrossEntropyLoss"),
    reason="torch < 2.13 has no linear_cross_entropy to compare with")


def make_case(N, H, V, dtype, *, target="class", ignore=False, weight=False, bias=False,
              batch=None):
    """Fresh leaves: input (N, H) (or batch + (H,)), linear weight (V, H), bias, target, w."""
    batch = (N,) if batch is None else batch
    x = torch.randn(*batch, H, device=DEVICE).to(dtype).requires_grad_()
    lw = (torch.randn(V, H, device=DEVICE) * (3.0 / math.sqrt(H))).to(dtype).requires_grad_()
    lb = (torch.randn(V, device=DEVICE).to(dtype).requires_grad_() if bias else None)
    if target == "class":
        t = torch.randint(0, V, batch, device=DEVICE)
        if ignore:
            t.view(-1)[::3] = -100
    else:
        t = torch.rand(*batch, V, device=DEVICE).softmax(dim=-1).to(dtype)
    w = (torch.rand(V, device=DEVICE) + 0.1).to(dtype) if weight else None
    return x, lw, lb, t, w


def reference(x, lw, lb, t, w=None, *, reduction="mean", ignore_index=None, z_loss=0.0,
              softcap=None, label_smoothing=0.0, dtype=torch.float64):
    """F.linear + F.cross_entropy on leaves of `dtype` (z-loss, softcap from torch primitives):
    float64 copies for the reference, or the inputs' own dtype for what torch itself achieves.

    Returns (loss, [input, linear_weight, linear_bias, target] leaves, None where absent:
    the target is a leaf when it holds probabilities that require grad).
    """
    leaves = [None if a is None else a.detach().to(dtype).requires_grad_() for a in (x, lw, lb)]
    x64, lw64, lb64 = leaves
    V = lw.shape[0]
    prob = t.is_floating_point()
    t_leaf = t.detach().to(dtype).requires_grad_() if prob and t.requires_grad else None
    leaves.append(t_leaf)
    z = F.linear(x64, lw64, lb64).reshape(-1, V)
    tt = (t_leaf if t_leaf is not None else t.to(dtype)).reshape(-1, V) if prob else t.reshape(-1)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    kw = dict(weight=None if w is None else w.to(dtype), label_smoothing=label_smoothing,
              ignore_index=-100 if ignore_index is None else ignore_index)
    rows = F.cross_entropy(z, tt, reduction="none", **kw)
    valid = torch.ones_like(rows, dtype=torch.bool) if prob else tt != kw["ignore_index"]
    rows = rows + torch.where(valid, z_loss * torch.logsumexp(z, dim=1) ** 2, 0.0)
    if reduction == "none":
        return rows.reshape(t.shape[:-1] if prob else t.shape), leaves
    if reduction == "sum":
        return rows.sum(), leaves
    if prob:
        return rows.sum() / rows.shape[0], leaves
    wt = torch.ones_like(rows) if w is None else w.to(dtype)[tt.clamp(min=0)]
    return rows.sum() / (wt * valid).sum(), leaves


def check(x, lw, lb, t, w=None, *, dtype, **kw):
    """Loss and gradients of linear_cross_entropy vs the float64 reference.

    fp32: the usual tolerance. bf16/fp16: the logits are rounded to the dtype (as F.linear
    rounds them) before the loss sees them, which moves each p_j by up to |z_j| roundings,
    and the gradients pass through further roundings (dlogits, the GEMMs); so the bound is
    what torch itself achieves on the same inputs in the same dtype, plus one rounding.
    """
    opts = {k: v for k, v in kw.items() if k not in ("chunk_size", "options")}
    loss = linear_cross_entropy(x, lw, t, linear_bias=lb, weight=w, **kw)
    ref, leaves = reference(x, lw, lb, t, w, **opts)
    assert loss.dtype == x.dtype and loss.shape == ref.shape
    up = (torch.rand_like(ref) + 0.5).to(loss.dtype)  # the same values reach both
    ref.backward(up.double())
    exact = [ref] + [None if a is None else a.grad for a in leaves]
    slack = [0.0] * 5
    if dtype in (torch.float16, torch.bfloat16):
        own, own_leaves = reference(x, lw, lb, t, w, dtype=dtype, **opts)
        own.backward(up)
        slack = [rel_err(a, e) if e is not None else 0.0
                 for a, e in zip([own] + [None if a is None else a.grad for a in own_leaves],
                                 exact)]
    err = rel_err(loss, ref)
    assert err <= slack[0] + TOL[dtype], ("loss", err, slack[0])
    loss.backward(up)
    for ours, theirs, s in zip((x, lw, lb, t), exact[1:], slack[1:]):
        if ours is not None and ours.requires_grad:
            assert ours.grad.dtype == ours.dtype and ours.grad.shape == ours.shape
            err = rel_err(ours.grad, theirs)
            assert err <= s + TOL[dtype], (err, s)
    return loss


CASES = [
    dict(),
    dict(bias=True, ignore=True, weight=True),
    dict(label_smoothing=0.2, weight=True, ignore=True),
    dict(target="prob", bias=True, weight=True, label_smoothing=0.1),
    dict(target="prob", tgrad=True, weight=True, label_smoothing=0.1),
    dict(z_loss=1e-3, softcap=4.0, bias=True, ignore=True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items())
                         or "plain")
def test_matches_torch(dtype, reduction, case):
    case = dict(case)
    make = {k: case.pop(k) for k in ("target", "ignore", "weight", "bias") if k in case}
    x, lw, lb, t, w = make_case(6, 20, 150, dtype, **make)
    if case.pop("tgrad", False):
        t.requires_grad_()
    check(x, lw, lb, t, w, dtype=dtype, reduction=reduction, chunk_size=4, **case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_probability_target_gradient_alone_and_with_heads(dtype, reduction):
    """Only the target requires grad (a trained teacher's distribution, frozen student head),
    on every path (fused for fp32, late for fp16, fp64's reference backend); and a
    K-dimensional head with probability targets, all gradients."""
    x, lw, lb, t, w = make_case(5, 12, 40, dtype, target="prob", weight=True)
    x.requires_grad_(False)
    lw.requires_grad_(False)
    t.requires_grad_()
    check(x, lw, lb, t, w, dtype=dtype, reduction=reduction, chunk_size=2, label_smoothing=0.2)
    assert x.grad is None and lw.grad is None and t.grad is not None
    N, H, V = 4, 6, 11
    x = torch.randn(N, H, device=DEVICE).to(dtype).requires_grad_()
    lw = torch.randn(V, 2, H, device=DEVICE).to(dtype).requires_grad_()
    p = torch.rand(N, V, 2, device=DEVICE).softmax(1).to(dtype).requires_grad_()
    loss = linear_cross_entropy(x, lw, p, reduction=reduction, chunk_size=3)
    leaves = [a.detach().double().requires_grad_() for a in (x, lw, p)]
    ref = F.cross_entropy(torch.einsum("nh,vdh->nvd", leaves[0], leaves[1]), leaves[2],
                          reduction=reduction)
    up = torch.rand_like(ref) + 0.5
    loss.backward(up.to(loss.dtype))
    ref.backward(up)
    assert_close(loss, ref, dtype)
    for ours, theirs in zip((x, lw, p), leaves):
        assert ours.grad.dtype == ours.dtype
        assert_close(ours.grad, theirs.grad, dtype)


def _expected_stats(z, t, ignore_index=-100, softcap=None):
    """(lse, entropy, correct) of float64 logits z (N, V) against t, ignored rows NaN/False:
    lse and entropy of the softcapped logits, the argmax of the logits themselves."""
    zc = z if softcap is None else softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(zc, dim=1)
    logp = torch.log_softmax(zc, dim=1)
    entropy = -(logp.exp() * logp).sum(dim=1)
    if t.is_floating_point():
        valid = torch.ones_like(lse, dtype=torch.bool)
        correct = z.argmax(dim=1) == t.argmax(dim=1)
    else:
        valid = t != ignore_index
        correct = valid & (z.argmax(dim=1) == t)
    nan = torch.full_like(lse, float("nan"))
    return torch.where(valid, lse, nan), torch.where(valid, entropy, nan), correct


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("target", ["class", "prob"])
def test_return_stats(dtype, reduction, target):
    """CrossEntropyStats per row from the chunks' own pass; the loss and every gradient
    bitwise those of the same call without statistics. lse and entropy are of the logits
    as the kernel sees them (rounded to the dtype by the matmul, as F.linear rounds them),
    compared with torch on float64 copies of those logits."""
    x, lw, lb, t, w = make_case(9, 16, 70, dtype, target=target, ignore=target == "class",
                                bias=True, weight=True)
    kw = dict(linear_bias=lb, weight=w, reduction=reduction, chunk_size=4, softcap=5.0)
    loss, stats = linear_cross_entropy(x, lw, t, return_stats=True, **kw)
    up = (torch.rand_like(loss.float()) + 0.5).to(loss.dtype)
    grads = torch.autograd.grad(loss, (x, lw, lb), up)
    plain = linear_cross_entropy(x, lw, t, **kw)
    assert torch.equal(loss, plain)
    for g, h in zip(grads, torch.autograd.grad(plain, (x, lw, lb), up)):
        assert torch.equal(g, h)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert stats.lse.shape == stats.entropy.shape == stats.correct.shape == (9,)
    assert stats.lse.dtype == stats.entropy.dtype == acc and stats.correct.dtype == torch.bool
    assert not stats.lse.requires_grad and not stats.entropy.requires_grad
    z = F.linear(x.detach(), lw.detach(), lb.detach()).double()  # the logits the kernel reads
    lse, entropy, correct = _expected_stats(z, t.double() if target == "prob" else t,
                                            softcap=5.0)
    assert_close(stats.lse, lse, acc)
    assert_close(stats.entropy, entropy, acc)
    assert torch.equal(stats.correct, correct)


def test_return_stats_heads_and_batch_shape():
    """K-dim heads: stats of shape (N, d1); a batched input (B, T, H): stats (B, T)."""
    N, H, V = 5, 8, 13
    x = torch.randn(N, H, device=DEVICE, requires_grad=True)
    lw = torch.randn(V, 3, H, device=DEVICE, requires_grad=True)
    t = torch.randint(0, V, (N, 3), device=DEVICE)
    t[1, 2] = -100
    loss, stats = linear_cross_entropy(x, lw, t, return_stats=True, chunk_size=2)
    z = torch.einsum("nh,vdh->nvd", x.detach().double(), lw.detach().double())
    lse, entropy, correct = _expected_stats(z.movedim(1, -1).reshape(-1, V), t.reshape(-1))
    assert stats.lse.shape == (N, 3)
    assert_close(stats.lse.reshape(-1), lse, torch.float32)
    assert_close(stats.entropy.reshape(-1), entropy, torch.float32)
    assert torch.equal(stats.correct.reshape(-1), correct)
    x = torch.randn(2, 3, H, device=DEVICE)
    t = torch.randint(0, V, (2, 3), device=DEVICE)
    loss, stats = linear_cross_entropy(x, lw[:, 0], t, return_stats=True)
    assert loss.shape == () and stats.lse.shape == stats.correct.shape == (2, 3)
    with pytest.raises(TypeError, match="linear_cross_entropy: argument 'return_stats'"):
        linear_cross_entropy(x, lw[:, 0], t, return_stats=1)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_float16_and_ignore_index_in_vocabulary(reduction):
    x, lw, lb, t, w = make_case(7, 16, 70, torch.float16, bias=True, weight=True)
    t[:3] = 5
    check(x, lw, lb, t, w, dtype=torch.float16, reduction=reduction, ignore_index=5, chunk_size=4)


def test_float64_runs_the_reference_backend():
    x, lw, lb, t, w = make_case(10, 12, 90, torch.float64, bias=True, weight=True, ignore=True)
    check(x, lw, lb, t, w, dtype=torch.float64, label_smoothing=0.1, z_loss=1e-3, chunk_size=3)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_shapes(reduction):
    # (H,) with a class id or probabilities, (B, T, H) with (B, T) ids, one row, chunk = N
    for target in ("class", "prob"):
        x, lw, lb, t, _ = make_case(1, 8, 40, torch.float32, target=target, bias=True, batch=())
        check(x, lw, lb, t, dtype=torch.float32, reduction=reduction)
    x, lw, lb, t, _ = make_case(0, 8, 40, torch.float32, batch=(2, 3), ignore=True)
    check(x, lw, lb, t, dtype=torch.float32, reduction=reduction, chunk_size=4)
    x, lw, lb, t, _ = make_case(1, 8, 40, torch.float32)
    check(x, lw, lb, t, dtype=torch.float32, reduction=reduction, chunk_size=3)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(reduction):
    x, lw, lb, t, _ = make_case(0, 8, 40, torch.float32, bias=True)
    loss = linear_cross_entropy(x, lw, t, linear_bias=lb, reduction=reduction)
    ref = F.cross_entropy(F.linear(x, lw, lb), t, reduction=reduction)
    assert loss.shape == ref.shape
    assert torch.isnan(loss).all() if reduction == "mean" else rel_err(loss, ref) == 0.0
    loss.sum().backward()
    assert x.grad.shape == (0, 8)
    assert torch.count_nonzero(lw.grad) == 0 and torch.count_nonzero(lb.grad) == 0


def test_strided_operands():
    x, lw, lb, t, _ = make_case(5, 24, 60, torch.float32, bias=True)
    xs = x.detach()[:, ::2].requires_grad_()  # row stride 24, column stride 2
    lws = lw.detach()[:, :12].t().contiguous().t().requires_grad_()  # column-major (V, H)
    check(xs, lws, lb, t, dtype=torch.float32, chunk_size=3)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_k_dimensional_heads(reduction):
    """torch's K-dim loss: linear_weight (V, 2, 3, H), target (N, 2, 3), class dim 1."""
    N, H, V = 5, 8, 30
    x = torch.randn(N, H, device=DEVICE, requires_grad=True)
    lw = torch.randn(V, 2, 3, H, device=DEVICE, requires_grad=True)
    lb = torch.randn(V, 2, 3, device=DEVICE, requires_grad=True)
    t = torch.randint(0, V, (N, 2, 3), device=DEVICE)
    t[0, 1, 2] = -100
    w = torch.rand(V, device=DEVICE) + 0.1
    loss = linear_cross_entropy(x, lw, t, linear_bias=lb, weight=w, reduction=reduction,
                                chunk_size=2)
    leaves = [a.detach().double().requires_grad_() for a in (x, lw, lb)]
    logits = torch.einsum("nh,vdeh->nvde", leaves[0], leaves[1]) + leaves[2]
    ref = F.cross_entropy(logits, t, w.double(), reduction=reduction)
    assert_close(loss, ref, torch.float32)
    up = torch.rand_like(ref) + 0.5
    loss.backward(up.float())
    ref.backward(up)
    for ours, theirs in zip((x, lw, lb), leaves):
        assert_close(ours.grad, theirs.grad, torch.float32)


def test_partial_gradients_and_no_grad():
    x, lw, lb, t, _ = make_case(6, 8, 50, torch.float32, bias=True)
    lw.requires_grad_(False)  # a frozen head: only input and bias get gradients
    check(x, lw, lb, t, dtype=torch.float32, chunk_size=4)
    assert lw.grad is None
    with torch.no_grad():
        loss = linear_cross_entropy(x, lw, t, linear_bias=lb, label_smoothing=0.1)
    ref, _ = reference(x, lw, lb, t, label_smoothing=0.1)
    assert not loss.requires_grad
    assert_close(loss, ref, torch.float32)


def test_default_chunk_rule():
    cuda = torch.device("cuda")
    # roomy H200: the 512 MiB cap, 2048 rows at V = 128256 bf16; 1024 rows at V = 256000
    assert _default_chunk_size(8192, 128256, 4096, 1, 2, cuda, free_bytes=100 << 30) == 2048
    assert _default_chunk_size(8192, 256000, 4096, 1, 2, cuda, free_bytes=100 << 30) == 1024
    # nearly full device: never below 256 rows; and never more than N
    assert _default_chunk_size(8192, 128256, 4096, 1, 2, cuda, free_bytes=1 << 30) == 256
    assert _default_chunk_size(100, 32000, 4096, 1, 2, cuda, free_bytes=100 << 30) == 100
    # CPU: a 64 MiB budget
    cpu = torch.device("cpu")
    assert _default_chunk_size(10 ** 6, 32000, 64, 1, 4, cpu) == 512
    x, lw, lb, t, _ = make_case(5, 8, 40, torch.float32)
    check(x, lw, lb, t, dtype=torch.float32)  # chunk_size=None: one chunk of 5 rows


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_second_backward(reduction):
    """Fused gradients are handed out once (a second backward raises) unless options allow it;
    'none' recomputes, so a second backward gives the same gradients."""
    x, lw, _, t, _ = make_case(5, 8, 40, torch.float32)
    loss = linear_cross_entropy(x, lw, t, reduction=reduction, chunk_size=2).sum()
    loss.backward(retain_graph=True)
    first = lw.grad.clone()
    lw.grad = None
    if reduction == "mean":
        with pytest.raises(RuntimeError, match="second time"):
            loss.backward()
        # torch's options object where it exists (torch >= 2.13); the same two fields otherwise
        make = getattr(torch.nn, "LinearCrossEntropyOptions", SimpleNamespace)
        options = make(allow_retain_graph=True, batch_chunk_size=2)
        loss = linear_cross_entropy(x, lw, t, options=options) * 2.0
        loss.backward(retain_graph=True)
        lw.grad = None
    loss.backward()
    scale = 2.0 if reduction == "mean" else 1.0
    torch.testing.assert_close(lw.grad, first * scale, rtol=1e-6, atol=0)


@needs_torch_lce
def test_module_loads_torch_state_dict():
    H, V = 12, 40
    w = torch.rand(V, device=DEVICE) + 0.1
    kw = dict(bias=True, label_smoothing=0.1, reduction="sum")
    theirs = torch.nn.LinearCrossEntropyLoss(H, V, device=DEVICE, dtype=torch.float64,
                                             weight=w.double(), **kw)
    ours = LinearCrossEntropyLoss(H, V, device=DEVICE, chunk_size=3, weight=w, **kw)
    ours.load_state_dict({k: v.float() for k, v in theirs.state_dict().items()})
    x = torch.randn(5, H, device=DEVICE)
    t = torch.randint(0, V, (5,), device=DEVICE)
    loss, ref = ours(x, t), theirs(x.double(), t)
    assert_close(loss, ref, torch.float32)
    loss.backward()
    ref.backward()
    assert_close(ours.linear.weight.grad, theirs.linear.weight.grad, torch.float32)
    assert_close(ours.linear.bias.grad, theirs.linear.bias.grad, torch.float32)
    assert "chunk_size=3" in repr(ours)


# ----------------------------------------------------------------------------- memory and syncs


_SYNC_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.equal", "aten.masked_select",
             "aten.unique", "aten._unique2", "aten.item", "aten.is_nonzero"}


@pytest.mark.skipif(DEVICE != "cpu", reason="dispatch-mode recording runs on the CPU suite")
@pytest.mark.parametrize("dtype,reduction", [(torch.float32, "mean"), (torch.float32, "none"),
                                             (torch.float64, "sum"), (torch.float64, "none")])
def test_never_makes_n_by_v_and_never_syncs(dtype, reduction):
    """fp32 runs the kernels (interpreted), fp64 the reference backend, through the same code."""
    # N x V = 1600 elements; one chunk is 3 x 200 = 600; grad_W's accumulator V x H = 800
    N, H, V = 8, 4, 200
    x, lw, lb, t, w = make_case(N, H, V, dtype, bias=True, weight=True, ignore=True)
    with OpRecorder() as rec:
        loss = linear_cross_entropy(x, lw, t, linear_bias=lb, weight=w, reduction=reduction,
                                    label_smoothing=0.1, z_loss=1e-3, softcap=5.0, chunk_size=3)
        loss.sum().backward()
    biggest = max(size for _, size in rec.ops)
    assert biggest < N * V * x.element_size(), sorted(rec.ops, key=lambda o: -o[1])[:5]
    assert biggest == V * H * x.element_size()  # the gradient of linear_weight
    # a host sync is allowed only in the CPU input check (class ids out of range), before
    # the first matmul; none in the computation, forward or backward
    first_mm = next(i for i, (name, _) in enumerate(rec.ops) if name in ("aten.mm", "aten.addmm"))
    late = [name for name, _ in rec.ops[first_mm:] if name in _SYNC_OPS]
    assert not late, late
    assert x.grad is not None and lw.grad is not None and lb.grad is not None


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (torch.cuda sync debug mode)")
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_host_sync_on_cuda(reduction):
    """torch.cuda.set_sync_debug_mode('error') raises on any synchronising CUDA call."""
    x, lw, lb, t, w = make_case(300, 64, 1000, torch.bfloat16, bias=True, weight=True,
                                ignore=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for chunk_size in (128, None):  # None: the default rule, which asks mem_get_info
            loss = linear_cross_entropy(x, lw, t, linear_bias=lb, weight=w, reduction=reduction,
                                        label_smoothing=0.1, z_loss=1e-4, softcap=30.0,
                                        chunk_size=chunk_size)
            loss.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(lw.grad).all()


# ----------------------------------------------------------------------------- bad input


def _good():
    x, lw, lb, t, w = make_case(4, 8, 10, torch.float32, bias=True, weight=True)
    return dict(input=x, linear_weight=lw, target=t, linear_bias=lb, weight=w)


BAD_CALLS = [
    ("integer input", dict(input=torch.ones(4, 8, dtype=torch.int64)), TypeError, ["'input'"]),
    ("weight dtype", dict(linear_weight=torch.randn(10, 8, dtype=torch.float64)), TypeError,
     ["'linear_weight'", "torch.float64"]),
    ("features mismatch", dict(linear_weight=torch.randn(10, 7)), ValueError,
     ["'linear_weight'", "H=8"]),
    ("1-d weight", dict(linear_weight=torch.randn(8)), ValueError, ["'linear_weight'"]),
    ("bias shape", dict(linear_bias=torch.randn(9)), ValueError, ["'linear_bias'", "(9,)"]),
    ("target shape", dict(target=torch.zeros(3, dtype=torch.long)), ValueError,
     ["'target'", "(3,)"]),
    ("probabilities shape", dict(target=torch.rand(4, 9)), ValueError, ["'target'", "(4, 9)"]),
    ("ignore_index with probabilities", dict(target=torch.rand(4, 10), ignore_index=-100),
     ValueError, ["'ignore_index'"]),
    ("class id out of range", dict(target=torch.tensor([0, 1, 10, 2])), ValueError,
     ["'target'", "10"]),
    ("class weight shape", dict(weight=torch.rand(9)), ValueError, ["'weight'", "(9,)"]),
    ("reduction", dict(reduction="avg"), ValueError, ["'reduction'", "avg"]),
    ("chunk_size 0", dict(chunk_size=0), ValueError, ["'chunk_size'", "0"]),
    ("chunk_size float", dict(chunk_size=2.0), TypeError, ["'chunk_size'"]),
    ("options of the wrong type", dict(options=3), TypeError, ["'options'"]),
    ("k-dim weight, unbatched input", dict(input=torch.randn(8),
                                           linear_weight=torch.randn(10, 2, 8),
                                           target=torch.zeros(2, dtype=torch.long),
                                           linear_bias=None), ValueError, ["(N, 8)"]),
]


@pytest.mark.parametrize("desc,override,exc,words", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input(desc, override, exc, words):
    if DEVICE == "cuda" and desc == "class id out of range":
        pytest.skip("on CUDA the class-id range is a device-side assert (tests/test_bad_input.py)")
    kw = _good()
    kw.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v
               for k, v in override.items()})
    with pytest.raises(exc) as info:
        linear_cross_entropy(kw.pop("input"), kw.pop("linear_weight"), kw.pop("target"), **kw)
    msg = str(info.value)
    assert "linear_cross_entropy" in msg and all(word in msg for word in words), msg


# ----------------------------------------------------------------------------- torch's OpInfo


def _opinfo_samples():
    """(variant, sample) of torch's OpInfo entries for nn.functional.linear_cross_entropy."""
    from torch.testing._internal.common_methods_invocations import op_db
    ops = [op for op in op_db if op.name == "nn.functional.linear_cross_entropy"]
    assert {op.variant_test_name for op in ops} >= {"", "chunked", "chunked_none"}
    return ops


def _copy(a, dtype=None, grad=True):
    if not isinstance(a, torch.Tensor):
        return a
    b = a.detach().clone()
    if dtype is not None and b.is_floating_point():
        b = b.to(dtype)
    return b.requires_grad_(grad and a.requires_grad)


# Every sample of the three variants runs in float64 (the reference backend: exact, and the same
# host code: chunking, K-dim heads, reductions); the base variant's single-head samples also run
# in float32 through the kernels. Its K-dim samples (linear_weight of rank > 2) are left to the
# float64 pass and test_k_dimensional_heads: under the interpreter each head of each sample is
# another launch, and the suite must stay under a minute.
OPINFO_RUNS = [(torch.float64, ("", "chunked", "chunked_none"), True),
               (torch.float32, ("",), False)]


@needs_torch_lce
@pytest.mark.parametrize("dtype,variants,k_dim", OPINFO_RUNS, ids=["float64", "float32"])
def test_torch_opinfo_samples(dtype, variants, k_dim):
    """Every selected sample runs; none is skipped. Probability targets arrive with
    requires_grad=True: their gradient is compared too, with the loss's and those of input,
    linear_weight and linear_bias."""
    pytest.importorskip("expecttest")
    counts = {"run": 0, "target_grad": 0, "skipped": 0, "k_dim_left_to_float64": 0}
    for op in _opinfo_samples():
        if op.variant_test_name not in variants:
            continue
        for sample in op.sample_inputs(DEVICE, dtype, requires_grad=True):
            lw0, t0 = sample.args
            if lw0.dim() > 2 and not k_dim:
                counts["k_dim_left_to_float64"] += 1
                continue
            kw = {k: _copy(v) for k, v in sample.kwargs.items()}
            x, lw, t = _copy(sample.input), _copy(lw0), _copy(t0)
            target_grad = t.is_floating_point() and t.requires_grad
            counts["target_grad"] += target_grad
            loss = linear_cross_entropy(x, lw, t, **kw)
            kw64 = {k: _copy(v, torch.float64) for k, v in sample.kwargs.items()
                    if k != "options"}
            x64, lw64 = _copy(sample.input, torch.float64), _copy(lw0, torch.float64)
            t64 = _copy(t0, torch.float64)
            ref = F.linear_cross_entropy(x64, lw64, t64, **kw64)
            assert loss.shape == ref.shape and loss.dtype == dtype
            up = (torch.rand_like(ref) + 0.5).to(dtype)  # the same values reach both
            loss.backward(up)
            ref.backward(up.double())
            pairs = [(loss, ref), (x.grad, x64.grad), (lw.grad, lw64.grad)]
            if kw.get("linear_bias") is not None:
                pairs.append((kw["linear_bias"].grad, kw64["linear_bias"].grad))
            if target_grad:
                pairs.append((t.grad, t64.grad))
            for ours, theirs in pairs:
                err = rel_err(ours, theirs)
                assert err <= TOL[dtype], (op.variant_test_name, sample, err)
            counts["run"] += 1
    print(f"\nOpInfo {dtype} {variants}: {counts}")
    assert counts["run"] > 0 and counts["skipped"] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_vmap_of_grad_per_sample(dtype, reduction):
    """torch.func.vmap(torch.func.grad(...)) over a batch of inputs and targets: per-sample
    gradients of the input and of the (shared) linear weight, as torch's F.linear_cross_entropy
    allows. The fused path (fp32 'mean'/'sum'), the late path (fp16, 'none') and fp64."""
    x, lw, lb, t, w = make_case(5, 8, 30, dtype, bias=True, weight=True)
    xs = torch.stack([x.detach(), x.detach().flip(0), x.detach() * 0.5])
    ts = torch.stack([t, t.flip(0), (t + 1) % 30])
    ts[1, 2] = -100
    lw, lb = lw.detach(), lb.detach()

    def ours(xx, ww, tt):
        return linear_cross_entropy(xx, ww, tt, linear_bias=lb, weight=w,
                                    reduction=reduction).sum()

    def torchs(acc):  # F.linear in the operands' dtype, the loss in acc
        def f(xx, ww, tt):
            z = F.linear(xx, ww, lb.to(xx.dtype)).to(acc)
            return F.cross_entropy(z, tt, weight=w.to(acc), reduction=reduction).sum()
        return f

    def per_sample(f, *args):
        return torch.func.vmap(torch.func.grad(f, argnums=(0, 1)), in_dims=(0, None, 0))(*args)

    got = per_sample(ours, xs, lw, ts)
    ref = per_sample(torchs(torch.float64), xs.double(), lw.double(), ts)
    # fp16: the logits are rounded to fp16 first (as F.linear rounds them): the bound is what
    # torch achieves from the same fp16 operands, plus one rounding
    own = per_sample(torchs(torch.float32), xs, lw, ts) if dtype == torch.float16 else None
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g.dtype == dtype and g.shape == r.shape
        if own is None:
            assert_close(g, r, dtype)
        else:
            assert rel_err(g, r) <= rel_err(own[i], r) + TOL[dtype]
