"""The one place where launch configurations are chosen.

Every launcher asks here for (BLOCK_V, num_warps). The rule: a row is swept in
chunks of BLOCK_V elements; a chunk of 16 KiB (8192 bf16/fp16 values, 4096
fp32) gives each thread of 8-16 warps several 16-byte loads in flight without
spilling, and rows narrower than that use one chunk of the next power of two.

Two things halve the chunk (and so the warps, keeping 16 elements a thread):
options that add per-element work (class weights, label smoothing, probability
targets, z-loss, softcap), and rows that are not a multiple of 16 elements
(V = 50257), whose 2-byte accesses need more registers. At 16 warps a thread may
use 64 registers for two programs to fit on an SM (the latency of HBM needs about
two 16 KiB chunks in flight per SM); ptxas spilled those kernels at that budget
(softmax-ce-bench inspect), while at 8 warps the budget is 128.

These values are a starting point chosen from first principles; the GPU
sweep of bench/ (issue "prove it on the GPU") is where they are to be tuned,
and only this table changes when they are.

The fused forward (loss + gradient) has two paths, chosen here too (fused_path):

- "two-sweep" (kernels/cross_entropy.py): one program per row sweeps it twice, the
  second read served by L2 only while the rows in flight fit in it.
- "single" (kernels/cross_entropy_single.py): a row is split into K segments of
  SEGMENT columns held in registers by K programs, which exchange their partial
  statistics: each logit is read from HBM once. single_config gives (SEGMENT,
  num_warps): a thread holds ELEMENTS_PER_THREAD logits of its segment (16 bytes in
  one or more 16-byte loads), fewer when options keep more per element in registers
  (softcap: dz/dx; label smoothing, probability targets: the dense target a). K must
  not exceed the programs the device can hold at once (the kernel's forward-progress
  argument); the cap is half the SM count, every kernel fitting two programs per SM,
  which leaves room for up to four such launches at once.

The switch: the environment variable SOFTMAX_CE_GPU_FUSED_PATH = auto | single |
two-sweep, read at every call, or the context manager use_fused_path (tests, bench),
which wins over it. "auto" is the two-sweep path until a GPU run has shown the
single-launch kernel correct and faster (AUTO_SINGLE below); "single" falls back to
the two-sweep path only where the single path cannot run (K above the cap).
"""

import contextlib
import functools
import os

import triton

# bytes of logits one program holds per chunk
_CHUNK_BYTES = 16384
# smallest chunk: one 16-byte vector per thread of one warp
_MIN_BLOCK = 16


