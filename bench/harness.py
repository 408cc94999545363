"""One benchmark run: for each case, check against the float64 reference, measure memory, time.

A case is (op, shape, dtype, mode, provider). Per (op, shape, dtype) the inputs are made
once and the float64 reference is computed once; each provider then gets:

1. a correctness run, which also warms it up (and compiles it): output and gradients
   against the reference; beyond the dtype's tolerance the case is 'wrong' and not timed;
2. on CUDA, a peak-memory run: torch.cuda.max_memory_allocated() after
   reset_peak_memory_stats(), minus what was allocated before (the inputs, the reference);
   the outputs and gradients the run returns are part of the peak;
3. the timing (timing.py), GB/s from the op's one byte formula, and its fraction of the
   copy bandwidth measured at the start of the run.

Backward runs through torch.autograd.grad, not .backward(): the gradient is returned and
held until the hook between repetitions drops it, never accumulated into .grad (where
AccumulateGrad would clone an in-place gradient that aliases its leaf, a copy a model
never pays, since its logits are not a leaf).
"""

import gc
import math
import time
from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch

from . import timing
from .check import TOL, max_rel_err
from .op import Env, ProviderUnavailable
from .registry import BASELINE, DTYPE_NAMES


@dataclass
class Plan:
    ops: list                       # Op objects
    shapes: List[Tuple[int, int]]   # (N, V)
    dtypes: list                    # torch dtypes
    modes: List[str]                # 'fwd', 'fwd+bwd'
    providers: List[str]
    env: Env
    warmup_ms: float = 25
    rep_ms: float = 100
    seed: int = 0


class Runner:
    """The timed step: the provider's forward, and for 'fwd+bwd' its backward via autograd.grad.

    The results stay in `held` until BetweenReps drops them.
    """

    def __init__(self, fn, op, inputs, mode):
        self.fn = fn
        self.args = [inputs[k] for k in op.args]
        self.leaves = [inputs[k] for k in op.grad_inputs] if mode == "fwd+bwd" else []
        self.upstream = inputs[op.upstream] if op.upstream is not None else None
        self.held = None

    def __call__(self):
        out = self.fn(*self.args)
        if self.leaves:
            grads = torch.autograd.grad(out, self.leaves, grad_outputs=self.upstream)
            self.held = (out,) + tuple(grads)
        else:
            self.held = (out,)


def _working_inputs(op, master, mode, inplace):
    """Inputs for one provider: views of the master tensors, or clones when it overwrites them."""
    inputs = {}
    for name, t in master.items():
        if name in op.grad_inputs and inplace:
            t = t.clone()
        elif name in op.grad_inputs:
            t = t.detach()
        if name in op.grad_inputs and mode == "fwd+bwd":
            t.requires_grad_(True)
        inputs[name] = t
    return inputs


def _reference(op, master):
    """(output, gradients...) of op.reference on float64 copies, on the inputs' device."""
    inputs64 = {k: (t.detach().to(torch.float64) if t.is_floating_point() else t)
                for k, t in master.items()}
    for k in op.grad_inputs:
        inputs64[k].requires_grad_(True)
    runner = Runner(op.reference, op, inputs64, "fwd+bwd")
    runner()
    return tuple(t.detach() for t in runner.held)


