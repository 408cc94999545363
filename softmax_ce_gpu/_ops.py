"""The library's operators, registered with torch.library.

Each launcher step is a custom op with a fake (meta) implementation, so that
torch.compile (fullgraph, any backend) and torch.export see an opaque,
shape-known call instead of Python they cannot trace, and the mutations of the
in-place variants are declared (which also bumps the version counter of the
tensor they overwrite). Autograd lives one level up, in the autograd.Functions
of loss.py, which torch.compile traces through; each op picks its backend
(compiled kernels, interpreter, pure PyTorch) from the tensor it receives.

Naming: `op` returns new tensors; `op_out` writes into `out`; `op_inplace`
overwrites the logits with their gradient.

The host code calls them through call(op, ...): in plain eager mode (no tracing, no
torch.func transform, no dispatch mode; see _dispatch.eager) that runs the op's
implementation directly, which is what the custom op would run too, without its
dispatch cost.
"""

import inspect
from typing import Optional

import torch
from torch import Tensor

from . import _checks, _dispatch
from ._backend import backend_for
from ._reduction import acc_dtype

_NS = "softmax_ce_gpu"
# Up to this many rows the loss launch makes the reduction's scale itself (own_scale of the
# launchers): one launch less per forward, for each program reading every class id (2 KB of
# int64 ids at 256 rows, from L2); more rows take loss_scale's launch of one program
_OWN_SCALE_ROWS = 256
_EAGER = {}  # custom op -> (its implementation, positions of the arguments it mutates)
_CONTIGUOUS = torch.contiguous_format
_ACC = {dt: acc_dtype(torch.empty(0, dtype=dt))  # acc_dtype of each logits dtype, looked up
        for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def _custom_op(name, impl, mutates_args, eager_impl=None):
    """Register impl as the custom op softmax_ce_gpu::name; call() may run impl directly, or
    eager_impl when given: the same, except that an output not asked for may be None instead
    of the empty tensor an op must return (an allocation less)."""
    op = torch.library.custom_op(f"{_NS}::{name}", impl, mutates_args=mutates_args)
    params = list(inspect.signature(impl).parameters)
    _EAGER[op] = (eager_impl or impl, tuple(params.index(a) for a in mutates_args))
    return op


def run_eager(op, *args):
    """op(*args) by its eager implementation (see call)."""
    impl, mutated = _EAGER[op]
    out = impl(*args)
    for i in mutated:
        torch.autograd.graph.increment_version(args[i])
    return out


def _run_op(op, *args):
    return op(*args)


def runner(t):
    """call's decision made once for tensor t: a function run(op, *args) for a sequence of
    ops on t and the tensors made from it (one forward, one backward)."""
    return run_eager if _dispatch.eager(t) else _run_op


def call(op, *args):
    """op(*args), or in plain eager mode its implementation directly (see _dispatch): the
    custom op's dispatch costs tens of microseconds of host time per call. A mutation the
    op declares bumps the version counter, as the op would."""
    return runner(args[0])(op, *args)


def _stats_like(logits, with_stats=False):
    return logits.new_empty(7 if with_stats else 4, logits.shape[0], dtype=acc_dtype(logits))


def _check_ids(scale, fn, target, V, ignore_index):
    """The class-id range check of loss_scale's ok flag: a ValueError on CPU, where the
    value is already on the host; a device-side assert elsewhere (no host sync)."""
    if scale.is_cpu:
        if not scale.tolist()[2]:  # (tolist: the cheapest read of a CPU tensor's values)
            _checks.raise_class_range(fn, target, V, ignore_index)
    else:
        torch._assert_async(scale[2], _checks.class_range_message(fn, V, ignore_index))


def _forward(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
             loss_dtype, with_stats, fn, grad, dtarget, fresh=True, backend=None):
    """The forward of a cross-entropy call on (N, V) logits, every launch of it: the
    reduction's scale (which checks the class ids), the loss kernel (writing the fused
    gradient into grad and the probability target's into dtarget, each when not None),
    and the reduced loss's sum (not for 'none'). For few rows (_OWN_SCALE_ROWS) the loss
    launch makes the scale itself, when ``fresh``: grad and dtarget are this
    call's new tensors, so that a bad class id, found after that launch, has overwritten
    nothing of the caller's.

    Returns (loss, stats, scale): the loss of loss_dtype, the per-row stats ((4, N): loss,
    max, log d, S; (7, N) with_stats: then lse, entropy, correct) and loss_scale's (3,)
    [grad_scale, denominator, ok], which the loss kernels take as their grad_scale.
    backend: backend_for(fn, logits) when the caller has it already.
    """
    if backend is None:
        backend = backend_for(fn, logits)
    mean = reduction == "mean"
    prob = target.is_floating_point()
    N, V = logits.shape
    # few rows, and nothing of the caller's to write: the loss launch makes the scale itself
    # and the ids are checked after it (a bad id is clamped there: it reads no stray memory)
    own = fresh and 0 < N <= _OWN_SCALE_ROWS
    acc = _ACC[logits.dtype]
    if own:
        scale = logits.new_empty(3, dtype=acc)
    else:
        scale = backend.loss_scale(target, weight, ignore_index=ignore_index, mean=mean,
                                   prob=prob, V=V, acc=acc)
        if not prob:
            _check_ids(scale, fn, target, V, ignore_index)
    if N:
        stats = backend.cross_entropy_fwd(  # (positional: keywords cost host time)
            logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, grad, scale,
            None, with_stats, dtarget, mean if own else None)
        if own and not prob:
            _check_ids(scale, fn, target, V, ignore_index)
    else:
        stats = _stats_like(logits, with_stats)
    if reduction == "none":  # a copy, never a view of the stats saved for backward
        loss = stats[0].to(loss_dtype, copy=True)
    else:
        loss = backend.loss_reduce(stats, scale, mean, loss_dtype)  # (row 0; positional)
    return loss, stats, scale


def _new_like(t, dtype=None):
    """A new contiguous tensor of t's shape (and dtype unless given), on t's device.

    empty_like: half the host time of torch.empty(t.shape, dtype=..., device=...), whose
    shape, dtype and device arguments are parsed and a torch.device built on every call."""
    return torch.empty_like(t, dtype=dtype, memory_format=_CONTIGUOUS)


def _maybe_like(t, wanted):
    """A new tensor like t when wanted, else an empty one (an op must return a tensor)."""
    return _new_like(t) if wanted else t.new_empty(0)


def forward_eager(logits, target, weight, opts, loss_dtype, with_stats, fn, grad_into,
                  with_target_grad, backend=None):
    """(loss, stats, scale, grad, dtarget) of the forward in plain eager mode (_dispatch.eager),
    what run_eager of cross_entropy_forward or cross_entropy_forward_inplace returns, with
    one call layer less (the host time of a small call is its layers: softmax-ce-bench
    overhead). opts: a LossOptions; grad_into: None (no gradient of the logits), "new" (a
    new tensor) or "logits" (overwritten, their version counter bumped as the op's
    declared mutation would); backend: backend_for(fn, logits) when the caller has it."""
    if grad_into == "new":
        grad = torch.empty_like(logits, memory_format=_CONTIGUOUS)  # (_new_like, inline)
    else:
        grad = logits if grad_into == "logits" else None
    dtarget = _new_like(target) if with_target_grad else None
    loss, stats, scale = _forward(logits, target, weight, *opts, loss_dtype, with_stats, fn, grad,
                                  dtarget, grad is not logits, backend)
    if grad is logits:
        torch.autograd.graph.increment_version(logits)
    return loss, stats, scale, grad, dtarget


def _cross_entropy_forward_eager(logits, target, weight, ignore_index, reduction,
                                 label_smoothing, z_loss, softcap, loss_dtype, with_stats, fn,
                                 with_grad, with_target_grad):
    """(loss, stats, scale, grad, dtarget) of _forward, with the fused gradient times
    grad_scale and the probability target's (None when not asked for)."""
    return forward_eager(logits, target, weight,
                         (ignore_index, reduction, label_smoothing, z_loss, softcap), loss_dtype,
                         with_stats, fn, "new" if with_grad else None, with_target_grad)


def _cross_entropy_forward(logits: Tensor, target: Tensor, weight: Optional[Tensor],
                           ignore_index: int, reduction: str, label_smoothing: float,
                           z_loss: float, softcap: Optional[float], loss_dtype: torch.dtype,
                           with_stats: bool, fn: str, with_grad: bool,
                           with_target_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor,
                                                            Tensor]:
    """_cross_entropy_forward_eager, with an empty tensor for each gradient not asked for
    (an op must return tensors)."""
    loss, stats, scale, grad, dtarget = _cross_entropy_forward_eager(
        logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
        loss_dtype, with_stats, fn, with_grad, with_target_grad)
    return (loss, stats, scale, _maybe_like(logits, False) if grad is None else grad,
            _maybe_like(target, False) if dtarget is None else dtarget)


cross_entropy_forward = _custom_op("cross_entropy_forward", _cross_entropy_forward, (),
                                   _cross_entropy_forward_eager)


def _loss_like(logits, reduction, loss_dtype):
    shape = (logits.shape[0],) if reduction == "none" else ()
    return logits.new_empty(shape, dtype=loss_dtype)


def _scale_like(logits):
    return logits.new_empty(3, dtype=acc_dtype(logits))


@cross_entropy_forward.register_fake
def _(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
      loss_dtype, with_stats, fn, with_grad, with_target_grad):
    return (_loss_like(logits, reduction, loss_dtype), _stats_like(logits, with_stats),
            _scale_like(logits), logits.new_empty(logits.shape if with_grad else (0,)),
            target.new_empty(target.shape if with_target_grad else (0,)))


def _cross_entropy_forward_out(logits: Tensor, target: Tensor, weight: Optional[Tensor],
                               ignore_index: int, reduction: str, label_smoothing: float,
                               z_loss: float, softcap: Optional[float], loss_dtype: torch.dtype,
                               with_stats: bool, fn: str,
                               out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, stats, scale) of _forward; the gradient times grad_scale goes into `out` (not
    the logits)."""
    return _forward(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                    softcap, loss_dtype, with_stats, fn, out, None, fresh=False)


cross_entropy_forward_out = _custom_op("cross_entropy_forward_out", _cross_entropy_forward_out,
                                       ("out",))


@cross_entropy_forward_out.register_fake
def _(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
      loss_dtype, with_stats, fn, out):
    return (_loss_like(logits, reduction, loss_dtype), _stats_like(logits, with_stats),
            _scale_like(logits))


def _cross_entropy_forward_inplace(logits: Tensor, target: Tensor, weight: Optional[Tensor],
                                   ignore_index: int, reduction: str, label_smoothing: float,
                                   z_loss: float, softcap: Optional[float],
                                   loss_dtype: torch.dtype, with_stats: bool, fn: str,
                                   with_target_grad: bool) -> tuple[Tensor, Tensor, Tensor,
                                                                    Tensor]:
    """(loss, stats, scale, dtarget) of _forward; the logits are overwritten by their
    gradient times grad_scale."""
    dtarget = _maybe_like(target, with_target_grad)
    loss, stats, scale = _forward(logits, target, weight, ignore_index, reduction,
                                  label_smoothing, z_loss, softcap, loss_dtype, with_stats, fn,
                                  logits, dtarget if with_target_grad else None, fresh=False)
    return loss, stats, scale, dtarget


cross_entropy_forward_inplace = _custom_op("cross_entropy_forward_inplace",
                                           _cross_entropy_forward_inplace, ("logits",))


@cross_entropy_forward_inplace.register_fake
def _(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
      loss_dtype, with_stats, fn, with_target_grad):
    return (_loss_like(logits, reduction, loss_dtype), _stats_like(logits, with_stats),
            _scale_like(logits), target.new_empty(target.shape if with_target_grad else (0,)))


def _bwd(logits, target, weight, stats, dloss, grad_scale, grad, ignore_index, label_smoothing,
         z_loss, softcap, dtarget=None, backend=None):
    if logits.shape[0]:
        # (positional, as in _forward)
        (backend or backend_for("cross_entropy", logits)).cross_entropy_bwd(
            logits, target, weight, stats, dloss, grad_scale, grad, ignore_index,
            label_smoothing, z_loss, softcap, dtarget)


def backward_eager(logits, target, weight, stats, dloss, grad_scale, ignore_index,
                   label_smoothing, z_loss, softcap, inplace, with_grad, with_target_grad,
                   backend=None):
    """(grad, dtarget) of the late backward in plain eager mode (_dispatch.eager), what
    run_eager of cross_entropy_bwd or cross_entropy_bwd_inplace makes, without the op
    layer and with None (no allocation) for a gradient not asked for. inplace: the logits
    are overwritten by their gradient (their version counter bumped, as the op's declared
    mutation would); backend: the forward's, when known."""
    grad = logits if inplace else (_new_like(logits) if with_grad else None)
    dtarget = _new_like(target) if with_target_grad else None
    _bwd(logits, target, weight, stats, dloss, grad_scale, grad, ignore_index, label_smoothing,
         z_loss, softcap, dtarget, backend)
    if inplace:
        torch.autograd.graph.increment_version(logits)
    return grad, dtarget


def _cross_entropy_bwd(logits: Tensor, target: Tensor, weight: Optional[Tensor], stats: Tensor,
                       dloss: Tensor, grad_scale: Tensor, ignore_index: int,
                       label_smoothing: float, z_loss: float, softcap: Optional[float],
                       with_grad: bool, with_target_grad: bool) -> tuple[Tensor, Tensor]:
    """(grad, dtarget): dloss * grad_scale times the gradient of the logits and of the
    probability target, from the forward's per-row stats (empty tensors when not asked)."""
    grad, dtarget = backward_eager(logits, target, weight, stats, dloss, grad_scale,
                                   ignore_index, label_smoothing, z_loss, softcap, False,
                                   with_grad, with_target_grad)
    return (_maybe_like(logits, False) if grad is None else grad,
            _maybe_like(target, False) if dtarget is None else dtarget)


cross_entropy_bwd = _custom_op("cross_entropy_bwd", _cross_entropy_bwd, ())


@cross_entropy_bwd.register_fake
def _(logits, target, weight, stats, dloss, grad_scale, ignore_index, label_smoothing, z_loss,
      softcap, with_grad, with_target_grad):
    grad = (torch.empty_like(logits, memory_format=torch.contiguous_format) if with_grad
            else logits.new_empty(0))
    return grad, target.new_empty(target.shape if with_target_grad else (0,))


def _cross_entropy_bwd_inplace(logits: Tensor, target: Tensor, weight: Optional[Tensor],
                               stats: Tensor, dloss: Tensor, grad_scale: Tensor,
                               ignore_index: int, label_smoothing: float, z_loss: float,
                               softcap: Optional[float], with_target_grad: bool) -> Tensor:
    """As cross_entropy_bwd, overwriting the logits with their gradient; returns dtarget."""
    dtarget = _maybe_like(target, with_target_grad)
    _bwd(logits, target, weight, stats, dloss, grad_scale, logits, ignore_index, label_smoothing,
         z_loss, softcap, dtarget if with_target_grad else None)
    return dtarget


cross_entropy_bwd_inplace = _custom_op("cross_entropy_bwd_inplace", _cross_entropy_bwd_inplace,
                                       ("logits",))


@cross_entropy_bwd_inplace.register_fake
def _(logits, target, weight, stats, dloss, grad_scale, ignore_index, label_smoothing, z_loss,
      softcap, with_target_grad):
    return target.new_empty(target.shape if with_target_grad else (0,))


def _scale_grad_(grad: Tensor, dloss: Tensor) -> None:
    """grad *= dloss (a 0-d tensor), in place; touches no memory when dloss is 1 (on the device)."""
    if grad.numel():
        backend_for("cross_entropy", grad).scale_grad(grad, dloss)


scale_grad_ = _custom_op("scale_grad_", _scale_grad_, ("grad",))


def scale_grads_(dloss, dx, dt, dx_is_input, backend=None):
    """scale_grad_(g, dloss) for each of the fused gradients dx and dt that is not None: in
    plain eager mode by its implementation directly, where the version of dx is bumped only
    when dx_is_input (the logits, overwritten by inplace_backward): a new gradient is not yet
    seen by anyone but autograd. backend: the one the forward ran dx's launches on, when
    known (else backend_for finds it)."""
    if not _dispatch.eager(dloss):
        for g in (dx, dt):
            if g is not None:
                scale_grad_(g, dloss)
        return
    if dx is not None:
        if dx.numel():
            (backend or backend_for("cross_entropy", dx)).scale_grad(dx, dloss)
        if dx_is_input:
            torch.autograd.graph.increment_version(dx)
    if dt is not None:
        _scale_grad_(dt, dloss)


@scale_grad_.register_fake
def _(grad, dloss):
    return None


def _softmax_fwd(x: Tensor, log: bool, dtype: torch.dtype) -> Tensor:
    """softmax (log_softmax if log) along dim 1 of an (outer, V, inner) tensor, as a new
    tensor of ``dtype`` (x's or a wider one)."""
    y = _new_like(x, dtype)
    if y.numel():
        backend_for("softmax", x).softmax_fwd(x, y, log=log)
    return y


softmax_fwd = _custom_op("softmax_fwd", _softmax_fwd, ())


@softmax_fwd.register_fake
def _(x, log, dtype):
    return _new_like(x, dtype)


def _softmax_bwd(y: Tensor, dy: Tensor, log: bool, dtype: torch.dtype) -> Tensor:
    """dx = J^T dy for the forward output y, (outer, V, inner), as a new tensor of ``dtype``
    (the forward input's)."""
    dx = _new_like(y, dtype)
    if dx.numel():
        backend_for("softmax", y).softmax_bwd(y, dy, dx, log=log)
    return dx


softmax_bwd = _custom_op("softmax_bwd", _softmax_bwd, ())


@softmax_bwd.register_fake
def _(y, dy, log, dtype):
    return _new_like(y, dtype)


def _loss_scale(like: Tensor, target: Tensor, weight: Optional[Tensor], V: int,
                ignore_index: int, mean: bool, prob: bool, fn: str) -> Tensor:
    """(3,) [grad_scale, denominator, ok] of the reduction (accumulation dtype), after
    checking the class ids: a ValueError on CPU, a device-side assert on CUDA (no host sync).

    like: a tensor of the logits' dtype and device (it picks the backend); target: (N,)
    class ids, or with prob anything whose first dimension is the number of rows."""
    scale = backend_for(fn, like).loss_scale(target, weight, ignore_index=ignore_index,
                                            mean=mean, prob=prob, V=V, acc=acc_dtype(like))
    if not prob:
        _check_ids(scale, fn, target, V, ignore_index)
    return scale


loss_scale = _custom_op("loss_scale", _loss_scale, ())


@loss_scale.register_fake
def _(like, target, weight, V, ignore_index, mean, prob, fn):
    return like.new_empty(3, dtype=acc_dtype(like))


def _loss_reduce(loss_rows: Tensor, scale: Tensor, mean: bool, dtype: torch.dtype) -> Tensor:
    """() of dtype: the sum of the per-row losses (loss_rows (N,), or row 0 of (k, N)
    stats), divided by the denominator scale[1] for 'mean'."""
    return backend_for("cross_entropy", loss_rows).loss_reduce(loss_rows, scale, mean,
                                                               dtype=dtype)


loss_reduce = _custom_op("loss_reduce", _loss_reduce, ())


@loss_reduce.register_fake
def _(loss_rows, scale, mean, dtype):
    return loss_rows.new_empty((), dtype=dtype)


# ----------------------------------------------------------------------------- vmap rules
# torch.func.vmap over the library's autograd Functions (generate_vmap_rule=True) reaches
# these ops with batched tensors. The cross-entropy ops loop over the batch (a 'mean' has a
# denominator per batch element, so one launch over all rows would need a per-row scale);
# the softmax ops fold the batch into their outer dimension: one launch.


def _select(args, in_dims, b):
    return [a if d is None else a.select(d, b) for a, d in zip(args, in_dims)]


def _loop_rule(op):
    def rule(info, in_dims, *args):
        outs = [op(*_select(args, in_dims, b)) for b in range(info.batch_size)]
        if outs[0] is None:  # an in-place op: the slices were written
            return None, None
        if isinstance(outs[0], tuple):
            return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
        return torch.stack(outs), 0
    return rule


def _batched_first(t, d, size):
    return t.movedim(d, 0) if d is not None else t.expand(size, *t.shape)


def _softmax_fwd_vmap(info, in_dims, x, log, dtype):
    xb = _batched_first(x, in_dims[0], info.batch_size)
    B, outer, V, inner = xb.shape
    y = softmax_fwd(xb.reshape(B * outer, V, inner), log, dtype)
    return y.view(B, outer, V, inner), 0


def _softmax_bwd_vmap(info, in_dims, y, dy, log, dtype):
    yb = _batched_first(y, in_dims[0], info.batch_size)
    dyb = _batched_first(dy, in_dims[1], info.batch_size)
    B, outer, V, inner = yb.shape
    dx = softmax_bwd(yb.reshape(B * outer, V, inner), dyb.reshape(B * outer, V, inner), log,
                     dtype)
    return dx.view(B, outer, V, inner), 0


if hasattr(torch.library, "register_vmap"):  # torch >= 2.5; older torch: no vmap support
    for _op in (cross_entropy_forward, cross_entropy_bwd, cross_entropy_forward_out,
                cross_entropy_forward_inplace, cross_entropy_bwd_inplace, scale_grad_,
                loss_scale, loss_reduce):
        torch.library.register_vmap(_op, _loop_rule(_op))
    torch.library.register_vmap(softmax_fwd, _softmax_fwd_vmap)
    torch.library.register_vmap(softmax_bwd, _softmax_bwd_vmap)
