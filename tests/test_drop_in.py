"""Regressions of issue 12: silent wrong answers found by trying to break the library, and
torch's signatures for a true drop-in.

Each test names the defect it pins down. The reference is torch on float64 copies of the
same values; every test here fails on the code before the fix. Both CPU paths run: the
kernels through Triton's interpreter (fp32/bf16/fp16) and the pure-PyTorch path (float64,
or `reference_only`, which runs the same call with the interpreter switched off).
"""

import contextlib
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from helpers import TOL, assert_close, poisoned, rel_err

import softmax_ce_gpu as sc
from softmax_ce_gpu import _backend, reference

INF = float("inf")


@pytest.fixture(params=["kernels", "torch-path"])
def path(request, monkeypatch):
    """Run a test on the kernels (interpreter / GPU) and again on the pure-PyTorch path."""
    if request.param == "torch-path":
        monkeypatch.setattr(_backend, "backend_for", lambda fn, x: reference)
        monkeypatch.setattr("softmax_ce_gpu._ops.backend_for", lambda fn, x: reference)
    return request.param


def _case(N=6, V=37, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, V, generator=g) * 3).to(dtype).to(DEVICE)
    t = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    return x, t


def _torch(x, t, w=None, **kw):
    """torch's loss and gradient on float64 copies."""
    x64 = x.detach().double().requires_grad_()
    w64 = None if w is None else w.double()
    t64 = t.double() if t.is_floating_point() else t.long()
    loss = F.cross_entropy(x64, t64, w64, **kw)
    loss.sum().backward()
    return loss, x64.grad


def _ours(x, t, w=None, **kw):
    xg = x.clone().requires_grad_()
    loss = sc.cross_entropy(xg, t, w, **kw)
    loss.sum().backward()
    return loss, xg.grad


# ----------------------------------------------------------------------------- 1. weight layouts


