"""Hugging Face transformers: a causal LM computes its loss from the hidden states.

    import softmax_ce_gpu.integrations.transformers as sc_hf

    model = AutoModelForCausalLM.from_pretrained(...)
    sc_hf.apply(model)                          # this instance only; returns it
    out = model(input_ids, labels=labels)       # out.loss: the stock loss, out.logits: None
    out.loss.backward()                         # the stock gradients, for every parameter

The stock forward of these models computes logits = lm_head(hidden) for every position,
(B, T, V), and its loss (transformers.loss.loss_utils.ForCausalLMLoss) upcasts them to fp32:
at 8192 tokens and V = 128256 that is 2 GiB of bf16 logits, 4 GiB of fp32 copies and the
gradients of both. After apply, a call with labels computes the same loss with
softmax_ce_gpu.linear_cross_entropy on the final hidden states and lm_head.weight, a chunk
of rows at a time, and never holds the (B, T, V) logits.

How a call with labels runs, on the patched instance:
 1. The stock forward of the model's class runs, unchanged, with labels=None and
    logits_to_keep=slice(0, 0): the backbone sees every argument and keyword the stock call
    would pass it; the lm_head projects zero positions; no loss is computed.
 2. A forward hook on the backbone, registered for that call only, takes its
    last_hidden_state: the tensor the stock forward feeds to lm_head.
 3. ForCausalLMLoss is redone on those hidden states: the same logits_to_keep slicing
    (transformers' slice_logits_to_keep), the same label shift (labels padded on the right
    with ignore_index, then shifted by one; or the shift_labels keyword as given), the same
    ignore_index (-100 unless the call passes ignore_index=), and the same reduction: the
    mean over non-ignored positions, or, when num_items_in_batch is given (gradient
    accumulation), the sum divided by it. The loss is returned in fp32, as the stock loss.
 4. The softcap the stock forward applies to the logits before its loss (Gemma 2 and 3:
    config.final_logit_softcapping, read at each call) is applied by linear_cross_entropy.
 5. Under torch.autocast, linear_cross_entropy casts the hidden states, lm_head.weight and
    bias to the autocast dtype first, as autocast casts them for the stock lm_head.

A call without labels (generation, evaluation without labels, model.generate) runs the stock
forward, unchanged. Nothing is patched on the class: two models of one class in one process
are independent, and a copy of a patched model (copy.deepcopy, pickle, torch.save) is
patched with the same options.

Supported (read in transformers 5.24; tested on 5.24 and 5.0): the classes in SUPPORTED,
whose forwards all have the standard causal-LM layout: backbone -> last_hidden_state ->
slice_logits_to_keep -> lm_head (an nn.Linear) -> [final-logit softcap] -> ForCausalLMLoss,
nothing else done to the logits. Anything else is refused with a TypeError naming the
class (no silent fallback to the stock loss), as is a model whose lm_head has been wrapped
or hooked (PEFT on the head, accelerate's offloading, FSDP) or whose loss function is not
the stock ForCausalLMLoss: the loss would differ from what the model would compute.
"""

import functools
import inspect
from dataclasses import dataclass
from typing import Optional

import torch

from .. import _checks
from ..linear import _check_chunk, _linear_cross_entropy

_FN = "softmax_ce_gpu.integrations.transformers.apply"

# class name -> the config attribute holding the softcap its forward applies to the logits
# before the loss (None: no softcap). Each forward was read in transformers 5.24; the tests
# pass on 5.0 too.
SUPPORTED = {
    "LlamaForCausalLM": None,
    "MistralForCausalLM": None,
    "Qwen2ForCausalLM": None,
    "Qwen3ForCausalLM": None,
    "GemmaForCausalLM": None,
    "Gemma2ForCausalLM": "final_logit_softcapping",
    "Gemma3ForCausalLM": "final_logit_softcapping",
    "Phi3ForCausalLM": None,
    "GPT2LMHeadModel": None,
}

# where apply keeps the options on the patched instance (a plain attribute: copied by deepcopy)
_OPTIONS_ATTR = "_softmax_ce_gpu_options"


class _FromConfig:
    """The softcap option when it is not given: the model's config decides, at each call."""

    def __repr__(self):
        return "<the model's config>"

    def __reduce__(self):  # one object: copy, deepcopy and pickle give back _FROM_CONFIG itself
        return "_FROM_CONFIG"


