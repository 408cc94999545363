"""The ops and dtypes the bench knows, and the provider names they offer.

Adding an op: write op_<name>.py defining an Op (see op.py and op_cross_entropy.py)
and add it to OPS below; the CLI, harness, table, JSON and plot need no change.
"""

import torch

from .op_cross_entropy import CROSS_ENTROPY
from .op_linear_cross_entropy import LINEAR_CROSS_ENTROPY
from .op_softmax import LOG_SOFTMAX, SOFTMAX

OPS = {op.name: op for op in (CROSS_ENTROPY, SOFTMAX, LOG_SOFTMAX, LINEAR_CROSS_ENTROPY)}

# the provider every speed-up is measured against
BASELINE = "torch"

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32",
                 "float": "fp32"}

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def provider_names(ops=None):
    """Provider names of the given ops (default: all registered), in order of first appearance."""
    names = {}
    for op in (ops if ops is not None else OPS.values()):
        names.update(dict.fromkeys(op.impls))
    return list(names)
