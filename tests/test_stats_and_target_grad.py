"""Issue 16: per-row statistics from the loss's own pass, and the gradient with respect to
probability targets, against torch on float64 copies of the same values.

Statistics (return_stats=True): lse and the entropy of the (softcapped) logits' softmax,
and whether the argmax of the logits (of the target row, for probabilities) is the target,
first index on ties as torch.argmax; ignored rows: NaN, NaN, False. Target gradients: what
torch's autograd gives through F.cross_entropy, for every reduction, weights, smoothing,
in the dtype of the target; gradcheck in float64.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from helpers import DTYPES, TOL, assert_close, expected_stats

import softmax_ce_gpu as sc

INF = float("inf")


def _logits(N, V, dtype, scale=3.0):
    return (torch.randn(N, V, device=DEVICE) * scale).to(dtype)


def _check_stats(stats, x, t, dtype, **kw):
    lse, entropy, correct = expected_stats(x, t, **kw)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert stats.lse.dtype == stats.entropy.dtype == acc and stats.correct.dtype == torch.bool
    assert_close(stats.lse, lse, torch.float32 if acc == torch.float32 else torch.float64)
    assert_close(stats.entropy, entropy, torch.float32 if acc == torch.float32 else torch.float64)
    assert torch.equal(stats.correct, correct)


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,))
@pytest.mark.parametrize("opts", [dict(), dict(weight=True, label_smoothing=0.1, ignore=True),
                                  dict(z_loss=1e-3, softcap=5.0, ignore=True),
                                  dict(prob=True, softcap=4.0, weight=True)],
                         ids=["plain", "w-ls-ignore", "z-softcap", "prob-softcap-w"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_stats_of_every_option(dtype, opts, reduction):
    opts = dict(opts)
    N, V = 7, 300
    x = _logits(N, V, dtype)
    prob, ignore, weight = opts.pop("prob", False), opts.pop("ignore", False), opts.pop("weight", 0)
    if prob:
        t = torch.rand(N, V, device=DEVICE).softmax(1).to(dtype)
    else:
        t = torch.randint(0, V, (N,), device=DEVICE)
        t[::3] = x.argmax(dim=1)[::3]  # some rows correct
        if ignore:
            t[1::3] = -100
    w = torch.rand(V, device=DEVICE) + 0.1 if weight else None
    xg = x.clone().requires_grad_()
    loss, stats = sc.cross_entropy(xg, t, w, reduction=reduction, return_stats=True, **opts)
    _check_stats(stats, x, t, dtype, softcap=opts.get("softcap"))
    # the loss and the gradient are those of the call without statistics
    xr = x.clone().requires_grad_()
    ref = sc.cross_entropy(xr, t, w, reduction=reduction, **opts)
    assert torch.equal(loss, ref)
    loss.sum().backward()
    ref.sum().backward()
    assert torch.equal(xg.grad, xr.grad)
    assert not stats.lse.requires_grad and not stats.entropy.requires_grad


@pytest.mark.parametrize("dtype", DTYPES)
def test_stats_ties_padding_and_extremes(dtype):
    V = 40
    x = _logits(6, V, dtype)
    x[0, 5] = x[0, 17] = 50.0                   # a tie: the first index is the argmax
    x[1, :] = 2.0                               # all equal: argmax 0, entropy log V
    x[2, 30:] = -INF                            # vocabulary padding
    x[3, :] = -INF
    x[3, 7] = 1.0                               # one finite logit: entropy 0
    x[4, 3] = 1e4 if dtype != torch.float16 else 6e4  # a confident row: entropy ~ 0
    t = torch.tensor([5, 0, 29, 7, 3, 39], device=DEVICE)
    t_alt = torch.tensor([17, 1, 30, 6, 2, 0], device=DEVICE)
    for tt in (t, t_alt):
        _, stats = sc.cross_entropy(x, tt, return_stats=True, reduction="none")
        _check_stats(stats, x, tt, dtype)
    assert bool(stats.entropy[3] == 0.0) and bool(stats.entropy[4] >= 0.0)


@pytest.mark.parametrize("V", [37, 10000])
def test_stats_several_blocks_and_layouts(V):
    x = _logits(4, V, torch.float32)
    base = torch.randn(4, 2 * V, device=DEVICE) * 3
    for logits in (x, base[:, ::2], base.t().contiguous().t()[:, :V]):
        t = torch.randint(0, V, (4,), device=DEVICE)
        t[0] = logits[0].argmax()
        _, stats = sc.cross_entropy(logits, t, return_stats=True, label_smoothing=0.1)
        _check_stats(stats, logits, t, torch.float32)


def test_stats_shapes_and_with_grad():
    x = _logits(2, 11, torch.float32).reshape(2, 11, 1).expand(2, 11, 3).contiguous()
    t = torch.randint(0, 11, (2, 3), device=DEVICE)
    loss, stats = sc.cross_entropy(x, t, return_stats=True, reduction="none")
    assert stats.lse.shape == stats.correct.shape == (2, 3) == loss.shape
    flat = x.movedim(1, -1).reshape(-1, 11)
    _check_stats(sc.CrossEntropyStats(*(s.reshape(-1) for s in stats)), flat, t.reshape(-1),
                 torch.float32)
    loss1, stats1 = sc.cross_entropy(x[0, :, 0], t[0, 0], return_stats=True)
    assert stats1.lse.shape == ()
    loss2, grad, stats2 = sc.cross_entropy_with_grad(flat, t.reshape(-1), return_stats=True)
    _check_stats(stats2, flat, t.reshape(-1), torch.float32)
    with pytest.raises(TypeError, match="cross_entropy: argument 'return_stats' must be a bool"):
        sc.cross_entropy(flat, t.reshape(-1), return_stats=1)


# ----------------------------------------------------------------------------- target gradient


def _target_case(dtype, N=5, V=60):
    x = _logits(N, V, dtype)
    p = torch.rand(N, V, device=DEVICE).softmax(1).to(dtype)
    return x, p


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", [dict(), dict(weight=True), dict(label_smoothing=0.2),
                                  dict(weight=True, label_smoothing=0.1, softcap=5.0,
                                       z_loss=1e-3)],
                         ids=["plain", "w", "ls", "w-ls-softcap-z"])
@pytest.mark.parametrize("which", ["both", "target-only"])
def test_probability_target_gradient_matches_torch(dtype, reduction, opts, which):
    opts = dict(opts)
    x, p = _target_case(dtype)
    w = torch.rand(x.shape[1], device=DEVICE) + 0.1 if opts.pop("weight", False) else None
    z_loss, softcap = opts.pop("z_loss", 0.0), opts.pop("softcap", None)
    xg = x.clone().requires_grad_(which == "both")
    pg = p.clone().requires_grad_()
    loss = sc.cross_entropy(xg, pg, w, reduction=reduction, z_loss=z_loss, softcap=softcap, **opts)
    up = (torch.rand_like(loss) + 0.5).to(loss.dtype)
    loss.backward(up)
    x64 = x.double().requires_grad_(which == "both")
    p64 = p.double().requires_grad_()
    z = x64 if softcap is None else softcap * torch.tanh(x64 / softcap)
    ref = F.cross_entropy(z, p64, None if w is None else w.double(), reduction="none", **opts)
    ref = ref + z_loss * torch.logsumexp(z, 1) ** 2
    ref = ref.mean() if reduction == "mean" else ref.sum() if reduction == "sum" else ref
    ref.backward(up.double())
    assert pg.grad.dtype == dtype
    # the fused path ('mean'/'sum', not fp16) rounds in forward and again when scaled by an
    # upstream other than 1 (see test_cross_entropy.fused_roundings)
    roundings = 2 if reduction != "none" and dtype == torch.bfloat16 else 1
    assert_close(pg.grad, p64.grad, dtype, roundings)
    if which == "both":
        assert_close(xg.grad, x64.grad, dtype, roundings)
    else:
        assert xg.grad is None


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.3), dict(weight=True)],
                         ids=["plain", "ls", "w"])
def test_probability_target_gradcheck(reduction, opts):
    opts = dict(opts)
    x, p = _target_case(torch.float64, N=3, V=7)
    w = torch.rand(7, dtype=torch.float64, device=DEVICE) + 0.1 if opts.pop("weight", 0) else None
    torch.autograd.gradcheck(
        lambda a, b: sc.cross_entropy(a, b, w, reduction=reduction, **opts),
        (x.requires_grad_(), p.requires_grad_()))
    # second order through the late path ('none'), differentiable in both
    if reduction == "none":
        torch.autograd.gradgradcheck(
            lambda a, b: sc.cross_entropy(a, b, w, reduction="none", **opts), (x, p))


def test_target_gradient_with_inplace_and_rank_three():
    x = _logits(2, 9, torch.float32).reshape(2, 9, 1).repeat(1, 1, 2)
    p = torch.rand(2, 9, 2, device=DEVICE).softmax(1)
    xg, pg = x.clone().requires_grad_(), p.clone().requires_grad_()
    loss = sc.cross_entropy(xg * 1.0, pg, inplace_backward=True, label_smoothing=0.1)
    loss.backward()
    x64, p64 = x.double().requires_grad_(), p.double().requires_grad_()
    F.cross_entropy(x64, p64, label_smoothing=0.1).backward()
    assert_close(xg.grad, x64.grad, torch.float32)
    assert_close(pg.grad, p64.grad, torch.float32)


def test_target_gradient_padding_is_torchs():
    """A -inf logit: d loss / d t_j = (1 - e) w_j (lse - z_j) is +inf there, as torch's."""
    x, p = _target_case(torch.float32, N=2, V=10)
    x[:, 8:] = -INF
    pg = p.clone().requires_grad_()
    sc.cross_entropy(x, pg, reduction="sum").backward()
    p64 = p.double().requires_grad_()
    F.cross_entropy(x.double(), p64, reduction="sum").backward()
    assert torch.equal(torch.isinf(pg.grad), torch.isinf(p64.grad))
    assert_close(pg.grad[:, :8], p64.grad[:, :8], torch.float32)
