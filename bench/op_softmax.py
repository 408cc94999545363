"""The softmax and log_softmax ops: a random upstream gradient through autograd.

Inputs: x (N, V) of the dtype under test, standard normal values; g (N, V), the
upstream gradient of backward.

Bytes (one formula for every provider): forward reads x and writes y, 2*N*V*b;
forward and backward add reading y and g and writing dx, 5*N*V*b (b = element size).

Providers:
    softmax_ce_gpu   softmax_ce_gpu.softmax / log_softmax
    torch            torch.softmax / torch.log_softmax, eager
    torch_compile    torch.compile of the same
"""

import torch

from .compiled import compile_for_case
from .op import Impl, Op


def make_inputs(n, v, dtype, device, generator):
    x = torch.randn(n, v, generator=generator, device=device, dtype=torch.float32).to(dtype)
    g = torch.randn(n, v, generator=generator, device=device, dtype=torch.float32).to(dtype)
    return {"x": x, "g": g}


def bytes_moved(n, v, elsize, mode):
    return (2 if mode == "fwd" else 5) * n * v * elsize


def _op(name, torch_fn):
    def reference(x):
        return torch_fn(x, dim=-1)

    def load_ours(env):
        import softmax_ce_gpu

        fn = getattr(softmax_ce_gpu, name)
        return lambda x: fn(x, dim=-1)

    def load_torch(env):
        return lambda x: torch_fn(x, dim=-1)

    def load_compiled(env):
        return compile_for_case(lambda x: torch_fn(x, dim=-1), env)

    return Op(
        name=name,
        make_inputs=make_inputs,
        args=("x",),
        grad_inputs=("x",),
        upstream="g",
        reference=reference,
        bytes_moved=bytes_moved,
        impls={
            "softmax_ce_gpu": Impl(load_ours),
            "torch": Impl(load_torch),
            "torch_compile": Impl(load_compiled),
        },
    )


SOFTMAX = _op("softmax", torch.softmax)
LOG_SOFTMAX = _op("log_softmax", torch.log_softmax)
