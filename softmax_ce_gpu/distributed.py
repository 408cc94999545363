"""Vocabulary-parallel cross-entropy over torch.distributed (Megatron-style tensor parallelism).

Each rank of a process group holds a slice of the columns of the logits; the loss
and each rank's slice of the gradient are computed without gathering the logits.
Per call and row, in this order:

1. widths: one all_reduce SUM of a (world,) int64 vector (each rank fills in its own
   width) gives every rank its start offset and the global V, as device tensors (no
   host copy; the class-id range check on CUDA is a device-side assert). It is done
   on every call rather than cached: a cache keyed on the local width could hit on
   one rank and miss on another after the split changes, and then the ranks would
   disagree on which collectives to run and hang.
2. partial statistics of the local shard (kernels/vocab_parallel.py, or torch ops for
   float64 and CPU without Triton's interpreter): m_r, s_r = d_r - 1 relative to
   m_r, z_c where the class id falls in the shard (-inf elsewhere), and, with label
   smoothing, B_r = sum over the shard of (m_r - z_j). With return_stats, from the same
   sweep: T_r = sum over the shard of exp(z_j - m_r) (m_r - z_j), the shard's largest
   logit x_r and the global column of its first occurrence.
3. all_reduce MAX of (m_r, z_c): the global max M and the target logit z_c
   (8 bytes per row in fp32); with return_stats and a softcap also of x_r (12 bytes),
   the argmax being of the logits before the cap.
4. all_reduce SUM of (sigma_r, n_r[, B_r + W_r (M - m_r)]) (8 or 12 bytes per row),
   where a rank holding M (m_r = M) sends sigma_r = s_r, n_r = 1, and any other rank
   sigma_r = d_r exp(m_r - M), n_r = 0. Then

       s = d - 1 = sum_r sigma_r + (sum_r n_r - 1)

   with every term >= 0 and the integer count exact: the one exp(0) = 1 that a
   confident prediction would otherwise swamp is never added (also when several
   ranks hold the max), so log d = log1p(s) and 1 - p_max keep their digits as in
   the single-device kernel. Everything else is a sum of non-negative terms too.
5. every rank computes the same per-row loss from the same reduced values (bitwise
   identical on every rank) and, when the gradient is made in forward ('mean' or
   'sum'), writes the gradient of its own columns: the exact slice of the
   single-process gradient (not multiplied by the world size). For 'none', it saves
   the global M and log d (8 bytes a row) and writes the gradient in backward, which
   needs no communication.
6. only with return_stats (_row_stats): all_reduce SUM of
   q_r = exp(m_r - M) (T_r + d_r (M - m_r)) >= 0 (4 bytes a row) gives Q = sum_r q_r and
   the entropy H = lse - sum_j p_j z_j = log d + Q / d without cancellation; all_reduce
   MIN of an int64 candidate per row (8 bytes): the rank's argmax column where x_r is the
   global max of the logits, a sentinel above every column elsewhere, so the smallest
   global column of a tie wins (torch.argmax's). A collective of its own rather than a
   row more in step 4's: a longer tensor can change the order in which a ring all_reduce
   adds the ranks' terms, and the loss and gradient are to be bitwise those of
   return_stats=False.

Communication: 8 * world bytes, then 16 bytes a row (20 with label smoothing) per
rank; return_stats adds two collectives and 12 bytes a row (16 with a softcap). float64
logits send their floating-point rows in float64 (twice the bytes). O(N), never O(N x V).

torch.compile(fullgraph=True) traces the whole loss: the collectives are
torch.distributed's functional collectives (out of place, waited for at once; in eager
mode the same c10d collectives), and the shard computations are custom ops
(_vocab_parallel_ops.py), run directly in plain eager mode.
"""

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from . import _checks, _ops
from . import _vocab_parallel_ops as _vp
from .loss import CrossEntropyStats
from ._reduction import acc_dtype, no_second_order, reduce, reduction_scale, take_fused_grad

_SECOND_ORDER_HINT = "a differentiable gradient would need the collectives again"


def _all_reduce(t, op, group):
    """all_reduce(t) over group as a new tensor, waited for: torch.distributed's functional
    collective, which torch.compile traces (in eager it runs the same c10d collective)."""
    return funcol.wait_tensor(funcol.all_reduce(t, op, group))


def _shard_of(W, group, device):
    """(2,) int64 device tensor (start of this rank's columns, global V): one tiny collective."""
    rank = dist.get_rank(group)
    widths = torch.zeros(dist.get_world_size(group), dtype=torch.int64, device=device)
    widths[rank] = W
    widths = _all_reduce(widths, "sum", group)
    return torch.stack([widths[:rank].sum(), widths.sum()])


