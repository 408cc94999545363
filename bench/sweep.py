"""Tuning sweep of the fused cross-entropy kernel: (BLOCK_V, num_warps) at the goal shapes.

    python -m softmax_ce_gpu.bench.sweep [--shapes 8192x128256,...] [--dtype bf16] [--out F]

For each shape and each candidate configuration, the launchers' choice from
kernels/tuning.py is replaced by the candidate, the fused loss + gradient
(cross_entropy forward and backward, reduction 'mean', upstream gradient 1) is
checked against torch in float64 on the first rows, then timed with
triton.testing.do_bench (median). Prints a table with GB/s (the budget: read the
logits once, write the gradient once) and the configuration the tuning table
picks today; writes JSON records to --out. A GPU-only tool: the numbers are the
input for kernels/tuning.py, which stays the one place configurations are chosen.
"""

import argparse
import itertools
import json
import sys

import torch
import torch.nn.functional as F

CANDIDATES = tuple(itertools.product((2048, 4096, 8192, 16384), (4, 8, 16, 32)))


def _time(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def sweep(shapes, dtype, candidates=CANDIDATES, device="cuda"):
    import softmax_ce_gpu as sc
    from softmax_ce_gpu.kernels import cross_entropy as ce_kernels, tuning

    chosen = tuning.row_config
    records = []
    for n, v in shapes:
        x = torch.randn(n, v, device=device, dtype=torch.float32).to(dtype).requires_grad_()
        t = torch.randint(0, v, (n,), device=device)
        head = slice(0, min(n, 64))
        ref = F.cross_entropy(x[head].detach().double(), t[head])
        today = chosen(v, x.element_size())
        for block, warps in candidates:
            if block > 4 * triton_next_pow2(v):
                continue
            def fixed(V, es, heavy=False, stats=False, b=block, w=warps):
                return b, w

            ce_kernels.row_config = fixed
            try:
                loss, grad = sc.cross_entropy_with_grad(x[head].detach(), t[head])
                err = abs(float(loss.double()) - float(ref)) / abs(float(ref))
                ms = _time(lambda: torch.autograd.grad(sc.cross_entropy(x, t), x))
                status = "ok" if err < 3e-2 else "wrong"
            except Exception as exc:  # a configuration that fails to compile or run
                ms, err, status = None, None, f"error: {str(exc).splitlines()[0][:80]}"
            finally:
                ce_kernels.row_config = chosen
            gbps = 2 * n * v * x.element_size() / (ms * 1e-3) / 1e9 if ms else None
            records.append(dict(n=n, v=v, dtype=str(dtype).replace("torch.", ""), block=block,
                                num_warps=warps, ms=ms, gbps=gbps, rel_err=err, status=status,
                                tuning_today=(block, warps) == tuple(today)))
            print(f"{n}x{v} BLOCK {block:6d} warps {warps:3d}: "
                  + (f"{ms:8.3f} ms {gbps:7.1f} GB/s" if ms else status)
                  + ("   <- tuning table today" if records[-1]["tuning_today"] else ""),
                  flush=True)
        del x, t
        torch.cuda.empty_cache()
    return records


def triton_next_pow2(v):
    import triton

    return triton.next_power_of_2(v)


def main(argv=None):
    p = argparse.ArgumentParser(prog="softmax_ce_gpu.bench.sweep", description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="8192x128256,4096x256000,32768x32000")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--out", default=None, help="JSON file for the records")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("softmax_ce_gpu.bench.sweep: needs a CUDA device", file=sys.stderr)
        return 2
    shapes = [tuple(int(a) for a in s.lower().split("x")) for s in args.shapes.split(",")]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    records = sweep(shapes, dtype)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "records": records}, f, indent=1)
    best = {}
    for r in records:
        key = (r["n"], r["v"])
        if r["ms"] and (key not in best or r["ms"] < best[key]["ms"]):
            best[key] = r
    for (n, v), r in best.items():
        print(f"best {n}x{v}: BLOCK {r['block']} warps {r['num_warps']} {r['ms']:.3f} ms "
              f"{r['gbps']:.1f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
