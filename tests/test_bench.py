"""The benchmark harness and CLI on CPU: records, plot, argument errors, skipped/wrong/error cases.

Speed is never asserted here; these tests check that the harness measures honestly:
a provider that is missing is skipped, a wrong one is marked and not timed.
"""

import inspect
import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from softmax_ce_gpu.bench import cli, timing
from softmax_ce_gpu.bench.check import rel_err
from softmax_ce_gpu.bench.op import Impl, ProviderUnavailable
from softmax_ce_gpu.bench.plot import plot
from softmax_ce_gpu.bench.registry import OPS

REQUIRED_KEYS = {"provider", "op", "mode", "dtype", "n", "v", "ms", "ms_p20", "ms_p80", "gbps",
                 "copy_gbps", "fraction_of_copy_bw", "speedup_vs_torch", "peak_extra_mb",
                 "max_rel_err", "device", "torch", "triton", "git", "date", "status", "reason"}

FAST = ["--device", "cpu", "--shapes", "8x64", "--dtypes", "fp32", "--warmup", "1", "--rep", "5",
        "--ops", "cross_entropy"]


def _have_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _run(tmp_path, *extra):
    rc = cli.main(FAST + ["--out", str(tmp_path)] + list(extra))
    records = json.loads((tmp_path / "results.json").read_text())
    return rc, {(r["provider"], r["mode"]): r for r in records}


@pytest.fixture
def add_provider(monkeypatch):
    """Register a provider for cross_entropy for the duration of one test."""
    def add(name, impl):
        monkeypatch.setitem(OPS["cross_entropy"].impls, name, impl)
    return add


def test_cpu_run_writes_records_and_plot(tmp_path, capsys):
    rc, recs = _run(tmp_path, "--providers", "softmax_ce_gpu,torch")
    assert rc == 0
    assert len(recs) == 4  # 2 providers x 2 modes
    for (provider, mode), r in recs.items():
        assert REQUIRED_KEYS <= r.keys(), REQUIRED_KEYS - r.keys()
        assert r["status"] == "ok", r["reason"]
        assert (r["op"], r["dtype"], r["n"], r["v"], r["device"]) == ("cross_entropy", "fp32", 8,
                                                                       64, "cpu")
        assert 0 < r["ms_p20"] <= r["ms"] <= r["ms_p80"]
        assert r["bytes"] == (1 if mode == "fwd" else 2) * 8 * 64 * 4
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["ms"] * 1e-3) / 1e9)
        assert r["fraction_of_copy_bw"] == pytest.approx(r["gbps"] / r["copy_gbps"])
        assert r["max_rel_err"] <= r["tol"]
        assert r["peak_extra_mb"] is None  # measured on CUDA only
    assert recs[("torch", "fwd")]["speedup_vs_torch"] == pytest.approx(1.0)
    out = capsys.readouterr()
    assert "CPU timings, not GPU timings" in out.out
    assert "[4/4]" in out.err  # progress
    if _have_matplotlib():
        assert (tmp_path / "bandwidth.png").stat().st_size > 0
    else:
        assert "matplotlib is not installed" in out.err


def test_inplace_gradient_provider_is_checked_and_timed(tmp_path):
    rc, recs = _run(tmp_path, "--providers", "softmax_ce_gpu_inplace", "--modes", "fwd+bwd",
                    "--no-plot")
    r = recs[("softmax_ce_gpu_inplace", "fwd+bwd")]
    assert rc == 0 and r["status"] == "ok" and r["max_rel_err"] <= r["tol"], r["reason"]


def _records_file(tmp_path):
    rec = dict.fromkeys(REQUIRED_KEYS)
    rows = []
    for provider, v, gbps in [("a", 1000, 3.0), ("a", 4096, 5.0), ("b", 4096, 2.0)]:
        rows.append(dict(rec, provider=provider, op="cross_entropy", mode="fwd", dtype="fp32",
                         n=8, v=v, gbps=gbps, copy_gbps=10.0, status="ok", device="cpu"))
    rows.append(dict(rec, provider="c", op="cross_entropy", mode="fwd", dtype="fp32", n=8,
                     v=4096, copy_gbps=10.0, status="skipped", device="cpu"))
    path = tmp_path / "some.json"
    path.write_text(json.dumps(rows))
    return path