def _combine(part, W, shard, valid, opts, group, with_stats=False):
    """Global per-row (max, log d, loss) from each rank's (4, N) partial statistics, and a
    fourth value: with_stats (part is then return_stats' (6, N)) the global max of the logits
    before the softcap (M itself without one), from the same MAX all_reduce, else None.

    Two collectives; every rank ends with bitwise the same values.
    """
    m_r, s_r, B_r = part[0], part[2], part[3]
    # with a softcap the argmax is of the logits, whose capped z may tie: their max too
    of_x = with_stats and opts.softcap is not None
    mz = _all_reduce(torch.stack([part[0], part[1], part[5]]) if of_x else part[:2], "max", group)
    M, z_c = mz[0], mz[1]
    finite = M != float("-inf")
    top = (m_r == M) & finite
    M_ref = torch.where(finite, M, torch.zeros_like(M))
    # d_r exp(m_r - M) with d_r = 1 + s_r; 0 for a shard of -inf only (s_r = -1)
    sigma = torch.where(top, s_r, (1.0 + s_r) * torch.exp(m_r - M_ref))
    smoothing = opts.label_smoothing > 0.0
    sums = torch.empty((3 if smoothing else 2, part.shape[1]), dtype=part.dtype,
                       device=part.device)
    sums[0] = sigma
    sums[1] = top.to(part.dtype)
    if smoothing:
        # sum over the shard of (M - z_j) = B_r + W (M - m_r), all terms >= 0
        # (an empty shard adds nothing: its m_r = -inf must not make 0 * inf)
        shift = torch.where((m_r < M) & (W > 0), W * (M - m_r), torch.zeros_like(M))
        sums[2] = B_r + shift
    sums = _all_reduce(sums, "sum", group)
    s = sums[0] + (sums[1] - 1.0)
    logd = torch.log1p(s)
    lse = M + logd
    e = opts.label_smoothing
    loss = (1.0 - e) * ((M - z_c) + logd)
    if smoothing:
        loss = loss + (e / shard[1].to(part.dtype)) * sums[2] + e * logd
    if opts.z_loss > 0.0:
        loss = loss + opts.z_loss * lse * lse
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    X = (mz[2] if of_x else M) if with_stats else None
    return M, logd, loss, X


def _row_stats(part, best, t, valid, M, logd, X, group):
    """The per-row (lse, entropy, correct) of return_stats from each rank's (6, N) partials
    and argmax column (best), the global max M, log d, and X, the global max of the logits
    (_combine's fourth value). Two more collectives, never folded into _combine's SUM: a
    longer tensor can change the order in which a ring all_reduce adds the ranks' terms,
    and with it the last bit of the loss and gradient (from three ranks on).

    The entropy H = lse - sum_j p_j z_j = log d + Q / d, with
    Q = sum_r exp(m_r - M) (T_r + d_r (M - m_r)): every term >= 0, no cancellation. The argmax
    is the smallest candidate of the ranks whose largest logit is X: the first global column
    of the max, as torch.argmax's (a shard without one offers NO_ARGMAX).
    """
    m_r, s_r, T_r = part[0], part[2], part[4]
    # at the max (m_r = M) the term is T_r itself; a shard of -inf only (d_r = 0, s_r = -1)
    # adds nothing: 0 * inf must not make a NaN
    moved = torch.exp(m_r - M) * (T_r + (1.0 + s_r) * (M - m_r))
    q = torch.where(s_r > -1.0, moved, torch.zeros_like(T_r))
    # part[5] is the shard's largest logit (m_r itself without a softcap)
    cand = torch.where(part[5] == X, best, torch.full_like(best, _vp.NO_ARGMAX))
    Q = _all_reduce(q, "sum", group)
    arg = _all_reduce(cand, "min", group)
    lse = M + logd
    entropy = logd + Q / torch.exp(logd)
    # an ignored row read nothing: NaN, NaN, False (as cross_entropy's); a row of -inf only
    # has argmax 0 (as torch.argmax)
    nan = torch.full_like(lse, float("nan"))
    arg = torch.where(arg == _vp.NO_ARGMAX, torch.zeros_like(arg), arg)
    return (torch.where(valid, lse, nan), torch.where(valid, entropy, nan),
            valid & (arg == t.long()))


