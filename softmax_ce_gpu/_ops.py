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
"""

from typing import Optional

import torch
from torch import Tensor

from ._backend import backend_for
from ._reduction import acc_dtype

_NS = "softmax_ce_gpu"


def _stats_like(logits):
    return tuple(logits.new_empty(logits.shape[0], dtype=acc_dtype(logits)) for _ in range(4))


def _fwd(logits, target, weight, grad, grad_scale, ignore_index, label_smoothing, z_loss, softcap):
    if logits.shape[0] == 0:
        return _stats_like(logits)
    backend = backend_for("cross_entropy", logits)
    return tuple(backend.cross_entropy_fwd(
        logits, target, weight, grad=grad, grad_scale=grad_scale, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap))


@torch.library.custom_op(f"{_NS}::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(logits: Tensor, target: Tensor, weight: Optional[Tensor], grad_scale: Tensor,
                      ignore_index: int, label_smoothing: float, z_loss: float,
                      softcap: Optional[float], with_grad: bool
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, max, log d, S) per row, and the fused gradient times grad_scale (or an empty tensor)."""
    grad = torch.empty(logits.shape if with_grad else (0,), dtype=logits.dtype,
                       device=logits.device)
    stats = _fwd(logits, target, weight, grad if with_grad else None, grad_scale, ignore_index,
                 label_smoothing, z_loss, softcap)
    return (*stats, grad)


@cross_entropy_fwd.register_fake
def _(logits, target, weight, grad_scale, ignore_index, label_smoothing, z_loss, softcap,
      with_grad):
    grad = logits.new_empty(logits.shape if with_grad else (0,))
    return (*_stats_like(logits), grad)


@torch.library.custom_op(f"{_NS}::cross_entropy_fwd_out", mutates_args=("out",))
def cross_entropy_fwd_out(logits: Tensor, target: Tensor, weight: Optional[Tensor],
                          grad_scale: Tensor, ignore_index: int, label_smoothing: float,
                          z_loss: float, softcap: Optional[float], out: Tensor
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, max, log d, S) per row; the gradient times grad_scale goes into `out` (not the logits)."""
    return _fwd(logits, target, weight, out, grad_scale, ignore_index, label_smoothing, z_loss,
                softcap)


@cross_entropy_fwd_out.register_fake
def _(logits, target, weight, grad_scale, ignore_index, label_smoothing, z_loss, softcap, out):
    return _stats_like(logits)


@torch.library.custom_op(f"{_NS}::cross_entropy_fwd_inplace", mutates_args=("logits",))
def cross_entropy_fwd_inplace(logits: Tensor, target: Tensor, weight: Optional[Tensor],
                              grad_scale: Tensor, ignore_index: int, label_smoothing: float,
                              z_loss: float, softcap: Optional[float]
                              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, max, log d, S) per row; the logits are overwritten by their gradient times grad_scale."""
    return _fwd(logits, target, weight, logits, grad_scale, ignore_index, label_smoothing, z_loss,
                softcap)


@cross_entropy_fwd_inplace.register_fake
def _(logits, target, weight, grad_scale, ignore_index, label_smoothing, z_loss, softcap):
    return _stats_like(logits)


def _bwd(logits, target, weight, row_max, row_logd, row_s, dloss, grad_scale, grad,
         ignore_index, label_smoothing, z_loss, softcap):
    if logits.shape[0]:
        backend_for("cross_entropy", logits).cross_entropy_bwd(
            logits, target, weight, row_max, row_logd, row_s, dloss, grad_scale, grad,
            ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
            softcap=softcap)