@pytest.mark.parametrize("layout", ["strided", "expanded", "offset", "fp64", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_weight_of_any_layout_and_dtype_is_read_as_torch_reads_it(path, layout, reduction):
    x, t = _case()
    V = x.shape[1]
    base = torch.rand(3 * V, device=DEVICE) + 0.1
    w = {"strided": base[::3], "expanded": base[:1].expand(V), "offset": base[V + 1: 2 * V + 1],
         "fp64": base[:V].double(), "bf16": base[:V].bfloat16()}[layout]
    w_before = w.clone()
    ref, gref = _torch(x, t, w.contiguous(), reduction=reduction, label_smoothing=0.1)
    for fn in ("cross_entropy", "with_grad", "module"):
        if fn == "cross_entropy":
            loss, grad = _ours(x, t, w, reduction=reduction, label_smoothing=0.1)
        elif fn == "with_grad":
            loss, grad = sc.cross_entropy_with_grad(x, t, w, reduction=reduction,
                                                    label_smoothing=0.1)
        else:
            xg = x.clone().requires_grad_()
            loss = sc.CrossEntropyLoss(w, reduction=reduction, label_smoothing=0.1)(xg, t)
            loss.sum().backward()
            grad = xg.grad
        assert_close(loss, ref, torch.float32)
        assert_close(grad, gref, torch.float32)
    assert torch.equal(w, w_before)


# ----------------------------------------------------------------------------- 2. no_grad


@pytest.mark.parametrize("ctx", ["no_grad", "inference_mode", "enable_grad_off"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_gradient_mode_computes_no_gradient_and_writes_nothing(path, ctx, reduction):
    x, t = _case()
    leaf = x.clone().requires_grad_()
    logits = leaf * 1.0  # an intermediate that requires grad, as a model's output is
    before = logits.detach().clone()
    manager = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
               "enable_grad_off": lambda: torch.set_grad_enabled(False)}[ctx]
    with manager():
        loss = sc.cross_entropy(logits, t, reduction=reduction, inplace_backward=True)
    assert loss.grad_fn is None and not loss.requires_grad
    assert torch.equal(logits.detach(), before), "the caller's logits were overwritten"
    assert_close(loss, _torch(x, t, reduction=reduction)[0], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("grad_mode", ["enabled", "no_grad"])
def test_forward_mode_ad_is_refused_not_dropped(dtype, grad_mode):
    """A dual input (torch.autograd.forward_ad) that does not require grad takes no gradient,
    but carries a tangent: the call must refuse forward-mode AD (the autograd Function has
    no jvp), never return a loss whose tangent was silently dropped (a zero derivative)."""
    import torch.autograd.forward_ad as fwAD

    x, t = _case(dtype=dtype)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    with fwAD.dual_level(), (torch.no_grad() if grad_mode == "no_grad" else contextlib.nullcontext()):
        d = fwAD.make_dual(x, v)
        with pytest.raises(NotImplementedError, match="jvp"):
            sc.cross_entropy(d, t)
    # outside a level: the no-autograd forward, and its value
    assert_close(sc.cross_entropy(x, t), _torch(x, t)[0], dtype)


def test_no_grad_launches_no_gradient_kernel(monkeypatch):
    """Under no_grad the forward is called without a gradient buffer (the cheaper kernel)."""
    seen = []
    real = sc._ops.forward_eager  # what every eager forward runs (the test is eager)

    def spy(x, t, weight, opts, loss_dtype, with_stats, fn, grad_into, *rest):
        seen.append(grad_into)
        return real(x, t, weight, opts, loss_dtype, with_stats, fn, grad_into, *rest)

    monkeypatch.setattr(sc._ops, "forward_eager", spy)
    x, t = _case()
    with torch.no_grad():
        sc.cross_entropy(x.requires_grad_(), t)
    assert seen == [None]


# ----------------------------------------------------------------------------- 3. double backward


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.2, weight=True, ignore=True),
                                  dict(softcap=4.0, z_loss=1e-2)],
                         ids=["plain", "ls-w-ignore", "softcap-z"])
def test_double_backward_of_the_late_path_is_torchs(path, dtype, opts):
    """reduction='none' recomputes its gradient differentiably: a gradient penalty gets torch's
    second-order term (z-loss and softcap against their definitions)."""
    opts = dict(opts)
    x, t = _case(dtype=dtype)
    w = torch.rand(x.shape[1], device=DEVICE, dtype=dtype) + 0.1 if opts.pop("weight", 0) else None
    if opts.pop("ignore", False):
        t[::2] = -100
    z_loss, softcap = opts.pop("z_loss", 0.0), opts.pop("softcap", None)
    v = torch.randn_like(x)

    def penalty(lossfn, xx):
        loss = lossfn(xx)
        (g,) = torch.autograd.grad(loss.sum(), xx, create_graph=True)
        return loss.sum() + (g * v.to(g.dtype)).sum()

    def torch_loss(xx):
        z = xx if softcap is None else softcap * torch.tanh(xx / softcap)
        rows = F.cross_entropy(z, t, None if w is None else w.double(), reduction="none", **opts)
        return rows + torch.where(t != -100, z_loss * torch.logsumexp(z, 1) ** 2, 0.0)

    xg = x.clone().requires_grad_()
    penalty(lambda xx: sc.cross_entropy(xx, t, w, reduction="none", z_loss=z_loss,
                                        softcap=softcap, **opts), xg).backward()
    x64 = x.double().requires_grad_()
    penalty(torch_loss, x64).backward()
    assert_close(xg.grad, x64.grad, dtype)


@pytest.mark.parametrize("inplace", [False, True])
def test_double_backward_of_the_fused_path_raises(inplace):
    x, t = _case()
    xg = x.clone().requires_grad_()
    logits = xg * 1.0
    loss = sc.cross_entropy(logits, t, inplace_backward=inplace)
    (g,) = torch.autograd.grad(loss, logits, create_graph=True)
    assert g.requires_grad  # not silently detached
    with pytest.raises(RuntimeError, match="cross_entropy: a second derivative"):
        (loss + (g * g).sum()).backward()


def test_first_order_under_create_graph_is_unchanged():
    x, t = _case()
    for reduction in ("mean", "none"):
        xg = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(sc.cross_entropy(xg, t, reduction=reduction).sum(), xg,
                                   create_graph=True)
        assert_close(g, _torch(x, t, reduction=reduction)[1], torch.float32)


# ----------------------------------------------------------------------------- 5. out= overlap


def test_out_overlapping_the_input_without_being_it_is_refused():
    x, t = _case(N=8, V=8)
    x0 = x.clone()
    for out in (x.t(), x[:, :].as_strided((8, 8), (1, 8)), torch.empty(64)[:8].expand(8, 8)):
        with pytest.raises(ValueError, match="cross_entropy_with_grad: argument 'out'"):
            sc.cross_entropy_with_grad(x, t, out=out)
    big = torch.randn(9, 8, device=DEVICE)
    with pytest.raises(ValueError, match="overlaps the input"):
        sc.cross_entropy_with_grad(big[1:], t, out=big[:8])
    assert torch.equal(x, x0)


def test_out_may_be_the_input_or_any_layout_of_its_own():
    x, t = _case(N=8, V=8)
    _, gref = _torch(x, t)
    for out in (x.clone(), poisoned((8, 8), torch.float32, DEVICE).t(),
                poisoned((8, 16), torch.float32, DEVICE)[:, ::2], x.view_as(x)):
        loss, grad = sc.cross_entropy_with_grad(x.clone() if out is not x else x, t, out=out)
        assert grad is out
        assert_close(grad, gref, torch.float32)


# ----------------------------------------------------------------------------- 6. softcap


@pytest.mark.parametrize("c", [1e-3, 0.5, 30.0, 1e4, 1e6, 1e12, 1e30, 3e38, 1e39, 1e300])
def test_softcap_stays_exact_at_any_magnitude(path, c):
    x, t = _case(V=300)
    x[0, 7] = -INF
    x[1, :5] = torch.tensor([1e3, -1e3, 60.0, -60.0, 1e-20])
    loss, grad = _ours(x, t, softcap=c, reduction="none")
    x64 = x.double().requires_grad_()
    z = torch.where(x64 == -INF, x64, c * torch.tanh(x64 / c))
    ref = F.cross_entropy(z, t, reduction="none")
    ref.sum().backward()
    assert_close(loss, ref, torch.float32)
    assert_close(grad, x64.grad, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])  # the fused and the late gradient
