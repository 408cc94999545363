"""The chunked sweep of linear_cross_entropy, as custom ops (see _ops.py for the pattern).

The whole chunk loop (per head and chunk of rows: the logits' matmul, the core's launcher,
the gradient matmuls) is one op, so that torch.compile and torch.export see an opaque call
of known output shapes and never trace, or hold, the (N, V) logits: the C x V chunk buffer
lives and dies inside the op.

- linear_cross_entropy_fwd: the per-row stats (4, D, N; 7 with the statistics of
  CrossEntropyStats) and, when the gradient is made in forward ('mean'/'sum', not fp16),
  the gradients of the reduced loss: input, linear weight, bias and probability target.
- linear_cross_entropy_bwd: the late path's gradients (reduction 'none', fp16), recomputing
  each chunk's logits.
- scale_flat_: a finished gradient times the upstream scalar, in place.

A gradient that is not wanted comes back as an empty tensor (custom ops return tensors, not
None). The options are op arguments of schema types; chunk None picks the default rule at
run time (it asks the device for its free memory), so it never becomes a traced constant.
"""

from typing import Optional

import torch
from torch import Tensor

from . import _autocast, _ops
from ._backend import backend_for
from ._reduction import acc_dtype

_FN = "linear_cross_entropy"

# default chunk rule (see linear.py's module docstring); a starting point for the GPU sweep
_CPU_BUDGET = 64 << 20
_MAX_CUDA_BUDGET = 512 << 20
_ROW_STEP = 256
_MAX_ROWS = 2048
# row width when scaling a finished gradient in backward (one 16-32 KiB row per program)
_SCALE_ROW = 8192

# whether addmm(..., out_dtype=fp32) (cuBLAS upcast inside the GEMM) works on this torch
_OUT_DTYPE_ADDMM = {"ok": True}


