"""Vocabulary-parallel softmax cross-entropy: the per-shard halves of the loss and gradient.

The vocabulary of V classes is split over the ranks of a process group; rank r holds
the columns [start_r, start_r + W_r) of every row. With the notation of
kernels/cross_entropy.py (z the softcapped logits, e the label smoothing, class-id
targets c, no class weights) the row's loss needs

    M = max_j z_j,   s = sum_j exp(z_j - M) - 1 (one max element's exp(0) left out),
    z_c,   B = sum_j (M - z_j)                                  (label smoothing only)

    loss = (1 - e) ((M - z_c) + log1p(s)) + (e / V) B + e log1p(s) + z_loss lse^2

and each of them is a combination of per-shard partial values:

- forward kernel (this file): per row and shard, m_r = max over the shard, s_r = d_r - 1
  relative to m_r (the same exact-integer bookkeeping as the core kernel, so a
  confident shard keeps the digits of 1 - p_max), z_c if c lies in the shard (-inf
  otherwise), and B_r = sum over the shard of (m_r - z_j) >= 0.
  With STATS (return_stats) the same sweep also gives T_r = sum over the shard of
  exp(z_j - m_r) (m_r - z_j) >= 0, the shard's largest logit x_r (of the logits
  before the softcap, which the capped z may tie) and the global column of its first
  occurrence (NO_ARGMAX when the shard has no logit above -inf).
- host (softmax_ce_gpu/distributed.py): all_reduce MAX of (m_r, z_c) gives M and z_c;
  every rank turns its partial sums into terms relative to M, all of them >= 0, and
  one all_reduce SUM adds them (see there for how s stays accurate). The entropy is
  H = log d + Q / d with Q = sum_r exp(m_r - M) (T_r + d_r (M - m_r)), again a sum of
  terms >= 0; the argmax is the smallest global column among the ranks whose x_r is the
  global max of the logits (one all_reduce MIN).
- backward kernel (this file): the gradient of the shard's columns from the global M,
  log d (and S = 1 on a non-ignored row), through the core's _write_row_grad with the
  class id moved into shard coordinates (-1, matching no column, when c lies elsewhere).

The shard's place is a device tensor ``shard = (start_r, V)`` (int64), so no launch
needs a host copy of it.

Bytes per row, b = element size of the logits, W = shard width:

    forward (partial stats)      reads W b, writes 16 bytes (32 with STATS: T_r, x_r and
                                 the argmax's int64 column)
    backward (gradient)          reads W b and 8 bytes (M, log d), writes W b

The core's fused kernel re-reads a row from L2 right after its sweep; here the
collectives stand between the two sweeps, so the gradient's read comes from HBM:
3 W b per row in all (against the core's 2), still the minimum for a gradient that
needs the global max before it can be written.
"""

import torch
import triton
import triton.language as tl

from .cross_entropy import (_NO_COLUMN, _fp32_options, _load_xz, _load_z, _write_row_grad,
                            softcap_scalar)
from .tuning import row_config

# rows of the forward's (4, N) output, and with STATS of its (6, N) output
ROW_MAX, ROW_ZC, ROW_S, ROW_B, ROW_T, ROW_XMAX = 0, 1, 2, 3, 4, 5
NO_ARGMAX = 2 ** 63 - 1  # the argmax column of a shard without a logit above -inf
_NO_ARGMAX = tl.constexpr(NO_ARGMAX)


@triton.jit
def _shard_target(target_ptr, shard_ptr, row, stride_t, W, ignore_index):
    """(valid, in_shard, c_loc) of a row: c_loc = c - start_r, or -1 when c is not in this shard."""
    c = tl.load(target_ptr + row * stride_t).to(tl.int64)
    start = tl.load(shard_ptr)
    valid = c != ignore_index
    c_loc = c - start
    in_shard = valid & (c_loc >= 0) & (c_loc < W)
    c_loc = tl.where(in_shard, c_loc, -1)
    return valid, in_shard, c_loc


