"""``softmax-ce-bench overhead``: host time per call of each entry point, launches stubbed.

What it measures. Every call of the library runs host code (checks, dispatch, the
reduction's tensor ops, the launchers' Python) and device work (Triton kernels and torch
ops). On a GPU the host code is what a small shape (a classifier, a short sequence, an
RL micro-batch) pays per step. Here, without a GPU:

- Time is this thread's CPU time per call (median of 9 rounds, ours and torch's
  alternating), so other load on the machine inflates neither side of the ratio; the
  ratio is the median of the rounds' ratios.
- The library runs its kernel path on tiny CPU tensors (Triton's interpreter mode picks
  it), with every @triton.jit kernel replaced by a stub that records the launch and runs
  nothing: the time is the host code alone, launchers included.
- torch eager runs the same call (F.cross_entropy with the same options; z-loss and
  softcap written with torch operations, as a user would) on the same tiny CPU tensors,
  in the same process: its time includes its (tiny) arithmetic, so the ratio
  ``ours_us / torch_us`` is conservative.
- ``launches``: the device launches the call would make on CUDA: the stubbed Triton
  launches plus the aten operations that launch a kernel (views, empty allocations and
  custom-op wrappers do not), counted by a dispatch mode in a separate run.

These are host-time ratios on this machine, not GPU timings. ``--json FILE`` writes one
record per case (entry, mode, reduction, options, ours_us, torch_us, ratio, launches).
"""

import argparse
import contextlib
import ctypes
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time

_FORMAT = "softmax-ce-bench overhead/1"
N, V, H = 4, 16, 8  # tiny: the arithmetic is negligible, the host code is all that is left


def _module():
    return f"{__spec__.name}" if __spec__ else "bench.overhead"


# ----------------------------------------------------------------------------- stubs


class _Stub:
    """Stands in for a @triton.jit kernel: ``k[grid](*args, **kw)`` counts and returns.

    effect(args, kwargs), when given, writes what the host reads back from that kernel on
    CPU (the class-id check's flag): an extra host-side write, so the measured time only
    grows.
    """

    def __init__(self, counter, effect=None):
        self.counter = counter
        self.effect = effect
        self.launch = self._launch  # bound once: k[grid] makes no new object

    def __getitem__(self, grid):
        return self.launch

    def _launch(self, *args, **kwargs):
        self.counter[0] += 1
        if self.effect is not None:
            self.effect(args, kwargs)


_SCALE_ARRAY = ctypes.c_float * 3
_ONES = (1.0, 1.0, 1.0)


def _write_ids_ok(out):
    # the reduction's scale: a grad_scale and denominator of 1, ids ok, which the host reads
    # on CPU. Written into the tensor's memory through ctypes (no aten op: no launch under
    # the launch counter), the cheapest write there is (cheaper than a numpy view or
    # ctypes.memmove), so that the stub adds as little host time as it can to what it stands
    # in for, the device's work.
    # (A meta tensor, tests/test_host_sync.py, holds nothing to write or read.)
    if out.is_cpu:
        if out.nbytes != 12:  # (3,) fp32, fresh: contiguous
            raise AssertionError(f"overhead stub: unexpected scale tensor {out.shape} {out.dtype}")
        _SCALE_ARRAY.from_address(out.data_ptr())[:] = _ONES


def _ids_ok(names):
    def effect(args, kwargs):
        _write_ids_ok(args[2])  # _loss_scale_kernel's scale_ptr
    return effect


def _own_scale_ids_ok(names):
    at, scale_at = names.index("OWN_SCALE"), names.index("grad_scale_ptr")

    def effect(args, kwargs):
        if args[at] if len(args) > at else kwargs.get("OWN_SCALE"):  # the loss launch makes
            _write_ids_ok(args[scale_at])                            # the scale (few rows)
    return effect


# kernel name -> the effect of its stub, made from the kernel's parameter names
_EFFECTS = {"_loss_scale_kernel": _ids_ok, "_cross_entropy_fwd_kernel": _own_scale_ids_ok}


