"""softmax_ce_gpu: fused softmax cross-entropy (loss and gradient) in Triton.

Public API (names are a contract, see DESIGN.md section 4):
    cross_entropy, cross_entropy_with_grad, CrossEntropyLoss, softmax, log_softmax,
    linear_cross_entropy, LinearCrossEntropyLoss
    distributed.vocab_parallel_cross_entropy (import softmax_ce_gpu.distributed)
"""

from .loss import CrossEntropyLoss, CrossEntropyStats, cross_entropy, cross_entropy_with_grad
from .activations import log_softmax, softmax
from .linear import LinearCrossEntropyLoss, linear_cross_entropy

__version__ = "0.1.0"

__all__ = ["cross_entropy", "cross_entropy_with_grad", "CrossEntropyLoss", "CrossEntropyStats",
           "softmax", "log_softmax",
           "linear_cross_entropy", "LinearCrossEntropyLoss", "__version__"]
