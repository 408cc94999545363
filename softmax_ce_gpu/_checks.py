"""Input checks of the public functions: one place, run before any kernel.

Each check raises TypeError (wrong type or dtype) or ValueError (wrong shape,
device or value) with a message that names the function, the argument and the
offending value. Nothing here synchronises with a CUDA device: the class-id
range check on CUDA is a device-side assert (torch._assert_async).
"""

import functools
import math
import numbers
from typing import NamedTuple, Optional

import torch
from torch.nn import _reduction as _torch_reduction

_LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ID_DTYPES = frozenset(getattr(torch, name) for name in (
    "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64")
    if hasattr(torch, name))  # (the wide unsigned ones: torch >= 2.3)
_STRIDED = torch.strided
_REDUCTIONS = ("mean", "sum", "none")
_INT64 = (-(1 << 63), (1 << 63) - 1)


class LossOptions(NamedTuple):
    """The validated scalar options of a cross-entropy call (a tuple: cheap to make)."""

    ignore_index: int
    reduction: str
    label_smoothing: float
    z_loss: float
    softcap: Optional[float]


def _number(fn, name, value, *, allow_none=False):
    if value is None and allow_none:
        return None
    if type(value) is float and -math.inf < value < math.inf:  # the common case, fast
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: argument '{name}' must be a real number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an int (or Fraction) beyond any float
        raise ValueError(f"{fn}: argument '{name}' must be finite, got {value!r}") from None
    # comparisons, not math.isfinite: under torch.compile(dynamic=True) a float argument is
    # a SymFloat, which math.isfinite cannot take (a NaN fails both comparisons)
    if not -math.inf < value < math.inf:
        raise ValueError(f"{fn}: argument '{name}' must be finite, got {value!r}")
    return value


def legacy_reduction(size_average, reduce, reduction):
    """torch's handling of the deprecated size_average / reduce: when either is given it
    decides the reduction (with torch's deprecation warning), else ``reduction`` stands."""
    if size_average is None and reduce is None:
        return reduction
    return _torch_reduction.legacy_get_string(size_average, reduce)


_NUMBER = (float, int)
_NUMBER_OR_NONE = (float, int, type(None))
_VALID_OPTIONS = {}  # (value, type) of each option -> LossOptions, for options found valid


def check_options(fn, ignore_index, reduction, label_smoothing, z_loss, softcap) -> LossOptions:
    """Validate the scalar options shared by every cross-entropy entry point.

    Options of plain Python types that were valid once are looked up (a training loop
    passes the same ones on every call); the types of the numbers are part of the key, so
    that True is not taken for 1 nor 1 for 1.0 (not SymInt / SymFloat: torch.compile).
    """
    key = None
    t_ls, t_z, t_c = type(label_smoothing), type(z_loss), type(softcap)
    if (type(ignore_index) is int and type(reduction) is str and t_ls in _NUMBER
            and t_z in _NUMBER and t_c in _NUMBER_OR_NONE):
        key = (ignore_index, reduction, label_smoothing, z_loss, softcap, t_ls, t_z, t_c)
        opts = _VALID_OPTIONS.get(key)
        if opts is not None:
            return opts
    opts = _validate_options(fn, ignore_index, reduction, label_smoothing, z_loss, softcap)
    if key is not None:
        if len(_VALID_OPTIONS) >= 1024:  # a caller varying them per call: stay bounded
            _VALID_OPTIONS.clear()
        _VALID_OPTIONS[key] = opts
    return opts


def _validate_options(fn, ignore_index, reduction, label_smoothing, z_loss, softcap):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"{fn}: argument 'ignore_index' must be an int, got {ignore_index!r}")
    if not _INT64[0] <= ignore_index <= _INT64[1]:
        raise ValueError(f"{fn}: argument 'ignore_index' must fit in int64, got {ignore_index}")
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


