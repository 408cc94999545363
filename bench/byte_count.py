"""Bytes each kernel launch reads and writes, counted under Triton's interpreter.

Method: while a ``ByteCounter`` is active, two hooks are installed in
``triton.runtime.interpreter`` (the same names on triton 3.6 and 3.9):

- ``GridExecutor.__call__`` (one call per launch ``kernel[grid](...)``): before
  the launch runs, every tensor argument's storage (start address, size, the
  argument names that point into it) is registered under a new ``Launch``.
- ``interpreter_builder.create_masked_load`` / ``create_masked_store``: every
  ``tl.load`` / ``tl.store`` of every program goes through these two builder
  methods (unmasked ones too: ``create_load``/``create_store`` call them with an
  all-true mask). The hook takes the pointer block and the mask, keeps the
  addresses of the active lanes, and credits ``element size`` bytes to the
  storage each address falls in, with a per-byte-offset access count. Masked-off
  lanes move no memory on the GPU and are not counted.

- ``create_atomic_rmw`` / ``create_atomic_cas``: each active lane of an atomic counts
  as one element read and one element written (the single-pass kernel's tickets and
  row counters; a GPU does them in L2).

So the counts are those of the kernel's own memory instructions, lane by lane,
not an estimate; what they cannot see is caching: a second read of a row is
counted again even when the GPU serves it from L2 (``Launch.trace`` keeps the
order of accesses per program, from which reuse distances follow).

The interpreter hands CPU tensors to the kernel without copying them (their
storage is already on the host), so the addresses are the caller's.
``AllocationRecorder`` is the host-side counterpart: a TorchDispatchMode that
records every tensor an aten op creates on new storage, with its size.

The single-pass kernel (kernels/cross_entropy_single.py) runs under the interpreter as
two launches, and the registers a program keeps across its wait are carried from the
first to the second through a buffer that only the interpreter uses (its argument
``carry_ptr``). Its storage is listed in INTERPRETER_ONLY: the totals leave it out and
report it on its own (``interpreter_only``), because the compiled single-launch kernel
has no such buffer (its SASS, in softmax-ce-bench inspect, loads each segment once).

Everything here needs TRITON_INTERPRET=1 set before softmax_ce_gpu is imported.
"""

import contextlib
import dataclasses
import inspect
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode


@dataclasses.dataclass
class Region:
    """One storage a launch was given: [start, start + nbytes), and the arguments in it."""

    start: int
    nbytes: int
    names: List[str]
    reads: np.ndarray   # per byte offset: number of element loads starting there
    writes: np.ndarray  # per byte offset: number of element stores starting there
    bytes_read: int = 0
    bytes_written: int = 0
    itemsize: int = 0   # element size of the accesses (one per storage in these kernels)

    def distinct_bytes(self):
        """(bytes read, bytes written) counting each element once: the DRAM floor of the
        launch if every repeated access were served from cache."""
        return (int(np.count_nonzero(self.reads)) * self.itemsize,
                int(np.count_nonzero(self.writes)) * self.itemsize)


@dataclasses.dataclass
class Launch:
    """One kernel launch: its name, grid, the storages it was handed, and (optionally) its trace.

    trace: (program id, 'r' | 'w', region start, byte offsets, element size), in the order
    the interpreter ran them (programs one after another).
    """

    kernel: str
    grid: Tuple[int, ...]
    regions: Dict[int, Region]
    trace: Optional[list]
    unattributed: int = 0  # bytes at addresses outside every argument (must stay 0)

    def counted(self):
        """The regions that stand for GPU memory traffic (all but INTERPRETER_ONLY ones)."""
        return [g for g in self.regions.values() if not set(g.names) <= INTERPRETER_ONLY]

    def interpreter_only(self):
        """(bytes read, bytes written) of the INTERPRETER_ONLY regions."""
        sel = [g for g in self.regions.values() if set(g.names) <= INTERPRETER_ONLY]
        return sum(g.bytes_read for g in sel), sum(g.bytes_written for g in sel)

    def region_of(self, tensor):
        return self.regions.get(tensor.untyped_storage().data_ptr())

    def bytes(self, tensor):
        """(bytes read, bytes written) of ``tensor``'s storage during this launch."""
        r = self.region_of(tensor)
        return (0, 0) if r is None else (r.bytes_read, r.bytes_written)

    def counts(self, tensor, kind="r"):
        """Per-element access counts of ``tensor`` (its shape; int64), loads 'r' or stores 'w'."""
        r = self.region_of(tensor)
        if r is None:
            return torch.zeros(tensor.shape, dtype=torch.int64)
        per_byte = torch.from_numpy((r.reads if kind == "r" else r.writes).astype(np.int64))
        b = tensor.element_size()
        first = tensor.storage_offset() * b
        return per_byte.as_strided(tensor.shape, [s * b for s in tensor.stride()], first).clone()


