"""Softmax and log-softmax along one dimension, forward and backward, one row per program.

The math (one row x of V values; y the output, g the upstream gradient dL/dy):

    m = max_j x_j,   d = sum_j exp(x_j - m),   lse = m + log d
    (d is kept as s = d - 1 and log d = log1p(s), as in kernels/cross_entropy.py, so
    that log p_max = -log1p(s) keeps its digits for a dominant entry)
    softmax:       p_j = exp((x_j - m) - log d)
    log_softmax:   y_j = (x_j - m) - log d                     (= log p_j)

    J = dp/dx = diag(p) - p p^T                                (symmetric)
    softmax:       dx = J^T g = p * g - p (p . g) = p * (g - sum_j g_j p_j)
    log_softmax:   d log p_i / dx_j = J_ij / p_i = 1{i=j} - p_j,
                   dx = g - p sum_i g_i = g - exp(y) * sum_i g_i

Neither Jacobian is ever built: the backward is a row sum followed by an
elementwise update, O(V) per row. A row of only -inf gives m = -inf, d = 0 and
NaN everywhere (x - m = NaN), as torch does; a -inf entry in a finite row gives
p = 0 and log p = -inf, and its gradient is 0 (softmax) or g (log_softmax).

Rows are addressed as a 3-D view (outer, V, inner) with one stride per
dimension: row r is (r // inner, r % inner), its columns are stride_col apart.
The last dimension of any 2-D tensor is (N, V, 1); a middle dimension of a
contiguous tensor is (outer, V, inner) with stride_col = inner, swept in place
(no copy, but the loads of one program are then stride_col elements apart and
only coalesce through L2 across neighbouring programs).

Bytes per row, b = element size, a row wider than one block:

    softmax_fwd       reads x twice (the second sweep right after the first, in
                      the same program: an L2 hit), writes y:     HBM ~ 2 V b
    softmax_bwd       reads y and g twice (second sweep from L2), writes dx:
                                                                  HBM ~ 3 V b
    log_softmax_bwd   reads g, then g and y (g again from L2), writes dx:
                                                                  HBM ~ 3 V b

A row that fits one block is swept twice as well; the second sweep is then an
L1/L2 hit of a chunk of at most 16 KiB, so the HBM traffic is the same.
"""

import triton
import triton.language as tl

from .cross_entropy import _log1p
from .tuning import row_config