def check_dense(fn, name, t):
    """A strided (dense) tensor: sparse and other layouts have no strides to read."""
    if t.layout != _STRIDED:
        raise TypeError(f"{fn}: argument '{name}' must be a dense (strided) tensor, got layout "
                        f"{t.layout}")


def check_logits(fn, logits, name="input", allow_empty=False):
    """A floating tensor with at least one dimension and a non-empty class dimension
    (allow_empty: a vocabulary shard may be empty)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{fn}: argument '{name}' must be a torch.Tensor, got {type(logits).__name__}")
    if logits.layout != _STRIDED:
        check_dense(fn, name, logits)
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(
            f"{fn}: argument '{name}' must be float16, bfloat16, float32 or float64, "
            f"got dtype {logits.dtype}")
    shape = logits.shape
    if not shape:
        raise ValueError(f"{fn}: argument '{name}' must have at least 1 dimension, got shape ()")
    V = shape[1] if len(shape) >= 2 else shape[0]
    if V == 0 and not allow_empty:
        raise ValueError(
            f"{fn}: argument '{name}' has an empty class dimension (shape {tuple(shape)})")
    return V


def check_target(fn, logits, target, ignore_index):
    """Class ids (integer, logits' shape without the class dim) or probabilities (logits' shape).

    Returns True for probability targets.
    """
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{fn}: argument 'target' must be a torch.Tensor, got {type(target).__name__}")
    if target.layout != _STRIDED:
        check_dense(fn, "target", target)
    if target.device != logits.device:
        raise ValueError(
            f"{fn}: argument 'target' is on {target.device} but 'input' is on {logits.device}")
    dtype = target.dtype
    if dtype in _ID_DTYPES:  # class ids, the common case
        shape, t_shape = logits.shape, target.shape
        # (N, V) logits with (N,) ids is decided without building shapes
        if not (len(shape) == 2 and len(t_shape) == 1 and t_shape[0] == shape[0]):
            expected = (shape[0],) + tuple(shape[2:]) if len(shape) >= 2 else ()
            if tuple(t_shape) != expected:
                raise ValueError(
                    f"{fn}: class-id 'target' must have shape {expected} for input of shape "
                    f"{tuple(shape)}, got {tuple(t_shape)}")
        if dtype == torch.uint64 and target.device.type == "cpu" and target.numel():
            huge = target.long() < 0  # 2**63 and above: outside any [0, V), named here by value
            if bool(huge.any()):
                V = shape[1] if len(shape) >= 2 else shape[0]
                raise ValueError(f"{fn}: class id {target[huge].flatten()[0].item()} in "
                                 f"'target' is outside [0, {V})")
        return False
    if not target.is_floating_point():  # bool, complex
        raise TypeError(
            f"{fn}: argument 'target' must hold integer class ids or float probabilities, "
            f"got dtype {dtype}")
    if target.shape != logits.shape:
        raise ValueError(
            f"{fn}: probability 'target' must have the input's shape {tuple(logits.shape)}, "
            f"got {tuple(target.shape)}")
    if dtype not in _LOGIT_DTYPES:
        raise TypeError(f"{fn}: probability 'target' must be float16, bfloat16, float32 or "
                        f"float64, got dtype {dtype}")
    if ignore_index >= 0:
        # torch: a negative ignore_index (any) is accepted and means nothing here
        raise ValueError(
            f"{fn}: argument 'ignore_index' ({ignore_index}) does not apply to probability "
            "targets (torch refuses a non-negative one too); leave it at -100")
    return True


def check_weight(fn, logits, weight, V):
    """Class weights: None, or a (V,) floating tensor on the input's device, of any dtype.

    Returns them as the kernels read them: contiguous, in the accumulation dtype (fp32, fp64
    for fp64 input), so any layout (a strided slice, an expanded scalar) is read correctly.
    A copy of V values at most; the caller's tensor is never written.
    """
    if weight is None:
        return None
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{fn}: argument 'weight' must be a torch.Tensor or None, "
                        f"got {type(weight).__name__}")
    check_dense(fn, "weight", weight)
    if weight.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"{fn}: argument 'weight' must be float16, bfloat16, float32 or float64, "
                        f"got dtype {weight.dtype}")
    if weight.shape != (V,):
        raise ValueError(
            f"{fn}: argument 'weight' must have shape ({V},), one weight per class, "
            f"got {tuple(weight.shape)}")
    if weight.device != logits.device:
        raise ValueError(
            f"{fn}: argument 'weight' is on {weight.device} but 'input' is on {logits.device}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{fn}: the gradient with respect to 'weight' is not supported; "
                         "pass weight.detach()")
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return weight.detach().to(acc).contiguous()


def _byte_range(t):
    """(first, last + 1) bytes of t's storage that t can touch; None for an empty tensor."""
    if t.numel() == 0:
        return None
    start = t.storage_offset() * t.element_size()
    extent = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
    return start, start + (extent + 1) * t.element_size()


