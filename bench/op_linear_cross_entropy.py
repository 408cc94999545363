"""The linear_cross_entropy op: hidden (N, H) @ W (V, H)^T, class ids, reduction 'mean'.

H is 4096 (a Llama-3-8B head); the CLI's N x V pick the rest. The op is compute-bound (6 N V H flops for forward and backward),
so compare times and peak memory; bytes_moved counts only the operands' traffic
(read x and W; with backward also write their gradients).

Providers:
    softmax_ce_gpu   softmax_ce_gpu.linear_cross_entropy (chunked, never N x V logits)
    torch            F.cross_entropy(F.linear(x, W), t), eager: holds the N x V logits
    torch_lce        torch's F.linear_cross_entropy (its chunked path, default options)
    torch_compile    torch.compile of the two eager lines
    liger            Liger-Kernel's fused linear cross entropy
    cce              Apple's cut-cross-entropy (default gradient filtering)
"""

import torch
import torch.nn.functional as F

from .compiled import compile_for_case
from .op import Impl, Op, ProviderUnavailable

H = 4096


def make_inputs(n, v, dtype, device, generator):
    h = H
    x = torch.randn(n, h, generator=generator, device=device, dtype=torch.float32).to(dtype)
    w = (torch.randn(v, h, generator=generator, device=device, dtype=torch.float32)
         * h ** -0.5).to(dtype)
    target = torch.randint(0, v, (n,), generator=generator, device=device)
    return {"input": x, "linear_weight": w, "target": target}


def reference(input, linear_weight, target):
    return F.cross_entropy(F.linear(input, linear_weight), target)


def bytes_moved(n, v, elsize, mode):
    passes = 1 if mode == "fwd" else 2
    return passes * (n * H + v * H) * elsize


def _load_softmax_ce_gpu(env):
    from softmax_ce_gpu import linear_cross_entropy

    return lambda input, linear_weight, target: linear_cross_entropy(input, linear_weight, target)


def _load_torch(env):
    return reference


def _load_torch_lce(env):
    if not hasattr(F, "linear_cross_entropy"):
        raise ProviderUnavailable("this torch has no F.linear_cross_entropy")
    return lambda input, linear_weight, target: F.linear_cross_entropy(input, linear_weight,
                                                                       target)


def _load_torch_compile(env):
    return compile_for_case(reference, env)


def _load_liger(env):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    if env.device != "cuda":
        raise ProviderUnavailable("Liger-Kernel runs on CUDA tensors only")

    def run(input, linear_weight, target):
        out = liger_fused_linear_cross_entropy(input, linear_weight, target, reduction="mean")
        return out if isinstance(out, torch.Tensor) else out[0]
    return run


def _load_cce(env):
    from cut_cross_entropy import linear_cross_entropy as cce_linear_cross_entropy

    if env.device != "cuda":
        raise ProviderUnavailable("cut-cross-entropy runs on CUDA tensors only")
    return lambda input, linear_weight, target: cce_linear_cross_entropy(
        input, linear_weight, target, reduction="mean")


LINEAR_CROSS_ENTROPY = Op(
    name="linear_cross_entropy",
    make_inputs=make_inputs,
    args=("input", "linear_weight", "target"),
    grad_inputs=("input", "linear_weight"),
    upstream=None,
    reference=reference,
    bytes_moved=bytes_moved,
    impls={
        "softmax_ce_gpu": Impl(_load_softmax_ce_gpu),
        "torch": Impl(_load_torch),
        "torch_lce": Impl(_load_torch_lce),
        "torch_compile": Impl(_load_torch_compile),
        "liger": Impl(_load_liger),
        "cce": Impl(_load_cce),
    },
)
