"""Adversarial sweep after issue 12: every entry point against torch on float64 copies.

What a skeptical user tries: every tensor argument's layout (strided, expanded, transposed,
offset views, rank > 2 in odd layouts, 1-D), every integer dtype of class ids with edge
ignore_index values, every autograd mode (no_grad, inference_mode, create_graph,
retain_graph, hooks, torch.func) and odd upstream gradients, scalar options at edge
magnitudes, extreme logits and shapes; after every call the caller's tensors must hold the
same values at the same version unless the call was asked to write them; bad input must
raise TypeError/ValueError naming the function, the argument and the value.

The reference is torch on float64 copies of the same values; where the exact value does not
fit the result's dtype (it overflows to inf there), the reference is that overflow. Tests
marked `# DEFECT:` pin down a wrong answer of the current code and fail until it is fixed.
"""

import json
import os
import traceback
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import DEVICE
from helpers import assert_close, poisoned

import softmax_ce_gpu as sc
from softmax_ce_gpu.distributed import vocab_parallel_cross_entropy

INF = float("inf")
NAN = float("nan")
REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------- helpers


def rand_logits(N, V, dtype=torch.float32, scale=3.0, seed=None):
    g = None if seed is None else torch.Generator().manual_seed(seed)
    return (torch.randn(N, V, generator=g) * scale).to(dtype).to(DEVICE)


def rand_ids(N, V):
    return torch.randint(0, V, (N,), device=DEVICE)


def exact_in(ref, dtype):
    """The float64 reference as the result's dtype can hold it: values that overflow the dtype
    are its inf (torch in that dtype overflows there too), the rest stays exact."""
    r = ref.detach().double()
    rd = r.to(dtype).double()
    return torch.where(torch.isfinite(rd) | ~torch.isfinite(r), r, rd)


def close(actual, ref, dtype, roundings=1):
    assert_close(actual, exact_in(ref, dtype), dtype, roundings)


def ref_ce(x, t, w=None, **kw):
    """torch's cross-entropy on float64 copies (z-loss and softcap from torch primitives), for
    logits of any rank (class dim 1). Returns (loss, float64 leaf of x)."""
    x64 = x.detach().double().requires_grad_()
    return ref_ce_of(x64, t, w, **kw), x64


def ref_ce_of(x64, t, w=None, *, reduction="mean", ignore_index=-100, label_smoothing=0.0,
              z_loss=0.0, softcap=None):
    """The reference loss of float64 logits x64 (which may be part of a graph)."""
    z = x64
    if softcap is not None:
        # a -inf logit (padding) stays -inf and gets no gradient (README), so it is kept out
        # of tanh's branch entirely (torch.where would send it a gradient of 1)
        pad = x64 == -INF
        z = torch.where(pad, x64.detach(),
                        softcap * torch.tanh(torch.where(pad, 0.0, x64) / softcap))
    prob = t.is_floating_point()
    tt = t.double() if prob else t.long()
    w64 = None if w is None else w.detach().double()
    kw = dict(ignore_index=ignore_index, label_smoothing=label_smoothing)
    if z_loss == 0.0:
        return F.cross_entropy(z, tt, w64, reduction=reduction, **kw)
    rows = F.cross_entropy(z, tt, w64, reduction="none", **kw)
    valid = torch.ones_like(rows, dtype=torch.bool) if prob else tt != ignore_index
    lse = torch.logsumexp(z, dim=1 if z.dim() > 1 else 0)
    rows = rows + torch.where(valid, z_loss * lse ** 2, 0.0)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if prob:
        return rows.sum() / (rows.numel() if rows.dim() else 1)
    V = x64.shape[1 if x64.dim() > 1 else 0]
    wt = torch.ones_like(rows) if w64 is None else w64[tt.clamp(min=0, max=V - 1)]
    return rows.sum() / (wt * valid).sum()


def ours_ce(x, t, w=None, **kw):
    """sc.cross_entropy on a fresh leaf copy of x (same strides); loss.sum().backward().
    Unless inplace_backward, the leaf itself must come out unwritten. Returns (loss, grad)."""
    if _self_overlap_free(x):
        xg = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        xg.copy_(x.detach())
    else:  # an expanded tensor: the same memory, as a leaf (it is only read)
        xg = x.detach()
    xg.requires_grad_()
    snap = Untouched(xg, t, w)
    loss = sc.cross_entropy(xg, t, w, **kw)
    loss.sum().backward()
    if not kw.get("inplace_backward"):
        snap.check()
    return loss, xg.grad


def _self_overlap_free(x):
    return all(st != 0 for st, n in zip(x.stride(), x.shape) if n > 1)


def both_ce(x, t, w=None, **kw):
    ref, x64 = ref_ce(x, t, w, **kw)
    ref.sum().backward()
    return ref, x64.grad


class Untouched:
    """Records tensors' values and version counters; check() asserts neither changed."""

    def __init__(self, *tensors):
        self.items = [(a, a.detach().clone(), a._version) for a in tensors
                      if isinstance(a, torch.Tensor)]

    def check(self):
        for i, (a, values, version) in enumerate(self.items):
            assert a._version == version, f"argument {i}: version {version} -> {a._version}"
            same = torch.equal(a.detach(), values) or (
                a.is_floating_point() and torch.equal(a.detach().isnan(), values.isnan())
                and torch.equal(a.detach().nan_to_num(0.0), values.nan_to_num(0.0)))
            assert same, f"argument {i} was written"


def raises(exc, fn, *words):
    """fn() raises exc whose message holds every word (the function, argument, value)."""
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    for word in words:
        assert word in msg, f"{word!r} not in {msg!r}"


# ----------------------------------------------------------------------------- logits layouts


