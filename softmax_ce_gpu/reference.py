"""Pure-PyTorch cross-entropy with the kernels' interface and semantics.

It holds the launchers of every op (softmax's live in reference_softmax.py).
This is the backend for tensors the Triton kernels do not take (float64, and
CPU tensors when Triton's interpreter is off), so the library works, slowly,
anywhere. It computes in float32, or float64 for float64 logits, with plain
torch operations (no host synchronisation on any device), and follows the math
of kernels/cross_entropy.py line for line, building the (N, V) target matrix y
that the kernels never materialise.
"""

import torch

from ._reduction import acc_dtype
from .reference_softmax import softmax_bwd, softmax_fwd  # noqa: F401  (same module, both ops)


def _capped(logits, softcap, acc):
    """(z, dz/dx): the softcapped logits in the accumulation dtype; -inf stays -inf."""
    x = logits.to(acc)
    if softcap is None:
        return x, None
    # in float64 whatever acc is: x / c and c * tanh stay exact for any c a float holds (in
    # fp32 a c beyond 3.4e38 would be inf), and 1 - tanh^2 = 4 e / (1 + e)^2 with
    # e = exp(-2 |x| / c) does not cancel for large |x| / c
    x64 = logits.to(torch.float64)
    u = x64 / softcap
    e = torch.exp(-2.0 * u.abs())
    pad = x64 == float("-inf")
    z = torch.where(pad, x64, softcap * torch.tanh(u))
    dz = torch.where(pad, torch.zeros_like(e), 4.0 * e / (1.0 + e) ** 2)
    return z.to(acc), dz.to(acc)


def _target_matrix(target, weight, V, ignore_index, label_smoothing, acc):
    """(y, valid, coef_c): the (N, V) per-class target weights, the (N,) non-ignored mask
    and, for class ids, the (N,) sparse coefficient (1 - e) w_c (None for probabilities)."""
    e = label_smoothing
    w = None if weight is None else weight.to(acc)
    if target.is_floating_point():
        y = (1.0 - e) * target.to(acc) + e / V
        if w is not None:
            y = y * w
        return y, torch.ones(target.shape[0], dtype=torch.bool, device=target.device), None
    valid = target != ignore_index
    c = torch.where(valid, target, torch.zeros_like(target)).long().clamp(0, V - 1)
    N = target.shape[0]
    w_c = torch.ones(N, dtype=acc, device=target.device) if w is None else w[c]
    y = torch.full((N, V), e / V, dtype=acc, device=target.device)
    if w is not None:
        y = y * w
    coef_c = (1.0 - e) * w_c * valid
    # out of place: torch.vmap refuses an in-place scatter of batched values into y
    y = y.scatter_add(1, c[:, None], coef_c[:, None])
    y = y * valid[:, None]
    return y, valid, coef_c


def _ids(target):
    return None if target.is_floating_point() else target


def _row_stats(z):
    """(m, log d), with log d = log1p(s) and s the sum without one max element's exp(0) = 1."""
    m = z.amax(dim=1)
    m_ref = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    e = torch.exp(z - m_ref[:, None])
    first_max = z.argmax(dim=1, keepdim=True)
    s = e.scatter(1, first_max, 0.0).sum(dim=1) - (m == float("-inf")).to(e.dtype)
    logd = torch.log1p(s)
    # a +inf logit: torch's log-softmax is NaN (inf - inf)
    return m, torch.where(m == float("inf"), torch.full_like(logd, float("nan")), logd)


def _row_grad(z, dz, y, valid, m, logd, S, z_loss, scale, target=None, coef_c=None):
    """scale * (p (S + 2 z_loss lse) - y) [* dz]; class targets get column c as the kernel does."""
    u = (z - m[:, None]) - logd[:, None]
    p = torch.exp(u)
    coef_p = S + torch.where(valid, 2.0 * z_loss * (m + logd), torch.zeros_like(S))
    g = p * coef_p[:, None] - y
    if target is not None:
        # (1 - e) w_c (p_c - 1) + p_c (S' - (1 - e) w_c) - a_c, with p_c - 1 = expm1(u_c)
        c = torch.where(valid, target, torch.zeros_like(target)).long()[:, None]
        u_c = u.gather(1, c)
        a_c = y.gather(1, c) - coef_c[:, None]
        g_c = coef_c[:, None] * torch.expm1(u_c) + p.gather(1, c) * (coef_p - coef_c)[:, None] - a_c
        g = g.scatter(1, c, g_c)
    g = g * scale[:, None]
    g = torch.where(valid[:, None], g, torch.zeros_like(g))
    return g if dz is None else g * dz


def _row_extras(logits, z, target, valid, m, logd, lse):
    """(lse, entropy, correct) per row, as the kernels' STATS rows: NaN / False when ignored.

    The argmax is of the logits (of the target row for probabilities), first index on ties.
    """
    # H = lse - sum_j p_j z_j = log d - T / d, T = sum_j e^(z_j - m) (z_j - m) <= 0: a sum of
    # two terms >= 0, as the kernels compute it (0 * -inf = 0 for padding)
    u = z - m[:, None]
    e = torch.exp(u)
    T = torch.where(e == 0, torch.zeros_like(e), e * u).sum(dim=1)
    entropy = logd - T / torch.exp(logd)
    best = logits.argmax(dim=1)
    want = target.argmax(dim=1) if target.is_floating_point() else target.long()
    nan = torch.full_like(lse, float("nan"))
    correct = (valid & (best == want)).to(lse.dtype)
    return torch.where(valid, lse, nan), torch.where(valid, entropy, nan), correct


