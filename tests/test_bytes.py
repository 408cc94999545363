"""The byte budget of DESIGN.md section 3, counted under Triton's interpreter.

Method (bench/byte_count.py): while a ByteCounter is active, every launch
``kernel[grid](...)`` registers the storages of its tensor arguments, and every
``tl.load`` / ``tl.store`` of every program is seen at the interpreter's builder
(``create_masked_load`` / ``create_masked_store``, through which the unmasked
forms pass too): the addresses of the active lanes are credited, element by
element, to the storage they fall in. Masked-off lanes are not counted (they
move no memory on a GPU). The result is, per launch and per tensor, how many
times each element was read and written, and (with trace=True) in what order,
by which program. Caches are not modelled: a re-read is counted as a read; the
trace gives its reuse distance, which is what decides whether a GPU's L2 serves it.

Host allocations are recorded by bench.byte_count.AllocationRecorder, a
TorchDispatchMode that notes every aten op output on fresh storage.

Shapes are small (the interpreter is slow) but cover several chunks of BLOCK_V
with a ragged tail; every test has an ignored row (target == ignore_index).
"""

import pytest
import torch

import softmax_ce_gpu
from softmax_ce_gpu import _ops, kernels
from softmax_ce_gpu.kernels import tuning

try:
    from softmax_ce_gpu.bench import byte_count
except ImportError:  # before bench/ is installed as softmax_ce_gpu.bench: run from the repo root
    from bench import byte_count

pytestmark = pytest.mark.skipif(
    kernels is None or not kernels.INTERPRETER,
    reason="byte counting instruments Triton's interpreter (TRITON_INTERPRET=1); "
           "this run compiles the kernels for a GPU")

N = 3
IGNORED = 1
# (dtype, V): fp32 V=4100 is two chunks of BLOCK_V=4096, the second ragged; bf16 V=1000 one
# chunk of 1024 with masked lanes. (The interpreter runs a chunk's reductions lane by lane in
# Python: bigger rows cost seconds each.)
CASES = [(torch.float32, 4100), (torch.bfloat16, 1000)]
ALL_OPTIONS = dict(label_smoothing=0.1, z_loss=1e-3, softcap=20.0)


def _inputs(dtype, V, weight=False):
    x = torch.randn(N, V, dtype=dtype)
    t = torch.randint(0, V, (N,))
    t[IGNORED] = -100
    w = torch.rand(V, dtype=dtype) + 0.5 if weight else None
    return x, t, w


def _assert_reads(counts, t, per_logit):
    """Each logit of a row read per_logit times; the class logit x[r, t_r] may be read once
    more (the loss's own scalar load: one element per row); ignored rows: not at all."""
    rows = torch.arange(N)
    valid = t != -100
    cls = counts[rows[valid], t[valid]]
    assert ((cls == per_logit) | (cls == per_logit + 1)).all(), cls
    rest = counts.clone()
    rest[rows[valid], t[valid]] = per_logit
    expected = torch.full_like(counts, per_logit)
    expected[~valid] = 0
    assert torch.equal(rest, expected), (rest != expected).nonzero()[:10]


def _only(bc, kernel):
    launches = bc.launches_of(kernel)
    assert len(launches) == 1, [launch.kernel for launch in bc.launches]
    return launches[0]


def _no_stray_accesses(bc):
    for launch in bc.launches:
        assert launch.unattributed == 0, launch.kernel


def _scale_launches(own_scale):
    """The launches before the loss kernel: none when it makes the reduction's scale itself
    (few rows, softmax_ce_gpu/_ops.py), else loss_scale's one program."""
    return [] if own_scale else ["_loss_scale_kernel"]


@pytest.fixture(params=[True, False], ids=["own-scale", "scale-launch"])
def own_scale(request, monkeypatch):
    """Both ways of making the reduction's scale: in the loss launch (the default for the
    N rows here) or in a launch before it (as for more than _OWN_SCALE_ROWS rows)."""
    if not request.param:
        monkeypatch.setattr(_ops, "_OWN_SCALE_ROWS", 0)
    else:
        assert N <= _ops._OWN_SCALE_ROWS
    return request.param