@torch.library.custom_op(f"{_NS}::cross_entropy_bwd", mutates_args=())
def cross_entropy_bwd(logits: Tensor, target: Tensor, weight: Optional[Tensor], row_max: Tensor,
                      row_logd: Tensor, row_s: Tensor, dloss: Tensor, grad_scale: Tensor,
                      ignore_index: int, label_smoothing: float, z_loss: float,
                      softcap: Optional[float]) -> Tensor:
    """The gradient dloss * grad_scale * dl/dx from the forward's per-row statistics."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _bwd(logits, target, weight, row_max, row_logd, row_s, dloss, grad_scale, grad, ignore_index,
         label_smoothing, z_loss, softcap)
    return grad


@cross_entropy_bwd.register_fake
def _(logits, target, weight, row_max, row_logd, row_s, dloss, grad_scale, ignore_index,
      label_smoothing, z_loss, softcap):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op(f"{_NS}::cross_entropy_bwd_inplace", mutates_args=("logits",))
def cross_entropy_bwd_inplace(logits: Tensor, target: Tensor, weight: Optional[Tensor],
                              row_max: Tensor, row_logd: Tensor, row_s: Tensor, dloss: Tensor,
                              grad_scale: Tensor, ignore_index: int, label_smoothing: float,
                              z_loss: float, softcap: Optional[float]) -> None:
    """As cross_entropy_bwd, overwriting the logits with the gradient."""
    _bwd(logits, target, weight, row_max, row_logd, row_s, dloss, grad_scale, logits,
         ignore_index, label_smoothing, z_loss, softcap)


@cross_entropy_bwd_inplace.register_fake
def _(logits, target, weight, row_max, row_logd, row_s, dloss, grad_scale, ignore_index,
      label_smoothing, z_loss, softcap):
    return None


@torch.library.custom_op(f"{_NS}::scale_grad_", mutates_args=("grad",))
def scale_grad_(grad: Tensor, dloss: Tensor) -> None:
    """grad *= dloss (a 0-d tensor), in place; touches no memory when dloss is 1 (on the device)."""
    if grad.numel():
        backend_for("cross_entropy", grad).scale_grad(grad, dloss)


@scale_grad_.register_fake
def _(grad, dloss):
    return None


@torch.library.custom_op(f"{_NS}::softmax_fwd", mutates_args=())
def softmax_fwd(x: Tensor, log: bool, dtype: torch.dtype) -> Tensor:
    """softmax (log_softmax if log) along dim 1 of an (outer, V, inner) tensor, as a new
    tensor of ``dtype`` (x's or a wider one)."""
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    if y.numel():
        backend_for("softmax", x).softmax_fwd(x, y, log=log)
    return y


@softmax_fwd.register_fake
def _(x, log, dtype):
    return torch.empty(x.shape, dtype=dtype, device=x.device)


@torch.library.custom_op(f"{_NS}::softmax_bwd", mutates_args=())
def softmax_bwd(y: Tensor, dy: Tensor, log: bool, dtype: torch.dtype) -> Tensor:
    """dx = J^T dy for the forward output y, (outer, V, inner), as a new tensor of ``dtype``
    (the forward input's)."""
    dx = torch.empty(y.shape, dtype=dtype, device=y.device)
    if dx.numel():
        backend_for("softmax", y).softmax_bwd(y, dy, dx, log=log)
    return dx


@softmax_bwd.register_fake
def _(y, dy, log, dtype):
    return torch.empty(y.shape, dtype=dtype, device=y.device)


# ----------------------------------------------------------------------------- vmap rules
# torch.func.vmap over the library's autograd Functions (generate_vmap_rule=True) reaches
# these ops with batched tensors. The cross-entropy ops loop over the batch (a 'mean' has a
# denominator per batch element, so one launch over all rows would need a per-row scale);
# the softmax ops fold the batch into their outer dimension: one launch.


def _select(args, in_dims, b):
    return [a if d is None else a.select(d, b) for a, d in zip(args, in_dims)]


def _loop_rule(op, mutating):
    def rule(info, in_dims, *args):
        outs = [op(*_select(args, in_dims, b)) for b in range(info.batch_size)]
        if mutating and outs[0] is None:
            return None, None
        if mutating:  # returns per-row stats besides its write
            return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
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
    for _op, _mut in ((cross_entropy_fwd, False), (cross_entropy_bwd, False),
                      (cross_entropy_fwd_out, True), (cross_entropy_fwd_inplace, True),
                      (cross_entropy_bwd_inplace, True), (scale_grad_, True)):
        torch.library.register_vmap(_op, _loop_rule(_op, _mut))
    torch.library.register_vmap(softmax_fwd, _softmax_fwd_vmap)
    torch.library.register_vmap(softmax_bwd, _softmax_bwd_vmap)