def _default_chunk_size(N, V, H, D, element_size, device, free_bytes=None):
    """Rows per chunk when chunk_size is None (rule in linear.py's module docstring).

    free_bytes overrides the device query (tests); None asks torch.cuda on CUDA.
    """
    if device.type == "cuda" or free_bytes is not None:
        if free_bytes is None:
            free, _ = torch.cuda.mem_get_info(device)
            free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        else:
            free = free_bytes
        grads = V * D * H * (4 + element_size) + N * H * element_size
        budget = min(_MAX_CUDA_BUDGET, max(0, free - grads) // 4)
    else:
        budget = _CPU_BUDGET
    rows = budget // (V * element_size) // _ROW_STEP * _ROW_STEP
    rows = min(_MAX_ROWS, max(_ROW_STEP, rows))
    return max(1, min(rows, N))


def _addmm_acc(acc, a, b):
    """acc += a @ b, with acc in fp32/fp64 and a, b in the compute dtype (maybe lower)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _OUT_DTYPE_ADDMM["ok"]:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE_ADDMM["ok"] = False  # older torch: fall back for the rest of the process
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _heads(x, lw, lb, t, D, prob):
    """Per head k: (W_k (V, H), b_k (V,) or None, target_k (N,) or (N, V)), all views."""
    N, H = x.shape
    V = lw.shape[0]
    if D == 1:
        return [(lw, lb, t)]
    w3 = lw.reshape(V, D, H)
    b2 = None if lb is None else lb.reshape(V, D)
    t2 = t.reshape(N, V, D) if prob else t.reshape(N, D)
    return [(w3[:, k], None if b2 is None else b2[:, k],
             t2[:, :, k] if prob else t2[:, k]) for k in range(D)]


def _sweep(x, heads, V, chunk, need, ce_step):
    """Run every (head, chunk of rows): logits by a matmul, ce_step(k, r0, r1, logits), which
    leaves dlogits in the logits buffer when a gradient of the linear's operands is needed
    (need, of input, weight, bias; ce_step writes the target's gradient itself), then the
    gradient matmuls.

    Returns (grad_input (N, H), grad_W (V, D, H) or (V, H), grad_b (V, D) or (V,)), each None
    when not needed; grad_W and grad_b in the accumulation dtype (fp32, fp64 for fp64).
    """
    N, H = x.shape
    D = len(heads)
    dev, dtype = x.device, x.dtype
    acc = acc_dtype(x)
    need_x, need_w, need_b = need
    gi = gw = gb = None
    if need_x:
        # one head: each chunk's rows are written once, by one GEMM; several heads add up
        gi = (torch.empty(N, H, dtype=dtype, device=dev) if D == 1
              else torch.zeros(N, H, dtype=acc, device=dev))
    if need_w:
        gw = torch.zeros((V, H) if D == 1 else (V, D, H), dtype=acc, device=dev)
    if need_b:
        gb = torch.zeros((V,) if D == 1 else (V, D), dtype=acc, device=dev)
    if N == 0:
        return gi, gw, gb
    buf = torch.empty(min(chunk, N), V, dtype=dtype, device=dev)
    for k, (w_k, b_k, _) in enumerate(heads):
        gw_k = None if gw is None else (gw if D == 1 else gw[:, k])
        for r0 in range(0, N, chunk):
            r1 = min(N, r0 + chunk)
            xr = x[r0:r1]
            logits = buf[: r1 - r0]
            if b_k is None:
                torch.mm(xr, w_k.t(), out=logits)
            else:
                torch.addmm(b_k, xr, w_k.t(), out=logits)
            ce_step(k, r0, r1, logits)
            if need_x:
                if D == 1:
                    torch.mm(logits, w_k, out=gi[r0:r1])
                else:
                    _addmm_acc(gi[r0:r1], logits, w_k)
            if need_w:
                _addmm_acc(gw_k, logits.t(), xr)
            if need_b:
                (gb if D == 1 else gb[:, k]).add_(logits.sum(0, dtype=acc))
    return gi, gw, gb


def _finish(grads, x, lw, lb, gt, t):
    """The accumulators cast once to the parameters' dtype, in their shapes, and the target's
    gradient gt; an empty tensor for a gradient not made."""
    gi, gw, gb = grads
    return (x.new_empty(0) if gi is None else gi.to(x.dtype),
            x.new_empty(0) if gw is None else gw.to(lw.dtype).reshape(lw.shape),
            x.new_empty(0) if gb is None else gb.to(lb.dtype).reshape(lb.shape),
            t.new_empty(0) if gt is None else gt)


def _grads_like(x, lw, lb, t, need):
    """Fake outputs of the gradients: what _finish returns, without data."""
    return (x.new_empty(x.shape if need[0] else (0,)),
            x.new_empty(lw.shape if need[1] else (0,)),
            x.new_empty(lb.shape if need[2] else (0,)),
            t.new_empty(t.shape if need[3] else (0,)))


def _target_grad(t, D, need_target):
    """(the probability target's gradient (N, V * D), its per-head (N, V) views), or
    (None, [None] * D) when it is not needed."""
    if not need_target:
        return None, [None] * D
    gt = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    if D == 1:
        return gt, [gt]
    g3 = gt.view(t.shape[0], -1, D)
    return gt, [g3[:, :, k] for k in range(D)]


def _chunk(chunk, x, lw, D):
    if chunk is not None:
        return chunk
    return _default_chunk_size(x.shape[0], lw.shape[0], x.shape[1], D, x.element_size(),
                               x.device)


def _linear_cross_entropy_fwd(
        x: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
        weight: Optional[Tensor], grad_scale: Tensor, heads: int, prob: bool,
        chunk: Optional[int], need_input: bool, need_weight: bool, need_bias: bool,
        need_target: bool, with_stats: bool, ignore_index: int, label_smoothing: float,
        z_loss: float, softcap: Optional[float]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(stats, grad_input, grad_weight, grad_bias, grad_target) of the chunked forward.

    x (N, H); linear_weight (V, d1, ..., dK, H) with heads = d1 * ... * dK (1 for (V, H));
    linear_bias None or linear_weight.shape[:-1]; target (N,) / (N, D) class ids or (N, V * D)
    probabilities (prob); weight None or (V,); grad_scale: the reduction's factor, the first
    element of a () or (3,) tensor (loss_scale's).
    stats (4, D, N) in the accumulation dtype: per row and head the loss, max, log d, S; (7,
    D, N) with_stats: then lse, entropy, correct (kernels/cross_entropy.py).
    need_*: which gradients of the reduced loss (times grad_scale) to make in forward, each
    of its parameter's shape and dtype (empty when not asked); the probability target's
    (need_target) is written by the kernel in the pass that writes the logits' gradient."""
    need = (need_input, need_weight, need_bias)
    with _autocast.off(x.device.type):
        backend = backend_for(_FN, x)
        N, V, D = x.shape[0], linear_weight.shape[0], heads
        hs = _heads(x, linear_weight, linear_bias, target, D, prob)
        # the kernel writes each chunk's rows of the stats in place
        stats = torch.empty(7 if with_stats else 4, D, N, dtype=acc_dtype(x), device=x.device)
        fuse = any(need)
        gt, gt_heads = _target_grad(target, D, need_target)

        def ce_step(k, r0, r1, logits):
            dt = gt_heads[k]
            backend.cross_entropy_fwd(logits, hs[k][2][r0:r1], weight,
                                      grad=logits if fuse else None, grad_scale=grad_scale,
                                      stats=stats[:, k, r0:r1], ignore_index=ignore_index,
                                      label_smoothing=label_smoothing, z_loss=z_loss,
                                      softcap=softcap, with_stats=with_stats,
                                      dtarget=None if dt is None else dt[r0:r1])

        grads = _sweep(x, hs, V, _chunk(chunk, x, linear_weight, D), need, ce_step)
        return (stats, *_finish(grads, x, linear_weight, linear_bias, gt, target))


linear_cross_entropy_fwd = _ops._custom_op("linear_cross_entropy_fwd", _linear_cross_entropy_fwd,
                                           ())


@linear_cross_entropy_fwd.register_fake
def _(x, linear_weight, linear_bias, target, weight, grad_scale, heads, prob, chunk, need_input,
      need_weight, need_bias, need_target, with_stats, ignore_index, label_smoothing, z_loss,
      softcap):
    stats = x.new_empty(7 if with_stats else 4, heads, x.shape[0], dtype=acc_dtype(x))
    return (stats, *_grads_like(x, linear_weight, linear_bias, target,
                                (need_input, need_weight, need_bias, need_target)))


def _linear_cross_entropy_bwd(
        x: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
        weight: Optional[Tensor], stats: Tensor, dloss: Tensor, grad_scale: Tensor, heads: int,
        prob: bool, chunk: Optional[int], need_input: bool, need_weight: bool, need_bias: bool,
        need_target: bool, ignore_index: int, label_smoothing: float, z_loss: float,
        softcap: Optional[float]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias, grad_target) of the late path: dloss () or (N, D)
    per row and head, stats the forward's (4 or 7, D, N); each chunk's logits are computed
    again."""
    need = (need_input, need_weight, need_bias)
    with _autocast.off(x.device.type):
        backend = backend_for(_FN, x)
        N, V, D = x.shape[0], linear_weight.shape[0], heads
        hs = _heads(x, linear_weight, linear_bias, target, D, prob)
        dl = dloss.expand(N, D) if dloss.dim() == 0 else dloss.reshape(N, D)
        fuse = any(need)
        gt, gt_heads = _target_grad(target, D, need_target)

        def ce_step(k, r0, r1, logits):
            dt = gt_heads[k]
            backend.cross_entropy_bwd(logits, hs[k][2][r0:r1], weight, stats[:, k, r0:r1],
                                      dl[r0:r1, k], grad_scale, logits if fuse else None,
                                      ignore_index=ignore_index, label_smoothing=label_smoothing,
                                      z_loss=z_loss, softcap=softcap,
                                      dtarget=None if dt is None else dt[r0:r1])

        grads = _sweep(x, hs, V, _chunk(chunk, x, linear_weight, D), need, ce_step)
        return _finish(grads, x, linear_weight, linear_bias, gt, target)


linear_cross_entropy_bwd = _ops._custom_op("linear_cross_entropy_bwd", _linear_cross_entropy_bwd,
                                           ())


@linear_cross_entropy_bwd.register_fake
def _(x, linear_weight, linear_bias, target, weight, stats, dloss, grad_scale, heads, prob,
      chunk, need_input, need_weight, need_bias, need_target, ignore_index, label_smoothing,
      z_loss, softcap):
    return _grads_like(x, linear_weight, linear_bias, target,
                       (need_input, need_weight, need_bias, need_target))


def _scale_flat_(grad: Tensor, dloss: Tensor) -> None:
    """grad *= dloss (a 0-d tensor) in place through the core's scale_grad (no traffic when
    dloss is 1, decided on the device). grad is contiguous; it is seen as rows of _SCALE_ROW
    elements plus one shorter row, so that V x H or N x H gradients launch long rows, not V
    short ones."""
    backend = backend_for(_FN, grad)
    flat = grad.view(-1)
    full = flat.numel() // _SCALE_ROW * _SCALE_ROW
    if full:
        backend.scale_grad(flat[:full].view(-1, _SCALE_ROW), dloss)
    if full < flat.numel():
        backend.scale_grad(flat[full:].view(1, -1), dloss)


scale_flat_ = _ops._custom_op("scale_flat_", _scale_flat_, ("grad",))


@scale_flat_.register_fake
def _(grad, dloss):
    return None


# torch.func.vmap over linear_cross_entropy (per-sample gradients) reaches these ops with
# batched tensors: each loops over the batch (_ops._loop_rule), as the cross-entropy ops do
if hasattr(torch.library, "register_vmap"):  # torch >= 2.5; older torch: no vmap support
    for _op in (linear_cross_entropy_fwd, linear_cross_entropy_bwd, scale_flat_):
        torch.library.register_vmap(_op, _ops._loop_rule(_op))