@triton.jit
def _row_start(ptr, row, n_inner, stride_outer, stride_inner):
    """Pointer to column 0 of row ``row`` of an (outer, V, inner) view."""
    return ptr + (row // n_inner) * stride_outer + (row % n_inner) * stride_inner


@triton.jit
def _softmax_fwd_kernel(
    # pointers
    x_ptr,           # (outer, V, inner) fp32/bf16/fp16 input
    y_ptr,           # (outer, V, inner) fp32/bf16/fp16 out: softmax, or log_softmax if LOG
    # strides (in elements)
    stride_x_outer, stride_x_inner, stride_x_col,
    stride_y_outer, stride_y_inner, stride_y_col,
    # sizes
    V, n_inner,
    # constexprs
    LOG: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """y = softmax(x) (or log_softmax(x) if LOG) along V: an online max/sum sweep, then a
    sweep that writes (x - m) - log d or its exp. Arithmetic in fp32."""
    row = tl.program_id(0).to(tl.int64)
    x_row_ptr = _row_start(x_ptr, row, n_inner, stride_x_outer, stride_x_inner)
    y_row_ptr = _row_start(y_ptr, row, n_inner, stride_y_outer, stride_y_inner)

    m = -float("inf")
    # s = d - 1: the exp(0) = 1 of one max element is never added, so that log d = log1p(s)
    # keeps its digits when one entry dominates (log p_max = -log1p(s) ~ -s, not 0)
    s = -1.0
    for off in range(0, V, BLOCK_V):
        cols = off + tl.arange(0, BLOCK_V)
        x = tl.load(x_row_ptr + cols.to(tl.int64) * stride_x_col, mask=cols < V,
                    other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # a row (so far) of -inf only: keep exponents finite, exp(-inf) = 0
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp(m - m_ref)
        # the lanes holding the max (none while the max is -inf: NaN equals nothing)
        is_top = x == tl.where(m_new == -float("inf"), float("nan"), m_new)
        n_top = tl.sum(is_top.to(tl.float32), axis=0)
        e_rest = tl.sum(tl.where(is_top, 0.0, tl.exp(x - m_ref)), axis=0)
        # d_new = d alpha + n_top + e_rest, written for s = d - 1 with exact small integers
        s = s * alpha + ((alpha + (n_top - 1.0)) + e_rest)
        m = m_new
    # a +inf entry: torch's whole row is NaN (inf - inf), here through log d
    logd = tl.where(m == float("inf"), float("nan"), _log1p(s))

    # the same program sweeps the row again at once: its bytes are still in L2
    for off in range(0, V, BLOCK_V):
        cols = off + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(x_row_ptr + cols.to(tl.int64) * stride_x_col, mask=mask,
                    other=-float("inf")).to(tl.float32)
        # (x - m) first: exact for logits of any size, and NaN for a row of -inf only
        y = (x - m) - logd
        if not LOG:
            y = tl.exp(y)
        tl.store(y_row_ptr + cols.to(tl.int64) * stride_y_col, y.to(y_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _softmax_bwd_kernel(
    # pointers
    y_ptr,           # (outer, V, inner) fp32/bf16/fp16: the forward's output (p, or log p if LOG)
    dy_ptr,          # (outer, V, inner) y's dtype: upstream gradient g = dL/dy
    dx_ptr,          # (outer, V, inner) fp32/bf16/fp16 out: dL/dx
    # strides (in elements)
    stride_y_outer, stride_y_inner, stride_y_col,
    stride_dy_outer, stride_dy_inner, stride_dy_col,
    stride_dx_outer, stride_dx_inner, stride_dx_col,
    # sizes
    V, n_inner,
    # constexprs
    LOG: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """dx = J^T g for one row, J the Jacobian of the forward, never built.

    softmax (LOG=False): J = diag(p) - p p^T is symmetric, so
        dx = J g = diag(p) g - p (p^T g) = p * (g - s),   s = sum_j g_j p_j.
    log_softmax (LOG=True): log p_i = x_i - lse and d lse / dx_j = p_j, so the Jacobian is
        J_ij / p_i = 1{i=j} - p_j, i.e. I - 1 p^T = diag(p)^-1 J, and
        dx = (I - 1 p^T)^T g = g - p (1^T g) = g - exp(y) * s,   s = sum_j g_j.
    First sweep: the scalar s; second sweep: the elementwise update. Arithmetic in fp32.
    """
    row = tl.program_id(0).to(tl.int64)
    y_row_ptr = _row_start(y_ptr, row, n_inner, stride_y_outer, stride_y_inner)
    dy_row_ptr = _row_start(dy_ptr, row, n_inner, stride_dy_outer, stride_dy_inner)
    dx_row_ptr = _row_start(dx_ptr, row, n_inner, stride_dx_outer, stride_dx_inner)

    s = 0.0
    for off in range(0, V, BLOCK_V):
        cols = off + tl.arange(0, BLOCK_V)
        mask = cols < V
        g = tl.load(dy_row_ptr + cols.to(tl.int64) * stride_dy_col, mask=mask,
                    other=0.0).to(tl.float32)
        if LOG:
            s += tl.sum(g, axis=0)
        else:
            p = tl.load(y_row_ptr + cols.to(tl.int64) * stride_y_col, mask=mask,
                        other=0.0).to(tl.float32)
            s += tl.sum(g * p, axis=0)

    # second sweep right after the first, in the same program: g (and p) come from L2
    for off in range(0, V, BLOCK_V):
        cols = off + tl.arange(0, BLOCK_V)
        mask = cols < V
        g = tl.load(dy_row_ptr + cols.to(tl.int64) * stride_dy_col, mask=mask,
                    other=0.0).to(tl.float32)
        y = tl.load(y_row_ptr + cols.to(tl.int64) * stride_y_col, mask=mask,
                    other=0.0).to(tl.float32)
        if LOG:
            dx = g - tl.exp(y) * s
        else:
            dx = y * (g - s)
        tl.store(dx_row_ptr + cols.to(tl.int64) * stride_dx_col, dx.to(dx_ptr.dtype.element_ty),
                 mask=mask)


# ----------------------------------------------------------------------------- launchers


def _row_strides(t):
    """(stride_outer, stride_inner, stride_col) of an (outer, V, inner) tensor.

    With inner = 1 the inner stride is passed as 0: the JIT then sees a multiple of 16
    and keeps the row start aligned, so a contiguous row still gets 16-byte accesses.
    """
    stride_inner = t.stride(2) if t.shape[2] > 1 else 0
    return t.stride(0), stride_inner, t.stride(1)


def softmax_fwd(x, y, *, log):
    """Write softmax(x) (log_softmax if ``log``) along dimension 1 into ``y``; returns y.

    Preconditions (checked by the host code, not here): x (outer, V, inner) fp32/bf16/fp16
    with any strides and at least one element; y a tensor of x's shape and device, of
    fp32/bf16/fp16 (the output dtype), that does not overlap x; log a bool.
    """
    outer, V, inner = x.shape
    block, num_warps = row_config(V, x.element_size())
    _softmax_fwd_kernel[(outer * inner,)](
        x, y,
        *_row_strides(x), *_row_strides(y),
        V, inner,
        LOG=log, BLOCK_V=block, num_warps=num_warps,
    )
    return y


def softmax_bwd(y, dy, dx, *, log):
    """Write dx = J^T dy into ``dx``, J the Jacobian of softmax (log_softmax if ``log``) at the
    forward output ``y``; returns dx.

    Preconditions: y, dy, dx (outer, V, inner) of fp32/bf16/fp16 on one device (dy of y's
    dtype, dx of the forward input's), any strides, at least one element; y the output of
    softmax_fwd with the same ``log``; dx overlaps neither y nor dy.
    """
    outer, V, inner = y.shape
    block, num_warps = row_config(V, y.element_size())
    _softmax_bwd_kernel[(outer * inner,)](
        y, dy, dx,
        *_row_strides(y), *_row_strides(dy), *_row_strides(dx),
        V, inner,
        LOG=log, BLOCK_V=block, num_warps=num_warps,
    )
    return dx