@contextlib.contextmanager
def stubbed_kernels(counter):
    """Every @triton.jit kernel of softmax_ce_gpu.kernels replaced by a _Stub."""
    import importlib
    import pkgutil

    import softmax_ce_gpu.kernels as pkg

    saved = []
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, value in list(vars(mod).items()):
            if type(value).__name__ in ("JITFunction", "InterpretedFunction") and \
                    name.endswith("_kernel"):
                saved.append((mod, name, value))
                make = _EFFECTS.get(name)
                names = list(inspect.signature(value.fn).parameters)
                setattr(mod, name, _Stub(counter, make and make(names)))
    try:
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


def _launch_counter():
    """A TorchDispatchMode counting the aten ops that launch a device kernel."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from softmax_ce_gpu import _ops

    # the library's custom ops, opened up: what their implementations launch is counted
    impls = {op._opoverload: impl for op, (impl, _) in _ops._EAGER.items()}
    free = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh",
            "detach", "alias", "_local_scalar_dense", "set_", "resize_", "is_nonzero",
            "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "_to_copy_meta"}

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            impl = impls.get(func)
            if impl is not None:
                with self:
                    return impl(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            out = func(*args, **(kwargs or {}))
            # aten.to's schema may alias its input (so it reads as a view), but where it
            # returns new memory (a dtype change, copy=True) it is a copy kernel on CUDA
            copied = (name == "to" and isinstance(out, torch.Tensor)
                      and out.data_ptr() != args[0].data_ptr())
            if copied or not (func.is_view or name in free or func.namespace == "softmax_ce_gpu"):
                self.ops.append("_to_copy" if copied else name)
            return out

    return Count()


# ----------------------------------------------------------------------------- cases


def _cases():
    """(entry, mode, reduction, options, ours(), theirs()) for every measured call."""
    import torch
    import torch.nn.functional as F

    import softmax_ce_gpu as sc

    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, V, generator=g)
    t = torch.randint(0, V, (N,), generator=g)
    w = torch.rand(V, generator=g) + 0.1
    hid = torch.randn(N, H, generator=g)
    lw = torch.randn(V, H, generator=g)
    heavy = dict(weight=w, label_smoothing=0.1, z_loss=1e-4, softcap=30.0)

    def torch_ce(a, reduction, opts):
        opts = dict(opts)
        z_loss, cap = opts.pop("z_loss", 0.0), opts.pop("softcap", None)
        z = a if cap is None else cap * torch.tanh(a / cap)
        loss = F.cross_entropy(z, t, reduction=reduction if not z_loss else "none", **opts)
        if z_loss:
            loss = loss + z_loss * torch.logsumexp(z, dim=1) ** 2
            loss = loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss
        return loss

    def run(fn, bwd):
        def call():
            a = x.requires_grad_(bwd)
            out = fn(a)
            if bwd:
                out.sum().backward()
                a.grad = None
            return out
        return call

    cases = []
    for mode in ("fwd", "fwd+bwd"):
        bwd = mode == "fwd+bwd"
        for reduction in ("mean", "sum", "none"):
            for label, opts in (("plain", {}), ("weight+ls+z+softcap", heavy)):
                cases.append(("cross_entropy", mode, reduction, label,
                              run(lambda a, r=reduction, o=opts: sc.cross_entropy(
                                  a, t, reduction=r, **o), bwd),
                              run(lambda a, r=reduction, o=opts: torch_ce(a, r, o), bwd)))
        for op in ("softmax", "log_softmax"):
            cases.append((op, mode, "-", "plain",
                          run(lambda a, f=getattr(sc, op): f(a, dim=-1), bwd),
                          run(lambda a, f=getattr(torch, op): f(a, dim=-1), bwd)))

        def lce(a, f):
            return f(hid.requires_grad_(bwd), lw.requires_grad_(bwd), t)

        def run_lce(f):
            def call():
                out = f(hid.requires_grad_(bwd), lw.requires_grad_(bwd), t)
                if bwd:
                    out.backward()
                    hid.grad = lw.grad = None
                return out
            return call

        theirs = getattr(F, "linear_cross_entropy", None) or (
            lambda h_, w_, t_: F.cross_entropy(F.linear(h_, w_), t_))
        cases.append(("linear_cross_entropy", mode, "mean", "plain",
                      run_lce(sc.linear_cross_entropy), run_lce(theirs)))
    return cases


@contextlib.contextmanager
def _restored_threads(threads):
    try:
        yield
    finally:
        import torch

        torch.set_num_threads(threads)


def _time_pair_us(ours, theirs, repeat, rounds=9):
    """(ours_us, torch_us): the median over ``rounds`` of the mean CPU time of one call of
    each.

    CPU time of this thread (time.thread_time), not wall time: host overhead is CPU work,
    and a busy machine's other processes then inflate neither side of the ratio. The two
    calls alternate round by round, so that a drift of the machine's speed (a shared
    machine's frequency, its caches) reaches both sides of each ratio alike.
    """
    for call in (ours, theirs):
        for _ in range(max(20, repeat // 10)):
            call()
    times = ([], [])
    for _ in range(rounds):
        for side, call in zip(times, (ours, theirs)):
            t0 = time.thread_time()
            for _ in range(repeat):
                call()
            side.append((time.thread_time() - t0) / repeat * 1e6)
    return statistics.median(times[0]), statistics.median(times[1])


def measure(repeat=200):
    """One record per case (see the module docstring). Needs the kernels' interpreter mode."""
    import torch

    from softmax_ce_gpu import kernels

    if not kernels.INTERPRETER and not torch.cuda.is_available():
        raise RuntimeError("overhead: run with TRITON_INTERPRET=1 (the CLI does it for you)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add noise
    counter = [0]
    records = []
    with stubbed_kernels(counter), _restored_threads(threads):
        for entry, mode, reduction, options, ours, theirs in _cases():
            counter[0] = 0
            with _launch_counter() as mode_count:
                ours()
            triton_launches = counter[0]
            launches = triton_launches + len(mode_count.ops)
            ours_us, torch_us = _time_pair_us(ours, theirs, repeat)
            records.append(dict(entry=entry, mode=mode, reduction=reduction, options=options,
                                ours_us=round(ours_us, 1), torch_us=round(torch_us, 1),
                                ratio=round(ours_us / torch_us, 2), launches=launches,
                                triton_launches=triton_launches, torch_ops=sorted(set(mode_count.ops))))
    return records


def _table(records):
    head = f"{'entry':22} {'mode':8} {'reduction':9} {'options':20} {'ours us':>8} " \
           f"{'torch us':>8} {'ratio':>6} {'launches':>8}"
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(f"{r['entry']:22} {r['mode']:8} {r['reduction']:9} {r['options']:20} "
                     f"{r['ours_us']:8.1f} {r['torch_us']:8.1f} {r['ratio']:6.2f} "
                     f"{r['launches']:8d}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="softmax-ce-bench overhead",
        description="Host time per call of each entry point with the kernel launches stubbed, "
                    "next to torch eager's time for the same call on a tiny CPU tensor. "
                    "Host-time ratios on this machine, not GPU timings.")
    p.add_argument("--json", default=None, help="write the records to this file")
    p.add_argument("--repeat", type=int, default=200, help="calls per timing run (default 200)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("argument --repeat: must be >= 1")
    kernels = sys.modules.get("softmax_ce_gpu.kernels")
    interpreting = kernels.INTERPRETER if kernels else os.environ.get("TRITON_INTERPRET") == "1"
    if not args.child and not interpreting:  # the kernel path on CPU needs the interpreter
        # mode, which is decided when the kernels are imported: a fresh process
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, "-m", _module(), "--child", "--repeat", str(args.repeat)]
        if args.json:
            cmd += ["--json", args.json]
        return subprocess.run(cmd, env=env).returncode
    import torch
    import triton

    records = measure(args.repeat)
    print("softmax-ce-bench overhead: host time per call, kernel launches stubbed, tiny CPU "
          f"tensors (N={N}, V={V}); torch eager runs the same call. Host-time ratios on "
          f"{platform.processor() or platform.machine()}, not GPU timings.")
    print(_table(records))
    if args.json:
        doc = dict(format=_FORMAT, torch=torch.__version__, triton=triton.__version__,
                   python=platform.python_version(), machine=platform.machine(),
                   shape=dict(N=N, V=V, H=H), records=records)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
