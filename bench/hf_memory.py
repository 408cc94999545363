"""Peak memory of one forward + backward of a Hugging Face causal LM, stock vs patched.

    softmax-ce-bench hf-memory [--shapes tiny,mid] [--dtypes fp32,bf16] [--json PATH]
    python -m softmax_ce_gpu.bench.hf_memory ...            (the same)

For each shape (batch B, sequence T, hidden H, vocabulary V) and dtype it builds a 2-layer
Llama from a config (random weights, no download), then measures one
`model(input_ids, labels=labels).loss.backward()` of the stock model and of the same model
after softmax_ce_gpu.integrations.transformers.apply.

Measured: the peak of the bytes allocated during that call and still alive, above what was
allocated before it (the weights, the inputs): activations, logits, their fp32 copies, the
gradients of the weights (which stay allocated). On CPU it is read from torch.profiler with
profile_memory=True: every allocation and free of torch's CPU allocator in the call, summed
in time order (the allocator's own running total). On CUDA it is
torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), less what was allocated
before.

On CPU the patched model is measured twice:
- 'patched': softmax_ce_gpu's pure-PyTorch backend (Triton's interpreter keeps its buffers in
  numpy, which torch's allocator does not see, so it is refused here). It computes the real
  loss, compared with the stock one, but holds about 8 fp32 temporaries of one chunk of
  logits (8 x C x V x 4 bytes) that the kernels keep in registers.
- 'patched, kernels': the kernel path's host code, the one a GPU runs, with every Triton launch
  replaced by a no-op: its buffers are allocated exactly as on a GPU (the kernels allocate
  nothing themselves), its loss is meaningless and not compared. On CPU its fp16/bf16 GEMMs
  still accumulate through fp32 copies of a chunk's operands (C x (V + H) x 4 bytes), which a
  CUDA torch with addmm(out_dtype=) avoids.
These are memory figures only: CPU timings say nothing about GPU speed and none are printed.
"""

import argparse
import contextlib
import copy
import sys

PRESETS = {"tiny": (2, 8, 32, 500), "mid": (2, 1024, 256, 128256)}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _shape(text):
    """'tiny', 'mid' or 'BxTxHxV' -> (B, T, H, V) (argparse type)."""
    if text in PRESETS:
        return PRESETS[text]
    parts = text.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(
            f"invalid shape {text!r}: expected tiny, mid or BxTxHxV with positive integers "
            "(batch, sequence, hidden, vocabulary), e.g. 2x1024x256x128256")
    return tuple(int(p) for p in parts)