@functools.lru_cache(maxsize=4096)  # a pure function of its arguments
def _row_config_table(V: int, element_size: int, heavy: bool = False, stats: bool = False) -> tuple:
    """row_config's table (without the override of use_row_config)."""
    cap = max(_MIN_BLOCK, _CHUNK_BYTES // element_size)
    if heavy or V % 16:
        cap //= 2
    if stats:
        cap //= 2
    block = max(_MIN_BLOCK, min(triton.next_power_of_2(V), cap))
    if block <= 1024:
        num_warps = 4
    elif block <= 4096:
        num_warps = 8
    else:
        num_warps = 16
    return block, num_warps


_row_overrides = []  # stack of (BLOCK_V, num_warps) set by use_row_config


def row_config(V: int, element_size: int, heavy: bool = False, stats: bool = False) -> tuple:
    """(BLOCK_V, num_warps) for a row-wise sweep over V elements of the given size.

    heavy: the kernel carries options that add per-element work (see above); stats: it also
    keeps the per-row statistics' lane state (the entropy's sum, the argmax and its column:
    three more registers per element), which halves the chunk once more.
    Within use_row_config, its (BLOCK_V, num_warps) instead.
    """
    if _row_overrides:
        return _row_overrides[-1]
    return _row_config_table(V, element_size, heavy, stats)


def row_config_overridden() -> bool:
    """Whether use_row_config is in force (launchers then do not keep what they derive)."""
    return bool(_row_overrides)


@contextlib.contextmanager
def use_row_config(block, num_warps):
    """Within the block, every row-wise launch takes (block, num_warps) instead of the
    table's (bench/sweep.py times the candidates this way)."""
    if block < _MIN_BLOCK or block & (block - 1):
        raise ValueError(f"use_row_config: block must be a power of two >= {_MIN_BLOCK}, "
                         f"got {block}")
    _row_overrides.append((block, num_warps))
    try:
        yield
    finally:
        _row_overrides.pop()


# ----------------------------------------------------------------------------- fused path

FUSED_PATH_ENV = "SOFTMAX_CE_GPU_FUSED_PATH"
FUSED_PATHS = ("auto", "single", "two-sweep")
# what "auto" means: False = the two-sweep path, until the single-launch kernel has run
# on a GPU (bench/gpu_session.sh) and been measured correct and faster there
AUTO_SINGLE = False

# logits a thread of the single-pass kernel holds: with z alone (16 fp32 registers),
# or with z and dz/dx or a (softcap, dense targets: 2 or 3 x 8 registers); half of it
# when V is not a multiple of 16. ptxas (softmax-ce-bench inspect, sm_90, triton 3.9):
# 45 registers for plain bf16 at 16 warps (2 programs per SM, as on triton 3.6); with
# softcap or a dense target the launcher caps them at 64 (2 per SM), without spills
ELEMENTS_PER_THREAD = 16
ELEMENTS_PER_THREAD_HEAVY = 8
_MAX_WARPS = 16

_overrides = []  # stack of (path, segment, num_warps) set by use_fused_path


@contextlib.contextmanager
def use_fused_path(path, *, segment=None, num_warps=None):
    """Within the block, the fused forward takes ``path`` (one of FUSED_PATHS), whatever
    SOFTMAX_CE_GPU_FUSED_PATH says; segment / num_warps, when given, replace
    single_config's choice (a power of two >= 16; tests and bench/sweep.py use them)."""
    if path not in FUSED_PATHS:
        raise ValueError(f"use_fused_path: path must be one of {', '.join(FUSED_PATHS)}, "
                         f"got {path!r}")
    if segment is not None and (segment < 16 or segment & (segment - 1)):
        raise ValueError(f"use_fused_path: segment must be a power of two >= 16, got {segment}")
    _overrides.append((path, segment, num_warps))
    try:
        yield
    finally:
        _overrides.pop()


def _env_reader(name):
    """A function returning os.environ.get(name), read afresh at each call.

    On CPython's POSIX os.environ that is its own dict lookup, without the KeyError that
    os.environ.get raises and catches for an unset variable (2 us, on every fused call).
    """
    data = getattr(os.environ, "_data", None)
    encode = getattr(os.environ, "encodekey", None)
    decode = getattr(os.environ, "decodevalue", None)
    if os.name != "posix" or not isinstance(data, dict) or encode is None or decode is None:
        return lambda: os.environ.get(name)
    key = encode(name)

    def read():
        value = data.get(key)
        return None if value is None else decode(value)
    return read


_read_fused_path_env = _env_reader(FUSED_PATH_ENV)


def requested_fused_path() -> str:
    """The path asked for: use_fused_path's, else the environment variable's, else auto."""
    if _overrides:
        return _overrides[-1][0]
    path = _read_fused_path_env()
    if path is None:
        return "auto"
    path = path.strip().lower() or "auto"
    if path not in FUSED_PATHS:
        raise ValueError(f"{FUSED_PATH_ENV}={path!r}: expected one of {', '.join(FUSED_PATHS)}")
    return path


def single_requested() -> bool:
    """Whether the path asked for (requested_fused_path) is the single-pass one."""
    if not _overrides and _read_fused_path_env() is None:  # nothing asked for: "auto"
        return AUTO_SINGLE
    path = requested_fused_path()
    return path == "single" or (path == "auto" and AUTO_SINGLE)


def single_config(V: int, element_size: int, *, HAS_WEIGHT=False, PROB_TARGET=False,
                  HAS_SMOOTHING=False, HAS_Z_LOSS=False, HAS_SOFTCAP=False) -> tuple:
    """(SEGMENT, num_warps) of the single-pass kernel for rows of V elements.

    The keyword flags are the kernel's option constexprs (kernels.cross_entropy._flags).
    """
    segment = num_warps = None
    if _overrides:
        _, segment, num_warps = _overrides[-1]
    heavy = HAS_SOFTCAP or PROB_TARGET or HAS_SMOOTHING
    per_thread = ELEMENTS_PER_THREAD_HEAVY if heavy else ELEMENTS_PER_THREAD
    if V % 16:  # 2-byte accesses: an address per element, twice the registers (see above)
        per_thread //= 2
    if segment is None:
        segment = max(_MIN_BLOCK, min(triton.next_power_of_2(V), per_thread * 32 * _MAX_WARPS))
    if num_warps is None:
        num_warps = max(4, min(_MAX_WARPS, segment // (32 * per_thread)))
    return segment, num_warps


def fused_path(V: int, element_size: int, flags: dict, max_programs=None) -> str:
    """"single" or "two-sweep": the path of a fused forward over rows of V elements.

    flags: the kernel's option constexprs; max_programs: the programs the device can hold
    at once (None: no limit, as under the interpreter, which runs the exchange in two
    launches).
    """
    if not single_requested():
        return "two-sweep"
    segment, _ = single_config(V, element_size, **flags)
    if max_programs is not None and triton.cdiv(V, segment) > max_programs:
        return "two-sweep"
    return "single"
