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
_EAGER = {}  # custom op -> (its implementation, positions of the arguments it mutates)


def _custom_op(name, impl, mutates_args):
    """Register impl as the custom op softmax_ce_gpu::name; call() may run impl directly."""
    op = torch.library.custom_op(f"{_NS}::{name}", impl, mutates_args=mutates_args)
    params = list(inspect.signature(impl).parameters)
    _EAGER[op] = (impl, tuple(params.index(a) for a in mutates_args))
    return op


def _run_eager(op, *args):
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
    return _run_eager if _dispatch.eager(t) else _run_op


def call(op, *args):
    """op(*args), or in plain eager mode its implementation directly (see _dispatch): the
    custom op's dispatch costs tens of microseconds of host time per call. A mutation the
    op declares bumps the version counter, as the op would."""
    return runner(args[0])(op, *args)


def _stats_like(logits, with_stats=False):
    return logits.new_empty(7 if with_stats else 4, logits.shape[0], dtype=acc_dtype(logits))


def _fwd(logits, target, weight, grad, grad_scale, ignore_index, label_smoothing, z_loss, softcap,
         with_stats, dtarget):
    if logits.shape[0] == 0:
        return _stats_like(logits, with_stats)
    backend = backend_for("cross_entropy", logits)
    return backend.cross_entropy_fwd(
        logits, target, weight, grad=grad, grad_scale=grad_scale, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, with_stats=with_stats,
        dtarget=dtarget)


def _maybe_like(t, wanted):
    """A new tensor like t when wanted, else an empty one (an op must return a tensor)."""
    return torch.empty(t.shape if wanted else (0,), dtype=t.dtype, device=t.device)