def _addressable(t):
    """t without torch.func's wrappers, or None where its memory cannot be inspected (under
    torch.compile's tracing, fake tensors): the memory checks then do not apply."""
    if torch.compiler.is_compiling():
        return None
    t = _plain(t)
    if (type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter)) or t.is_meta:
        return None  # (meta tensors have no memory: every address is 0)
    return t


def overlaps(a, b):
    """Whether tensors a and b may share a byte of memory (conservative: spans, not elements)."""
    a, b = _addressable(a), _addressable(b)
    if a is None or b is None:
        return False
    if a.device != b.device or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    ra, rb = _byte_range(a), _byte_range(b)
    return ra is not None and rb is not None and ra[0] < rb[1] and rb[0] < ra[1]


def same_memory(a, b):
    """Whether a and b are the same elements in the same layout (e.g. x and x.view_as(x))."""
    if a is b:
        return True
    a, b = _addressable(a), _addressable(b)
    if a is None or b is None:
        return False
    return (a.device == b.device and a.data_ptr() == b.data_ptr() and a.shape == b.shape
            and a.stride() == b.stride() and a.dtype == b.dtype)


def _self_overlapping(t):
    """Whether two elements of t may share memory (an expanded tensor, say). False when, with
    the dims of size > 1 sorted by stride, each stride exceeds the span of the smaller ones."""
    t = _addressable(t)
    if t is None:
        return False
    span = 0  # elements covered by the dims seen so far, minus one
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n > 1):
        if stride <= span:
            return True
        span += (size - 1) * stride
    return False


def check_out(fn, out, logits, others=()):
    """The `out` of a gradient: None, the logits themselves, or a tensor of their shape, dtype
    and device that overlaps neither them nor the other inputs, nor itself. others: (name,
    tensor or None) pairs of the other inputs.

    Returns True when out is the logits (an in-place gradient).
    """
    if out is None:
        return False
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{fn}: argument 'out' must be a torch.Tensor or None, "
                        f"got {type(out).__name__}")
    if out.dtype != logits.dtype:
        raise TypeError(f"{fn}: argument 'out' must have dtype {logits.dtype}, got {out.dtype}")
    if out.shape != logits.shape or out.device != logits.device:
        raise ValueError(f"{fn}: argument 'out' must have shape {tuple(logits.shape)} on "
                         f"{logits.device}, got {tuple(out.shape)} on {out.device}")
    check_dense(fn, "out", out)
    if _self_overlapping(out):
        raise ValueError(f"{fn}: argument 'out' has overlapping elements (strides "
                         f"{out.stride()}), so a gradient entry would be written twice")
    if same_memory(out, logits):
        check_inplace(fn, logits, others, "out")
        return True
    if overlaps(out, logits):
        raise ValueError(f"{fn}: argument 'out' overlaps the input without being it (shape "
                         f"{tuple(out.shape)}, strides {out.stride()}); pass the input itself "
                         "for an in-place gradient, or memory of its own")
    for name, other in others:
        if isinstance(other, torch.Tensor) and overlaps(out, other):
            raise ValueError(f"{fn}: argument 'out' overlaps argument '{name}', which the "
                             "kernels read while they write out")
    return False


