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
"""

import functools

import triton

# bytes of logits one program holds per chunk
_CHUNK_BYTES = 16384
# smallest chunk: one 16-byte vector per thread of one warp
_MIN_BLOCK = 16


@functools.lru_cache(maxsize=4096)  # a pure function of its arguments, asked on every launch
def row_config(V: int, element_size: int, heavy: bool = False, stats: bool = False) -> tuple:
    """(BLOCK_V, num_warps) for a row-wise sweep over V elements of the given size.

    heavy: the kernel carries options that add per-element work (see above); stats: it also
    keeps the per-row statistics' lane state (the entropy's sum, the argmax and its column:
    three more registers per element), which halves the chunk once more.
    """
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
