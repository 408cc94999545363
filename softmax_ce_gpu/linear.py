"""Fused linear + softmax cross-entropy that never holds the (N, V) logits.

The math. With x (N, H) the input, W (V, H) the linear weight, b (V,) the bias:

    logits = x W^T + b                       (N, V), never materialised as a whole
    dlogits = scale * (p * S - y) [...]      the core's fused gradient (cross_entropy.py)
    grad_input = dlogits W                   (N, H)
    grad_W     = dlogits^T x                 (V, H)
    grad_b     = sum over rows of dlogits    (V,)

so the rows can be processed a chunk at a time: per chunk of C rows, one matmul
gives the chunk's logits (cuBLAS, fp32 accumulation, rounded once to the input
dtype as F.linear does), the core's forward kernel turns them into dlogits in
the same buffer (grad=logits), and two more matmuls give that chunk's rows of
grad_input and its contribution to grad_W (accumulated in fp32, cast once at
the end); grad_b accumulates the chunk's column sums in fp32.

Forward vs backward, per reduction:
- 'mean' / 'sum' with a gradient needed: everything above runs in forward (the
  mean denominator is computed on the device over all rows before the first
  chunk, as loss.py does, and is folded into the kernel's grad_scale). The
  backward only multiplies the three gradients by the upstream scalar, through
  the core's scale_grad launcher (no memory traffic when it is 1, decided on the
  device): no host sync, no .item().
- 'none': forward runs the chunks for the loss only and keeps the per-row max,
  log d and S (12 bytes a row); backward recomputes each chunk's logits and
  runs the core's backward kernel with that chunk's rows of the upstream
  gradient, then the same two matmuls.
- no gradient needed (torch.no_grad, or no input requires grad): loss only.

Memory beyond the inputs and the returned gradients: one chunk of logits
(C x V in the input dtype, reused for dlogits), the fp32 grad_W accumulator
(V x H x 4 bytes; for fp32 input it is the gradient itself) and grad_b's,
O(N) scalars per row. Never N x V. When the input is fp16/bf16 the cast of the
fp32 accumulator briefly holds both copies of grad_W. On CPU (and on a CUDA
torch without addmm(out_dtype=)) the fp32 accumulation of a low-precision
chunk goes through fp32 copies of the chunk's operands: C x (V + H) x 4 bytes.

Default chunk size (chunk_size=None), from V, H and free memory:
    budget = 64 MiB on CPU; on CUDA, a quarter of (free device memory + memory
             cached by torch's allocator - the gradient buffers still to be
             allocated, V*H*(4 + b) + N*H*b), at most 512 MiB
    C      = budget // (V * b), b the input's element size, rounded down to a
             multiple of 256 and clamped to [256, 2048] rows (fewer rows leave
             the GEMMs and the row kernel under-occupied; more buy little), then
             to N.
At V = 128256 in bf16 that is 2048 rows (512 MiB) on a roomy GPU, against 2 GiB
for 8192 tokens of full logits. torch.cuda.mem_get_info is a host query, not a
stream synchronisation.

Ignored rows (target == ignore_index) still go through the matmuls: skipping
them would mean compacting the rows, which needs their count on the host (a
sync). The cross-entropy kernel itself reads no logits of an ignored row and
writes zeros to its dlogits, so those rows add nothing to any gradient.

The chunk loops (forward, and the late path's backward) are custom ops
(softmax_ce_gpu/_linear_ops.py): under torch.compile and torch.export the autograd
Function below is traced around opaque calls of known output shapes, so no compiled
graph holds a chunk of logits, let alone N x V; in plain eager mode they run directly
(_ops.runner). The default chunk is chosen inside the op, at run time.

K-dimensional heads (linear_weight (V, d1, ..., dK, H), torch's "out_features")
are D = d1 * ... * dK independent (V, H) heads over the same input: they run
one after another, sharing the device-side mean denominator.

Differences from torch.nn.functional.linear_cross_entropy (torch 2.13), by design:
bad input raises TypeError/ValueError (torch: RuntimeError); `options` is
accepted but only its batch_chunk_size and allow_retain_graph apply; input may
also be (..., H), flattened to rows. A probability target that requires grad
gets torch's gradient, written by the kernel with each chunk's dlogits.
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from . import _autocast, _checks, _dispatch, _linear_ops, _ops
from ._reduction import no_second_order, take_fused_grad
from .loss import CrossEntropyStats

_FN = "linear_cross_entropy"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class _Spec:
    """What the autograd Function needs besides tensors."""

    opts: _checks.LossOptions
    prob: bool
    heads: int                    # D = prod(out_features), 1 for a (V, H) weight
    chunk: Optional[int]          # rows per chunk; None: the default rule, at run time
    need: Tuple[bool, bool, bool, bool]  # gradients of input, linear_weight, linear_bias, target
    retain: bool                  # allow a second backward through the fused path
    loss_dtype: torch.dtype       # the input's, fp32 for fp16/bf16 under autocast, or as asked
    with_stats: bool = False      # the per-row statistics of CrossEntropyStats


def _options(spec):
    o = spec.opts
    return (o.ignore_index, o.label_smoothing, o.z_loss, o.softcap)


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """Outputs: (loss, stats, grad_scale, grad_input, grad_weight, grad_bias, grad_target), all
    but the loss marked non-differentiable, None where not made: the four gradients when
    fused, else (a gradient needed) grad_scale; stats (the per-row rows, (4 or 7, D, N)) always.

    The chunk loops are the custom ops of _linear_ops.py (one call in forward, one in the
    late backward), so torch.compile traces this Function around opaque calls."""

    generate_vmap_rule = True  # its ops have vmap rules (_linear_ops.py, _ops.py)

    @staticmethod
    def forward(x, lw, lb, t, weight, spec):
        opts = spec.opts
        N, V, D = x.shape[0], lw.shape[0], spec.heads
        run = _ops.runner(x)  # one eager-or-op decision for the forward
        # device-side denominator over all N * D rows, before any chunk runs (for
        # probabilities only the row count N * D matters); it also checks the class ids
        mean = opts.reduction == "mean"
        ids = t.new_empty(N * D, 0) if spec.prob else t.reshape(-1)
        scale = run(_ops.loss_scale, x, ids, weight, V, opts.ignore_index, mean, spec.prob, _FN)
        grad_scale = scale  # (its first element: the kernels' grad_scale)
        fuse = _fused(spec, x)
        need = spec.need if fuse else (False,) * 4
        stats, gi, gw, gb, gt = run(_linear_ops.linear_cross_entropy_fwd, x, lw, lb, t, weight,
                                    grad_scale, D, spec.prob, spec.chunk, *need, spec.with_stats,
                                    *_options(spec))
        loss_rows = stats[0]
        if opts.reduction == "none":
            # (N, D): row n, head k; a copy, never a view of the stats saved for backward
            loss = loss_rows.t().to(spec.loss_dtype, copy=True)
        else:
            loss = run(_ops.loss_reduce, loss_rows.reshape(-1), scale, mean, spec.loss_dtype)
        if fuse:
            return (loss, stats, None,
                    *(g if n else None for g, n in zip((gi, gw, gb, gt), need)))
        return (loss, stats, grad_scale if any(spec.need) else None, None, None, None, None)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, lw, lb, t, weight, spec = inputs
        ctx.spec, ctx.consumed = spec, False
        ctx.fused = _fused(spec, x)
        ctx.mark_non_differentiable(*(o for o in output[1:] if o is not None))
        # the extra outputs get no gradient: never materialise an N x V zeros tensor for them
        ctx.set_materialize_grads(False)
        if ctx.fused:
            ctx.save_for_backward(*output[3:])
        elif any(spec.need):
            ctx.save_for_backward(x, lw, lb, t, weight, output[1], output[2])

    @staticmethod
    def backward(ctx, dloss, *_):
        if dloss is None:  # no gradient reached the loss (grads are not materialised)
            return (None,) * 6
        spec = ctx.spec
        second_order = torch.is_grad_enabled()  # create_graph=True
        if ctx.fused:
            if second_order or spec.retain:  # out of place
                gi, gw, gb, gt = ctx.saved_tensors
                if second_order:
                    gi, gw, gb, gt = no_second_order(_FN, _SECOND_ORDER_HINT, dloss,
                                                     gi, gw, gb, gt)
                    return gi, gw, gb, gt, None, None
                gi, gw, gb, gt = (None if g is None else g * dloss for g in (gi, gw, gb, gt))
                return gi, gw, gb, gt, None, None
            # in place, once: the op declares its write (bumping the saved tensors' versions)
            gi, gw, gb, gt = take_fused_grad(ctx, _FN, "compute the loss again, or pass "
                                                   "options with allow_retain_graph=True")
            run = _ops.runner(dloss)
            for g in (gi, gw, gb, gt):
                if g is not None and g.numel():
                    run(_linear_ops.scale_flat_, g, dloss)
            return gi, gw, gb, gt, None, None
        x, lw, lb, t, weight, stats, grad_scale = ctx.saved_tensors
        with torch.no_grad():
            grads = _ops.call(_linear_ops.linear_cross_entropy_bwd, x, lw, lb, t, weight, stats,
                              dloss, grad_scale, spec.heads, spec.prob, spec.chunk, *spec.need,
                              *_options(spec))
        grads = tuple(g if n else None for g, n in zip(grads, spec.need))
        if second_order:
            grads = no_second_order(_FN, _SECOND_ORDER_HINT, None, *grads)
        return (*grads, None, None)


def _fused(spec, x):
    """Whether forward makes the gradients: 'mean'/'sum' with a gradient needed, not fp16
    (whose gradient must meet the upstream scale before it is rounded, see loss.py)."""
    return any(spec.need) and spec.opts.reduction != "none" and x.dtype != torch.float16


_SECOND_ORDER_HINT = ("linear_cross_entropy's gradients are made chunk by chunk from logits "
                      "it never keeps; use torch.nn.functional.linear_cross_entropy")


# ----------------------------------------------------------------------------- checks


def _check_tensor(name, value, like=None):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{_FN}: argument '{name}' must be a torch.Tensor, "
                        f"got {type(value).__name__}")
    _checks.check_dense(_FN, name, value)
    if like is None:
        return
    if value.dtype != like.dtype:
        raise TypeError(f"{_FN}: argument '{name}' must have the input's dtype {like.dtype}, "
                        f"got {value.dtype}")
    if value.device != like.device:
        raise ValueError(f"{_FN}: argument '{name}' is on {value.device} but 'input' is on "
                         f"{like.device}")


def _check_chunk(chunk_size, options, fn=_FN):
    if options is not None:
        if not hasattr(options, "batch_chunk_size"):
            raise TypeError(f"{fn}: argument 'options' must be None or a "
                            f"torch.nn.LinearCrossEntropyOptions, got {type(options).__name__}")
        if chunk_size is None:
            chunk_size = options.batch_chunk_size
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"{fn}: argument 'chunk_size' must be an int or None, got {chunk_size!r}")
    if chunk_size < 1:
        raise ValueError(f"{fn}: argument 'chunk_size' must be >= 1, got {chunk_size}")
    return chunk_size


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None,
                         reduction="mean", ignore_index=None, label_smoothing=0.0, options=None,
                         z_loss=0.0, softcap=None, chunk_size=None, return_stats=False):
    """cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...) in row chunks.

    Same arguments and results as torch.nn.functional.linear_cross_entropy (torch 2.13),
    plus the core's extras; the (N, V) logits are never held at once.

    Args:
        input: (N, H) or (H,) float16/bfloat16/float32/float64; also (..., H), flattened to
            rows (an extension: torch takes 1-D or 2-D only).
        linear_weight: (V, H) of the input's dtype, any strides; or (V, d1, ..., dK, H) for
            torch's K-dimensional loss (then input must be (N, H)).
        target: class ids of shape input.shape[:-1] (+ (d1, ..., dK)), any integer dtype, each
            in [0, V) or equal to ignore_index; or float probabilities of the logits' shape
            (input.shape[:-1] + (V,) + (d1, ..., dK)).
        linear_bias: None (default) or linear_weight.shape[:-1], of the input's dtype.
        weight: None (default) or (V,) class weights of the input's dtype (no gradient).
        reduction: 'mean' (default; over the weights of the non-ignored rows, or the number
            of rows for probabilities; NaN when that is 0), 'sum', or 'none'.
        ignore_index: None (default, torch's: -100 for class ids) or an int; giving it with
            probability targets is an error, as in torch.
        label_smoothing: in [0, 1] (default 0.0), torch's definition.
        options: None (default) or a torch.nn.LinearCrossEntropyOptions, accepted so that calls
            written for torch run unchanged: its batch_chunk_size is used when chunk_size is
            None, and allow_retain_graph=True permits a second backward; its other fields
            (acc_policy, acc_dtype, chunking_method) do not apply: this path is always chunked,
            accumulates in fp32 and chooses its chunk by the rule below.
        z_loss: >= 0 (default 0.0): adds z_loss * lse^2 to each non-ignored row's loss.
        softcap: None (default) or c > 0: logits become c * tanh(logits / c) first.
        chunk_size: None (default) or rows per chunk. None: budget // (V * element size)
            rows with budget 64 MiB on CPU, and on CUDA a quarter of the free memory left
            after the gradient buffers, at most 512 MiB; rounded down to a multiple of 256,
            clamped to [256, 2048], then to N.
        return_stats: False (default). True returns (loss, CrossEntropyStats(lse, entropy,
            correct)), per row (and head) of the logits, from the same pass (see
            cross_entropy); no extra pass over any chunk's logits.

    Returns: the loss, of the input's dtype: a scalar, or the per-row losses of shape
    input.shape[:-1] (+ (d1, ..., dK)) for 'none'; with return_stats, (loss, stats).

    Gradients flow to input, linear_weight, linear_bias and a probability target that
    requires grad (torch's d loss / d t, written by the kernel in the pass that writes the
    chunk's dlogits). For 'mean'/'sum' they are made in
    forward and handed out once: a second backward through the same loss raises unless
    options.allow_retain_graph is True. Ignored rows still cost their matmul work (skipping
    them would need a host sync).
    """
    return _linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction,
                                 ignore_index, label_smoothing, options, z_loss, softcap,
                                 chunk_size, loss_dtype=None, return_stats=return_stats)


def _linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction,
                          ignore_index, label_smoothing, options, z_loss, softcap, chunk_size, *,
                          loss_dtype, return_stats=False):
    """linear_cross_entropy, with the loss returned in loss_dtype (None: torch's rule, the
    input's dtype, fp32 for fp16/bf16 under autocast).

    The reduction is computed in the accumulation dtype (fp32, fp64 for fp64 input) whatever
    loss_dtype is; the transformers integration asks for fp32, the dtype of the stock
    loss, which upcasts the logits first, instead of a loss rounded to bf16.
    """
    _check_tensor("input", input)
    _checks.check_bool(_FN, "return_stats", return_stats)
    if isinstance(linear_weight, torch.Tensor) and isinstance(linear_bias, (torch.Tensor, type(None))):
        # under torch.autocast, the operands of the linear as F.linear would see them
        input, linear_weight, linear_bias = _autocast.linear_operands(input, linear_weight,
                                                                      linear_bias)
    if input.dtype not in _DTYPES:
        raise TypeError(f"{_FN}: argument 'input' must be float16, bfloat16, float32 or float64, "
                        f"got dtype {input.dtype}")
    if input.dim() == 0:
        raise ValueError(f"{_FN}: argument 'input' must have shape (N, H) or (H,), got shape ()")
    _check_tensor("linear_weight", linear_weight, input)
    if linear_weight.dim() < 2:
        raise ValueError(f"{_FN}: argument 'linear_weight' must have shape (V, H) or "
                         f"(V, d1, ..., dK, H), got {tuple(linear_weight.shape)}")
    H = input.shape[-1]
    V = linear_weight.shape[0]
    out_features = tuple(linear_weight.shape[1:-1])
    if linear_weight.shape[-1] != H or V == 0:
        raise ValueError(f"{_FN}: argument 'linear_weight' of shape {tuple(linear_weight.shape)} "
                         f"does not match input features H={H} (need (V >= 1, ..., {H}))")
    if out_features and input.dim() != 2:
        raise ValueError(f"{_FN}: a K-dimensional 'linear_weight' {tuple(linear_weight.shape)} "
                         f"needs input of shape (N, {H}), got {tuple(input.shape)}")
    if linear_bias is not None:
        _check_tensor("linear_bias", linear_bias, input)
        if tuple(linear_bias.shape) != tuple(linear_weight.shape[:-1]):
            raise ValueError(f"{_FN}: argument 'linear_bias' must have shape "
                             f"{tuple(linear_weight.shape[:-1])}, got {tuple(linear_bias.shape)}")
    _check_tensor("target", target)
    if target.device != input.device:
        raise ValueError(f"{_FN}: argument 'target' is on {target.device} but 'input' is on "
                         f"{input.device}")
    batch = tuple(input.shape[:-1])
    prob = target.is_floating_point()
    if prob:
        if tuple(target.shape) != batch + (V,) + out_features:
            raise ValueError(f"{_FN}: probability 'target' must have the logits' shape "
                             f"{batch + (V,) + out_features}, got {tuple(target.shape)}")
        if ignore_index is not None:
            raise ValueError(f"{_FN}: argument 'ignore_index' ({ignore_index}) cannot be given "
                             "with probability targets (torch refuses it too); leave it None")
    else:
        if target.dtype == torch.bool or target.is_complex():
            raise TypeError(f"{_FN}: argument 'target' must hold integer class ids or float "
                            f"probabilities, got dtype {target.dtype}")
        if tuple(target.shape) != batch + out_features:
            raise ValueError(f"{_FN}: class-id 'target' must have shape {batch + out_features} "
                             f"for input {tuple(input.shape)} and linear_weight "
                             f"{tuple(linear_weight.shape)}, got {tuple(target.shape)}")
    opts = _checks.check_options(_FN, -100 if ignore_index is None else ignore_index, reduction,
                                 label_smoothing, z_loss, softcap)
    weight = _checks.check_weight(_FN, input, weight, V)
    chunk_size = _check_chunk(chunk_size, options)
    if not prob:  # their range is checked by the reduction's launch (_ops.loss_scale)
        target = _checks.as_class_ids(target, opts.ignore_index)

    x = input.reshape(math.prod(batch), H)  # not -1: H may be 0
    N, D = x.shape[0], math.prod(out_features)
    # (N, V * D) probabilities, (N, D) class ids of K-dim heads, (N,) class ids of one head
    t = target.reshape(N, V * D) if prob else target.reshape((N, D) if D > 1 else (N,))
    grad_on = torch.is_grad_enabled()
    need = tuple(bool(grad_on and a is not None and a.requires_grad)
                 for a in (input, linear_weight, linear_bias, t if prob else None))
    spec = _Spec(opts, prob, D, chunk_size, need,
                 bool(getattr(options, "allow_retain_graph", False)),
                 _autocast.loss_dtype(input) if loss_dtype is None else loss_dtype, return_stats)
    out = _dispatch.apply(_LinearCrossEntropyFunction, x, linear_weight, linear_bias, t, weight,
                          spec)
    loss = out[0]
    if opts.reduction == "none":
        loss = loss.reshape(batch + out_features)
    if return_stats:
        # rows 4-6 of the (7, D, N) stats: row n, head k -> the batch shape (+ out_features)
        stats = out[1]
        shape = batch + out_features
        ex = stats[4:6].clone()  # copied out of the stats saved for backward (see loss.py)
        return loss, CrossEntropyStats(ex[0].t().reshape(shape), ex[1].t().reshape(shape),
                                       (stats[6] != 0).t().reshape(shape))
    return loss


class LinearCrossEntropyLoss(torch.nn.Module):
    """nn.Module like torch.nn.LinearCrossEntropyLoss: owns the Linear, runs linear_cross_entropy.

    Same constructor as torch's (in_features, num_classes, *, out_features=(), bias=False,
    device=None, dtype=None, reduction='mean', weight=None, ignore_index=None,
    label_smoothing=0.0, options=None) plus z_loss, softcap and chunk_size. As in torch the
    Linear's weight is stored flat, (num_classes * prod(out_features), in_features), under
    the name 'linear', and the class weights as the buffer 'weight', so state dicts load
    both ways.
    """

    def __init__(self, in_features, num_classes, *, out_features=(), bias=False, device=None,
                 dtype=None, reduction="mean", weight=None, ignore_index=None,
                 label_smoothing=0.0, options=None, z_loss=0.0, softcap=None, chunk_size=None):
        super().__init__()
        fn = "LinearCrossEntropyLoss"
        opts = _checks.check_options(fn, -100 if ignore_index is None else ignore_index,
                                     reduction, label_smoothing, z_loss, softcap)
        if weight is not None and not isinstance(weight, torch.Tensor):
            raise TypeError(f"{fn}: argument 'weight' must be a torch.Tensor or None, got "
                            f"{type(weight).__name__}")
        if weight is not None and tuple(weight.shape) != (num_classes,):
            raise ValueError(f"{fn}: argument 'weight' must be a tensor of shape "
                             f"({num_classes},), got shape {tuple(weight.shape)}")
        _check_chunk(chunk_size, options, fn)
        if isinstance(out_features, int) or not all(
                isinstance(d, int) and not isinstance(d, bool) for d in out_features):
            raise TypeError(f"{fn}: argument 'out_features' must be a tuple of ints, got "
                            f"{out_features!r}")
        self.num_classes = num_classes
        self.out_features = tuple(out_features)
        self.linear = torch.nn.Linear(in_features, math.prod(self.out_features) * num_classes,
                                      bias=bias, device=device, dtype=dtype)
        self.register_buffer("weight", weight)
        self.reduction = opts.reduction
        self.ignore_index = ignore_index
        self.label_smoothing = opts.label_smoothing
        self.options = options
        self.z_loss = opts.z_loss
        self.softcap = opts.softcap
        self.chunk_size = chunk_size

    def forward(self, input, target):
        shape = (self.num_classes,) + self.out_features
        lw = self.linear.weight.reshape(shape + (self.linear.in_features,))
        lb = None if self.linear.bias is None else self.linear.bias.reshape(shape)
        return linear_cross_entropy(input, lw, target, linear_bias=lb, weight=self.weight,
                                    reduction=self.reduction, ignore_index=self.ignore_index,
                                    label_smoothing=self.label_smoothing, options=self.options,
                                    z_loss=self.z_loss, softcap=self.softcap,
                                    chunk_size=self.chunk_size)

    def extra_repr(self):
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"out_features={self.out_features}, bias={self.linear.bias is not None}, "
                f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
                f"softcap={self.softcap}, chunk_size={self.chunk_size}")
