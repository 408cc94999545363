"""Plain eager mode: when the library may skip torch's generic machinery.

torch.compile, torch.export, torch.func transforms and dispatch modes (fake tensors,
allocation probes) need the custom ops of _ops.py and autograd.Function.apply. A plain
eager call needs neither: the custom op would run the same implementation after tens of
microseconds of dispatch, and Function.apply binds its arguments with inspect on every
call before it reaches the C++ apply. For small shapes that host time is the cost of the
call (softmax-ce-bench overhead measures it).
"""

import torch

# bound once: each attribute lookup of a dotted name costs host time on every call
_Tensor = torch.Tensor
_is_compiling = torch.compiler.is_compiling  # the function torch.compile folds to True
_transforms_active = torch._C._are_functorch_transforms_active
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_dispatch_stack_len = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 0)


def eager(t):
    """Whether a call on tensor t is plain eager: no tracing or compiling, no torch.func
    transform, no dispatch mode, and t a plain tensor (not fake, functional or wrapped)."""
    return (type(t) is _Tensor and not _is_compiling() and not _transforms_active()
            and _dispatch_stack_len() == 0 and not _is_wrapped(t))


_forward_ad = torch.autograd.forward_ad


def no_forward_ad():
    """Whether no forward-mode AD level is active (torch.autograd.forward_ad.dual_level):
    outside one no tensor carries a tangent (a torch without the level counter: never)."""
    return getattr(_forward_ad, "_current_level", 0) < 0


def apply(function, *args):
    """function.apply(*args), positional arguments only; in plain eager mode through the
    C++ apply directly (what Function.apply ends in once it has bound the arguments)."""
    if eager(args[0]):
        return torch._C._FunctionBase.__dict__["apply"].__get__(None, function)(*args)
    return function.apply(*args)
