"""Softmax cross-entropy, loss and gradient, in one pass over HBM: a row split across programs.

The math is kernels/cross_entropy.py's (z, m, d = 1 + s, lse, y = sparse + dense part a,
S, loss, dl/dz, softcap's chain rule); this file changes only who reads what, and when.

A row of V logits is split into K = ceil(V / SEGMENT) segments of SEGMENT columns, one
program each. A program loads its segment once (one tl.load: every thread loads its
share once, no loop) and keeps it in registers: z in fp32, with softcap also dz/dx,
with probability targets also the dense target a (with class ids and label smoothing a
is (e / V) w_j, loaded again after the wait from the class weights, which L2 holds for
all rows). From them it computes its segment's partial statistics, exactly what a lane
of the two-sweep kernel keeps:

    m_k = max of z over the segment (-FLT_MAX when it has no finite logit)
    s_k = d_k - 1,  d_k = sum exp(z_j - m_k)   (-1 when empty: d_k = 0)
    A_k = sum a_j,  B_k = sum a_j (m_k - z_j) >= 0                      (dense targets)

publishes them to an (N, K, NUM_FIELDS) fp32 scratch, waits until all K segments of its
row have published, and combines the K partials as the lanes of a chunk are combined,

    m = max_k m_k,  s = sum_{m_k = m} s_k + (#{m_k = m} - 1) + sum_{m_k < m} (1 + s_k) exp(m_k - m)
    A = sum_k A_k,  B = sum_k B_k + A_k (m - m_k)

so that log d = log1p(s) keeps its digits for a confident prediction. Then it writes its
segment's gradient from the registers. The program whose segment holds the target column
c (segment 0 for probability targets and ignored rows) takes z_c from its registers,
writes the gradient of column c (the expm1 form) and the row's loss, max, log d and S.
K = 1 (the row fits one program) needs no exchange, no scratch and no wait.

Forward progress under any scheduling. A program takes its (row, segment) from an
atomic ticket when it starts, not from program_id: at any moment the started programs
hold tickets 0 .. T-1, a prefix. Every row below the one holding ticket T-1 has all K
of its programs started; a started program is resident until it ends (thread blocks
are never evicted), so those rows publish completely and their programs finish. Only
the newest row can hold programs that wait for programs not yet started, at most K - 1
of them. If the device can hold R >= K programs at once, the R resident programs cannot
all be waiting on that row, so a slot frees (or is free) and the next ticket is taken.
Hence K <= the resident capacity suffices. Kernels running at the same time on other
streams take slots too; the argument holds as long as they end on their own. Launches of
this kernel itself do not: each may park up to K - 1 waiters on its newest row, so L
launches at once (several streams, MPS clients) need L (K - 1) < the resident capacity.
Every compiled configuration fits two programs per SM (the register budget, checked by
tests/test_inspect.py), so the capacity is at least 2 x SMs, and the tuning caps K at half
the SM count: four concurrent launches stay safe.

Memory ordering. Partials are written with plain stores, then the row's counter is
incremented with an atomic of release semantics (gpu scope), which orders the stores
(and this program's loads of its row) before it; it is acq_rel, so that the program
arriving last, which does not wait, acquires the others' releases with it. A waiting
program spins on an atomic of acquire semantics until the counter reaches K (Triton
emits ld.acquire.gpu for the add of 0), and only then loads the partials, with cache
modifier .cg (L2, bypassing L1) so that no stale L1 line can be seen. Triton issues a
scalar atomic and scalar stores from one thread and broadcasts the atomic's result
through shared memory behind a bar.sync, so the stores, the release and the acquire
are in one thread's program order, and the barrier orders the acquire before the other
threads' loads (the SASS shows MEMBAR.GPU before the add and CCTL.IVALL, an L1
invalidation, after each acquire). Every load of a row's logits precedes its program's
release; a program writes its gradient only after its acquire has seen all K releases
of the row: so the gradient may overwrite the logits (inplace_backward).

Ignored rows: every program of the row sees it in the target, reads none of the row
(its loads are masked off), stores zeros and takes no part in the exchange (nobody
waits on that row's counter).

Triton's interpreter runs a launch's programs one after another, so a program waiting
for a later one would wait forever. There the kernel runs as two launches built from
the same helpers: PHASE_PUBLISH (load, partials, publish) and PHASE_FINISH (combine,
write). The registers a program would keep across the wait are carried between the
two launches in an interpreter-only buffer (carry_ptr), so that, as on the GPU, the
second launch reads no logit.

Bytes per row, b = element size of the logits, class-index targets:

    fused forward (loss + gradient)   reads V b once, writes V b once; plus, per segment,
                                      NUM_FIELDS fp32 partials written and the row's K
                                      partials read (K * NUM_FIELDS * 4 * (1 + K) bytes
                                      a row), a 4-byte atomic on the ticket and one on
                                      the row's counter (and a 4-byte load per spin)

Probability targets add one read of the row of t (and of w with class weights); class
weights with class ids and label smoothing two reads of w (from L2: V values for all rows).
"""

