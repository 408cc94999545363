"""Public cross-entropy functions, their autograd Function and the nn.Module.

A call flows one way: check the inputs, flatten to (N, V), pick the backend,
run the autograd Function, which calls the launchers.

Gradient strategy:
- reduction 'mean' or 'sum' with a gradient needed: the forward kernel writes the
  gradient of the reduced loss while each row is still in L2 (fused); backward
  only multiplies it by the upstream scalar, a no-op decided on the device when
  that scalar is 1. Not for fp16 logits (see _late_scale), which take the next path.
- reduction 'none', or no gradient needed: forward saves the per-row max, log d
  and S (12 bytes a row); backward reads the logits once and writes the gradient
  times the per-row upstream gradient.
"""

import torch
from torch.autograd.function import once_differentiable

from . import _checks, _ops
from ._reduction import acc_dtype, reduce, reduction_scale, take_fused_grad


def _flatten(logits, target, prob):
    """(N, V) logits and (N,) / (N, V) target, following torch's class-dim-1 convention.

    2-D inputs (any strides) and 1-D inputs are views; rank > 2 moves the class dim
    last, which copies unless the memory is already channels-last.
    """
    if logits.dim() == 1:
        return logits.unsqueeze(0), target.unsqueeze(0)
    if logits.dim() == 2:
        return logits, target
    V = logits.shape[1]
    x = logits.movedim(1, -1).reshape(-1, V)
    t = target.movedim(1, -1).reshape(-1, V) if prob else target.reshape(-1)
    return x, t


def _unflatten_grad(grad2d, logits):
    if logits.dim() == 1:
        return grad2d.squeeze(0)
    if logits.dim() == 2:
        return grad2d
    shape = (logits.shape[0],) + tuple(logits.shape[2:]) + (logits.shape[1],)
    return grad2d.reshape(shape).movedim(-1, 1)


def _batch_shape(logits):
    if logits.dim() == 1:
        return ()
    return (logits.shape[0],) + tuple(logits.shape[2:])


def _forward(x, t, weight, opts, prob, grad_into):
    """Reduced loss, per-row stats, grad_scale and the fused gradient of 2-D inputs.

    grad_into: None (no gradient), "new" (a new tensor), "logits" (overwrite x), or a
    tensor to write the gradient into. N = 0 launches nothing.
    """
    denom, grad_scale = reduction_scale(t, weight, opts, prob, x.shape[0], acc_dtype(x), x.device)
    args = (weight, grad_scale, opts.ignore_index, opts.label_smoothing, opts.z_loss, opts.softcap)
    grad = None
    if grad_into is None or grad_into == "new":
        *stats, grad = _ops.cross_entropy_fwd(x, t, *args, grad_into == "new")
    elif isinstance(grad_into, str):
        stats = _ops.cross_entropy_fwd_inplace(x, t, *args)
        grad = x
    else:
        stats = _ops.cross_entropy_fwd_out(x, t, *args, grad_into)
        grad = grad_into
    loss = reduce(stats[0], denom, opts.reduction).to(x.dtype)
    return loss, stats, grad_scale, grad


def _late_scale(x):
    """fp16 gradients are made at backward time, once the upstream gradient is known.

    A fused fp16 gradient would be rounded as (p - y) / N before a loss scaler's factor
    multiplies it, flushing every entry below fp16's smallest subnormal (6e-8) to zero;
    torch applies the upstream gradient before the cast. bf16 has fp32's exponent range.
    """
    return x.dtype == torch.float16


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, t, weight, opts, prob, inplace_backward, fn):
        need_grad = ctx.needs_input_grad[0]
        fuse = need_grad and opts.reduction != "none" and not _late_scale(x)
        grad_into = ("logits" if inplace_backward else "new") if fuse else None
        loss, (_, row_max, row_logd, row_s), grad_scale, grad = _forward(x, t, weight, opts, prob,
                                                                         grad_into)
        ctx.opts, ctx.fn = opts, fn
        ctx.fused, ctx.inplace, ctx.consumed = fuse, inplace_backward, False
        if fuse:
            # with inplace_backward the op declared its write into x (its version is bumped):
            # any other saved use of the old logits fails loudly
            ctx.save_for_backward(grad)
        elif need_grad:
            ctx.save_for_backward(x, t, weight, row_max, row_logd, row_s, grad_scale)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, dloss):
        if ctx.fused:
            (grad,) = take_fused_grad(ctx, ctx.fn)
            _ops.scale_grad_(grad, dloss)
            return grad, None, None, None, None, None, None
        x, t, weight, row_max, row_logd, row_s, grad_scale = ctx.saved_tensors
        o = ctx.opts
        args = (x, t, weight, row_max, row_logd, row_s, dloss, grad_scale, o.ignore_index,
                o.label_smoothing, o.z_loss, o.softcap)
        if ctx.inplace:
            _ops.cross_entropy_bwd_inplace(*args)
            grad = x
        else:
            grad = _ops.cross_entropy_bwd(*args)
        return grad, None, None, None, None, None, None


def cross_entropy(logits, target, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, *, z_loss=0.0, softcap=None, inplace_backward=False):
    """Softmax cross-entropy with torch.nn.functional.cross_entropy's semantics, fused.

    Args:
        logits: (N, V), (V,) or (N, V, d1, ...) float16/bfloat16/float32/float64; any strides
            for (N, V).
        target: class ids of shape (N,) / () / (N, d1, ...) in any integer dtype, each in
            [0, V) or equal to ignore_index; or probabilities of the logits' shape.
        weight: None (default) or (V,) class weights of the logits' dtype.
        ignore_index: rows whose class id equals it count for nothing (default -100);
            class-id targets only, as in torch.
        reduction: 'mean' (default; over the weights of the non-ignored rows, or N for
            probabilities; NaN when that is 0), 'sum', or 'none' (per-row losses).
        label_smoothing: in [0, 1] (default 0.0), torch's definition.
        z_loss: >= 0 (default 0.0): adds z_loss * lse^2 to each non-ignored row's loss
            (unweighted), reduced like the rest.
        softcap: None (default) or c > 0: the logits become c * tanh(logits / c) first; a
            -inf logit stays -inf.
        inplace_backward: False (default). True writes the gradient into the logits' storage
            (no N x V allocation): the logits' values are then gone, and their version counter
            is bumped so that any other autograd use of them fails loudly. For inputs of rank
            > 2 the gradient goes into the internal channels-last copy instead.

    Returns: the loss, of the logits' dtype: a scalar, or the batch shape for 'none'.

    Deviation from torch, by design: with probability targets, a class with target 0 and
    logit -inf (vocabulary padding) contributes 0 to the loss, where torch gives NaN.
    """
    fn = "cross_entropy"
    opts, _, prob, target = _checks.check_cross_entropy(fn, logits, target, weight, ignore_index,
                                                        reduction, label_smoothing, z_loss,
                                                        softcap)
    _checks.check_bool(fn, "inplace_backward", inplace_backward)
    x, t = _flatten(logits, target, prob)
    loss = _CrossEntropyFunction.apply(x, t, weight, opts, prob, inplace_backward, fn)
    return loss.reshape(_batch_shape(logits)) if opts.reduction == "none" else loss


def cross_entropy_with_grad(logits, target, weight=None, ignore_index=-100, reduction="mean",
                            label_smoothing=0.0, *, z_loss=0.0, softcap=None, out=None):
    """(loss, dlogits) in one fused pass, without autograd.

    Same arguments as cross_entropy. dlogits is the derivative of the returned loss
    with respect to the logits, of their shape and dtype; for reduction='none' it is
    the derivative of the sum of the per-row losses (row r holds d loss_r / d logits_r).
    out: None (default: a new tensor) or a tensor of the logits' shape, dtype and device
    to write dlogits into; it may be the logits themselves (an in-place gradient) but must
    not otherwise overlap them.
    """
    fn = "cross_entropy_with_grad"
    opts, _, prob, target = _checks.check_cross_entropy(fn, logits, target, weight, ignore_index,
                                                        reduction, label_smoothing, z_loss,
                                                        softcap)
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{fn}: argument 'out' must be a torch.Tensor or None, "
                            f"got {type(out).__name__}")
        if out.dtype != logits.dtype:
            raise TypeError(f"{fn}: argument 'out' must have dtype {logits.dtype}, got {out.dtype}")
        if out.shape != logits.shape or out.device != logits.device:
            raise ValueError(f"{fn}: argument 'out' must have shape {tuple(logits.shape)} on "
                             f"{logits.device}, got {tuple(out.shape)} on {out.device}")
    with torch.no_grad():
        x, t = _flatten(logits, target, prob)
        if out is None or logits.dim() > 2:
            grad_into = "new"
        elif out is logits:
            grad_into = "logits"
        else:
            grad_into = out.unsqueeze(0) if logits.dim() == 1 else out
        loss, _, _, grad = _forward(x, t, weight, opts, prob, grad_into)
        dlogits = _unflatten_grad(grad, logits)
        if out is not None:
            if logits.dim() > 2:  # computed channels-last: copy into the caller's layout
                out.copy_(dlogits)
            dlogits = out
    if opts.reduction == "none":
        loss = loss.reshape(_batch_shape(logits))
    return loss, dlogits


class CrossEntropyLoss(torch.nn.Module):
    """nn.Module like torch.nn.CrossEntropyLoss, running softmax_ce_gpu.cross_entropy.

    Same options as cross_entropy; weight is registered as a buffer (it follows .to()).
    """

    def __init__(self, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, *,
                 z_loss=0.0, softcap=None, inplace_backward=False):
        super().__init__()
        fn = "CrossEntropyLoss"
        opts = _checks.check_options(fn, ignore_index, reduction, label_smoothing, z_loss, softcap)
        _checks.check_bool(fn, "inplace_backward", inplace_backward)
        if weight is not None and not isinstance(weight, torch.Tensor):
            raise TypeError(f"{fn}: argument 'weight' must be a torch.Tensor or None, "
                            f"got {type(weight).__name__}")
        self.register_buffer("weight", weight)
        self.ignore_index = opts.ignore_index
        self.reduction = opts.reduction
        self.label_smoothing = opts.label_smoothing
        self.z_loss = opts.z_loss
        self.softcap = opts.softcap
        self.inplace_backward = inplace_backward

    def forward(self, input, target):
        return cross_entropy(input, target, self.weight, self.ignore_index, self.reduction,
                             self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
                             inplace_backward=self.inplace_backward)

    def extra_repr(self):
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
                f"softcap={self.softcap}, inplace_backward={self.inplace_backward}")
