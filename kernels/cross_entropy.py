"""Softmax cross-entropy, loss and gradient, one row of logits per program.

The math (one row x of V logits; z = x, or z = c * tanh(x / c) with softcap c,
a -inf logit staying -inf; see _load_z for how tanh stays accurate):

    m = max_j z_j,   d = sum_j exp(z_j - m),   lse = m + log d,   p_j = exp(z_j - lse)

The target is a vector y of per-class weights, w the class weights (1 when
absent), e the label smoothing:

    class index c:       y_j = (1 - e) w_c 1{j = c} + (e / V) w_j      (y = 0 on ignored rows)
    probabilities t:     y_j = w_j ((1 - e) t_j + e / V)

    S = sum_j y_j
    loss   = sum_j y_j (lse - z_j) + z_loss * lse^2
    dl/dz_j = p_j (S + 2 z_loss lse) - y_j              (J^T dl/dp with J = diag(p) - p p^T)
    dl/dx_j = dl/dz_j * (1 - tanh(x_j / c)^2)            (softcap's chain rule)

In the kernels y is split into a sparse part (the coefficient (1 - e) w_c at
column c) and a dense part a_j (everything else); the dense part is only swept
when there is one (label smoothing or probability targets).

The first sweep keeps m and d per lane of the BLOCK_V-wide chunk (lane l sees
columns l, l + BLOCK_V, ...): its own max m_l and s_l = d_l - 1 relative to it,
one exp per element and no block reduction inside the loop. After the loop the
lanes combine like shards of the row, s = d - 1 with the exp(0) = 1 of one max
element never added, so that log d = log1p(s) and 1 - p_max keep their digits
when the prediction is confident.

The loss is accumulated without cancellation: sum_j a_j (lse - z_j) is kept as
B + A log d with A = sum_j a_j and B = sum_j a_j (m - z_j) >= 0, B rescaled
when the running max m grows (options only: one block max and one block sum per
chunk). The row's max and log d are saved separately, so that
p_j = exp((z_j - m) - log d) stays accurate for logits of any size.

Exponentials are exp2 of an argument scaled by log2 e (one MUFU.EX2, flushing
results below 2^-126 to zero), except for a few per-row scalars.

Bytes per row, b = element size of the logits, for class-index targets:

    forward only                     reads V b
    fused forward (loss + gradient)  reads V b twice (the second read right after
                                     the first, in the same program: an L2 hit),
                                     writes V b
    backward-time gradient           reads V b, writes V b
    scale_grad                       nothing when the upstream gradient is 1,
                                     else reads and writes V b

plus a few scalars per row; probability targets add one read of the row of t
per sweep, class weights with label smoothing one read of w (from L2).
"""

import torch
import triton
import triton.language as tl

from . import tuning
from .reduction import reduction_scale

_LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x log2 e): exp2 is one MUFU.EX2
_FLT_MAX = tl.constexpr(3.4028234663852886e38)
_FLT_MAX_PY = 3.4028234663852886e38
_TWO_M64 = tl.constexpr(2.0 ** -64)
_TWO_P64 = tl.constexpr(2.0 ** 64)
_NO_COLUMN = tl.constexpr(2 ** 31 - 1)  # an argmax sentinel above every column


@triton.jit
def _fp32_options(label_smoothing, z_loss):
    """The runtime scalars label_smoothing and z_loss as fp32, at a kernel's entry: they are
    fp32 arguments on the GPU (a no-op there), but Triton's interpreter takes a subnormal
    one for an fp64 constant (see _load_xz), whose arithmetic a bf16 store then loses."""
    return tl.cast(label_smoothing, tl.float32), tl.cast(z_loss, tl.float32)


@triton.jit
def _load_z(row_ptr, cols, mask, stride_col, inv_softcap, HAS_SOFTCAP: tl.constexpr):
    """(z, dz/dx) of a chunk of one row (see _load_xz)."""
    _, z, dz = _load_xz(row_ptr, cols, mask, stride_col, inv_softcap, HAS_SOFTCAP)
    return z, dz


