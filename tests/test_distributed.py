"""vocab_parallel_cross_entropy on 2 and 3 gloo processes against single-process torch in float64.

Each test spawns one world (file rendezvous under tmp_path, no port chosen by us) and
runs many cases in it: every rank builds the same full (N, V) logits from the same
seed, keeps its own uneven slice of the columns, and compares its loss and gradient
slice with F.cross_entropy on float64 copies of the full logits. Failures are
collected and raised at the end, so one rank's mismatch never leaves the others
waiting in a collective. The spawned processes inherit TRITON_INTERPRET=1 through
os.environ (conftest sets it; _spawn makes sure, also on a GPU runner), so fp32/bf16
cases run the real kernels in the interpreter; float64 cases run the pure-PyTorch path.
The two-rank world also compiles the loss (check_compiled: torch.compile fullgraph, aot_eager
and inductor, on CPU over gloo).
"""

import traceback
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import helpers
from helpers import TOL, expected_stats, rel_err

import softmax_ce_gpu as sc
from softmax_ce_gpu.distributed import vocab_parallel_cross_entropy

REDUCTIONS = ("mean", "sum", "none")
OPTIONS = (
    dict(),
    dict(ignore=True),
    dict(label_smoothing=0.1),
    dict(label_smoothing=1.0, ignore=True),
    dict(z_loss=1e-2),
    dict(softcap=4.0),
    dict(ignore=True, label_smoothing=0.2, z_loss=1e-3, softcap=5.0),
    dict(ignore_index=3, label_smoothing=0.1),
)
# -inf padding: with label smoothing torch's loss is +inf (e / V of log 0), so without it
PAD_OPTIONS = (dict(), dict(ignore=True, z_loss=1e-3, softcap=5.0))


# ----------------------------------------------------------------------------- reference


def reference(x, t, *, reduction="mean", ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
              softcap=None):
    """torch on a float64 copy of the full logits; returns (loss, x64 leaf)."""
    x64 = x.detach().double().requires_grad_()
    z = x64
    if softcap is not None:
        z = torch.where(x64 == float("-inf"), x64, softcap * torch.tanh(x64 / softcap))
    rows = F.cross_entropy(z, t, reduction="none", ignore_index=ignore_index,
                           label_smoothing=label_smoothing)
    valid = t != ignore_index
    if z_loss:
        rows = rows + torch.where(valid, z_loss * torch.logsumexp(z, dim=1) ** 2, 0.0)
    if reduction == "none":
        return rows, x64
    if reduction == "sum":
        return rows.sum(), x64
    return rows.sum() / valid.sum(), x64


# ----------------------------------------------------------------------------- one case


def _slice(widths, rank):
    start = sum(widths[:rank])
    return start, start + widths[rank]


def make_full(seed, N, V, dtype, kind, ignore, ignore_index, widths):
    """The same full logits, target and upstream gradient on every rank."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, V, generator=g, dtype=torch.float64) * 3.0
    t = torch.randint(0, V, (N,), generator=g)
    if kind == "confident":
        # the target far above the rest, on each rank in turn: 1 - p_c = s / (1 + s) with
        # s ~ 1e-5, where 1 + s in fp32 would keep only 2 of its digits; the float64
        # reference keeps about 11 of them, hence the case's tolerance factor in float64
        for r in range(N):
            rank = r % len(widths)
            lo, hi = _slice(widths, rank)
            t[r] = lo + (r * 7) % (hi - lo)
            x[r, t[r]] = 20.0
    elif kind == "tie":
        # the max held twice, in two different shards
        for r in range(N):
            b = _slice(widths, 1)[0] + r % widths[1]
            a = r % widths[0]
            x[r, a] = x[r, b] = 25.0
            t[r] = (a, b, t[r])[r % 3]
    elif kind == "pad":
        # -inf padding at the end of the vocabulary; the last shard all -inf on row 0
        x[:, V - 3:] = float("-inf")
        lo, _ = _slice(widths, len(widths) - 1)
        x[0, lo:] = float("-inf")
        t = t.clamp(max=lo - 1)
    if ignore and N > 1:
        t[::2] = ignore_index
    up = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
    return x.to(dtype), t, up


def run_case(rank, case):
    """Compare this rank's loss and gradient slice; returns a list of failure messages."""
    dtype, reduction, N, kind = case["dtype"], case["reduction"], case["N"], case["kind"]
    widths = case["widths"]
    opts = dict(case["opts"])
    ignore = opts.pop("ignore", False)
    V = sum(widths)
    x, t, up = make_full(case["seed"], N, V, dtype, kind, ignore, opts.get("ignore_index", -100),
                         widths)
    lo, hi = _slice(widths, rank)
    if kind == "strided":
        x_shard = x[:, lo:hi]  # a column slice of the full logits: row stride V, no copy
    else:
        x_shard = x[:, lo:hi].clone()
    x_shard.requires_grad_()
    loss = vocab_parallel_cross_entropy(x_shard, t, reduction=reduction, **opts)
    ref, x64 = reference(x, t, reduction=reduction, **opts)
    if reduction != "none":
        up = up[0]
    up = up.to(loss.dtype)  # the same values reach both
    loss.backward(up)
    ref.backward(up.double())
    msgs = []
    # the loss is bitwise the same on every rank
    world = dist.get_world_size()
    bits = loss.detach().double().reshape(-1).view(torch.int64)
    gathered = [torch.empty_like(bits) for _ in range(world)]
    dist.all_gather(gathered, bits)
    if not all(torch.equal(g, bits) for g in gathered):
        msgs.append("loss differs between ranks")
    factor = 100.0 if (kind == "confident" and dtype == torch.float64) else 1.0
    tol = TOL[dtype] * factor
    # the fused gradient (bf16 'mean'/'sum') is rounded in forward and again when scaled by
    # an upstream other than 1 (see test_cross_entropy.fused_roundings)
    gtol = helpers.tol(dtype, 2 if dtype == torch.bfloat16 and reduction != "none" else 1) * factor
    if loss.dtype != dtype or loss.shape != ref.shape:
        msgs.append(f"loss dtype/shape {loss.dtype} {tuple(loss.shape)} vs {tuple(ref.shape)}")
    else:
        err = rel_err(loss, ref)
        if err > tol:
            msgs.append(f"loss rel err {err:.3g} > {tol:.3g}")
    gerr = rel_err(x_shard.grad, x64.grad[:, lo:hi])
    if gerr > gtol:
        msgs.append(f"grad rel err {gerr:.3g} > {gtol:.3g}")
    return msgs


