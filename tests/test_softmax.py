"""softmax / log_softmax: forward and backward against torch on float64 copies, and the
backward against the explicit Jacobian diag(p) - p p^T for small V."""

import pytest
import torch

import softmax_ce_gpu
from softmax_ce_gpu import reference as reference_softmax
from softmax_ce_gpu._backend import backend_for
from softmax_ce_gpu.activations import _as_rows, log_softmax, softmax

from helpers import DTYPES, assert_close, poisoned

INF = float("inf")
OPS = {"softmax": (softmax, torch.softmax), "log_softmax": (log_softmax, torch.log_softmax)}
# V = 37: one block, not a power of two. V = 10000: three fp32 chunks of 4096, two of 8192
# for bf16/fp16 (the tuning caps a chunk at 16 KiB).
SMALL_V, WIDE_V = 37, 10000


def _run(op, x, dim=-1, upstream=None):
    """(y, dx) of our op and (y, dx) of torch on a float64 copy, with one upstream gradient."""
    ours, theirs = OPS[op]
    xa = x.detach().clone().requires_grad_(True)
    y = ours(xa, dim)
    g = torch.randn(y.shape, dtype=x.dtype, device=x.device) if upstream is None else upstream
    (dx,) = torch.autograd.grad(y, xa, g)
    xr = x.detach().double().requires_grad_(True)
    yr = theirs(xr, dim)
    (dxr,) = torch.autograd.grad(yr, xr, g.double())
    return y, dx, yr, dxr


def _check(op, x, dim=-1):
    y, dx, yr, dxr = _run(op, x, dim)
    assert y.dtype == x.dtype and y.shape == x.shape and dx.shape == x.shape
    assert_close(y, yr, x.dtype)
    # the backward reads the forward's output, saved in x's dtype as torch saves it (one
    # rounding), and rounds dx once more
    assert_close(dx, dxr, x.dtype, roundings=2)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("V", [SMALL_V, WIDE_V])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_backward_match_torch(op, V, dtype, device):
    x = (3 * torch.randn(3, V, device=device)).to(dtype)
    _check(op, x)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_neg_inf_entries_and_rows(op, dtype, device):
    """-inf entries give p = 0 / log p = -inf; a row of -inf only gives NaN, as in torch."""
    x = torch.randn(4, 300, device=device)
    x[0, torch.rand(300, device=device) < 0.3] = -INF
    x[1, 200:] = -INF  # vocabulary padding
    x[2] = -INF
    _check(op, x.to(dtype))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_magnitudes(op, dtype, device):
    x = ((torch.rand(3, 5000, device=device) * 2 - 1) * 1e4).to(dtype)
    x[1, 7] = 1e4  # one dominant entry
    _check(op, x)


@pytest.mark.parametrize("op", OPS)
def test_float64_runs_reference(op, device):
    x = torch.randn(3, 257, dtype=torch.float64, device=device)
    assert backend_for(op, x) is reference_softmax
    y, dx, yr, dxr = _run(op, x)
    assert_close(y, yr, torch.float64)
    assert_close(dx, dxr, torch.float64)


@pytest.mark.parametrize("op", OPS)
def test_reference_backend_matches_torch(op, device):
    """The pure-PyTorch path (CPU without the interpreter) on fp32, called directly."""
    x = 3 * torch.randn(3, 513, 1, device=device)
    g = torch.randn_like(x)
    log = op == "log_softmax"
    y = reference_softmax.softmax_fwd(x, poisoned(x.shape, x.dtype, device), log=log)
    dx = reference_softmax.softmax_bwd(y, g, poisoned(x.shape, x.dtype, device), log=log)
    xr = x.double().requires_grad_(True)
    yr = OPS[op][1](xr, 1)
    (dxr,) = torch.autograd.grad(yr, xr, g.double())
    assert_close(y, yr, torch.float32)
    assert_close(dx, dxr, torch.float32)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("V", [5, 16])
def test_backward_is_jacobian_transpose_times_g(op, V, device):
    """dx = J^T g with J built explicitly: softmax J = diag(p) - p p^T, log_softmax
    J = diag(p)^-1 (diag(p) - p p^T) = I - 1 p^T."""
    x = torch.randn(3, V, device=device)
    g = torch.randn(3, V, device=device)
    xa = x.clone().requires_grad_(True)
    (dx,) = torch.autograd.grad(OPS[op][0](xa, -1), xa, g)
    for r in range(3):
        p = torch.softmax(x[r].double(), 0)
        J = torch.diag(p) - torch.outer(p, p)
        if op == "log_softmax":
            J = J / p[:, None]
        assert_close(dx[r], J.T @ g[r].double(), torch.float32)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape,dim", [((3, 40, 5), 1), ((3, 40, 5), -2), ((6, 2, 3), 0),
                                       ((2, 3, 4, 5), 2)])
def test_non_last_dim(op, shape, dim, device):
    """Any dim of a contiguous tensor is swept in place: (outer, V, inner) is a view."""
    x = torch.randn(shape, device=device)
    assert _as_rows(x, dim % x.dim()).data_ptr() == x.data_ptr()
    _check(op, x, dim)


