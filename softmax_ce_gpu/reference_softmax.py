"""Pure-PyTorch softmax and log-softmax with the launchers of kernels/softmax.py.

The backend for tensors the Triton kernels do not take (float64, and CPU tensors
when Triton's interpreter is off). Same names, arguments and semantics as
softmax_ce_gpu.kernels.softmax; it computes in float32 (float64 for float64
input) with plain torch operations, following the kernels' math line for line,
which is torch.softmax / torch.log_softmax and their backward.
"""

import torch

from ._reduction import acc_dtype


def softmax_fwd(x, y, *, log):
    """Same contract as softmax_ce_gpu.kernels.softmax.softmax_fwd."""
    z = x.to(torch.promote_types(acc_dtype(x), acc_dtype(y)))
    m = z.amax(dim=1, keepdim=True)
    # a row of -inf only: keep exponents finite; (z - m) is then NaN, as in torch
    m_ref = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    e = torch.exp(z - m_ref)
    # log d = log1p(s), s = d - 1 the sum without one max element's exp(0) = 1
    first_max = z.argmax(dim=1, keepdim=True)
    s = e.scatter(1, first_max, 0.0).sum(dim=1, keepdim=True) - (m == float("-inf")).to(e.dtype)
    # a +inf entry: torch's whole row is NaN (inf - inf), here through log d
    logd = torch.where(m == float("inf"), torch.full_like(s, float("nan")), torch.log1p(s))
    out = (z - m) - logd
    return y.copy_(out if log else torch.exp(out))


def softmax_bwd(y, dy, dx, *, log):
    """Same contract as softmax_ce_gpu.kernels.softmax.softmax_bwd."""
    acc = torch.promote_types(acc_dtype(y), acc_dtype(dx))
    yy, g = y.to(acc), dy.to(acc)
    if log:
        # J = I - 1 p^T:  dx = g - p sum(g)
        out = g - torch.exp(yy) * g.sum(dim=1, keepdim=True)
    else:
        # J = diag(p) - p p^T:  dx = p (g - sum(g p))
        out = yy * (g - (g * yy).sum(dim=1, keepdim=True))
    return dx.copy_(out)