def check_inplace(fn, logits, others, what="inplace_backward"):
    """Overwriting the logits with their gradient: they must not overlap themselves (an
    expanded tensor) nor any other argument the kernels read meanwhile (target, weight)."""
    if _self_overlapping(logits):
        raise ValueError(f"{fn}: {what} cannot write the gradient into an input whose elements "
                         f"overlap (strides {logits.stride()}, an expanded tensor); pass a "
                         "contiguous input or drop inplace_backward")
    for name, other in others:
        if isinstance(other, torch.Tensor) and overlaps(logits, other):
            raise ValueError(f"{fn}: {what} would overwrite memory that argument '{name}' "
                             "shares with the input while the kernels still read it")


def as_class_ids(target, ignore_index):
    """Class ids in a dtype that holds ignore_index: int64, or int32 when ignore_index fits.

    The kernels compare int64 ids; host code comparing a uint8 id with -100 (or an int32 id
    with 2**32) would wrap and disagree with them, so every entry point converts first (O(N)).
    """
    if target.dtype == torch.int64:
        return target
    if target.dtype == torch.int32 and -(1 << 31) <= ignore_index < (1 << 31):
        return target
    ids = target.long()
    if target.dtype == torch.uint64:  # ids of 2**63 and above would wrap to negative values
        ids = torch.where(ids < 0, _INT64[1], ids)  # (one of which may equal ignore_index)
    return ids


def _plain(t):
    """t without torch.func's wrappers (vmap, grad): the tensor of all its values, which an
    element-wise check may read as a whole."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        t = functorch.get_unwrapped(t)
    return t


def check_class_range(fn, target, V, ignore_index):
    """Class ids outside [0, V) that are not ignore_index.

    ValueError on CPU in eager mode; elsewhere (CUDA, or inside torch.compile) a
    device-side assert, which fails the launch instead of synchronising with the host.
    """
    target = as_class_ids(target, ignore_index)
    if not torch.compiler.is_compiling():
        target = _plain(target)  # under torch.func the whole batch is checked at once
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


@functools.lru_cache(maxsize=256)
def class_range_message(fn, V, ignore_index):
    """The device-side assert's message (cached: it is passed on every CUDA call)."""
    return (f"{fn}: a class id in 'target' is outside [0, {V}) and is not "
            f"ignore_index={ignore_index}")


def raise_class_range(fn, target, V, ignore_index):
    """The ValueError for class ids out of range, naming the first one (CPU, host values)."""
    target = _plain(target).reshape(-1)
    bad = ((target < 0) | (target >= V)) & (target != ignore_index)
    first = int(target[bad][0]) if bool(bad.any()) else None
    raise ValueError(f"{fn}: class id {first} in 'target' is outside [0, {V}) and is not "
                     f"ignore_index={ignore_index}")


def check_cross_entropy(fn, logits, target, weight, ignore_index, reduction, label_smoothing,
                        z_loss, softcap):
    """All checks of a cross-entropy call.

    Returns (options, V, is_probability_target, target, weight): the target's class ids
    converted by as_class_ids, the weight as check_weight returns it.
    """
    opts = check_options(fn, ignore_index, reduction, label_smoothing, z_loss, softcap)
    V = check_logits(fn, logits)
    prob = check_target(fn, logits, target, opts.ignore_index)
    weight = check_weight(fn, logits, weight, V)
    if not prob:
        # the range of the ids is checked on the device with the reduction's scale (_ops._forward)
        target = as_class_ids(target, opts.ignore_index)
    return opts, V, prob, target, weight