def test_plot_from_json_alone(tmp_path):
    pytest.importorskip("matplotlib")
    png = plot(_records_file(tmp_path), tmp_path / "p.png")
    assert png is not None and png.stat().st_size > 0


def test_plot_without_matplotlib_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert plot(_records_file(tmp_path), tmp_path / "p.png") is None
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("args, option", [
    (["--shapes", "8192by128256"], "--shapes"),
    (["--shapes", "0x64"], "--shapes"),
    (["--providers", "no_such_provider"], "--providers"),
    (["--dtypes", "fp8"], "--dtypes"),
    (["--modes", "bwd"], "--modes"),
    (["--ops", "no_such_op"], "--ops"),
])
def test_bad_arguments_exit_2_naming_the_argument(tmp_path, capsys, args, option):
    assert cli.main(["--device", "cpu", "--out", str(tmp_path)] + args) == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err
    assert not (tmp_path / "results.json").exists()


def _load_missing(env):
    import softmax_ce_gpu_no_such_module  # noqa: F401


def _load_cuda_only(env):
    raise ProviderUnavailable("needs a CUDA device")


def test_missing_provider_is_skipped(tmp_path, add_provider):
    add_provider("ghost", Impl(_load_missing))
    add_provider("cuda_only", Impl(_load_cuda_only))
    rc, recs = _run(tmp_path, "--providers", "torch,ghost,cuda_only", "--modes", "fwd")
    assert rc == 0
    ghost, cuda_only = recs[("ghost", "fwd")], recs[("cuda_only", "fwd")]
    assert ghost["status"] == "skipped"
    assert "not installed" in ghost["reason"] and "softmax_ce_gpu_no_such_module" in ghost["reason"]
    assert cuda_only["status"] == "skipped" and cuda_only["reason"] == "needs a CUDA device"
    assert ghost["ms"] is None and ghost["gbps"] is None


def test_cpu_torch_compile_is_off_by_default_and_time_boxed(tmp_path):
    _, recs = _run(tmp_path, "--providers", "torch_compile", "--modes", "fwd")
    r = recs[("torch_compile", "fwd")]
    assert r["status"] == "skipped" and "--compile-timeout" in r["reason"]
    # a box too small for any compile: the probe process is killed and the case skipped
    _, recs = _run(tmp_path, "--providers", "torch_compile", "--modes", "fwd",
                   "--compile-timeout", "0.3")
    r = recs[("torch_compile", "fwd")]
    assert r["status"] == "skipped" and "did not finish" in r["reason"]


def _load_wrong_gradient(env):
    def run(logits, target):
        # the right loss value (the added term is 0) with every gradient entry off by 0.1
        return F.cross_entropy(logits, target) + 0.1 * (logits - logits.detach()).sum()
    return run


def _load_broken(env):
    def run(logits, target):
        raise RuntimeError("kernel exploded")
    return run


def test_wrong_provider_is_marked_and_not_timed(tmp_path, add_provider):
    add_provider("wrong_grad", Impl(_load_wrong_gradient))
    add_provider("broken", Impl(_load_broken))
    rc, recs = _run(tmp_path, "--providers", "torch,wrong_grad,broken")
    assert rc == 0  # third-party failures do not fail the run; ours would (exit 1)
    assert recs[("wrong_grad", "fwd")]["status"] == "ok"  # its loss is right
    wrong = recs[("wrong_grad", "fwd+bwd")]
    assert wrong["status"] == "wrong"
    assert wrong["max_rel_err"] > wrong["tol"]
    assert wrong["ms"] is None and wrong["gbps"] is None and wrong["speedup_vs_torch"] is None
    broken = recs[("broken", "fwd")]
    assert broken["status"] == "error" and "kernel exploded" in broken["reason"]


def test_our_wrong_result_fails_the_run(tmp_path, add_provider):
    add_provider("softmax_ce_gpu_broken", Impl(_load_wrong_gradient))
    rc, recs = _run(tmp_path, "--providers", "softmax_ce_gpu_broken", "--modes", "fwd+bwd")
    assert rc == 1 and recs[("softmax_ce_gpu_broken", "fwd+bwd")]["status"] == "wrong"