import torch
import triton
import triton.language as tl

from ._compat import INTERPRETER
from .cross_entropy import (
    _FLT_MAX,
    _LOG2E,
    _dense_target,
    _flags,
    _fp32_options,
    _load_z,
    _log1p,
    _row_target,
    _target_column_grad,
    _target_strides,
    softcap_scalar,
)
from .tuning import single_config

# PHASE of the kernel (plain ints for the launcher, constexprs for the kernel)
SINGLE, PUBLISH, FINISH = 0, 1, 2
PHASE_SINGLE = tl.constexpr(SINGLE)    # the GPU kernel: publish, wait, combine, write
PHASE_PUBLISH = tl.constexpr(PUBLISH)  # interpreter, launch 1: load, partials, publish, carry out
PHASE_FINISH = tl.constexpr(FINISH)    # interpreter, launch 2: carry in, combine, write

_MIN_BLOCK_K = 32

# fields of one segment's partials (NUM_FIELDS = 2 without a dense target, 4 with one)
_F_M = tl.constexpr(0)
_F_S = tl.constexpr(1)
_F_A = tl.constexpr(2)
_F_B = tl.constexpr(3)


@triton.jit
def _segment_stats(z, a, DENSE: tl.constexpr):
    """(m_k, s_k, A_k, B_k) of one segment held in registers (see the module doc).

    A lane here holds one element, so the two-sweep kernel's running (m_l, s_l) of a
    lane is (z, 0), or (-FLT_MAX, -1) for a -inf (or masked) one; they combine into
    m_k = max z and s_k = (#{z = m_k} - 1) + sum_{z < m_k} exp(z - m_k).
    """
    m = tl.max(z, axis=0)
    top = z == m
    rest = tl.sum(tl.where(top, 0.0, tl.math.exp2((z - m) * _LOG2E)), axis=0)
    n_top = tl.sum(top.to(tl.float32), axis=0)
    s = (n_top - 1.0) + rest
    # max -inf: no finite logit, d = 0 (s = -1), and a finite max for the exchange. tl.max
    # skips NaN, so a segment of NaN and -inf only lands here too; every lane that is not
    # NaN then equals the max (masked lanes are -inf), so fewer than all lanes at the max
    # means a NaN, which must reach the row (as in the two-sweep kernel and torch)
    empty = m == -float("inf")
    s = tl.where(empty, tl.where(n_top < z.shape[0], float("nan"), -1.0), s)
    m = tl.where(empty, -_FLT_MAX, m)
    A = 0.0
    B = 0.0
    if DENSE:
        # a -inf logit with a_j > 0 makes B infinite, as in torch
        term = tl.where(z == -float("inf"), float("inf"), a * (m - z))
        B = tl.sum(tl.where(a == 0.0, 0.0, term), axis=0)
        A = tl.sum(a, axis=0)
    return m, s, A, B


