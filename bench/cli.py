"""softmax-ce-bench: the benchmark CLI.

    softmax-ce-bench [--shapes 8192x128256,...] [--dtypes bf16,...] [--ops cross_entropy]
                     [--modes fwd,fwd+bwd] [--providers softmax_ce_gpu,torch,...] [--out DIR]
    softmax-ce-bench inspect ...        (bench/inspect.py, imported only for this subcommand)
    softmax-ce-bench overhead ...       (bench/overhead.py: host time per call, launches stubbed)
    softmax-ce-bench hf-memory ...      (bench/hf_memory.py: a transformers model, stock vs patched)

With a CUDA device the defaults are the goal shapes of DESIGN.md section 5 in bf16.
Without one it runs a CPU mode (small shapes, fp32) that checks every provider that runs
on CPU and times it with time.perf_counter: CPU timings, never a GPU speed claim.
"""

import argparse
import sys
from pathlib import Path

GPU_SHAPES = "8192x128256,4096x256000,32768x32000,16384x128256"
CPU_SHAPES = "64x1000,32x4096"
GPU_DTYPES = "bf16"
CPU_DTYPES = "fp32"
MODES = "fwd,fwd+bwd"

CPU_NOTICE = ("NOTE: CPU mode (no CUDA device): these are CPU timings, not GPU timings "
              "(time.perf_counter); they check correctness and exercise the harness, and make "
              "no speed claim.")


def _split(text):
    return [s.strip() for s in text.split(",") if s.strip()]


def _shapes(text):
    """'8192x128256,4096x256000' -> [(8192, 128256), (4096, 256000)] (argparse type)."""
    shapes = []
    for item in _split(text) or [text]:
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(
                f"invalid shape {item!r}: expected NxV with positive integers, comma-separated, "
                "e.g. 8192x128256,4096x256000")
        shapes.append((int(parts[0]), int(parts[1])))
    return shapes


def _choices(option, text, known, aliases=None):
    """The comma-separated names in text, each in known (or an alias); ValueError if not."""
    aliases = aliases or {}
    picked = []
    for name in _split(text):
        name = aliases.get(name, name)
        if name not in known:
            raise ValueError(f"argument {option}: unknown value {name!r}; choose from "
                             f"{', '.join(known)}")
        if name not in picked:
            picked.append(name)
    if not picked:
        raise ValueError(f"argument {option}: empty list")
    return picked


