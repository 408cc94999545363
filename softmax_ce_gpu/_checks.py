"""Input checks of the public functions: one place, run before any kernel.

Each check raises TypeError (wrong type or dtype) or ValueError (wrong shape,
device or value) with a message that names the function, the argument and the
offending value. Nothing here synchronises with a CUDA device: the class-id
range check on CUDA is a device-side assert (torch._assert_async).
"""

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch

_LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class LossOptions:
    """The validated scalar options of a cross-entropy call."""

    ignore_index: int
    reduction: str
    label_smoothing: float
    z_loss: float
    softcap: Optional[float]


def _number(fn, name, value, *, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: argument '{name}' must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{fn}: argument '{name}' must be finite, got {value!r}")
    return value


def check_options(fn, ignore_index, reduction, label_smoothing, z_loss, softcap) -> LossOptions:
    """Validate the scalar options shared by every cross-entropy entry point."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"{fn}: argument 'ignore_index' must be an int, got {ignore_index!r}")
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(
            f"{fn}: argument 'reduction' must be one of {_REDUCTIONS}, got {reduction!r}")
    label_smoothing = _number(fn, "label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(
            f"{fn}: argument 'label_smoothing' must be in [0, 1], got {label_smoothing!r}")
    z_loss = _number(fn, "z_loss", z_loss)
    if z_loss < 0.0:
        raise ValueError(f"{fn}: argument 'z_loss' must be >= 0, got {z_loss!r}")
    softcap = _number(fn, "softcap", softcap, allow_none=True)
    if softcap is not None and softcap <= 0.0:
        raise ValueError(f"{fn}: argument 'softcap' must be > 0 or None, got {softcap!r}")
    return LossOptions(int(ignore_index), reduction, label_smoothing, z_loss, softcap)


def check_bool(fn, name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: argument '{name}' must be a bool, got {value!r}")


def check_logits(fn, logits, name="logits"):
    """A floating tensor with at least one dimension and a non-empty class dimension."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{fn}: argument '{name}' must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(
            f"{fn}: argument '{name}' must be float16, bfloat16, float32 or float64, "
            f"got dtype {logits.dtype}")
    if logits.dim() == 0:
        raise ValueError(f"{fn}: argument '{name}' must have at least 1 dimension, got shape ()")
    V = logits.shape[1] if logits.dim() >= 2 else logits.shape[0]
    if V == 0:
        raise ValueError(
            f"{fn}: argument '{name}' has an empty class dimension (shape {tuple(logits.shape)})")
    return V


def check_target(fn, logits, target, ignore_index):
    """Class ids (integer, logits' shape without the class dim) or probabilities (logits' shape).

    Returns True for probability targets.
    """
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{fn}: argument 'target' must be a torch.Tensor, got {type(target).__name__}")
    if target.device != logits.device:
        raise ValueError(
            f"{fn}: argument 'target' is on {target.device} but 'logits' is on {logits.device}")
    if target.is_floating_point():
        if target.shape != logits.shape:
            raise ValueError(
                f"{fn}: probability 'target' must have the logits' shape {tuple(logits.shape)}, "
                f"got {tuple(target.shape)}")
        if ignore_index != -100:
            raise ValueError(
                f"{fn}: argument 'ignore_index' ({ignore_index}) does not apply to probability "
                "targets (torch refuses it too); leave it at -100")
        return True
    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(
            f"{fn}: argument 'target' must hold integer class ids or float probabilities, "
            f"got dtype {target.dtype}")
    expected = (logits.shape[0],) + tuple(logits.shape[2:]) if logits.dim() >= 2 else ()
    if tuple(target.shape) != expected:
        raise ValueError(
            f"{fn}: class-id 'target' must have shape {expected} for logits of shape "
            f"{tuple(logits.shape)}, got {tuple(target.shape)}")
    return False


def check_weight(fn, logits, weight, V):
    if weight is None:
        return
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{fn}: argument 'weight' must be a torch.Tensor or None, "
                        f"got {type(weight).__name__}")
    if weight.dtype != logits.dtype:
        raise TypeError(
            f"{fn}: argument 'weight' must have the logits' dtype {logits.dtype}, got {weight.dtype}")
    if weight.shape != (V,):
        raise ValueError(
            f"{fn}: argument 'weight' must have shape ({V},), one weight per class, "
            f"got {tuple(weight.shape)}")
    if weight.device != logits.device:
        raise ValueError(
            f"{fn}: argument 'weight' is on {weight.device} but 'logits' is on {logits.device}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{fn}: the gradient with respect to 'weight' is not supported; "
                         "pass weight.detach()")


def as_class_ids(target):
    """Class ids in a dtype that holds ignore_index: int32/int64 as they are, others as int64.

    The kernels compare int64 ids; host code comparing a uint8 id with -100 would wrap
    (-100 becomes 156) and disagree with them, so every entry point converts first (O(N)).
    """
    if target.dtype in (torch.int32, torch.int64):
        return target
    return target.long()


def check_class_range(fn, target, V, ignore_index):
    """Class ids outside [0, V) that are not ignore_index.

    ValueError on CPU in eager mode; elsewhere (CUDA, or inside torch.compile) a
    device-side assert, which fails the launch instead of synchronising with the host.
    """
    target = as_class_ids(target)
    bad = ((target < 0) | (target >= V)) & (target != ignore_index)
    if target.device.type != "cpu" or torch.compiler.is_compiling():
        # no host sync on a device, and nothing data-dependent in a compiled graph
        torch._assert_async(
            ~bad.any(),
            f"{fn}: a class id in 'target' is outside [0, {V}) and is not ignore_index={ignore_index}")
        return
    if target.numel() and bool(bad.any()):
        first = target[bad].flatten()[0]
        raise ValueError(
            f"{fn}: class id {int(first)} in 'target' is outside [0, {V}) "
            f"and is not ignore_index={ignore_index}")


def check_cross_entropy(fn, logits, target, weight, ignore_index, reduction, label_smoothing,
                        z_loss, softcap):
    """All checks of a cross-entropy call.

    Returns (options, V, is_probability_target, target), the target's class ids converted
    by as_class_ids.
    """
    opts = check_options(fn, ignore_index, reduction, label_smoothing, z_loss, softcap)
    V = check_logits(fn, logits)
    prob = check_target(fn, logits, target, opts.ignore_index)
    check_weight(fn, logits, weight, V)
    if prob:
        if target.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{fn}: the gradient with respect to probability 'target' is not "
                             "supported; pass target.detach()")
    else:
        target = as_class_ids(target)
        check_class_range(fn, target, V, opts.ignore_index)
    return opts, V, prob, target