def _parser():
    p = argparse.ArgumentParser(
        prog="softmax-ce-bench hf-memory",
        description="Peak memory of one forward+backward of a transformers Llama, stock vs "
                    "patched by softmax_ce_gpu.integrations.transformers.apply.")
    p.add_argument("--shapes", default="tiny,mid",
                   help="comma-separated presets (tiny = 2x8x32x500, mid = 2x1024x256x128256) "
                        "or BxTxHxV (default: tiny,mid)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated from fp32, bf16, fp16 "
                                                         "(default: fp32,bf16)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    p.add_argument("--json", default=None, help="also write the records to this JSON file")
    return p


def _model(B, T, H, V, layers, dtype, device):
    import torch
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=H, intermediate_size=2 * H, num_hidden_layers=layers,
        num_attention_heads=max(1, H // 64), num_key_value_heads=max(1, H // 64),
        vocab_size=V, max_position_embeddings=max(T, 64), pad_token_id=0, bos_token_id=1,
        eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)
    ids = torch.randint(3, V, (B, T), device=device)
    labels = ids.clone()
    labels[:, : T // 4] = -100  # a masked prompt
    return model, ids, labels


def _peak_cpu(step):
    """(result of step(), peak bytes allocated during it above the start) from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
                     and e.device_type().name == "CPU"), key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:  # allocations are > 0, frees < 0; frees of older blocks are not reported
        live += e.nbytes()
        peak = max(peak, live)
    return result, peak


def _peak_cuda(step):
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = step()
    torch.cuda.synchronize()
    return result, torch.cuda.max_memory_allocated() - base


class _NoLaunch:
    """Stands for a @triton.jit kernel: kernel[grid](...) does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def _stubbed_kernel_launches():
    """linear_cross_entropy through the kernels' host code on CPU, every launch a no-op."""
    import triton

    from softmax_ce_gpu import _linear_ops as linear
    from softmax_ce_gpu import kernels
    from softmax_ce_gpu.kernels import cross_entropy, softmax

    saved = [(linear, "backend_for", linear.backend_for)]
    for module in (cross_entropy, softmax):
        saved += [(module, name, obj) for name, obj in vars(module).items()
                  if isinstance(obj, triton.runtime.JITFunction)]
    try:
        linear.backend_for = lambda fn, x: kernels
        for module, name, _ in saved[1:]:
            setattr(module, name, _NoLaunch())
        yield
    finally:
        for module, name, obj in saved:
            setattr(module, name, obj)


def measure(shape, dtype_name, device="cpu", layers=2):
    """Records (stock, patched[, patched, kernels on CPU]) for one shape and dtype; the
    patched loss is compared with the stock one."""
    import torch

    from softmax_ce_gpu._backend import backend_for
    from softmax_ce_gpu.integrations import transformers as sc_hf

    B, T, H, V = shape
    dtype = getattr(torch, DTYPES[dtype_name])
    model, ids, labels = _model(B, T, H, V, layers, dtype, device)
    probe = torch.empty(1, 1, dtype=dtype, device=device)
    backend = backend_for("hf-memory", probe).__name__.rsplit(".", 1)[-1]
    if device == "cpu" and backend != "reference":
        raise SystemExit("softmax-ce-bench hf-memory: on CPU run without TRITON_INTERPRET=1 "
                         "(the interpreter's buffers are numpy arrays, invisible to torch's "
                         "allocator)")
    peak_of = _peak_cpu if device == "cpu" else _peak_cuda
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    records, losses = [], {}
    providers = ["stock", "patched"] + (["patched, kernels"] if device == "cpu" else [])
    for provider in providers:
        m = copy.deepcopy(model)
        if provider != "stock":
            sc_hf.apply(m)

        def step():
            out = m(ids, labels=labels)
            out.loss.backward()
            return float(out.loss.detach())

        stub = provider == "patched, kernels"
        with _stubbed_kernel_launches() if stub else contextlib.nullcontext():
            losses[provider], peak = peak_of(step)
        records.append(dict(provider=provider, batch=B, seq=T, hidden=H, vocab=V, layers=layers,
                            dtype=dtype_name, device=device, tokens=B * T,
                            logits_mb=B * T * V * probe.element_size() / 2**20,
                            params_mb=params / 2**20, peak_mb=peak / 2**20,
                            backend={"stock": "stock", "patched": backend}.get(
                                provider, "kernels, launches stubbed"),
                            loss=None if stub else losses[provider]))
        del m
    err = abs(losses["patched"] - losses["stock"]) / abs(losses["stock"])
    tol = 2e-5 if dtype == torch.float32 else 1.6e-2
    for r in records:
        r["loss_rel_err"] = err
        r["status"] = "ok" if err <= tol else "wrong"
    return records


def table(records):
    """One line per (dtype, shape): the stock peak and the patched ones, and what they save."""
    groups = {}
    for r in records:
        groups.setdefault((r["dtype"], r["batch"], r["seq"], r["hidden"], r["vocab"]), {})[
            r["provider"]] = r
    head = (f"{'dtype':5} {'B x T':>11} {'H':>5} {'V':>7} {'weights MB':>10} {'logits MB':>10} "
            f"{'stock':>10} {'patched':>10} {'saved':>6} {'kernels':>10} {'saved':>6} "
            f"{'loss err':>8}")
    lines = ["peak MB above weights and inputs; 'kernels': the kernel path's host code, "
             "launches stubbed", head, "-" * len(head)]
    for (dtype, B, T, H, V), g in groups.items():
        stock = g["stock"]

        def cell(provider):
            if provider not in g:
                return f"{'-':>10} {'':>6}"
            peak = g[provider]["peak_mb"]
            saved = 1 - peak / stock["peak_mb"] if stock["peak_mb"] else 0.0
            return f"{peak:>10.2f} {saved:>6.0%}"

        lines.append(f"{dtype:5} {B:>5} x {T:<4} {H:>5} {V:>7} {stock['params_mb']:>10.2f} "
                     f"{stock['logits_mb']:>10.2f} {stock['peak_mb']:>10.2f} {cell('patched')} "
                     f"{cell('patched, kernels')} {stock['loss_rel_err']:>8.1e}"
                     + ("" if stock["status"] == "ok" else "  WRONG"))
    return "\n".join(lines)


def main(argv=None):
    """Run the measurement; exit status 1 if a patched loss disagrees with the stock one."""
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        shapes = [_shape(s.strip()) for s in args.shapes.split(",") if s.strip()]
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            parser.error(f"argument --dtypes: unknown value {d!r}; choose from "
                         f"{', '.join(DTYPES)}")
    try:
        import transformers  # noqa: F401
    except ImportError:
        parser.error("needs Hugging Face transformers: pip install 'softmax_ce_gpu[transformers]'")

    from .report import header

    head = header(args.device)
    print(f"softmax-ce-bench hf-memory on {head['device']}: torch {head['torch']}, transformers "
          f"{transformers.__version__}, git {head['git']}; peak memory of one forward+backward "
          f"of a {args.layers}-layer Llama above its weights and inputs", flush=True)
    records = []
    for dtype in dtypes:
        for shape in shapes:
            records += [dict({k: v for k, v in head.items() if k != "timer"},
                             transformers=transformers.__version__, **r)
                        for r in measure(shape, dtype, args.device, args.layers)]
    print(table(records))
    if args.json:
        from .report import write_json

        print(f"JSON: {write_json(records, args.json)}")
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