_FROM_CONFIG = _FromConfig()


@dataclass(frozen=True)
class Options:
    """The loss options of a patched model (see apply)."""

    z_loss: float = 0.0
    label_smoothing: float = 0.0
    softcap: object = _FROM_CONFIG   # _FROM_CONFIG, None or a float > 0 (see apply)
    chunk_size: Optional[int] = None
    keep_logits: bool = False


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(f"{_FN} needs Hugging Face transformers: "
                          "pip install 'softmax_ce_gpu[transformers]'") from exc
    return transformers


def _stock_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss


def _slice_logits_to_keep(hidden, logits_to_keep):
    """transformers' own slicing of the hidden states by logits_to_keep (int, slice, tensor)."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:  # older transformers inlined it in each forward
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden[:, keep, :]
    return slice_logits_to_keep(hidden, logits_to_keep)


def _check_model(model):
    """The supported class, exactly (a subclass may change the forward), and its head."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{_FN}: argument 'model' must be a transformers causal LM "
                        f"(a torch.nn.Module), got {type(model).__name__}")
    cls = type(model)
    name = cls.__name__
    transformers = _transformers()
    supported = name in SUPPORTED and getattr(transformers, name, None) is cls
    if not supported:
        raise TypeError(
            f"{_FN}: {cls.__module__}.{cls.__qualname__} is not supported: its forward is not "
            f"known to have the standard causal-LM layout (backbone, lm_head, ForCausalLMLoss). "
            f"Supported classes: {', '.join(SUPPORTED)}")
    _check_head(model)


def _check_head(model):
    """What the stock forward relies on and a wrapped model may have changed (at apply and at
    every call: PEFT, accelerate or FSDP may wrap the model after apply)."""
    name = type(model).__name__
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(backbone, torch.nn.Module) or backbone is model:
        raise TypeError(f"{_FN}: {name} has no backbone module at "
                        f"'{getattr(model, 'base_model_prefix', None)}'")
    head = getattr(model, "lm_head", None)
    if type(head) is not torch.nn.Linear:
        raise TypeError(f"{_FN}: {name}.lm_head must be a plain torch.nn.Linear to be fused "
                        f"with the loss, got {type(head).__name__} (wrapped by PEFT or "
                        "quantized?)")
    if "forward" in vars(head) or head._forward_hooks or head._forward_pre_hooks:
        raise TypeError(f"{_FN}: {name}.lm_head has hooks or a replaced forward (accelerate "
                        "offloading, FSDP?); the fused loss reads lm_head.weight directly and "
                        "would skip them")
    loss_fn = getattr(model, "loss_function", None)
    if loss_fn is not _stock_loss():
        raise TypeError(f"{_FN}: {name}.loss_function is {loss_fn!r}, not transformers' "
                        "ForCausalLMLoss (a custom loss or config.loss_type); it cannot be fused")
    return backbone, head


def _check_options(options):
    known = {f for f in Options.__dataclass_fields__}
    for key in options:
        if key not in known:
            raise TypeError(f"{_FN}: unknown option '{key}'; options are "
                            f"{', '.join(sorted(known))}")
    softcap = options.get("softcap", _FROM_CONFIG)
    opts = _checks.check_options(_FN, -100, "mean", options.get("label_smoothing", 0.0),
                                 options.get("z_loss", 0.0),
                                 None if softcap is _FROM_CONFIG else softcap)
    keep = options.get("keep_logits", False)
    _checks.check_bool(_FN, "keep_logits", keep)
    chunk_size = options.get("chunk_size")
    try:
        _check_chunk(chunk_size, None)
    except (TypeError, ValueError) as exc:  # re-raise under this function's name
        raise type(exc)(str(exc).replace("linear_cross_entropy", _FN, 1)) from None
    return Options(opts.z_loss, opts.label_smoothing,
                   _FROM_CONFIG if softcap is _FROM_CONFIG else opts.softcap, chunk_size, keep)