def _layout(kind, N, V, dtype):
    """(logits view, class-id target) in the named layout; the view reads fresh values."""
    if kind == "contiguous":
        return rand_logits(N, V, dtype), rand_ids(N, V)
    if kind == "transposed":
        return rand_logits(V, N, dtype).t(), rand_ids(N, V)
    if kind == "column-strided":
        return rand_logits(N, 2 * V, dtype)[:, ::2], rand_ids(N, V)
    if kind == "offset":
        return rand_logits(N + 2, V + 5, dtype)[2:, 3:3 + V], rand_ids(N, V)
    if kind == "expanded-rows":
        return rand_logits(1, V, dtype).expand(N, V), rand_ids(N, V)
    if kind == "1-d":
        return rand_logits(1, V, dtype)[0], torch.tensor(V // 2, device=DEVICE)
    if kind == "rank3":
        return rand_logits(N * 2, V, dtype).reshape(N, V, 2), torch.randint(0, V, (N, 2), device=DEVICE)
    if kind == "channels-last":
        x = rand_logits(N * 2, V, dtype).reshape(N, V, 2, 1).contiguous(
            memory_format=torch.channels_last)
        return x, torch.randint(0, V, (N, 2, 1), device=DEVICE)
    if kind == "permuted":
        x = rand_logits(N * 2, V, dtype).reshape(2, N, 1, V).permute(1, 3, 2, 0)
        return x, torch.randint(0, V, (N, 1, 2), device=DEVICE)
    raise ValueError(kind)


LAYOUTS = ["contiguous", "transposed", "column-strided", "offset", "expanded-rows", "1-d",
           "rank3", "channels-last", "permuted"]


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_logits_layouts(kind, reduction):
    x, t = _layout(kind, 2, 21, torch.float32)
    w = torch.rand(21, device=DEVICE) + 0.1
    snap = Untouched(x, t, w)
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    ref, gref = both_ce(x, t, w, **kw)
    loss, grad = ours_ce(x, t, w, **kw)
    close(loss, ref, torch.float32)
    close(grad, gref, torch.float32)
    if reduction == "mean":  # the fused kernel without autograd, and the module
        loss2, grad2 = sc.cross_entropy_with_grad(x, t, w, **kw)
        close(loss2, ref, torch.float32)
        close(grad2, gref, torch.float32)
        mod = sc.CrossEntropyLoss(w, reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
        close(mod(x, t), ref, torch.float32)
    snap.check()


@pytest.mark.parametrize("kind", ["transposed", "column-strided", "1-d", "channels-last"])
def test_cross_entropy_logits_layouts_bf16(kind):
    x, t = _layout(kind, 3, 32, torch.bfloat16)
    snap = Untouched(x, t)
    ref, gref = both_ce(x, t)
    loss, grad = ours_ce(x, t)
    close(loss, ref, torch.bfloat16)
    close(grad, gref, torch.bfloat16)
    snap.check()


def _view(kind, big):
    return {"row-strided": lambda b: b[:3, :21], "transposed": lambda b: b[:21, :3].t(),
            "column-strided": lambda b: b[:3, :38:2], "offset": lambda b: b[1:4, 5:26]}[kind](big)


@pytest.mark.parametrize("kind", ["row-strided", "transposed", "column-strided", "offset"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_backward_into_any_strides(kind, reduction):
    """inplace_backward writes the gradient through the logits' own strides and nowhere else."""
    big = rand_logits(24, 40)
    keep = big.clone()
    view = _view(kind, big)
    N, V = view.shape
    t = rand_ids(N, V)
    ref, gref = both_ce(view.clone(), t, reduction=reduction)
    view.requires_grad_()
    loss = sc.cross_entropy(view, t, reduction=reduction, inplace_backward=True)
    close(loss, ref, torch.float32)
    loss.sum().backward()
    close(view.grad, gref, torch.float32)
    outside = torch.ones_like(big, dtype=torch.bool)
    _view(kind, outside).fill_(False)
    assert torch.equal(big[outside], keep[outside])


# DEFECT: inplace_backward=True on self-overlapping (expanded) logits writes every row's gradient into the same memory: wrong loss and gradient, no error
def test_inplace_backward_on_expanded_logits_is_refused_or_right():
    V = 8
    row = rand_logits(1, V).requires_grad_()
    t = torch.tensor([1, 2, 3, 4], device=DEVICE)
    ref_row = row.detach().double().requires_grad_()
    ref = F.cross_entropy(ref_row.expand(4, V), t)
    ref.backward()
    try:
        loss = sc.cross_entropy((row * 1.0).expand(4, V), t, inplace_backward=True)
    except (ValueError, RuntimeError) as err:
        assert "cross_entropy" in str(err)
        return
    loss.backward()
    close(loss, ref, torch.float32)
    close(row.grad, ref_row.grad, torch.float32)


@pytest.mark.parametrize("kind", ["transposed", "column-strided"])
def test_strided_rows_of_several_blocks(kind):
    """Several BLOCK_V chunks read with a column stride."""
    V = 1030  # label smoothing and an odd V: chunks of 1024, so two of them
    x = rand_logits(V, 2).t() if kind == "transposed" else rand_logits(2, 2 * V)[:, ::2]
    t = torch.tensor([1029, 17], device=DEVICE)
    ref, gref = both_ce(x, t, reduction="none", label_smoothing=0.1)
    loss, grad = ours_ce(x, t, reduction="none", label_smoothing=0.1)
    close(loss, ref, torch.float32)
    close(grad, gref, torch.float32)
    close(sc.log_softmax(x, 1), torch.log_softmax(x.double(), 1), torch.float32)


def test_inplace_backward_into_channels_last_logits():
    """Rank 4, channels-last: the flattened (N*H*W, V) rows are a view of the caller's memory."""
    x = rand_logits(2 * 2, 20).reshape(2, 20, 2, 1).contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 20, (2, 2, 1), device=DEVICE)
    ref, gref = both_ce(x, t, label_smoothing=0.1)
    leaf = x.clone(memory_format=torch.channels_last).requires_grad_()
    loss = sc.cross_entropy(leaf, t, label_smoothing=0.1, inplace_backward=True)
    close(loss, ref, torch.float32)
    loss.backward()
    close(leaf.grad, gref, torch.float32)


# DEFECT: inplace_backward=True does not check the class weight against the logits it overwrites: a weight that is a view of the logits' memory is read after earlier rows overwrote it (wrong loss and gradient, no error)
def test_inplace_backward_with_a_weight_that_aliases_the_logits():
    N, V = 3, 8
    buf = torch.rand(N, V, device=DEVICE) + 0.1
    t = torch.tensor([1, 2, 3], device=DEVICE)
    ref, gref = both_ce(buf, t, buf[1].clone(), reduction="sum")
    leaf = buf.clone().requires_grad_()
    logits = leaf * 1.0
    try:
        loss = sc.cross_entropy(logits, t, logits.detach()[1], reduction="sum",
                                inplace_backward=True)
    except ValueError as err:
        assert "cross_entropy" in str(err) and "'weight'" in str(err)
        return
    close(loss, ref, torch.float32)
    loss.backward()
    close(leaf.grad, gref, torch.float32)


# ----------------------------------------------------------------------------- target layouts


@pytest.mark.parametrize("kind", ["strided", "expanded", "int32-strided", "rank3-transposed",
                                  "uint8-strided"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_class_id_target_layouts(kind, reduction):
    N, V = 3, 21
    if kind == "rank3-transposed":
        x = rand_logits(N * 2, V).reshape(N, V, 2)
        t = torch.randint(0, V, (2, N), device=DEVICE).t()
        t[0, 1] = -100
    else:
        x = rand_logits(N, V)
        base = torch.randint(0, V, (2 * N,), device=DEVICE)
        base[2] = -100
        t = {"strided": base[::2], "expanded": base[1:2].expand(N),
             "int32-strided": base.int()[::2],
             "uint8-strided": base.clamp(min=0).to(torch.uint8)[::2]}[kind]
    snap = Untouched(x, t)
    ref, gref = both_ce(x, t, reduction=reduction, label_smoothing=0.05)
    loss, grad = ours_ce(x, t, reduction=reduction, label_smoothing=0.05)
    close(loss, ref, torch.float32)
    close(grad, gref, torch.float32)
    loss2, grad2 = sc.cross_entropy_with_grad(x, t, reduction=reduction, label_smoothing=0.05)
    close(grad2, gref, torch.float32)
    snap.check()


@pytest.mark.parametrize("kind", ["transposed", "expanded-row", "column-strided", "rank3-permuted",
                                  "1-d", "fp64-target", "bf16-target"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_probability_target_layouts(kind, reduction):
    N, V = 3, 20
    if kind == "rank3-permuted":
        x = rand_logits(N * 2, V).reshape(N, 2, V).permute(0, 2, 1)
        t = torch.rand(2, N, V, device=DEVICE).softmax(-1).permute(1, 2, 0)[:1]
        x = x[:1]
    elif kind == "1-d":
        x = rand_logits(1, V)[0]
        t = torch.rand(V, device=DEVICE).softmax(0)
    else:
        x = rand_logits(N, V)
        p = torch.rand(N, V, device=DEVICE).softmax(1)
        t = {"transposed": p.t().contiguous().t(), "expanded-row": p[:1].expand(N, V),
             "column-strided": torch.cat([p, p], 1)[:, ::2],
             "fp64-target": p.double(), "bf16-target": p.bfloat16()}[kind]
    w = torch.rand(V, device=DEVICE) + 0.5
    snap = Untouched(x, t, w)
    # torch takes probabilities of the logits' dtype: the same values in float64
    ref, gref = both_ce(x, t, w, reduction=reduction, label_smoothing=0.1)
    loss, grad = ours_ce(x, t, w, reduction=reduction, label_smoothing=0.1)
    close(loss, ref, torch.float32)
    close(grad, gref, torch.float32)
    snap.check()


# ----------------------------------------------------------------------------- id dtypes


_ID_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16,
              torch.uint32, torch.uint64]


def _ignore_values(dtype):
    info = torch.iinfo(dtype)
    lo, hi = int(info.min), min(int(info.max), 2 ** 63 - 1)
    vals = {-100, 0, lo, hi, hi + 1}
    return sorted(v for v in vals if -(2 ** 63) <= v <= 2 ** 63 - 1)


@pytest.mark.parametrize("id_dtype", _ID_DTYPES, ids=str)
def test_class_id_dtypes_with_edge_ignore_index(id_dtype):
    """Each ignore_index the dtype can hold ignores exactly the rows that hold it; one it cannot
    hold ignores nothing (never a wrapped value). torch's reference: the same ids in int64."""
    V = 20
    info = torch.iinfo(id_dtype)
    x = rand_logits(3, V)
    for ignore_index in _ignore_values(id_dtype):
        ids = torch.tensor([0, 19, 5], device=DEVICE)
        if info.min <= ignore_index <= info.max:
            ids[1] = ignore_index
        t = ids.to(id_dtype)
        snap = Untouched(x, t)
        ref, gref = both_ce(x, ids, ignore_index=ignore_index)
        loss, grad = sc.cross_entropy_with_grad(x, t, ignore_index=ignore_index)
        close(loss, ref, torch.float32)
        close(grad, gref, torch.float32)
        snap.check()
    # the late path (its backward kernel compares the ids again), int32 beyond its range
    t = torch.tensor([0, 19, 5], device=DEVICE).to(id_dtype)
    beyond = min(int(info.max) + 1, 2 ** 63 - 1)
    ref, gref = both_ce(x, t.long(), reduction="none", ignore_index=beyond)
    loss, grad = ours_ce(x, t, reduction="none", ignore_index=beyond)
    close(loss, ref, torch.float32)
    close(grad, gref, torch.float32)


# DEFECT: uint64 class ids above 2**63 - 1 wrap to negative int64 values: 2**64 - 100 is taken for ignore_index=-100 (row silently ignored) instead of a ValueError for an id outside [0, V)
def test_uint64_ids_beyond_int64_are_refused_not_wrapped():
    x = rand_logits(2, 8)
    t = torch.tensor([3, 2 ** 64 - 100], dtype=torch.uint64, device=DEVICE)
    raises(ValueError, lambda: sc.cross_entropy(x, t, reduction="none"), "cross_entropy",
           "'target'", str(2 ** 64 - 100))


def test_bool_and_float_class_ids_refused():
    x = rand_logits(3, 8)
    raises(TypeError, lambda: sc.cross_entropy(x, torch.tensor([True, False, True])),
           "cross_entropy", "'target'", "torch.bool")
    raises(ValueError, lambda: sc.cross_entropy(x, torch.tensor([1.0, 2.0, 3.0])),
           "cross_entropy", "'target'", "(3,)")


# ----------------------------------------------------------------------------- out= and aliasing


def test_with_grad_out_layouts_and_poison():
    """out of any strides is written completely, and nothing outside it."""
    x, t = rand_logits(3, 20), rand_ids(3, 20)
    ref, gref = both_ce(x, t, reduction="sum")
    snap = Untouched(x, t)
    for make in (lambda: poisoned((3, 20), torch.float32, DEVICE),
                 lambda: poisoned((20, 3), torch.float32, DEVICE).t(),
                 lambda: poisoned((3, 45), torch.float32, DEVICE)[:, 2:42:2]):
        out = make()
        base = out._base if out._base is not None else out
        marker = torch.zeros(base.shape, dtype=torch.bool, device=DEVICE)
        marker.as_strided(out.shape, out.stride(), out.storage_offset()).fill_(True)
        loss, grad = sc.cross_entropy_with_grad(x, t, reduction="sum", out=out)
        assert grad is out
        close(loss, ref, torch.float32)
        close(grad, gref, torch.float32)
        assert torch.isnan(base[~marker]).all(), "written outside out"
    snap.check()


# DEFECT: cross_entropy_with_grad(out=x) with x self-overlapping (expanded) is taken as an in-place gradient: every row writes the same memory, wrong loss and gradient, no error
def test_with_grad_out_is_the_input_but_self_overlapping():
    V = 8
    x = rand_logits(1, V).expand(4, V)
    t = torch.tensor([1, 2, 3, 4], device=DEVICE)
    ref, _ = both_ce(x.clone(), t)
    try:
        loss, _ = sc.cross_entropy_with_grad(x, t, out=x)
    except ValueError as err:
        assert "cross_entropy_with_grad" in str(err) and "'out'" in str(err)
        return
    close(loss, ref, torch.float32)
    raise AssertionError("an out that overlaps itself was accepted")


# DEFECT: an out that overlaps the class weight is accepted (the docstring says it is refused); the weight is read after rows of out overwrote it: wrong loss and gradient
def test_with_grad_out_overlapping_the_weight_is_refused():
    N, V = 3, 8
    x, t = rand_logits(N, V), torch.tensor([1, 2, 3], device=DEVICE)
    buf = torch.rand(N * V, device=DEVICE) + 0.1
    w, out = buf[:V], buf.view(N, V)
    ref, gref = both_ce(x, t, w.clone(), reduction="sum")
    try:
        loss, grad = sc.cross_entropy_with_grad(x, t, w, reduction="sum", out=out)
    except ValueError as err:
        assert "cross_entropy_with_grad" in str(err) and "'out'" in str(err)
        return
    close(loss, ref, torch.float32)
    close(grad, gref, torch.float32)
    raise AssertionError("an out that overlaps the weight was accepted")


def test_with_grad_out_overlapping_a_probability_target_is_refused():
    x = rand_logits(3, 8)
    p = torch.rand(3, 8, device=DEVICE).softmax(1)
    raises(ValueError, lambda: sc.cross_entropy_with_grad(x, p, out=p), "cross_entropy_with_grad",
           "'out'")


def test_with_grad_out_rank3_and_1d():
    for x, t in ((rand_logits(2 * 2, 20).reshape(2, 20, 2), torch.randint(0, 20, (2, 2))),
                 (rand_logits(1, 20)[0], torch.tensor(3))):
        ref, gref = both_ce(x, t)
        out = poisoned(tuple(x.shape), torch.float32, DEVICE)
        loss, grad = sc.cross_entropy_with_grad(x, t, out=out)
        assert grad is out
        close(loss, ref, torch.float32)
        close(grad, gref, torch.float32)
        xi = x.clone()
        loss, grad = sc.cross_entropy_with_grad(xi, t, out=xi)  # in place
        assert grad is xi
        close(grad, gref, torch.float32)


# ----------------------------------------------------------------------------- autograd modes


_NO_GRAD = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
            "grad_off": lambda: torch.set_grad_enabled(False)}


@pytest.mark.parametrize("ctx", list(_NO_GRAD))
def test_no_gradient_modes_every_entry_point(ctx):
    """No graph, the reference's values, and no argument written, for every entry point."""
    x, t = rand_logits(3, 20), rand_ids(3, 20)
    leaf = x.clone().requires_grad_()
    logits = leaf * 1.0
    w = torch.rand(20, device=DEVICE).requires_grad_()  # a weight that requires grad: fine here
    h = torch.randn(3, 6, device=DEVICE).requires_grad_()
    lw = torch.randn(20, 6, device=DEVICE).requires_grad_()
    snap = Untouched(logits, t, w, h, lw)
    calls = {
        "cross_entropy": (lambda: sc.cross_entropy(logits, t, w, inplace_backward=True),
                          lambda: F.cross_entropy(x.double(), t, w.detach().double())),
        "none": (lambda: sc.cross_entropy(logits, t, reduction="none", inplace_backward=True),
                 lambda: F.cross_entropy(x.double(), t, reduction="none")),
        "module": (lambda: sc.CrossEntropyLoss(inplace_backward=True)(logits, t),
                   lambda: F.cross_entropy(x.double(), t)),
        "linear": (lambda: sc.linear_cross_entropy(h, lw, t),
                   lambda: F.cross_entropy(F.linear(h.double(), lw.double()), t)),
        "linear-none": (lambda: sc.linear_cross_entropy(h, lw, t, reduction="none"),
                        lambda: F.cross_entropy(F.linear(h.double(), lw.double()), t,
                                                reduction="none")),
        "softmax": (lambda: sc.softmax(logits, 1), lambda: torch.softmax(x.double(), 1)),
        "log_softmax": (lambda: sc.log_softmax(logits, 1),
                        lambda: torch.log_softmax(x.double(), 1)),
    }
    for name, (ours, theirs) in calls.items():
        with _NO_GRAD[ctx]():
            out = ours()
        assert out.grad_fn is None and not out.requires_grad, name
        close(out, theirs().detach(), torch.float32)
        snap.check()


def test_inputs_that_do_not_require_grad_are_not_written():
    x, t = rand_logits(3, 20), rand_ids(3, 20)
    snap = Untouched(x, t)
    for reduction in REDUCTIONS:
        sc.cross_entropy(x, t, reduction=reduction, inplace_backward=True)
    snap.check()


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_double_backward_is_torchs(op, dtype):
    x = rand_logits(3, 20).to(dtype)
    v = torch.randn_like(x)
    g = torch.randn_like(x)

    def penalty(fn, xx):
        y = fn(xx, dim=1)
        (gx,) = torch.autograd.grad((y * g).sum(), xx, create_graph=True)
        return (y * g).sum() + (gx * v).sum()

    xg = x.clone().requires_grad_()
    penalty(getattr(sc, op), xg).backward()
    x64 = x.double().requires_grad_()
    penalty(getattr(torch, op), x64).backward()
    close(xg.grad, x64.grad, dtype)


def test_linear_double_backward_raises_not_detached():
    h = torch.randn(3, 6, device=DEVICE, requires_grad=True)
    lw = torch.randn(20, 6, device=DEVICE, requires_grad=True)
    t = rand_ids(3, 20)
    for reduction in ("mean", "none"):
        loss = sc.linear_cross_entropy(h, lw, t, reduction=reduction).sum()
        (gh,) = torch.autograd.grad(loss, h, create_graph=True)
        ref = F.cross_entropy(F.linear(h.double(), lw.double()), t, reduction=reduction).sum()
        (gref,) = torch.autograd.grad(ref, h)
        close(gh, gref, torch.float32)
        assert gh.requires_grad
        with pytest.raises(RuntimeError, match="linear_cross_entropy"):
            (gh * gh).sum().backward()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_hooks_on_the_logits(reduction):
    """A hook sees torch's gradient and what it returns is what reaches the leaf."""
    x, t = rand_logits(3, 20), rand_ids(3, 20)
    _, gref = both_ce(x, t, reduction=reduction)
    for inplace in (False, True):
        leaf = x.clone().requires_grad_()
        logits = leaf * 1.0
        seen = []
        logits.register_hook(lambda g: seen.append(g.detach().clone()) or g * 2.0)
        sc.cross_entropy(logits, t, reduction=reduction, inplace_backward=inplace).sum().backward()
        close(seen[0], gref, torch.float32)
        close(leaf.grad, 2.0 * gref, torch.float32)


def test_retain_graph_late_path_and_softmax_twice():
    x, t = rand_logits(3, 20), rand_ids(3, 20)
    _, gref = both_ce(x, t, reduction="none")
    xg = x.clone().requires_grad_()
    loss = sc.cross_entropy(xg, t, reduction="none").sum()
    loss.backward(retain_graph=True)
    loss.backward()
    close(xg.grad, 2 * gref, torch.float32)
    xg = x.clone().requires_grad_()
    y = sc.log_softmax(xg, 1).sum() + sc.softmax(xg, 0)[0].sum()
    y.backward(retain_graph=True)
    y.backward()
    x64 = x.double().requires_grad_()
    (torch.log_softmax(x64, 1).sum() + torch.softmax(x64, 0)[0].sum()).backward()
    close(xg.grad, 2 * x64.grad, torch.float32)


def test_late_inplace_second_backward_fails_loudly():
    """reduction='none' + inplace_backward: a second backward would read overwritten logits."""
    x, t = rand_logits(3, 20), rand_ids(3, 20)
    leaf = x.clone().requires_grad_()
    loss = sc.cross_entropy(leaf * 1.0, t, reduction="none", inplace_backward=True).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        loss.backward()


def test_torch_func_with_weights_and_inplace():
    x, t = rand_logits(3, 20), rand_ids(3, 20)
    w = torch.rand(20, device=DEVICE) + 0.1
    ref = torch.func.grad(lambda xx: F.cross_entropy(xx, t, w.double(), label_smoothing=0.1))(
        x.double())
    snap = Untouched(x, t, w)
    for inplace in (False, True):
        xi = x.clone() if inplace else x  # inplace_backward overwrites the input it is given
        got = torch.func.grad(lambda xx: sc.cross_entropy(
            xx, t, w, label_smoothing=0.1, inplace_backward=inplace))(xi)
        close(got, ref, torch.float32)
    snap.check()


# ----------------------------------------------------------------------------- upstream gradients


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_per_row_upstream_of_every_kind(dtype):
    """reduction='none': each row's upstream (inf, NaN, 0, -0, negative, huge, tiny) scales that
    row only; ignored rows stay 0."""
    N, V = 8, 20
    x, t = rand_logits(N, V, dtype), rand_ids(N, V)
    t[1] = -100
    t[5] = -100
    big = 6e4 if dtype == torch.float16 else 1e30
    # (fp16: a tiny upstream is 1e-3, so that the gradient is not all subnormal)
    up = torch.tensor([INF, NAN, 0.0, -0.0, -3.0, big, 1e-30 if dtype != torch.float16 else 1e-3,
                       1.0], device=DEVICE).to(dtype)
    xg = x.clone().requires_grad_()
    sc.cross_entropy(xg, t, reduction="none").backward(up)
    x64 = x.double().requires_grad_()
    F.cross_entropy(x64, t, reduction="none").backward(up.double())
    assert torch.count_nonzero(xg.grad[[1, 5]]) == 0
    # inf upstream: every entry non-finite, as torch's (whose target column is inf - inf = NaN
    # where the library's is -inf: either is an overflow the loss scaler sees)
    assert not torch.isfinite(xg.grad[0]).any() and not torch.isfinite(x64.grad[0]).any()
    assert torch.isnan(xg.grad[1]).sum() == 0  # NaN upstream on an ignored row: zeros
    for r in (2, 3, 4, 6, 7):
        close(xg.grad[r], x64.grad[r], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("up", [0.0, -1.0, 1e30, 1e-30, 6e4, -0.0])
def test_scalar_upstream_of_every_kind(dtype, up):
    N, V = 3, 20
    if dtype == torch.float16 and abs(up) > 6e4:
        up = 6e4
    if dtype == torch.float16 and 0 < abs(up) < 1e-3:
        up = 1e-3  # not an all-subnormal fp16 gradient
    x, t = rand_logits(N, V, dtype), rand_ids(N, V)
    xg = x.clone().requires_grad_()
    loss = sc.cross_entropy(xg, t)
    upt = torch.tensor(up, device=DEVICE).to(dtype)
    loss.backward(upt)
    x64 = x.double().requires_grad_()
    F.cross_entropy(x64, t).backward(upt.double())
    # bf16's fused gradient is rounded in forward and again when scaled (README: rounding)
    close(xg.grad, x64.grad, dtype, 2 if dtype == torch.bfloat16 else 1)


def test_fp16_loss_scaler_keeps_small_gradients():
    """fp16 'mean': the upstream (a loss scale of 2**15) meets the gradient before it is rounded."""
    N, V = 16, 40
    x, t = rand_logits(N, V, torch.float16, scale=4.0), rand_ids(N, V)
    xg = x.clone().requires_grad_()
    sc.cross_entropy(xg, t).backward(torch.tensor(2.0 ** 15, dtype=torch.float16))
    x64 = x.double().requires_grad_()
    F.cross_entropy(x64, t).backward(torch.tensor(2.0 ** 15, dtype=torch.float64))
    close(xg.grad, x64.grad, torch.float16)
    exact_zero = int((x64.grad.half() == 0).sum())
    assert abs(int((xg.grad == 0).sum()) - exact_zero) <= 2


# ----------------------------------------------------------------------------- scalar options


@pytest.mark.parametrize("ls", [1e-8, 1 - 1e-8, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_label_smoothing_edges(ls, reduction):
    x, t = rand_logits(3, 20), rand_ids(3, 20)
    t[2] = -100
    w = torch.rand(20, device=DEVICE) + 0.1
    for ww in (None, w):
        ref, gref = both_ce(x, t, ww, reduction=reduction, label_smoothing=ls)
        loss, grad = ours_ce(x, t, ww, reduction=reduction, label_smoothing=ls)
        close(loss, ref, torch.float32)
        close(grad, gref, torch.float32)
    p = torch.rand(3, 20, device=DEVICE).softmax(1)
    ref, gref = both_ce(x, p, reduction=reduction, label_smoothing=ls)
    loss, grad = ours_ce(x, p, reduction=reduction, label_smoothing=ls)
    close(loss, ref, torch.float32)
    close(grad, gref, torch.float32)


@pytest.mark.parametrize("z", [0.0, 1e-12, 1e6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_z_loss_edges(z, dtype):
    x, t = rand_logits(4, 20, dtype), rand_ids(4, 20)
    t[1] = -100
    for reduction in ("mean", "none"):
        ref, gref = both_ce(x, t, reduction=reduction, z_loss=z)
        loss, grad = ours_ce(x, t, reduction=reduction, z_loss=z)
        close(loss, ref, dtype)
        close(grad, gref, dtype)


@pytest.mark.parametrize("c", [1e-30, 2e-38, 1e-3, 1e30])
def test_softcap_edges_with_an_exact_zero_logit(c):
    x, t = rand_logits(3, 20), rand_ids(3, 20)
    x[0, 4] = 0.0
    x[1, 2] = -INF
    x[2, :3] = torch.tensor([1e38, -1e38, 1e-30])
    for reduction in ("sum", "none"):
        ref, gref = both_ce(x, t, reduction=reduction, softcap=c)
        loss, grad = ours_ce(x, t, reduction=reduction, softcap=c)
        close(loss, ref, torch.float32)
        close(grad, gref, torch.float32)


# DEFECT: a softcap below ~1.2e-38 (1/c overflows fp32 in kernels.softcap_scalar) makes a logit of exactly 0 NaN (0 * inf): NaN loss and gradient where torch's c*tanh(0/c) = 0
@pytest.mark.parametrize("c", [1e-39, 1e-45])
def test_softcap_below_fp32_normal_range(c):
    x, t = rand_logits(2, 20), torch.tensor([3, 5], device=DEVICE)
    x[0, 4] = 0.0
    ref, gref = both_ce(x, t, reduction="none", softcap=c)
    loss, grad = ours_ce(x, t, reduction="none", softcap=c)
    close(loss, ref, torch.float32)
    close(grad, gref, torch.float32)


@pytest.mark.parametrize("kind", ["some-zero", "huge", "tiny", "all-zero", "one-hot"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_weight_magnitudes(kind, reduction):
    N, V = 4, 20
    x, t = rand_logits(N, V), rand_ids(N, V)
    w = torch.rand(V, device=DEVICE) + 0.5
    if kind == "some-zero":
        w[t[0]] = 0.0
        w[::3] = 0.0
    elif kind == "huge":
        w = w * 1e30
    elif kind == "tiny":
        w = w * 1e-30
    elif kind == "all-zero":
        w = torch.zeros(V, device=DEVICE)
    else:
        w = torch.zeros(V, device=DEVICE)
        w[t[1]] = 2.0
    for ls in (0.0, 0.2):
        ref, gref = both_ce(x, t, w, reduction=reduction, label_smoothing=ls)
        loss, grad = ours_ce(x, t, w, reduction=reduction, label_smoothing=ls)
        close(loss, ref, torch.float32)
        close(grad, gref, torch.float32)  # all-zero 'mean': NaN like torch's


# ----------------------------------------------------------------------------- extreme logits


def _extreme(kind, dtype):
    N, V = 4, 20
    x = rand_logits(N, V, dtype)
    t = torch.tensor([0, 5, 9, 19], device=DEVICE)
    big = {torch.float32: 3.4e38, torch.bfloat16: 3.38e38, torch.float16: 65504.0}[dtype]
    if kind == "huge-mixed":
        x[0, :4] = torch.tensor([1e38, -1e38, 1e37, 0.0]).to(dtype) if dtype != torch.float16 else \
            torch.tensor([6e4, -6e4, 3e4, 0.0]).to(dtype)
        x[1, 5] = big
        x[2, 9] = -big
        x[3, :] = big
    elif kind == "neg-inf-columns":
        x[:, 3] = -INF
        x[0, 0] = -INF  # the target of row 0 at -inf: an infinite loss, a finite gradient
    elif kind == "neg-inf-row":
        x[2, :] = -INF
    elif kind == "nan":
        x[1, 7] = NAN
    elif kind == "pos-inf":
        x[3, 2] = INF
    elif kind == "ties":
        x[:] = 1.5
    elif kind == "one-huge":
        x[:, 7] = 1e4 if dtype != torch.float16 else 6e4
        t[1] = 7
    return x, t


EXTREMES = ["huge-mixed", "neg-inf-columns", "neg-inf-row", "nan", "pos-inf", "ties", "one-huge"]


@pytest.mark.parametrize("kind,dtype", [(k, torch.float32) for k in EXTREMES] + [
    (k, d) for k in ("huge-mixed", "neg-inf-columns", "nan", "one-huge")
    for d in (torch.bfloat16, torch.float16)], ids=str)
def test_extreme_logits_per_row(kind, dtype):
    """reduction='none': every row's loss and gradient as torch's (NaN/inf where torch has them)."""
    x, t = _extreme(kind, dtype)
    ref, gref = both_ce(x, t, reduction="none")
    loss, grad = ours_ce(x, t, reduction="none")
    close(loss, ref, dtype)
    close(grad, gref, dtype)
    if dtype == torch.float32:  # the fused kernel
        loss2, grad2 = sc.cross_entropy_with_grad(x, t, reduction="sum")
        ref2, gref2 = both_ce(x, t, reduction="sum")
        close(loss2, ref2, dtype)
        close(grad2, gref2, dtype)


@pytest.mark.parametrize("kind", ["huge-mixed", "neg-inf-columns", "ties", "one-huge"])
def test_extreme_logits_with_options(kind):
    x, t = _extreme(kind, torch.float32)
    kw = dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0)
    ref, gref = both_ce(x, t, reduction="none", **kw)
    loss, grad = ours_ce(x, t, reduction="none", **kw)
    close(loss, ref, torch.float32)
    close(grad, gref, torch.float32)


def test_nan_logit_in_an_ignored_row_gives_a_zero_gradient():
    """The library reads nothing of an ignored row: its gradient is 0 even when it holds NaN
    (torch's is NaN there: 0 - exp(NaN) * 0). Not in README's list of deviations."""
    x, t = rand_logits(3, 20), torch.tensor([1, -100, 2], device=DEVICE)
    x[1, 3] = NAN
    loss, grad = ours_ce(x, t)
    ref, gref = both_ce(x, t)
    close(loss, ref, torch.float32)
    assert torch.isnan(gref[1]).all() and torch.count_nonzero(grad[1]) == 0
    close(grad[[0, 2]], gref[[0, 2]], torch.float32)


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("N", [0, 1, 3])
@pytest.mark.parametrize("V", [1, 2, 17])
def test_shapes(N, V):
    x, t = rand_logits(N, V), rand_ids(N, V)
    p = torch.rand(N, V, device=DEVICE).softmax(1) if N else torch.rand(0, V, device=DEVICE)
    for target, reductions in ((t, REDUCTIONS), (p, ("mean", "none"))):
        for reduction in reductions:
            ref, gref = both_ce(x, target, reduction=reduction, label_smoothing=0.1)
            loss, grad = ours_ce(x, target, reduction=reduction, label_smoothing=0.1)
            assert loss.shape == ref.shape and grad.shape == x.shape
            close(loss, ref, torch.float32)
            close(grad, gref, torch.float32)
    loss, grad = sc.cross_entropy_with_grad(x, t)
    assert grad.shape == x.shape and (N > 0 or torch.isnan(loss))


# ----------------------------------------------------------------------------- softmax


def _softmax_input(kind, dtype):
    """(input view, dim) in the named layout."""
    V = 20
    if kind == "transposed-dim1":
        return rand_logits(V, 3, dtype).t(), 1
    if kind == "transposed-dim0":
        return rand_logits(V, 3, dtype).t(), 0
    if kind == "column-strided":
        return rand_logits(3, 2 * V, dtype)[:, 1::2], 1
    if kind == "expanded":
        return rand_logits(1, V, dtype).expand(3, V), 1
    if kind == "channels-last-dim1":
        return rand_logits(2 * 2, V, dtype).reshape(2, V, 2, 1).contiguous(
            memory_format=torch.channels_last), 1
    if kind == "permuted-dim1":
        return rand_logits(2 * 3, V, dtype).reshape(2, 3, V).permute(2, 1, 0), 1
    if kind == "uncollapsible":
        return rand_logits(3 * 4, V, dtype).reshape(3, 4, V)[:, :2, :], 2
    if kind == "middle-dim":
        return rand_logits(2 * V, 3, dtype).reshape(2, V, 3), 1
    if kind == "1-d":
        return rand_logits(1, V, dtype)[0], 0
    if kind == "0-d":
        return torch.tensor(2.5, device=DEVICE).to(dtype), 0
    if kind == "empty-rows":
        return rand_logits(0, V, dtype), 1
    if kind == "empty-class-dim":
        return rand_logits(3, 0, dtype), 1
    raise ValueError(kind)


SOFTMAX_LAYOUTS = ["transposed-dim1", "transposed-dim0", "column-strided", "expanded",
                   "channels-last-dim1", "permuted-dim1", "uncollapsible", "middle-dim", "1-d",
                   "0-d", "empty-rows", "empty-class-dim"]


@pytest.mark.parametrize("kind", SOFTMAX_LAYOUTS)
@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_softmax_layouts_forward_and_backward(kind, op):
    x, dim = _softmax_input(kind, torch.float32)
    snap = Untouched(x)
    xg = x.detach().clone().requires_grad_()
    snap_leaf = Untouched(xg)
    y = getattr(sc, op)(xg, dim)
    x64 = x.detach().double().requires_grad_()
    ref = getattr(torch, op)(x64, dim)
    assert y.shape == ref.shape and y.dtype == x.dtype
    close(y, ref, torch.float32)
    # the upstream in an odd layout: transposed when 2-D, else expanded along the dim
    g = torch.randn(ref.shape[::-1], dtype=torch.float64, device=DEVICE).t() if ref.dim() == 2 \
        else torch.randn(ref.shape, dtype=torch.float64, device=DEVICE)
    y.backward(g.float())
    ref.backward(g)
    close(xg.grad, x64.grad, torch.float32)
    snap.check()
    snap_leaf.check()


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_softmax_backward_of_a_sum_is_zero_stride_upstream(op):
    x = rand_logits(3, 20)
    xg = x.clone().requires_grad_()
    (getattr(sc, op)(xg, 1).sum() + getattr(sc, op)(xg, 0)[1].sum()).backward()
    x64 = x.double().requires_grad_()
    (getattr(torch, op)(x64, 1).sum() + getattr(torch, op)(x64, 0)[1].sum()).backward()
    close(xg.grad, x64.grad, torch.float32)


def _softmax_extreme(kind, dtype):
    x = rand_logits(4, 20, dtype)
    big = {torch.float32: 3.4e38, torch.bfloat16: 3.38e38, torch.float16: 65504.0,
           torch.float64: 1e308}[dtype]
    if kind == "huge-mixed":
        x[0, :3] = torch.tensor([big, -big, 0.0], dtype=torch.float64).to(dtype)
        x[1, :] = big
    elif kind == "neg-inf":
        x[0, 3] = -INF
        x[1, :] = -INF
    elif kind == "nan":
        x[2, 5] = NAN
    elif kind == "pos-inf":
        x[3, 19] = INF
    elif kind == "ties":
        x[:] = -7.0
    elif kind == "one-huge":
        x[:, 4] = 1e4 if dtype != torch.float16 else 6e4
    return x


@pytest.mark.parametrize("kind", ["huge-mixed", "neg-inf", "nan", "pos-inf", "ties", "one-huge"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_softmax_extreme_values(kind, dtype, op):
    x = _softmax_extreme(kind, dtype)
    y = getattr(sc, op)(x, 1)
    close(y, getattr(torch, op)(x.double(), 1), dtype)


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_softmax_dtype_with_a_transposed_input(in_dtype, op):
    x = rand_logits(20, 3, in_dtype).t()
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        y = getattr(sc, op)(x, 1, dtype=dtype)
        ref = getattr(torch, op)(x.double(), 1) if torch.promote_types(in_dtype, dtype) == dtype \
            else getattr(torch, op)(x.to(dtype).double(), 1)
        assert y.dtype == dtype
        close(y, ref, dtype)


# ----------------------------------------------------------------------------- linear


def ref_linear(h, lw, t, lb=None, w=None, *, reduction="mean", ignore_index=-100, **kw):
    """F.linear then the cross-entropy reference, on float64 leaves. Returns (loss, leaves)."""
    leaves = [None if a is None else a.detach().double().requires_grad_() for a in (h, lw, lb)]
    logits = F.linear(leaves[0], leaves[1], leaves[2])
    shape = t.shape[:-1] if t.is_floating_point() else t.shape
    if logits.dim() > 2:
        logits = logits.reshape(-1, logits.shape[-1])
        t = t.reshape(-1, t.shape[-1]) if t.is_floating_point() else t.reshape(-1)
    loss = ref_ce_of(logits, t, w, reduction=reduction, ignore_index=ignore_index, **kw)
    return (loss.reshape(shape) if reduction == "none" else loss), leaves


def _linear_layout(kind):
    N, H, V = 3, 6, 20
    h = torch.randn(N, H, device=DEVICE)
    lw = torch.randn(V, H, device=DEVICE)
    t = rand_ids(N, V)
    if kind == "input-transposed":
        h = torch.randn(H, N, device=DEVICE).t()
    elif kind == "input-row-strided":
        h = torch.randn(2 * N, H, device=DEVICE)[::2]
    elif kind == "input-expanded":
        h = torch.randn(1, H, device=DEVICE).expand(N, H)
    elif kind == "input-3d":
        h = torch.randn(1, N, H, device=DEVICE)
        t = t[None]
    elif kind == "input-1d":
        h, t = h[0], t[0]
    elif kind == "weight-transposed":
        lw = torch.randn(H, V, device=DEVICE).t()
    elif kind == "weight-column-strided":
        lw = torch.randn(V, 2 * H, device=DEVICE)[:, ::2]
    elif kind == "target-strided":
        t = rand_ids(2 * N, V)[::2]
    elif kind == "target-int8":
        t = t.to(torch.int8)
    elif kind == "prob-transposed":
        t = torch.rand(V, N, device=DEVICE).softmax(0).t()
    return h, lw, t


LINEAR_LAYOUTS = ["input-transposed", "input-row-strided", "input-expanded", "input-3d",
                  "input-1d", "weight-transposed", "weight-column-strided", "target-strided",
                  "target-int8", "prob-transposed"]


@pytest.mark.parametrize("kind", LINEAR_LAYOUTS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_layouts(kind, reduction):
    h, lw, t = _linear_layout(kind)
    lb = torch.randn(20, 2, device=DEVICE)[:, 1]  # a strided bias
    snap = Untouched(h, lw, lb, t)
    leaves = [a.detach().clone().requires_grad_() for a in (h, lw, lb)]
    snap_leaves = Untouched(*leaves)
    loss = sc.linear_cross_entropy(leaves[0], leaves[1], t, linear_bias=leaves[2],
                                   reduction=reduction, label_smoothing=0.1, chunk_size=2)
    ref, refs = ref_linear(h, lw, t, lb, reduction=reduction, label_smoothing=0.1)
    assert loss.shape == ref.shape
    close(loss, ref, torch.float32)
    g = torch.rand_like(ref) + 0.5
    loss.backward(g.float())
    ref.backward(g)
    for ours, theirs in zip(leaves, refs):
        close(ours.grad, theirs.grad, torch.float32)
    snap.check()
    snap_leaves.check()


@pytest.mark.parametrize("opts", [dict(weight=True, ignore=True), dict(z_loss=1e6),
                                  dict(softcap=1e-3), dict(label_smoothing=1.0, ignore=True),
                                  dict(ignore_index=5), dict(pad=True)],
                         ids=["w-ignore", "z1e6", "softcap", "ls1", "ignore-inside", "pad"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_options(opts, reduction):
    opts = dict(opts)
    N, H, V = 4, 6, 20
    h = torch.randn(N, H, device=DEVICE)
    lw = torch.randn(V, H, device=DEVICE)
    lb = torch.randn(V, device=DEVICE)
    t = rand_ids(N, V)
    w = torch.rand(V, device=DEVICE) + 0.1 if opts.pop("weight", False) else None
    if opts.pop("ignore", False):
        t[1] = -100
    if "ignore_index" in opts:
        t[2] = opts["ignore_index"]
    if opts.pop("pad", False):
        lb[-3:] = -INF  # vocabulary padding through the bias
        t = t.clamp(max=V - 4)
    leaves = [a.clone().requires_grad_() for a in (h, lw, lb)]
    loss = sc.linear_cross_entropy(leaves[0], leaves[1], t, linear_bias=leaves[2], weight=w,
                                   reduction=reduction, chunk_size=3, **opts)
    ref, refs = ref_linear(h, lw, t, lb, w, reduction=reduction, **opts)
    close(loss, ref, torch.float32)
    loss.sum().backward()
    ref.sum().backward()
    for ours, theirs in zip(leaves, refs):
        close(ours.grad, theirs.grad, torch.float32)


@pytest.mark.parametrize("need", ["input", "weight", "bias"])
def test_linear_gradient_of_one_argument_only(need):
    N, H, V = 3, 6, 20
    args = [torch.randn(N, H, device=DEVICE), torch.randn(V, H, device=DEVICE),
            torch.randn(V, device=DEVICE)]
    idx = ["input", "weight", "bias"].index(need)
    args[idx].requires_grad_()
    t = rand_ids(N, V)
    loss = sc.linear_cross_entropy(args[0], args[1], t, linear_bias=args[2])
    loss.backward()
    ref, refs = ref_linear(*args[:2], t, args[2])
    ref.backward()
    close(args[idx].grad, refs[idx].grad, torch.float32)


@pytest.mark.parametrize("N", [0, 1])
def test_linear_small_shapes(N):
    H, V = 6, 1 if N else 20
    h = torch.randn(N, H, device=DEVICE, requires_grad=True)
    lw = torch.randn(V, H, device=DEVICE, requires_grad=True)
    t = torch.zeros(N, dtype=torch.long, device=DEVICE)
    for reduction in REDUCTIONS:
        h.grad = lw.grad = None
        loss = sc.linear_cross_entropy(h, lw, t, reduction=reduction)
        ref, refs = ref_linear(h, lw, t, reduction=reduction)
        assert loss.shape == ref.shape
        close(loss, ref, torch.float32)
        loss.sum().backward()
        ref.sum().backward()
        close(h.grad, refs[0].grad, torch.float32)
        close(lw.grad, refs[1].grad, torch.float32)


def test_linear_module_matches_function():
    torch.manual_seed(1)
    mod = sc.LinearCrossEntropyLoss(6, 20, bias=True, label_smoothing=0.1, z_loss=1e-3)
    h = torch.randn(3, 6, device=DEVICE)
    t = rand_ids(3, 20)
    ref, _ = ref_linear(h, mod.linear.weight, t, mod.linear.bias, label_smoothing=0.1,
                        z_loss=1e-3)
    close(mod(h, t), ref, torch.float32)


# ----------------------------------------------------------------------------- bad input


def _x():
    return torch.randn(3, 8, device=DEVICE)


def _t():
    return torch.tensor([1, 2, 3], device=DEVICE)


_H, _W = torch.randn(3, 4), torch.randn(8, 4)

BAD = [
    # (id, call, exception, words the message must hold besides the function's name)
    ("softmax-int", lambda: sc.softmax(torch.ones(3, 4, dtype=torch.int64)), TypeError,
     ["softmax", "'input'", "torch.int64"]),
    ("softmax-list", lambda: sc.softmax([1.0, 2.0]), TypeError, ["softmax", "'input'", "list"]),
    ("softmax-dim-range", lambda: sc.softmax(_x(), 2), ValueError, ["softmax", "'dim'", "2"]),
    ("softmax-dim-float", lambda: sc.softmax(_x(), 1.0), TypeError, ["softmax", "'dim'", "1.0"]),
    ("log_softmax-dim-neg", lambda: sc.log_softmax(_x(), -3), ValueError,
     ["log_softmax", "'dim'", "-3"]),
    ("log_softmax-dtype-int", lambda: sc.log_softmax(_x(), 1, dtype=torch.int32), TypeError,
     ["log_softmax", "'dtype'", "torch.int32"]),
    ("log_softmax-dtype-str", lambda: sc.log_softmax(_x(), 1, dtype="float32"), TypeError,
     ["log_softmax", "'dtype'", "'float32'"]),
    ("out-list", lambda: sc.cross_entropy_with_grad(_x(), _t(), out=[1.0]), TypeError,
     ["cross_entropy_with_grad", "'out'", "list"]),
    ("out-dtype", lambda: sc.cross_entropy_with_grad(_x(), _t(), out=torch.empty(3, 8).double()),
     TypeError, ["cross_entropy_with_grad", "'out'", "torch.float64"]),
    ("out-shape", lambda: sc.cross_entropy_with_grad(_x(), _t(), out=torch.empty(8, 3)),
     ValueError, ["cross_entropy_with_grad", "'out'", "(8, 3)"]),
    ("out-expanded", lambda: sc.cross_entropy_with_grad(_x(), _t(),
                                                        out=torch.empty(8).expand(3, 8)),
     ValueError, ["cross_entropy_with_grad", "'out'"]),
    ("module-ls", lambda: sc.CrossEntropyLoss(label_smoothing=2.0), ValueError,
     ["CrossEntropyLoss", "'label_smoothing'", "2.0"]),
    ("module-inplace", lambda: sc.CrossEntropyLoss(inplace_backward=1), TypeError,
     ["CrossEntropyLoss", "'inplace_backward'", "1"]),
    ("module-weight-list", lambda: sc.CrossEntropyLoss(weight=[1.0] * 8), TypeError,
     ["CrossEntropyLoss", "'weight'", "list"]),
    ("module-softcap", lambda: sc.CrossEntropyLoss(softcap=-1.0), ValueError,
     ["CrossEntropyLoss", "'softcap'", "-1.0"]),
    ("ce-inplace-int", lambda: sc.cross_entropy(_x(), _t(), inplace_backward=1), TypeError,
     ["cross_entropy", "'inplace_backward'", "1"]),
    ("ce-weight-requires-grad", lambda: sc.cross_entropy(_x(), _t(),
                                                         torch.rand(8).requires_grad_()),
     ValueError, ["cross_entropy", "'weight'"]),
    ("ce-id-out-of-range-int8", lambda: sc.cross_entropy(_x(), torch.tensor([1, 8, 2],
                                                                            dtype=torch.int8)),
     ValueError, ["cross_entropy", "'target'", "8"]),
    ("ce-id-negative-int32", lambda: sc.cross_entropy(_x(), torch.tensor([1, -1, 2]).int()),
     ValueError, ["cross_entropy", "'target'", "-1"]),
    ("ce-target-2d-ids", lambda: sc.cross_entropy(_x(), _t()[:, None]), ValueError,
     ["cross_entropy", "'target'", "(3, 1)"]),
    ("ce-ignore-index-prob", lambda: sc.cross_entropy(_x(), torch.rand(3, 8), ignore_index=5),
     ValueError, ["cross_entropy", "'ignore_index'", "5"]),
    ("linear-input-int", lambda: sc.linear_cross_entropy(_H.int(), _W, _t()), TypeError,
     ["linear_cross_entropy", "'input'", "torch.int32"]),
    ("linear-weight-dtype", lambda: sc.linear_cross_entropy(_H, _W.double(), _t()), TypeError,
     ["linear_cross_entropy", "'linear_weight'", "torch.float64"]),
    ("linear-H", lambda: sc.linear_cross_entropy(_H, torch.randn(8, 5), _t()), ValueError,
     ["linear_cross_entropy", "'linear_weight'", "(8, 5)"]),
    ("linear-bias-shape", lambda: sc.linear_cross_entropy(_H, _W, _t(), linear_bias=torch.randn(7)),
     ValueError, ["linear_cross_entropy", "'linear_bias'", "(7,)"]),
    ("linear-bias-dtype", lambda: sc.linear_cross_entropy(_H, _W, _t(),
                                                          linear_bias=torch.randn(8).half()),
     TypeError, ["linear_cross_entropy", "'linear_bias'", "torch.float16"]),
    ("linear-id-range", lambda: sc.linear_cross_entropy(_H, _W, torch.tensor([0, 8, 1])),
     ValueError, ["linear_cross_entropy", "'target'", "8"]),
    ("linear-target-shape", lambda: sc.linear_cross_entropy(_H, _W, _t()[:2]), ValueError,
     ["linear_cross_entropy", "'target'", "(2,)"]),
    ("linear-target-bool", lambda: sc.linear_cross_entropy(_H, _W, _t().bool()), TypeError,
     ["linear_cross_entropy", "'target'", "torch.bool"]),
    ("linear-prob-ignore", lambda: sc.linear_cross_entropy(_H, _W, torch.rand(3, 8),
                                                           ignore_index=-100),
     ValueError, ["linear_cross_entropy", "'ignore_index'", "-100"]),
    ("linear-chunk-0", lambda: sc.linear_cross_entropy(_H, _W, _t(), chunk_size=0), ValueError,
     ["linear_cross_entropy", "'chunk_size'", "0"]),
    ("linear-chunk-float", lambda: sc.linear_cross_entropy(_H, _W, _t(), chunk_size=1.5),
     TypeError, ["linear_cross_entropy", "'chunk_size'", "1.5"]),
    ("linear-options", lambda: sc.linear_cross_entropy(_H, _W, _t(), options=3), TypeError,
     ["linear_cross_entropy", "'options'", "int"]),
    ("linear-weight-shape", lambda: sc.linear_cross_entropy(_H, _W, _t(), weight=torch.ones(7)),
     ValueError, ["linear_cross_entropy", "'weight'", "(7,)"]),
    ("linear-ls", lambda: sc.linear_cross_entropy(_H, _W, _t(), label_smoothing=1.5), ValueError,
     ["linear_cross_entropy", "'label_smoothing'", "1.5"]),
    ("linear-module-weight", lambda: sc.LinearCrossEntropyLoss(4, 8, weight=torch.ones(7)),
     ValueError, ["LinearCrossEntropyLoss", "'weight'"]),
    ("linear-module-reduction", lambda: sc.LinearCrossEntropyLoss(4, 8, reduction="avg"),
     ValueError, ["LinearCrossEntropyLoss", "'reduction'", "'avg'"]),
]


@pytest.mark.parametrize("call,exc,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_names_function_argument_value(call, exc, words):
    raises(exc, call, *words)


# DEFECT: sparse logits are not refused by the checks: the kernel launch fails with NotImplementedError "Cannot access storage of SparseTensorImpl", naming neither the function nor the argument
@pytest.mark.parametrize("op", ["cross_entropy", "softmax"])
def test_sparse_input_is_refused_by_name(op):
    x = _x().to_sparse()
    call = (lambda: sc.cross_entropy(x, _t())) if op == "cross_entropy" else (
        lambda: sc.softmax(x, 1))
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    assert op in str(info.value) and "'input'" in str(info.value)


# ----------------------------------------------------------------------------- vocab-parallel
# One world of 2 gloo ranks runs every check below (spawned once per test session); each
# check returns its failure messages, which each rank writes to a JSON file, and one pytest
# test per check reads them. A check never lets one rank skip a collective the other enters.

VP_WIDTHS = [13, 7]


def _vp_full(seed, N, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, sum(VP_WIDTHS), generator=g, dtype=torch.float64) * 3.0).to(dtype)
    t = torch.randint(0, sum(VP_WIDTHS), (N,), generator=g)
    return x, t


def _vp_slice(rank):
    lo = sum(VP_WIDTHS[:rank])
    return lo, lo + VP_WIDTHS[rank]


def _vp_compare(msgs, what, rank, x_full, t, shard, loss, reduction="mean", up=None, **kw):
    """loss and shard.grad (after backward(up)) against the float64 reference on the full
    logits; failures go to msgs."""
    dtype = x_full.dtype
    lo, hi = _vp_slice(rank)
    ref, x64 = ref_ce(x_full, t, reduction=reduction, **kw)
    up = torch.ones_like(ref) if up is None else up
    loss.backward(up.to(loss.dtype))
    ref.backward(up.double())
    try:
        close(loss, ref, dtype)
    except AssertionError as err:
        msgs.append(f"{what}: loss: {err}")
    try:
        close(shard.grad, x64.grad[:, lo:hi].reshape(shard.shape), dtype)
    except AssertionError as err:
        msgs.append(f"{what}: grad: {err}")


def vp_layouts(rank):
    msgs = []
    lo, hi = _vp_slice(rank)
    x, t = _vp_full(1, 3)
    t[1] = -100
    cases = {
        "column-of-full": (x, t, lambda: x[:, lo:hi].clone()),
        "transposed": (x, t, lambda: x[:, lo:hi].t().contiguous().t()),
        "column-strided": (x, t, lambda: torch.repeat_interleave(x[:, lo:hi], 2, dim=1)[:, ::2]),
        "1-d": (x[:1], t[0], lambda: x[0, lo:hi].clone()),
    }
    for name, (xf, tt, make) in cases.items():
        for reduction in (("mean", "none") if name in ("column-of-full", "1-d") else ("none",)):
            shard = make().requires_grad_()
            snap = Untouched(tt)
            loss = vocab_parallel_cross_entropy(shard, tt, reduction=reduction,
                                                label_smoothing=0.1)
            _vp_compare(msgs, f"{name} {reduction}", rank, xf, tt.reshape(-1), shard,
                        loss.reshape(-1) if reduction == "none" else loss,
                        reduction=reduction, label_smoothing=0.1)
            snap.check()
    # a row-strided view of the caller's logits (read in place, never written)
    full = x.clone()
    view = full[:, lo:hi]
    snap = Untouched(full, t)
    loss = vocab_parallel_cross_entropy(view, t)
    ref, _ = ref_ce(x, t)
    try:
        close(loss, ref, torch.float32)
        snap.check()
    except AssertionError as err:
        msgs.append(f"row-strided view: {err}")
    # expanded rows, and a strided target
    xe = x[:1].expand(3, -1)
    shard = xe[:, lo:hi].detach().requires_grad_()
    _vp_compare(msgs, "expanded rows", rank, xe, t, shard,
                vocab_parallel_cross_entropy(shard, t))
    tt = torch.stack([t, t], 1).reshape(-1)[::2]
    shard = x[:, lo:hi].clone().requires_grad_()
    _vp_compare(msgs, "strided target", rank, x, t, shard, vocab_parallel_cross_entropy(shard, tt))
    return msgs


def vp_id_dtypes(rank):
    msgs = []
    lo, hi = _vp_slice(rank)
    x, _ = _vp_full(2, 3)
    for dtype, values in ((torch.int8, (-100, 127, 128)), (torch.uint8, (-100, 255, 256)),
                          (torch.int32, (2 ** 31,))):
        info = torch.iinfo(dtype)
        for ignore_index in values:
            ids = torch.tensor([0, 19, 12])
            if info.min <= ignore_index <= info.max:
                ids[1] = ignore_index
            t = ids.to(dtype)
            shard = x[:, lo:hi].clone().requires_grad_()
            snap = Untouched(t)
            loss = vocab_parallel_cross_entropy(shard, t, ignore_index=ignore_index)
            _vp_compare(msgs, f"{dtype} ignore_index={ignore_index}", rank, x, ids, shard, loss,
                        ignore_index=ignore_index)
            snap.check()
    return msgs


def vp_no_grad_writes_nothing(rank):
    msgs = []
    lo, hi = _vp_slice(rank)
    x, t = _vp_full(3, 3)
    leaf = x[:, lo:hi].clone().requires_grad_()
    logits = leaf * 1.0
    snap = Untouched(logits, t)
    for name, ctx in _NO_GRAD.items():
        for reduction in (("mean", "none") if name == "no_grad" else ("mean",)):
            with ctx():
                loss = vocab_parallel_cross_entropy(logits, t, reduction=reduction)
            if loss.requires_grad or loss.grad_fn is not None:
                msgs.append(f"{name} {reduction}: the loss carries a graph")
            ref, _ = ref_ce(x, t, reduction=reduction)
            try:
                close(loss, ref, torch.float32)
            except AssertionError as err:
                msgs.append(f"{name} {reduction}: {err}")
    try:
        snap.check()
    except AssertionError as err:
        msgs.append(str(err))
    return msgs


def vp_upstream(rank):
    """'none' with inf/NaN/0/negative per-row upstream; 'mean' with a NaN upstream."""
    msgs = []
    lo, hi = _vp_slice(rank)
    x, t = _vp_full(4, 5)
    t[1] = t[3] = -100
    up = torch.tensor([INF, NAN, 0.0, 1e30, -2.0])  # rows 1 and 3 are ignored
    shard = x[:, lo:hi].clone().requires_grad_()
    vocab_parallel_cross_entropy(shard, t, reduction="none").backward(up)
    ref, x64 = ref_ce(x, t, reduction="none")
    ref.backward(up.double())
    if torch.count_nonzero(shard.grad[[1, 3]]) or torch.isnan(shard.grad[1]).any():
        msgs.append("ignored rows under inf/NaN upstream are not 0")
    if torch.isfinite(shard.grad[0]).all():
        msgs.append("inf upstream gave a finite gradient")
    try:
        close(shard.grad[[2, 4]], x64.grad[[2, 4], lo:hi], torch.float32)
    except AssertionError as err:
        msgs.append(f"finite rows: {err}")
    shard = x[:, lo:hi].clone().requires_grad_()
    vocab_parallel_cross_entropy(shard, t).backward(torch.tensor(NAN))
    if torch.count_nonzero(shard.grad[[1, 3]]):
        msgs.append("'mean' NaN upstream: ignored rows not 0")
    return msgs


def vp_extremes(rank):
    msgs = []
    lo, hi = _vp_slice(rank)
    x, t = _vp_full(5, 5)
    x[0, :] = 1.5                      # ties across both shards
    x[1, VP_WIDTHS[0]:] = -INF         # rank 1's shard all -inf on row 1
    t[1] = 2
    x[2, 3] = 3.0e38                   # one huge entry, one hugely negative
    x[2, 15] = -3.0e38
    x[3, 16] = 1e4                     # confident, the target on rank 1
    t[3] = 16
    x[4, 5] = -INF                     # the target at -inf: infinite loss, finite gradient
    t[4] = 5
    for reduction in ("none", "sum"):
        shard = x[:, lo:hi].clone().requires_grad_()
        _vp_compare(msgs, reduction, rank, x, t, shard,
                    vocab_parallel_cross_entropy(shard, t, reduction=reduction),
                    reduction=reduction)
    # rows whose every intermediate fits fp32, for the options (label smoothing of a -inf logit
    # is inf; 3e38 - (-3e38) overflows fp32 in torch's own fp32 arithmetic too)
    rows = [0, 3]
    for kw in (dict(z_loss=1e6), dict(label_smoothing=1.0), dict(softcap=1e-3),
               dict(z_loss=1e-12, label_smoothing=1e-8)):
        shard = x[rows, lo:hi].clone().requires_grad_()
        _vp_compare(msgs, str(kw), rank, x[rows], t[rows], shard,
                    vocab_parallel_cross_entropy(shard, t[rows], reduction="none", **kw),
                    reduction="none", **kw)
    return msgs


def vp_softcap_below_fp32_normal_range(rank):
    """The same 1/c overflow as the core kernels (see test_softcap_below_fp32_normal_range)."""
    msgs = []
    lo, hi = _vp_slice(rank)
    x, t = _vp_full(6, 2)
    x[0, 4] = 0.0
    x[0, 15] = 0.0
    shard = x[:, lo:hi].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, t, reduction="none", softcap=1e-39)
    _vp_compare(msgs, "softcap=1e-39", rank, x, t, shard, loss, reduction="none", softcap=1e-39)
    return msgs


def vp_small_shapes(rank):
    msgs = []
    lo, hi = _vp_slice(rank)
    x, t = _vp_full(7, 1)
    for reduction in REDUCTIONS:
        shard = x[:, lo:hi].clone().requires_grad_()
        _vp_compare(msgs, f"N=1 {reduction}", rank, x, t, shard,
                    vocab_parallel_cross_entropy(shard, t, reduction=reduction),
                    reduction=reduction)
    return msgs


def vp_bad_input(rank):
    msgs = []
    lo, hi = _vp_slice(rank)
    xs = torch.randn(3, hi - lo)
    t = torch.tensor([0, 1, 2])
    fn = "vocab_parallel_cross_entropy"
    bad = [
        (TypeError, lambda: vocab_parallel_cross_entropy(xs, t, ignore_index=1.5),
         ["'ignore_index'", "1.5"]),
        (ValueError, lambda: vocab_parallel_cross_entropy(xs, t, ignore_index=2 ** 63),
         ["'ignore_index'", str(2 ** 63)]),
        (TypeError, lambda: vocab_parallel_cross_entropy(xs, t.bool()), ["'target'", "bool"]),
        (ValueError, lambda: vocab_parallel_cross_entropy(xs, torch.tensor([0, -5, 1])),
         ["'target'", "-5"]),
        (ValueError, lambda: vocab_parallel_cross_entropy(xs, t, z_loss=-1.0), ["'z_loss'", "-1.0"]),
        (ValueError, lambda: vocab_parallel_cross_entropy(xs, t, softcap=0.0), ["'softcap'", "0.0"]),
        (TypeError, lambda: vocab_parallel_cross_entropy(xs.long(), t), ["'logits_shard'", "int64"]),
        (TypeError, lambda: vocab_parallel_cross_entropy([1.0], t), ["'logits_shard'", "list"]),
    ]
    for i, (kind, call, words) in enumerate(bad):
        try:
            call()
            msgs.append(f"bad input {i} ({words}) did not raise")
        except kind as err:
            missing = [w for w in [fn] + words if w not in str(err)]
            if missing:
                msgs.append(f"bad input {i}: {missing} not in message {err}")
        except Exception as err:  # noqa: BLE001
            msgs.append(f"bad input {i}: {type(err).__name__} instead of {kind.__name__}: {err}")
    # the group is still in step
    x, t = _vp_full(8, 2)
    shard = x[:, lo:hi].clone().requires_grad_()
    _vp_compare(msgs, "after the errors", rank, x, t, shard, vocab_parallel_cross_entropy(shard, t))
    return msgs


VP_CHECKS = {f.__name__: f for f in (vp_layouts, vp_id_dtypes, vp_no_grad_writes_nothing,
                                     vp_upstream, vp_extremes, vp_softcap_below_fp32_normal_range,
                                     vp_small_shapes, vp_bad_input)}


def _vp_worker(rank, world, rdv, out_dir):
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    from softmax_ce_gpu import kernels

    assert kernels.INTERPRETER, "the spawned process does not run the kernels"
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    results = {}
    try:
        for name, check in VP_CHECKS.items():
            torch.manual_seed(0)
            try:
                results[name] = check(rank)
            except Exception:  # noqa: BLE001  (reported by the check's test)
                results[name] = [traceback.format_exc()]
    finally:
        dist.destroy_process_group()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)


@pytest.fixture(scope="module")
def vp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("vp")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # the children run CPU tensors through the kernels
    try:
        mp.spawn(_vp_worker, args=(len(VP_WIDTHS), str(out / "rdv"), str(out)),
                 nprocs=len(VP_WIDTHS), join=True)
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = old
    merged = {name: [] for name in VP_CHECKS}
    for rank in range(len(VP_WIDTHS)):
        with open(out / f"rank{rank}.json") as f:
            for name, msgs in json.load(f).items():
                merged[name] += [f"rank {rank}: {m}" for m in msgs]
    return merged


@pytest.mark.parametrize("check", [n for n in VP_CHECKS if n != "vp_softcap_below_fp32_normal_range"])
def test_vocab_parallel(vp_results, check):
    assert not vp_results[check], "\n".join(vp_results[check])


# DEFECT: vocab_parallel_cross_entropy with softcap < ~1.2e-38 gives NaN for a logit of exactly 0 (same 1/c overflow as the core kernels)
def test_vocab_parallel_softcap_below_fp32_normal_range(vp_results):
    check = "vp_softcap_below_fp32_normal_range"
    assert not vp_results[check], "\n".join(vp_results[check])
