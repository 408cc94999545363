"""Ahead-of-time compilation of every launch the dispatcher can make, with no GPU.

How a configuration becomes a compiled kernel, step by step:

1. Capture. The launcher itself (``cross_entropy_fwd``, ``cross_entropy_bwd``,
   ``scale_grad``) is called on small CPU tensors shaped like the real call, with
   the module's @triton.jit kernels swapped for a recorder for the duration of
   the call. The recorder keeps the launch's arguments (pointers, strides, V,
   scalars, constexprs, num_warps) exactly as the launcher passes them; nothing
   runs. So BLOCK_V/num_warps come from kernels.tuning.row_config through the
   launcher, and a change to either is followed here automatically.
2. Specialize. Each non-constexpr argument goes through Triton's own
   ``native_specialize_impl``, the function the JIT runs at launch: tensors
   become ``*bf16``/``*i64``... with divisibility 16 when their address is
   16-byte aligned (torch allocations are); integers equal to 1 become constexpr
   1 (the unit column strides), integers divisible by 16 get divisibility 16
   (V = 32000, 128256, 256000 and their row strides; not 50257).
3. Compile. ``triton.compile`` for GPUTarget("cuda", 90 | 80, 32), with the
   launch's options: PTX, then a cubin through the wheel's ptxas (the one
   Triton picks for the arch). ptxas's report (registers, spill bytes, stack)
   is captured from that same run: the compile bypasses Triton's cache.
4. Read. ``cuobjdump -sass`` of the cubin: global loads/stores (LDG/STG) split by
   width (``.128`` = 16 bytes), LDGSTS (cp.async, counted as loads), and
   LDL/STL (local memory); ``cuobjdump -res-usage`` for REG and LOCAL.

This module must run in a process without TRITON_INTERPRET=1: under the
interpreter the kernels are not JIT functions and cannot be compiled.
"""

import contextlib
import dataclasses
import inspect
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

import torch

ARCHS = (90, 80)
VOCABS = (32000, 50257, 128256, 256000)
DTYPES = ("float32", "bfloat16", "float16")

# option sets of the forward and backward kernels (the constexpr flags follow from them)
OPTION_SETS = {
    # class ids, nothing else: the common LLM case
    "plain": dict(weight=False, prob=False, label_smoothing=0.0, z_loss=0.0, softcap=None),
    # class ids with every option that can go with them
    "ids+all": dict(weight=True, prob=False, label_smoothing=0.1, z_loss=1e-4, softcap=30.0),
    # probability targets with every option: all five flags on
    "probs+all": dict(weight=True, prob=True, label_smoothing=0.1, z_loss=1e-4, softcap=30.0),
}
# the per-row statistics (and the target's gradient), compiled for the common LLM dtypes and
# vocabularies only: they add registers per element, which is what the records check
STATS_SETS = {
    "ids+stats": dict(weight=False, prob=False, label_smoothing=0.0, z_loss=0.0, softcap=None,
                      stats=True),
    "probs+all+stats+tgrad": dict(weight=True, prob=True, label_smoothing=0.1, z_loss=1e-4,
                                  softcap=30.0, stats=True, tgrad=True),
}
STATS_VOCABS = (32000, 128256)
STATS_DTYPES = ("float32", "bfloat16")


def all_option_sets():
    """Every combination of the five constexpr flags (32), for ``inspect --all``."""
    sets = {}
    for bits in range(32):
        weight, prob, smooth, zl, cap = ((bits >> i) & 1 == 1 for i in range(5))
        name = "+".join(n for n, on in zip(("w", "probs", "ls", "z", "cap"),
                                           (weight, prob, smooth, zl, cap)) if on) or "plain"
        sets[name] = dict(weight=weight, prob=prob, label_smoothing=0.1 if smooth else 0.0,
                          z_loss=1e-4 if zl else 0.0, softcap=30.0 if cap else None)
    return sets