def _cases(dtypes, reductions, options, kinds, widths, N=3, seed0=0):
    out = []
    for dtype in dtypes:
        for reduction in reductions:
            for opts in options:
                for kind in kinds:
                    seed0 += 1
                    out.append(dict(dtype=dtype, reduction=reduction, opts=opts, kind=kind,
                                    widths=widths, N=N, seed=seed0))
    return out


# ----------------------------------------------------------------------------- statistics


def make_stats_full(seed, N, V, dtype, widths, ignore_index=-100):
    """Full logits and target with the rows return_stats must get right (N >= 6), the same on
    every rank: rows 0 and 1 hold their max twice, once in rank 0's shard and once in rank
    1's (the smaller global column is the argmax: row 1's target, not row 0's); row 2's target
    is its argmax, in the last shard; row 3 is ignored; row 4 has two logits so large that the
    softcap (4.0 in these cases) maps both to the same z in fp32 and float64 (tanh(100) = 1):
    the argmax is of the logits, the later, larger one (its target); row 5's first shard is
    all -inf (its target elsewhere); the rest random."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, V, generator=g, dtype=torch.float64) * 3.0
    t = torch.randint(0, V, (N,), generator=g)
    lo1 = _slice(widths, 1)[0]
    last = _slice(widths, len(widths) - 1)
    for r in (0, 1):
        a, b = (r * 5) % widths[0], lo1 + (r * 3) % widths[1]
        x[r, a] = x[r, b] = 25.0
        t[r] = (b, a)[r]
    t[2] = last[0] + 1
    x[2, t[2]] = 20.0
    t[3] = ignore_index
    x[4, 2] = 400.0
    x[4, last[1] - 2] = 448.0  # 400 and 448 are exact in bf16 and fp16
    t[4] = last[1] - 2
    x[5, :widths[0]] = float("-inf")
    t[5] = widths[0] + int(t[5]) % (V - widths[0])  # a finite target logit
    up = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
    return x.to(dtype), t, up


def _gathered_equal(t):
    """Whether t is bitwise the same on every rank (one all_gather)."""
    bits = t.detach().contiguous().view(torch.uint8).reshape(-1)
    gathered = [torch.empty_like(bits) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, bits)
    return all(torch.equal(g, bits) for g in gathered)


def run_stats_case(rank, case):
    """return_stats=True: the statistics of the full logits (against torch in float64 and
    against single-device cross_entropy), bitwise the same on every rank, without gradient,
    and the loss and gradient bitwise those of the call without them."""
    dtype, reduction, widths = case["dtype"], case["reduction"], case["widths"]
    opts = dict(case["opts"])
    V = sum(widths)
    ignore_index = opts.get("ignore_index", -100)
    x, t, up = make_stats_full(case["seed"], case["N"], V, dtype, widths, ignore_index)
    lo, hi = _slice(widths, rank)
    if reduction != "none":
        up = up[0]
    up = up.to(dtype)
    xs = x[:, lo:hi].clone().requires_grad_()
    loss, stats = vocab_parallel_cross_entropy(xs, t, reduction=reduction, return_stats=True,
                                               **opts)
    loss.backward(up)
    plain = x[:, lo:hi].clone().requires_grad_()
    ref_loss = vocab_parallel_cross_entropy(plain, t, reduction=reduction, **opts)
    ref_loss.backward(up)
    same = [_gathered_equal(v) for v in stats]  # before any check can raise on one rank only
    msgs = [f"{name} differs between ranks" for name, ok in zip(stats._fields, same) if not ok]
    if not (torch.equal(loss, ref_loss) and torch.equal(xs.grad, plain.grad)):
        msgs.append("loss or gradient differs from the call without return_stats")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if not isinstance(stats, sc.CrossEntropyStats):
        msgs.append(f"stats is a {type(stats).__name__}")
    if (stats.lse.dtype, stats.entropy.dtype, stats.correct.dtype) != (acc, acc, torch.bool):
        msgs.append(f"dtypes {stats.lse.dtype} {stats.entropy.dtype} {stats.correct.dtype}")
    if any(v.shape != t.shape for v in stats):
        msgs.append(f"shapes {[tuple(v.shape) for v in stats]}")
    if any(v.requires_grad or v.grad_fn is not None for v in stats):
        msgs.append("the statistics carry a gradient")
    lse, entropy, correct = expected_stats(x, t, softcap=opts.get("softcap"),
                                           ignore_index=ignore_index)
    for name, got, want in (("lse", stats.lse, lse), ("entropy", stats.entropy, entropy)):
        err = rel_err(got, want)
        if err > TOL[acc]:
            msgs.append(f"{name} rel err {err:.3g} > {TOL[acc]:.3g}")
    if not torch.equal(stats.correct, correct):
        msgs.append(f"correct {stats.correct.tolist()} != {correct.tolist()}")
    # single-device cross_entropy on the full logits: the same decisions, NaN where it has them
    _, single = sc.cross_entropy(x, t, reduction=reduction, return_stats=True, **opts)
    if not torch.equal(stats.correct, single.correct):
        msgs.append(f"correct differs from cross_entropy's {single.correct.tolist()}")
    for name in ("lse", "entropy"):
        if not torch.equal(getattr(stats, name).isnan(), getattr(single, name).isnan()):
            msgs.append(f"{name}'s NaN rows differ from cross_entropy's")
    return msgs


def _stats_cases(dtypes, reductions, options, widths, N=8, seed0=7000):
    return [dict(case, stats=True)
            for case in _cases(dtypes, reductions, options, ("plain",), widths, N=N, seed0=seed0)]


STATS_OPTIONS = (dict(), dict(softcap=4.0), dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0),
                 dict(ignore_index=3))


def check_stats_small_shapes_and_bad_input(rank, widths):
    """return_stats with 1-D logits (stats of shape ()), N = 0, under no_grad; a return_stats
    that is not a bool raises a TypeError naming the function, the argument and the value on
    every rank, before any collective."""
    msgs = []
    V = sum(widths)
    lo, hi = _slice(widths, rank)
    x, t, _ = make_stats_full(51, 8, V, torch.float32, widths)
    for r in (1, 2, 6):  # rows 1 and 2 are correct, row 6 (random) most likely not
        loss, st = vocab_parallel_cross_entropy(x[r, lo:hi], t[r], reduction="none",
                                                return_stats=True)
        want = expected_stats(x[r:r + 1], t[r:r + 1])
        if loss.shape != () or any(v.shape != () for v in st):
            msgs.append(f"1-D row {r}: shapes {tuple(loss.shape)} {[tuple(v.shape) for v in st]}")
        elif (rel_err(st.lse.reshape(1), want[0]) > TOL[torch.float32]
              or bool(st.correct) != bool(want[2])):
            msgs.append(f"1-D row {r}: statistics differ")
    loss, st = vocab_parallel_cross_entropy(torch.randn(0, hi - lo),
                                            torch.zeros(0, dtype=torch.long), return_stats=True)
    if any(v.shape != (0,) for v in st) or st.correct.dtype != torch.bool:
        msgs.append(f"N=0: {[(tuple(v.shape), v.dtype) for v in st]}")
    with torch.no_grad():
        _, st = vocab_parallel_cross_entropy(x[:, lo:hi], t, return_stats=True, softcap=4.0)
    if not torch.equal(st.correct, expected_stats(x, t, softcap=4.0)[2]):
        msgs.append("no_grad: correct differs")
    for bad in (1, None, "yes"):
        try:
            vocab_parallel_cross_entropy(x[:, lo:hi], t, return_stats=bad)
            msgs.append(f"return_stats={bad!r} did not raise")
        except TypeError as err:
            text = str(err)
            if not all(part in text for part in ("vocab_parallel_cross_entropy", "'return_stats'",
                                                  repr(bad))):
                msgs.append(f"return_stats={bad!r}: message {text!r}")
    return msgs


# ----------------------------------------------------------------------------- worlds


def _worker(rank, world, rdv, widths, plan):
    # the interpreter's numpy warns about the IEEE edge cases computed on purpose (as
    # pyproject's filterwarnings says); pytest's filter does not reach spawned processes
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    from softmax_ce_gpu import kernels

    assert kernels.INTERPRETER, "the spawned process does not run the kernels"
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    failures = []
    try:
        for case in PLANS[plan]():
            try:
                if "check" in case:
                    msgs = case["check"](rank, widths)
                elif case.get("stats"):
                    msgs = run_stats_case(rank, case)
                else:
                    msgs = run_case(rank, case)
            except Exception:  # noqa: BLE001  (reported below with the case)
                msgs = [traceback.format_exc()]
            failures += [f"rank {rank} {case_name(case)}: {m}" for m in msgs]
    finally:
        dist.destroy_process_group()
    if failures:
        raise AssertionError("\n".join(failures))


def case_name(case):
    if "check" in case:
        return case["check"].__name__
    return (f"{'stats ' if case.get('stats') else ''}{case['dtype']} {case['reduction']} "
            f"{case['kind']} N={case['N']} {case['widths']} {case['opts'] or 'plain'}")


def _spawn(tmp_path, monkeypatch, widths, plan):
    # the children run CPU tensors over gloo: the kernels through the interpreter, also on a
    # GPU runner (the variable is read when the child imports triton)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    mp.spawn(_worker, args=(len(widths), str(tmp_path / "rdv"), widths, plan),
             nprocs=len(widths), join=True)


# ----------------------------------------------------------------------------- special checks


def check_retain_graph(rank, widths):
    """'none' recomputes in backward (any number of times); 'mean' hands its gradient out once."""
    msgs = []
    x, t, _ = make_full(7, 4, sum(widths), torch.float32, "plain", False, -100, widths)
    lo, hi = _slice(widths, rank)
    xs = x[:, lo:hi].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(xs, t, reduction="none")
    loss.sum().backward(retain_graph=True)
    first = xs.grad.clone()
    loss.sum().backward()
    if rel_err(xs.grad, 2 * first) > TOL[torch.float32]:
        msgs.append("second backward of 'none' differs")
    loss = vocab_parallel_cross_entropy(xs, t)
    loss.backward(retain_graph=True)
    try:
        loss.backward()
        msgs.append("second backward of 'mean' did not raise")
    except RuntimeError as err:
        if "second time" not in str(err):
            msgs.append(f"unexpected error {err}")
    return msgs


def check_small_shapes(rank, widths):
    """N = 0, N = 1, 1-D logits, all rows ignored, int32 targets."""
    msgs = []
    V = sum(widths)
    lo, hi = _slice(widths, rank)
    for reduction in REDUCTIONS:
        xs = torch.randn(0, hi - lo).requires_grad_()
        loss = vocab_parallel_cross_entropy(xs, torch.zeros(0, dtype=torch.long),
                                            reduction=reduction)
        loss.sum().backward()
        expected = {"mean": (), "sum": (), "none": (0,)}[reduction]
        if loss.shape != expected or xs.grad.shape != (0, hi - lo):
            msgs.append(f"N=0 {reduction}: shapes {tuple(loss.shape)} {tuple(xs.grad.shape)}")
        if reduction == "mean" and not torch.isnan(loss):
            msgs.append("N=0 mean is not NaN")
    # all rows ignored: NaN mean, zero gradient (torch's choice)
    x, t, _ = make_full(11, 3, V, torch.float32, "plain", False, -100, widths)
    xs = x[:, lo:hi].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(xs, torch.full_like(t, -100))
    loss.backward()
    if not torch.isnan(loss) or torch.count_nonzero(xs.grad):
        msgs.append("all-ignored mean: not NaN, or a nonzero gradient")
    for reduction in REDUCTIONS:
        # 1-D logits with a () target, and (1, W) with an int32 target
        x, t, _ = make_full(12, 1, V, torch.float32, "plain", False, -100, widths)
        for xs_full, tt in ((x[0], t[0]), (x, t.int())):
            xs = xs_full[..., lo:hi].clone().requires_grad_()
            loss = vocab_parallel_cross_entropy(xs, tt, reduction=reduction, label_smoothing=0.1)
            loss.sum().backward()
            ref, x64 = reference(xs_full.reshape(1, V), tt.reshape(1).long(), reduction=reduction,
                                 label_smoothing=0.1)
            ref.sum().backward()
            if loss.numel() != ref.numel() or rel_err(loss.reshape(-1), ref.reshape(-1)) > 2e-5:
                msgs.append(f"shape {tuple(xs.shape)} {reduction}: loss mismatch")
            if rel_err(xs.grad.reshape(1, -1), x64.grad[:, lo:hi]) > 2e-5:
                msgs.append(f"shape {tuple(xs.shape)} {reduction}: grad mismatch")
    return msgs


def check_bad_input(rank, widths):
    """Errors raised identically on every rank, before any rank enters a collective they skip."""
    msgs = []
    V = sum(widths)
    lo, hi = _slice(widths, rank)
    xs = torch.randn(3, hi - lo)
    t = torch.tensor([0, 1, 2])
    bad = [
        (TypeError, lambda: vocab_parallel_cross_entropy(xs, torch.rand(3, hi - lo))),
        (ValueError, lambda: vocab_parallel_cross_entropy(xs.reshape(3, 1, -1), t)),
        (ValueError, lambda: vocab_parallel_cross_entropy(xs, t, reduction="avg")),
        (ValueError, lambda: vocab_parallel_cross_entropy(xs, t, label_smoothing=1.5)),
        (ValueError, lambda: vocab_parallel_cross_entropy(xs, t[:2])),
        (ValueError, lambda: vocab_parallel_cross_entropy(xs, torch.tensor([0, V, 1]))),
        (TypeError, lambda: vocab_parallel_cross_entropy(xs.int(), t)),
        (TypeError, lambda: vocab_parallel_cross_entropy(xs, t, weight=torch.ones(V))),
    ]
    for i, (kind, call) in enumerate(bad):
        try:
            call()
            msgs.append(f"bad input {i} did not raise")
        except kind as err:
            if i != 7 and "vocab_parallel_cross_entropy" not in str(err):
                msgs.append(f"bad input {i}: message does not name the function: {err}")
        except Exception as err:  # noqa: BLE001
            msgs.append(f"bad input {i}: {type(err).__name__} instead of {kind.__name__}: {err}")
    # the group is still in step: a good call after the errors works
    x, t, _ = make_full(13, 2, V, torch.float32, "plain", False, -100, widths)
    loss = vocab_parallel_cross_entropy(x[:, lo:hi], t)
    if rel_err(loss, reference(x, t)[0]) > 2e-5:
        msgs.append("loss after bad input differs")
    return msgs


def check_fp16_scaled_and_no_grad(rank, widths):
    """fp16: the gradient meets a loss scaler's factor before it is rounded (not fused in
    forward, where (p - y) / N would flush to zero); no_grad: no gradient, nothing written."""
    msgs = []
    V = sum(widths)
    lo, hi = _slice(widths, rank)
    x, t, _ = make_full(21, 16, V, torch.float64, "plain", False, -100, widths)
    x = (x * 3.0).half()  # many p_j / N far below fp16's smallest subnormal (6e-8)
    scale = 2.0 ** 14
    for reduction in ("mean", "sum"):
        xs = x[:, lo:hi].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(xs, t, reduction=reduction)
        (loss * scale).backward()
        ref, x64 = reference(x, t, reduction=reduction)
        (ref * scale).backward()
        err = rel_err(xs.grad, x64.grad[:, lo:hi])
        if err > TOL[torch.float16]:
            msgs.append(f"fp16 {reduction} scaled gradient rel err {err:.3g}")
        # the norm hardly sees flushed small entries: count them (a value within fp32 error
        # of the fp16 underflow threshold may go either way, hence the slack of 2)
        exact_zeros = int((x64.grad[:, lo:hi].half() == 0).sum())
        if abs(int((xs.grad == 0).sum()) - exact_zeros) > 2:
            msgs.append(f"fp16 {reduction}: {int((xs.grad == 0).sum())} zeros, the rounded exact "
                        f"gradient has {exact_zeros}")
    leaf = x[:, lo:hi].float().clone().requires_grad_()
    for manager in (torch.no_grad, torch.inference_mode):
        with manager():
            loss = vocab_parallel_cross_entropy(leaf * 1.0, t)
        if loss.requires_grad or loss.grad_fn is not None:
            msgs.append(f"{manager.__name__}: the loss carries a graph")
    return msgs


def check_double_backward_raises(rank, widths):
    """create_graph=True: first order works, a second derivative raises (never detached)."""
    msgs = []
    x, t, _ = make_full(22, 3, sum(widths), torch.float32, "plain", False, -100, widths)
    lo, hi = _slice(widths, rank)
    for reduction in ("mean", "none"):
        xs = x[:, lo:hi].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(xs, t, reduction=reduction).sum()
        (g,) = torch.autograd.grad(loss, xs, create_graph=True)
        ref, x64 = reference(x, t, reduction=reduction)
        ref.sum().backward()
        if rel_err(g, x64.grad[:, lo:hi]) > TOL[torch.float32]:
            msgs.append(f"{reduction}: first-order gradient under create_graph differs")
        try:
            (g * g).sum().backward()
            msgs.append(f"{reduction}: a second derivative did not raise")
        except RuntimeError as err:
            if "second derivative" not in str(err):
                msgs.append(f"{reduction}: unexpected error {err}")
    return msgs


def check_empty_shard(rank, widths):
    """A rank that holds no columns (W = 0) takes part: every rank gets the loss of the full
    logits and its slice of the gradient (an empty one on the empty rank), and its statistics,
    and no rank is left waiting in a collective."""
    msgs = []
    split = [widths[0] + widths[1], 0] + list(widths[2:])  # rank 1 holds nothing
    V = sum(split)
    lo, hi = _slice(split, rank)
    for dtype in (torch.float32, torch.float64):
        for reduction in REDUCTIONS:
            x, t, _ = make_full(31, 3, V, dtype, "plain", True, -100, split)
            xs = x[:, lo:hi].clone().requires_grad_()
            loss = vocab_parallel_cross_entropy(xs, t, reduction=reduction, label_smoothing=0.1)
            loss.sum().backward()
            ref, x64 = reference(x, t, reduction=reduction, label_smoothing=0.1)
            ref.sum().backward()
            if rel_err(loss, ref) > TOL[dtype] or xs.grad.shape != (3, hi - lo):
                msgs.append(f"{dtype} {reduction}: loss differs or gradient shape wrong")
            elif rel_err(xs.grad, x64.grad[:, lo:hi]) > TOL[dtype]:
                msgs.append(f"{dtype} {reduction}: gradient differs")
        # the statistics: the empty shard offers no argmax and adds nothing to the entropy
        x, t, _ = make_stats_full(32, 8, V, dtype, widths)  # rows placed by the nonempty widths
        _, st = vocab_parallel_cross_entropy(x[:, lo:hi], t, return_stats=True, softcap=4.0)
        want = expected_stats(x, t, softcap=4.0)
        if not torch.equal(st.correct, want[2]) or any(
                rel_err(a, b) > TOL[dtype] for a, b in zip(st[:2], want[:2])):
            msgs.append(f"{dtype}: statistics differ")
    return msgs


def check_compiled(rank, widths):
    """torch.compile(fullgraph=True) of a small loss, with aot_eager and with inductor: the
    functional collectives and the shard ops trace without a graph break, and values and
    gradients equal eager's. 'mean' (gradient made in forward) on the default group, 'none'
    (made in backward) on a group of its own, 'sum' in bf16 and float64 (the torch path)."""
    msgs = []
    V = sum(widths)
    lo, hi = _slice(widths, rank)
    group = dist.new_group(list(range(len(widths))))  # every rank makes it, in the same order
    cases = (("mean", torch.float32, None), ("none", torch.float32, group),
             ("sum", torch.bfloat16, None), ("sum", torch.float64, group))
    for backend in ("aot_eager", "inductor"):
        for i, (reduction, dtype, grp) in enumerate(cases):
            x, t, up = make_full(40 + i, 4, V, dtype, "plain", True, -100, widths)
            up = up.to(dtype) if reduction == "none" else up[0].to(dtype)

            def f(xs, t, reduction=reduction, grp=grp):
                return vocab_parallel_cross_entropy(xs * 1.0, t, group=grp, reduction=reduction,
                                                    label_smoothing=0.1, z_loss=1e-3,
                                                    softcap=5.0)

            torch._dynamo.reset()
            xs = x[:, lo:hi].clone().requires_grad_()
            ref = f(xs, t)
            ref.backward(up)
            ref_grad, xs.grad = xs.grad, None
            out = torch.compile(f, backend=backend, fullgraph=True)(xs, t)
            out.backward(up)
            name = f"{backend} {reduction} {dtype}"
            if out.dtype != ref.dtype or out.shape != ref.shape:
                msgs.append(f"{name}: loss dtype/shape {out.dtype} {tuple(out.shape)}")
            elif rel_err(out, ref) > TOL[dtype] or rel_err(xs.grad, ref_grad) > TOL[dtype]:
                msgs.append(f"{name}: loss or gradient differs from eager's")
    dist.destroy_process_group(group)
    return msgs


def check_compiled_stats(rank, widths):
    """return_stats under torch.compile(fullgraph=True), aot_eager and inductor, with a
    softcap (the argmax's extra row in the max and its all_reduce MIN): statistics, loss and
    gradient as eager's."""
    msgs = []
    lo, hi = _slice(widths, rank)
    x, t, _ = make_stats_full(60, 8, sum(widths), torch.float32, widths)

    def f(xs, t):
        loss, st = vocab_parallel_cross_entropy(xs * 1.0, t, softcap=4.0, label_smoothing=0.1,
                                                return_stats=True)
        return loss, st.lse, st.entropy, st.correct

    for backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        xs = x[:, lo:hi].clone().requires_grad_()
        ref = f(xs, t)
        ref[0].backward()
        ref_grad, xs.grad = xs.grad, None
        out = torch.compile(f, backend=backend, fullgraph=True)(xs, t)
        out[0].backward()
        tol = TOL[torch.float32]
        if not torch.equal(out[3], ref[3]) or out[3].dtype != torch.bool:
            msgs.append(f"{backend}: correct differs from eager's")
        elif any(rel_err(o, r) > tol for o, r in zip(out[:3], ref[:3])):
            msgs.append(f"{backend}: loss or statistics differ from eager's")
        elif rel_err(xs.grad, ref_grad) > tol:
            msgs.append(f"{backend}: gradient differs from eager's")
    return msgs


# ----------------------------------------------------------------------------- plans
# Kernel cases (fp32/bf16 through the interpreter) cost about 0.4 s each on 2 cores;
# float64 cases (the torch path) a tenth of that. Every option meets every reduction
# in fp32 and float64 on two ranks; the three-rank world repeats the options with the
# reductions in turn, and the special inputs.

KERNEL = (torch.float32, torch.bfloat16)


def _plan_two():
    w = [23, 18]
    cases = _cases((torch.float32, torch.float64), REDUCTIONS, OPTIONS, ("plain",), w, N=4)
    cases += _cases((torch.bfloat16,), ("mean",), OPTIONS, ("plain",), w, N=4, seed0=500)
    cases += _cases((torch.float32, torch.float64), ("mean", "none"),
                    (dict(), dict(label_smoothing=0.1, z_loss=1e-3)),
                    ("confident", "tie", "strided"), w, seed0=1000)
    cases += _cases((torch.bfloat16,), ("sum",), (dict(label_smoothing=0.1, z_loss=1e-3),),
                    ("confident", "tie", "strided"), w, seed0=1200)
    cases += _cases((torch.float32, torch.float64), ("mean", "none"), PAD_OPTIONS, ("pad",), w,
                    seed0=1500)
    cases += _cases((torch.float32,), ("sum",), PAD_OPTIONS[1:], ("pad",), w, N=1, seed0=2000)
    # several BLOCK_V chunks in one shard (16 KiB chunks: 4096 fp32 values)
    cases += _cases((torch.float32,), ("mean",),
                    (dict(label_smoothing=0.1, softcap=20.0, z_loss=1e-3),), ("plain",),
                    [4500, 700], N=2, seed0=2500)
    cases += _cases((torch.float32,), ("none",), PAD_OPTIONS[1:], ("pad",), [4500, 700], N=2,
                    seed0=2600)
    # return_stats: every reduction and option in fp32 and float64, bf16, and fp16 (the late
    # path); shards of several chunks: test_shard_stats_kernel_into_poisoned_buffers
    cases += _stats_cases((torch.float32, torch.float64), REDUCTIONS, STATS_OPTIONS, w)
    cases += _stats_cases((torch.bfloat16,), ("mean", "none"), STATS_OPTIONS[:3], w, seed0=7100)
    cases += _stats_cases((torch.float16,), ("mean",), STATS_OPTIONS[1:2], w, seed0=7200)
    return cases + [dict(check=check_retain_graph), dict(check=check_small_shapes),
                    dict(check=check_bad_input), dict(check=check_fp16_scaled_and_no_grad),
                    dict(check=check_double_backward_raises), dict(check=check_compiled),
                    dict(check=check_stats_small_shapes_and_bad_input),
                    dict(check=check_compiled_stats)]


def _plan_three():
    w = [9, 20, 14]
    cases = []
    for i, opts in enumerate(OPTIONS):
        cases += _cases((torch.float32,), (REDUCTIONS[i % 3],), (opts,), ("plain",), w,
                        seed0=3000 + 10 * i)
    cases += _cases((torch.float64,), REDUCTIONS, OPTIONS, ("plain",), w, seed0=3500)
    cases += _cases((torch.bfloat16,), ("mean",), OPTIONS[-2:], ("plain",), w, seed0=4000)
    cases += _cases((torch.float32, torch.float64), ("sum",),
                    (dict(label_smoothing=0.2, softcap=5.0, z_loss=1e-3),),
                    ("confident", "tie", "strided"), w, seed0=5000)
    cases += _cases((torch.float32, torch.float64), ("mean",), PAD_OPTIONS[1:], ("pad",), w,
                    seed0=5500)
    for i, opts in enumerate(STATS_OPTIONS):
        cases += _stats_cases((torch.float32,), (REDUCTIONS[i % 3],), (opts,), w,
                              seed0=7500 + 10 * i)
    cases += _stats_cases((torch.bfloat16,), ("sum",), STATS_OPTIONS[1:3], w, seed0=7600)
    cases += _stats_cases((torch.float64,), REDUCTIONS, STATS_OPTIONS[:3], w, seed0=7700)
    return cases + [dict(check=check_empty_shard),
                    dict(check=check_stats_small_shapes_and_bad_input)]


PLANS = {"two": _plan_two, "three": _plan_three}


# ----------------------------------------------------------------------------- tests


def test_two_ranks_uneven(tmp_path, monkeypatch):
    _spawn(tmp_path, monkeypatch, [23, 18], "two")


def test_three_ranks_uneven(tmp_path, monkeypatch):
    _spawn(tmp_path, monkeypatch, [9, 20, 14], "three")


def test_refuses_without_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_cross_entropy(torch.randn(2, 5), torch.tensor([0, 1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck_shard_ops(dtype):
    """The shard computations' custom ops (schema, fake implementation, aot dispatch) on one
    shard, columns [7, 7 + 23) of V = 50: no process group needed, the shard is a tensor."""
    from softmax_ce_gpu import _vocab_parallel_ops as vp

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(4, 23, device=device, dtype=dtype)
    t = torch.tensor([8, 0, -100, 29], device=device)
    shard = torch.tensor([7, 50], device=device)
    opts = (-100, 0.1, 5.0)
    torch.library.opcheck(vp.vocab_parallel_partial, (x, t, shard, *opts, "opcheck"))
    torch.library.opcheck(vp.vocab_parallel_partial_stats, (x, t, shard, *opts, "opcheck"))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    row_max = torch.full((4,), 3.0, device=device, dtype=acc)
    row_logd = torch.full((4,), 4.0, device=device, dtype=acc)
    scale = torch.tensor(0.5, device=device, dtype=acc)
    for dloss in (torch.tensor(2.0, device=device, dtype=dtype), torch.rand(4, device=device)):
        torch.library.opcheck(vp.vocab_parallel_grad, (x, t, shard, row_max, row_logd, dloss,
                                                       scale, -100, 0.1, 1e-3, 5.0, "opcheck"))


@pytest.mark.parametrize("W", [37, 5000])
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shard_stats_kernel_into_poisoned_buffers(dtype, softcap, W):
    """The forward kernel with STATS (return_stats' partials: T_r, the largest logit, the
    global column of its first occurrence, and the usual four rows), written into NaN- (and
    -7-) poisoned buffers with a guarded tail, against the torch path on float64 copies: a
    tie (across chunks when W = 5000: the first column), a row of -inf only, an ignored row,
    two logits whose capped z tie (the larger logit wins), -inf padding, a class id outside
    the shard. One shard, columns [11, 11 + W) of V = W + 16: no process group needed."""
    from softmax_ce_gpu import _vocab_parallel_ops as vp
    from softmax_ce_gpu.kernels import vocab_parallel as vpk

    device = "cuda" if torch.cuda.is_available() else "cpu"
    N = 6
    x = torch.randn(N, W, device=device, dtype=torch.float64) * 3.0
    t = torch.randint(11, 11 + W, (N,), device=device)
    x[1, 3] = x[1, W - 2] = 30.0
    x[2] = float("-inf")
    t[3] = -100
    x[4, 1], x[4, W - 1] = 400.0, 448.0
    x[5, W // 2:] = float("-inf")
    t[5] = 2
    x = x.to(dtype)
    shard = torch.tensor([11, W + 16], device=device)
    big = helpers.poisoned((6 * N + 5,), torch.float32, device)
    best_big = torch.full((N + 3,), -7, dtype=torch.int64, device=device)
    opts = dict(ignore_index=-100, label_smoothing=0.1, softcap=softcap)
    part, best = vpk.vocab_parallel_fwd(x, t, shard, with_stats=True,
                                        out=(big[:6 * N].view(6, N), best_big[:N]), **opts)
    ref, ref_best = vp._torch_fwd(x.double(), t, shard, with_stats=True, **opts)
    assert big[6 * N:].isnan().all() and (best_big[N:] == -7).all(), "a write past the outputs"
    assert part.data_ptr() == big.data_ptr() and best.data_ptr() == best_big.data_ptr()
    for row in range(5):  # m_r, z_c, s_r, B_r, T_r: fp32 arithmetic on the same values
        assert rel_err(part[row], ref[row]) <= TOL[torch.float32], row
    assert torch.equal(part[vpk.ROW_XMAX], ref[vpk.ROW_XMAX].float())  # a logit, exactly
    assert torch.equal(best, ref_best)
    expected = [11 + int(x[0].float().argmax()), 11 + 3, vpk.NO_ARGMAX, vpk.NO_ARGMAX,
                11 + W - 1, 11 + int(x[5].float().argmax())]
    assert best.tolist() == expected
    assert vpk.NO_ARGMAX == vp.NO_ARGMAX


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device (CUDA-graph capture over a single-rank NCCL group)")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_graph_single_rank_nccl(tmp_path, reduction):
    """A training step of vocab_parallel_cross_entropy on a one-rank NCCL group (one GPU holds
    the whole vocabulary), captured in a CUDA graph with its collectives, and replayed on
    new inputs: loss and gradient as eager's."""
    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1, device_id=device)
    try:
        N, V = 64, 1000

        def new_inputs():
            x = torch.randn(N, V, device=device, dtype=torch.bfloat16)
            t = torch.randint(0, V, (N,), device=device)
            t[::5] = -100
            return x, t

        x0, t0 = new_inputs()
        static_x = x0.clone().requires_grad_()
        static_t = t0.clone()

        def loss_of(x, t):
            return vocab_parallel_cross_entropy(x, t, reduction=reduction, label_smoothing=0.1,
                                                z_loss=1e-4).sum()

        def step():
            static_x.grad = None
            loss = loss_of(static_x, static_t)
            loss.backward()
            return loss

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm up: kernels compiled, NCCL communicator made
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = step()
        static_grad = static_x.grad
        for _ in range(2):
            x, t = new_inputs()
            with torch.no_grad():
                static_x.copy_(x)
            static_t.copy_(t)
            graph.replay()
            out, grad = loss.clone(), static_grad.clone()
            leaf = x.clone().requires_grad_()
            ref = loss_of(leaf, t)
            ref.backward()
            assert rel_err(out, ref) <= TOL[torch.bfloat16]
            assert rel_err(grad, leaf.grad) <= TOL[torch.bfloat16]
    finally:
        dist.destroy_process_group()

