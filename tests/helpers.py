"""Shared test helpers: the tolerance table, the error measure, the statistics' reference,
poisoned buffers, an op recorder."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from softmax_ce_gpu import _ops

# Norm-wise relative error allowed per dtype (values computed in fp32 inside the kernels;
# the reference is torch on float64 copies of the same values): the fp32 arithmetic before
# the result is stored (room for V-long fp32 sums), plus, for bf16/fp16, one rounding of
# the result to the dtype per rounding the computation makes, whose relative error is at
# most the unit roundoff 2^-8 (bf16) / 2^-11 (fp16) per element and so norm-wise.
# (The interpreter rounds fp32 -> bf16 to nearest even as the GPU does: kernels/_compat.py.)
UNIT_ROUNDOFF = {torch.float32: 0.0, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8,
                 torch.float64: 0.0}
ARITHMETIC = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5,
              torch.float64: 1e-12}


def tol(dtype, roundings=1):
    """The tolerance of a result that was rounded `roundings` times to dtype."""
    return ARITHMETIC[dtype] + roundings * UNIT_ROUNDOFF[dtype]


TOL = {dtype: tol(dtype) for dtype in ARITHMETIC}  # one rounding: the norm for every test

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def rel_err(actual, expected):
    """||actual - expected|| / ||expected|| in float64; inf/nan positions must match exactly."""
    a = actual.detach().double()
    e = expected.detach().double()
    assert a.shape == e.shape, (a.shape, e.shape)
    fin = torch.isfinite(e)
    assert torch.equal(torch.isfinite(a), fin), "non-finite entries differ"
    assert torch.equal(a[~fin].nan_to_num(0.0), e[~fin].nan_to_num(0.0)) and torch.equal(
        torch.isnan(a), torch.isnan(e)), "non-finite values differ"
    a, e = a[fin], e[fin]
    denom = e.norm()
    if denom == 0:
        return float((a - e).norm())
    return float((a - e).norm() / denom)


def assert_close(actual, expected, dtype, roundings=1):
    """rel_err within tol(dtype, roundings); a caller passing roundings > 1 says why."""
    err = rel_err(actual, expected)
    bound = tol(dtype, roundings)
    assert err <= bound, f"relative error {err:.3g} > {bound:.3g} for {dtype} ({roundings} rounding)"


def expected_stats(x, t, *, softcap=None, ignore_index=-100):
    """(lse, entropy, correct) of return_stats=True in float64 from torch, with the kernels'
    conventions: of the softcapped logits; the argmax of the logits (of the target row for
    probabilities), first index on ties; ignored rows NaN, NaN, False."""
    x64 = x.double()
    inf = float("inf")
    z = x64
    if softcap is not None:
        z = torch.where(x64 == -inf, x64, softcap * torch.tanh(x64 / softcap))
    lse = torch.logsumexp(z, dim=1)
    logp = torch.log_softmax(z, dim=1)
    p = logp.exp()
    entropy = -torch.where(p == 0, torch.zeros_like(p), p * logp).sum(dim=1)
    best = x.argmax(dim=1)
    if t.is_floating_point():
        valid = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        correct = best == t.argmax(dim=1)
    else:
        valid = t != ignore_index
        correct = valid & (best == t)
    nan = torch.full_like(lse, float("nan"))
    return torch.where(valid, lse, nan), torch.where(valid, entropy, nan), correct


def poisoned(shape, dtype, device):
    """An output buffer filled with NaN, so that any element left unwritten fails a test."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


class OpRecorder(TorchDispatchMode):
    """Every aten op run: its name and the largest size in bytes among its outputs (bytes,
    because Triton's interpreter handles tensors as byte views).

    The library's custom ops are opened up: each is recorded by name (size 0) and its
    implementation runs under the recorder, so the allocations inside it (a chunk of logits,
    an accumulator) are seen too, in eager mode and in a compiled graph that calls the op.
    A higher-order operator of a compiled graph (auto_functionalized around an in-place op)
    is recorded by its outputs, the ops inside it are not."""

    supports_higher_order_operators = True

    def __init__(self):
        super().__init__()
        self.ops = []
        self._impls = {op._opoverload: entry for op, entry in _ops._EAGER.items()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        entry = self._impls.get(func)
        if entry is not None:
            impl, mutated = entry
            self.ops.append((str(func.overloadpacket), 0))
            with self:
                out = impl(*args, **(kwargs or {}))
            for i in mutated:  # as _ops.call does
                torch.autograd.graph.increment_version(args[i])
            return out
        out = func(*args, **(kwargs or {}))
        name = (func.name() if isinstance(func, torch._ops.HigherOrderOperator)
                else str(func.overloadpacket))
        sizes = [o.numel() * o.element_size() for o in tree_leaves(out)
                 if isinstance(o, torch.Tensor)]
        self.ops.append((name, max(sizes, default=0)))
        return out


def model_grads(model, fn, *args):
    """(fn(*args) detached, the gradients of model's parameters) after one backward."""
    model.zero_grad(set_to_none=True)
    out = fn(*args)
    out.backward()
    return out.detach(), [q.grad.clone() for q in model.parameters()]


def head_inputs(N, H, V, device):
    """(hidden (N, H), class ids (N,) with row 1 = 3, probabilities (N, V)) for a model head."""
    h = torch.randn(N, H, device=device)
    t = torch.randint(0, V, (N,), device=device)
    t[1] = 3
    p = torch.rand(N, V, device=device).softmax(1)
    return h, t, p
