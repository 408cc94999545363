"""Device code of softmax_ce_gpu: Triton kernels and their launchers.

Installed as ``softmax_ce_gpu.kernels``. It imports torch and triton, never
softmax_ce_gpu, and never loads under any other name, so that the top-level
``kernels/`` folder of a checkout is never imported twice.

Imported by its folder name (``import kernels`` from a checkout's root, where the
folder is on sys.path: Hugging Face transformers probes for its own ``kernels``
package that way at import time) it stays an empty package: no submodule can be
imported through it, any attribute raises an AttributeError that says why, and a
probe finds no version, so transformers concludes that its ``kernels`` is absent.
"""

if __name__ != "softmax_ce_gpu.kernels":
    __path__ = []  # nothing under this name: kernels.cross_entropy is not importable
    _WRONG_NAME = ("the kernels package must be imported as softmax_ce_gpu.kernels, "
                   f"not as {__name__!r}; install the project (pip install -e .)")

    def __getattr__(name):
        raise AttributeError(f"{_WRONG_NAME} (asked for {name!r})")
else:
    from . import _compat  # noqa: F401  (interpreter fix-ups for old triton)
    from ._compat import INTERPRETER
    from .cross_entropy import (
        cross_entropy_bwd,
        cross_entropy_fwd,
        scale_grad,
    )
    from .reduction import loss_reduce, loss_scale
    from .softmax import softmax_bwd, softmax_fwd

    __all__ = ["INTERPRETER", "cross_entropy_fwd", "cross_entropy_bwd", "scale_grad",
               "loss_scale", "loss_reduce", "softmax_fwd", "softmax_bwd"]