def apply(model, **options):
    """Make this causal LM instance compute its loss with linear_cross_entropy; returns it.

    Args:
        model: an instance of one of the classes in SUPPORTED (transformers' LlamaForCausalLM,
            MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, GemmaForCausalLM,
            Gemma2ForCausalLM, Gemma3ForCausalLM, Phi3ForCausalLM, GPT2LMHeadModel). Only this
            instance changes (its forward attribute); its class and other instances do not.
            Applying again replaces the options.
        z_loss: >= 0 (default 0.0): adds z_loss * lse^2 per non-ignored position (not part of
            the stock loss).
        label_smoothing: in [0, 1] (default 0.0; the stock loss has none).
        softcap: c > 0 or None. Not given (default): the model's own final-logit softcap,
            read from its config at each call (Gemma 2: config.final_logit_softcapping, 30.0
            by default), none for the families without one. Given: overrides it (None: none).
        chunk_size: None (default: linear_cross_entropy's rule) or rows per chunk.
        keep_logits: False (default): a call with labels returns logits=None. True: the
            logits are also computed, as the stock forward computes them (then the (B, T, V)
            tensor exists again; only the loss's fp32 copies and their gradient are saved).

    After apply, model(..., labels=labels) returns the stock output type with loss equal to
    the stock loss (same label shift, ignore_index, num_items_in_batch, shift_labels,
    logits_to_keep) and **logits None** unless keep_logits=True; backward gives every
    parameter the stock gradient, the tied embedding included. Without labels the stock
    forward runs unchanged. The lm_head's weight is read directly: a head wrapped later (PEFT
    on lm_head, accelerate hooks, FSDP) raises at the next call.

    Raises TypeError for an unsupported class (naming it) or an unknown option, and
    TypeError/ValueError for a bad option value.
    """
    _check_model(model)
    opts = _check_options(options)
    _stock_signature(type(model).forward)  # refuses a forward without labels / logits_to_keep
    setattr(model, _OPTIONS_ATTR, opts)
    # an instance attribute shadows the class's forward for this instance only; nn.Module's
    # __call__ (and so generate, Trainer, DDP) calls it
    model.forward = _PatchedForward(model)
    return model