@triton.jit
def _load_xz(row_ptr, cols, mask, stride_col, inv_softcap, HAS_SOFTCAP: tl.constexpr):
    """Load a chunk of one row as fp32 and apply the softcap; masked lanes are -inf.

    Returns (x, z, dz/dx). inv_softcap is k = 1/c (see softcap_scalar). With u = k x:

        |u| < 1/4:  z = x * tanh(u)/u, the odd Taylor series to u^9 (relative error < 1e-8:
                    no cancellation for small |x| / c, and exact in the limit c -> inf)
        else:       z = sign(x) c (1 - e) / (1 + e),  e = exp(-2 |u|)
        dz/dx = 1 - tanh(u)^2 = 4 e / (1 + e)^2, never 1 - t^2 (which cancels for large |u|)

    A -inf logit (vocabulary padding) stays -inf and gets derivative 0. One MUFU.EX2 and one
    approximate reciprocal (2 ulp, see _div) per element; the one scalar division makes c.
    """
    x = tl.load(row_ptr + cols.to(tl.int64) * stride_col, mask=mask, other=float("-inf"))
    x = x.to(tl.float32)
    if HAS_SOFTCAP:
        # k is an fp32 argument on the GPU; the interpreter would make a subnormal k (c above
        # 2^126) an fp64 constant and, with it, the whole chunk's arithmetic and stored gradient
        inv_softcap = tl.cast(inv_softcap, tl.float32)
        u = x * inv_softcap
        u2 = u * u
        # tanh(u)/u = 1 - u^2/3 + 2u^4/15 - 17u^6/315 + 62u^8/2835 (next term < 1e-8 at 1/4)
        r = 1.0 + u2 * (-0.3333333333333333 + u2 * (0.13333333333333333 + u2 * (
            -0.05396825396825397 + u2 * 0.021869488536155203)))
        # e = exp(-2 |u|) = exp2(-2 log2(e) |u|); flushed to 0 below 2^-126, where t = 1
        e = tl.math.exp2(tl.abs(u) * (-2.0 * _LOG2E))
        q = _div(1.0, 1.0 + e)
        t = (1.0 - e) * q
        # c tanh(|u|) <= |x| is finite, but c = 1/k overflows fp32 when k < 2^-128: above
        # 2^64, c enters as c 2^-64 and the product is scaled back (exact, as a power of 2)
        huge_c = inv_softcap < _TWO_M64
        c_scaled = _div(tl.where(huge_c, _TWO_M64, 1.0), inv_softcap)
        z_big = (tl.where(x < 0.0, -t, t) * c_scaled) * tl.where(huge_c, _TWO_P64, 1.0)
        is_pad = x == float("-inf")
        z = tl.where(is_pad, x, tl.where(tl.abs(u) < 0.25, x * r, z_big))
        dz = tl.where(is_pad, 0.0, 4.0 * e * q * q)
    else:
        z = x
        dz = 1.0
    return x, z, dz


@triton.jit
def _div(a, b):
    """a / b to 2 ulp without IEEE division's slow-path call (whose call frame shows up as
    local memory in the SASS); every quotient here is a scalar of an fp32 formula."""
    return tl.fdiv(a * 1.0, b * 1.0, ieee_rounding=False)  # * 1.0: fdiv takes floats only


@triton.jit
def _log1p(s):
    """log(1 + s), accurate for small s (Goldberg: log(u) * s / (u - 1) with u = 1 + s)."""
    u = 1.0 + s
    return tl.where(u == 1.0, s, tl.log(u) * _div(s, u - 1.0))


@triton.jit
def _expm1(x):
    """exp(x) - 1, accurate for small x (Kahan: (u - 1) * x / log(u) with u = exp(x))."""
    u = tl.exp(x)
    return tl.where(u == 1.0, x, tl.where(u - 1.0 == -1.0, -1.0, (u - 1.0) * _div(x, tl.log(u))))


@triton.jit
def _add2(a0, b0, a1, b1):
    return a0 + a1, b0 + b1


@triton.jit
def _add3(a0, b0, c0, a1, b1, c1):
    return a0 + a1, b0 + b1, c0 + c1


@triton.jit
def _dense_target(t_row_ptr, weight_ptr, cols, mask, stride_t_col, label_smoothing, V,
                  HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr):
    """The dense part a_j of the target row for a chunk of columns (0 on masked lanes)."""
    if PROB_TARGET:
        t = tl.load(t_row_ptr + cols.to(tl.int64) * stride_t_col, mask=mask, other=0.0)
        a = (1.0 - label_smoothing) * t.to(tl.float32) + _div(label_smoothing, V)
    else:
        a = tl.zeros(cols.shape, tl.float32) + _div(label_smoothing, V)
    if HAS_WEIGHT:
        a = a * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, a, 0.0)


@triton.jit
def _sparse_target(target_ptr, weight_ptr, row, stride_t_row, V, ignore_index, label_smoothing,
                   HAS_WEIGHT: tl.constexpr):
    """(valid, c, w_c, coef_c) of a class-index row: coef_c = (1 - e) w_c, 0 when ignored.

    c is clamped into [0, V) for the loads; ids out of range are refused before
    the launch (on CPU) or by a device-side assert (on CUDA), so the clamp only
    keeps a bad id from reading outside the row.
    """
    c = tl.load(target_ptr + row * stride_t_row).to(tl.int64)
    valid = c != ignore_index
    c = tl.where(valid & (c >= 0) & (c < V), c, 0)
    if HAS_WEIGHT:
        w_c = tl.load(weight_ptr + c).to(tl.float32)
    else:
        w_c = 1.0
    coef_c = tl.where(valid, (1.0 - label_smoothing) * w_c, 0.0)
    return valid, c, w_c, coef_c


@triton.jit
def _row_target(target_ptr, weight_ptr, row, stride_t_row, V, ignore_index, label_smoothing,
                HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr):
    """(valid, c, w_c, coef_c) of any row: _sparse_target's for class ids; for probability
    targets always valid, no target column (c = -1) and no sparse part (w_c = coef_c = 0)."""
    if PROB_TARGET:
        valid = row >= 0  # always true: probability targets have no ignore_index
        c = row * 0 - 1
        w_c = 0.0
        coef_c = 0.0
    else:
        valid, c, w_c, coef_c = _sparse_target(target_ptr, weight_ptr, row, stride_t_row, V,
                                               ignore_index, label_smoothing, HAS_WEIGHT)
    return valid, c, w_c, coef_c