# kernel arguments that exist only in the interpreter's stand-in for a GPU kernel
INTERPRETER_ONLY = frozenset({"carry_ptr"})


def _element_size(ptrs):
    return ptrs.get_element_ty().primitive_bitwidth // 8


class ByteCounter:
    """Context manager: every launch run under the interpreter while active, with its bytes.

    Usage::

        with ByteCounter() as bc:
            loss = softmax_ce_gpu.cross_entropy(x, t)
        bc.launches[0].bytes(x)      # (read, written)
    """

    def __init__(self, trace=False):
        self.trace = trace
        self.launches: List[Launch] = []
        self._current: Optional[Launch] = None
        self._stack = None

    # -- hooks ---------------------------------------------------------------------------

    def _account(self, ptrs, mask, kind):
        launch = self._current
        if launch is None:
            return
        addrs = np.asarray(ptrs.data).reshape(-1)
        if mask is not None:
            m = np.broadcast_to(np.asarray(mask.data), np.shape(ptrs.data)).reshape(-1)
            addrs = addrs[m]
        if addrs.size == 0:
            return
        size = _element_size(ptrs)
        addrs = addrs.astype(np.uint64)
        seen = np.zeros(addrs.shape, dtype=bool)
        from triton.runtime import interpreter

        pid = tuple(interpreter.interpreter_builder.grid_idx)
        for region in launch.regions.values():
            inside = (addrs >= region.start) & (addrs < region.start + region.nbytes)
            if not inside.any():
                continue
            seen |= inside
            region.itemsize = region.itemsize or size
            offs = (addrs[inside] - np.uint64(region.start)).astype(np.int64)
            hist = np.bincount(offs, minlength=region.nbytes)[: region.nbytes]
            if kind == "r":
                region.reads += hist.astype(region.reads.dtype)
                region.bytes_read += int(offs.size) * size
            else:
                region.writes += hist.astype(region.writes.dtype)
                region.bytes_written += int(offs.size) * size
            if launch.trace is not None:
                launch.trace.append((pid, kind, region.start, offs, size))
        launch.unattributed += int((~seen).sum()) * size

    def _account_atomic(self, ptrs, mask):
        self._account(ptrs, mask, "r")
        self._account(ptrs, mask, "w")

    def _begin(self, executor, args, kwargs):
        fn = executor.fn
        params = inspect.signature(fn).parameters
        bound = inspect.signature(fn).bind_partial(
            *args, **{k: v for k, v in kwargs.items() if k in params})
        regions: Dict[int, Region] = {}
        for name, value in bound.arguments.items():
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                start = storage.data_ptr()
                if start not in regions:
                    n = storage.nbytes()
                    regions[start] = Region(start, n, [], np.zeros(n, np.int32),
                                            np.zeros(n, np.int32))
                regions[start].names.append(name)
        grid = executor.grid if isinstance(executor.grid, tuple) else tuple(executor.grid)
        self._current = Launch(fn.__name__, grid, regions, [] if self.trace else None)
        self.launches.append(self._current)

    def __enter__(self):
        from triton.runtime import interpreter

        if not hasattr(interpreter, "interpreter_builder"):
            raise RuntimeError("ByteCounter needs triton.runtime.interpreter.interpreter_builder")
        builder = interpreter.interpreter_builder
        executor_cls = interpreter.GridExecutor
        original_call = executor_cls.__call__
        original_load = builder.create_masked_load
        original_store = builder.create_masked_store
        original_rmw = builder.create_atomic_rmw
        original_cas = builder.create_atomic_cas
        counter = self

        def call(executor, *args, **kwargs):
            counter._begin(executor, args, kwargs)
            try:
                return original_call(executor, *args, **kwargs)
            finally:
                counter._current = None

        def load(ptrs, mask, *rest, **kw):
            counter._account(ptrs, mask, "r")
            return original_load(ptrs, mask, *rest, **kw)

        def store(ptrs, value, mask, *rest, **kw):
            counter._account(ptrs, mask, "w")
            return original_store(ptrs, value, mask, *rest, **kw)

        def rmw(op, ptrs, value, mask, *rest, **kw):
            counter._account_atomic(ptrs, mask)
            return original_rmw(op, ptrs, value, mask, *rest, **kw)

        def cas(ptrs, cmp, value, *rest, **kw):
            counter._account_atomic(ptrs, None)
            return original_cas(ptrs, cmp, value, *rest, **kw)

        stack = contextlib.ExitStack()
        executor_cls.__call__ = call
        stack.callback(setattr, executor_cls, "__call__", original_call)
        builder.create_masked_load = load
        stack.callback(vars(builder).pop, "create_masked_load", None)
        builder.create_masked_store = store
        stack.callback(vars(builder).pop, "create_masked_store", None)
        builder.create_atomic_rmw = rmw
        stack.callback(vars(builder).pop, "create_atomic_rmw", None)
        builder.create_atomic_cas = cas
        stack.callback(vars(builder).pop, "create_atomic_cas", None)
        self._stack = stack
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False

    # -- summaries -----------------------------------------------------------------------

    def launches_of(self, kernel):
        return [launch for launch in self.launches if launch.kernel == kernel]

    def total(self, tensor):
        """(bytes read, bytes written) of ``tensor``'s storage over all launches."""
        r = w = 0
        for launch in self.launches:
            a, b = launch.bytes(tensor)
            r, w = r + a, w + b
        return r, w

    def total_bytes(self):
        """(bytes read, bytes written) of all storages but INTERPRETER_ONLY ones, over all
        launches."""
        r = sum(g.bytes_read for launch in self.launches for g in launch.counted())
        w = sum(g.bytes_written for launch in self.launches for g in launch.counted())
        return r, w

    def interpreter_only_total(self):
        """(bytes read, bytes written) of the INTERPRETER_ONLY storages over all launches."""
        pairs = [launch.interpreter_only() for launch in self.launches]
        return sum(p[0] for p in pairs), sum(p[1] for p in pairs)

    def distinct_total(self):
        """Sum over launches of the bytes of distinct elements read and written (all
        storages but INTERPRETER_ONLY ones)."""
        return sum(sum(g.distinct_bytes()) for launch in self.launches
                   for g in launch.counted())