@dataclasses.dataclass(frozen=True)
class Config:
    """One launch the dispatcher can make: which kernel, with what options, on what rows.

    kernel: 'fwd' (forward only), 'fused' (forward writing the gradient, two-sweep path),
    'single' (forward writing the gradient, single-pass path: kernels/cross_entropy_single.py),
    'bwd' (backward-time gradient) or 'scale' (scale_grad); options: a key of the option
    table (ignored by 'scale'); row_stride: elements between rows (None: V, contiguous).
    """

    kernel: str
    options: str
    dtype: str
    V: int
    row_stride: Optional[int] = None


KERNEL_NAMES = {
    "fwd": "_cross_entropy_fwd_kernel",
    "fused": "_cross_entropy_fwd_kernel",
    "fused-own": "_cross_entropy_fwd_kernel",
    "single": "_cross_entropy_single_kernel",
    "bwd": "_cross_entropy_bwd_kernel",
    "scale": "_scale_grad_kernel",
}


LOSS_KERNELS = ("fwd", "fused", "single", "bwd")
# the fused forward that makes the reduction's scale itself (few rows: own_scale); its code
# past the row sweeps does not depend on V, so one vocabulary is compiled
OWN_SCALE_VOCABS = (32000,)


def configs(vocabs=VOCABS, dtypes=DTYPES, option_sets=None):
    """The configurations inspect compiles: each kernel x option set x dtype x V."""
    default = option_sets is None
    option_sets = list(option_sets or OPTION_SETS)
    out = []
    for V in vocabs:
        for dtype in dtypes:
            for kernel in LOSS_KERNELS:
                for opt in option_sets:
                    out.append(Config(kernel, opt, dtype, V))
                # (the single-pass path leaves statistics and target gradients to the
                # two-sweep one: kernels.tuning.fused_path)
                if default and V in STATS_VOCABS and dtype in STATS_DTYPES and kernel != "single":
                    for opt in STATS_SETS:
                        if kernel != "bwd" or STATS_SETS[opt].get("tgrad"):
                            out.append(Config(kernel, opt, dtype, V))
            if default and V in OWN_SCALE_VOCABS:
                out.extend(Config("fused-own", opt, dtype, V) for opt in option_sets)
            out.append(Config("scale", "-", dtype, V))
    return out


def option_set(name):
    """The options of an option-set name (OPTION_SETS, STATS_SETS or all_option_sets)."""
    return OPTION_SETS.get(name) or STATS_SETS.get(name) or all_option_sets()[name]


# ----------------------------------------------------------------------------- 1. capture


class _Recorder:
    """Stands in for a @triton.jit kernel: ``k[grid](*args, **kw)`` records instead of running."""

    def __init__(self, fn):
        self.fn = fn
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.fn, grid, args, kwargs))
        return launch


@contextlib.contextmanager
def _recording(module):
    names = [n for n, v in vars(module).items() if type(v).__name__ == "JITFunction"]
    saved = {n: getattr(module, n) for n in names}
    recorders = {n: _Recorder(saved[n]) for n in names}
    try:
        for n, r in recorders.items():
            setattr(module, n, r)
        yield recorders
    finally:
        for n, fn in saved.items():
            setattr(module, n, fn)