@triton.jit
def _vocab_parallel_fwd_kernel(
    # pointers
    logits_ptr,      # (N, W) fp32/bf16/fp16: this rank's columns
    target_ptr,      # (N,) integer global class ids
    shard_ptr,       # (2,) int64: start_r, V
    part_ptr,        # (4, N) fp32 out: rows m_r, z_c (or -inf), s_r, B_r (0 without smoothing);
                     # (6, N) with STATS: then T_r and x_r
    best_ptr,        # (N,) int64 out, written if STATS: global column of the shard's argmax
                     # (any pointer otherwise)
    # strides (in elements)
    stride_x_row, stride_x_col, stride_t,
    # sizes
    N, W,
    # runtime scalars
    ignore_index, inv_softcap,
    # constexprs
    HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
    STATS: tl.constexpr = False,
):
    """Per-row partial max, s, target logit and B of one shard, in one sweep; with STATS also
    T_r, the largest logit and the global column of its first occurrence."""
    row = tl.program_id(0).to(tl.int64)
    x_row_ptr = logits_ptr + row * stride_x_row
    valid, in_shard, c_loc = _shard_target(target_ptr, shard_ptr, row, stride_t, W, ignore_index)

    n_read = tl.where(valid, W, 0)  # an ignored row reads nothing
    m = -float("inf")
    s = -1.0  # d - 1, as in the core kernel
    B = 0.0   # sum over the columns read so far of (m - z_j)
    if STATS:
        T = 0.0  # sum over the columns read so far of exp(z_j - m) (m - z_j) >= 0
        x_best = -float("inf")  # the largest logit so far, and its first local column
        i_best = tl.full((), _NO_COLUMN, tl.int32)
    for off in range(0, W, BLOCK_V):
        cols = off + tl.arange(0, BLOCK_V)
        in_read = cols < n_read
        x, z, dz = _load_xz(x_row_ptr, cols, in_read, stride_x_col, inv_softcap, HAS_SOFTCAP)
        z_max = tl.max(z, axis=0)
        m_new = tl.maximum(m, z_max)
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp(m - m_ref)
        e = tl.exp(z - m_ref)
        if STATS:
            # the old terms move to the new max: T' = alpha (T + d (m_new - m)), d = 1 + s
            # (nothing read yet, d = 0: nothing to move, and 0 * inf must not make a NaN);
            # a -inf logit adds exp(-inf) * inf := 0
            T = tl.where(s > -1.0, alpha * (T + (1.0 + s) * (m_new - m)), 0.0)
            T += tl.sum(tl.where(z == -float("inf"), 0.0, e * (m_ref - z)), axis=0)
            if HAS_SOFTCAP:
                x_max = tl.max(x, axis=0)
            else:  # z is x
                x_max = z_max
            # strictly greater: the earliest column of a tie stays, as torch.argmax's
            better = x_max > x_best
            i_best = tl.where(better, tl.min(tl.where(x == x_max, cols, _NO_COLUMN), axis=0),
                              i_best)
            x_best = tl.maximum(x_best, x_max)
        is_top = z == tl.where(m_new == -float("inf"), float("nan"), m_new)
        n_top = tl.sum(is_top.to(tl.float32), axis=0)
        e_rest = tl.sum(tl.where(is_top, 0.0, e), axis=0)
        s = s * alpha + ((alpha + (n_top - 1.0)) + e_rest)
        if HAS_SMOOTHING:
            # the columns already summed move by m_new - m each (none read: nothing to move,
            # and inf * 0 must not make a NaN); a -inf logit makes the sum +inf, as in torch
            n_before = tl.minimum(off, n_read).to(tl.float32)
            B += tl.where((m_new > m) & (n_before > 0.0), (m_new - m) * n_before, 0.0)
            term = tl.where(z == -float("inf"), float("inf"), m_new - z)
            B += tl.sum(tl.where(in_read, term, 0.0), axis=0)
        m = m_new

    z_c, dz_c = _load_z(x_row_ptr, tl.maximum(c_loc, 0), in_shard, stride_x_col, inv_softcap,
                        HAS_SOFTCAP)
    tl.store(part_ptr + 0 * N + row, m)
    tl.store(part_ptr + 1 * N + row, z_c)
    tl.store(part_ptr + 2 * N + row, s)
    tl.store(part_ptr + 3 * N + row, B)
    if STATS:
        tl.store(part_ptr + 4 * N + row, T)
        tl.store(part_ptr + 5 * N + row, x_best)
        start = tl.load(shard_ptr)
        tl.store(best_ptr + row, tl.where(i_best == _NO_COLUMN, _NO_ARGMAX,
                                          start + i_best.to(tl.int64)))


