"""``softmax-ce-bench inspect``: performance evidence that needs no GPU.

Two instruments, both described in DESIGN.md section 5:

- compiled code (default): every kernel configuration the dispatcher can
  choose is compiled ahead of time for sm_90 and sm_80 (bench/aot.py), and its
  SASS is read: registers (and the programs per SM they allow), spills, local
  memory, the widths of the global loads and stores, and how many 16-byte loads
  sit inside a loop. The single-pass kernel's records (path "single") add
  ``segment`` (columns per program, BLOCK in the table) and K (programs per row). ``--json FILE`` writes one record per compiled kernel,
  ``--dump DIR`` each kernel's cubin and SASS.
- ``--bytes``: the bytes each path reads and writes per logit, counted lane by
  lane under Triton's interpreter (bench/byte_count.py), next to torch eager's
  analytic count.

Each instrument needs its own kind of process (the compiler must not run under
TRITON_INTERPRET=1, the byte counter needs it); when this process is the wrong
kind, the work runs in a child process and its JSON comes back.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from . import aot

_FORMAT = "softmax-ce-bench inspect/1"
# --bytes runs the kernels in the interpreter, which takes seconds per chunk of a row: two
# rows of two bf16 chunks (8192 + 128) show every access pattern; bytes per logit do not
# depend on V, except the per-row scalars (about 30 bytes a row, 0.004 per logit here).
BYTES_V = 8320


def _interpreting():
    """Whether softmax_ce_gpu's kernels are (or, once imported, will be) interpreted here."""
    kernels = sys.modules.get("softmax_ce_gpu.kernels")
    if kernels is not None:
        return bool(kernels.INTERPRETER)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _module(name):
    return f"{__spec__.name.rsplit('.', 1)[0]}.{name}" if __spec__ else f"bench.{name}"


def _run_child(module, argv, interpret):
    env = dict(os.environ)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-m", module, *argv], env=env, capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(argv)} failed (exit {res.returncode}):\n"
                           f"{res.stderr[-4000:]}")
    return json.loads(res.stdout)


# ----------------------------------------------------------------------------- compiled code


def compile_records(vocabs, dtypes, archs, option_sets, jobs, dump_dir):
    """Records of aot.compile_all, computed here or in a child without the interpreter."""
    if _interpreting():
        argv = ["--records-only", "--vocab", *map(str, vocabs), "--dtype", *dtypes,
                "--arch", *map(str, archs), "--jobs", str(jobs)]
        if option_sets is not None:
            argv += ["--options", *option_sets]
        if dump_dir is not None:
            argv += ["--dump", os.path.abspath(dump_dir)]
        return _run_child(_module("inspect"), argv, interpret=False)
    cfgs = aot.configs(vocabs, dtypes, option_sets)
    return aot.compile_all(cfgs, archs, jobs=jobs, dump_dir=dump_dir)


_COLUMNS = [  # (header, key, width)
    ("path", "path", 6), ("options", "options", 9), ("dtype", "dtype", 8), ("V", "V", 6),
    ("arch", "arch", 4), ("BLOCK", "block", 5), ("K", "K", 3), ("warps", "num_warps", 5),
    ("regs", "registers", 4), ("/SM", "programs_per_sm", 3), ("spill", "spills", 5),
    ("local", "local_bytes", 5),
    ("ldg128", "ldg128", 6), ("ldg<128", "ldg_other", 7), ("stg128", "stg128", 6),
    ("stg<128", "stg_other", 7),
]


def format_records(records):
    lines = ["  ".join(h.rjust(w) for h, _, w in _COLUMNS)]
    for r in records:
        lines.append("  ".join(str(r.get(k, "")).rjust(w) for _, k, w in _COLUMNS))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- bytes


def byte_rows(dtype, N, V):
    """Rows of byte_count.path_table, computed here or in a child under the interpreter."""
    if not _interpreting():
        return _run_child(_module("byte_count"), ["--dtype", dtype, "--rows", str(N),
                                                  "--vocab", str(V)], interpret=True)
    from . import byte_count

    return byte_count.path_table(dtype, N, V)