@pytest.mark.parametrize("c", [1e30, 3e38, 1e39, 1e300])
def test_softcap_with_a_subnormal_reciprocal(path, dtype, reduction, c):
    """A softcap above 2^126 makes the kernels' k = 1/c subnormal in fp32. Triton's
    interpreter took such a float argument for an fp64 constant, and the bf16 gradient it
    then stored was all zeros (NaN before issue 15), with a correct loss. Above fp32's
    largest value, c = 1/k itself overflowed: a logit with |x| / c >= 1/4 became NaN."""
    x, t = _case(V=40, dtype=dtype)
    if dtype != torch.float16:  # |x| / c of order 1 (fp16 ends at 65504); the logits span
        # less than fp32's range (lse - z_j stays finite, in torch's fp32 arithmetic too)
        x[0, :3] = torch.tensor([2e38, -1e38, 1e37]).to(dtype)
    kw = dict(softcap=c, reduction=reduction, label_smoothing=1e-40, z_loss=1e-40)
    loss, grad = _ours(x, t, **kw)
    x64 = x.double().requires_grad_()
    z = c * torch.tanh(x64 / c)
    ref = F.cross_entropy(z, t, reduction=reduction, label_smoothing=1e-40)
    ref = ref + 1e-40 * torch.logsumexp(z, dim=1).pow(2).mean() if reduction == "mean" else \
        ref + 1e-40 * torch.logsumexp(z, dim=1).pow(2)
    ref.sum().backward()
    assert_close(loss, ref, dtype)
    assert_close(grad, x64.grad, dtype)


