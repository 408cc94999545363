"""torch's reduction of a cross-entropy loss, on the device, in two small launches.

Before the loss kernel, one program reads the class ids (and their weights) once:

    grad_scale  = 1 / denominator for 'mean', else 1  (the fused gradient's factor; 0 / 0
                                                       gives torch's NaN mean)
    denominator = sum over non-ignored rows of w_c    (their count without weights;
                                                       N for probability targets)
    ok          = 1 when every id is in [0, V) or ignore_index, else 0: the host raises
                  on CPU (finding the offending id then), asserts on the device on CUDA

so that neither the mean's denominator nor the range check costs a host sync or a row of
small torch operations. For few rows (up to 256, softmax_ce_gpu/_ops.py) the loss launch
runs the same code (reduction_scale) in each of its programs instead of this launch.
After it, one program sums the per-row losses in a fixed order (deterministic) and
divides by the denominator for 'mean', storing the result in the loss dtype.

Bytes: the first reads N ids (+ N weights from L2) and writes 12; the second reads 4 N
and writes one scalar. One program each: N is at most a few hundred thousand rows,
which one SM streams in microseconds, and a single program needs no atomics.
"""

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def reduction_scale(target_ptr, weight_ptr, stride_t, N, V, ignore_index,
                    MEAN: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                    BLOCK: tl.constexpr):
    """(grad_scale, denominator, ok) of a loss over N rows (see the module docstring), read
    by one program; also run by every program of a loss launch that makes its own scale
    (kernels/cross_entropy.py, few rows), each to the same result."""
    acc = tl.zeros([BLOCK], tl.float32)
    bad = tl.zeros([BLOCK], tl.int32)
    if not PROB_TARGET:
        for off in range(0, N, BLOCK):
            rows = off + tl.arange(0, BLOCK).to(tl.int64)
            in_n = rows < N
            c = tl.load(target_ptr + rows * stride_t, mask=in_n, other=0).to(tl.int64)
            valid = in_n & (c != ignore_index)
            in_range = (c >= 0) & (c < V)
            bad |= (valid & ~in_range).to(tl.int32)
            counted = valid & in_range
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + tl.where(counted, c, 0), mask=counted, other=0.0)
                acc += tl.where(counted, w.to(tl.float32), 0.0)
            else:
                acc += counted.to(tl.float32)
    if PROB_TARGET:
        denom = N * 1.0
    else:
        denom = tl.sum(acc, axis=0)
    if MEAN:
        grad_scale = 1.0 / denom
    else:
        grad_scale = denom * 0.0 + 1.0
    return grad_scale, denom, (tl.max(bad, axis=0) == 0).to(tl.float32)


@triton.jit
def _loss_scale_kernel(
    target_ptr,      # (N,) integer class ids (unused with PROB_TARGET)
    weight_ptr,      # (V,) fp32 class weights, read if HAS_WEIGHT
    scale_ptr,       # (3,) fp32 out: grad_scale, denominator, ok (1.0, or 0.0 for a bad id)
    stride_t,
    N, V,
    ignore_index,
    MEAN: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The mean's denominator and grad_scale, and the class-id range check, in one program."""
    grad_scale, denom, ok = reduction_scale(target_ptr, weight_ptr, stride_t, N, V,
                                            ignore_index, MEAN, PROB_TARGET, HAS_WEIGHT, BLOCK)
    tl.store(scale_ptr, grad_scale)
    tl.store(scale_ptr + 1, denom)
    tl.store(scale_ptr + 2, ok)


@triton.jit
def _loss_reduce_kernel(
    loss_ptr,        # (N,) fp32 per-row losses
    scale_ptr,       # (3,) fp32: grad_scale, denominator, ok (from _loss_scale_kernel)
    out_ptr,         # () out, the loss dtype: sum, or sum / denominator if MEAN
    N,
    MEAN: tl.constexpr, BLOCK: tl.constexpr,
):
    """The reduced loss, summed in a fixed order (the same result on every run)."""
    acc = tl.zeros([BLOCK], tl.float32)
    for off in range(0, N, BLOCK):
        rows = off + tl.arange(0, BLOCK)
        acc += tl.load(loss_ptr + rows, mask=rows < N, other=0.0)
    total = tl.sum(acc, axis=0)
    if MEAN:
        total = total / tl.load(scale_ptr + 1)
    tl.store(out_ptr, total.to(out_ptr.dtype.element_ty))


# ----------------------------------------------------------------------------- launchers


def loss_scale(target, weight, *, ignore_index, mean, prob, V, acc=torch.float32, out=None):
    """(3,) fp32 [grad_scale, denominator, ok] of a loss: ok is 1.0 when every class id is in
    [0, V) or ignore_index, else 0.0. grad_scale first: the tensor itself is the grad_scale
    the loss kernels read (their first element), without a view.

    Preconditions: target (N,) integer class ids (any stride; N >= 0) or, with prob,
    anything whose first dimension is N (only N is used); weight None or (V,) contiguous
    fp32; V >= 1; acc fp32 (the kernels accumulate in fp32; the pure-PyTorch path takes
    fp64 too); out None or a (3,) fp32 tensor to write into.
    """
    scale = target.new_empty(3, dtype=torch.float32) if out is None else out
    _loss_scale_kernel[(1,)](
        scale if prob else target, weight if weight is not None else scale, scale,
        0 if prob else target.stride(0),
        target.shape[0], V, ignore_index,
        mean, prob, weight is not None, _BLOCK,  # MEAN, PROB_TARGET, HAS_WEIGHT, BLOCK
        num_warps=4,
    )
    return scale


# (dtype, device) -> a () tensor there, never read or written: loss_reduce makes its output
# empty_like it, which costs two thirds of the host time of new_empty((), dtype=dtype) (a
# shape and a dtype to parse on every call)
_SCALARS = {}


def loss_reduce(loss_rows, scale, mean, dtype):
    """() tensor of ``dtype``: the sum of the per-row losses, divided by the denominator
    scale[1] when ``mean``. loss_rows: (N,) fp32, contiguous, or the (k, N) contiguous stats
    of a loss launch, whose row 0 they are (passed whole: no view to make). The host passes
    every argument by position (keywords cost host time on every call)."""
    key = (dtype, loss_rows.device)
    like = _SCALARS.get(key)
    if like is None:
        like = _SCALARS[key] = loss_rows.new_empty((), dtype=dtype)
    out = torch.empty_like(like)
    _loss_reduce_kernel[(1,)](loss_rows, scale, out, loss_rows.shape[-1], mean, _BLOCK,
                              num_warps=4)  # (MEAN, BLOCK)
    return out
