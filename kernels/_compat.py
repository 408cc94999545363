"""Compatibility shims between triton versions. Nothing here runs on a GPU.

``INTERPRETER`` tells whether Triton's interpreter replaced the JIT: that is
decided when ``@triton.jit`` runs, by TRITON_INTERPRET=1 being set before the
kernels are imported; the host code uses it to send CPU tensors to the kernels.

triton <= 3.6 converts a kernel's integer argument to a Python int with
``int(ndarray_of_shape_(1,))`` when it is a loop bound
(``for off in range(0, V, BLOCK)``); numpy >= 2.4 refuses that conversion.
triton 3.7 squeezes the array first. We apply the same one-line change to the
old interpreter, only when it is active and only for the versions that need it,
so the kernels keep the ordinary ``for`` loop that the compiler pipelines.
"""

import os

import triton

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_version() -> tuple:
    parts = []
    for piece in triton.__version__.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _fix_interpreter_index() -> None:
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_softmax_ce_gpu_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._softmax_ce_gpu_fixed = True
    interpreter._patch_lang_tensor = patched


if INTERPRETER and _triton_version() < (3, 7):
    _fix_interpreter_index()
