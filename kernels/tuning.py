"""The one place where launch configurations are chosen.

Every launcher asks here for (BLOCK_V, num_warps). The rule: a row is swept in
chunks of BLOCK_V elements; a chunk of 16 KiB (8192 bf16/fp16 values, 4096
fp32) gives each thread of 8-16 warps several 16-byte loads in flight without
spilling, and rows narrower than that use one chunk of the next power of two.

These values are a starting point chosen from first principles; the GPU
sweep of bench/ (issue "prove it on the GPU") is where they are to be tuned,
and only this table changes when they are.
"""

import triton

# bytes of logits one program holds per chunk
_CHUNK_BYTES = 16384
# smallest chunk: one 16-byte vector per thread of one warp
_MIN_BLOCK = 16


def row_config(V: int, element_size: int) -> tuple:
    """(BLOCK_V, num_warps) for a row-wise sweep over V elements of the given size."""
    cap = max(_MIN_BLOCK, _CHUNK_BYTES // element_size)
    block = max(_MIN_BLOCK, min(triton.next_power_of_2(V), cap))
    if block <= 1024:
        num_warps = 4
    elif block <= 4096:
        num_warps = 8
    else:
        num_warps = 16
    return block, num_warps