def _cross_entropy_fwd(logits: Tensor, target: Tensor, weight: Optional[Tensor], grad_scale: Tensor,
                       ignore_index: int, label_smoothing: float, z_loss: float,
                       softcap: Optional[float], with_grad: bool, with_stats: bool,
                       with_target_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(stats, grad, dtarget): stats (4, N) per row (loss, max, log d, S; (7, N) with_stats:
    then lse, entropy, correct), the fused gradient times grad_scale and the probability
    target's (each an empty tensor when not asked for)."""
    grad = _maybe_like(logits, with_grad)
    dtarget = _maybe_like(target, with_target_grad)
    stats = _fwd(logits, target, weight, grad if with_grad else None, grad_scale, ignore_index,
                 label_smoothing, z_loss, softcap, with_stats,
                 dtarget if with_target_grad else None)
    return stats, grad, dtarget


cross_entropy_fwd = _custom_op("cross_entropy_fwd", _cross_entropy_fwd, ())


@cross_entropy_fwd.register_fake
def _(logits, target, weight, grad_scale, ignore_index, label_smoothing, z_loss, softcap,
      with_grad, with_stats, with_target_grad):
    return (_stats_like(logits, with_stats), logits.new_empty(logits.shape if with_grad else (0,)),
            target.new_empty(target.shape if with_target_grad else (0,)))


def _cross_entropy_fwd_out(logits: Tensor, target: Tensor, weight: Optional[Tensor],
                           grad_scale: Tensor, ignore_index: int, label_smoothing: float,
                           z_loss: float, softcap: Optional[float], out: Tensor,
                           with_stats: bool) -> Tensor:
    """The stats per row; the gradient times grad_scale goes into `out` (not the logits)."""
    return _fwd(logits, target, weight, out, grad_scale, ignore_index, label_smoothing, z_loss,
                softcap, with_stats, None)


cross_entropy_fwd_out = _custom_op("cross_entropy_fwd_out", _cross_entropy_fwd_out, ("out",))


@cross_entropy_fwd_out.register_fake
def _(logits, target, weight, grad_scale, ignore_index, label_smoothing, z_loss, softcap, out,
      with_stats):
    return _stats_like(logits, with_stats)


def _cross_entropy_fwd_inplace(logits: Tensor, target: Tensor, weight: Optional[Tensor],
                               grad_scale: Tensor, ignore_index: int, label_smoothing: float,
                               z_loss: float, softcap: Optional[float], with_stats: bool,
                               with_target_grad: bool) -> tuple[Tensor, Tensor]:
    """(stats, dtarget); the logits are overwritten by their gradient times grad_scale."""
    dtarget = _maybe_like(target, with_target_grad)
    stats = _fwd(logits, target, weight, logits, grad_scale, ignore_index, label_smoothing, z_loss,
                 softcap, with_stats, dtarget if with_target_grad else None)
    return stats, dtarget


cross_entropy_fwd_inplace = _custom_op("cross_entropy_fwd_inplace", _cross_entropy_fwd_inplace,
                                       ("logits",))


@cross_entropy_fwd_inplace.register_fake
def _(logits, target, weight, grad_scale, ignore_index, label_smoothing, z_loss, softcap,
      with_stats, with_target_grad):
    return (_stats_like(logits, with_stats),
            target.new_empty(target.shape if with_target_grad else (0,)))


def _bwd(logits, target, weight, stats, dloss, grad_scale, grad, ignore_index, label_smoothing,
         z_loss, softcap, dtarget=None):
    if logits.shape[0]:
        backend_for("cross_entropy", logits).cross_entropy_bwd(
            logits, target, weight, stats, dloss, grad_scale, grad,
            ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
            softcap=softcap, dtarget=dtarget)


def _cross_entropy_bwd(logits: Tensor, target: Tensor, weight: Optional[Tensor], stats: Tensor,
                       dloss: Tensor, grad_scale: Tensor, ignore_index: int,
                       label_smoothing: float, z_loss: float, softcap: Optional[float],
                       with_grad: bool, with_target_grad: bool) -> tuple[Tensor, Tensor]:
    """(grad, dtarget): dloss * grad_scale times the gradient of the logits and of the
    probability target, from the forward's per-row stats (empty tensors when not asked)."""
    grad = _maybe_like(logits, with_grad)
    dtarget = _maybe_like(target, with_target_grad)
    _bwd(logits, target, weight, stats, dloss, grad_scale, grad if with_grad else None,
         ignore_index, label_smoothing, z_loss, softcap, dtarget if with_target_grad else None)
    return grad, dtarget


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


@scale_grad_.register_fake
def _(grad, dloss):
    return None


def _softmax_fwd(x: Tensor, log: bool, dtype: torch.dtype) -> Tensor:
    """softmax (log_softmax if log) along dim 1 of an (outer, V, inner) tensor, as a new
    tensor of ``dtype`` (x's or a wider one)."""
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    if y.numel():
        backend_for("softmax", x).softmax_fwd(x, y, log=log)
    return y


softmax_fwd = _custom_op("softmax_fwd", _softmax_fwd, ())


@softmax_fwd.register_fake
def _(x, log, dtype):
    return torch.empty(x.shape, dtype=dtype, device=x.device)


def _softmax_bwd(y: Tensor, dy: Tensor, log: bool, dtype: torch.dtype) -> Tensor:
    """dx = J^T dy for the forward output y, (outer, V, inner), as a new tensor of ``dtype``
    (the forward input's)."""
    dx = torch.empty(y.shape, dtype=dtype, device=y.device)
    if dx.numel():
        backend_for("softmax", y).softmax_bwd(y, dy, dx, log=log)
    return dx


softmax_bwd = _custom_op("softmax_bwd", _softmax_bwd, ())


@softmax_bwd.register_fake
def _(y, dy, log, dtype):
    return torch.empty(y.shape, dtype=dtype, device=y.device)


def _loss_scale(like: Tensor, target: Tensor, weight: Optional[Tensor], V: int,
                ignore_index: int, mean: bool, prob: bool, fn: str) -> Tensor:
    """(3,) [denominator, grad_scale, ok] of the reduction (accumulation dtype), after
    checking the class ids: a ValueError on CPU, a device-side assert on CUDA (no host sync).

    like: a tensor of the logits' dtype and device (it picks the backend); target: (N,)
    class ids, or with prob anything whose first dimension is the number of rows."""
    scale = backend_for(fn, like).loss_scale(target, weight, ignore_index=ignore_index,
                                            mean=mean, prob=prob, V=V, acc=acc_dtype(like))
    if not prob:
        if scale.device.type == "cpu":
            if not scale.numpy()[2]:  # free on CPU: the value is already on the host
                _checks.raise_class_range(fn, target, V, ignore_index)
        else:
            torch._assert_async(scale[2], _checks.class_range_message(fn, V, ignore_index))
    return scale


loss_scale = _custom_op("loss_scale", _loss_scale, ())


@loss_scale.register_fake
def _(like, target, weight, V, ignore_index, mean, prob, fn):
    return like.new_empty(3, dtype=acc_dtype(like))


def _loss_reduce(loss_rows: Tensor, scale: Tensor, mean: bool, dtype: torch.dtype) -> Tensor:
    """() of dtype: the sum of the per-row losses, divided by scale[0] for 'mean'."""
    return backend_for("cross_entropy", loss_rows).loss_reduce(loss_rows, scale, mean=mean,
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
    for _op in (cross_entropy_fwd, cross_entropy_bwd, cross_entropy_fwd_out,
                cross_entropy_fwd_inplace, cross_entropy_bwd_inplace, scale_grad_, loss_scale,
                loss_reduce):
        torch.library.register_vmap(_op, _loop_rule(_op))
    torch.library.register_vmap(softmax_fwd, _softmax_fwd_vmap)
    torch.library.register_vmap(softmax_bwd, _softmax_bwd_vmap)
