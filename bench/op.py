"""What an op is to the bench: inputs, a float64 reference, a byte formula, and providers.

An op's providers are functions with the same positional arguments as the op's
reference; the harness runs them forward, or forward and backward through autograd,
and compares the output and the gradients with the reference on float64 copies.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, Tuple

MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Env:
    """Where a case runs ("cuda" or "cpu"); how long torch.compile may try on CPU."""

    device: str
    compile_timeout_s: float = 0.0


class ProviderUnavailable(Exception):
    """Raised by Impl.load when the provider cannot run here (not installed, needs CUDA, ...).

    The case is recorded as 'skipped' with this message as the reason; ImportError is
    treated the same way.
    """


@dataclass(frozen=True)
class Impl:
    """One provider's implementation of one op.

    load(env) returns the function to run, fn(*op.args of the inputs) -> output, or
    raises ProviderUnavailable / ImportError. It is called once per case, so a provider
    may set up per-shape state there (torch.compile does). The function may carry a
    `note` attribute (e.g. which backend ran), copied into the record.
    inplace: the function overwrites its inputs (e.g. the gradient written into the
    logits); the harness restores them between repetitions, outside the timed region.
    """

    load: Callable[[Env], Callable]
    inplace: bool = False


@dataclass(frozen=True)
class Op:
    """An op as the bench sees it.

    make_inputs(n, v, dtype, device, generator) -> dict of named tensors.
    args: names of the inputs passed positionally to a provider function and to reference.
    grad_inputs: names of the inputs that get requires_grad in mode 'fwd+bwd'.
    upstream: name of the input used as the upstream gradient of backward, or None when
        the output is a scalar (gradient 1).
    reference(*args) -> output: torch on float64 copies, differentiable.
    bytes_moved(n, v, elsize, mode) -> the bytes a perfect implementation reads and writes;
        GB/s of every provider is computed from this one formula.
    impls: provider name -> Impl.
    """

    name: str
    make_inputs: Callable
    args: Tuple[str, ...]
    grad_inputs: Tuple[str, ...]
    upstream: object
    reference: Callable
    bytes_moved: Callable[[int, int, int, str], int]
    impls: Dict[str, Impl] = field(default_factory=dict)