def capture(cfg, module=None):
    """(jit_fn, args, kwargs) of the single launch the launcher makes for ``cfg``.

    The tensors are CPU tensors of 2 rows; only their dtypes, strides and 16-byte
    alignment reach the compiler, exactly as they would from CUDA tensors.
    """
    if module is None and cfg.kernel == "single":
        from softmax_ce_gpu.kernels import cross_entropy_single as module
    elif module is None:
        from softmax_ce_gpu.kernels import cross_entropy as module
    dtype = getattr(torch, cfg.dtype)
    N, V = 2, cfg.V
    stride = cfg.row_stride or V
    logits = torch.empty(N, stride, dtype=dtype)[:, :V]
    with _recording(module) as rec:
        if cfg.kernel == "scale":
            module.scale_grad(logits, torch.ones((), dtype=dtype))
        else:
            o = option_set(cfg.options)
            if o["prob"]:
                target = torch.empty(N, V, dtype=dtype)
            else:
                target = torch.zeros(N, dtype=torch.int64)
            weight = torch.empty(V, dtype=dtype) if o["weight"] else None
            kw = dict(ignore_index=-100, label_smoothing=o["label_smoothing"],
                      z_loss=o["z_loss"], softcap=o["softcap"])
            dtarget = torch.empty_like(target) if o.get("tgrad") else None
            if cfg.kernel == "bwd":
                stats = torch.empty(4, N, dtype=torch.float32)
                # backward-time path = reduction 'none': one upstream gradient per row
                dloss = torch.ones(N, dtype=dtype)
                module.cross_entropy_bwd(logits, target, weight, stats, dloss,
                                         torch.ones((), dtype=torch.float32),
                                         torch.empty_like(logits), dtarget=dtarget, **kw)
            elif cfg.kernel == "single":
                module.cross_entropy_single_fwd(logits, target, weight,
                                                grad=torch.empty_like(logits),
                                                grad_scale=torch.ones((), dtype=torch.float32),
                                                **kw)
            elif cfg.kernel == "fused":
                module.cross_entropy_fwd(logits, target, weight, grad=torch.empty_like(logits),
                                         grad_scale=torch.ones((), dtype=torch.float32),
                                         with_stats=bool(o.get("stats")), dtarget=dtarget, **kw)
            elif cfg.kernel == "fused-own":
                module.cross_entropy_fwd(logits, target, weight, grad=torch.empty_like(logits),
                                         grad_scale=torch.empty(3, dtype=torch.float32),
                                         dtarget=dtarget, own_scale=True, **kw)
            else:
                module.cross_entropy_fwd(logits, target, weight, with_stats=bool(o.get("stats")),
                                         **kw)
    launches = [launch for r in rec.values() for launch in r.launches]
    if len(launches) != 1:
        raise RuntimeError(f"{cfg}: expected one kernel launch, the launcher made {len(launches)}")
    fn, _grid, args, kwargs = launches[0]
    return fn, args, kwargs


# ----------------------------------------------------------------------------- 2. specialize