def _load_destructive(env):
    def run(logits, target):
        # every call must see the pristine logits: the harness restores them between calls
        if not bool((logits.abs() > 0.5).any()):
            raise RuntimeError("input was not restored")
        loss = F.cross_entropy(logits, target)
        with torch.no_grad():
            logits.zero_()
        return loss
    return run


def test_inplace_provider_input_is_restored_between_repetitions(tmp_path, add_provider):
    add_provider("destructive", Impl(_load_destructive, inplace=True))
    rc, recs = _run(tmp_path, "--providers", "destructive", "--modes", "fwd")
    r = recs[("destructive", "fwd")]
    assert r["status"] == "ok", r["reason"]


def test_gpu_timer_clears_and_restores_through_grad_to_none(monkeypatch):
    """do_bench sets obj.grad = None for obj in grad_to_none before each timed repetition."""
    import triton.testing

    def fake_do_bench(fn, warmup, rep, grad_to_none, quantiles):
        for _ in range(3):
            for obj in grad_to_none:
                obj.grad = None
            fn()
        return [1.0, 0.9, 1.1]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    pristine = torch.randn(4, 8)
    x = pristine.clone()
    runner = types.SimpleNamespace(held="stale")
    seen = []

    def step():
        seen.append((torch.equal(x, pristine), runner.held))
        x.zero_()
        runner.held = "result"

    assert timing.time_cuda(step, timing.BetweenReps(runner, [(x, pristine)])) == (1.0, 0.9, 1.1)
    assert seen == [(True, None)] * 3


def test_rel_err_in_chunks():
    e = torch.randn(1000, dtype=torch.float64)
    a = e + 1e-3 * torch.randn(1000, dtype=torch.float64)
    assert rel_err(a, e, chunk=77) == pytest.approx(float((a - e).norm() / e.norm()))
    a[5] = float("nan")
    assert rel_err(a, e, chunk=77) == float("inf")


def test_inspect_is_dispatched_lazily(monkeypatch):
    seen = []
    fake = types.ModuleType("softmax_ce_gpu.bench.inspect")
    fake.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "softmax_ce_gpu.bench.inspect", fake)
    assert cli.main(["inspect", "--bytes", "x"]) == 7
    assert seen == [["--bytes", "x"]]


def test_inspect_missing_module_exits_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "softmax_ce_gpu.bench.inspect", None)
    assert cli.main(["inspect"]) == 2
    assert "inspect" in capsys.readouterr().err


def test_default_output_is_bench_results_of_the_device():
    out = cli._default_out("NVIDIA H200")
    assert out.parts[-3:] == ("bench", "results", "NVIDIA_H200")


def test_other_ops_are_checked_and_timed(tmp_path):
    """softmax, log_softmax and linear_cross_entropy run through the same harness."""
    rc = cli.main(FAST[:-2] + ["--ops", "softmax,log_softmax,linear_cross_entropy",
                               "--providers", "softmax_ce_gpu,torch", "--out", str(tmp_path)])
    assert rc == 0
    records = json.loads((tmp_path / "results.json").read_text())
    got = {(r["op"], r["provider"], r["mode"]) for r in records if r["status"] == "ok"}
    assert got == {(op, p, m) for op in ("softmax", "log_softmax", "linear_cross_entropy")
                   for p in ("softmax_ce_gpu", "torch") for m in ("fwd", "fwd+bwd")}