@pytest.mark.parametrize("dtype,V", CASES)
@pytest.mark.parametrize("options", [{}, ALL_OPTIONS], ids=["plain", "all-options"])
def test_fused_forward_reads_each_logit_twice_in_a_row_and_writes_the_gradient_once(
        dtype, V, options, own_scale):
    x, t, w = _inputs(dtype, V, weight=bool(options))
    x.requires_grad_(True)
    with byte_count.ByteCounter(trace=True) as bc:
        loss = softmax_ce_gpu.cross_entropy(x, t, w, **options)
    launch = _only(bc, "_cross_entropy_fwd_kernel")
    # around it, the reduction's one-program launches, which touch no logit
    assert [k.kernel for k in bc.launches] == _scale_launches(own_scale) + [
        "_cross_entropy_fwd_kernel", "_loss_reduce_kernel"]
    for small in bc.launches:
        if small is not launch:
            assert small.bytes(x.detach()) == (0, 0)
    _no_stray_accesses(bc)
    loss.backward()
    grad = x.grad
    assert grad.untyped_storage().data_ptr() in launch.regions  # the tensor the kernel wrote

    # two sweeps over each row (plus, at most, the class logit once more); ignored rows: none
    _assert_reads(launch.counts(x.detach(), "r"), t, 2)
    assert not launch.counts(x.detach(), "w").any()
    assert torch.equal(launch.counts(grad, "w"), torch.ones(N, V, dtype=torch.int64))
    assert not launch.counts(grad, "r").any()

    # order: program p touches only row p of the logits, and programs do not interleave;
    # the second read of every logit comes at most one row ((V + 1) elements) after its first
    b = x.element_size()
    start = x.untyped_storage().data_ptr()
    row_bytes = x.stride(0) * b
    events = [e for e in launch.trace if e[2] == start and e[1] == "r"]
    programs = [e[0][0] for e in events]
    assert programs == sorted(programs)
    for p in sorted(set(programs)):
        position, first, worst = 0, {}, 0
        for _, _, _, offs, size in (e for e in events if e[0][0] == p):
            assert ((offs // row_bytes) == p).all()
            for o in offs.tolist():
                if o in first:
                    worst = max(worst, position - first.pop(o))
                else:
                    first[o] = position
            position += offs.size * size
        assert worst <= (V + 1) * b, (p, worst)


@pytest.mark.parametrize("dtype,V", CASES)
def test_forward_without_gradient_reads_each_logit_once(dtype, V, own_scale):
    x, t, _ = _inputs(dtype, V)
    with byte_count.ByteCounter() as bc:
        softmax_ce_gpu.cross_entropy(x, t)
    launch = _only(bc, "_cross_entropy_fwd_kernel")
    _no_stray_accesses(bc)
    _assert_reads(launch.counts(x, "r"), t, 1)
    assert not launch.counts(x, "w").any()
    # what it writes: four fp32 numbers per row (loss, max, log d, S), nothing of size N x V;
    # and the reduction's three when it makes them
    assert sum(r.bytes_written for r in launch.regions.values()) == 4 * 4 * N + 12 * own_scale


@pytest.mark.parametrize("dtype,V", CASES)
def test_backward_time_path_reads_each_logit_once_and_writes_each_gradient_once(dtype, V,
                                                                              own_scale):
    x, t, _ = _inputs(dtype, V)
    x.requires_grad_(True)
    with byte_count.ByteCounter() as fwd:
        loss = softmax_ce_gpu.cross_entropy(x, t, reduction="none")
    launch = _only(fwd, "_cross_entropy_fwd_kernel")
    _assert_reads(launch.counts(x.detach(), "r"), t, 1)
    assert sum(r.bytes_written for r in launch.regions.values()) == 4 * 4 * N + 12 * own_scale

    dloss = torch.rand(N, dtype=dtype) + 0.5
    with byte_count.ByteCounter() as bwd:
        (grad,) = torch.autograd.grad(loss, x, dloss)
    launch = _only(bwd, "_cross_entropy_bwd_kernel")
    assert len(bwd.launches) == 1
    _no_stray_accesses(bwd)
    _assert_reads(launch.counts(x.detach(), "r"), t, 1)
    assert torch.equal(launch.counts(grad, "w"), torch.ones(N, V, dtype=torch.int64))
    assert not launch.counts(grad, "r").any()


@pytest.mark.parametrize("dtype,V", CASES)
def test_scale_grad_touches_the_gradient_only_when_the_upstream_gradient_is_not_one(dtype, V):
    x, t, _ = _inputs(dtype, V)
    x.requires_grad_(True)
    loss = softmax_ce_gpu.cross_entropy(x, t)
    with byte_count.ByteCounter() as one:
        loss.backward()
    launch = _only(one, "_scale_grad_kernel")
    assert len(one.launches) == 1
    assert launch.bytes(x.grad) == (0, 0)
    # each program reads the upstream gradient (one scalar) and decides on the device
    assert sum(r.bytes_read for r in launch.regions.values()) == N * x.element_size()
    assert sum(r.bytes_written for r in launch.regions.values()) == 0

    y = x.detach().clone().requires_grad_(True)
    loss = softmax_ce_gpu.cross_entropy(y, t) * 3.0
    with byte_count.ByteCounter() as three:
        loss.backward()
    launch = _only(three, "_scale_grad_kernel")
    ones = torch.ones(N, V, dtype=torch.int64)
    assert torch.equal(launch.counts(y.grad, "r"), ones)
    assert torch.equal(launch.counts(y.grad, "w"), ones)


def test_ignored_rows_read_none_of_their_logits(own_scale):
    dtype, V = torch.float32, 4100
    x, t, w = _inputs(dtype, V, weight=True)
    t[:] = -100
    t[0] = 5
    x.requires_grad_(True)
    with byte_count.ByteCounter() as bc:
        loss = softmax_ce_gpu.cross_entropy(x, t, w, reduction="none", **ALL_OPTIONS)
        torch.autograd.grad(loss, x, torch.ones(N, dtype=dtype))
    assert [launch.kernel for launch in bc.launches] == _scale_launches(own_scale) + [
        "_cross_entropy_fwd_kernel", "_cross_entropy_bwd_kernel"]
    for launch in bc.launches[-2:]:
        reads = launch.counts(x.detach(), "r")
        assert not reads[1:].any(), launch.kernel
        assert reads[0].all(), launch.kernel


# (dtype, V, segment) of the single-pass path: K = 5 segments, the last 4 columns wide
# (fp32), or K = 4, the last 232 wide (bf16)
SINGLE_CASES = [(torch.float32, 4100, 1024), (torch.bfloat16, 1000, 256)]


@pytest.mark.parametrize("dtype,V,segment", SINGLE_CASES)
@pytest.mark.parametrize("options", [{}, ALL_OPTIONS], ids=["plain", "all-options"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "into-the-logits"])
def test_single_pass_reads_each_logit_once_and_writes_each_gradient_once(
        dtype, V, segment, options, inplace):
    """The single-pass path: under the interpreter its two launches (publish, finish)
    together read each logit of a non-ignored row exactly once (the target logit too: it
    comes from the registers), all in the first launch, and write each gradient element
    exactly once, all in the second: so in place, no logit is read after its row's
    exchange. The exchange's scratch moves O(K) words a row, counted exactly."""
    x, t, w = _inputs(dtype, V, weight=bool(options))
    with tuning.use_fused_path("single", segment=segment), byte_count.ByteCounter() as bc:
        _, grad = softmax_ce_gpu.cross_entropy_with_grad(x, t, w, out=x if inplace else None,
                                                         **options)
    launches = bc.launches_of("_cross_entropy_single_kernel")
    assert len(launches) == 2  # besides the reduction's own small launches
    publish, finish = launches
    _no_stray_accesses(bc)
    for other in bc.launches:  # those touch no logit and no gradient
        if other.kernel != "_cross_entropy_single_kernel":
            assert other.bytes(x) == (0, 0) and other.bytes(grad) == (0, 0), other.kernel
    assert (grad.data_ptr() == x.data_ptr()) == inplace

    valid = t != -100
    once = torch.zeros(N, V, dtype=torch.int64)
    once[valid] = 1
    assert torch.equal(publish.counts(x, "r"), once)
    assert not publish.counts(grad, "w").any()
    assert not finish.counts(x, "r").any()
    assert torch.equal(finish.counts(grad, "w"), torch.ones(N, V, dtype=torch.int64))

    # the exchange: K segments a row, NUM_FIELDS fp32 partials each; atomics read and write
    K = -(-V // segment)
    fields = 4 if options else 2
    n_valid = int(valid.sum())
    scratch = [g for g in publish.counted() if "part_ptr" in g.names]
    assert len(scratch) == 1
    tickets, counters = 4 * N * K, 4 * n_valid * K
    assert scratch[0].bytes_written == 4 * n_valid * K * fields + tickets + counters
    assert scratch[0].bytes_read == tickets + counters
    done = [g for g in finish.counted() if "part_ptr" in g.names][0]
    assert (done.bytes_read, done.bytes_written) == (4 * n_valid * K * K * fields, 0)
    # the carry between the two launches is the interpreter's alone, and not in the totals
    for launch in launches:
        carry = [g for g in launch.regions.values() if g.names == ["carry_ptr"]]
        assert len(carry) == 1 and launch.interpreter_only() != (0, 0)
        assert carry[0] not in launch.counted()


def _big(rec, x):
    return rec.larger_than(x.numel() * x.element_size() // 2)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace_backward"])
def test_host_code_allocates_no_n_by_v_temporary(reduction, inplace):
    """Forward + backward allocate one N x V tensor, the gradient itself, and none with
    inplace_backward. The logits are an intermediate result here, as in a model (the
    gradient then flows on, not into a leaf's .grad)."""
    dtype, V = torch.bfloat16, 1000
    leaf, t, _ = _inputs(dtype, V)
    leaf.requires_grad_(True)
    x = leaf * 1.0
    with byte_count.AllocationRecorder() as rec:
        loss = softmax_ce_gpu.cross_entropy(x, t, reduction=reduction, inplace_backward=inplace)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    big = _big(rec, x)
    if inplace:
        assert big == [], big
        assert grad.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    else:
        assert len(big) == 1 and big[0][1] == (N, V), big
    # and nothing else of more than O(N + V) bytes
    small = [a for a in rec.allocations if a not in big]
    assert all(a[3] <= 8 * (N + V) for a in small), small


def test_bytes_table_matches_the_budget():
    """The table printed by `softmax-ce-bench inspect --bytes`, in units of b bytes per logit."""
    V = 1000
    segment = 256  # the single-pass path's rows in K = 4 segments
    rows = {r["path"]: r for r in byte_count.path_table("bfloat16", N=3, V=V, segment=segment)}
    b = 2
    scalars = 64 / V  # per-row scalars (class id, loss, max, log d, S, scale): < 64 bytes a row
    K = -(-V // segment)
    # the single-pass exchange: per segment 2 partials written, K x 2 read, and 4-byte atomics
    # on the ticket and the row's counter, each a read and a write
    exchange = (4 * 2 * K * (1 + K) + 16 * K) / V
    single = {
        "single-pass fused: forward (loss + gradient)": (1, 1),
        "single-pass fused: backward, upstream gradient 1": (0, 0),
        "single-pass fused, inplace_backward: forward": (1, 1),
    }
    for path, (r, w) in single.items():
        row = rows[path]
        assert r * b <= row["read"] <= r * b + scalars + exchange, (path, row)
        assert w * b <= row["written"] <= w * b + scalars + exchange, (path, row)
        assert row["distinct"] <= (r + w) * b + 2 * (scalars + exchange), (path, row)
    for path in ("single-pass fused: forward (loss + gradient)",
                 "single-pass fused, inplace_backward: forward"):
        assert rows[path]["interpreter_only"] > 0  # the carry, reported, not counted
    assert rows["single-pass fused: forward (loss + gradient)"]["nxv_allocations"] == 1
    assert rows["single-pass fused, inplace_backward: forward"]["nxv_allocations"] == 0
    assert rows["fused: forward (loss + gradient)"]["interpreter_only"] == 0
    expected = {
        "forward only (no gradient needed)": (1, 0),
        "fused: forward (loss + gradient)": (2, 1),
        "fused: backward, upstream gradient 1": (0, 0),
        "fused: backward, upstream gradient != 1": (1, 1),
        "fused, inplace_backward: forward": (2, 1),
        "backward-time (reduction='none'): forward": (1, 0),
        "backward-time (reduction='none'): backward": (1, 1),
    }  # path: (read, written) per logit, in elements
    for path, (r, w) in expected.items():
        row = rows[path]
        assert r * b <= row["read"] <= r * b + scalars, (path, row)
        assert w * b <= row["written"] <= w * b + scalars, (path, row)
    # the fused forward's second read is of a row just read: counted once, its DRAM floor
    # is one read and one write, the 4 bytes per logit of DESIGN.md section 3
    assert rows["fused: forward (loss + gradient)"]["distinct"] <= 2 * b + scalars
    assert rows["fused: forward (loss + gradient)"]["nxv_allocations"] == 1
    assert rows["fused, inplace_backward: forward"]["nxv_allocations"] == 0


@pytest.mark.parametrize("dtype,V", CASES)
def test_statistics_add_no_read_of_the_logits(dtype, V):
    """return_stats=True: the same reads of the logits as without (once forward only, twice
    in a row for the fused gradient); only 12 more bytes per row written (lse, entropy,
    correct)."""
    x, t, _ = _inputs(dtype, V)
    with byte_count.ByteCounter() as plain:
        softmax_ce_gpu.cross_entropy(x, t)
    with byte_count.ByteCounter() as stats:
        softmax_ce_gpu.cross_entropy(x, t, return_stats=True)
    a, b = _only(plain, "_cross_entropy_fwd_kernel"), _only(stats, "_cross_entropy_fwd_kernel")
    assert torch.equal(a.counts(x, "r"), b.counts(x, "r"))
    _assert_reads(b.counts(x, "r"), t, 1)
    written = [sum(r.bytes_written for r in k.regions.values()) for k in (a, b)]
    assert written[1] - written[0] == 3 * 4 * N
    xg = x.clone().requires_grad_(True)
    with byte_count.ByteCounter() as fused:
        softmax_ce_gpu.cross_entropy(xg, t, return_stats=True)
    _assert_reads(_only(fused, "_cross_entropy_fwd_kernel").counts(xg.detach(), "r"), t, 2)