class _VocabParallelFunction(torch.autograd.Function):
    """Outputs: (loss,) and, by mode, what backward needs, then with_stats the per-row
    (lse, entropy, correct); all but the loss marked non-differentiable.

    mode: None (no gradient), 'fused' (made in forward: 'mean'/'sum', not fp16, whose
    gradient must meet a loss scaler's factor before it is rounded, as in loss.py) or
    'late' (made in backward from the saved global max and log d)."""

    @staticmethod
    def forward(x, t, opts, group, fn, mode, with_stats):
        N, W = x.shape
        acc = acc_dtype(x)
        shard = _shard_of(W, group, x.device)
        valid = t != opts.ignore_index
        one = torch.ones((), dtype=acc, device=x.device)
        denom, grad_scale = reduction_scale(t, None, opts, False, N, acc, x.device)
        fuse = mode == "fused"
        if N == 0:  # the same on every rank (target is): no rank enters the collectives
            loss_rows, row_max, row_logd = (x.new_empty(0, dtype=acc) for _ in range(3))
            row_stats = (x.new_empty(0, dtype=acc), x.new_empty(0, dtype=acc),
                         x.new_empty(0, dtype=torch.bool))
            grad = torch.empty_like(x, memory_format=torch.contiguous_format) if fuse else None
        else:
            run = _ops.runner(x)  # one eager-or-op decision for the forward
            # checks the class ids against the global V first (the same on every rank)
            args = (x, t, shard, opts.ignore_index, opts.label_smoothing, opts.softcap, fn)
            if with_stats:
                part, best = run(_vp.vocab_parallel_partial_stats, *args)
            else:
                part, best = run(_vp.vocab_parallel_partial, *args), None
            row_max, row_logd, loss_rows, X = _combine(part, W, shard, valid, opts, group,
                                                       with_stats)
            if with_stats:
                row_stats = _row_stats(part, best, t, valid, row_max, row_logd, X, group)
            if fuse:
                grad = run(_vp.vocab_parallel_grad, x, t, shard, row_max, row_logd, one,
                           grad_scale, opts.ignore_index, opts.label_smoothing, opts.z_loss,
                           opts.softcap, fn)
        loss = reduce(loss_rows, denom, opts.reduction).to(x.dtype)
        stats = row_stats if with_stats else ()
        if fuse:
            return loss, grad, *stats
        if mode == "late":
            return loss, shard, row_max, row_logd, grad_scale, *stats
        return (loss, *stats)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, t, opts, group, fn, mode, with_stats = inputs
        ctx.opts, ctx.fn, ctx.mode, ctx.consumed = opts, fn, mode, False
        ctx.mark_non_differentiable(*output[1:])
        # the extra outputs get no gradient: never materialise an N x V zeros tensor for them
        ctx.set_materialize_grads(False)
        saved = output[1:len(output) - 3] if with_stats else output[1:]  # what backward needs
        if mode == "fused":
            ctx.save_for_backward(saved[0])
        elif mode == "late":
            ctx.save_for_backward(x, t, *saved)

    @staticmethod
    def backward(ctx, dloss, *_):
        nones = (None,) * 6
        if dloss is None:  # no gradient reached the loss (grads are not materialised)
            return (None, *nones)
        second_order = torch.is_grad_enabled()  # create_graph=True
        if ctx.mode == "fused":
            (grad,) = take_fused_grad(ctx, ctx.fn)
            if second_order:
                return (*no_second_order(ctx.fn, _SECOND_ORDER_HINT, dloss, grad), *nones)
            _ops.call(_ops.scale_grad_, grad, dloss)
            return (grad, *nones)
        x, t, shard, row_max, row_logd, grad_scale = ctx.saved_tensors
        o = ctx.opts
        with torch.no_grad():
            grad = _ops.call(_vp.vocab_parallel_grad, x, t, shard, row_max, row_logd, dloss,
                             grad_scale, o.ignore_index, o.label_smoothing, o.z_loss, o.softcap,
                             ctx.fn)
        if second_order:
            (grad,) = no_second_order(ctx.fn, _SECOND_ORDER_HINT, None, grad)
        return (grad, *nones)


