"""Correctness before timing: a provider's output and gradients against torch on float64 copies.

The measure is the norm-wise relative error ||a - e|| / ||e||, computed in float64;
a non-finite value where the reference is finite (or the reverse) is an infinite error.
The tolerance is per dtype of the inputs, wide enough for a result rounded once to that
dtype plus fp32 accumulation over V, and far below the O(1) error of a wrong result.
"""

import math

import torch

TOL = {
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}


def rel_err(actual, expected, chunk=1 << 26):
    """Norm-wise relative error in float64; inf when the non-finite entries disagree.

    Summed over chunks of `chunk` elements, so that a (16384, 128256) gradient is compared
    without a float64 copy of the whole of it.
    """
    if actual is None or actual.shape != expected.shape:
        return math.inf
    a_all = actual.detach().reshape(-1)
    e_all = expected.detach().reshape(-1)
    num = den = 0.0
    for a, e in zip(a_all.split(chunk), e_all.split(chunk)):
        a, e = a.to(torch.float64), e.to(torch.float64)
        fin = torch.isfinite(e)
        if not torch.equal(torch.isfinite(a), fin):
            return math.inf
        zero = torch.zeros((), dtype=torch.float64, device=e.device)
        num += float(torch.where(fin, a - e, zero).square().sum())
        den += float(torch.where(fin, e, zero).square().sum())
    num, den = math.sqrt(num), math.sqrt(den)
    return num / den if den > 0 else num


def max_rel_err(actual, expected):
    """The largest relative error over the pairs (output, gradient 1, ...)."""
    return max(rel_err(a, e) for a, e in zip(actual, expected))
