"""Device code of softmax_ce_gpu: Triton kernels and their launchers.

Installed as ``softmax_ce_gpu.kernels``. It imports torch and triton, never
softmax_ce_gpu, and refuses to load under any other name so that the
top-level ``kernels/`` folder of a checkout is never imported twice.
"""

if __name__ != "softmax_ce_gpu.kernels":
    raise ImportError(
        "the kernels package must be imported as softmax_ce_gpu.kernels, "
        f"not as {__name__!r}; install the project (pip install -e .)"
    )

from . import _compat  # noqa: E402,F401  (interpreter fix-ups for old triton)
from ._compat import INTERPRETER  # noqa: E402
from .cross_entropy import (  # noqa: E402
    cross_entropy_bwd,
    cross_entropy_fwd,
    scale_grad,
)
from .reduction import loss_reduce, loss_scale  # noqa: E402
from .softmax import softmax_bwd, softmax_fwd  # noqa: E402

__all__ = ["INTERPRETER", "cross_entropy_fwd", "cross_entropy_bwd", "scale_grad",
           "loss_scale", "loss_reduce", "softmax_fwd", "softmax_bwd"]
