"""What every loss of the library shares: torch's reduction, computed on the device,
and the rule for a gradient made in forward.

- reduction_scale: 'mean' divides by the sum of the class weights of the non-ignored
  rows (their count without weights) for class ids, by the number of rows for
  probabilities; 0 / 0 gives NaN as in torch. The denominator stays on the device (no
  host sync) and is known before any kernel runs, so a fused kernel can write the
  gradient of the reduced loss directly.
- take_fused_grad: a gradient made in forward is handed to autograd once; it is then
  scaled in place, so a second backward through the same loss (retain_graph=True)
  must raise rather than return a gradient scaled twice.
"""

import torch


def acc_dtype(x):
    """The accumulation dtype for tensors like x: float64 for float64, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def launch_options(opts):
    """The keyword options every launcher takes, from validated LossOptions."""
    return dict(ignore_index=opts.ignore_index, label_smoothing=opts.label_smoothing,
                z_loss=opts.z_loss, softcap=opts.softcap)


def reduction_scale(target, weight, opts, prob, rows, acc, device):
    """(denominator, grad_scale) as device tensors; denominator None unless 'mean'.

    target: (rows,) class ids or probabilities (prob=True); weight: None or (V,).
    grad_scale is the factor of a fused gradient: 1 / denominator for 'mean', else 1.
    """
    one = torch.ones((), dtype=acc, device=device)
    if opts.reduction != "mean":
        return None, one
    if prob:
        denom = torch.full((), float(rows), dtype=acc, device=device)
    else:
        valid = target != opts.ignore_index
        if weight is None:
            denom = valid.sum(dtype=acc)
        else:
            safe = torch.where(valid, target, torch.zeros_like(target)).long()
            denom = (weight.to(acc)[safe] * valid).sum()
    return denom, one / denom


def reduce(loss_rows, denom, reduction):
    """torch's reduction of per-row losses, with the denominator of reduction_scale."""
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total if reduction == "sum" else total / denom


def take_fused_grad(ctx, fn, hint="compute the loss again instead of retain_graph=True"):
    """The saved tensors of a fused backward, the first time only (see the module doc)."""
    if ctx.consumed:
        raise RuntimeError(
            f"{fn}: backward ran a second time through a loss whose gradient was made in "
            f"forward and already handed out; {hint}")
    ctx.consumed = True
    return ctx.saved_tensors