def _target_grad(z, weight, scale, m, logd, label_smoothing, acc):
    """scale (1 - e) w_j (lse - z_j): the gradient with respect to a probability target."""
    dt = ((1.0 - label_smoothing) * scale)[:, None] * ((m[:, None] - z) + logd[:, None])
    return dt if weight is None else dt * weight.to(acc)


def _write_grads(grad, dtarget, z, dz, y, valid, m, logd, S, z_loss, scale, target, coef_c,
                 weight, label_smoothing, acc):
    """Write the logits' gradient into grad and the target's into dtarget (each if not None).

    Both are computed before either is written: grad may be the logits themselves (in
    place), and z is the logits for fp32/fp64 (no copy)."""
    g = dt = None
    if grad is not None:
        g = _row_grad(z, dz, y, valid, m, logd, S, z_loss, scale, _ids(target), coef_c)
    if dtarget is not None:
        dt = _target_grad(z, weight, scale, m, logd, label_smoothing, acc)
    if dt is not None:
        dtarget.copy_(dt)
    if g is not None:
        grad.copy_(g)


def cross_entropy_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                      grad=None, grad_scale=None, stats=None, with_stats=False, dtarget=None,
                      own_scale=None):
    """Same contract as softmax_ce_gpu.kernels.cross_entropy_fwd."""
    acc = acc_dtype(logits)
    V = logits.shape[1]
    if own_scale is not None:
        grad_scale.copy_(loss_scale(target, weight, ignore_index=ignore_index, mean=own_scale,
                                    prob=target.is_floating_point(), V=V, acc=acc))
    z, dz = _capped(logits, softcap, acc)
    y, valid, coef_c = _target_matrix(target, weight, V, ignore_index, label_smoothing, acc)
    m, logd = _row_stats(z)
    lse = m + logd
    # y_j (lse - z_j), with y_j = 0 contributing nothing even where z_j = -inf
    terms = torch.where(y == 0, torch.zeros_like(y), y * ((m[:, None] - z) + logd[:, None]))
    loss = terms.sum(dim=1) + z_loss * lse * lse
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    S = y.sum(dim=1)
    rows = [loss, m, logd, S]
    if with_stats:
        rows += _row_extras(logits, z, target, valid, m, logd, lse)
    out = torch.stack(rows)  # in acc: fp32 (fp64 for fp64 logits), as the kernels
    if grad is not None or dtarget is not None:
        scale = _first(grad_scale).to(acc).expand(logits.shape[0])
        _write_grads(grad, dtarget, z, dz, y, valid, m, logd, S, z_loss, scale, target, coef_c,
                     weight, label_smoothing, acc)
    return out if stats is None else stats.copy_(out)


def cross_entropy_bwd(logits, target, weight, stats, dloss, grad_scale, grad, ignore_index,
                      label_smoothing, z_loss, softcap, dtarget=None):
    """Same contract as softmax_ce_gpu.kernels.cross_entropy_bwd."""
    acc = acc_dtype(logits)
    V = logits.shape[1]
    z, dz = _capped(logits, softcap, acc)
    y, valid, coef_c = _target_matrix(target, weight, V, ignore_index, label_smoothing, acc)
    scale = (dloss.to(acc) * _first(grad_scale).to(acc)).expand(logits.shape[0])
    m, logd = stats[1].to(acc), stats[2].to(acc)
    _write_grads(grad, dtarget, z, dz, y, valid, m, logd, stats[3].to(acc), z_loss, scale,
                 target, coef_c, weight, label_smoothing, acc)
    return grad


def scale_grad(grad, dloss):
    """Same contract as softmax_ce_gpu.kernels.scale_grad (here always a multiply)."""
    acc = acc_dtype(grad)
    g = grad.to(acc)
    # an exact zero (an ignored row) stays 0 under an inf/NaN dloss, as in the kernel
    return grad.copy_(torch.where(g == 0, g, g * dloss.to(acc)))


def loss_scale(target, weight, *, ignore_index, mean, prob, V, acc=torch.float32):
    """Same contract as softmax_ce_gpu.kernels.reduction.loss_scale, in the dtype acc; no
    host synchronisation (this path also serves float64 on CUDA)."""
    N, dev = target.shape[0], target.device
    if prob:
        denom = torch.full((), float(N), dtype=acc, device=dev)
        ok = torch.ones((), dtype=acc, device=dev)
    else:
        valid = target != ignore_index
        bad = valid & ((target < 0) | (target >= V))
        counted = valid & ~bad
        c = torch.where(counted, target, torch.zeros_like(target)).long()
        w = torch.ones(N, dtype=acc, device=dev) if weight is None else weight.to(acc)[c]
        denom = (w * counted).sum()
        ok = (~bad.any()).to(acc)
    grad_scale = 1.0 / denom if mean else torch.ones_like(denom)
    return torch.stack([grad_scale, denom, ok])


def loss_reduce(loss_rows, scale, mean, dtype):
    """Same contract as softmax_ce_gpu.kernels.reduction.loss_reduce."""
    total = (loss_rows[0] if loss_rows.dim() == 2 else loss_rows).sum()
    return (total / scale[1] if mean else total).to(dtype)


def _first(grad_scale):
    """The factor of a grad_scale tensor: () or loss_scale's (3,), whose first element it is
    (the kernels read the first element of either)."""
    return grad_scale.reshape(-1)[0]
