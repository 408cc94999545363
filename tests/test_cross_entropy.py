"""cross_entropy against torch.nn.functional.cross_entropy on float64 copies of the same inputs.

Every torch option and every reduction, for fp32/bf16/fp16 logits, loss and gradient
(with a random upstream gradient), plus the library's extras (z-loss, softcap) against
a float64 reference built from torch primitives. Tests of the fused forward run on both
of its paths (the conftest fixtures fused_path and fused_path_tuned).
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from helpers import DTYPES, assert_close, rel_err

import softmax_ce_gpu as sc

REDUCTIONS = ("mean", "sum", "none")
# these tests reach the fused forward through autograd only (conftest.py: fused_by_autograd)
pytestmark = pytest.mark.fused_by_autograd


def make_case(N, V, dtype, *, target="class", ignore=False, weight=False, scale=3.0):
    """Fresh random logits/target/weight on DEVICE; target kinds: class, prob, prob_unnorm."""
    x = (torch.randn(N, V, device=DEVICE) * scale).to(dtype)
    if target == "class":
        t = torch.randint(0, V, (N,), device=DEVICE)
        if ignore and N > 1:
            t[:: 2] = -100
    else:
        t = torch.rand(N, V, device=DEVICE)
        if target == "prob":
            t = t.softmax(dim=1)
        t = t.to(dtype)
    w = (torch.rand(V, device=DEVICE) + 0.1).to(dtype) if weight else None
    return x, t, w


def reference(x, t, w=None, *, reduction="mean", z_loss=0.0, softcap=None, **kw):
    """torch on float64 copies; z-loss and softcap built from torch primitives.

    Returns (loss, x64 leaf) so the caller can backprop and read x64.grad.
    """
    x64 = x.detach().double().requires_grad_()
    t64 = t.double() if t.is_floating_point() else t
    w64 = None if w is None else w.double()
    z = x64
    if softcap is not None:
        z = torch.where(x64 == float("-inf"), x64, softcap * torch.tanh(x64 / softcap))
    if z_loss == 0.0:
        return F.cross_entropy(z, t64, w64, reduction=reduction, **kw), x64
    rows = F.cross_entropy(z, t64, w64, reduction="none", **kw)
    ignore_index = kw.get("ignore_index", -100)
    valid = torch.ones_like(rows, dtype=torch.bool) if t.is_floating_point() else t != ignore_index
    rows = rows + torch.where(valid, z_loss * torch.logsumexp(z, dim=1) ** 2, 0.0)
    if reduction == "none":
        return rows, x64
    if reduction == "sum":
        return rows.sum(), x64
    if t.is_floating_point():
        return rows.sum() / rows.shape[0], x64
    wt = torch.ones_like(rows) if w64 is None else w64[t.clamp(min=0)]
    return rows.sum() / (wt * valid).sum(), x64


def fused_roundings(dtype, reduction):
    """Roundings of the gradient under a random upstream gradient: the fused path ('mean' and
    'sum', but not fp16, see loss.py) rounds it in forward and again when backward scales it
    by an upstream other than 1, where torch rounds once; at upstream 1 (test_unit_upstream)
    and on the late path it is one rounding."""
    return 2 if reduction != "none" and dtype == torch.bfloat16 else 1


def check(x, t, w=None, *, dtype, **kw):
    """Loss and gradient of sc.cross_entropy vs the float64 reference, random upstream grad."""
    xg = x.clone().requires_grad_()
    loss = sc.cross_entropy(xg, t, w, **kw)
    ref, x64 = reference(x, t, w, **kw)
    assert loss.dtype == x.dtype and loss.shape == ref.shape
    assert_close(loss, ref, dtype)
    up = (torch.rand_like(ref) + 0.5).to(loss.dtype)  # the same values reach both
    loss.backward(up)
    ref.backward(up.double())
    assert_close(xg.grad, x64.grad, dtype, fused_roundings(dtype, kw.get("reduction", "mean")))
    return loss, xg.grad


@pytest.mark.usefixtures("fused_path")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", [
    dict(),
    dict(ignore=True),
    dict(weight=True),
    dict(weight=True, ignore=True),
    dict(label_smoothing=0.1),
    dict(label_smoothing=0.3, weight=True, ignore=True),
    dict(label_smoothing=1.0),
    dict(ignore_index=3),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_class_targets_match_torch(dtype, reduction, opts):
    opts = dict(opts)
    x, t, w = make_case(7, 257, dtype, ignore=opts.pop("ignore", False),
                        weight=opts.pop("weight", False))
    if "ignore_index" in opts:
        t[1] = opts["ignore_index"]
    check(x, t, w, dtype=dtype, reduction=reduction, **opts)


@pytest.mark.usefixtures("fused_path")
@pytest.mark.parametrize("own_scale", [True, False], ids=["own-scale", "scale-launch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", ["ignore-weight-ls", "prob-weight-ls", "all-ignored"])
def test_reduction_scale_made_in_the_loss_launch_or_before_it(monkeypatch, own_scale, dtype,
                                                              reduction, case):
    """Up to _OWN_SCALE_ROWS rows the loss launch makes the reduction's scale (the mean's
    denominator, the id check) itself; more rows take a launch before it. Both, against
    torch, with weights, ignored rows, probabilities and a 0 / 0 mean (NaN)."""
    from softmax_ce_gpu import _ops

    N = 9
    monkeypatch.setattr(_ops, "_OWN_SCALE_ROWS", N if own_scale else N - 1)
    x, t, w = make_case(N, 40, dtype, target="prob" if case == "prob-weight-ls" else "class",
                        ignore=True, weight=True)
    if case == "all-ignored":
        t[:] = -100
    check(x, t, w, dtype=dtype, reduction=reduction, label_smoothing=0.2)
    t = torch.randint(0, 40, (N,), device=DEVICE)
    t[4] = 40
    with pytest.raises(ValueError, match=r"cross_entropy: class id 40 in 'target' is outside "
                                         r"\[0, 40\)"):
        sc.cross_entropy(x.clone().requires_grad_(), t, reduction=reduction)


def test_launchers_pass_each_constexpr_in_its_place(monkeypatch):
    """The launchers pass the kernels' constexprs by position (keywords cost host time per
    launch), from the name lists of kernels/cross_entropy.py: those must be the kernels' last
    parameters in their order, and each launch must bind the flags its options ask for (a
    swapped position would compile a kernel for other options without an error)."""
    import inspect

    from softmax_ce_gpu.kernels import cross_entropy as ce_kernels, reduction as red_kernels

    cases = ((ce_kernels._cross_entropy_fwd_kernel, ce_kernels.FWD_CONSTEXPRS),
             (ce_kernels._cross_entropy_bwd_kernel, ce_kernels.BWD_CONSTEXPRS),
             (ce_kernels._scale_grad_kernel, ("BLOCK_V",)),
             (red_kernels._loss_scale_kernel, ("MEAN", "PROB_TARGET", "HAS_WEIGHT", "BLOCK")),
             (red_kernels._loss_reduce_kernel, ("MEAN", "BLOCK")))
    bound = {}
    for kernel, names in cases:
        params = inspect.signature(kernel.fn).parameters
        constexprs = tuple(n for n, p in params.items() if "constexpr" in str(p.annotation))
        assert constexprs == tuple(params)[-len(names):] == names, kernel.fn.__name__

        class Spy:  # records the arguments of each launch by parameter name, then launches
            def __init__(self, kernel):
                self.kernel = kernel

            def __getitem__(self, grid):
                def launch(*args, **options):
                    sig = inspect.signature(self.kernel.fn)
                    bound[self.kernel.fn.__name__] = sig.bind(*args).arguments
                    return self.kernel[grid](*args, **options)
                return launch

        module = ce_kernels if kernel.fn.__module__.endswith("cross_entropy") else red_kernels
        monkeypatch.setattr(module, kernel.fn.__name__, Spy(kernel))

    x = torch.randn(3, 50, device=DEVICE, requires_grad=True)
    t = torch.randint(0, 50, (3,), device=DEVICE)
    w = torch.rand(50, device=DEVICE)
    for kw, flags in ((dict(label_smoothing=0.1), ("HAS_SMOOTHING",)),
                      (dict(z_loss=1e-3), ("HAS_Z_LOSS",)),
                      (dict(softcap=3.0, weight=w), ("HAS_SOFTCAP", "HAS_WEIGHT"))):
        for reduction in ("mean", "none"):
            bound.clear()
            sc.cross_entropy(x, t, reduction=reduction, **kw).sum().backward()
            kernel = "_cross_entropy_fwd_kernel" if reduction == "mean" else \
                "_cross_entropy_bwd_kernel"
            for name in ("HAS_WEIGHT", "PROB_TARGET", "HAS_SMOOTHING", "HAS_Z_LOSS",
                         "HAS_SOFTCAP"):
                assert bound[kernel][name] is (name in flags), (kernel, name, kw)
            if reduction == "mean":
                assert bound[kernel]["FUSE_GRAD"] is True
                assert bound["_loss_reduce_kernel"]["MEAN"] is True
                assert bound["_scale_grad_kernel"]["BLOCK_V"] >= 64
            else:
                assert bound[kernel]["WRITE_X"] is True
    x.grad = None
    sc.cross_entropy(x[:2], t[:2], reduction="sum").backward()  # the scale made in the launch
    assert bound["_cross_entropy_fwd_kernel"]["OWN_SCALE"] is True
    assert bound["_cross_entropy_fwd_kernel"]["MEAN"] is False


@pytest.mark.usefixtures("fused_path")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["prob", "prob_unnorm"])
@pytest.mark.parametrize("opts", [dict(), dict(weight=True), dict(label_smoothing=0.2),
                                  dict(weight=True, label_smoothing=0.2)],
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_probability_targets_match_torch(dtype, reduction, kind, opts):
    opts = dict(opts)
    x, t, w = make_case(5, 130, dtype, target=kind, weight=opts.pop("weight", False))
    check(x, t, w, dtype=dtype, reduction=reduction, **opts)


@pytest.mark.usefixtures("fused_path")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", [
    dict(z_loss=1e-3),
    dict(softcap=5.0),
    dict(z_loss=1e-2, softcap=3.0, label_smoothing=0.1, weight=True, ignore=True),
    dict(z_loss=1e-3, softcap=4.0, target="prob", weight=True),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_z_loss_and_softcap(dtype, reduction, opts):
    opts = dict(opts)
    x, t, w = make_case(7, 300, dtype, target=opts.pop("target", "class"),
                        ignore=opts.pop("ignore", False), weight=opts.pop("weight", False))
    check(x, t, w, dtype=dtype, reduction=reduction, **opts)


@pytest.mark.usefixtures("fused_path_tuned")
@pytest.mark.parametrize("dtype", DTYPES)
def test_several_blocks(dtype):
    # 16 KiB chunks: 10000 fp32 = 3 chunks, 20000 bf16/fp16 = 3 chunks
    V = 10000 if dtype == torch.float32 else 20000
    x, t, w = make_case(3, V, dtype, weight=True)
    check(x, t, w, dtype=dtype, label_smoothing=0.1, z_loss=1e-3)
    x, t, _ = make_case(2, V, dtype, target="prob")
    check(x, t, dtype=dtype, reduction="sum")


@pytest.mark.usefixtures("fused_path_tuned")
def test_full_vocabulary_bf16():
    x, t, _ = make_case(2, 128256, torch.bfloat16)
    check(x, t, dtype=torch.bfloat16)


@pytest.mark.usefixtures("fused_path")
@pytest.mark.parametrize("N", [0, 1, 5])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_batch_sizes(N, reduction):
    x, t, _ = make_case(N, 33, torch.float32)
    if N == 0:
        xg = x.clone().requires_grad_()
        loss = sc.cross_entropy(xg, t, reduction=reduction)
        ref = F.cross_entropy(x.double(), t, reduction=reduction)
        assert loss.shape == ref.shape
        if reduction == "mean":
            assert torch.isnan(loss)
        elif reduction == "sum":
            assert loss.item() == 0.0
        loss.sum().backward()
        assert xg.grad.shape == (0, 33)
        return
    check(x, t, dtype=torch.float32, reduction=reduction)


def test_vocabulary_of_one():
    x, t, _ = make_case(4, 1, torch.float32)
    loss, grad = check(x, t, dtype=torch.float32, reduction="sum")
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0


@pytest.mark.usefixtures("fused_path")
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_unbatched_input(reduction):
    x = torch.randn(300, device=DEVICE)
    t = torch.tensor(17, device=DEVICE)
    check(x, t, dtype=torch.float32, reduction=reduction)
    check(x, torch.rand(300, device=DEVICE).softmax(0), dtype=torch.float32, reduction=reduction)


@pytest.mark.usefixtures("fused_path")
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_higher_rank_follows_torch(reduction):
    x = torch.randn(2, 40, 3, 2, device=DEVICE)
    t = torch.randint(0, 40, (2, 3, 2), device=DEVICE)
    t[0, 1, 1] = -100
    check(x, t, dtype=torch.float32, reduction=reduction, label_smoothing=0.1)
    p = torch.rand(2, 40, 3, 2, device=DEVICE)
    check(x, p, dtype=torch.float32, reduction=reduction)


def test_float64_runs_reference_path_exactly():
    x, t, w = make_case(5, 70, torch.float64, weight=True, ignore=True)
    check(x, t, w, dtype=torch.float64, label_smoothing=0.2)


@pytest.mark.usefixtures("fused_path")
def test_loss_used_twice_in_one_graph():
    x, t, _ = make_case(5, 100, torch.float32)
    xg = x.clone().requires_grad_()
    loss = sc.cross_entropy(xg, t)
    (loss * 3.0 + loss ** 2).backward()
    ref, x64 = reference(x, t)
    (ref * 3.0 + ref ** 2).backward()
    assert_close(xg.grad, x64.grad, torch.float32)


@pytest.mark.usefixtures("fused_path")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_retain_graph_second_backward(reduction):
    """The fused gradient is handed out once: a second backward raises; 'none' recomputes."""
    x, t, _ = make_case(4, 50, torch.float32)
    xg = x.clone().requires_grad_()
    loss = sc.cross_entropy(xg, t, reduction=reduction).sum()
    loss.backward(retain_graph=True)
    first = xg.grad.clone()
    if reduction == "mean":
        with pytest.raises(RuntimeError, match="second time"):
            loss.backward()
    else:
        xg.grad = None
        loss.backward()
        torch.testing.assert_close(xg.grad, first, rtol=0, atol=0)


def test_no_grad_forward_matches():
    x, t, _ = make_case(6, 90, torch.bfloat16)
    with torch.no_grad():
        loss = sc.cross_entropy(x, t, label_smoothing=0.1)
    ref, _ = reference(x, t, label_smoothing=0.1)
    assert_close(loss, ref, torch.bfloat16)


@pytest.mark.usefixtures("fused_path")
def test_module_matches_function():
    x, t, w = make_case(5, 64, torch.float32, weight=True)
    mod = sc.CrossEntropyLoss(weight=w, label_smoothing=0.1, z_loss=1e-3, softcap=10.0,
                              reduction="sum")
    ref, _ = reference(x, t, w, label_smoothing=0.1, z_loss=1e-3, softcap=10.0, reduction="sum")
    assert_close(mod(x, t), ref, torch.float32)
    assert "z_loss=0.001" in repr(mod)
    assert torch.equal(mod.state_dict()["weight"], w)


def test_int32_and_uint8_class_ids():
    x, t, _ = make_case(5, 100, torch.float32)
    ref, _ = reference(x, t)
    assert_close(sc.cross_entropy(x, t.int()), ref, torch.float32)
    assert_close(sc.cross_entropy(x, t.to(torch.uint8)), ref, torch.float32)


@pytest.mark.usefixtures("fused_path")
def test_all_rows_ignored_mean_is_nan_with_zero_gradient():
    x, _, w = make_case(4, 20, torch.float32, weight=True)
    t = torch.full((4,), -100, device=DEVICE)
    for weight in (None, w):
        xg = x.clone().requires_grad_()
        loss = sc.cross_entropy(xg, t, weight)
        assert torch.isnan(loss)
        assert torch.isnan(F.cross_entropy(x, t, weight))
        loss.backward()
        assert torch.count_nonzero(xg.grad) == 0


@pytest.mark.usefixtures("fused_path")
def test_ignore_index_inside_vocabulary():
    x, t, _ = make_case(6, 40, torch.float32)
    t[:3] = 5
    check(x, t, dtype=torch.float32, ignore_index=5, label_smoothing=0.1)
    assert rel_err(sc.cross_entropy(x, t, ignore_index=5, reduction="none")[:3],
                   torch.zeros(3, device=DEVICE)) == 0.0


@pytest.mark.usefixtures("fused_path")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1, weight=True, ignore=True),
                                  dict(z_loss=1e-3, softcap=5.0), dict(target="prob")],
                         ids=["plain", "ls-w-ignore", "z-softcap", "prob"])
def test_unit_upstream_gradient_is_one_rounding(dtype, reduction, opts):
    """loss.backward() (upstream 1): the fused gradient is rounded once, as torch's is."""
    opts = dict(opts)
    x, t, w = make_case(6, 300, dtype, target=opts.pop("target", "class"),
                        ignore=opts.pop("ignore", False), weight=opts.pop("weight", False))
    xg = x.clone().requires_grad_()
    sc.cross_entropy(xg, t, w, reduction=reduction, **opts).backward()
    ref, x64 = reference(x, t, w, reduction=reduction, **opts)
    ref.backward()
    assert_close(xg.grad, x64.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wdtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_class_weights_of_another_dtype(dtype, wdtype, reduction):
    """Weights of any floating dtype with logits of any dtype (torch wants them equal; we read
    them as fp32), against torch on float64 copies of the same values."""
    x, t, _ = make_case(7, 200, dtype, ignore=True)
    w = (torch.rand(200, device=DEVICE) + 0.1).to(wdtype)
    check(x, t, w, dtype=dtype, reduction=reduction, label_smoothing=0.1)
