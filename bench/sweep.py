"""Tuning sweep of the fused cross-entropy kernels at the goal shapes, on both fused paths.

    python -m softmax_ce_gpu.bench.sweep [--shapes 8192x128256,...] [--dtype bf16]
                                         [--path both|two-sweep|single] [--out F]

two-sweep path (kernels/cross_entropy.py): (BLOCK_V, num_warps) of the row sweep, the
launchers' choice from kernels/tuning.py replaced by each candidate.
single-pass path (kernels/cross_entropy_single.py): (SEGMENT, num_warps), through
kernels.tuning.use_fused_path; candidates whose K = ceil(V / SEGMENT) exceeds the SM
count are skipped (the kernel's forward-progress condition).

For each shape and candidate the fused loss + gradient (cross_entropy forward and
backward, reduction 'mean', upstream gradient 1) is checked against torch in float64
on the first rows (loss and gradient), then timed with triton.testing.do_bench
(median). Prints a table with GB/s (the budget: read the logits once, write the
gradient once) and the configuration the tuning table picks today; writes JSON
records to --out. A GPU-only tool: the numbers are the input for kernels/tuning.py,
which stays the one place configurations are chosen.
"""

import argparse
import contextlib
import itertools
import json
import sys

import torch
import torch.nn.functional as F

CANDIDATES = tuple(itertools.product((2048, 4096, 8192, 16384), (4, 8, 16, 32)))
# (SEGMENT, num_warps) of the single-pass kernel: 8 to 32 logits a thread
SINGLE_CANDIDATES = ((2048, 4), (4096, 8), (4096, 16), (8192, 16), (8192, 32), (16384, 32),
                     (16384, 16))


def _time(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _errors(sc, x, t, head):
    """(relative error of the loss, of the gradient) on the first rows, against float64."""
    loss, grad = sc.cross_entropy_with_grad(x[head].detach(), t[head])
    x64 = x[head].detach().double().requires_grad_()
    ref = F.cross_entropy(x64, t[head])
    ref.backward()
    ref = float(ref.detach())
    err_loss = abs(float(loss.double()) - ref) / abs(ref)
    err_grad = float((grad.double() - x64.grad).norm() / x64.grad.norm())
    return err_loss, err_grad


def sweep(shapes, dtype, paths=("two-sweep", "single"), device="cuda"):
    import triton

    import softmax_ce_gpu as sc
    from softmax_ce_gpu.kernels import tuning

    # the forward-progress cap of the single-pass kernel (an H200's 132 off a GPU: dry runs)
    sms = (torch.cuda.get_device_properties(device).multi_processor_count
           if torch.device(device).type == "cuda" else 132)
    records = []
    for n, v in shapes:
        x = torch.randn(n, v, device=device, dtype=torch.float32).to(dtype).requires_grad_()
        t = torch.randint(0, v, (n,), device=device)
        head = slice(0, min(n, 64))
        es = x.element_size()
        plans = []
        if "two-sweep" in paths:
            today = tuning.row_config(v, es)
            for block, warps in CANDIDATES:
                if block <= 4 * triton.next_power_of_2(v):
                    plans.append(("two-sweep", block, warps, (block, warps) == tuple(today)))
        if "single" in paths:
            today = tuning.single_config(v, es)
            for segment, warps in SINGLE_CANDIDATES:
                if -(-v // segment) <= sms and segment >= 32 * warps:
                    plans.append(("single", segment, warps, (segment, warps) == tuple(today)))
        for path, block, warps, is_today in plans:
            ctx = contextlib.ExitStack()
            if path == "two-sweep":
                ctx.enter_context(tuning.use_fused_path("two-sweep"))
                ctx.enter_context(tuning.use_row_config(block, warps))
            else:
                ctx.enter_context(tuning.use_fused_path("single", segment=block,
                                                        num_warps=warps))
            try:
                with ctx:
                    err_loss, err_grad = _errors(sc, x, t, head)
                    ms = _time(lambda: torch.autograd.grad(sc.cross_entropy(x, t), x))
                status = "ok" if err_loss < 3e-2 and err_grad < 3e-2 else "wrong"
            except Exception as exc:  # a configuration that fails to compile or run
                ms, err_loss, err_grad = None, None, None
                status = f"error: {str(exc).splitlines()[0][:80]}"
            gbps = 2 * n * v * es / (ms * 1e-3) / 1e9 if ms else None
            records.append(dict(n=n, v=v, dtype=str(dtype).replace("torch.", ""), path=path,
                                block=block, num_warps=warps, ms=ms, gbps=gbps,
                                rel_err=err_loss, rel_err_grad=err_grad, status=status,
                                tuning_today=is_today))
            name = "BLOCK" if path == "two-sweep" else "SEGMENT"
            print(f"{n}x{v} {path:9} {name} {block:6d} warps {warps:3d}: "
                  + (f"{ms:8.3f} ms {gbps:7.1f} GB/s" if ms else status)
                  + ("   <- tuning table today" if is_today else ""), flush=True)
        del x, t
        torch.cuda.empty_cache()
    return records


def main(argv=None):
    p = argparse.ArgumentParser(prog="softmax_ce_gpu.bench.sweep", description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="8192x128256,4096x256000,32768x32000")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--path", default="both", choices=("both", "two-sweep", "single"))
    p.add_argument("--out", default=None, help="JSON file for the records")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("softmax_ce_gpu.bench.sweep: needs a CUDA device", file=sys.stderr)
        return 2
    shapes = [tuple(int(a) for a in s.lower().split("x")) for s in args.shapes.split(",")]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    paths = ("two-sweep", "single") if args.path == "both" else (args.path,)
    records = sweep(shapes, dtype, paths)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "records": records}, f, indent=1)
    best = {}
    for r in records:
        key = (r["n"], r["v"], r["path"])
        if r["ms"] and r["status"] == "ok" and (key not in best or r["ms"] < best[key]["ms"]):
            best[key] = r
    for (n, v, path), r in best.items():
        name = "BLOCK" if path == "two-sweep" else "SEGMENT"
        print(f"best {n}x{v} {path}: {name} {r['block']} warps {r['num_warps']} "
              f"{r['ms']:.3f} ms {r['gbps']:.1f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