def test_bf16_linear_softcap_with_a_subnormal_reciprocal(path):
    """linear_cross_entropy with the same softcap: its chunk kernels share the softcap code."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(6, 16, generator=g).bfloat16().to(DEVICE).requires_grad_()
    w = torch.randn(40, 16, generator=g).bfloat16().to(DEVICE).requires_grad_()
    t = torch.randint(0, 40, (6,), generator=g).to(DEVICE)
    sc.linear_cross_entropy(h, w, t, softcap=3e38).backward()
    h64, w64 = (a.detach().double().requires_grad_() for a in (h, w))
    F.cross_entropy(3e38 * torch.tanh(h64 @ w64.T / 3e38), t).backward()
    # the chunk's logits are rounded to bf16 before the loss, as torch's bf16 F.linear does
    assert_close(h.grad, h64.grad, torch.bfloat16, roundings=2)
    assert_close(w.grad, w64.grad, torch.bfloat16, roundings=2)


# ----------------------------------------------------------------------------- 7. ignore_index


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int16, torch.uint8, torch.int64])
@pytest.mark.parametrize("ignore_index", [2 ** 32, 2 ** 31, -(2 ** 31) - 1, 2 ** 63 - 1, 255,
                                          -(2 ** 63)])
def test_ignore_index_outside_the_id_dtype_never_wraps(path, id_dtype, ignore_index):
    x, t = _case(V=37)
    t[0] = 0  # class 0: what a wrapped 2**32 would equal in int32
    ref, gref = _torch(x, t, ignore_index=ignore_index)  # torch: int64 ids
    loss, grad = _ours(x, t.to(id_dtype), ignore_index=ignore_index)
    assert_close(loss, ref, torch.float32)
    assert_close(grad, gref, torch.float32)


def test_ignore_index_beyond_int64_is_a_value_error():
    x, t = _case()
    for bad in (2 ** 63, -(2 ** 63) - 1):
        with pytest.raises(ValueError, match="cross_entropy: argument 'ignore_index' must fit "
                                             "in int64"):
            sc.cross_entropy(x, t, ignore_index=bad)


# ----------------------------------------------------------------------------- 8. softmax +inf


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_of_a_row_with_inf_is_nan_like_torch(path, op, dtype):
    x = torch.randn(3, 40, dtype=dtype, device=DEVICE)
    x[0, 3] = INF
    x[1, 0] = INF
    x[1, 9] = INF
    ours = getattr(sc, op)(x, dim=1)
    theirs = getattr(torch, op)(x, dim=1)
    assert torch.isnan(ours[:2]).all() and torch.isnan(theirs[:2]).all()
    assert rel_err(ours, theirs) <= TOL[dtype]


# ----------------------------------------------------------------------------- 9. inf upstream


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("up", [INF, float("nan")])
def test_infinite_upstream_gradient_leaves_ignored_rows_zero(path, reduction, dtype, up):
    x, t = _case(dtype=dtype)
    t[::2] = -100
    xg = x.clone().requires_grad_()
    loss = sc.cross_entropy(xg, t, reduction=reduction)
    loss.backward(torch.full_like(loss, up))
    x64 = x.double().requires_grad_()
    ref = F.cross_entropy(x64, t, reduction=reduction)
    ref.backward(torch.full_like(ref, up))
    assert torch.count_nonzero(x64.grad[::2]) == 0  # torch's behaviour
    assert torch.count_nonzero(xg.grad[::2]) == 0
    assert not torch.isfinite(xg.grad[1::2]).any()


# ----------------------------------------------------------------------------- 10. prob targets


@pytest.mark.parametrize("ignore_index", [-100, -1, -7, -(2 ** 40)])
def test_probability_targets_take_any_negative_ignore_index(path, ignore_index):
    x, _ = _case()
    p = torch.rand_like(x).softmax(1)
    ref, gref = _torch(x, p, ignore_index=ignore_index)
    loss, grad = _ours(x, p, ignore_index=ignore_index)
    assert_close(loss, ref, torch.float32)
    assert_close(grad, gref, torch.float32)
    with pytest.raises(ValueError, match="cross_entropy: argument 'ignore_index' \\(0\\)"):
        sc.cross_entropy(x, p, ignore_index=0)


# ----------------------------------------------------------------------------- 12. rounding


def test_interpreter_rounds_fp32_to_bf16_to_nearest_even():
    from softmax_ce_gpu.kernels import _compat

    x = torch.randn(20000) * torch.logspace(-44, 38, 20000)
    x = torch.cat([x, torch.tensor([0.9999997, -0.9999997, INF, -INF, float("nan"), 3.39e38,
                                    3.4e38, -0.0, 1e-45, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8])])
    bits = torch.from_numpy(_compat._fp32_to_bf16_bits(x.numpy()).view("int16"))
    expected = x.to(torch.bfloat16)  # torch rounds to nearest even, as cvt.rn.bf16.f32 does
    same = (bits == expected.view(torch.int16)) | (expected.isnan() & bits.view(torch.bfloat16).isnan())
    assert bool(same.all())


def test_bf16_gradient_is_rounded_as_the_gpu_rounds():
    """The target column's -0.9999997 is stored as -1.0 (nearest), not -0.99609375."""
    x = torch.zeros(4, 64, device=DEVICE)
    x[:, 0] = 16.0  # p_0 ~ 1 - 7e-6; the target class 5 has p ~ 1.1e-7
    t = torch.full((4,), 5, device=DEVICE)
    _, grad = sc.cross_entropy_with_grad(x.bfloat16(), t, reduction="sum")
    assert torch.equal(grad[:, 5].float(), torch.full((4,), -1.0, device=DEVICE))


