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
- no_second_order: under create_graph=True, a gradient that cannot be differentiated
  again (made in forward from logits that are gone) is handed out through a node whose
  backward raises, so a second derivative fails loudly instead of missing a term.
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


class _NoSecondOrder(torch.autograd.Function):
    """Outputs g * dloss (or g) for each g, tied to ``anchor``; backward raises."""

    generate_vmap_rule = True  # torch operations only

    @staticmethod
    def forward(anchor, dloss, fn, hint, *grads):
        if dloss is None:
            return tuple(None if g is None else g.clone() for g in grads)
        # exact zeros (ignored rows) stay 0 under an inf/NaN dloss, as scale_grad keeps them
        return tuple(None if g is None else torch.where(g == 0, g, g * dloss.to(g.dtype))
                     for g in grads)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.fn, ctx.hint = inputs[2], inputs[3]

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(f"{ctx.fn}: a second derivative (a backward through the gradient "
                           f"made with create_graph=True) is not supported here; {ctx.hint}")


def no_second_order(fn, hint, dloss, *grads):
    """The gradients (times dloss unless it is None) as new tensors that autograd can hold
    in a graph (create_graph=True) but not differentiate: their backward raises, naming fn
    and the hint. Their node hangs from a new leaf that requires grad (the anchor): the
    loss itself is not saved for backward, so that the caller may modify it in place
    (loss /= steps) as torch's allows."""
    device = next((g.device for g in grads if g is not None), None)
    anchor = torch.zeros((), device=device, requires_grad=True)
    return _NoSecondOrder.apply(anchor, dloss, fn, hint, *grads)
