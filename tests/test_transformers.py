"""softmax_ce_gpu.integrations.transformers.apply against the unpatched model.

Every model is a tiny random-weight model built from a config here (no download): hidden 32,
2 layers, vocabulary 500, batch 2 x 8 tokens. Each test compares a patched model with an
unpatched deep copy of the same model, on the same inputs.

Tolerances (helpers.TOL). fp32: the loss and every parameter's gradient against the stock
model's, at the fp32 tolerance. bf16 (test_family_bf16 says why): the loss, and the head's
two gradients (d loss / d last_hidden_state, d loss / d lm_head.weight) against the stock
head's at one bf16 rounding; every parameter's gradient against what the stock model's own
backward makes of those two.
"""

import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TOL, assert_close, rel_err

transformers = pytest.importorskip("transformers")

from softmax_ce_gpu.integrations import transformers as sc_hf  # noqa: E402

V = 500          # not a power of two, below one kernel block
B, T = 2, 8     # few rows: the interpreter takes about 0.1 s per row

_COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, vocab_size=V, max_position_embeddings=64, pad_token_id=0,
               bos_token_id=1, eos_token_id=2)
# family -> (config class, model class, config overrides)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=16)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, sliding_window=8)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=16, sliding_window=8)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", None),
}


def make_model(family, dtype=torch.float32, **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    if extra is None:  # GPT-2 names its sizes differently; no dropout, so train() is deterministic
        kw = dict(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=V, bos_token_id=1,
                  eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        kw = dict(_COMMON, **extra)
    config = getattr(transformers, config_cls)(**dict(kw, **overrides))
    return getattr(transformers, model_cls)(config).to(dtype).eval()


def stock_and_patched(family, dtype=torch.float32, options=None, **overrides):
    stock = make_model(family, dtype, **overrides)
    patched = sc_hf.apply(copy.deepcopy(stock), **(options or {}))
    return stock, patched


def make_batch():
    """Token ids and labels: a run of -100 (a masked prompt) and one more ignored position."""
    ids = torch.randint(3, V, (B, T))
    labels = ids.clone()
    labels[0, :5] = -100
    labels[1, 6] = -100
    return ids, labels


def grads(model):
    return {name: p.grad for name, p in model.named_parameters()}


def assert_grads_match(patched, stock, dtype):
    ours, theirs = grads(patched), grads(stock)
    assert ours.keys() == theirs.keys()
    for name, g in theirs.items():
        assert g is not None and ours[name] is not None, name
        err = rel_err(ours[name], g)
        assert err <= TOL[dtype], f"{name}: relative error {err:.3g} > {TOL[dtype]:.3g}"


def capture_last_hidden(model):
    """Keep the backbone's last_hidden_state (with its gradient) of the next forward."""
    kept = {}

    def hook(module, inputs, output):
        output.last_hidden_state.retain_grad()
        kept["h"] = output.last_hidden_state

    handle = model.base_model.register_forward_hook(hook)
    return kept, handle


def run(model, *args, **kwargs):
    out = model(*args, **kwargs)
    out.loss.backward()
    return out


# ----------------------------------------------------------------------------- families


@pytest.mark.parametrize("family", FAMILIES)
def test_family_fp32(family):
    stock, patched = stock_and_patched(family, options=dict(chunk_size=7))  # 4 chunks of rows
    ids, labels = make_batch()
    ours, theirs = run(patched, ids, labels=labels), run(stock, ids, labels=labels)
    assert ours.logits is None and theirs.logits.shape == (B, T, V)
    assert ours.loss.dtype == theirs.loss.dtype == torch.float32
    assert_close(ours.loss, theirs.loss, torch.float32)
    assert_grads_match(patched, stock, torch.float32)


def softcap_of(model):
    """The final-logit softcap the stock forward of this model applies (None: none)."""
    attr = sc_hf.SUPPORTED[type(model).__name__]
    return None if attr is None else getattr(model.config, attr)


def stock_head_loss(model, hidden, weight, labels):
    """The stock model's loss from hidden states: its lm_head, its softcap, ForCausalLMLoss."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = torch.nn.functional.linear(hidden, weight)
    cap = softcap_of(model)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap  # the stock forward's three steps
    return ForCausalLMLoss(logits, labels, model.config.vocab_size)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_bf16(family):
    """bf16: the backbone's forward is the stock one bit for bit; the head's two gradients
    (d loss / d hidden, d loss / d lm_head.weight) are within one bf16 rounding of the stock
    head's on the same hidden states; every parameter's gradient is what the stock model's own
    backward makes of those two.

    (Comparing each parameter's gradient with the stock model's directly would measure the
    stock bf16 backward's conditioning, not this library: a difference of one rounding in a
    few entries of d loss / d hidden grows to 1e-2 in small, cancelling gradients such as
    Qwen2's k_proj.bias, where the stock bf16 gradient is itself 1.4e-2 from the float64 one.)
    """
    stock, patched = stock_and_patched(family, torch.bfloat16)
    ids, labels = make_batch()
    kept_p, handle = capture_last_hidden(patched)
    ours = patched(ids, labels=labels)
    handle.remove()
    kept_s, handle = capture_last_hidden(stock)
    theirs = stock(ids, labels=labels)
    handle.remove()
    assert ours.logits is None and ours.loss.dtype == torch.float32  # as the stock loss
    assert torch.equal(kept_p["h"], kept_s["h"])
    assert_close(ours.loss, theirs.loss, torch.bfloat16)

    def head_grads(loss_of):
        h = kept_s["h"].detach().requires_grad_()
        w = stock.lm_head.weight.detach().clone().requires_grad_()
        loss_of(h, w).backward()
        return h.grad, w.grad

    dh, dw = head_grads(lambda h, w: sc_hf.causal_lm_loss(h, w, labels,
                                                          softcap=softcap_of(stock)))
    stock_dh, stock_dw = head_grads(lambda h, w: stock_head_loss(stock, h, w, labels))
    assert_close(dh, stock_dh, torch.bfloat16)
    assert_close(dw, stock_dw, torch.bfloat16)

    ours.loss.backward()
    names, params = zip(*stock.named_parameters())
    backbone = torch.autograd.grad(kept_s["h"], params, grad_outputs=dh, allow_unused=True)
    for name, p, g, mine in zip(names, params, backbone, grads(patched).values()):
        expected = torch.zeros_like(p) if g is None else g
        if p is stock.lm_head.weight:  # the head's own gradient (tied: plus the embedding's)
            expected = expected + dw
        err = rel_err(mine, expected)
        assert err <= TOL[torch.bfloat16], f"{name}: relative error {err:.3g}"


# ----------------------------------------------------------------------------- loss keywords


@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor"])
def test_num_items_in_batch_gradient_accumulation(as_tensor):
    """Two micro-batches, each normalised by the tokens of both (Trainer's accumulation)."""
    stock, patched = stock_and_patched("llama", options=dict(chunk_size=5))
    micro = [make_batch() for _ in range(2)]
    total = sum(int((labels[:, 1:] != -100).sum()) for _, labels in micro)
    n = torch.tensor(total) if as_tensor else total
    for ids, labels in micro:
        ours = run(patched, ids, labels=labels, num_items_in_batch=n)
        theirs = run(stock, ids, labels=labels, num_items_in_batch=n)
        assert_close(ours.loss, theirs.loss, torch.float32)
    assert_grads_match(patched, stock, torch.float32)


def test_shift_labels_and_ignore_index():
    stock, patched = stock_and_patched("qwen3")
    ids, labels = make_batch()
    shift = torch.randint(0, V, (B, T))
    shift[:, -3:] = 7
    for kw in (dict(shift_labels=shift), dict(ignore_index=7)):
        for model in (stock, patched):
            model.zero_grad()
        ours = run(patched, ids, labels=labels.clamp(min=0), **kw)
        theirs = run(stock, ids, labels=labels.clamp(min=0), **kw)
        assert_close(ours.loss, theirs.loss, torch.float32)
        assert_grads_match(patched, stock, torch.float32)


def test_fully_ignored_sequences():
    """One sequence without a label: the mean over the other; none at all: NaN, zero grads."""
    stock, patched = stock_and_patched("qwen2")
    ids, labels = make_batch()
    labels[1] = -100
    for case in ("one sequence", "all"):
        if case == "all":
            labels[:] = -100
            for model in (stock, patched):
                model.zero_grad()
        ours, theirs = run(patched, ids, labels=labels), run(stock, ids, labels=labels)
        assert_close(ours.loss, theirs.loss, torch.float32)  # NaN == NaN for "all"
        assert_grads_match(patched, stock, torch.float32)
    assert torch.isnan(ours.loss)
    assert all(torch.count_nonzero(g) == 0 for g in grads(patched).values())


@pytest.mark.parametrize("keep", [4, "positions"])
def test_logits_to_keep(keep):
    """Only the kept positions enter the loss; labels are given for those positions."""
    stock, patched = stock_and_patched("mistral")
    ids, labels = make_batch()
    keep = 4 if keep == 4 else torch.tensor([1, 3, 4, 6])
    n = 4 if isinstance(keep, int) else keep.numel()
    kept_labels = torch.randint(0, V, (B, n))
    ours = run(patched, ids, labels=kept_labels, logits_to_keep=keep)
    theirs = run(stock, ids, labels=kept_labels, logits_to_keep=keep)
    assert_close(ours.loss, theirs.loss, torch.float32)
    assert_grads_match(patched, stock, torch.float32)
    with pytest.raises(ValueError, match="logits_to_keep"):
        patched(ids, labels=labels, logits_to_keep=keep)  # labels for every position: mismatch


# ----------------------------------------------------------------------------- softcap, ties


def test_gemma2_softcap_from_config_and_override():
    stock = make_model("gemma2", final_logit_softcapping=2.0, tie_word_embeddings=False)
    with torch.no_grad():
        stock.lm_head.weight.mul_(50.0)  # logits of a few units, where a cap of 2 bites
    patched = sc_hf.apply(copy.deepcopy(stock))
    ids, labels = make_batch()
    uncapped = copy.deepcopy(stock)
    uncapped.config.final_logit_softcapping = None
    ours, theirs = run(patched, ids, labels=labels), run(stock, ids, labels=labels)
    assert rel_err(uncapped(ids, labels=labels).loss, theirs.loss) > 100 * TOL[torch.float32]
    assert_close(ours.loss, theirs.loss, torch.float32)
    assert_grads_match(patched, stock, torch.float32)
    # an explicit option overrides the config: softcap=None is the uncapped model's loss
    no_cap = sc_hf.apply(copy.deepcopy(stock), softcap=None)
    assert_close(no_cap(ids, labels=labels).loss, uncapped(ids, labels=labels).loss,
                 torch.float32)
    two = sc_hf.apply(copy.deepcopy(stock), softcap=5.0)
    stock_two = copy.deepcopy(stock)
    stock_two.config.final_logit_softcapping = 5.0
    assert_close(two(ids, labels=labels).loss, stock_two(ids, labels=labels).loss, torch.float32)


def test_tied_embeddings():
    stock, patched = stock_and_patched("llama", tie_word_embeddings=True)
    assert patched.lm_head.weight is patched.model.embed_tokens.weight
    ids, labels = make_batch()
    run(patched, ids, labels=labels)
    run(stock, ids, labels=labels)
    # one parameter, two uses: the embedding lookup's gradient plus the head's
    assert [n for n, _ in patched.named_parameters()] == [n for n, _ in stock.named_parameters()]
    assert_close(patched.model.embed_tokens.weight.grad, stock.model.embed_tokens.weight.grad,
                 torch.float32)
    assert_grads_match(patched, stock, torch.float32)


def test_autocast_bf16_over_fp32_weights():
    """Mixed precision as Trainer(bf16=True) runs it: fp32 weights, bf16 autocast."""
    stock, patched = stock_and_patched("llama")
    ids, labels = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = patched(ids, labels=labels)
        theirs = stock(ids, labels=labels)
    ours.loss.backward()
    theirs.loss.backward()
    assert ours.loss.dtype == theirs.loss.dtype == torch.float32
    assert_close(ours.loss, theirs.loss, torch.bfloat16)
    assert_close(patched.lm_head.weight.grad, stock.lm_head.weight.grad, torch.bfloat16)


def test_z_loss_and_label_smoothing_options():
    """The extras change the loss as linear_cross_entropy defines them (not a stock option)."""
    stock, patched = stock_and_patched("phi3", options=dict(z_loss=1e-2, label_smoothing=0.1))
    ids, labels = make_batch()
    ours = patched(ids, labels=labels).loss
    logits = stock(ids).logits[:, :-1].reshape(-1, V).double()
    target = labels[:, 1:].reshape(-1)
    valid = target != -100
    lse = torch.logsumexp(logits, dim=-1)
    expected = (torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.1,
                                                  reduction="none")
                + 1e-2 * lse ** 2)[valid].mean()
    assert_close(ours, expected, torch.float32)


# ----------------------------------------------------------------------------- outputs


def test_without_labels_and_generation_unchanged():
    stock, patched = stock_and_patched("gemma3")
    other = make_model("gemma3")
    ids, _ = make_batch()
    assert torch.equal(patched(ids).logits, stock(ids).logits)
    kw = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)
    ours, theirs = patched.generate(ids, **kw), stock.generate(ids, **kw)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ours.logits, theirs.logits))
    # the class and the other instances are untouched
    assert "forward" in vars(patched) and "forward" not in vars(other)
    assert type(other).forward is type(stock).forward


