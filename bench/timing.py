"""Timing: triton.testing.do_bench on a GPU, time.perf_counter on the CPU; the copy bandwidth.

Both timers return (median, p20, p80) in milliseconds and call the same hook between
repetitions, outside the timed region: BetweenReps drops what the previous repetition
returned (outputs and gradients) and copies pristine values back into inputs that the
provider overwrites (in-place gradients). On the GPU the hook rides on do_bench's
grad_to_none: for each object in that list do_bench runs `obj.grad = None` before every
timed repetition, before it flushes L2 and records the start event; BetweenReps is such
an object, so the restore copy is neither timed nor left in L2 for the timed run.
do_bench's own warm-up runs skip the hook: there an in-place provider reads its last
gradient instead of logits, which is harmless for warm-up and never timed.
"""

import time

import torch

QUANTILES = (0.5, 0.2, 0.8)


class BetweenReps:
    """The hook run before each timed repetition (see the module docstring).

    runner: an object whose `held` attribute keeps the last repetition's results.
    restore: (destination, pristine source) tensor pairs copied before each repetition.
    """

    def __init__(self, runner, restore=()):
        self.runner = runner
        self.restore = list(restore)

    @property
    def grad(self):
        return None

    @grad.setter
    def grad(self, _value):
        self.runner.held = None
        with torch.no_grad():
            for dst, src in self.restore:
                dst.copy_(src)

    def __call__(self):
        self.grad = None


def time_cuda(step, between, warmup_ms=25, rep_ms=100):
    """(median, p20, p80) ms of step() on the GPU: CUDA events around each repetition."""
    from triton.testing import do_bench

    between()
    ms, p20, p80 = do_bench(step, warmup=warmup_ms, rep=rep_ms, grad_to_none=[between],
                            quantiles=list(QUANTILES))
    return ms, p20, p80


def time_cpu(step, between, warmup_ms=25, rep_ms=100, min_reps=3, max_reps=200):
    """(median, p20, p80) ms of step() on the CPU by time.perf_counter, after warmup_ms of calls.

    At least one warm-up call and min_reps timed ones, however slow (the interpreter is).
    """
    deadline = time.perf_counter() + warmup_ms / 1e3
    for k in range(max_reps):
        if k >= 1 and time.perf_counter() > deadline:
            break
        between()
        step()
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() < deadline):
        between()
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    q = torch.quantile(torch.tensor(times, dtype=torch.float64),
                       torch.tensor(QUANTILES, dtype=torch.float64))
    return tuple(float(t) for t in q)


def copy_bandwidth_gbps(device, nbytes=None, warmup_ms=25, rep_ms=100):
    """GB/s of a large device-to-device copy, bytes = 2 * size (one read, one write).

    GPU: 2 GiB with do_bench, far beyond L2. CPU: 64 MiB with perf_counter.
    """
    if nbytes is None:
        nbytes = 2 << 30 if device == "cuda" else 64 << 20
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)

    class _Nothing:
        held = None

    between = BetweenReps(_Nothing())
    if device == "cuda":
        ms = time_cuda(lambda: dst.copy_(src), between, warmup_ms, rep_ms)[0]
    else:
        ms = time_cpu(lambda: dst.copy_(src), between, warmup_ms, rep_ms)[0]
    return 2 * nbytes / (ms * 1e-3) / 1e9
