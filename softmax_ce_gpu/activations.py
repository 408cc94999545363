"""Public softmax and log_softmax, their autograd Function and their input checks.

A call flows one way: check the inputs, view the tensor as rows (outer, V, inner)
along ``dim``, pick the backend, run the autograd Function, which calls the
launchers of kernels/softmax.py (or of reference_softmax.py) through the custom ops
of _ops.py.

Any dim, without a copy where the strides allow it: x.reshape(outer, V, inner),
with outer the product of the sizes before ``dim`` and inner of those after it,
is a view whenever the dims before ``dim`` collapse into one stride and so do
the dims after it. That covers every 2-D tensor with any strides (row-strided,
column-major, column stride != 1), the last dim of any tensor whose batch dims
collapse, and any dim of a contiguous tensor (a middle dim is swept in place
with column stride = inner). Other layouts (e.g. the last dim of x[:, :2, :]
for a contiguous x of shape (3, 4, V)) are copied once by reshape: one extra
read and write of the input. The output and the input gradient are new
contiguous tensors of the input's shape.

Backward: softmax saves its output p and computes dx = p * (g - sum(g p));
log_softmax saves its output y = log p and computes dx = g - exp(y) sum(g).
Both are J^T g with J = diag(p) - p p^T (see kernels/softmax.py), never built.
"""

import numbers

import torch
from . import _autocast, _checks, _dispatch, _ops

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_softmax_args(fn, x, dim):
    """A floating tensor of any rank (0-d and empty included) and an int dim in its range.

    Returns dim as a non-negative int; a 0-d tensor takes dim 0 or -1, like torch.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: argument 'input' must be a torch.Tensor, got {type(x).__name__}")
    _checks.check_dense(fn, "input", x)
    if x.dtype not in _DTYPES:
        raise TypeError(f"{fn}: argument 'input' must be float16, bfloat16, float32 or float64, "
                        f"got dtype {x.dtype}")
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"{fn}: argument 'dim' must be an int, got {dim!r}")
    ndim = max(x.dim(), 1)
    if not -ndim <= dim < ndim:
        raise ValueError(f"{fn}: argument 'dim' must be in [{-ndim}, {ndim - 1}] for input of "
                         f"shape {tuple(x.shape)}, got {dim}")
    return int(dim) % ndim


def _as_rows(x, dim):
    """x as (outer, V, inner) along dim: a view where the strides allow, else a copy."""
    shape = tuple(x.shape) or (1,)
    outer, inner = 1, 1
    for size in shape[:dim]:
        outer *= size
    for size in shape[dim + 1:]:
        inner *= size
    return x.reshape(outer, shape[dim], inner)


def check_dtype(fn, x, dtype):
    """torch's dtype= of softmax: None (x's dtype, or what autocast makes it: see _autocast)
    or a floating dtype the output takes.

    Returns (x to read, output dtype): x is cast first only when dtype is narrower than x
    (that is torch's order: cast, then softmax); a wider dtype is read from x as it is (the
    widening is exact) and written directly, without a copy of x. float64 on either side
    runs on the float64 path, with x cast to float64.
    """
    if dtype is None:
        return x, _autocast.softmax_dtype(x)
    if not isinstance(dtype, torch.dtype) or dtype not in _DTYPES:
        raise TypeError(f"{fn}: argument 'dtype' must be None or one of float16, bfloat16, "
                        f"float32, float64, got {dtype!r}")
    if dtype == torch.float64 or x.dtype == torch.float64:
        return x.to(dtype), dtype
    if dtype != x.dtype and torch.promote_types(x.dtype, dtype) != dtype:
        return x.to(dtype), dtype  # narrower (or bf16 <-> fp16): round x first, as torch does
    return x, dtype


class _SoftmaxFunction(torch.autograd.Function):
    generate_vmap_rule = True  # its ops have vmap rules (_ops.py)

    @staticmethod
    def forward(x, log, dtype):
        return _ops.call(_ops.softmax_fwd, x, log, dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, log, _ = inputs
        ctx.log, ctx.in_dtype = log, x.dtype
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: the same J^T dy from torch operations, differentiable again
            return _differentiable_bwd(y, dy, ctx.log).to(ctx.in_dtype), None, None
        return _ops.call(_ops.softmax_bwd, y, dy.to(y.dtype), ctx.log, ctx.in_dtype), None, None


def _differentiable_bwd(y, dy, log):
    """J^T dy with torch operations (so a second derivative is torch's), in the math of
    kernels/softmax.py: softmax dx = p (g - sum g p); log_softmax dx = g - exp(y) sum g."""
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    yy, g = y.to(acc), dy.to(acc)
    if log:
        return g - torch.exp(yy) * g.sum(dim=1, keepdim=True)
    return yy * (g - (g * yy).sum(dim=1, keepdim=True))


def _apply(fn, x, dim, log, dtype):
    dim = check_softmax_args(fn, x, dim)
    x, out_dtype = check_dtype(fn, x, dtype)
    y = _dispatch.apply(_SoftmaxFunction, _as_rows(x, dim), log, out_dtype)
    return y.view(x.shape)


def softmax(input, dim=-1, dtype=None):
    """softmax along ``dim``, like torch.softmax(input, dim, dtype=dtype), with a backward that
    applies the Jacobian diag(p) - p p^T to the upstream gradient without building it.

    Args:
        input: tensor of float16/bfloat16/float32/float64, any shape (0-d and empty included)
            and any strides; arithmetic is fp32 (fp64 for float64).
        dim: int (default -1), the dimension to normalise over.
        dtype: None (default: input's dtype) or the output's floating dtype, as in torch:
            a narrower one rounds the input to it first; a wider one is read from the
            input directly (no copy). The gradient has the input's dtype.

    Returns: a contiguous tensor of the input's shape and of ``dtype``; rows of the input
    that are all -inf, or hold a +inf, give NaN, as in torch.
    """
    return _apply("softmax", input, dim, False, dtype)


def log_softmax(input, dim=-1, dtype=None):
    """log_softmax along ``dim``, like torch.log_softmax(input, dim, dtype=dtype), computed as
    (x - max) - log(sum exp(x - max)) so that it stays exact for large |x|; the backward
    is dx = g - exp(y) * sum(g), O(V) per row.

    Args and returns: as softmax; a -inf entry of a finite row gives -inf.
    """
    return _apply("log_softmax", input, dim, True, dtype)
