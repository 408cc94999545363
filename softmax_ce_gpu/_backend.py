"""Which implementation runs a call: one decision, made from the tensor alone.

- CUDA tensors of fp32/bf16/fp16: the compiled Triton kernels.
- CPU tensors of fp32/bf16/fp16 when Triton's interpreter is on (TRITON_INTERPRET=1
  set before softmax_ce_gpu was imported): the same kernels, interpreted.
- Everything else (float64 anywhere, CPU tensors without the interpreter, or no
  triton installed): the pure-PyTorch reference, with the same semantics.
"""

import torch

from . import reference

try:
    from . import kernels
except ImportError as _err:  # triton missing (e.g. not Linux): CPU keeps working
    kernels = None
    _KERNELS_IMPORT_ERROR = _err
else:
    _KERNELS_IMPORT_ERROR = None


_CHOSEN = {}  # (dtype, on CUDA, on CPU) -> backend: the choice depends on nothing else


def choice_key(t):
    """What the choice for tensor t depends on: its dtype and device type (is_cuda / is_cpu,
    not device.type, which builds a torch.device on every call)."""
    return t.dtype, t.is_cuda, t.is_cpu


def backend_for(fn, logits):
    """The module (kernels or reference) whose launchers run this call."""
    backend = _CHOSEN.get((logits.dtype, logits.is_cuda, logits.is_cpu))  # choice_key, inline
    if backend is None:
        backend = _CHOSEN[choice_key(logits)] = _choose(fn, logits)
    return backend


def _choose(fn, logits):
    if logits.dtype == torch.float64:
        return reference
    if logits.device.type == "cuda":
        if kernels is None:
            raise RuntimeError(f"{fn}: CUDA tensors need triton, which failed to import: "
                               f"{_KERNELS_IMPORT_ERROR}")
        return kernels
    if logits.device.type == "cpu" and kernels is not None and kernels.INTERPRETER:
        return kernels
    return reference
