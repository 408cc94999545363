"""torch.compile for the bench: a fresh compile per case, time-boxed on CPU.

On a GPU, inductor compiles Triton kernels in seconds. On a small CPU it builds C++
and takes longer than the whole CPU mode may (measured on the 2-core CI machine:
15-30 s for the first compile, 5-15 s for each further shape), so on CPU it is off
unless a time box is given (--compile-timeout S): before the first CPU compile we
compile a tiny cross entropy in a child process limited to S seconds; if that does
not finish, every torch_compile case of the run is skipped with the reason.
"""

import os
import signal
import subprocess
import sys
import time

from .op import ProviderUnavailable

_PROBE = """
import torch, torch.nn.functional as F
f = torch.compile(lambda x, t: F.cross_entropy(x, t), dynamic=False)
x = torch.randn(8, 64, requires_grad=True)
t = torch.randint(0, 64, (8,))
torch.autograd.grad(f(x, t), x)
"""

_cpu_probe = {}  # timeout -> None (compiles) or the reason it does not


def _probe_cpu_compile(timeout_s):
    if timeout_s in _cpu_probe:
        return _cpu_probe[timeout_s]
    start = time.perf_counter()
    # own session: inductor may start compile workers, and a timeout must end them too
    child = subprocess.Popen([sys.executable, "-c", _PROBE], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        reason = (f"torch.compile on CPU did not finish a tiny compile within {timeout_s:g} s "
                  "(--compile-timeout); skipped")
    else:
        if child.returncode == 0:
            reason = None
        else:
            last = err.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
            reason = f"torch.compile fails on this CPU: {last[0][:200]}"
    _cpu_probe[timeout_s] = reason
    if reason is None:
        print(f"torch.compile on CPU: probe compiled in {time.perf_counter() - start:.1f} s",
              file=sys.stderr, flush=True)
    return reason


def compile_for_case(fn, env):
    """torch.compile(fn), static shapes, with dynamo's caches reset so no recompile limit is hit."""
    import torch

    if env.device == "cpu":
        if env.compile_timeout_s <= 0:
            raise ProviderUnavailable(
                "torch.compile is off in the CPU mode by default: on a 2-core CPU its compiles "
                "(15-30 s cold) take longer than the rest of the run; --compile-timeout 60 "
                "tries it, time-boxed")
        reason = _probe_cpu_compile(env.compile_timeout_s)
        if reason is not None:
            raise ProviderUnavailable(reason)
        # no pool of compile workers: they would import torch in the background and slow
        # down the timing of the cases that follow on a 2-core machine
        import torch._inductor.config as inductor_config
        inductor_config.compile_threads = 1
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)
