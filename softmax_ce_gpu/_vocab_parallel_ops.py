"""The per-shard halves of vocab_parallel_cross_entropy as custom ops (see _ops.py for the
pattern), and their pure-PyTorch path.

- vocab_parallel_partial: checks the class ids against the global V, then the shard's (4, N)
  partial statistics (kernels/vocab_parallel.py's vocab_parallel_fwd, or torch ops).
- vocab_parallel_partial_stats: the same, for return_stats: (6, N) partials (T_r and the
  shard's largest logit added) and the global column of the shard's argmax.
- vocab_parallel_grad: the gradient of the shard's columns from the global per-row max and
  log d, as a new tensor (used in forward for 'mean'/'sum', in backward for 'none'/fp16).

The collectives between them are torch.distributed's functional collectives, called by
distributed.py: torch.compile traces those, and these ops stay opaque calls of known shapes.
"""

from typing import Optional

import torch
from torch import Tensor

from . import _checks, _ops, reference
from ._backend import backend_for
from ._reduction import acc_dtype

try:
    from .kernels import vocab_parallel as _vp_kernels
except ImportError:  # triton missing: backend_for never picks the kernels then
    _vp_kernels = None

NO_ARGMAX = 2 ** 63 - 1  # = kernels/vocab_parallel.py's: no logit above -inf in the shard


# ----------------------------------------------------------------------------- torch path


def _shard_target(target, shard, W, ignore_index):
    """(valid, in_shard, c_loc) as kernels/vocab_parallel.py: c_loc in [0, W), 0 elsewhere."""
    valid = target != ignore_index
    c_loc = target.long() - shard[0]
    in_shard = valid & (c_loc >= 0) & (c_loc < W)
    return valid, in_shard, torch.where(in_shard, c_loc, torch.zeros_like(c_loc))


def _torch_fwd(logits, target, shard, *, ignore_index, label_smoothing, softcap,
               with_stats=False):
    """Same contract as softmax_ce_gpu.kernels.vocab_parallel.vocab_parallel_fwd (without its
    out=), in torch ops (float64 for float64 logits)."""
    acc = acc_dtype(logits)
    W = logits.shape[1]
    if W == 0:  # an empty shard: max -inf, d = 0 (s = -1), no target logit, B = 0 (T = 0)
        m = torch.full((logits.shape[0],), float("-inf"), dtype=acc, device=logits.device)
        zero = torch.zeros_like(m)
        if not with_stats:
            return torch.stack([m, m, torch.full_like(m, -1.0), zero])
        best = torch.full(m.shape, NO_ARGMAX, dtype=torch.int64, device=m.device)
        return torch.stack([m, m, torch.full_like(m, -1.0), zero, zero, m]), best
    z, _ = reference._capped(logits, softcap, acc)
    valid, in_shard, c_loc = _shard_target(target, shard, W, ignore_index)
    inf = torch.tensor(float("inf"), dtype=acc, device=logits.device)
    z = torch.where(valid[:, None], z, -inf)  # an ignored row reads nothing
    m = z.amax(dim=1)
    m_ref = torch.where(m == -inf, torch.zeros_like(m), m)
    e = torch.exp(z - m_ref[:, None])
    s = e.scatter(1, z.argmax(dim=1, keepdim=True), 0.0).sum(dim=1) - (m == -inf).to(acc)
    z_c = torch.where(in_shard, z.gather(1, c_loc[:, None])[:, 0], -inf)
    if label_smoothing > 0.0:
        B = torch.where(z == -inf, inf, m[:, None] - z).sum(dim=1)
        B = torch.where(valid, B, torch.zeros_like(B))
    else:
        B = torch.zeros_like(m)
    if not with_stats:
        return torch.stack([m, z_c, s, B])
    # T = sum_j exp(z_j - m) (m - z_j) >= 0, a -inf logit adding 0; the argmax is of the
    # logits before the softcap, first column on ties (torch.argmax's)
    T = torch.where(z == -inf, torch.zeros_like(z), e * (m_ref[:, None] - z)).sum(dim=1)
    x = torch.where(valid[:, None], logits.to(acc), -inf)
    x_max, best = x.max(dim=1)
    best = torch.where(x_max == -inf, torch.full_like(best, NO_ARGMAX), best + shard[0])
    return torch.stack([m, z_c, s, B, T, x_max]), best


def _torch_bwd(logits, target, shard, row_max, row_logd, dloss, grad_scale, grad, *,
               ignore_index, label_smoothing, z_loss, softcap):
    """Same contract as softmax_ce_gpu.kernels.vocab_parallel.vocab_parallel_bwd, in torch ops."""
    acc = acc_dtype(logits)
    N, W = logits.shape
    z, dz = reference._capped(logits, softcap, acc)
    valid, in_shard, c_loc = _shard_target(target, shard, W, ignore_index)
    m, logd = row_max.to(acc), row_logd.to(acc)
    u = (z - m[:, None]) - logd[:, None]
    p = torch.exp(u)
    zero = torch.zeros_like(m)
    coef_p = torch.where(valid, 1.0 + 2.0 * z_loss * (m + logd), zero)  # S = 1
    coef_c = torch.where(valid, torch.full_like(m, 1.0 - label_smoothing), zero)
    a = label_smoothing / shard[1].to(acc)  # the dense target e / V, global V
    g = p * coef_p[:, None] - a
    # the target column: (1 - e) (p_c - 1) + p_c (S' - (1 - e)) - e / V, p_c - 1 = expm1(u_c)
    u_c = u.gather(1, c_loc[:, None])
    g_c = coef_c[:, None] * torch.expm1(u_c) + torch.exp(u_c) * (coef_p - coef_c)[:, None] - a
    cols = torch.arange(W, device=logits.device)
    g = torch.where((cols[None, :] == c_loc[:, None]) & in_shard[:, None], g_c, g)
    scale = (dloss.to(acc) * grad_scale.to(acc)).expand(N)
    g = torch.where(valid[:, None], g * scale[:, None], torch.zeros_like(g))
    grad.copy_(g if dz is None else g * dz)
    return grad


