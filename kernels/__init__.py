"""Device code of softmax_ce_gpu: Triton kernels and their launchers.

Installed as ``softmax_ce_gpu.kernels``. It imports torch and triton, never
softmax_ce_gpu, and never loads under any other name, so that the top-level
``kernels/`` folder of a checkout is never imported twice.

Imported by its folder name (``import kernels`` from a checkout's root, where the
folder is on sys.path: Hugging Face transformers probes for its own ``kernels``
package that way at import time) it stays an empty package: no submodule can be
imported through it, any attribute raises an AttributeError that says why, and a
probe finds no version, so transformers concludes that its ``kernels`` is absent.
"""

if __name__ != "softmax_ce_gpu.kernels":
    __path__ = []  # nothing under this name: kernels.cross_entropy is not importable
    _WRONG_NAME = ("the kernels package must be imported as softmax_ce_gpu.kernels, "
                   f"not as {__name__!r}; install the project (pip install -e .)")

    def __getattr__(name):
        raise AttributeError(f"{_WRONG_NAME} (asked for {name!r})")
else:
    from . import _compat, tuning  # noqa: F401  (_compat: interpreter fix-ups for old triton)
    from ._compat import INTERPRETER
    from .cross_entropy import (
        _flags,
        cross_entropy_bwd,
        cross_entropy_fwd as _two_sweep_fwd,
        scale_grad,
    )
    from .cross_entropy_single import cross_entropy_single_fwd
    from .reduction import loss_reduce, loss_scale
    from .softmax import softmax_bwd, softmax_fwd

    import functools

    @functools.lru_cache(maxsize=None)
    def _sm_count(index):
        import torch

        return torch.cuda.get_device_properties(index).multi_processor_count

    def _resident_programs(device):
        """The most programs a row may be split into: half the SMs. Every compiled kernel
        fits two programs per SM, so up to four launches at once keep the single-pass
        kernel's forward-progress guarantee (kernels/cross_entropy_single.py)."""
        if device.type == "cuda":
            import torch

            index = device.index if device.index is not None else torch.cuda.current_device()
            return max(1, _sm_count(index) // 2)
        return None  # the interpreter: the single path's exchange runs as two launches

    def cross_entropy_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss,
                          softcap, grad=None, grad_scale=None, stats=None, with_stats=False,
                          dtarget=None, own_scale=None):
        """The forward launcher (kernels/cross_entropy.py's contract). With ``grad`` (the
        fused loss + gradient) it runs the path tuning.fused_path picks: the single-pass
        kernel of kernels/cross_entropy_single.py, or the two-sweep kernel, which also
        takes every call with per-row statistics (with_stats) or a target gradient. The
        single-pass kernel does not make its own scale: with own_scale, loss_scale's launch
        makes it first."""
        if (grad is not None and not with_stats and dtarget is None
                and tuning.single_requested()):
            flags = _flags(target, weight, label_smoothing, z_loss, softcap)
            if tuning.fused_path(logits.shape[1], logits.element_size(), flags,
                                 _resident_programs(logits.device)) == "single":
                if own_scale is not None:
                    loss_scale(target, weight, ignore_index=ignore_index, mean=own_scale,
                               prob=flags["PROB_TARGET"], V=logits.shape[1], out=grad_scale)
                return cross_entropy_single_fwd(
                    logits, target, weight, ignore_index=ignore_index,
                    label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, grad=grad,
                    grad_scale=grad_scale, stats=stats)
        return _two_sweep_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss,
                              softcap, grad, grad_scale, stats, with_stats, dtarget, own_scale)

    __all__ = ["INTERPRETER", "cross_entropy_fwd", "cross_entropy_single_fwd",
               "cross_entropy_bwd", "scale_grad", "loss_scale", "loss_reduce", "softmax_fwd",
               "softmax_bwd", "tuning"]
