"""torch.autocast, as torch applies it to the ops this library replaces.

Measured against torch 2.13 (CPU autocast) and torch's documented CUDA op lists:
- cross_entropy (and the loss of linear_cross_entropy) is an fp32 op under autocast on
  CPU and CUDA: fp16/bf16 logits give an fp32 loss; their gradient keeps their dtype.
- softmax and log_softmax are fp32 ops under CUDA autocast (fp16/bf16 in, fp32 out) and
  untouched by CPU autocast.
- linear_cross_entropy is torch's composite: F.linear runs in the autocast dtype, then
  the fp32 loss.
The kernels read fp16/bf16 logits as they are and compute in fp32 anyway, so following
autocast never copies the logits: only the dtype of what is returned changes.
"""

import contextlib

import torch

_LOW = (torch.float16, torch.bfloat16)


def enabled(device_type):
    """Whether autocast is on for this device type (torch >= 2.4 takes the device type)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # older torch: no argument
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return device_type == "cuda" and torch.is_autocast_enabled()
    except RuntimeError:  # a device type autocast does not know (meta): never on
        return False


def loss_dtype(x):
    """The dtype torch's cross_entropy returns for logits x under the current autocast."""
    if x.dtype in _LOW and enabled(x.device.type):
        return torch.float32
    return x.dtype


def softmax_dtype(x):
    """The output dtype torch's softmax/log_softmax give x (dtype=None) under autocast."""
    if x.dtype in _LOW and x.device.type == "cuda" and enabled("cuda"):
        return torch.float32
    return x.dtype


def linear_operands(*tensors):
    """The operands of F.linear as autocast casts them: floating tensors other than float64
    to the autocast dtype of their device (None stays None). Differentiable casts."""
    device_type = next(t for t in tensors if t is not None).device.type
    if not enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t if t is None or t.dtype in (dtype, torch.float64) or not t.is_floating_point()
                 else t.to(dtype) for t in tensors)


def off(device_type):
    """A context in which autocast does not touch the ops inside (the chunked matmuls of
    linear_cross_entropy run in the dtype of their operands, already cast as F.linear's)."""
    if not enabled(device_type):  # nothing to switch off (and no context to build)
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)