class AllocationRecorder(TorchDispatchMode):
    """Records (op, shape, dtype, bytes) of every tensor an aten op creates on fresh storage.

    An output counts as an allocation when its storage is none of the op's input
    storages (views, in-place ops and out= variants allocate nothing).
    """

    def __init__(self):
        super().__init__()
        self.allocations = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = set()
        for a in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(a, torch.Tensor):
                inputs.add(a.untyped_storage().data_ptr())
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor):
                storage = o.untyped_storage()
                if storage.data_ptr() not in inputs and storage.nbytes() > 0:
                    self.allocations.append((str(func), tuple(o.shape), o.dtype, storage.nbytes()))
        return out

    def larger_than(self, nbytes):
        return [a for a in self.allocations if a[3] > nbytes]


# ----------------------------------------------------------------------------- the table


def _measure(fn, N, V, b):
    """Run fn() under a ByteCounter and an AllocationRecorder; bytes per logit and N x V allocs."""
    with ByteCounter() as bc, AllocationRecorder() as rec:
        fn()
    read, written = bc.total_bytes()
    n = N * V
    return dict(read=read / n, written=written / n, total=(read + written) / n,
                distinct=bc.distinct_total() / n,
                interpreter_only=sum(bc.interpreter_only_total()) / n,
                passes=(read + written) / (n * b),
                nxv_allocations=len(rec.larger_than(n * b // 2)),
                launches=[launch.kernel for launch in bc.launches])


def _eager_rows(b):
    """torch eager F.cross_entropy, counted by hand from PyTorch's CUDA kernels (not measured).

    forward = log_softmax (one sweep for the max, one for the sum of exponentials, one
    reading again to write log p: 3 reads, 1 write of the (N, V) log-probabilities,
    which autograd keeps) + nll_loss (N gathered values). backward = nll_loss_backward
    (zero-fills an (N, V) gradient: 1 write, then N scattered values) +
    log_softmax_backward (one sweep summing the incoming gradient, one reading it and
    log p to write the result: 3 reads, 1 write). Shared-memory and online-softmax
    variants, where torch picks them, save up to one read in each direction.
    """
    rows = [("torch eager: forward (analytic)", 3, 1, 1),
            ("torch eager: backward (analytic)", 3, 2, 2),
            ("torch eager: forward + backward (analytic)", 6, 3, 3)]
    return [dict(path=p, read=r * b, written=w * b, total=(r + w) * b, distinct=None,
                 interpreter_only=None, passes=float(r + w),
                 nxv_allocations=a, launches=None) for p, r, w, a in rows]


def path_table(dtype="bfloat16", N=2, V=8320, seed=0, segment=None):
    """Bytes per logit (all tensors a path's launches touch, / (N V)) of every path.

    Runs softmax_ce_gpu.cross_entropy end to end under the interpreter: forward
    and backward of each gradient strategy, each measured on its own; the fused
    forward on each of its paths (kernels.tuning.use_fused_path), the single-pass one
    with the tuning table's segments (``segment``: columns per program instead).
    """
    import softmax_ce_gpu
    from softmax_ce_gpu.kernels import tuning

    kernels = sys.modules.get("softmax_ce_gpu.kernels")
    if kernels is None or not kernels.INTERPRETER:
        raise RuntimeError("path_table needs TRITON_INTERPRET=1 set before softmax_ce_gpu "
                           "is imported")
    torch.manual_seed(seed)
    dt = getattr(torch, dtype)
    b = torch.empty((), dtype=dt).element_size()
    target = torch.randint(0, V, (N,))
    ce = softmax_ce_gpu.cross_entropy

    def fresh():
        return torch.randn(N, V, dtype=dt).requires_grad_(True)

    rows = []

    def add(name, fn, path="two-sweep"):
        with tuning.use_fused_path(path, segment=segment if path == "single" else None):
            rows.append(dict(path=name, **_measure(fn, N, V, b)))

    x = fresh()
    add("forward only (no gradient needed)", lambda: ce(x.detach(), target))

    state = {}
    x = fresh()
    add("single-pass fused: forward (loss + gradient)",
        lambda: state.update(loss=ce(x, target)), "single")
    add("single-pass fused: backward, upstream gradient 1", lambda: state["loss"].backward())
    x = fresh()
    add("single-pass fused, inplace_backward: forward",
        lambda: state.update(loss=ce(x, target, inplace_backward=True)), "single")

    x = fresh()
    add("fused: forward (loss + gradient)", lambda: state.update(loss=ce(x, target)))
    add("fused: backward, upstream gradient 1", lambda: state["loss"].backward())
    x = fresh()
    state["loss"] = ce(x, target) * 2.0
    add("fused: backward, upstream gradient != 1", lambda: state["loss"].backward())
    x = fresh()
    x = fresh()
    add("fused, inplace_backward: forward",
        lambda: state.update(loss=ce(x, target, inplace_backward=True)))

    x = fresh()
    add("backward-time (reduction='none'): forward",
        lambda: state.update(loss=ce(x, target, reduction="none")))
    add("backward-time (reduction='none'): backward",
        lambda: torch.autograd.grad(state["loss"], x, torch.ones_like(state["loss"])))

    def total(name, parts):
        sel = [r for r in rows if r["path"] in parts]
        rows.append(dict(path=name, read=sum(r["read"] for r in sel),
                         written=sum(r["written"] for r in sel),
                         total=sum(r["total"] for r in sel),
                         distinct=sum(r["distinct"] for r in sel),
                         interpreter_only=sum(r["interpreter_only"] for r in sel),
                         passes=sum(r["passes"] for r in sel),
                         nxv_allocations=sum(r["nxv_allocations"] for r in sel), launches=None))

    total("single-pass fused step (forward + backward, gradient 1)",
          ("single-pass fused: forward (loss + gradient)",
           "single-pass fused: backward, upstream gradient 1"))
    total("fused step (forward + backward, gradient 1)",
          ("fused: forward (loss + gradient)", "fused: backward, upstream gradient 1"))
    total("backward-time step (forward + backward)",
          ("backward-time (reduction='none'): forward",
           "backward-time (reduction='none'): backward"))
    return rows + _eager_rows(b)


def _main(argv):
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m softmax_ce_gpu.bench.byte_count")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8320)
    args = p.parse_args(argv)
    sys.stdout.write(json.dumps(path_table(args.dtype, args.rows, args.vocab)))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