def _one_line(exc):
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def _free(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _measure(op, impl, fn, master, ref, mode, dtype, n, v, plan, copy_gbps):
    """Fill the measured fields of one case whose provider loaded; returns a dict."""
    device = plan.env.device
    inputs = _working_inputs(op, master, mode, impl.inplace)
    runner = Runner(fn, op, inputs, mode)
    restore = [(inputs[k], master[k]) for k in op.grad_inputs] if impl.inplace else []
    between = timing.BetweenReps(runner, restore)

    runner()
    err = max_rel_err(runner.held, ref[:len(runner.held)])
    tol = TOL[dtype]
    out = {"max_rel_err": err, "tol": tol}
    if not err <= tol:
        out.update(status="wrong", reason=f"max relative error {err:.3g} > tolerance {tol:.3g}; "
                                          "not timed")
        return out

    if device == "cuda":
        between()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        runner()
        torch.cuda.synchronize()
        out["peak_extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        ms, p20, p80 = timing.time_cuda(runner, between, plan.warmup_ms, plan.rep_ms)
    else:
        ms, p20, p80 = timing.time_cpu(runner, between, plan.warmup_ms, plan.rep_ms)
    between()
    nbytes = op.bytes_moved(n, v, dtype.itemsize, mode)
    gbps = nbytes / (ms * 1e-3) / 1e9
    out.update(status="ok", ms=ms, ms_p20=p20, ms_p80=p80, bytes=nbytes, gbps=gbps,
               fraction_of_copy_bw=gbps / copy_gbps)
    return out


def _case(op, provider, master, ref, mode, dtype, n, v, plan, copy_gbps):
    rec = {"status": None, "reason": None}
    impl = op.impls[provider]
    try:
        fn = impl.load(plan.env)
    except (ImportError, ProviderUnavailable) as exc:
        reason = str(exc) if isinstance(exc, ProviderUnavailable) else f"not installed ({exc})"
        rec.update(status="skipped", reason=reason)
        return rec
    except Exception as exc:  # a provider that is installed but broken is an error, not a skip
        rec.update(status="error", reason=f"load failed: {_one_line(exc)}")
        return rec
    rec["note"] = getattr(fn, "note", None)
    try:
        rec.update(_measure(op, impl, fn, master, ref, mode, dtype, n, v, plan, copy_gbps))
    except Exception as exc:
        rec.update(status="error", reason=_one_line(exc))
    finally:
        _free(plan.env.device)
    return rec


def _fill_speedups(records):
    base = {}
    for r in records:
        if r["provider"] == BASELINE and r["status"] == "ok":
            base[(r["op"], r["mode"], r["dtype"], r["n"], r["v"])] = r["ms"]
    for r in records:
        ms0 = base.get((r["op"], r["mode"], r["dtype"], r["n"], r["v"]))
        r["speedup_vs_torch"] = ms0 / r["ms"] if (ms0 and r.get("ms")) else None


def _providers(plan, op):
    """The plan's providers that implement op (the others make no case of it)."""
    return [p for p in plan.providers if p in op.impls]


def count_cases(plan):
    return sum(len(plan.shapes) * len(plan.dtypes) * len(plan.modes) * len(_providers(plan, op))
               for op in plan.ops)


def run(plan, header, progress: Callable[[str], None] = print):
    """All cases of the plan; returns the records (dicts), header fields included in each."""
    device = plan.env.device
    progress(f"measuring the {device} copy bandwidth ...")
    copy_gbps = timing.copy_bandwidth_gbps(device, warmup_ms=plan.warmup_ms, rep_ms=plan.rep_ms)
    _free(device)
    progress(f"copy bandwidth: {copy_gbps:.1f} GB/s")

    total, i, records = count_cases(plan), 0, []
    for op in plan.ops:
        for n, v in plan.shapes:
            for dtype in plan.dtypes:
                gen = torch.Generator(device=device).manual_seed(plan.seed)
                master, ref = None, None
                try:
                    master = op.make_inputs(n, v, dtype, device, gen)
                    ref = _reference(op, master)
                    setup_error = None
                except Exception as exc:
                    setup_error = f"inputs or reference failed: {_one_line(exc)}"
                for mode in plan.modes:
                    for provider in _providers(plan, op):
                        i += 1
                        label = (f"[{i}/{total}] {op.name} {mode} {DTYPE_NAMES[dtype]} {n}x{v} "
                                 f"{provider}")
                        start = time.perf_counter()
                        if setup_error:
                            rec = {"status": "error", "reason": setup_error}
                        else:
                            rec = _case(op, provider, master, ref, mode, dtype, n, v, plan,
                                        copy_gbps)
                        rec = _record(header, provider, op.name, mode, dtype, n, v, copy_gbps,
                                      rec)
                        records.append(rec)
                        progress(f"{label}: {_summary(rec)}  "
                                 f"[{time.perf_counter() - start:.1f} s]")
                del master, ref
                _free(device)
    _fill_speedups(records)
    return records


FIELDS = ("provider", "op", "mode", "dtype", "n", "v", "status", "reason", "ms", "ms_p20",
          "ms_p80", "bytes", "gbps", "copy_gbps", "fraction_of_copy_bw", "speedup_vs_torch",
          "peak_extra_mb", "max_rel_err", "tol", "note")


def _record(header, provider, op, mode, dtype, n, v, copy_gbps, measured):
    rec = dict.fromkeys(FIELDS)
    rec.update(provider=provider, op=op, mode=mode, dtype=DTYPE_NAMES[dtype], n=n, v=v,
               copy_gbps=copy_gbps)
    rec.update(measured)
    rec.update(header)
    for k, val in rec.items():  # JSON has no inf/nan: the reason says what happened
        if isinstance(val, float) and not math.isfinite(val):
            rec[k] = None
    return rec


def _summary(rec):
    if rec["status"] == "ok":
        return f"ok  {rec['ms']:.4g} ms  {rec['gbps']:.1f} GB/s  err {rec['max_rel_err']:.2g}"
    return f"{rec['status']}: {rec['reason']}"