def test_overhead_subcommand_writes_its_records(tmp_path):
    """softmax-ce-bench overhead (a smoke test: its figures are host-time ratios, never a
    speed claim, and nothing about them is asserted)."""
    out = tmp_path / "overhead.json"
    assert cli.main(["overhead", "--repeat", "2", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["format"].startswith("softmax-ce-bench overhead")
    entries = {(r["entry"], r["mode"], r["reduction"], r["options"]) for r in doc["records"]}
    assert ("cross_entropy", "fwd+bwd", "mean", "plain") in entries
    assert {"linear_cross_entropy", "softmax", "log_softmax"} <= {e[0] for e in entries}
    for r in doc["records"]:
        assert {"ours_us", "torch_us", "ratio", "launches"} <= set(r)
        assert r["ours_us"] > 0 and r["torch_us"] > 0 and r["launches"] >= 1
    # the kernels are back after the stubbed run
    from softmax_ce_gpu.kernels import cross_entropy as k
    assert type(k._cross_entropy_fwd_kernel).__name__ != "_Stub"


def test_both_fused_paths_are_providers(tmp_path):
    """softmax_ce_gpu_single / _two_sweep force a fused path; they are checked like the rest."""
    rc, recs = _run(tmp_path, "--providers",
                    "softmax_ce_gpu_single,softmax_ce_gpu_single_inplace,softmax_ce_gpu_two_sweep",
                    "--modes", "fwd+bwd", "--no-plot")
    assert rc == 0
    for name in ("softmax_ce_gpu_single", "softmax_ce_gpu_single_inplace",
                 "softmax_ce_gpu_two_sweep"):
        r = recs[(name, "fwd+bwd")]
        assert r["status"] == "ok" and r["max_rel_err"] <= r["tol"], r["reason"]


def test_sweep_covers_both_fused_paths(monkeypatch):
    """bench/sweep.py's plumbing, with the timing stubbed (it needs a GPU): each candidate
    runs on its own path with its own configuration, is checked, and the tuning is restored."""
    from softmax_ce_gpu import kernels
    from softmax_ce_gpu.bench import sweep
    from softmax_ce_gpu.kernels import cross_entropy as ce_kernels, tuning

    seen = []
    single = kernels.cross_entropy_single_fwd
    fwd_kernel = ce_kernels._cross_entropy_fwd_kernel

    names = list(inspect.signature(fwd_kernel.fn).parameters)

    class SpyKernel:  # what the two-sweep forward launches, configuration included
        def __getitem__(self, grid):
            def launch(*args, **options):
                meta = dict(zip(names, args), **options)
                if meta["FUSE_GRAD"]:
                    seen.append(("two-sweep", meta["BLOCK_V"], meta["num_warps"]))
                return fwd_kernel[grid](*args, **options)
            return launch

    def spy_single(*a, **k):
        seen.append(("single",) + tuning.single_config(300, 4))
        return single(*a, **k)

    monkeypatch.setattr(sweep, "_time", lambda fn: fn() and 1.0)
    monkeypatch.setattr(sweep, "CANDIDATES", ((256, 4),))
    monkeypatch.setattr(sweep, "SINGLE_CANDIDATES", ((128, 4), (4096, 8)))
    monkeypatch.setattr(ce_kernels, "_cross_entropy_fwd_kernel", SpyKernel())
    monkeypatch.setattr(kernels, "cross_entropy_single_fwd", spy_single)
    records = sweep.sweep([(4, 300)], torch.float32, device="cpu")
    got = [(r["path"], r["block"], r["num_warps"], r["status"]) for r in records]
    # SEGMENT 128: three programs a row, exchanging; 4096: one program a row (K = 1)
    assert got == [("two-sweep", 256, 4, "ok"), ("single", 128, 4, "ok"),
                   ("single", 4096, 8, "ok")], got
    assert set(seen) == {("two-sweep", 256, 4), ("single", 128, 4), ("single", 4096, 8)}
    assert not tuning._overrides and not tuning.row_config_overridden()


def test_gpu_checks_entry_points_run_and_exit_cleanly_without_a_gpu(capsys):
    """bench/gpu_checks.py: every entry point of the sync check runs (here on CPU, small),
    and each subcommand says it is skipped and exits 0 without a CUDA device."""
    from conftest import DEVICE

    import softmax_ce_gpu as sc
    from softmax_ce_gpu.bench import gpu_checks

    cases = gpu_checks.entry_points(torch, sc, DEVICE, N=8, V=40, H=16)
    assert len(cases) >= 14
    for name, call in cases:
        call()
    if DEVICE == "cpu":
        for argv in (["sync"], ["single", "4", "100"], ["gemm"]):
            assert gpu_checks.main(argv) == 0
        assert capsys.readouterr().out.count("skipped") == 3
