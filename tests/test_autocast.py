"""Under torch.autocast every entry point returns what torch returns under the same autocast
(loss dtype, gradient dtype) with values against float64, and never copies the logits to
fp32. CPU autocast runs here; CUDA autocast on a GPU runner (skipped elsewhere).

torch's rules (softmax_ce_gpu/_autocast.py): cross_entropy is an fp32 op (fp32 loss, the
gradient in the logits' dtype); softmax/log_softmax are fp32 ops on CUDA only;
linear_cross_entropy is F.linear in the autocast dtype, then the fp32 loss.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from helpers import TOL, assert_close, rel_err

import softmax_ce_gpu as sc

try:
    from softmax_ce_gpu.bench import byte_count
except ImportError:  # running from a checkout without the package installed
    from bench import byte_count

AUTOCAST = [torch.bfloat16, torch.float16]


def _grad(fn, *leaves):
    out = fn(*leaves)
    grads = torch.autograd.grad(out.sum(), [a for a in leaves if a.requires_grad])
    return out, grads


@pytest.mark.parametrize("amp", AUTOCAST)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("weight", [False, True])
def test_cross_entropy_under_autocast(amp, dtype, reduction, weight):
    x = (torch.randn(6, 50, device=DEVICE) * 3).to(dtype)
    t = torch.randint(0, 50, (6,), device=DEVICE)
    w = torch.rand(50, device=DEVICE) + 0.1 if weight else None  # fp32 weights, as torch takes
    kw = dict(reduction=reduction, label_smoothing=0.1)
    with torch.autocast(DEVICE, dtype=amp):
        ours, (g,) = _grad(lambda a: sc.cross_entropy(a, t, w, **kw), x.clone().requires_grad_())
        theirs, (gt,) = _grad(lambda a: F.cross_entropy(a, t, w, **kw), x.clone().requires_grad_())
        mod = sc.CrossEntropyLoss(w, **kw)(x, t)
    assert ours.dtype == theirs.dtype == mod.dtype and g.dtype == gt.dtype == dtype
    exact, (ge,) = _grad(lambda a: F.cross_entropy(a, t, None if w is None else w.double(), **kw),
                         x.double().requires_grad_())
    assert_close(ours, exact, torch.float32)
    assert_close(mod, exact, torch.float32)
    assert_close(g, ge, dtype)


@pytest.mark.parametrize("amp", AUTOCAST)
def test_autocast_never_copies_the_logits_to_fp32(amp):
    x = torch.randn(8, 1000, device=DEVICE, dtype=amp, requires_grad=True)
    logits = x * 1.0
    t = torch.randint(0, 1000, (8,), device=DEVICE)
    with byte_count.AllocationRecorder() as rec, torch.autocast(DEVICE, dtype=amp):
        loss = sc.cross_entropy(logits, t)
        torch.autograd.grad(loss, logits)
    big = rec.larger_than(logits.numel() * logits.element_size() // 2)
    assert [a for a in big if a[2] != amp] == [], big  # only the (bf16/fp16) gradient
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("amp", AUTOCAST)
@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_softmax_under_autocast(amp, op, dtype):
    x = (torch.randn(4, 60, device=DEVICE) * 3).to(dtype)
    with torch.autocast(DEVICE, dtype=amp):
        ours, (g,) = _grad(lambda a: getattr(sc, op)(a, dim=1), x.clone().requires_grad_())
        theirs, (gt,) = _grad(lambda a: getattr(torch, op)(a, dim=1), x.clone().requires_grad_())
    assert ours.dtype == theirs.dtype and g.dtype == gt.dtype == dtype
    exact = getattr(torch, op)(x.double(), dim=1)
    assert_close(ours, exact, ours.dtype)


@pytest.mark.parametrize("amp", AUTOCAST)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_under_autocast(amp, reduction, dtype):
    """Values: torch's own result under the same autocast is the yardstick (both round the
    logits to the autocast dtype); ours must be as close to the float64 value as torch's is,
    plus one rounding."""
    if not hasattr(F, "linear_cross_entropy"):
        pytest.skip("torch < 2.13 has no F.linear_cross_entropy to compare with")
    N, H, V = 6, 16, 80
    h = torch.randn(N, H, device=DEVICE).to(dtype)
    W = (torch.randn(V, H, device=DEVICE) / 2).to(dtype)
    t = torch.randint(0, V, (N,), device=DEVICE)
    leaves = lambda: [h.clone().requires_grad_(), W.clone().requires_grad_()]  # noqa: E731
    with torch.autocast(DEVICE, dtype=amp):
        ours, g = _grad(lambda a, b: sc.linear_cross_entropy(a, b, t, reduction=reduction,
                                                             chunk_size=4), *leaves())
        theirs, gt = _grad(lambda a, b: F.linear_cross_entropy(a, b, t, reduction=reduction),
                           *leaves())
    assert ours.dtype == theirs.dtype
    assert [a.dtype for a in g] == [a.dtype for a in gt] == [dtype, dtype]
    exact, ge = _grad(lambda a, b: F.cross_entropy(F.linear(a, b), t, reduction=reduction),
                      h.double().requires_grad_(), W.double().requires_grad_())
    assert rel_err(ours, exact) <= rel_err(theirs, exact) + TOL[torch.float32]
    for a, b, e in zip(g, gt, ge):
        assert rel_err(a, e) <= rel_err(b, e) + TOL[amp]