def _parser():
    p = argparse.ArgumentParser(
        prog="softmax-ce-bench",
        description="Benchmark softmax cross-entropy providers: correctness against a float64 "
                    "reference first, then time (median, p20, p80), effective GB/s, fraction of "
                    "the device copy bandwidth, speed-up against torch eager, peak extra memory. "
                    "Subcommands: 'softmax-ce-bench inspect ...', 'softmax-ce-bench overhead ...'.")
    p.add_argument("--shapes", type=_shapes, default=None,
                   help=f"comma-separated NxV (default on GPU: {GPU_SHAPES}; on CPU: {CPU_SHAPES})")
    p.add_argument("--dtypes", default=None,
                   help=f"comma-separated from bf16, fp16, fp32 (default GPU: {GPU_DTYPES}, "
                        f"CPU: {CPU_DTYPES})")
    p.add_argument("--ops", default=None, help="comma-separated ops (default: all registered)")
    p.add_argument("--modes", default=MODES, help=f"comma-separated from fwd, fwd+bwd "
                                                  f"(default: {MODES})")
    p.add_argument("--providers", default=None,
                   help="comma-separated providers (default: all; those not installed are "
                        "recorded as skipped)")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory for results.json and bandwidth.png (default: "
                        "bench/results/<device>/)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="where to run (default: cuda when available, else the CPU mode)")
    p.add_argument("--warmup", type=float, default=25, help="warm-up time per case in ms "
                                                             "(do_bench; default 25)")
    p.add_argument("--rep", type=float, default=100, help="timed time per case in ms (default 100)")
    p.add_argument("--compile-timeout", type=float, default=0,
                   help="CPU mode only: seconds a probe torch.compile may take before the "
                        "torch_compile cases are skipped (default 0: skipped, since compiling on "
                        "a 2-core CPU takes longer than the rest of the run; try 60)")
    p.add_argument("--cpu-threads", type=int, default=1,
                   help="torch intra-op threads in the CPU mode (default 1: tiny ops on a small, "
                        "shared CPU are far slower and noisier with several threads)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only")
    return p


def _run_inspect(argv):
    try:
        from .inspect import main as inspect_main
    except ImportError as exc:
        print(f"softmax-ce-bench inspect: this subcommand is not available "
              f"(softmax_ce_gpu.bench.inspect could not be imported: {exc})", file=sys.stderr)
        return 2
    return inspect_main(argv)


def _default_out(device_label):
    """bench/results/<device>/ of the source checkout (editable install), else of the cwd."""
    from .report import safe_name

    here = Path(__file__).resolve().parent
    root = here if (here.parent / "pyproject.toml").is_file() else Path.cwd() / "bench"
    return root / "results" / safe_name(device_label)


def _plan(args, parser):
    """Validate the parsed arguments against the registry; parser.error (exit 2) on a bad one."""
    import torch

    from .harness import Plan
    from .op import MODES as KNOWN_MODES, Env
    from .registry import DTYPE_ALIASES, DTYPES, OPS, provider_names

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda requested but no CUDA device is available")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and
                                                 torch.cuda.is_available()) else "cpu"
    try:
        ops = [OPS[name] for name in _choices("--ops", args.ops or ",".join(OPS), list(OPS))]
        known = provider_names(ops)
        providers = _choices("--providers", args.providers or ",".join(known), known)
        default_dtypes = GPU_DTYPES if device == "cuda" else CPU_DTYPES
        dtype_names = _choices("--dtypes", args.dtypes or default_dtypes, list(DTYPES),
                               DTYPE_ALIASES)
        modes = _choices("--modes", args.modes, list(KNOWN_MODES), {"fwd_bwd": "fwd+bwd"})
    except ValueError as exc:
        parser.error(str(exc))
    if args.cpu_threads < 1:
        parser.error("argument --cpu-threads: must be >= 1")
    for option in ("warmup", "rep"):
        if not getattr(args, option) > 0:
            parser.error(f"argument --{option}: must be > 0")
    shapes = args.shapes or _shapes(GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    return Plan(ops=ops, shapes=shapes, dtypes=[DTYPES[d] for d in dtype_names], modes=modes,
                providers=providers, env=Env(device, args.compile_timeout),
                warmup_ms=args.warmup, rep_ms=args.rep, seed=args.seed)


def main(argv=None):
    """Run the CLI; returns the exit status (2 for bad arguments, 1 when one of ours is wrong)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["inspect"]:
        return _run_inspect(argv[1:])
    if argv[:1] == ["overhead"]:
        from .overhead import main as overhead_main

        return overhead_main(argv[1:])
    if argv[:1] == ["hf-memory"]:
        from .hf_memory import main as hf_memory_main

        return hf_memory_main(argv[1:])
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        plan = _plan(args, parser)
    except SystemExit as exc:  # argparse: --help (0) or a bad argument (2), message printed
        return exc.code if isinstance(exc.code, int) else 2

    import torch

    from . import report

    cpu = plan.env.device == "cpu"
    head = report.header(plan.env.device)
    threads = torch.get_num_threads()
    if cpu:
        print(CPU_NOTICE, flush=True)
        torch.set_num_threads(args.cpu_threads)
        head["cpu_threads"] = args.cpu_threads
    try:
        return _bench(plan, args, head, cpu)
    finally:  # main() may run inside another program (the tests): leave its threads as found
        torch.set_num_threads(threads)


def _bench(plan, args, head, cpu):
    """Run the plan, print the table, write the JSON and the plot; the exit status."""
    from . import harness, report
    from .plot import plot

    out_dir = args.out or _default_out(head["device"])
    print(f"softmax-ce-bench on {head['device']}: torch {head['torch']}, triton {head['triton']}, "
          f"git {head['git']}; {harness.count_cases(plan)} cases -> {out_dir}", flush=True)

    def progress(line):
        print(line, file=sys.stderr, flush=True)

    records = harness.run(plan, head, progress)
    print(flush=True)
    print(report.table(records), flush=True)
    json_path = report.write_json(records, out_dir / "results.json")
    print(f"\nJSON: {json_path}", flush=True)
    if not args.no_plot:
        png = plot(json_path, out_dir / "bandwidth.png")
        if png is not None:
            print(f"plot: {png}")
    if cpu:
        print(CPU_NOTICE)
    ours_bad = [r for r in records
                if r["provider"].startswith("softmax_ce_gpu") and r["status"] in ("wrong", "error")]
    if ours_bad:
        print(f"FAILED: {len(ours_bad)} softmax_ce_gpu case(s) wrong or in error", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