# ----------------------------------------------------------------------------- 13. signatures


def _params(fn):
    return [(p.name, p.default, p.kind) for p in inspect.signature(fn).parameters.values()]


def test_signatures_are_torchs_with_extras_keyword_only():
    ours, theirs = _params(sc.cross_entropy), _params(F.cross_entropy)
    assert ours[:len(theirs)] == theirs
    assert all(kind == inspect.Parameter.KEYWORD_ONLY for _, _, kind in ours[len(theirs):])
    assert _params(sc.cross_entropy_with_grad)[:len(theirs)] == theirs
    ours = _params(sc.CrossEntropyLoss.__init__)
    theirs = _params(torch.nn.CrossEntropyLoss.__init__)
    assert ours[:len(theirs)] == theirs
    assert issubclass(sc.CrossEntropyLoss, torch.nn.CrossEntropyLoss)
    for op in (sc.softmax, sc.log_softmax):
        assert [p[0] for p in _params(op)] == ["input", "dim", "dtype"]


def test_positional_call_in_torchs_order():
    x, t = _case()
    w = torch.rand(x.shape[1], device=DEVICE) + 0.1
    args = (None, 3, None, "sum", 0.1)  # size_average, ignore_index, reduce, reduction, ls
    t[1] = 3
    assert_close(sc.cross_entropy(x, t, w, *args), F.cross_entropy(x.double(), t, w.double(), *args),
                 torch.float32)
    mod = sc.CrossEntropyLoss(w, None, 3, None, "sum", 0.1)
    assert_close(mod(x, t), torch.nn.CrossEntropyLoss(w.double(), None, 3, None, "sum", 0.1)(
        x.double(), t), torch.float32)
    assert_close(sc.cross_entropy(input=x, target=t), F.cross_entropy(x.double(), t),
                 torch.float32)


@pytest.mark.parametrize("size_average,reduce,expected", [
    (False, None, "sum"), (True, None, "mean"), (None, False, "none"), (True, True, "mean"),
    (False, True, "sum")])
def test_deprecated_size_average_and_reduce_as_torch(size_average, reduce, expected):
    x, t = _case()
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        loss = sc.cross_entropy(x, t, size_average=size_average, reduce=reduce)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = F.cross_entropy(x.double(), t, size_average=size_average, reduce=reduce)
        mod = sc.CrossEntropyLoss(size_average=size_average, reduce=reduce)
    assert mod.reduction == expected
    assert_close(loss, ref, torch.float32)
    assert_close(mod(x, t), ref, torch.float32)


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("in_dtype,dtype", [(torch.bfloat16, torch.float32),
                                            (torch.float32, torch.bfloat16),
                                            (torch.float16, torch.float32),
                                            (torch.float32, torch.float64),
                                            (torch.float64, torch.float32),
                                            (torch.float32, None)])
def test_softmax_dtype_argument_as_torch(path, op, in_dtype, dtype):
    x = (torch.randn(3, 50, device=DEVICE) * 3).to(in_dtype)
    xg = x.clone().requires_grad_()
    y = getattr(sc, op)(xg, dim=1, dtype=dtype)
    x64 = x.clone().requires_grad_()
    ref = getattr(torch, op)(x64, dim=1, dtype=dtype)
    assert y.dtype == ref.dtype
    out_dtype = dtype or in_dtype
    # torch's order: a narrower dtype rounds the input first
    x_in = x.to(out_dtype) if torch.promote_types(in_dtype, out_dtype) != out_dtype else x
    assert_close(y, getattr(torch, op)(x_in.double(), dim=1), out_dtype)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    assert xg.grad.dtype == in_dtype
    # the backward reads the saved output, rounded once to out_dtype, and rounds once more
    lowest = max((out_dtype, in_dtype), key=lambda d: TOL[d])
    assert_close(xg.grad, x64.grad.double(), lowest, roundings=2)
    with pytest.raises(TypeError, match=f"{op}: argument 'dtype'"):
        getattr(sc, op)(x, dim=1, dtype=torch.int32)


