"""GPU-session checks that are not pytest: host syncs, a sanitizer target, the GEMM rate.

    python -m softmax_ce_gpu.bench.gpu_checks sync            every entry point, forward and
                                                              backward, under
                                                              torch.cuda.set_sync_debug_mode("error")
    python -m softmax_ce_gpu.bench.gpu_checks single N V      one fused forward on the
                                                              single-pass path (a target for
                                                              compute-sanitizer racecheck/memcheck)
    python -m softmax_ce_gpu.bench.gpu_checks gemm            bf16 GEMM rate at the linear
                                                              benchmark's shape (TFLOP/s)

bench/gpu_session.sh runs them. Without a CUDA device each says so and exits 0 (DRYRUN=1
runs the script's steps on CPU): none of them means anything there.
"""

import argparse
import sys
import traceback


def entry_points(torch, sc, device, N=64, V=32000, H=256):
    """(name, call) for every public entry point, forward and backward, at small shapes."""
    g = torch.Generator(device=device).manual_seed(0)

    def logits(dtype=torch.bfloat16):
        return torch.randn(N, V, generator=g, device=device).to(dtype).requires_grad_()

    t = torch.randint(0, V, (N,), generator=g, device=device)
    t[::7] = -100
    w = torch.rand(V, generator=g, device=device) + 0.5
    probs = torch.rand(N, V, generator=g, device=device).softmax(1)

    def bwd(loss):
        loss.float().sum().backward()

    cases = []
    for reduction in ("mean", "sum", "none"):
        cases.append((f"cross_entropy {reduction}",
                      lambda r=reduction: bwd(sc.cross_entropy(logits(), t, reduction=r))))
    cases += [
        ("cross_entropy options", lambda: bwd(sc.cross_entropy(
            logits(), t, w, label_smoothing=0.1, z_loss=1e-4, softcap=30.0))),
        ("cross_entropy fp16 (late path)", lambda: bwd(sc.cross_entropy(logits(torch.float16), t))),
        ("cross_entropy probabilities + target grad", lambda: bwd(sc.cross_entropy(
            logits(), probs.clone().requires_grad_()))),
        ("cross_entropy inplace_backward", lambda: bwd(sc.cross_entropy(
            logits() * 1.0, t, inplace_backward=True))),
        ("cross_entropy return_stats", lambda: bwd(sc.cross_entropy(
            logits(), t, return_stats=True)[0])),
        ("CrossEntropyLoss", lambda: bwd(sc.CrossEntropyLoss(label_smoothing=0.1)(logits(), t))),
        ("cross_entropy_with_grad", lambda: sc.cross_entropy_with_grad(logits().detach(), t)),
        ("softmax", lambda: bwd(sc.softmax(logits(), dim=-1))),
        ("log_softmax", lambda: bwd(sc.log_softmax(logits(), dim=-1))),
    ]

    def lce(**kw):
        x = torch.randn(N, H, generator=g, device=device).to(torch.bfloat16).requires_grad_()
        lw = (torch.randn(V, H, generator=g, device=device) * H ** -0.5).to(
            torch.bfloat16).requires_grad_()
        return sc.linear_cross_entropy(x, lw, t, chunk_size=max(1, N // 2), **kw)

    cases += [
        ("linear_cross_entropy mean", lambda: bwd(lce())),
        ("linear_cross_entropy none", lambda: bwd(lce(reduction="none"))),
        ("linear_cross_entropy return_stats", lambda: bwd(lce(return_stats=True)[0])),
    ]
    return cases


def sync_check():
    import torch

    import softmax_ce_gpu as sc

    if not torch.cuda.is_available():
        print("gpu_checks sync: no CUDA device; skipped (set_sync_debug_mode is CUDA's)")
        return 0
    failed = 0
    cases = entry_points(torch, sc, "cuda")
    for name, call in cases:
        call()  # warm-up outside the mode: compiles, caches (a first call may query the device)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            call()
            status = "ok: no host synchronisation"
        except Exception as exc:  # noqa: BLE001  (the report is the point)
            failed += 1
            status = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            traceback.print_exc(limit=6)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        print(f"{name:45s} {status}", flush=True)
    print(f"gpu_checks sync: {len(cases) - failed} of {len(cases)} entry points without a host sync")
    return 1 if failed else 0


def single(n, v):
    import torch

    import softmax_ce_gpu as sc
    from softmax_ce_gpu.kernels import tuning

    if not torch.cuda.is_available():
        print("gpu_checks single: no CUDA device; skipped")
        return 0
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, v, generator=g, device="cuda").to(torch.bfloat16)
    t = torch.randint(0, v, (n,), generator=g, device="cuda")
    with tuning.use_fused_path("single"):
        loss, grad = sc.cross_entropy_with_grad(x, t)
    ref = torch.nn.functional.cross_entropy(x.double(), t)
    torch.cuda.synchronize()
    err = abs(float(loss.double()) - float(ref)) / abs(float(ref))
    print(f"gpu_checks single {n}x{v}: loss rel err {err:.2e}")
    return 0 if err < 1e-2 else 1


def gemm(n=8192, h=4096, v=128256):
    import torch
    import triton

    if not torch.cuda.is_available():
        print("gpu_checks gemm: no CUDA device; skipped")
        return 0
    a = torch.randn(n, h, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(v, h, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b.t(), warmup=25, rep=100)
    tflops = 2 * n * h * v / (ms * 1e-3) / 1e12
    print(f"gpu_checks gemm: bf16 ({n} x {h}) @ ({h} x {v}): {ms:.3f} ms, {tflops:.1f} TFLOP/s")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="softmax_ce_gpu.bench.gpu_checks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("sync")
    s = sub.add_parser("single")
    s.add_argument("n", type=int)
    s.add_argument("v", type=int)
    sub.add_parser("gemm")
    args = p.parse_args(argv)
    if args.what == "sync":
        return sync_check()
    if args.what == "single":
        return single(args.n, args.v)
    return gemm()


if __name__ == "__main__":
    sys.exit(main())