@functools.lru_cache(maxsize=None)
def _stock_signature(stock):
    """(signature, name of its **kwargs parameter) of a class's forward."""
    signature = inspect.signature(stock)
    var_kw = next((p.name for p in signature.parameters.values()
                   if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    if "labels" not in signature.parameters or "logits_to_keep" not in signature.parameters:
        raise TypeError(f"{_FN}: {stock.__qualname__} takes no 'labels' or 'logits_to_keep' "
                        "argument; this transformers version is not supported")
    return signature, var_kw


class _PatchedForward:
    """Patched by softmax_ce_gpu.integrations.transformers.apply (this instance only).

    With labels, the loss is computed by softmax_ce_gpu.linear_cross_entropy from the final
    hidden states, equal to the stock loss, and the output's logits is None (unless apply was
    given keep_logits=True). Without labels, this is the stock forward, unchanged.

    An object bound to one model rather than a bound method, so that pickle (torch.save),
    copy and deepcopy rebuild it around the new model: a bound method pickles as
    getattr(model, 'forward') and would come back as the stock forward, silently.
    """

    def __init__(self, model):
        self._model = model

    def __call__(self, *args, **kwargs):
        model = self._model
        stock = type(model).forward
        signature, var_kw = _stock_signature(stock)
        bound = signature.bind(model, *args, **kwargs)
        if bound.arguments.get("labels") is None:
            return stock(model, *args, **kwargs)
        return _forward_with_loss(model, stock, bound, var_kw)

    def __reduce__(self):
        return _PatchedForward, (self._model,)

    @property
    def __signature__(self):
        """The stock forward's (Trainer reads it for its loss keywords and dataset columns)."""
        return inspect.signature(type(self._model).forward.__get__(self._model))

    def __repr__(self):
        return f"<forward of {type(self._model).__name__} patched by {_FN}>"


def _forward_with_loss(model, stock, bound, var_kw):
    opts = getattr(model, _OPTIONS_ATTR)
    backbone, head = _check_head(model)
    args = bound.arguments
    extra = args.get(var_kw, {}) if var_kw else {}
    labels = args["labels"]
    logits_to_keep = args.get("logits_to_keep", 0)

    # return_dict as transformers' can_return_tuple decides it; the stock call must return a
    # ModelOutput so that the loss can be put in
    return_dict = getattr(model.config, "return_dict", True)
    passed = args.get("return_dict") if "return_dict" in args else extra.get("return_dict")
    if passed is not None:
        return_dict = passed
    if "return_dict" in bound.signature.parameters:
        args["return_dict"] = True
    else:
        extra = dict(extra, return_dict=True)
    if var_kw:
        args[var_kw] = extra

    args["labels"] = None
    if not opts.keep_logits:
        args["logits_to_keep"] = slice(0, 0)  # the stock lm_head then projects no position
    captured = []

    def capture(module, inputs, output):
        captured.append(output)

    handle = backbone.register_forward_hook(capture)
    try:
        out = stock(*bound.args, **bound.kwargs)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"{_FN}: the backbone of {type(model).__name__} ran {len(captured)} "
                           "times in one forward (expected once)")
    last = captured[0]
    hidden = last.last_hidden_state if hasattr(last, "last_hidden_state") else last[0]
    hidden = _slice_logits_to_keep(hidden, logits_to_keep)

    softcap = opts.softcap
    if softcap is _FROM_CONFIG:
        attr = SUPPORTED[type(model).__name__]
        softcap = None if attr is None else getattr(model.config, attr, None)
    loss = causal_lm_loss(hidden, head.weight, labels, head.bias,
                          vocab_size=model.config.vocab_size, softcap=softcap,
                          z_loss=opts.z_loss, label_smoothing=opts.label_smoothing,
                          chunk_size=opts.chunk_size,
                          # the keywords ForCausalLMLoss reads; it ignores the others
                          num_items_in_batch=extra.get("num_items_in_batch"),
                          ignore_index=extra.get("ignore_index", -100),
                          shift_labels=extra.get("shift_labels"))

    fields = dict(out)
    fields["loss"] = loss
    fields["logits"] = out.logits if opts.keep_logits else None
    out = type(out)(**fields)
    return out if return_dict else out.to_tuple()


def causal_lm_loss(hidden, lm_weight, labels, lm_bias=None, *, vocab_size=None,
                   num_items_in_batch=None, ignore_index=-100, shift_labels=None, softcap=None,
                   z_loss=0.0, label_smoothing=0.0, chunk_size=None):
    """transformers' ForCausalLMLoss(lm_head(hidden), labels, ...) without the logits.

    Args:
        hidden: (..., H) final hidden states (already sliced by logits_to_keep).
        lm_weight: (V, H) lm_head.weight; lm_bias: None or (V,).
        labels: class ids; padded on the right with ignore_index and shifted by one
            (position t predicts labels[t + 1]), unless shift_labels is given.
        vocab_size: None or V: checked against lm_weight (the stock loss views by it).
        num_items_in_batch: None (the mean over non-ignored positions) or an int or tensor:
            the sum divided by it (transformers' gradient-accumulation normalisation).
        ignore_index: -100 (default). shift_labels: None or labels already shifted, one per
            position of hidden.
        softcap, z_loss, label_smoothing, chunk_size: linear_cross_entropy's.

    Returns: the scalar loss in fp32 (as the stock loss, which upcasts the logits).
    """
    fn = "causal_lm_loss"
    V, H = lm_weight.shape
    if vocab_size is not None and vocab_size != V:
        raise ValueError(f"{fn}: lm_head has {V} outputs but config.vocab_size is {vocab_size}")
    if shift_labels is None:
        labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    x = hidden.reshape(-1, H)
    t = shift_labels.reshape(-1).to(x.device)
    if t.numel() != x.shape[0]:
        raise ValueError(f"{fn}: {x.shape[0]} positions of hidden states (shape "
                         f"{tuple(hidden.shape)}) but {t.numel()} shifted labels (shape "
                         f"{tuple(shift_labels.shape)}); with logits_to_keep, pass labels "
                         "for the kept positions only")
    reduction = "mean" if num_items_in_batch is None else "sum"
    # under torch.autocast, linear_cross_entropy casts its operands as autocast casts the stock
    # lm_head's F.linear; the loss is fp32 either way, as the stock loss
    loss = _linear_cross_entropy(x, lm_weight, t, lm_bias, None, reduction, ignore_index,
                                 label_smoothing, None, z_loss, softcap, chunk_size,
                                 loss_dtype=torch.float32)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss
