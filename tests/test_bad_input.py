"""Every kind of bad input: TypeError or ValueError naming the function, argument and value."""

import pytest
import torch
from conftest import DEVICE

import softmax_ce_gpu as sc


def inputs(N=4, V=10, dtype=torch.float32):
    x = torch.randn(N, V, device=DEVICE, dtype=dtype)
    t = torch.randint(0, V, (N,), device=DEVICE)
    return x, t


BAD_CALLS = [
    # (description, kwargs overriding the good call, exception, words the message must hold)
    ("integer logits", dict(logits=torch.ones(4, 10, dtype=torch.int64)), TypeError,
     ["'input'", "torch.int64"]),
    ("logits not a tensor", dict(logits=[[1.0, 2.0]]), TypeError, ["'input'", "list"]),
    ("0-d logits", dict(logits=torch.tensor(1.0)), ValueError, ["'input'", "()"]),
    ("empty class dim", dict(logits=torch.randn(4, 0), target=torch.zeros(4, dtype=torch.long)),
     ValueError, ["'input'", "(4, 0)"]),
    ("float class ids of the wrong shape", dict(target=torch.rand(4)), ValueError,
     ["'target'", "(4,)"]),
    ("bool target", dict(target=torch.ones(4, dtype=torch.bool)), TypeError,
     ["'target'", "torch.bool"]),
    ("target not a tensor", dict(target=[1, 2, 3, 4]), TypeError, ["'target'", "list"]),
    ("batch mismatch", dict(target=torch.zeros(3, dtype=torch.long)), ValueError,
     ["'target'", "(3,)", "(4,)"]),
    ("probabilities of the wrong shape", dict(target=torch.rand(4, 9)), ValueError,
     ["'target'", "(4, 9)"]),
    ("ignore_index with probabilities", dict(target=torch.rand(4, 10), ignore_index=0),
     ValueError, ["'ignore_index'", "0"]),
    ("class id too large", dict(target=torch.tensor([0, 1, 10, 2])), ValueError,
     ["'target'", "10", "[0, 10)"]),
    ("negative class id", dict(target=torch.tensor([0, -3, 1, 2])), ValueError,
     ["'target'", "-3"]),
    ("weight of the wrong length", dict(weight=torch.rand(9)), ValueError, ["'weight'", "(9,)"]),
    ("2-d weight", dict(weight=torch.rand(1, 10)), ValueError, ["'weight'", "(1, 10)"]),
    ("integer weight", dict(weight=torch.ones(10, dtype=torch.int64)), TypeError,
     ["'weight'", "torch.int64"]),
    ("integer-valued probabilities", dict(target=torch.ones(4, 10, dtype=torch.float64).int()),
     ValueError, ["'target'", "(4, 10)"]),
    ("ignore_index beyond int64", dict(ignore_index=2 ** 63), ValueError,
     ["'ignore_index'", str(2 ** 63)]),
    ("softcap a string", dict(softcap="30"), TypeError, ["'softcap'", "'30'"]),
    ("z_loss NaN", dict(z_loss=float("nan")), ValueError, ["'z_loss'", "nan"]),
    ("z_loss infinite", dict(z_loss=float("inf")), ValueError, ["'z_loss'", "inf"]),
    # an int beyond any float escaped as a bare OverflowError (adversarial pass 2)
    ("z_loss an int beyond floats", dict(z_loss=10 ** 400), ValueError, ["'z_loss'", "finite"]),
    ("softcap an int beyond floats", dict(softcap=10 ** 400), ValueError,
     ["'softcap'", "finite"]),
    ("label_smoothing an int beyond floats", dict(label_smoothing=-(10 ** 400)), ValueError,
     ["'label_smoothing'", "finite"]),
    ("complex logits", dict(logits=torch.ones(4, 10, dtype=torch.complex64)), TypeError,
     ["'input'", "torch.complex64"]),
    ("weight not a tensor", dict(weight=[1.0] * 10), TypeError, ["'weight'", "list"]),
    ("unknown reduction", dict(reduction="avg"), ValueError, ["'reduction'", "'avg'"]),
    ("reduction not a string", dict(reduction=None), ValueError, ["'reduction'", "None"]),
    ("label_smoothing above 1", dict(label_smoothing=1.5), ValueError,
     ["'label_smoothing'", "1.5"]),
    ("negative label_smoothing", dict(label_smoothing=-0.1), ValueError,
     ["'label_smoothing'", "-0.1"]),
    ("label_smoothing NaN", dict(label_smoothing=float("nan")), ValueError,
     ["'label_smoothing'", "nan"]),
    ("label_smoothing a string", dict(label_smoothing="0.1"), TypeError,
     ["'label_smoothing'", "'0.1'"]),
    ("softcap zero", dict(softcap=0.0), ValueError, ["'softcap'", "0.0"]),
    ("negative softcap", dict(softcap=-30.0), ValueError, ["'softcap'", "-30.0"]),
    ("infinite softcap", dict(softcap=float("inf")), ValueError, ["'softcap'", "inf"]),
    ("negative z_loss", dict(z_loss=-1e-4), ValueError, ["'z_loss'", "-0.0001"]),
    ("z_loss a tensor", dict(z_loss=torch.tensor(1e-4)), TypeError, ["'z_loss'"]),
    ("ignore_index a float", dict(ignore_index=-100.0), TypeError, ["'ignore_index'", "-100.0"]),
    ("ignore_index a bool", dict(ignore_index=True), TypeError, ["'ignore_index'", "True"]),
]


def _call(fn, overrides):
    x, t = inputs()
    kwargs = dict(logits=x, target=t)
    kwargs.update(overrides)
    # tensors built in the table live on the CPU: move them to the test device
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and k != "logits":
            kwargs[k] = v.to(DEVICE)
    logits, target = kwargs.pop("logits"), kwargs.pop("target")
    if isinstance(logits, torch.Tensor):
        logits = logits.to(DEVICE)
    return fn(logits, target, **kwargs)


@pytest.mark.parametrize("fn", [sc.cross_entropy, sc.cross_entropy_with_grad],
                         ids=["cross_entropy", "cross_entropy_with_grad"])
@pytest.mark.parametrize("desc,overrides,exc,words", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_is_refused_with_a_clear_message(fn, desc, overrides, exc, words):
    if DEVICE == "cuda" and desc in ("class id too large", "negative class id"):
        pytest.skip("on CUDA the class-id range is a device-side assert (test_class_range_cuda)")
    with pytest.raises(exc) as info:
        _call(fn, overrides)
    msg = str(info.value)
    assert msg.startswith(fn.__name__ + ":"), msg
    for word in words:
        assert word in msg, (word, msg)


def test_device_mismatch():
    x, t = inputs()
    meta_t = t.to("meta")
    with pytest.raises(ValueError, match=r"cross_entropy: argument 'target' is on meta"):
        sc.cross_entropy(x, meta_t)
    with pytest.raises(ValueError, match=r"argument 'weight' is on meta"):
        sc.cross_entropy(x, t, torch.rand(10, device="meta"))


def test_bad_inplace_flag_and_out():
    x, t = inputs()
    with pytest.raises(TypeError, match="cross_entropy: argument 'inplace_backward' must be a bool"):
        sc.cross_entropy(x, t, inplace_backward=1)
    with pytest.raises(TypeError, match="'out' must have dtype torch.float32, got torch.float16"):
        sc.cross_entropy_with_grad(x, t, out=x.half())
    with pytest.raises(ValueError, match=r"'out' must have shape \(4, 10\)"):
        sc.cross_entropy_with_grad(x, t, out=x[:3])
    with pytest.raises(TypeError, match="'out' must be a torch.Tensor or None, got list"):
        sc.cross_entropy_with_grad(x, t, out=[])


def test_gradients_we_do_not_compute_are_refused():
    x, t = inputs()
    with pytest.raises(ValueError, match="gradient with respect to 'weight' is not supported"):
        sc.cross_entropy(x, t, torch.rand(10, device=DEVICE, requires_grad=True))


def test_module_checks_options_at_construction():
    with pytest.raises(ValueError, match="CrossEntropyLoss: argument 'reduction'"):
        sc.CrossEntropyLoss(reduction="mena")
    with pytest.raises(ValueError, match="CrossEntropyLoss: argument 'softcap'"):
        sc.CrossEntropyLoss(softcap=0)
    with pytest.raises(TypeError, match="CrossEntropyLoss: argument 'weight'"):
        sc.CrossEntropyLoss(weight=[1.0, 2.0])


def test_bad_input_writes_nothing():
    """A refused call leaves the caller's tensors as they were (checks run before any kernel)."""
    x, t = inputs()
    x0 = x.clone()
    with pytest.raises(ValueError):
        sc.cross_entropy_with_grad(x, t, label_smoothing=2.0, out=x)
    assert torch.equal(x, x0)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (device-side assert)")
def test_class_range_cuda():
    import subprocess
    import sys
    script = ("import torch, softmax_ce_gpu as sc\n"
              "x = torch.randn(4, 10, device='cuda')\n"
              "t = torch.tensor([0, 1, 10, 2], device='cuda')\n"
              "sc.cross_entropy(x, t)\n"
              "torch.cuda.synchronize()\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0
    assert "outside [0, 10)" in run.stderr or "device-side assert" in run.stderr, run.stderr


@pytest.mark.parametrize("name,valid,bad,exc", [
    ("ignore_index", 1, True, TypeError),
    ("ignore_index", 1, 1.0, TypeError),
    ("label_smoothing", 1.0, True, TypeError),
    ("label_smoothing", 0.0, float("nan"), ValueError),
    ("z_loss", 0, False, TypeError),
    ("softcap", 1.0, True, TypeError),
    ("reduction", "sum", "SUM", ValueError),
])
def test_options_valid_once_do_not_vouch_for_an_equal_value(name, valid, bad, exc):
    """Valid options are looked up on later calls (_checks.check_options): a value equal to
    a valid one but of another type (True == 1 == 1.0) is still refused, every time."""
    x = torch.randn(4, 8, device=DEVICE)
    t = torch.randint(0, 8, (4,), device=DEVICE)
    sc.cross_entropy(x, t, **{name: valid})
    for _ in range(2):
        with pytest.raises(exc, match=f"cross_entropy: argument '{name}'"):
            sc.cross_entropy(x, t, **{name: bad})