# ----------------------------------------------------------------------------- torch.func


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_func_grad_and_vmap(reduction):
    x, t = _case(N=4, V=20)
    xs = torch.stack([x, x.flip(0), x * 0.5])

    def ours(xx):
        return sc.cross_entropy(xx, t, reduction=reduction, label_smoothing=0.1).sum()

    def theirs(xx):
        return F.cross_entropy(xx, t, reduction=reduction, label_smoothing=0.1).sum()

    assert_close(torch.func.grad(ours)(x), torch.func.grad(theirs)(x.double()), torch.float32)
    assert_close(torch.func.vmap(ours)(xs), torch.func.vmap(theirs)(xs.double()), torch.float32)
    assert_close(torch.func.vmap(torch.func.grad(ours))(xs),
                 torch.func.vmap(torch.func.grad(theirs))(xs.double()), torch.float32)
    # vmap over the targets too
    ts = torch.stack([t, t.flip(0), (t + 1) % 20])
    got = torch.func.vmap(lambda xx, tt: sc.cross_entropy(xx, tt, reduction=reduction))(xs, ts)
    ref = torch.func.vmap(lambda xx, tt: F.cross_entropy(xx, tt, reduction=reduction))(
        xs.double(), ts)
    assert_close(got, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_vmap_of_grad_over_logits_and_targets(dtype, reduction):
    """vmap(grad) with the class ids batched too: the late path (fp16, fp64, 'none') made
    its gradient with an in-place scatter of batched ids, which vmap refuses (issue 15's
    adversarial test); fp32 'mean' gave wrong gradients before issue 15."""
    x, t = _case(N=5, V=20, dtype=dtype)
    xs = torch.stack([x, x.flip(0), x * 0.5])
    ts = torch.stack([t, t.flip(0), (t + 1) % 20])
    ts[1, 2] = -100
    w = torch.rand(20, device=DEVICE, dtype=torch.float64) + 0.5
    for kw in (dict(), dict(label_smoothing=0.1, weight=w.to(dtype).double())):
        def ours(xx, tt):  # the weight in the logits' dtype, its values the reference's
            kw_ = dict(kw, weight=kw["weight"].to(dtype)) if kw else kw
            return sc.cross_entropy(xx, tt, reduction=reduction, **kw_).sum()

        def theirs(xx, tt):
            return F.cross_entropy(xx, tt, reduction=reduction, **kw).sum()

        got = torch.func.vmap(torch.func.grad(ours))(xs, ts)
        ref = torch.func.vmap(torch.func.grad(theirs))(xs.double().requires_grad_(), ts)
        assert got.dtype == dtype
        assert_close(got, ref, dtype)


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_torch_func_softmax(op):
    xs = torch.randn(3, 4, 20, device=DEVICE)
    ours = lambda xx: (getattr(sc, op)(xx, dim=-1) ** 2).sum()  # noqa: E731
    theirs = lambda xx: (getattr(torch, op)(xx, dim=-1) ** 2).sum()  # noqa: E731
    assert_close(torch.func.vmap(ours)(xs), torch.func.vmap(theirs)(xs.double()), torch.float32)
    assert_close(torch.func.vmap(torch.func.grad(ours))(xs),
                 torch.func.vmap(torch.func.grad(theirs))(xs.double()), torch.float32)


# ----------------------------------------------------------------------------- returned tensors


def _loss_calls():
    """(name, f(x, w, t) -> loss) of every loss entry point, logits made from x @ w.T."""
    return [
        ("cross_entropy", lambda x, w, t, **kw: sc.cross_entropy(x @ w.T, t, **kw)),
        ("CrossEntropyLoss", lambda x, w, t, **kw: sc.CrossEntropyLoss(**kw)(x @ w.T, t)),
        ("linear_cross_entropy", lambda x, w, t, **kw: sc.linear_cross_entropy(x, w, t, **kw)),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", [n for n, _ in _loss_calls()])
def test_the_returned_loss_may_be_changed_in_place(path, dtype, reduction, name):
    """loss /= steps (gradient accumulation) before backward, as torch allows: the loss was
    saved for backward (as an anchor for create_graph), and backward then raised that it was
    modified in place."""
    fn = dict(_loss_calls())[name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, generator=g, dtype=dtype).to(DEVICE)
    w = torch.randn(9, 6, generator=g, dtype=dtype).to(DEVICE)
    t = torch.randint(0, 9, (5,), generator=g).to(DEVICE)
    xo, wo = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(xo, wo, t, reduction=reduction)
    loss /= 4
    loss.sum().backward()
    x64, w64 = (a.detach().double().clone().requires_grad_() for a in (x, w))
    ref = F.cross_entropy(F.linear(x64, w64), t, reduction=reduction)
    ref /= 4
    ref.sum().backward()
    assert_close(loss, ref, dtype, roundings=2)  # the logits of x @ w.T round once more
    assert_close(xo.grad, x64.grad, dtype, roundings=2)
    assert_close(wo.grad, w64.grad, dtype, roundings=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("name", ["cross_entropy", "linear_cross_entropy"])
def test_returned_stats_may_be_changed_in_place(path, dtype, reduction, name):
    """The stats of return_stats are the caller's: cleaning them in place (lse.nan_to_num_())
    before backward left the saved per-row stats, of which they were views, at a newer
    version, and backward raised."""
    fn = dict(_loss_calls())[name]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 6, generator=g, dtype=dtype).to(DEVICE).requires_grad_()
    w = torch.randn(9, 6, generator=g, dtype=dtype).to(DEVICE)
    t = torch.randint(0, 9, (5,), generator=g).to(DEVICE)
    t[1] = -100
    loss, st = fn(x, w, t, reduction=reduction, return_stats=True)
    ref_loss = fn(x.detach().clone().requires_grad_(), w, t, reduction=reduction)
    st.lse.nan_to_num_(0.0)
    st.entropy.zero_()
    assert st.lse[1] == 0.0
    loss.sum().backward()
    xr = x.detach().clone().requires_grad_()
    fn(xr, w, t, reduction=reduction).sum().backward()
    assert torch.equal(x.grad, xr.grad)
    assert torch.equal(loss.detach(), ref_loss.detach())


@pytest.mark.parametrize("shape", [(4, 0), (0,), (2, 3, 0)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_without_features(path, shape, reduction):
    """H = 0: the logits are the bias (0 without one), as torch's F.linear gives; the input's
    reshape(-1, 0) raised instead (adversarial pass 2)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(*shape, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(8, 0, generator=g).to(DEVICE).requires_grad_()
    b = torch.randn(8, generator=g).to(DEVICE).requires_grad_()
    t = torch.randint(0, 8, shape[:-1], generator=g).to(DEVICE)
    loss = sc.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction)
    loss.sum().backward()
    x64, w64, b64 = (a.detach().double().requires_grad_() for a in (x, w, b))
    z = F.linear(x64, w64, b64)
    ref = F.cross_entropy(z.reshape(-1, 8), t.reshape(-1), reduction=reduction)
    ref = ref.reshape(shape[:-1]) if reduction == "none" else ref
    ref.sum().backward()
    assert_close(loss, ref, torch.float32)
    assert_close(b.grad, b64.grad, torch.float32)
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


@pytest.mark.parametrize("kw,exc,words", [
    (dict(weight=[1.0] * 6), TypeError, ["'weight'", "list"]),
    (dict(weight=torch.ones(5)), ValueError, ["'weight'", "(6,)", "(5,)"]),
    (dict(chunk_size=0), ValueError, ["'chunk_size'", "0"]),
    (dict(chunk_size=2.5), TypeError, ["'chunk_size'", "2.5"]),
    (dict(out_features=2), TypeError, ["'out_features'", "2"]),
    (dict(out_features=(2, "3")), TypeError, ["'out_features'", "'3'"]),
])
def test_linear_module_constructor_names_itself_and_the_argument(kw, exc, words):
    """LinearCrossEntropyLoss's own errors (adversarial pass 2: a list weight was a
    ValueError, chunk_size named linear_cross_entropy, out_features=2 a bare TypeError)."""
    with pytest.raises(exc) as info:
        sc.LinearCrossEntropyLoss(5, 6, **kw)
    msg = str(info.value)
    assert msg.startswith("LinearCrossEntropyLoss:"), msg
    for word in words:
        assert word in msg, (word, msg)
