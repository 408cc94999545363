"""The cross_entropy op: class-index targets, reduction 'mean', as in a language model's loss.

Inputs: logits (N, V) of the dtype under test, standard normal values; target (N,) int64
class ids drawn uniformly from [0, V).

Bytes (the budget of DESIGN.md section 3, shared by every provider): the forward reads
the logits once, N*V*b; forward and backward read them once and write the gradient
once, 2*N*V*b (b = element size). Targets and per-row scalars are left out: N*8 bytes
against N*V*b.

Providers:
    softmax_ce_gpu           softmax_ce_gpu.cross_entropy (the fused path kernels/tuning.py picks)
    softmax_ce_gpu_inplace   the same, inplace_backward=True (the gradient overwrites the logits)
    softmax_ce_gpu_stats     the same, return_stats=True (lse, entropy, correct per row)
    softmax_ce_gpu_single    the same, on the single-pass fused path (each logit read once:
                             kernels/cross_entropy_single.py), whatever the default is
    softmax_ce_gpu_single_inplace   the same, inplace_backward=True
    softmax_ce_gpu_two_sweep the same, on the two-sweep fused path (kernels/cross_entropy.py)
    torch                    torch.nn.functional.cross_entropy, eager
    torch_compile            torch.compile of the same (static shapes, default mode)
    liger                    Liger-Kernel's cross entropy (overwrites the logits with the gradient)
    quack                    quack.cross_entropy (CuTe DSL; Hopper and newer)
"""

import inspect

import torch
import torch.nn.functional as F

from .compiled import compile_for_case
from .op import Impl, Op, ProviderUnavailable


def make_inputs(n, v, dtype, device, generator):
    logits = torch.randn(n, v, generator=generator, device=device, dtype=torch.float32).to(dtype)
    target = torch.randint(0, v, (n,), generator=generator, device=device)
    return {"logits": logits, "target": target}


def reference(logits, target):
    return F.cross_entropy(logits, target)


def bytes_moved(n, v, elsize, mode):
    passes = 1 if mode == "fwd" else 2
    return passes * n * v * elsize


def _with_note(fn, note):
    fn.note = note
    return fn


def _load_softmax_ce_gpu(env, inplace, stats=False, path=None):
    """softmax_ce_gpu.cross_entropy; path: None (the default path), or the fused path to force
    (kernels.tuning.use_fused_path, around the forward: backward only scales the gradient)."""
    import softmax_ce_gpu

    if env.device == "cuda":
        note = "triton"
    else:
        try:
            from softmax_ce_gpu import kernels
        except ImportError:
            kernels = None
        interpreted = kernels is not None and kernels.INTERPRETER
        note = "triton interpreter" if interpreted else "pure-PyTorch path"

    if stats:
        def call(logits, target):
            return softmax_ce_gpu.cross_entropy(logits, target, return_stats=True)[0]
    else:
        def call(logits, target):
            return softmax_ce_gpu.cross_entropy(logits, target, inplace_backward=inplace)
    run = call

    if path is not None:
        from softmax_ce_gpu.kernels import tuning

        def run(logits, target):
            with tuning.use_fused_path(path):
                return call(logits, target)

        if note != "pure-PyTorch path":  # which has no fused paths to choose from
            note = f"{note}, {path} path"
    return _with_note(run, note)


def _load_torch(env):
    def run(logits, target):
        return F.cross_entropy(logits, target)

    return run


def _load_torch_compile(env):
    return compile_for_case(lambda logits, target: F.cross_entropy(logits, target), env)


def _load_liger(env):
    from liger_kernel.transformers.functional import liger_cross_entropy

    if env.device != "cuda":
        raise ProviderUnavailable("Liger-Kernel runs on CUDA tensors only")

    def run(logits, target):
        out = liger_cross_entropy(logits, target, reduction="mean")
        # versions differ: a tensor, a (loss, z_loss, ...) tuple, or an output object
        if isinstance(out, torch.Tensor):
            return out
        return out.loss if hasattr(out, "loss") else out[0]

    return run


def _load_quack(env):
    from quack.cross_entropy import cross_entropy as quack_cross_entropy

    if env.device != "cuda":
        raise ProviderUnavailable("quack runs on CUDA tensors only")
    if "reduction" in inspect.signature(quack_cross_entropy).parameters:
        def run(logits, target):
            return quack_cross_entropy(logits, target, reduction="mean")
    else:  # early versions return the per-row losses
        def run(logits, target):
            return quack_cross_entropy(logits, target).mean()
    return run


CROSS_ENTROPY = Op(
    name="cross_entropy",
    make_inputs=make_inputs,
    args=("logits", "target"),
    grad_inputs=("logits",),
    upstream=None,
    reference=reference,
    bytes_moved=bytes_moved,
    impls={
        "softmax_ce_gpu": Impl(lambda env: _load_softmax_ce_gpu(env, inplace=False)),
        "softmax_ce_gpu_inplace": Impl(lambda env: _load_softmax_ce_gpu(env, inplace=True),
                                       inplace=True),
        "softmax_ce_gpu_stats": Impl(lambda env: _load_softmax_ce_gpu(env, inplace=False,
                                                                      stats=True)),
        "softmax_ce_gpu_single": Impl(
            lambda env: _load_softmax_ce_gpu(env, False, path="single")),
        "softmax_ce_gpu_single_inplace": Impl(
            lambda env: _load_softmax_ce_gpu(env, True, path="single"), inplace=True),
        "softmax_ce_gpu_two_sweep": Impl(
            lambda env: _load_softmax_ce_gpu(env, False, path="two-sweep")),
        "torch": Impl(_load_torch),
        "torch_compile": Impl(_load_torch_compile),
        "liger": Impl(_load_liger, inplace=True),
        "quack": Impl(_load_quack),
    },
)