def _strided_inputs(device, V):
    wide = torch.randn(5, V + 13, device=device)
    colmajor = torch.randn(V, 5, device=device).t()
    every_other = torch.randn(5, 2 * V, device=device)[:, ::2]
    uncollapsible = torch.randn(3, 4, V, device=device)[:, :2, :]  # reshape copies this one
    return {"row_strided": wide[:, :V], "column_major": colmajor, "column_stride_2": every_other,
            "uncollapsible_batch": uncollapsible}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", ["row_strided", "column_major", "column_stride_2",
                                    "uncollapsible_batch"])
def test_strided_input(op, layout, device):
    x = _strided_inputs(device, 300)[layout]
    # every 2-D layout is a view; a batch that does not collapse is copied (documented)
    is_view = _as_rows(x, x.dim() - 1).data_ptr() == x.data_ptr()
    assert is_view == (layout != "uncollapsible_batch")
    _check(op, x)


@pytest.mark.parametrize("op", OPS)
def test_strided_upstream_gradient(op, device):
    """Upstream gradients with a row stride of 0 (expanded) and transposed."""
    x = torch.randn(5, 70, device=device)
    expanded = torch.randn(1, 70, device=device).expand(5, 70)
    transposed = torch.randn(70, 5, device=device).t()
    for g in (expanded, transposed):
        _, dx, _, dxr = _run(op, x, upstream=g)
        assert_close(dx, dxr, torch.float32)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(0, 50), (1, 50), (5, 50), (3, 0), (50,), ()])
def test_shapes(op, shape, device):
    x = torch.randn(shape, device=device)
    y, dx, yr, dxr = _run(op, x)
    assert y.shape == x.shape and dx.shape == x.shape
    assert_close(y, yr, torch.float32)
    if x.numel():
        assert_close(dx, dxr, torch.float32)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_launchers_write_every_element_and_nothing_else(op, dtype, device):
    """Outputs land in NaN-poisoned buffers whose guarded tail columns must stay NaN."""
    backend = backend_for(op, torch.empty(0, dtype=dtype, device=device))
    log = op == "log_softmax"
    N, V, pad = 3, 9000, 5
    x = torch.randn(N, V, 1, device=device).to(dtype)
    g = torch.randn(N, V, 1, device=device).to(dtype)
    y_buf = poisoned((N, V + pad, 1), dtype, device)
    dx_buf = poisoned((N, V + pad, 1), dtype, device)
    y = backend.softmax_fwd(x, y_buf[:, :V], log=log)
    dx = backend.softmax_bwd(y, g, dx_buf[:, :V], log=log)
    assert y_buf[:, V:].isnan().all() and dx_buf[:, V:].isnan().all()
    xr = x.double().requires_grad_(True)
    yr = OPS[op][1](xr, 1)
    (dxr,) = torch.autograd.grad(yr, xr, g.double())
    assert_close(y, yr, dtype)
    assert_close(dx, dxr, dtype)


def test_public_exports():
    assert softmax_ce_gpu.softmax is softmax and softmax_ce_gpu.log_softmax is log_softmax


@pytest.mark.parametrize("op", OPS)
def test_bad_input(op, device):
    f = OPS[op][0]
    x = torch.randn(2, 3, device=device)
    with pytest.raises(TypeError, match=f"{op}: argument 'input' must be a torch.Tensor, got list"):
        f([1.0, 2.0])
    for dtype in (torch.int64, torch.int32, torch.bool, torch.complex64):
        with pytest.raises(TypeError, match=f"{op}: argument 'input' .* got dtype {dtype}"):
            f(torch.zeros(2, 3, dtype=dtype, device=device))
    for dim in (1.0, "1", None, True):
        with pytest.raises(TypeError, match=f"{op}: argument 'dim' must be an int, got"):
            f(x, dim)
    for dim in (2, -3):
        with pytest.raises(ValueError, match=rf"{op}: argument 'dim' must be in \[-2, 1\] .*"
                                             rf"got {dim}"):
            f(x, dim)
    with pytest.raises(ValueError, match=rf"{op}: argument 'dim' must be in \[-1, 0\]"):
        f(torch.tensor(1.0, device=device), 1)


def test_log_softmax_of_dominant_entry_keeps_its_digits(device):
    """log p_max = -log1p(s) ~ -s, with s = d - 1 ~ 4e-8 here, where log(1 + s) in fp32
    would round to 0."""
    x = torch.full((2, 3000), -25.0, device=device)
    x[:, 17] = 0.0
    yr = torch.log_softmax(x.double(), -1)[:, 17]
    for backend in (backend_for("log_softmax", x), reference_softmax):
        y = backend.softmax_fwd(x[:, :, None], poisoned(x.shape + (1,), x.dtype, device),
                                log=True)[:, 17, 0]
        assert_close(y, yr, torch.float32)


def test_sum_of_softmax_has_zero_gradient(device):
    """y.sum().backward() hands the backward a stride-0 upstream gradient; sum p = 1."""
    x = torch.randn(4, 300, device=device, requires_grad=True)
    softmax(x).sum().backward()
    assert x.grad.abs().max() < 1e-6