@triton.jit
def _vocab_parallel_bwd_kernel(
    # pointers
    logits_ptr,      # (N, W) fp32/bf16/fp16: this rank's columns
    target_ptr,      # (N,) integer global class ids
    shard_ptr,       # (2,) int64: start_r, V
    max_ptr,         # (N,) fp32: global per-row max M
    logd_ptr,        # (N,) fp32: global per-row log d; lse = M + log d
    dloss_ptr,       # (N,) upstream gradient per row, or () with stride_dloss = 0
    grad_scale_ptr,  # () fp32: reduction factor (1 / denominator for 'mean', else 1)
    grad_ptr,        # (N, W) logits dtype out (may alias logits)
    # strides (in elements)
    stride_x_row, stride_x_col, stride_t,
    stride_g_row, stride_g_col,
    stride_dloss,
    # sizes
    W,
    # runtime scalars
    ignore_index, label_smoothing, z_loss, inv_softcap,
    # constexprs
    HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """grad = dloss[row] * grad_scale * dl/dx on this shard's columns of one row."""
    label_smoothing, z_loss = _fp32_options(label_smoothing, z_loss)
    row = tl.program_id(0).to(tl.int64)
    x_row_ptr = logits_ptr + row * stride_x_row
    valid, in_shard, c_loc = _shard_target(target_ptr, shard_ptr, row, stride_t, W, ignore_index)
    # a class id elsewhere is c_loc = -1: _write_row_grad's target column matches no column,
    # and its scalar g_c, computed from z_c = -inf, stays finite (expm1(-inf) = -1, p_c = 0)
    z_c, dz_c = _load_z(x_row_ptr, tl.maximum(c_loc, 0), in_shard, stride_x_col, inv_softcap,
                        HAS_SOFTCAP)
    coef_c = tl.where(valid, 1.0 - label_smoothing, 0.0)
    # _write_row_grad spreads label_smoothing / (its V) over the columns; its V is the shard
    # width W, so pass e W / V to spread the global e / V
    V = tl.load(shard_ptr + 1).to(tl.float32)
    e_shard = label_smoothing / V * W
    m = tl.load(max_ptr + row)
    logd = tl.load(logd_ptr + row)
    S = tl.where(valid, 1.0, 0.0)  # (1 - e) + V (e / V): the target weights sum to 1
    scale = tl.load(dloss_ptr + row * stride_dloss).to(tl.float32) * tl.load(grad_scale_ptr)
    _write_row_grad(x_row_ptr, target_ptr, target_ptr, grad_ptr + row * stride_g_row, grad_ptr,
                    stride_x_col, 0, stride_g_col, 0,
                    W, e_shard, z_loss, inv_softcap,
                    valid, c_loc, 1.0, coef_c, z_c, dz_c, m, logd, S, scale,
                    False, False, HAS_SMOOTHING, HAS_Z_LOSS, HAS_SOFTCAP, BLOCK_V)


# ----------------------------------------------------------------------------- launchers


def vocab_parallel_fwd(logits, target, shard, *, ignore_index, label_smoothing, softcap,
                       with_stats=False, out=None):
    """Per-row partial statistics of one shard of the logits.

    Preconditions (checked by the host code, not here): logits (N, W) fp32/bf16/fp16 with
    any strides, N >= 1; target (N,) integer global class ids, each in [0, V) or
    ignore_index; shard (2,) int64 (start_r, V) on the logits' device.

    Returns a (4, N) fp32 tensor with rows ROW_MAX (m_r, -inf on ignored rows), ROW_ZC
    (z_c when the class id is in the shard, else -inf), ROW_S (s_r = d_r - 1 relative
    to m_r) and ROW_B (sum over the shard of m_r - z_j when label_smoothing > 0, else 0).

    with_stats: False (default). True returns (part, best): part (6, N) with the rows
    ROW_T (T_r = sum over the shard of exp(z_j - m_r) (m_r - z_j)) and ROW_XMAX (the
    shard's largest logit before the softcap) added, and best (N,) int64, the global
    column of that logit's first occurrence (NO_ARGMAX when there is none above -inf,
    as on ignored rows).

    out: None (default: new tensors), or what is returned, to write into: part contiguous
    fp32 of that shape (and best (N,) int64 with unit stride).
    """
    N, W = logits.shape
    if out is None:
        part = torch.empty((6 if with_stats else 4, N), dtype=torch.float32, device=logits.device)
        best = torch.empty(N, dtype=torch.int64, device=logits.device) if with_stats else part
    else:
        part, best = out if with_stats else (out, out)
    block, num_warps = row_config(W, logits.element_size(),
                                  heavy=label_smoothing > 0.0 or softcap is not None)
    _vocab_parallel_fwd_kernel[(N,)](
        logits, target, shard, part, best,
        logits.stride(0), logits.stride(1), target.stride(0),
        N, W,
        ignore_index, softcap_scalar(softcap),
        HAS_SMOOTHING=label_smoothing > 0.0, HAS_SOFTCAP=softcap is not None,
        BLOCK_V=block, num_warps=num_warps, STATS=with_stats,
    )
    return (part, best) if with_stats else part


def vocab_parallel_bwd(logits, target, shard, row_max, row_logd, dloss, grad_scale, grad, *,
                       ignore_index, label_smoothing, z_loss, softcap):
    """Write grad = dloss * grad_scale * dl/dx for this shard's columns.

    Preconditions: as vocab_parallel_fwd; row_max, row_logd (N,) fp32, the global max and
    log d of each row; dloss (N,) or () (one upstream gradient for all rows); grad_scale
    () fp32; grad (N, W) of the logits' dtype (it may be the logits themselves).
    """
    N, W = logits.shape
    block, num_warps = row_config(W, logits.element_size(),
                                  heavy=label_smoothing > 0.0 or z_loss > 0.0 or softcap is not None)
    stride_dloss = dloss.stride(0) if dloss.dim() == 1 else 0
    _vocab_parallel_bwd_kernel[(N,)](
        logits, target, shard, row_max, row_logd, dloss, grad_scale, grad,
        logits.stride(0), logits.stride(1), target.stride(0),
        grad.stride(0), grad.stride(1), stride_dloss,
        W,
        ignore_index, float(label_smoothing), float(z_loss), softcap_scalar(softcap),
        HAS_SMOOTHING=label_smoothing > 0.0, HAS_Z_LOSS=z_loss > 0.0,
        HAS_SOFTCAP=softcap is not None, BLOCK_V=block, num_warps=num_warps,
    )
    return grad
