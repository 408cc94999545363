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

Every triton version's interpreter converts fp32 to bf16 by truncating the
mantissa (its "RTNE" branch, when it is taken at all, rounds half up and drops
the carry), where the GPU's cvt.rn.bf16.f32 rounds to nearest, ties to even: a
gradient entry of -0.9999997 is stored as -0.99609375 on CPU and -1.0 on the GPU.
_round_bf16_to_nearest_even makes the interpreter round as the GPU does, so that
a CPU test of a bf16 result can hold it to one rounding of the exact value.
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


def _fp32_to_bf16_bits(data):
    """uint16 bf16 bits of a float32 numpy array, rounded to nearest, ties to even.

    NaN stays a (quiet) NaN of the same sign; overflow rounds to inf, as cvt.rn does.
    """
    import numpy as np

    bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    rounded = np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x0040), rounded)
    return rounded.astype(np.uint16).reshape(np.shape(data))


def _round_bf16_to_nearest_even() -> None:
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.cast_impl, "_softmax_ce_gpu_fixed", False):
        return
    cast_impl, fp_to_fp = builder.cast_impl, builder.create_fp_to_fp
    rtz = interpreter._ir.ROUNDING_MODE.RTZ

    def to_bf16(src):
        return interpreter.TensorHandle(_fp32_to_bf16_bits(src.data), tl.bfloat16)

    def patched_cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return to_bf16(src)
        return cast_impl(self, src, dst_type)

    def patched_fp_to_fp(self, src, dst_type, rounding_mode):
        if (src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16
                and rounding_mode != rtz):
            return to_bf16(src)
        return fp_to_fp(self, src, dst_type, rounding_mode)

    patched_cast_impl._softmax_ce_gpu_fixed = True
    builder.cast_impl = patched_cast_impl
    builder.create_fp_to_fp = patched_fp_to_fp


if INTERPRETER:
    _round_bf16_to_nearest_even()
    if _triton_version() < (3, 7):
        _fix_interpreter_index()
