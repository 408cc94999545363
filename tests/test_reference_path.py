"""The pure-PyTorch path (softmax_ce_gpu/reference.py) for float32/bfloat16 on CPU.

It is what a CPU user gets without Triton's interpreter; the rest of the suite runs CPU
tensors through the interpreter (and float64 through this path). Here the backend choice
is forced to it, and the calls whose outputs can alias their inputs (in place, out=)
and the per-row statistics and target gradients are checked against torch on float64
copies, as elsewhere.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from helpers import assert_close

import softmax_ce_gpu as sc
from softmax_ce_gpu import _backend, reference

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="the pure-PyTorch path serves CPU tensors")

DTYPES = (torch.float32, torch.bfloat16)


@pytest.fixture(autouse=True)
def _pure_pytorch(monkeypatch):
    for dtype in DTYPES:
        monkeypatch.setitem(_backend._CHOSEN, _backend.choice_key(torch.empty(0, dtype=dtype)),
                            reference)


def test_the_path_is_forced():
    assert _backend.backend_for("t", torch.zeros(1, 1)) is reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_probability_target_gradient_and_stats(dtype, inplace, reduction):
    """Logits' and target's gradients, and the statistics, with the logits' gradient
    written over them (inplace_backward): everything that reads the logits comes first."""
    z = (torch.randn(6, 23) * 3).to(dtype)
    p = torch.rand(6, 23).softmax(1).to(dtype)
    x, t = z.clone().requires_grad_(), p.clone().requires_grad_()
    loss, stats = sc.cross_entropy(x * 1.0 if inplace else x, t, label_smoothing=0.1,
                                   reduction=reduction, inplace_backward=inplace,
                                   return_stats=True)
    up = torch.rand(loss.shape) + 0.5
    gx, gt = torch.autograd.grad(loss, (x, t), up.to(loss.dtype))
    z64, p64 = z.double().requires_grad_(), p.double().requires_grad_()
    ref = F.cross_entropy(z64, p64, label_smoothing=0.1, reduction=reduction)
    rx, rt = torch.autograd.grad(ref, (z64, p64), up.double())
    assert_close(loss, ref, dtype)
    # 'mean' makes the gradients in forward, rounded to the dtype, then scaled by the
    # upstream gradient in backward: two roundings ('none': one, within the same bound)
    assert_close(gx, rx, dtype, roundings=2)
    assert_close(gt, rt, dtype, roundings=2)
    lse = torch.logsumexp(z64.detach(), 1)
    logp = torch.log_softmax(z64.detach(), 1)
    assert_close(stats.lse, lse, torch.float32)
    assert_close(stats.entropy, -(logp.exp() * logp).sum(1), torch.float32)
    assert torch.equal(stats.correct, z.argmax(1) == p.argmax(1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_class_ids_in_place_and_out(dtype):
    z = (torch.randn(7, 19) * 3).to(dtype)
    t = torch.randint(0, 19, (7,))
    t[2] = -100
    z64 = z.double().requires_grad_()
    ref = F.cross_entropy(z64, t, label_smoothing=0.2)
    (r,) = torch.autograd.grad(ref, z64)
    x = z.clone().requires_grad_()
    loss, stats = sc.cross_entropy(x * 1.0, t, label_smoothing=0.2, inplace_backward=True,
                                   return_stats=True)
    (g,) = torch.autograd.grad(loss, x)
    assert_close(loss, ref, dtype)
    assert_close(g, r, dtype)
    assert torch.isnan(stats.lse[2]) and not stats.correct[2]
    out = torch.full_like(z, float("nan"))  # poisoned
    loss, dx, stats = sc.cross_entropy_with_grad(z.clone(), t, label_smoothing=0.2, out=out,
                                                 return_stats=True)
    assert dx.data_ptr() == out.data_ptr()
    assert_close(dx, r, dtype)
    valid = t != -100
    assert torch.equal(stats.correct, valid & (z.argmax(1) == t))
    w = z.clone()
    loss, dx = sc.cross_entropy_with_grad(w, t, label_smoothing=0.2, out=w)
    assert_close(dx, r, dtype)