def vocab_parallel_cross_entropy(logits_shard, target, *, group=None, ignore_index=-100,
                                 reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None,
                                 return_stats=False):
    """Softmax cross-entropy of logits whose vocabulary is split across the ranks of a group.

    Rank r of ``group`` holds the columns [start_r, start_r + W_r) of the logits, in rank
    order (start_r = W_0 + ... + W_{r-1}; the widths may differ); V = sum of the W_r. The
    result is what ``softmax_ce_gpu.cross_entropy`` (and torch's F.cross_entropy) gives on
    the full (N, V) logits: the same loss on every rank, and on each rank the gradient of
    its own columns (the slice of the single-process gradient, not scaled by the world
    size). Communication is O(N) per rank: three all_reduce calls per forward (the
    widths, then 8 bytes a row, then 8 bytes a row, 12 with label smoothing; two more with
    return_stats), none in backward. Every rank of the group must make the call, with the
    same target and options.

    Args:
        logits_shard: (N, W_r) or (W_r,) float16/bfloat16/float32/float64, this rank's
            columns, any strides; W_r >= 1. Flatten batch dimensions first
            (``logits_shard.view(-1, W_r)``): inputs of higher rank are refused.
        target: (N,) or () integer global class ids in [0, V) or equal to ignore_index,
            identical on every rank. Probability targets are not supported.
        group: the process group the vocabulary is split over (default: the default group).
            NCCL for CUDA tensors, gloo for CPU tensors.
        ignore_index: rows whose class id equals it count for nothing (default -100).
        reduction: 'mean' (default; over the non-ignored rows, NaN when there are none),
            'sum', or 'none' (per-row losses, shape (N,)).
        label_smoothing: in [0, 1] (default 0.0), torch's definition with the global V.
        z_loss: >= 0 (default 0.0): adds z_loss * lse^2 to each non-ignored row's loss,
            lse being the global log-sum-exp.
        softcap: None (default) or c > 0: the logits become c * tanh(logits / c) first.
        return_stats: False (default). True returns (loss, CrossEntropyStats(lse, entropy,
            correct)), the statistics ``cross_entropy(..., return_stats=True)`` gives on the
            full logits: (N,) (or () for 1-D logits) lse and entropy of the (softcapped)
            logits in float32 (float64 for float64 logits), and correct, bool, whether the
            argmax over the whole vocabulary (the first global column on ties) is the
            target; NaN, NaN, False on ignored rows. Bitwise the same on every rank, without
            gradient, from the same sweep over the shard; the loss and gradient are bitwise
            those of return_stats=False. They cost two more all_reduce calls, a SUM of 4
            bytes a row (8 for float64) and a MIN of 8 bytes a row (an int64 column), and
            with a softcap 4 (8) more bytes a row in the MAX (the argmax is of the logits
            before the cap, which the capped values may tie).

    Class weights are not supported (there is no ``weight`` argument).

    Returns: the loss, of the logits' dtype: a scalar, or (N,) for 'none'; with return_stats
    the pair (loss, stats).

    With reduction 'mean' or 'sum' the gradient is written in the forward pass and
    backward only scales it (a second backward through the same loss raises); with
    'none' backward recomputes it from 8 saved bytes a row.
    """
    fn = "vocab_parallel_cross_entropy"
    opts = _checks.check_options(fn, ignore_index, reduction, label_smoothing, z_loss, softcap)
    _checks.check_bool(fn, "return_stats", return_stats)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{fn}: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group first")
    # an empty shard (a rank holding no columns) takes part like any other: refusing it on
    # that rank alone would leave the others waiting in the first collective
    _checks.check_logits(fn, logits_shard, "logits_shard", allow_empty=True)
    if logits_shard.dim() > 2:
        raise ValueError(
            f"{fn}: argument 'logits_shard' must be (N, W) or (W,), got shape "
            f"{tuple(logits_shard.shape)}; flatten the batch dimensions first "
            "(logits_shard.view(-1, W), target.view(-1))")
    if isinstance(target, torch.Tensor) and target.is_floating_point():
        raise TypeError(f"{fn}: argument 'target' must hold integer class ids; probability "
                        f"targets (dtype {target.dtype}) are not supported")
    _checks.check_target(fn, logits_shard, target, opts.ignore_index)
    target = _checks.as_class_ids(target, opts.ignore_index)
    x = logits_shard.unsqueeze(0) if logits_shard.dim() == 1 else logits_shard
    t = target.reshape(1) if target.dim() == 0 else target
    mode = None
    if torch.is_grad_enabled() and x.requires_grad:
        fused = opts.reduction != "none" and x.dtype != torch.float16
        mode = "fused" if fused else "late"
    if group is None:  # the functional collectives take the group itself
        group = dist.group.WORLD
    out = _VocabParallelFunction.apply(x, t, opts, group, fn, mode, return_stats)
    loss = out[0]
    if opts.reduction == "none" and logits_shard.dim() == 1:
        loss = loss.reshape(())
    if not return_stats:
        return loss
    shape = () if logits_shard.dim() == 1 else (x.shape[0],)  # the batch shape
    lse, entropy, correct = (o.reshape(shape) for o in out[-3:])
    return loss, CrossEntropyStats(lse, entropy, correct)