def test_keep_logits_and_return_dict():
    stock, patched = stock_and_patched("gpt2", options=dict(keep_logits=True))
    ids, labels = make_batch()
    ours, theirs = patched(ids, labels=labels), stock(ids, labels=labels)
    assert torch.equal(ours.logits, theirs.logits)
    assert_close(ours.loss, theirs.loss, torch.float32)
    plain = sc_hf.apply(copy.deepcopy(stock))
    as_tuple = plain(ids, labels=labels, return_dict=False)
    stock_tuple = stock(ids, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(stock_tuple, tuple)
    assert_close(as_tuple[0], stock_tuple[0], torch.float32)
    # the same fields, less the logits
    assert len(as_tuple) == len(stock_tuple) - 1


def test_instances_are_independent_and_copies_keep_the_patch():
    a = sc_hf.apply(make_model("llama"), z_loss=1e-2)
    b = sc_hf.apply(copy.deepcopy(a), z_loss=0.0)   # re-applying replaces the options
    c = copy.deepcopy(a)                            # a copy of a patched model is patched
    buffer = io.BytesIO()
    torch.save(a, buffer)                           # and so is a pickled one
    buffer.seek(0)
    d = torch.load(buffer, weights_only=False)
    stock = copy.deepcopy(a)
    del stock.forward                               # back to the class's forward
    ids, labels = make_batch()
    out = {key: m(ids, labels=labels) for key, m in dict(a=a, b=b, c=c, d=d).items()}
    ref = stock(ids, labels=labels).loss
    assert_close(out["b"].loss, ref, torch.float32)
    for key in "cd":
        assert out[key].logits is None
        assert_close(out[key].loss, out["a"].loss, torch.float32)
    assert out["a"].loss > ref


# ----------------------------------------------------------------------------- refusals


def test_unsupported_classes_are_refused():
    tf = transformers
    granite = tf.GraniteForCausalLM(tf.GraniteConfig(**_COMMON, logits_scaling=4.0))
    with pytest.raises(TypeError, match="GraniteForCausalLM is not supported"):
        sc_hf.apply(granite)
    classifier = tf.LlamaForSequenceClassification(tf.LlamaConfig(**_COMMON))
    with pytest.raises(TypeError, match="LlamaForSequenceClassification is not supported"):
        sc_hf.apply(classifier)

    class MyLlama(tf.LlamaForCausalLM):  # a subclass may change the forward
        pass

    with pytest.raises(TypeError, match="MyLlama is not supported"):
        sc_hf.apply(MyLlama(tf.LlamaConfig(**_COMMON)))
    with pytest.raises(TypeError, match="argument 'model'"):
        sc_hf.apply("llama")


def test_changed_head_or_loss_is_refused():
    ids, labels = make_batch()
    model = sc_hf.apply(make_model("llama"))
    handle = model.lm_head.register_forward_hook(lambda *a: None)
    with pytest.raises(TypeError, match="lm_head has hooks"):
        model(ids, labels=labels)
    handle.remove()
    model.loss_function = lambda *a, **k: torch.zeros(())
    with pytest.raises(TypeError, match="not transformers' ForCausalLMLoss"):
        model(ids, labels=labels)
    assert model(ids).logits.shape == (B, T, V)  # without labels: the stock forward


BAD_OPTIONS = [
    (dict(zloss=1e-4), TypeError, "unknown option 'zloss'"),
    (dict(z_loss=-1.0), ValueError, "'z_loss' must be >= 0, got -1.0"),
    (dict(softcap=0.0), ValueError, "'softcap' must be > 0 or None, got 0.0"),
    (dict(label_smoothing=2.0), ValueError, "'label_smoothing' must be in [0, 1], got 2.0"),
    (dict(chunk_size=0), ValueError, "'chunk_size' must be >= 1, got 0"),
    (dict(chunk_size=2.5), TypeError, "'chunk_size' must be an int or None, got 2.5"),
    (dict(keep_logits="yes"), TypeError, "'keep_logits' must be a bool, got 'yes'"),
]


@pytest.mark.parametrize("options,exc,words", BAD_OPTIONS, ids=[str(o[0]) for o in BAD_OPTIONS])
def test_bad_options(options, exc, words):
    model = make_model("llama")
    with pytest.raises(exc) as info:
        sc_hf.apply(model, **options)
    msg = str(info.value)
    assert "softmax_ce_gpu.integrations.transformers.apply" in msg and words in msg, msg
    assert "forward" not in vars(model)


ROOT = Path(__file__).resolve().parents[1]


def test_core_does_not_import_transformers():
    code = ("import sys, softmax_ce_gpu, softmax_ce_gpu.integrations, softmax_ce_gpu.linear; "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_transformers_imports_from_the_checkout_root():
    """transformers probes `import kernels` (its hub package); from the repository root that
    finds our kernels/ folder, which must then be an empty package, not an ImportError."""
    code = ("import kernels, transformers.integrations.hub_kernels as hub; "
            "assert kernels.__file__.startswith(%r) and not hasattr(kernels, 'cross_entropy_fwd'); "
            "from softmax_ce_gpu import kernels as k; assert k.cross_entropy_fwd" % str(ROOT))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_hf_memory_command(tmp_path):
    """The README's memory command at the tiny shape: every record checked and measured."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "hf_memory.json"
    subprocess.run([sys.executable, "-m", "softmax_ce_gpu.bench.hf_memory", "--shapes", "tiny",
                    "--json", str(out)], check=True, env=env, cwd=tmp_path)
    records = json.loads(out.read_text())
    assert [r["provider"] for r in records] == ["stock", "patched", "patched, kernels"] * 2
    assert all(r["status"] == "ok" and r["peak_mb"] > 0 for r in records)
    stock = [r for r in records if r["provider"] == "stock"]
    assert all(r["peak_mb"] > r["logits_mb"] for r in stock)  # the stock call holds the logits


# ----------------------------------------------------------------------------- Trainer


class _TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(3, V, (n, T), generator=g)
        self.mask = torch.ones(n, T, dtype=torch.long)
        self.mask[::3, -4:] = 0  # some right-padded sequences

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].masked_fill(self.mask[i] == 0, -100)
        return dict(input_ids=self.ids[i], attention_mask=self.mask[i], labels=labels)


def _train(model, tmp_path):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=3, logging_steps=1, learning_rate=0.5, optim="sgd",
        lr_scheduler_type="constant", report_to="none", use_cpu=True, save_strategy="no",
        seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0)
    seen = []

    def spy(module, args, kwargs):
        seen.append("num_items_in_batch" in kwargs)

    handle = model.register_forward_pre_hook(spy, with_kwargs=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_TokenDataset(12))
    trainer.train()
    handle.remove()
    assert trainer.model_accepts_loss_kwargs and all(seen) and len(seen) == 6
    return [rec["loss"] for rec in trainer.state.log_history if "loss" in rec]


def test_trainer_logs_the_same_losses(tmp_path):
    """3 optimizer steps of 2 accumulated micro-batches (num_items_in_batch), SGD: the
    logged losses and the trained parameters."""
    stock = make_model("llama")
    start = copy.deepcopy(stock)
    patched = sc_hf.apply(copy.deepcopy(stock))
    theirs = _train(stock, tmp_path / "stock")
    ours = _train(patched, tmp_path / "patched")
    assert len(ours) == len(theirs) == 3
    assert_close(torch.tensor(ours), torch.tensor(theirs), torch.float32)
    flat = [torch.cat([p.detach().flatten() for p in m.parameters()])
            for m in (patched, stock, start)]
    assert rel_err(flat[1], flat[2]) > 100 * TOL[torch.float32]  # the steps moved the weights
    for (name, p), q, p0 in zip(patched.named_parameters(), stock.parameters(),
                                start.parameters()):
        assert not torch.equal(q, p0), f"{name} did not train"
        assert rel_err(p, q) <= TOL[torch.float32], name
