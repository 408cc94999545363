"""Public cross-entropy functions, their autograd Function and the nn.Module.

A call flows one way: check the inputs, flatten to (N, V), pick the backend,
run the autograd Function, which calls the launchers.

Gradient strategy (the plan, decided on the host from flags alone, see _grad_plan):
- no gradient can be taken (torch.no_grad, inference_mode, or an input that does not
  require grad): forward only; the caller's logits are never written.
- 'fused': reduction 'mean' or 'sum' with a gradient needed: the forward kernel writes
  the gradient of the reduced loss while each row is still in L2; backward only
  multiplies it by the upstream scalar, a no-op decided on the device when that scalar
  is 1. Not for fp16 logits (see _late_scale), which take the next path.
- 'late': reduction 'none' or fp16 logits: forward saves the per-row max, log d and S
  (12 bytes a row); backward reads the logits once and writes the gradient times the
  upstream gradient.
- inplace: both paths can write the gradient over the logits (inplace_backward).
- A probability target that requires grad gets its gradient from the same sweep that
  writes the logits' (or alone, when the logits need none).

Double backward (create_graph=True): the 'late' path recomputes its gradient with
differentiable torch operations from the saved logits, so any order of derivative is
torch's; the 'fused' path has no logits left to differentiate, so it hands out the
gradient through a node whose own backward raises (first-order uses such as
torch.func.grad still work).
"""

from typing import NamedTuple, Optional

import torch

from . import _autocast, _backend, _checks, _dispatch, _ops, reference
from ._reduction import acc_dtype, no_second_order, take_fused_grad

_SECOND_ORDER_HINT = (
    "the gradient of reduction 'mean' or 'sum' is made in forward, from logits that are gone; "
    "compute the loss with reduction='none' and reduce it yourself (that path recomputes its "
    "gradient differentiably), or use torch.nn.functional.cross_entropy")


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


def _forward(x, t, weight, opts, grad_into, loss_dtype, fn, with_stats=False, target_grad=False):
    """(loss, stats, scale, grad, dtarget) of 2-D inputs: the reduced loss (of loss_dtype),
    the per-row stats ((4, N): loss, max, log d, S; (7, N) with_stats: then lse, entropy,
    correct), the reduction's (3,) [grad_scale, denominator, ok], the fused gradient and,
    with target_grad, the probability target's (None when not made).

    grad_into: None (no gradient of the logits), "new" (a new tensor), "logits" (overwrite
    x), or a tensor to write the gradient into. One op (_ops.cross_entropy_forward*), whose
    launches are the reduction's scale (which also checks the class ids), the loss kernel
    and the reduced loss's sum (not for 'none'); in plain eager mode its implementation
    (_ops.forward_eager).
    """
    run = _ops.runner(x)
    if run is _ops.run_eager and not isinstance(grad_into, torch.Tensor):
        loss, stats, scale, grad, dtarget = _ops.forward_eager(
            x, t, weight, opts, loss_dtype, with_stats, fn, grad_into, target_grad)
        return loss, stats, scale, grad, dtarget
    args = (x, t, weight, *opts, loss_dtype, with_stats, fn)
    dtarget = None
    if grad_into is None or grad_into == "new":
        loss, stats, scale, grad, dtarget = run(_ops.cross_entropy_forward, *args,
                                                grad_into == "new", target_grad)
        grad = grad if grad_into == "new" else None
    elif isinstance(grad_into, str):
        loss, stats, scale, dtarget = run(_ops.cross_entropy_forward_inplace, *args, target_grad)
        grad = x
    else:
        loss, stats, scale = run(_ops.cross_entropy_forward_out, *args, grad_into)
        grad = grad_into
    return loss, stats, scale, grad, dtarget if target_grad else None


_LATE_DTYPES = (torch.float16, torch.float64)


def _late_scale(x):
    """fp16 gradients are made at backward time, once the upstream gradient is known.

    A fused fp16 gradient would be rounded as (p - y) / N before a loss scaler's factor
    multiplies it, flushing every entry below fp16's smallest subnormal (6e-8) to zero;
    torch applies the upstream gradient before the cast. bf16 has fp32's exponent range.
    float64 (the pure-PyTorch path, for checking rather than speed) takes the late path
    too, so that it behaves as torch's in every autograd mode: retain_graph, gradcheck,
    double backward.
    """
    return x.dtype in _LATE_DTYPES


class _Plan(NamedTuple):
    """How a call makes its gradients (see the module docstring)."""

    path: str        # "fused" or "late"
    inplace: bool    # the logits' gradient overwrites them
    need_x: bool     # the logits' gradient
    need_t: bool     # the probability target's gradient
    grad_into: Optional[str]  # where forward writes the logits' gradient: None (not in
                              # forward), "new" or "logits" (the fused path)
    fused_t: bool    # forward writes the probability target's gradient (the fused path)


_PLANS = {}  # (reduction, dtype, inplace_backward, need_x, need_t) -> its _Plan, made once


def _grad_plan(x, t, prob, opts, inplace_backward):
    """The _Plan of this call, or None when no gradient can be taken (decided from flags)."""
    if not torch.is_grad_enabled():
        return None
    need_x, need_t = x.requires_grad, prob and t.requires_grad
    if not (need_x or need_t):
        return None
    key = (opts.reduction, x.dtype, inplace_backward, need_x, need_t)
    plan = _PLANS.get(key)
    if plan is None:
        path = "late" if opts.reduction == "none" or _late_scale(x) else "fused"
        inplace = inplace_backward and need_x
        fused = path == "fused"
        grad_into = ("logits" if inplace else "new") if fused and need_x else None
        plan = _PLANS[key] = _Plan(path, inplace, need_x, need_t, grad_into, fused and need_t)
    return plan


def _differentiable_grad(x, t, weight, opts, dloss, grad_scale, need_x, need_t):
    """(dx, dt): dloss * grad_scale * the gradients of the logits and of a probability target,
    from torch operations that autograd can differentiate again (None where not needed).

    The same math as the kernels (kernels/cross_entropy.py), written with softmax and
    logsumexp so that every derivative of it is torch's. Used only under create_graph=True.
    """
    acc = acc_dtype(x)
    V = x.shape[1]
    xa = x.to(acc)
    if opts.softcap is None:
        z = xa
    else:
        c = opts.softcap
        pad = xa == float("-inf")
        th = torch.tanh(torch.where(pad, torch.zeros_like(xa), xa) / c)
        z = torch.where(pad, xa, c * th)
    y, valid, _ = reference._target_matrix(t, weight, V, opts.ignore_index,
                                           opts.label_smoothing, acc)
    lse = torch.logsumexp(z, dim=1)
    scale = (dloss.to(acc) * grad_scale.reshape(-1)[0].to(acc)).expand(x.shape[0])
    scale = torch.where(valid, scale, torch.zeros_like(scale))[:, None]
    dx = dt = None
    if need_x:
        p = torch.exp(z - lse[:, None])
        coef = y.sum(dim=1) + 2.0 * opts.z_loss * lse
        dx = (p * coef[:, None] - y) * scale
        if opts.softcap is not None:
            dx = dx * torch.where(pad, torch.zeros_like(th), 1.0 - th * th)
        dx = dx.to(x.dtype)
    if need_t:
        dt = (1.0 - opts.label_smoothing) * scale * (lse[:, None] - z)
        if weight is not None:
            dt = dt * weight.to(acc)
        dt = dt.to(t.dtype)
    return dx, dt


def _function_forward(x, t, weight, opts, plan, with_stats, fn, loss_dtype):
    """The outputs of _CrossEntropyFunction's forward (see there)."""
    grad_into, fused_t = (None, False) if plan is None else (plan.grad_into, plan.fused_t)
    loss, stats, scale, grad, dt = _forward(x, t, weight, opts, grad_into, loss_dtype, fn,
                                            with_stats, fused_t)
    late = plan is not None and plan.path == "late"
    return loss, stats, grad if grad_into == "new" else None, dt, scale if late else None


def _save(ctx, x, t, weight, opts, plan, fn, stats, grad, dt, grad_scale, backend=None):
    """What backward needs, on ctx (both Functions below); backend: the one that ran the
    forward's launches, when known (the fused backward's scaling then runs there without
    looking it up)."""
    ctx.opts, ctx.plan, ctx.fn, ctx.consumed, ctx.backend = opts, plan, fn, False, backend
    if plan is None:
        return
    if plan.path == "fused":
        # with inplace_backward the op declared its write into x (its version is bumped):
        # any other saved use of the old logits fails loudly
        ctx.save_for_backward(x if plan.inplace else grad, dt)
    else:
        ctx.save_for_backward(x, t, weight, stats, grad_scale)


class _CrossEntropyFunction(torch.autograd.Function):
    """Outputs: (loss, stats, fused dx, fused dt, grad_scale), all but the loss marked
    non-differentiable; None where a plan makes no such tensor."""

    generate_vmap_rule = True  # its ops have vmap rules (_ops.py)

    @staticmethod
    def forward(x, t, weight, opts, prob, plan, with_stats, fn, loss_dtype):
        return _function_forward(x, t, weight, opts, plan, with_stats, fn, loss_dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        loss, stats, grad, dt, grad_scale = output
        ctx.mark_non_differentiable(*(o for o in output[1:] if o is not None))
        # the extra outputs get no gradient: never materialise an N x V zeros tensor for them
        ctx.set_materialize_grads(False)
        x, t, weight, opts, _, plan, _, fn, _ = inputs
        _save(ctx, x, t, weight, opts, plan, fn, stats, grad, dt, grad_scale)

    @staticmethod
    def backward(ctx, dloss, *_):
        return (*_backward(ctx, dloss), *(None,) * 7)


def _backward(ctx, dloss):
    """(dx, dt) of either Function below (None where no gradient is made)."""
    plan = ctx.plan
    if dloss is None:  # no gradient reached the loss (grads are not materialised)
        return None, None
    second_order = torch.is_grad_enabled()  # create_graph=True
    if plan.path == "fused":
        dx, dt = take_fused_grad(ctx, ctx.fn)
        if second_order:  # the logits are gone: a gradient that cannot be differentiated
            return no_second_order(ctx.fn, _SECOND_ORDER_HINT, dloss, dx, dt)
        _ops.scale_grads_(dloss, dx, dt, plan.inplace, ctx.backend)
        return dx, dt
    run = _ops.runner(dloss)
    x, t, weight, stats, grad_scale = ctx.saved_tensors
    o = ctx.opts
    if second_order:  # a gradient autograd can differentiate again
        return _differentiable_grad(x, t, weight, o, dloss, grad_scale, plan.need_x, plan.need_t)
    args = (x, t, weight, stats, dloss, grad_scale, o.ignore_index, o.label_smoothing,
            o.z_loss, o.softcap)
    if run is _ops.run_eager:  # the op's implementation, without its layer
        dx, dt = _ops.backward_eager(*args, plan.inplace, plan.need_x, plan.need_t, ctx.backend)
    elif plan.inplace:
        dt = run(_ops.cross_entropy_bwd_inplace, *args, plan.need_t)
        dx = x
    else:
        dx, dt = run(_ops.cross_entropy_bwd, *args, plan.need_x, plan.need_t)
    return dx if plan.need_x else None, dt if plan.need_t else None


class _EagerCrossEntropyFunction(torch.autograd.Function):
    """_CrossEntropyFunction for plain eager mode (_dispatch.eager): the same forward and
    backward, with the loss as its only output, the tensors that may need a gradient (logits,
    target) as its only inputs and everything else in one tuple (call: weight, opts, plan,
    with_stats, fn, loss_dtype, box); the per-row stats reach the caller through ``box`` (a
    list; None when they are not asked for). Each further input or output of a Function
    costs autograd host time on every call, against a few tens of microseconds for a whole
    small call (softmax-ce-bench overhead). The weight never needs one (check_weight)."""

    @staticmethod
    def forward(ctx, x, t, call):
        weight, opts, plan, with_stats, fn, loss_dtype, box = call
        grad_into, fused_t = (None, False) if plan is None else (plan.grad_into, plan.fused_t)
        backend = _backend.backend_for(fn, x)
        loss, stats, scale, grad, dt = _ops.forward_eager(x, t, weight, opts, loss_dtype,
                                                          with_stats, fn, grad_into, fused_t,
                                                          backend)
        _save(ctx, x, t, weight, opts, plan, fn, stats, grad, dt, scale, backend)
        if box is not None:
            box.append(stats)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        return (*_backward(ctx, dloss), None)


_EAGER_APPLY = torch._C._FunctionBase.__dict__["apply"].__get__(None, _EagerCrossEntropyFunction)


class CrossEntropyStats(NamedTuple):
    """Per-row statistics of a cross-entropy call, from the pass that computes its loss
    (return_stats=True). Tensors of the batch shape, without gradient:

    lse: the log-sum-exp of the (softcapped) logits, float32 (float64 for float64 input);
    entropy: of their softmax, H = lse - sum_j p_j z_j, same dtype;
    correct: bool, whether the argmax of the logits (first index on ties, as torch.argmax)
        is the target class (for probability targets: the argmax of the target row).
    Ignored rows read nothing: their lse and entropy are NaN and correct is False.
    """

    lse: torch.Tensor
    entropy: torch.Tensor
    correct: torch.Tensor


def _stats(stats, shape, saved=False):
    # lse and entropy copied out when the stats are saved for backward (saved: the late
    # path), which an in-place change of a view of them (st.lse.nan_to_num_()) would then
    # make fail; otherwise views of the stats, which nothing else reads
    ex = stats[4:6].clone() if saved else stats[4:6]
    return CrossEntropyStats(ex[0].reshape(shape), ex[1].reshape(shape),
                             (stats[6] != 0).reshape(shape))


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                  reduction="mean", label_smoothing=0.0, *, z_loss=0.0, softcap=None,
                  inplace_backward=False, return_stats=False):
    """Softmax cross-entropy with torch.nn.functional.cross_entropy's signature and values, fused.

    Args (torch's, in torch's order):
        input: (N, V), (V,) or (N, V, d1, ...) float16/bfloat16/float32/float64 logits; any
            strides for (N, V).
        target: class ids of shape (N,) / () / (N, d1, ...) in any integer dtype, each in
            [0, V) or equal to ignore_index; or probabilities of the input's shape.
        weight: None (default) or (V,) class weights of any floating dtype (computed in fp32,
            fp64 for fp64 input), any strides.
        size_average, reduce: deprecated, as in torch: when either is given it decides the
            reduction (with torch's warning).
        ignore_index: rows whose class id equals it count for nothing (default -100);
            class-id targets only; with probability targets only a negative value is
            accepted (and has no effect), as in torch.
        reduction: 'mean' (default; over the weights of the non-ignored rows, or N for
            probabilities; NaN when that is 0), 'sum', or 'none' (per-row losses).
        label_smoothing: in [0, 1] (default 0.0), torch's definition.

    Keyword-only extras:
        z_loss: >= 0 (default 0.0): adds z_loss * lse^2 to each non-ignored row's loss
            (unweighted), reduced like the rest.
        softcap: None (default) or c > 0: the logits become c * tanh(logits / c) first; a
            -inf logit stays -inf.
        inplace_backward: False (default). True writes the gradient into the input's storage
            (no N x V allocation): the input's values are then gone, and its version counter
            is bumped so that any other autograd use of it fails loudly. For inputs of rank
            > 2 the gradient goes into the internal channels-last copy instead. Nothing is
            written when no gradient can be taken (torch.no_grad, inference_mode).
        return_stats: False (default). True returns (loss, CrossEntropyStats(lse, entropy,
            correct)): per-row statistics of the batch shape from the same pass (no extra
            read of the logits), without gradient.

    Returns: the loss, of the input's dtype (float32 for fp16/bf16 input under
    torch.autocast, as torch's), a scalar or the batch shape for 'none'. The gradient has
    the input's dtype; a probability target that requires grad gets torch's gradient,
    (1 - label_smoothing) w_j (lse - z_j) per row before the reduction, in its own dtype.

    Deviation from torch, by design: with probability targets, a class with target 0 and
    logit -inf (vocabulary padding) contributes 0 to the loss, where torch gives NaN.
    """
    fn = "cross_entropy"
    reduction = _checks.legacy_reduction(size_average, reduce, reduction)
    given_weight = weight
    opts, _, prob, target, weight = _checks.check_cross_entropy(
        fn, input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap)
    _checks.check_bool(fn, "inplace_backward", inplace_backward)
    _checks.check_bool(fn, "return_stats", return_stats)
    x, t = _flatten(input, target, prob)
    plan = _grad_plan(input, target, prob, opts, inplace_backward)
    if plan is not None and plan.inplace:
        _checks.check_inplace(fn, x, (("target", t), ("weight", given_weight)))
    loss_dtype = _autocast.loss_dtype(input)
    if _dispatch.eager(x):
        if plan is None and _dispatch.no_forward_ad():  # no gradient can be taken, no tangent
            # carried: the forward alone, without autograd (a dual tensor goes through the
            # Function, which refuses forward-mode AD loudly instead of dropping its tangent)
            loss, stats = _ops.forward_eager(x, t, weight, opts, loss_dtype, return_stats, fn,
                                             None, False)[:2]
        else:
            box = [] if return_stats else None
            loss = _EAGER_APPLY(x, t, (weight, opts, plan, return_stats, fn, loss_dtype, box))
            stats = box[0] if return_stats else None
    else:
        loss, stats = _CrossEntropyFunction.apply(x, t, weight, opts, prob, plan, return_stats,
                                                  fn, loss_dtype)[:2]
    if opts.reduction == "none" and input.dim() != 2:  # (N,) already for 2-D input
        loss = loss.reshape(_batch_shape(input))
    if not return_stats:
        return loss
    return loss, _stats(stats, _batch_shape(input), plan is not None and plan.path == "late")


def cross_entropy_with_grad(input, target, weight=None, size_average=None, ignore_index=-100,
                            reduce=None, reduction="mean", label_smoothing=0.0, *, z_loss=0.0,
                            softcap=None, out=None, return_stats=False):
    """(loss, dinput) in one fused pass, without autograd.

    Same arguments as cross_entropy. dinput is the derivative of the returned loss
    with respect to the input, of its shape and dtype; for reduction='none' it is
    the derivative of the sum of the per-row losses (row r holds d loss_r / d input_r).
    out: None (default: a new tensor) or a tensor of the input's shape, dtype and device,
    any strides, to write dinput into; it may be the input itself (an in-place gradient)
    but must not otherwise overlap the input, the target or the weight, nor itself.
    return_stats: False (default); True returns (loss, dinput, CrossEntropyStats).
    """
    fn = "cross_entropy_with_grad"
    reduction = _checks.legacy_reduction(size_average, reduce, reduction)
    given = (("target", target), ("weight", weight))
    opts, _, prob, target, weight = _checks.check_cross_entropy(
        fn, input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap)
    in_place = _checks.check_out(fn, out, input, given)
    _checks.check_bool(fn, "return_stats", return_stats)
    with torch.no_grad():
        x, t = _flatten(input, target, prob)
        if out is None or input.dim() > 2:
            grad_into = "new"
        elif in_place:
            grad_into = "logits"
        else:
            grad_into = out.unsqueeze(0) if input.dim() == 1 else out
        loss, stats, _, grad, _ = _forward(x, t, weight, opts, grad_into,
                                           _autocast.loss_dtype(input), fn, return_stats)
        dinput = _unflatten_grad(grad, input)
        if out is not None:
            if input.dim() > 2:  # computed channels-last: copy into the caller's layout
                out.copy_(dinput)
            dinput = out
    if opts.reduction == "none":
        loss = loss.reshape(_batch_shape(input))
    if return_stats:
        return loss, dinput, _stats(stats, _batch_shape(input))
    return loss, dinput


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """torch.nn.CrossEntropyLoss running softmax_ce_gpu.cross_entropy (a subclass of it).

    Same constructor as torch's (weight, size_average, ignore_index, reduce, reduction,
    label_smoothing), plus the keyword-only extras z_loss, softcap and inplace_backward of
    cross_entropy; weight is the buffer 'weight', so state dicts load both ways.
    """

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean", label_smoothing=0.0, *, z_loss=0.0, softcap=None,
                 inplace_backward=False):
        fn = "CrossEntropyLoss"
        reduction = _checks.legacy_reduction(size_average, reduce, reduction)
        opts = _checks.check_options(fn, ignore_index, reduction, label_smoothing, z_loss, softcap)
        _checks.check_bool(fn, "inplace_backward", inplace_backward)
        if weight is not None and not isinstance(weight, torch.Tensor):
            raise TypeError(f"{fn}: argument 'weight' must be a torch.Tensor or None, "
                            f"got {type(weight).__name__}")
        super().__init__(weight, ignore_index=opts.ignore_index, reduction=opts.reduction,
                         label_smoothing=opts.label_smoothing)
        self.z_loss = opts.z_loss
        self.softcap = opts.softcap
        self.inplace_backward = inplace_backward

    def forward(self, input, target):
        return cross_entropy(input, target, self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing,
                             z_loss=self.z_loss, softcap=self.softcap,
                             inplace_backward=self.inplace_backward)

    def extra_repr(self):
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
                f"softcap={self.softcap}, inplace_backward={self.inplace_backward}")