def specialize(fn, args, kwargs, backend):
    """(signature, constexprs, attrs, options) as the JIT would derive them at launch."""
    from triton._C.libtriton import native_specialize_impl

    names = fn.arg_names
    bound = inspect.signature(fn.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in names})
    bound.apply_defaults()
    options = {k: v for k, v in kwargs.items() if k not in names}
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = bound.arguments[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(i,)] = value
            continue
        ty, attr = native_specialize_impl(backend, value, param.is_const,
                                          not param.do_not_specialize,
                                          not param.do_not_specialize_on_alignment)[:2]
        signature[param.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = value
        elif isinstance(attr, str):
            parsed = backend.parse_attr(attr)
            if parsed:
                attrs[(i,)] = parsed
    return signature, constexprs, attrs, options


# ----------------------------------------------------------------------------- 3. compile


def compile_launch(fn, args, kwargs, arch):
    """Compile one captured launch for sm_<arch>; returns (compiled kernel, ptxas log)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    signature, constexprs, attrs, options = specialize(fn, args, kwargs, backend)
    src = ASTSource(fn, signature, constexprs, attrs)
    # ptxas's own report (registers, spill bytes) is printed only when ptxas runs: compile
    # afresh (never from Triton's cache) with the log on, and catch what it prints
    knobs = triton.knobs
    saved = (knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile)
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=target, options=options)
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    return kernel, log.getvalue(), signature


def _tool(name):
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found in the triton wheel ({path})")
    return path


# ----------------------------------------------------------------------------- 4. read


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")


def parse_ptxas(log):
    """registers, spill bytes (stores + loads) and stack frame bytes from ptxas -v."""
    regs = _PTXAS_REGS.findall(log)
    spills = _PTXAS_SPILL.findall(log)
    stack = _PTXAS_STACK.findall(log)
    if not regs:
        return None
    return dict(registers=int(regs[-1]),
                spills=sum(int(a) + int(b) for a, b in spills),
                stack=sum(int(s) for s in stack))


_SASS_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def sass_opcodes(sass):
    """The opcodes (with modifiers, e.g. 'LDG.E.128') of a cuobjdump -sass listing, in order."""
    return _SASS_LINE.findall(sass)


def memory_ops(opcodes):
    """Counts of global loads/stores by width and of local-memory instructions."""
    c = dict(ldg128=0, ldg_other=0, stg128=0, stg_other=0, ldl=0, stl=0, ldgsts=0)
    for op in opcodes:
        parts = op.split(".")
        base, mods = parts[0], parts[1:]
        wide = "128" in mods
        if base == "LDG":
            c["ldg128" if wide else "ldg_other"] += 1
        elif base == "LDGSTS":  # cp.async global -> shared: a global load too
            c["ldgsts"] += 1
            c["ldg128" if wide else "ldg_other"] += 1
        elif base == "STG":
            c["stg128" if wide else "stg_other"] += 1
        elif base == "LDL":
            c["ldl"] += 1
        elif base == "STL":
            c["stl"] += 1
    return c


_SASS_ADDR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def loops(sass):
    """(start, end) byte addresses of the backward branches of a SASS listing: each loop's
    body lies between them (the trailing self-branch after EXIT is no loop)."""
    out = []
    for addr, op, operands in _SASS_ADDR.findall(sass):
        if op.split(".")[0] == "BRA":
            target = re.match(r"\s*(?:`\()?\.?L?_?x?_?(0x[0-9a-f]+)", operands)
            if target and int(target.group(1), 16) < int(addr, 16):
                out.append((int(target.group(1), 16), int(addr, 16)))
    return out


def wide_loads_in_loops(sass):
    """LDG.128 instructions inside a loop's body (0 means each is executed once per thread)."""
    spans = loops(sass)
    n = 0
    for addr, op, _ in _SASS_ADDR.findall(sass):
        parts = op.split(".")
        if parts[0] in ("LDG", "LDGSTS") and "128" in parts[1:]:
            a = int(addr, 16)
            n += any(lo <= a <= hi for lo, hi in spans)
    return n


def disassemble(cubin):
    """(SASS listing, cuobjdump -res-usage text) of a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True,
                              text=True, check=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True,
                             text=True, check=True).stdout
    return sass, res


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def parse_res_usage(text):
    m = _RES.search(text)
    if not m:
        raise ValueError(f"cuobjdump -res-usage: no resource line in {text!r}")
    reg, stack, shared, local = map(int, m.groups())
    return dict(reg=reg, stack=stack, shared=shared, local=local)


# the SM's limits (CUDA C programming guide, compute capabilities 8.0 and 9.0): registers,
# threads, resident blocks, shared memory per SM and reserved per block
_SM_LIMITS = {80: dict(regs=65536, threads=2048, blocks=32, smem=167936, reserved=1024),
              90: dict(regs=65536, threads=2048, blocks=32, smem=233472, reserved=1024)}


def programs_per_sm(registers, num_warps, shared_bytes, arch):
    """Programs of one kernel an SM holds at once: the tightest of its limits.

    Registers are allocated per warp in units of 256 (8 per thread)."""
    lim = _SM_LIMITS[arch]
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = lim["regs"] // (per_warp * num_warps)
    by_threads = lim["threads"] // (32 * num_warps)
    by_smem = lim["smem"] // (shared_bytes + lim["reserved"])
    return min(by_regs, by_threads, by_smem, lim["blocks"])


# ----------------------------------------------------------------------------- all together


PATH_SWEEPS = {
    # path: (sweeps reading the logits (the gradient for 'scale'), sweeps writing the gradient)
    "fwd": (1, 0),
    "fused": (2, 1),
    "fused-own": (2, 1),
    "single": (1, 1),
    "bwd": (1, 1),
    "scale": (1, 1),
}


def record_name(rec):
    """File name stem of a record: <path>-<options>-<dtype>-V<V>-sm<arch>."""
    opts = rec["options"].replace("+", "_") if rec["options"] != "-" else "na"
    return f"{rec['path']}-{opts}-{rec['dtype']}-V{rec['V']}-sm{rec['arch']}"


def compile_one(cfg, arch, keep_binary=False):
    """Compile ``cfg`` for sm_<arch> and read its code: a dict of measurements."""
    fn, args, kwargs = capture(cfg)
    kernel, log, signature = compile_launch(fn, args, kwargs, arch)
    stats = parse_ptxas(log)
    if stats is None:
        raise RuntimeError(f"{cfg} sm_{arch}: no ptxas report in the compile's output:\n{log}")
    sass, res = disassemble(kernel.asm["cubin"])
    usage = parse_res_usage(res)
    ops = memory_ops(sass_opcodes(sass))
    out = dict(registers=stats["registers"], spills=stats["spills"], stack=stats["stack"],
               # cuobjdump's SHARED is the static shared memory only; Triton's reductions
               # and broadcasts use dynamic shared memory, which the launch reserves
               local_bytes=usage["local"] + usage["stack"],
               shared_bytes=usage["shared"] + int(getattr(kernel.metadata, "shared", 0) or 0),
               reg_res_usage=usage["reg"], loops=len(loops(sass)),
               ldg128_in_loops=wide_loads_in_loops(sass),
               **ops)
    if keep_binary:
        out["cubin"] = kernel.asm["cubin"]
        out["sass"] = sass
        out["ptx"] = kernel.asm["ptx"]
    return out


def _module_name():
    spec = globals().get("__spec__")
    return spec.name if spec is not None and spec.name != "__main__" else __name__


def _child_env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the JIT must stay a compiler in the children
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default, stated (3.9 warns)
    return env


def _run_workers(jobs, n_workers, keep_dir):
    """Compile ``jobs`` [(Config, arch)] in n_workers subprocesses; results in job order."""
    chunks = [list(range(i, len(jobs), n_workers)) for i in range(n_workers)]
    procs = []
    for idx in chunks:
        if not idx:
            continue
        payload = json.dumps(dict(jobs=[(dataclasses.asdict(jobs[i][0]), jobs[i][1], i)
                                        for i in idx], keep_dir=keep_dir))
        err = tempfile.TemporaryFile(mode="w+")  # a file, so that a chatty child never blocks
        p = subprocess.Popen([sys.executable, "-m", _module_name(), "--worker"], env=_child_env(),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
        p.stdin.write(payload)
        p.stdin.close()
        procs.append((p, err))
    results = [None] * len(jobs)
    for p, err in procs:
        out = p.stdout.read()
        if p.wait() != 0:
            err.seek(0)
            raise RuntimeError(f"compile worker failed (exit {p.returncode}):\n{err.read()[-4000:]}")
        err.close()
        for i, res in json.loads(out):
            results[i] = res
    return results


def _worker_main():
    """Child side of _run_workers: JSON jobs on stdin, JSON [(index, result)] on stdout."""
    req = json.loads(sys.stdin.read())
    out = []
    for cfg, arch, i in req["jobs"]:
        res = compile_one(Config(**cfg), arch, keep_binary=req["keep_dir"] is not None)
        if req["keep_dir"] is not None:
            with open(os.path.join(req["keep_dir"], f"{i}.cubin"), "wb") as f:
                f.write(res.pop("cubin"))
            with open(os.path.join(req["keep_dir"], f"{i}.sass"), "w") as f:
                f.write(res.pop("sass"))
            res.pop("ptx")
        out.append((i, res))
    sys.stdout.write(json.dumps(out))
    return 0


def compile_all(cfgs, archs=ARCHS, jobs=1, dump_dir=None):
    """One record per (configuration, arch), with what its compiled code does.

    Configurations whose launches specialize identically (same kernel, argument
    types, divisibility hints, constexprs and options: e.g. V = 128256 and 256000)
    are compiled once. ``jobs`` worker processes share the compiles (1: in this
    process). dump_dir: each record's cubin and SASS are written there as
    <name>.cubin and <name>.sass. Must run without TRITON_INTERPRET=1.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backends = {arch: make_backend(GPUTarget("cuda", arch, 32)) for arch in archs}
    records, keys, unique = [], [], {}
    for cfg in cfgs:
        fn, args, kwargs = capture(cfg)
        for arch in archs:
            signature, constexprs, attrs, options = specialize(fn, args, kwargs, backends[arch])
            key = repr((fn.__name__, sorted(signature.items()), sorted(constexprs.items()),
                        sorted(attrs.items()), sorted(options.items()), arch))
            unique.setdefault(key, (cfg, arch))
            keys.append(key)
            named = {fn.arg_names[path[0]]: v for path, v in constexprs.items()}
            hinted = [fn.arg_names[path[0]] for path, a in attrs.items()
                      if ["tt.divisibility", 16] in a]
            rec = dict(
                kernel=fn.__name__, path=cfg.kernel, options=cfg.options, arch=arch,
                dtype=cfg.dtype, V=cfg.V, row_stride=cfg.row_stride or cfg.V,
                block=named.get("BLOCK_V", named.get("SEGMENT")),
                num_warps=options.get("num_warps", 4),
                flags={k: bool(v) for k, v in named.items()
                       if k.startswith(("HAS_", "PROB_", "FUSE_"))},
                div16=[n for n in hinted if not n.endswith("_ptr")],
            )
            if "SEGMENT" in named:  # the single-pass kernel: elements per program, programs a row
                rec.update(segment=named["SEGMENT"], K=-(-cfg.V // named["SEGMENT"]))
            # element sizes of the tensors read per column (weight: its own dtype)
            bound = inspect.signature(fn.fn).bind_partial(
                *args, **{k: v for k, v in kwargs.items() if k in fn.arg_names})
            rec["element_bytes"] = {n[:-4]: v.element_size() for n, v in bound.arguments.items()
                                    if n in ("logits_ptr", "target_ptr", "weight_ptr",
                                             "grad_ptr")
                                    and isinstance(v, torch.Tensor)}
            records.append(rec)
    todo = list(unique.items())
    tmp = tempfile.TemporaryDirectory() if dump_dir is not None else None
    try:
        keep_dir = tmp.name if tmp is not None else None
        if jobs > 1 and len(todo) > 1:
            results = _run_workers([job for _, job in todo], min(jobs, len(todo)), keep_dir)
        else:
            results = []
            for i, (_, (cfg, arch)) in enumerate(todo):
                res = compile_one(cfg, arch, keep_binary=keep_dir is not None)
                if keep_dir is not None:
                    with open(os.path.join(keep_dir, f"{i}.cubin"), "wb") as f:
                        f.write(res.pop("cubin"))
                    with open(os.path.join(keep_dir, f"{i}.sass"), "w") as f:
                        f.write(res.pop("sass"))
                    res.pop("ptx")
                results.append(res)
        index = {key: i for i, (key, _) in enumerate(todo)}
        for rec, key in zip(records, keys):
            rec.update(results[index[key]])
            rec["programs_per_sm"] = programs_per_sm(rec["registers"], rec["num_warps"],
                                                     rec["shared_bytes"], rec["arch"])
            rec["name"] = record_name(rec)
            if dump_dir is not None:
                os.makedirs(dump_dir, exist_ok=True)
                for ext in ("cubin", "sass"):
                    shutil.copyfile(os.path.join(keep_dir, f"{index[key]}.{ext}"),
                                    os.path.join(dump_dir, f"{rec['name']}.{ext}"))
    finally:
        if tmp is not None:
            tmp.cleanup()
    return records


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        sys.exit(_worker_main())
    sys.exit("usage: python -m <package>.aot --worker (internal: a compile worker of inspect)")