@triton.jit
def _publish(part_ptr, count_ptr, row, seg, K, m, s, A, B,
             NUM_FIELDS: tl.constexpr, DENSE: tl.constexpr):
    """Store this segment's partials, then count them in: release semantics, so that the
    stores are visible to whoever acquires the count, and acquire too, for the program
    that arrives last, which reads the others' partials without waiting."""
    base = part_ptr + (row * K + seg) * NUM_FIELDS
    tl.store(base + _F_M, m)
    tl.store(base + _F_S, s)
    if DENSE:
        tl.store(base + _F_A, A)
        tl.store(base + _F_B, B)
    return tl.atomic_add(count_ptr + 1 + row, 1, sem="acq_rel", scope="gpu")


@triton.jit
def _wait(count_ptr, row, K, arrived):
    """Spin until all K segments of the row have published (acquire: their partials are
    visible after it). ``arrived``: the counter's value before this program's own add."""
    arrived += 1
    while arrived < K:
        arrived = tl.atomic_add(count_ptr + 1 + row, 0, sem="acquire", scope="gpu")


@triton.jit
def _combine(part_ptr, row, K, NUM_FIELDS: tl.constexpr, DENSE: tl.constexpr,
             BLOCK_K: tl.constexpr):
    """(m, s, A, B) of the row from its K published partials (.cg: from L2, never L1)."""
    ks = tl.arange(0, BLOCK_K)
    in_k = ks < K
    ptrs = part_ptr + (row * K + ks) * NUM_FIELDS
    m_k = tl.load(ptrs + _F_M, mask=in_k, other=-_FLT_MAX, cache_modifier=".cg")
    s_k = tl.load(ptrs + _F_S, mask=in_k, other=-1.0, cache_modifier=".cg")
    m = tl.max(m_k, axis=0)
    top = m_k == m
    s_top = tl.sum(tl.where(top, s_k, 0.0), axis=0)
    n_top = tl.sum(top.to(tl.float32), axis=0)
    rest = tl.sum(tl.where(top, 0.0, (1.0 + s_k) * tl.exp(m_k - m)), axis=0)
    s = s_top + ((n_top - 1.0) + rest)
    A = 0.0
    B = 0.0
    if DENSE:
        A_k = tl.load(ptrs + _F_A, mask=in_k, other=0.0, cache_modifier=".cg")
        B_k = tl.load(ptrs + _F_B, mask=in_k, other=0.0, cache_modifier=".cg")
        # each segment's B_k is relative to its own max: shift it to the row's
        B = tl.sum(B_k + tl.where(A_k != 0.0, A_k * (m - m_k), 0.0), axis=0)
        A = tl.sum(A_k, axis=0)
    return m, s, A, B


@triton.jit
def _carry(carry_ptr, ticket, z, dz, a, STORE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
           KEEP_A: tl.constexpr, SEGMENT: tl.constexpr):
    """Interpreter only: store (STORE) or load the registers a program keeps across the wait."""
    NV: tl.constexpr = 1 + HAS_SOFTCAP + KEEP_A
    offs = tl.arange(0, SEGMENT)
    base = carry_ptr + ticket.to(tl.int64) * (NV * SEGMENT)
    if STORE:
        tl.store(base + offs, z)
        if HAS_SOFTCAP:
            tl.store(base + SEGMENT + offs, dz)
        if KEEP_A:
            tl.store(base + (NV - 1) * SEGMENT + offs, a)
    else:
        z = tl.load(base + offs)
        if HAS_SOFTCAP:
            dz = tl.load(base + SEGMENT + offs)
        if KEEP_A:
            a = tl.load(base + (NV - 1) * SEGMENT + offs)
    return z, dz, a