def format_bytes(rows, dtype, N, V):
    head = (f"{'path':<56} {'read':>7} {'written':>7} {'total':>7} {'passes':>6} "
            f"{'distinct':>8} {'NxV allocs':>10} {'interp.':>7}")
    lines = [f"bytes per logit, {dtype}, N = {N}, V = {V}: counted lane by lane under the "
             "interpreter (torch eager: analytic)", head]
    for r in rows:
        allocs = "" if r.get("nxv_allocations") is None else str(r["nxv_allocations"])
        distinct = "" if r.get("distinct") is None else f"{r['distinct']:.4f}"
        interp = "" if not r.get("interpreter_only") else f"{r['interpreter_only']:.4f}"
        lines.append(f"{r['path']:<56} {r['read']:>7.4f} {r['written']:>7.4f} "
                     f"{r['total']:>7.4f} {r['passes']:>6.2f} {distinct:>8} {allocs:>10} "
                     f"{interp:>7}")
    lines.append("read/written/total: bytes moved by the kernels' loads, stores and atomics (all "
                 "tensors) per logit; passes: total / element size; distinct: each element "
                 "counted once per launch (DRAM traffic if re-reads within a launch hit L2); NxV "
                 "allocs: host allocations of at least half the logits' size. interp.: bytes "
                 "per logit of the buffer that carries the single-pass kernel's registers "
                 "between its two launches under the interpreter: no GPU traffic (the compiled "
                 "single-launch kernel has no such buffer; inspect shows it loads each segment "
                 "once), left out of the totals.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def _parser():
    p = argparse.ArgumentParser(
        prog="softmax-ce-bench inspect",
        description="Compile every kernel configuration for sm_90/sm_80 without a GPU and "
                    "report registers, spills, local memory and load/store widths; or, with "
                    "--bytes, the bytes per logit of each path counted under the interpreter.")
    p.add_argument("--json", metavar="FILE", help="write the records (one per compiled kernel, "
                   "or one per path with --bytes) to FILE")
    p.add_argument("--dump", metavar="DIR", help="write each kernel's cubin and SASS to DIR, "
                   "named after its record")
    p.add_argument("--bytes", action="store_true",
                   help="print the bytes-per-logit table instead of compiling")
    p.add_argument("--vocab", type=int, nargs="+", default=list(aot.VOCABS),
                   help=f"vocabulary sizes V (default {' '.join(map(str, aot.VOCABS))}; "
                        f"with --bytes the first one, default {BYTES_V})")
    p.add_argument("--dtype", nargs="+", default=list(aot.DTYPES), choices=aot.DTYPES,
                   help="logit dtypes (default all; with --bytes the first, default bfloat16)")
    p.add_argument("--arch", type=int, nargs="+", default=list(aot.ARCHS),
                   help="compute capabilities (default 90 80)")
    p.add_argument("--options", nargs="+", default=None,
                   help=f"option sets of the loss kernels (default {' '.join(aot.OPTION_SETS)})")
    p.add_argument("--all", action="store_true",
                   help="all 32 combinations of the five option flags (slow)")
    p.add_argument("--rows", type=int, default=2, help="rows N for --bytes (default 2)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="compile worker processes (default: the CPU count)")
    p.add_argument("--records-only", action="store_true", help=argparse.SUPPRESS)
    return p


def _header():
    import torch
    import triton

    return dict(format=_FORMAT, triton=triton.__version__, torch=torch.__version__,
                python=platform.python_version(), machine=platform.machine())


def main(argv: list) -> int:
    args = _parser().parse_args(argv)
    if args.bytes:
        dtype = args.dtype[0] if args.dtype != list(aot.DTYPES) else "bfloat16"
        V = args.vocab[0] if args.vocab != list(aot.VOCABS) else BYTES_V
        rows = byte_rows(dtype, args.rows, V)
        print(format_bytes(rows, dtype, args.rows, V))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(_header(), kind="bytes", dtype=dtype, N=args.rows, V=V,
                               records=rows), f, indent=1)
        return 0

    option_sets = list(aot.all_option_sets()) if args.all else args.options
    start = time.time()
    records = compile_records(args.vocab, args.dtype, args.arch, option_sets, args.jobs,
                              args.dump)
    if args.records_only:
        sys.stdout.write(json.dumps(records))
        return 0
    print(format_records(records))
    bad = [r["name"] for r in records if r["spills"] or r["local_bytes"] or r["ldl"] or r["stl"]]
    print(f"\n{len(records)} kernels compiled in {time.time() - start:.0f} s; "
          f"{len(bad)} with spills or local memory" + (f": {', '.join(bad)}" if bad else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(_header(), kind="compiled", records=records), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