class _TorchPath:
    vocab_parallel_fwd = staticmethod(_torch_fwd)
    vocab_parallel_bwd = staticmethod(_torch_bwd)


def _impl(fn, x):
    return _vp_kernels if backend_for(fn, x) is not reference else _TorchPath


# ----------------------------------------------------------------------------- ops


def _check_class_range(fn, target, shard, ignore_index):
    V = shard[1]
    if target.device.type == "cuda":
        bad = ((target < 0) | (target >= V)) & (target != ignore_index)
        torch._assert_async(
            ~bad.any(), f"{fn}: a class id in 'target' is outside [0, V) (V the sum of the "
            f"shard widths) and is not ignore_index={ignore_index}")
        return
    _checks.check_class_range(fn, target, int(V), ignore_index)


def _vocab_parallel_partial(x: Tensor, target: Tensor, shard: Tensor, ignore_index: int,
                            label_smoothing: float, softcap: Optional[float], fn: str) -> Tensor:
    """(4, N) per-row partial statistics of this shard (m_r, z_c, s_r, B_r: see
    kernels/vocab_parallel.py), in the accumulation dtype, after checking the class ids
    against the global V = shard[1] (a ValueError on CPU, a device-side assert on CUDA).

    x (N, W) this rank's columns, N >= 1; target (N,) global class ids; shard (2,) int64."""
    _check_class_range(fn, target, shard, ignore_index)
    return _impl(fn, x).vocab_parallel_fwd(x, target, shard, ignore_index=ignore_index,
                                           label_smoothing=label_smoothing, softcap=softcap)


vocab_parallel_partial = _ops._custom_op("vocab_parallel_partial", _vocab_parallel_partial, ())


@vocab_parallel_partial.register_fake
def _(x, target, shard, ignore_index, label_smoothing, softcap, fn):
    return x.new_empty(4, x.shape[0], dtype=acc_dtype(x))


def _vocab_parallel_partial_stats(x: Tensor, target: Tensor, shard: Tensor, ignore_index: int,
                                  label_smoothing: float, softcap: Optional[float],
                                  fn: str) -> tuple[Tensor, Tensor]:
    """vocab_parallel_partial for return_stats: ((6, N) partials, (N,) int64 argmax column).

    The partials' rows 4 and 5 are T_r = sum over the shard of exp(z_j - m_r) (m_r - z_j)
    and the shard's largest logit (before the softcap); the second tensor the global column
    of that logit's first occurrence, NO_ARGMAX where the shard has none above -inf."""
    _check_class_range(fn, target, shard, ignore_index)
    return _impl(fn, x).vocab_parallel_fwd(x, target, shard, ignore_index=ignore_index,
                                           label_smoothing=label_smoothing, softcap=softcap,
                                           with_stats=True)


vocab_parallel_partial_stats = _ops._custom_op("vocab_parallel_partial_stats",
                                               _vocab_parallel_partial_stats, ())


@vocab_parallel_partial_stats.register_fake
def _(x, target, shard, ignore_index, label_smoothing, softcap, fn):
    return (x.new_empty(6, x.shape[0], dtype=acc_dtype(x)),
            x.new_empty(x.shape[0], dtype=torch.int64))


def _vocab_parallel_grad(x: Tensor, target: Tensor, shard: Tensor, row_max: Tensor,
                         row_logd: Tensor, dloss: Tensor, grad_scale: Tensor, ignore_index: int,
                         label_smoothing: float, z_loss: float, softcap: Optional[float],
                         fn: str) -> Tensor:
    """dloss * grad_scale * dl/dx on this shard's columns, a new (N, W) tensor of x's dtype.

    row_max, row_logd (N,): the global per-row max and log d; dloss () or (N,); grad_scale ()."""
    grad = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.shape[0] and x.shape[1]:
        _impl(fn, x).vocab_parallel_bwd(x, target, shard, row_max, row_logd, dloss, grad_scale,
                                        grad, ignore_index=ignore_index,
                                        label_smoothing=label_smoothing, z_loss=z_loss,
                                        softcap=softcap)
    return grad


vocab_parallel_grad = _ops._custom_op("vocab_parallel_grad", _vocab_parallel_grad, ())


@vocab_parallel_grad.register_fake
def _(x, target, shard, row_max, row_logd, dloss, grad_scale, ignore_index, label_smoothing,
      z_loss, softcap, fn):
    return torch.empty_like(x, memory_format=torch.contiguous_format)