@triton.jit
def _cross_entropy_single_kernel(
    # pointers
    logits_ptr,      # (N, V) fp32/bf16/fp16
    target_ptr,      # (N,) integer class ids, or (N, V) float probabilities if PROB_TARGET
    weight_ptr,      # (V,) class weights, read if HAS_WEIGHT
    stats_ptr,       # (4, N) fp32 out, rows stride_stats apart: per-row loss, max m of z,
                     # log d (lse = m + log d) and S = sum of the target weights
    grad_ptr,        # (N, V) logits dtype out: grad_scale * dl/dx (may alias logits)
    grad_scale_ptr,  # () fp32: factor of the gradient (1 / denominator for 'mean')
    part_ptr,        # (N, K, NUM_FIELDS) fp32 scratch: the segments' partials (K > 1)
    count_ptr,       # (1 + N,) int32 scratch, zero on entry: [0] the ticket counter,
                     # [1 + r] the segments of row r published so far (K > 1)
    carry_ptr,       # (N K, (1 + HAS_SOFTCAP + PROB_TARGET) SEGMENT) fp32: interpreter only
    # strides (in elements)
    stride_x_row, stride_x_col,
    stride_t_row, stride_t_col,
    stride_g_row, stride_g_col,
    stride_stats,
    # sizes
    V, K,            # K = ceil(V / SEGMENT) programs per row; the grid is N K
    # runtime scalars
    ignore_index, label_smoothing, z_loss, inv_softcap,  # inv_softcap: 1/c (softcap_scalar)
    # constexprs
    HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    SEGMENT: tl.constexpr,     # columns per program, a power of two
    BLOCK_K: tl.constexpr,     # a power of two >= K (>= 32), 1 when K = 1 (no exchange)
    NUM_FIELDS: tl.constexpr,  # fp32 partials per segment
    PHASE: tl.constexpr,       # PHASE_SINGLE, or PHASE_PUBLISH then PHASE_FINISH
):
    """Per-row loss, max, log d and S, and the row's gradient times *grad_scale, each
    logit read once (see the module doc for the exchange and why it cannot deadlock)."""
    label_smoothing, z_loss = _fp32_options(label_smoothing, z_loss)
    DENSE: tl.constexpr = PROB_TARGET or HAS_SMOOTHING
    # a dense target is held across the wait only for probability targets (a row of t in
    # HBM); with class ids it is (e / V) w_j, reloaded afterwards from the class weights
    # (V values shared by all rows, in L2) rather than kept in registers
    KEEP_A: tl.constexpr = PROB_TARGET
    SPLIT: tl.constexpr = BLOCK_K > 1
    if SPLIT and PHASE != PHASE_FINISH:
        ticket = tl.atomic_add(count_ptr, 1, sem="relaxed")
    else:
        ticket = tl.program_id(0)
    row = (ticket // K).to(tl.int64)
    seg = ticket % K
    first = seg * SEGMENT
    cols = first + tl.arange(0, SEGMENT)
    in_row = cols < V
    x_row_ptr = logits_ptr + row * stride_x_row
    t_row_ptr = target_ptr + row * stride_t_row
    g_row_ptr = grad_ptr + row * stride_g_row
    valid, c, w_c, coef_c = _row_target(target_ptr, weight_ptr, row, stride_t_row, V,
                                        ignore_index, label_smoothing, HAS_WEIGHT, PROB_TARGET)
    c32 = c.to(tl.int32)  # in [0, V), 0 on an ignored row, -1 for probabilities
    holds_c = (c32 >= first) & (c32 < first + SEGMENT)
    if PROB_TARGET:
        writer = seg == 0
    else:
        writer = holds_c

    # an ignored row reads nothing (its loads are masked off) and takes no part in the exchange
    n_read = tl.where(valid, V, 0)
    to_read = cols < n_read
    dz = 1.0
    a = 0.0
    if PHASE == PHASE_FINISH:
        z, dz, a = _carry(carry_ptr, ticket, 0.0, 0.0, 0.0, False, HAS_SOFTCAP, KEEP_A, SEGMENT)
    else:
        z, dz = _load_z(x_row_ptr, cols, to_read, stride_x_col, inv_softcap, HAS_SOFTCAP)
        if DENSE:
            a = _dense_target(t_row_ptr, weight_ptr, cols, to_read, stride_t_col,
                              label_smoothing, V, HAS_WEIGHT, PROB_TARGET)
    z_c = 0.0
    dz_c = 0.0
    if not PROB_TARGET:
        z_c = tl.zeros_like(coef_c)
        dz_c = tl.zeros_like(coef_c)
        if holds_c:  # the target logit from the registers, not a second load
            z_c = tl.sum(tl.where(cols == c32, z, 0.0), axis=0)
            if HAS_SOFTCAP:
                dz_c = tl.sum(tl.where(cols == c32, dz, 0.0), axis=0)
    if PHASE == PHASE_FINISH:
        m = tl.zeros_like(coef_c) - _FLT_MAX  # an ignored row: no finite logit, d = 0
        s = tl.zeros_like(coef_c) - 1.0
        A = tl.zeros_like(coef_c)
        B = tl.zeros_like(coef_c)
        if valid:
            m, s, A, B = _combine(part_ptr, row, K, NUM_FIELDS, DENSE, BLOCK_K)
    else:
        m, s, A, B = _segment_stats(z, a, DENSE)
        if SPLIT:
            if valid:  # nobody waits on an ignored row: it publishes nothing
                arrived = _publish(part_ptr, count_ptr, row, seg, K, m, s, A, B, NUM_FIELDS,
                                   DENSE)
                if PHASE == PHASE_SINGLE:
                    _wait(count_ptr, row, K, arrived)
                    m, s, A, B = _combine(part_ptr, row, K, NUM_FIELDS, DENSE, BLOCK_K)
        if PHASE == PHASE_PUBLISH:
            _carry(carry_ptr, ticket, z, dz, a, True, HAS_SOFTCAP, KEEP_A, SEGMENT)

    if PHASE != PHASE_PUBLISH:
        # s = -1 (d = 0): no finite logit in the row (or an ignored row); its max is -inf
        m = tl.where(s < 0.0, -float("inf"), m)
        logd = _log1p(s)
        # a +inf logit: torch's log-softmax is NaN (inf - inf), whatever segment holds it
        logd = tl.where(m == float("inf"), float("nan"), logd)
        lse = m + logd
        S = coef_c + A  # 0 on an ignored row: coef_c = 0 and a = 0
        scale = tl.load(grad_scale_ptr).to(tl.float32)
        coef_p = S
        if HAS_Z_LOSS:
            coef_p = S + tl.where(valid, 2.0 * z_loss * lse, 0.0)
        if writer:
            loss = 0.0
            if not PROB_TARGET:
                loss = tl.where(valid, coef_c * ((m - z_c) + logd), 0.0)
            if DENSE:
                loss += tl.where(valid, B + A * logd, 0.0)
            if HAS_Z_LOSS:
                loss += tl.where(valid, z_loss * lse * lse, 0.0)
            tl.store(stats_ptr + row, loss)
            tl.store(stats_ptr + stride_stats + row, m)
            tl.store(stats_ptr + 2 * stride_stats + row, logd)
            tl.store(stats_ptr + 3 * stride_stats + row, S)
        # p_j = exp2((z_j - m) log2 e - log d log2 e), as in the two-sweep kernel
        p = tl.math.exp2((z - m) * _LOG2E - logd * _LOG2E)
        if DENSE and not KEEP_A:
            a = _dense_target(t_row_ptr, weight_ptr, cols, to_read, stride_t_col,
                              label_smoothing, V, HAS_WEIGHT, PROB_TARGET)
        if DENSE:
            g = (p * coef_p - a) * scale
        else:
            g = p * (coef_p * scale)
        if HAS_SOFTCAP:
            g = g * dz
        if not PROB_TARGET:
            if holds_c:
                g_c = _target_column_grad(z_c, dz_c, m, logd, coef_c, coef_p, w_c,
                                          label_smoothing, V, scale, HAS_SMOOTHING, HAS_SOFTCAP)
                g = tl.where(cols == c32, g_c, g)
            g = tl.where(valid, g, 0.0)  # an ignored row's p is NaN (-inf - -inf): zeros
        tl.store(g_row_ptr + cols.to(tl.int64) * stride_g_col,
                 g.to(g_row_ptr.dtype.element_ty), mask=in_row)


# ----------------------------------------------------------------------------- launchers


def plan(V, element_size, flags):
    """(SEGMENT, num_warps, K) of a row of V logits with the option flags of _flags."""
    segment, num_warps = single_config(V, element_size, **flags)
    return segment, num_warps, triton.cdiv(V, segment)


def cross_entropy_single_fwd(logits, target, weight, *, ignore_index, label_smoothing, z_loss,
                             softcap, grad, grad_scale, stats=None):
    """Per-row loss, max, log d and S of 2-D logits, and the fused gradient, in one pass.

    Preconditions: as kernels.cross_entropy.cross_entropy_fwd with a gradient (grad an
    (N, V) tensor of the logits' dtype, possibly the logits themselves; grad_scale an fp32
    tensor whose first element is the factor), without its statistics and target gradient (with_stats, dtarget);
    N >= 1; and K = ceil(V / SEGMENT) at most the programs the device can hold at once
    (kernels.tuning.fused_path checks it). stats: None, or a (4, N) fp32 tensor with unit
    column stride to write the per-row outputs into.

    Returns the (4, N) fp32 stats whose rows are the per-row loss, max, log d and S. The
    only allocation besides them is the exchange's scratch, N K NUM_FIELDS + N + 1 words,
    zeroed (none for K = 1); under the interpreter also the carry buffer between its two
    launches.
    """
    N, V = logits.shape
    dev = logits.device
    if stats is None:
        stats = torch.empty(4, N, dtype=torch.float32, device=dev)
    flags = _flags(target, weight, label_smoothing, z_loss, softcap)
    segment, num_warps, K = plan(V, logits.element_size(), flags)
    dense = flags["PROB_TARGET"] or flags["HAS_SMOOTHING"]
    num_fields = 4 if dense else 2
    if K > 1:
        # the partials are written before they are read: only the counters are zeroed
        scratch = torch.empty(N * K * num_fields + N + 1, dtype=torch.int32, device=dev)
        part = scratch[:N * K * num_fields].view(torch.float32)
        count = scratch[N * K * num_fields:].zero_()  # [0]: tickets, [1 + r]: row r's counter
    else:
        part = count = stats  # not touched: no exchange
    stride_t_row, stride_t_col = _target_strides(target)
    args = (logits, target, weight if weight is not None else stats, stats, grad, grad_scale,
            part, count)
    rest = (logits.stride(0), logits.stride(1), stride_t_row, stride_t_col,
            grad.stride(0), grad.stride(1), stats.stride(0),
            V, K,
            ignore_index, float(label_smoothing), float(z_loss), softcap_scalar(softcap))
    # the partials are loaded as one block of at least 32 lanes (masked past K), so that the
    # goal vocabularies share a compiled kernel (K = 4 to 32; 64 lanes: more registers)
    block_k = 1 if K == 1 else max(_MIN_BLOCK_K, triton.next_power_of_2(K))
    meta = dict(SEGMENT=segment, BLOCK_K=block_k, NUM_FIELDS=num_fields,
                num_warps=num_warps, **flags)
    if flags["HAS_SOFTCAP"] or dense:
        # more per element in registers: cap them at what lets two programs share an SM
        # (left alone, triton 3.6's ptxas took 75 for fp32 with every option); the plain
        # kernel is left to ptxas, which a cap makes spend it (40 -> 59 on triton 3.9)
        meta["maxnreg"] = min(255, 65536 // (2 * 32 * num_warps))
    if K > 1 and INTERPRETER:
        # programs run one after another here: publish in one launch, finish in a second
        nv = 1 + flags["HAS_SOFTCAP"] + flags["PROB_TARGET"]
        carry = torch.empty(N * K * nv * segment, dtype=torch.float32, device=dev)
        for phase in (PUBLISH, FINISH):
            _cross_entropy_single_kernel[(N * K,)](*args, carry, *rest, PHASE=phase, **meta)
    else:
        _cross_entropy_single_kernel[(N * K,)](*args, stats, *rest, PHASE=SINGLE, **meta)
    return stats
