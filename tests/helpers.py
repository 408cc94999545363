"""Shared test helpers: the tolerance table, the error measure, poisoned buffers."""

import torch

# norm-wise relative error allowed per dtype of the logits (values computed in fp32
# inside the kernels; the reference is torch on float64 copies of the same values).
# bf16/fp16: the result is rounded once to the dtype (2^-8 / 2^-11 relative) and the
# gradient is stored in it; fp32 leaves room for V-long fp32 sums.
TOL = {
    torch.float32: 2e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
    torch.float64: 1e-12,
}

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def rel_err(actual, expected):
    """||actual - expected|| / ||expected|| in float64; inf/nan positions must match exactly."""
    a = actual.detach().double()
    e = expected.detach().double()
    assert a.shape == e.shape, (a.shape, e.shape)
    fin = torch.isfinite(e)
    assert torch.equal(torch.isfinite(a), fin), "non-finite entries differ"
    assert torch.equal(a[~fin].nan_to_num(0.0), e[~fin].nan_to_num(0.0)) and torch.equal(
        torch.isnan(a), torch.isnan(e)), "non-finite values differ"
    a, e = a[fin], e[fin]
    denom = e.norm()
    if denom == 0:
        return float((a - e).norm())
    return float((a - e).norm() / denom)


def assert_close(actual, expected, dtype, factor=1.0):
    err = rel_err(actual, expected)
    tol = TOL[dtype] * factor
    assert err <= tol, f"relative error {err:.3g} > {tol:.3g} for {dtype}"


def poisoned(shape, dtype, device):
    """An output buffer filled with NaN, so that any element left unwritten fails a test."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