@triton.jit
def _target_column_grad(z_c, dz_c, m, logd, coef_c, coef_p, w_c, label_smoothing, V, scale,
                        HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """The gradient of a class-index row's target column c, times scale:
    (1 - e) w_c (p_c - 1) + p_c (S' - (1 - e) w_c) - a_c, with p_c - 1 = expm1(z_c - lse),
    so that a confident prediction (p_c -> 1) keeps the digits of 1 - p_c."""
    u_c = (z_c - m) - logd
    g_c = coef_c * _expm1(u_c) + tl.exp(u_c) * (coef_p - coef_c)
    if HAS_SMOOTHING:
        g_c -= _div(label_smoothing, V) * w_c
    g_c = g_c * scale
    if HAS_SOFTCAP:
        g_c = g_c * dz_c
    return g_c


@triton.jit
def _write_row_grad(x_row_ptr, t_row_ptr, weight_ptr, g_row_ptr, dt_row_ptr,
                    stride_x_col, stride_t_col, stride_g_col, stride_dt_col,
                    V, label_smoothing, z_loss, inv_softcap,
                    valid, c, w_c, coef_c, z_c, dz_c, m, logd, S, scale,
                    HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr,
                    HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
                    WRITE_X: tl.constexpr = True, TARGET_GRAD: tl.constexpr = False):
    """grad_j = scale * (p_j (S + 2 z_loss lse) - y_j) [* softcap'], one sweep over the row.

    WRITE_X: store that gradient of the logits (False when only the target's is wanted).
    TARGET_GRAD (probability targets): also dt_j = scale (1 - e) w_j (lse - z_j), the
    gradient with respect to the target, in the same sweep.

    The target column c of a class-index row is computed once, as a scalar:
    p_c (S') - (1 - e) w_c - a_c = (1 - e) w_c (p_c - 1) + p_c (S' - (1 - e) w_c) - a_c
    with p_c - 1 = expm1(z_c - lse), so that a confident prediction (p_c -> 1) keeps the
    digits of 1 - p_c that p_c - 1 in fp32 would cancel away; only the chunk that holds
    c compares columns with it. An ignored row takes a loop that stores zeros and reads
    nothing.
    """
    lse = m + logd
    coef_p = S
    if HAS_Z_LOSS:
        coef_p = S + tl.where(valid, 2.0 * z_loss * lse, 0.0)
    c32 = c.to(tl.int32)  # in [0, V) or -1 (no column): cols are int32
    g_c = 0.0
    if not PROB_TARGET:
        g_c = _target_column_grad(z_c, dz_c, m, logd, coef_c, coef_p, w_c, label_smoothing, V,
                                  scale, HAS_SMOOTHING, HAS_SOFTCAP)
    if valid:
        # p_j = exp2((z_j - m) log2 e - log d log2 e): z_j - m is exact near the max (where
        # p_j is large), the rest one FFMA into the MUFU
        logd2 = logd * _LOG2E
        k = coef_p * scale
        k_t = (1.0 - label_smoothing) * scale
        for off in range(0, V, BLOCK_V):
            cols = off + tl.arange(0, BLOCK_V)
            in_row = cols < V
            z, dz = _load_z(x_row_ptr, cols, in_row, stride_x_col, inv_softcap, HAS_SOFTCAP)
            if WRITE_X:
                p = tl.math.exp2((z - m) * _LOG2E - logd2)
                if PROB_TARGET or HAS_SMOOTHING:
                    a = _dense_target(t_row_ptr, weight_ptr, cols, in_row, stride_t_col,
                                      label_smoothing, V, HAS_WEIGHT, PROB_TARGET)
                    g = (p * coef_p - a) * scale
                else:
                    g = p * k
                if HAS_SOFTCAP:
                    g = g * dz
                if not PROB_TARGET:
                    if (c32 >= off) & (c32 < off + BLOCK_V):  # a scalar test: one chunk
                        g = tl.where(cols == c32, g_c, g)
                tl.store(g_row_ptr + cols.to(tl.int64) * stride_g_col,
                         g.to(g_row_ptr.dtype.element_ty), mask=in_row)
            if TARGET_GRAD:
                # d loss / d t_j = (1 - e) w_j (lse - z_j): lse - z_j >= 0 computed as
                # (m - z_j) + log d, exact near the max; a -inf logit gives inf, as in torch
                dt = k_t * ((m - z) + logd)
                if HAS_WEIGHT:
                    dt = dt * tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
                tl.store(dt_row_ptr + cols.to(tl.int64) * stride_dt_col,
                         dt.to(dt_row_ptr.dtype.element_ty), mask=in_row)
    elif WRITE_X:
        for off in range(0, V, BLOCK_V):
            cols = off + tl.arange(0, BLOCK_V)
            tl.store(g_row_ptr + cols.to(tl.int64) * stride_g_col,
                     tl.zeros([BLOCK_V], g_row_ptr.dtype.element_ty), mask=cols < V)


@triton.jit
def _cross_entropy_fwd_kernel(
    # pointers
    logits_ptr,      # (N, V) fp32/bf16/fp16
    target_ptr,      # (N,) integer class ids, or (N, V) float probabilities if PROB_TARGET
    weight_ptr,      # (V,) class weights, read if HAS_WEIGHT
    stats_ptr,       # (4, N) fp32 out, rows stride_stats apart: per-row loss, max m of z,
                     # log d (lse = m + log d) and S = sum of the target weights
    grad_ptr,        # (N, V) logits dtype out, written if FUSE_GRAD (may alias logits)
    grad_scale_ptr,  # () fp32: factor of the fused gradient (1 / denominator for 'mean');
                     # with OWN_SCALE the (3,) fp32 out that program 0 writes the scale into
    dt_ptr,          # (N, V) target dtype out: d loss / d target, written if TARGET_GRAD
    # strides (in elements)
    stride_x_row, stride_x_col,
    stride_t_row, stride_t_col,
    stride_g_row, stride_g_col,
    stride_dt_row, stride_dt_col,
    stride_stats,
    # sizes
    V, N,
    # runtime scalars
    ignore_index, label_smoothing, z_loss, inv_softcap,
    # constexprs
    HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FUSE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr, STATS: tl.constexpr = False, TARGET_GRAD: tl.constexpr = False,
    OWN_SCALE: tl.constexpr = False, MEAN: tl.constexpr = False, SCALE_BLOCK: tl.constexpr = 1,
):
    """Per-row loss, max, log d and S; with FUSE_GRAD also the row's gradient times *grad_scale,
    with TARGET_GRAD the target's. STATS: rows 4-6 of the stats get lse, the entropy of the
    softmax and whether the argmax is the target (1.0 / 0.0), from the same sweep.

    OWN_SCALE (few rows, kernels/reduction.py): every program computes the reduction's
    [grad_scale, denominator, ok] from all N class ids itself (the same result in each:
    no launch of _loss_scale_kernel before this one), program 0 stores it at grad_scale_ptr.
    MEAN: the reduction is 'mean'. SCALE_BLOCK: ids read per step (a power of 2)."""
    label_smoothing, z_loss = _fp32_options(label_smoothing, z_loss)
    row = tl.program_id(0).to(tl.int64)
    x_row_ptr = logits_ptr + row * stride_x_row
    t_row_ptr = target_ptr + row * stride_t_row
    valid, c, w_c, coef_c = _row_target(target_ptr, weight_ptr, row, stride_t_row, V,
                                        ignore_index, label_smoothing, HAS_WEIGHT, PROB_TARGET)

    n_read = tl.where(valid, V, 0)  # an ignored row reads nothing
    # Per-lane state: lane l sees one element of each chunk and keeps its own running max
    # m_l and s_l = d_l - 1 relative to it (d_l = sum over its elements of exp(z_j - m_l)),
    # so the sweep needs no block reduction (no barrier, no shuffle) until the row ends.
    # A lane with no element yet is m_l = -FLT_MAX, s_l = -1 (d_l = 0): finite, so that
    # z - m_l is never -inf - -inf, and a -inf logit adds exp(-inf) = 0.
    m_l = tl.full([BLOCK_V], -_FLT_MAX, tl.float32)
    s_l = tl.full([BLOCK_V], -1.0, tl.float32)
    # the dense sums (options only) stay block reductions, against the row's running max:
    # per-lane A and B would hold two more registers per element, past the budget
    m_row = -float("inf")
    A = 0.0  # sum_j a_j
    B = 0.0  # sum_j a_j (m_row - z_j) >= 0
    if STATS:
        # per lane: T_l = sum of exp(z_j - m_l) (z_j - m_l) <= 0 (the entropy's sum), and the
        # first column of the lane's largest logit (of the target row's, for probabilities)
        T_l = tl.zeros([BLOCK_V], tl.float32)
        i_l = tl.full([BLOCK_V], _NO_COLUMN, tl.int32)
        if HAS_SOFTCAP:  # the argmax is of the logits, which the capped z may tie
            x_l = tl.full([BLOCK_V], -float("inf"), tl.float32)
        if PROB_TARGET:
            tv_l = tl.full([BLOCK_V], -float("inf"), tl.float32)
            ti_l = tl.full([BLOCK_V], _NO_COLUMN, tl.int32)
    for off in range(0, V, BLOCK_V):
        cols = off + tl.arange(0, BLOCK_V)
        in_row = cols < V
        x, z, dz = _load_xz(x_row_ptr, cols, cols < n_read, stride_x_col, inv_softcap,
                            HAS_SOFTCAP)
        delta = z - m_l
        t = tl.math.exp2(-tl.abs(delta) * _LOG2E)  # exp(-|z - m_l|): one exp either way
        if STATS:
            # a new lane max rescales the old terms: T' = e^-delta (T - delta d_l), d_l = 1 + s_l;
            # an element below it adds e^delta delta (0 for a -inf logit, and for an empty lane)
            T_l = tl.where(delta > 0.0,
                           tl.where(s_l > -1.0, t * (T_l - delta * (1.0 + s_l)), 0.0),
                           T_l + tl.where(z == -float("inf"), 0.0, t * delta))
            # strictly greater: the earliest column of a tie stays, as torch.argmax's
            if HAS_SOFTCAP:
                better = x > x_l
                x_l = tl.where(better, x, x_l)
            else:  # z is x: the lane max m_l is the argmax's value too
                better = delta > 0.0
            i_l = tl.where(better, cols, i_l)
            if PROB_TARGET:
                tv = tl.load(t_row_ptr + cols.to(tl.int64) * stride_t_col, mask=in_row,
                             other=-float("inf")).to(tl.float32)
                t_better = tv > tv_l
                tv_l = tl.where(t_better, tv, tv_l)
                ti_l = tl.where(t_better, cols, ti_l)
        # z above the lane max: the old max's 1 joins the sum, all of it scaled by
        # exp(m_l - z), and z is the new max (adds no 1); else z adds exp(z - m_l), exactly
        # 1 when it ties the max: s_l keeps the digits of d_l - 1
        s_l = tl.where(delta > 0.0, s_l * t + t, s_l + t)
        m_l = tl.maximum(m_l, z)
        if PROB_TARGET or HAS_SMOOTHING:
            a = _dense_target(t_row_ptr, weight_ptr, cols, in_row, stride_t_col, label_smoothing,
                              V, HAS_WEIGHT, PROB_TARGET)
            m_new = tl.maximum(m_row, tl.max(z, axis=0))
            # the terms so far each grow by m_new - m_row (none yet: inf * 0 must not make a
            # NaN); a -inf logit with a_j > 0 makes B infinite, as in torch
            B += tl.where((m_new > m_row) & (A != 0.0), (m_new - m_row) * A, 0.0)
            term = tl.where(z == -float("inf"), float("inf"), a * (m_new - z))
            dB, dA = tl.reduce((tl.where(a == 0.0, 0.0, term), a), 0, _add2)
            B += dB
            A += dA
            m_row = m_new

    # combine the lanes like shards of the row: with m = max_l m_l, a lane at the max brings
    # its s_l and (but for one such lane) its 1; any other lane (1 + s_l) exp(m_l - m) < 1 + s_l
    m = tl.max(m_l, axis=0)
    top = m_l == m
    s_top, n_top, rest = tl.reduce((tl.where(top, s_l, 0.0), top.to(tl.float32),
                                    tl.where(top, 0.0, (1.0 + s_l) * tl.exp(m_l - m))), 0, _add3)
    s = s_top + ((n_top - 1.0) + rest)
    # s = -1 (d = 0): no finite logit (or an ignored row, which read none); its max is -inf
    m = tl.where(s < 0.0, -float("inf"), m)
    logd = _log1p(s)
    # a +inf logit: torch's log-softmax is NaN (inf - inf), whatever chunk it sits in
    logd = tl.where(m == float("inf"), float("nan"), logd)
    lse = m + logd

    # loss = coef_c (lse - z_c) + B + A log d (+ z_loss lse^2)
    loss = 0.0
    z_c = 0.0
    dz_c = 0.0
    if not PROB_TARGET:
        z_c, dz_c = _load_z(x_row_ptr, c, valid, stride_x_col, inv_softcap, HAS_SOFTCAP)
        loss = tl.where(valid, coef_c * ((m - z_c) + logd), 0.0)
    if PROB_TARGET or HAS_SMOOTHING:
        loss += tl.where(valid, B + A * logd, 0.0)
    if HAS_Z_LOSS:
        loss += tl.where(valid, z_loss * lse * lse, 0.0)
    S = tl.where(valid, coef_c + A, 0.0)
    tl.store(stats_ptr + row, loss)
    tl.store(stats_ptr + stride_stats + row, m)
    tl.store(stats_ptr + 2 * stride_stats + row, logd)
    tl.store(stats_ptr + 3 * stride_stats + row, S)
    if STATS:
        # the lanes' T relative to m (a lane with no element brings nothing), then
        # H = lse - sum_j p_j z_j = log d - T / d: a sum of two terms >= 0
        T = tl.sum(tl.where(s_l > -1.0, tl.exp(m_l - m) * (T_l + (m_l - m) * (1.0 + s_l)), 0.0),
                   axis=0)
        entropy = logd - _div(T, 1.0 + s)
        if HAS_SOFTCAP:
            best = tl.min(tl.where(x_l == tl.max(x_l, axis=0), i_l, _NO_COLUMN), axis=0)
        else:
            best = tl.min(tl.where(m_l == tl.max(m_l, axis=0), i_l, _NO_COLUMN), axis=0)
        best = tl.where(best == _NO_COLUMN, 0, best)  # every logit -inf: torch.argmax says 0
        if PROB_TARGET:
            t_best = tl.min(tl.where(tv_l == tl.max(tv_l, axis=0), ti_l, _NO_COLUMN), axis=0)
            hit = best == tl.where(t_best == _NO_COLUMN, 0, t_best)
        else:
            hit = best.to(tl.int64) == c
        # an ignored row read nothing: its lse and entropy are NaN, and it is never correct
        tl.store(stats_ptr + 4 * stride_stats + row, tl.where(valid, lse, float("nan")))
        tl.store(stats_ptr + 5 * stride_stats + row, tl.where(valid, entropy, float("nan")))
        tl.store(stats_ptr + 6 * stride_stats + row, (valid & hit).to(tl.float32))

    if OWN_SCALE:
        scale, denom, ok = reduction_scale(target_ptr, weight_ptr, stride_t_row, N, V,
                                           ignore_index, MEAN, PROB_TARGET, HAS_WEIGHT,
                                           SCALE_BLOCK)
        first = row == 0
        tl.store(grad_scale_ptr, scale, mask=first)
        tl.store(grad_scale_ptr + 1, denom, mask=first)
        tl.store(grad_scale_ptr + 2, ok, mask=first)
    elif FUSE_GRAD or TARGET_GRAD:
        scale = tl.load(grad_scale_ptr).to(tl.float32)
    if FUSE_GRAD or TARGET_GRAD:
        # the same program sweeps the row again at once: its bytes are still in L2
        _write_row_grad(x_row_ptr, t_row_ptr, weight_ptr, grad_ptr + row * stride_g_row,
                        dt_ptr + row * stride_dt_row,
                        stride_x_col, stride_t_col, stride_g_col, stride_dt_col,
                        V, label_smoothing, z_loss, inv_softcap,
                        valid, c, w_c, coef_c, z_c, dz_c, m, logd, S, scale,
                        HAS_WEIGHT, PROB_TARGET, HAS_SMOOTHING, HAS_Z_LOSS, HAS_SOFTCAP, BLOCK_V,
                        FUSE_GRAD, TARGET_GRAD)


@triton.jit
def _cross_entropy_bwd_kernel(
    # pointers
    logits_ptr,      # (N, V) fp32/bf16/fp16
    target_ptr,      # (N,) integer class ids, or (N, V) float probabilities if PROB_TARGET
    weight_ptr,      # (V,) class weights, read if HAS_WEIGHT
    stats_ptr,       # (4, N) fp32, rows stride_stats apart: the forward's per-row stats
                     # (loss, max, log d, S; the loss is not read)
    dloss_ptr,       # (N,) upstream gradient per row, or () with stride_dloss = 0
    grad_scale_ptr,  # () fp32: reduction factor (1 / denominator for 'mean', else 1)
    grad_ptr,        # (N, V) logits dtype out (may alias logits), written if WRITE_X
    dt_ptr,          # (N, V) target dtype out: d loss / d target, written if TARGET_GRAD
    # strides (in elements)
    stride_x_row, stride_x_col,
    stride_t_row, stride_t_col,
    stride_g_row, stride_g_col,
    stride_dt_row, stride_dt_col,
    stride_dloss, stride_stats,
    # sizes
    V,
    # runtime scalars
    ignore_index, label_smoothing, z_loss, inv_softcap,
    # constexprs
    HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
    WRITE_X: tl.constexpr = True, TARGET_GRAD: tl.constexpr = False,
):
    """grad = dloss[row] * grad_scale * dl/dx for one row, from the saved max, log d and S;
    with TARGET_GRAD also the target's gradient (see _write_row_grad)."""
    label_smoothing, z_loss = _fp32_options(label_smoothing, z_loss)
    row = tl.program_id(0).to(tl.int64)
    x_row_ptr = logits_ptr + row * stride_x_row
    z_c = 0.0
    dz_c = 0.0
    valid, c, w_c, coef_c = _row_target(target_ptr, weight_ptr, row, stride_t_row, V,
                                        ignore_index, label_smoothing, HAS_WEIGHT, PROB_TARGET)
    if not PROB_TARGET:
        z_c, dz_c = _load_z(x_row_ptr, c, valid, stride_x_col, inv_softcap, HAS_SOFTCAP)
    m = tl.load(stats_ptr + stride_stats + row)
    logd = tl.load(stats_ptr + 2 * stride_stats + row)
    S = tl.load(stats_ptr + 3 * stride_stats + row)
    scale = tl.load(dloss_ptr + row * stride_dloss).to(tl.float32) * tl.load(grad_scale_ptr)
    _write_row_grad(x_row_ptr, target_ptr + row * stride_t_row, weight_ptr,
                    grad_ptr + row * stride_g_row, dt_ptr + row * stride_dt_row,
                    stride_x_col, stride_t_col, stride_g_col, stride_dt_col,
                    V, label_smoothing, z_loss, inv_softcap,
                    valid, c, w_c, coef_c, z_c, dz_c, m, logd, S, scale,
                    HAS_WEIGHT, PROB_TARGET, HAS_SMOOTHING, HAS_Z_LOSS, HAS_SOFTCAP, BLOCK_V,
                    WRITE_X, TARGET_GRAD)


@triton.jit
def _scale_grad_kernel(
    grad_ptr,        # (N, V) gradient made in forward, scaled in place
    dloss_ptr,       # () upstream gradient
    stride_row, stride_col,
    V,
    BLOCK_V: tl.constexpr,
):
    """grad *= dloss, decided on the device: when dloss == 1 no byte of grad is touched.

    An exact zero (an ignored row's gradient) stays 0 when dloss is inf or NaN (a loss
    scaler's overflow), as torch's gradient of an ignored row does."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(dloss_ptr).to(tl.float32)
    if g != 1.0:
        row_ptr = grad_ptr + row * stride_row
        for off in range(0, V, BLOCK_V):
            cols = off + tl.arange(0, BLOCK_V)
            mask = cols < V
            ptrs = row_ptr + cols.to(tl.int64) * stride_col
            x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(ptrs, tl.where(x == 0.0, x, x * g).to(grad_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def softcap_scalar(softcap):
    """The runtime scalar the kernels take for the softcap c: k = 1/c (0.0 when off).

    1/c, not c: z = x tanh(k x) / (k x) stays exact as c grows (k -> 0 gives z = x), and a
    c beyond fp32's range becomes a tiny k instead of an infinite c.
    """
    # a c below 2^-128 would make 1/c overflow fp32 (and a logit of 0 times it NaN): k is
    # held at fp32's largest value, z = c sign(x) then to within 3e-39 absolute
    return 0.0 if softcap is None else min(1.0 / float(softcap), _FLT_MAX_PY)


def _flags(target, weight, label_smoothing, z_loss, softcap):
    """The option constexprs of a launch."""
    return dict(
        HAS_WEIGHT=weight is not None,
        PROB_TARGET=target.is_floating_point(),
        HAS_SMOOTHING=label_smoothing > 0.0,
        HAS_Z_LOSS=z_loss > 0.0,
        HAS_SOFTCAP=softcap is not None,
    )


def _target_strides(target):
    if target.dim() == 2:
        return target.stride()
    return target.stride(0), 0


# The constexprs of a launch (the option flags, BLOCK_V, num_warps, ...) depend on a few
# booleans and the row's length only: built once per such key and kept, as the values in the
# kernel's parameter order (the names below), passed positionally with num_warps the only
# keyword. A launch then costs one dict lookup instead of a dozen small calls, and hands the
# launch machinery no dict of a dozen keywords to copy (softmax-ce-bench overhead). Not
# kept while tuning.use_row_config overrides the table (bench/sweep.py), which they would
# hide. tests/test_cross_entropy.py checks the names against the kernels' signatures.
FWD_CONSTEXPRS = ("HAS_WEIGHT", "PROB_TARGET", "HAS_SMOOTHING", "HAS_Z_LOSS", "HAS_SOFTCAP",
                  "FUSE_GRAD", "BLOCK_V", "STATS", "TARGET_GRAD", "OWN_SCALE", "MEAN",
                  "SCALE_BLOCK")
BWD_CONSTEXPRS = ("HAS_WEIGHT", "PROB_TARGET", "HAS_SMOOTHING", "HAS_Z_LOSS", "HAS_SOFTCAP",
                  "BLOCK_V", "WRITE_X", "TARGET_GRAD")
_META = {}  # launch key -> (constexpr values in the kernel's order, num_warps)
_ROW_OVERRIDES = tuning._row_overrides  # use_row_config's stack (one list, never rebound)

# own_scale (the host asks for it for few rows, softmax_ce_gpu/_ops.py): each program of the
# loss launch reads every class id (2 KB of int64 ids for 256 rows, from L2 after the first
# program) to make the reduction's scale itself, which saves the launch of
# _loss_scale_kernel before it; the ids are read in blocks of OWN_SCALE_BLOCK
OWN_SCALE_BLOCK = 256


def _launch_meta(key, target, weight, label_smoothing, z_loss, softcap):
    """(constexpr values, num_warps) of a forward ("fwd") or backward ("bwd") launch, for
    key = (kind, V, element_size, target is probabilities, weight given, label_smoothing > 0,
    z_loss > 0, softcap given, target_grad, with_stats, fuse, own_scale); the launchers look
    it up in _META themselves and call this on a miss, or while use_row_config is in force
    (tuning.row_config_overridden(): _ROW_OVERRIDES not empty)."""
    kind, V, element_size, _, _, _, _, _, target_grad, with_stats, fuse, own_scale = key
    flags = _flags(target, weight, label_smoothing, z_loss, softcap)
    heavy = any(flags.values()) or target_grad
    if kind == "fwd":
        block, num_warps = tuning.row_config(V, element_size, heavy, with_stats)
        named = dict(flags, FUSE_GRAD=fuse, BLOCK_V=block, STATS=with_stats,
                     TARGET_GRAD=target_grad, OWN_SCALE=own_scale is not None,
                     MEAN=bool(own_scale), SCALE_BLOCK=OWN_SCALE_BLOCK)
        names = FWD_CONSTEXPRS
    else:
        block, num_warps = tuning.row_config(V, element_size, heavy)
        named = dict(flags, BLOCK_V=block, WRITE_X=fuse, TARGET_GRAD=target_grad)
        names = BWD_CONSTEXPRS
    meta = tuple(named[n] for n in names), num_warps
    if not _ROW_OVERRIDES:
        _META[key] = meta
    return meta


def cross_entropy_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                      grad=None, grad_scale=None, stats=None, with_stats=False, dtarget=None,
                      own_scale=None):
    """Per-row loss, max, log d and S of 2-D logits; with ``grad``, also the fused gradient.

    Preconditions (checked by the host code, not here): logits (N, V) fp32/bf16/fp16 with
    any strides; target (N,) integer ids in [0, V) or ignore_index, or (N, V) float
    probabilities; weight None or (V,) contiguous; all on one device; N >= 1.
    grad: None, or an (N, V) tensor of the logits' dtype (it may be the logits themselves)
    that receives grad_scale * dl/dx; grad_scale: an fp32 tensor on the same device whose
    first element is the factor (a () tensor, or loss_scale's (3,)).
    stats: None, or a (4, N) fp32 tensor ((7, N) with with_stats) with unit column stride
    to write the stats into. with_stats: rows 4-6 get lse, the entropy and whether the
    argmax is the target (1.0 / 0.0). dtarget: None, or an (N, V) tensor of the
    probability target's dtype that receives grad_scale * d loss / d target.
    own_scale: None (grad_scale is read), or the reduction's ``mean`` flag: the launch then
    makes what reduction.loss_scale would (grad_scale, denominator, ok) into grad_scale, a
    (3,) fp32 tensor, every program from all N ids (meant for few rows).

    Returns the (4, N) ((7, N)) fp32 stats whose rows are the per-row loss, max, log d and S
    (then lse, entropy, correct).

    Every argument may be given by position (the host's own call does: keywords cost host
    time on every call); the reference backend's cross_entropy_fwd takes them in the same order.
    """
    N, V = logits.shape
    prob = target.is_floating_point()
    if stats is None:  # one allocation for all the per-row outputs
        stats = logits.new_empty(7 if with_stats else 4, N, dtype=torch.float32)
        stride_stats = N
    else:
        stride_stats = stats.stride(0)
    fuse = grad is not None
    if not fuse:
        grad = logits  # not written: FUSE_GRAD=False
    if grad_scale is None:
        grad_scale = stats  # not read
    key = ("fwd", V, logits.element_size(), prob, weight is not None, label_smoothing > 0.0,
           z_loss > 0.0, softcap is not None, dtarget is not None, with_stats, fuse, own_scale)
    meta = _META.get(key)
    if meta is None or _ROW_OVERRIDES:
        meta = _launch_meta(key, target, weight, label_smoothing, z_loss, softcap)
    consts, num_warps = meta
    stride_x_row, stride_x_col = logits.stride()
    if prob:
        stride_t_row, stride_t_col = target.stride()
    else:
        stride_t_row, stride_t_col = target.stride(0), 0
    stride_g_row, stride_g_col = grad.stride() if fuse else (0, 0)
    if dtarget is None:  # not written: TARGET_GRAD=False
        dtarget, stride_dt_row, stride_dt_col = logits, 0, 0
    else:
        stride_dt_row, stride_dt_col = dtarget.stride()
    _cross_entropy_fwd_kernel[(N,)](
        logits, target, stats if weight is None else weight, stats, grad, grad_scale, dtarget,
        stride_x_row, stride_x_col, stride_t_row, stride_t_col,
        stride_g_row, stride_g_col, stride_dt_row, stride_dt_col, stride_stats,
        V, N,
        ignore_index, float(label_smoothing), float(z_loss), softcap_scalar(softcap), *consts,
        num_warps=num_warps,
    )
    return stats


def cross_entropy_bwd(logits, target, weight, stats, dloss, grad_scale, grad, ignore_index,
                      label_smoothing, z_loss, softcap, dtarget=None):
    """Write grad = dloss * grad_scale * dl/dx from the forward's saved rows.

    Preconditions: as cross_entropy_fwd; stats the (4, N) fp32 tensor it returned (or a view
    with unit column stride); dloss (N,) (one upstream gradient per row) or () (one for all rows);
    grad_scale as in cross_entropy_fwd; grad None or (N, V) of the logits' dtype (it may be
    the logits themselves); dtarget None or (N, V) of the probability target's dtype, which receives
    dloss * grad_scale * d loss / d target. At least one of grad and dtarget.
    """
    N, V = logits.shape
    target_grad = dtarget is not None
    write_x = grad is not None
    prob = target.is_floating_point()
    key = ("bwd", V, logits.element_size(), prob, weight is not None, label_smoothing > 0.0,
           z_loss > 0.0, softcap is not None, target_grad, False, write_x, None)
    meta = _META.get(key)
    if meta is None or _ROW_OVERRIDES:
        meta = _launch_meta(key, target, weight, label_smoothing, z_loss, softcap)
    consts, num_warps = meta
    stride_t_row, stride_t_col = target.stride() if prob else (target.stride(0), 0)
    stride_dloss = dloss.stride(0) if dloss.dim() == 1 else 0
    g = grad if write_x else logits  # not written without WRITE_X
    dt = dtarget if target_grad else logits  # not written without TARGET_GRAD
    stride_x_row, stride_x_col = logits.stride()
    stride_g_row, stride_g_col = g.stride()
    stride_dt_row, stride_dt_col = dt.stride()
    _cross_entropy_bwd_kernel[(N,)](
        logits, target, stats if weight is None else weight, stats, dloss, grad_scale, g, dt,
        stride_x_row, stride_x_col, stride_t_row, stride_t_col,
        stride_g_row, stride_g_col, stride_dt_row, stride_dt_col, stride_dloss,
        stats.stride(0),
        V,
        ignore_index, float(label_smoothing), float(z_loss), softcap_scalar(softcap), *consts,
        num_warps=num_warps,
    )
    return grad


def scale_grad(grad, dloss):
    """grad *= dloss in place, where dloss is a () tensor; free of memory traffic when it is 1.

    Preconditions: grad (N, V) fp32/bf16/fp16 with N >= 1, any strides; dloss () on its device.
    """
    N, V = grad.shape
    key = ("scale", V, grad.element_size())
    meta = _META.get(key)
    if meta is None or _ROW_OVERRIDES:
        meta = tuning.row_config(V, key[2])  # (BLOCK_V, num_warps)
        if not _ROW_OVERRIDES:
            _META[key] = meta
    stride_row, stride_col = grad.stride()
    _scale_grad_kernel[(N,)](grad, dloss, stride_row, stride_col, V, meta[0], num_warps=meta[1])
    return grad
