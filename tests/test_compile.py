"""The public ops under torch.compile (fullgraph, no graph break), torch.export, opcheck
and CUDA graphs.

Each launch step is a torch.library custom op (softmax_ce_gpu/_ops.py) with a fake
implementation; the autograd Functions around them are traced by dynamo.
"""

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close, head_inputs, model_grads

import softmax_ce_gpu as sc
from softmax_ce_gpu import _ops


class TinyLM(torch.nn.Module):
    """A linear head feeding each public op: the losses and the activations."""

    def __init__(self, H=16, V=40):
        super().__init__()
        self.head = torch.nn.Linear(H, V)
        self.crit = sc.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-3, softcap=20.0)

    def forward(self, h, t, p):
        logits = self.head(h)
        out = self.crit(logits, t)
        out = out + sc.cross_entropy(logits, t, reduction="none", ignore_index=3).sum()
        out = out + sc.cross_entropy(self.head(h), p, reduction="sum")
        out = out + sc.cross_entropy(self.head(h) * 1.0, t, inplace_backward=True)
        out = out + (sc.softmax(logits, dim=-1) * p).sum()
        out = out + (sc.log_softmax(logits, dim=0) * p).sum()
        return out


def _inputs(N=6, H=16, V=40):
    return head_inputs(N, H, V, DEVICE)


def test_no_graph_break():
    model = TinyLM().to(DEVICE)
    explained = torch._dynamo.explain(model)(*_inputs())
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_matches_eager(backend):
    torch._dynamo.reset()
    model = TinyLM().to(DEVICE)
    args = _inputs()
    ref, ref_grads = model_grads(model, model, *args)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    out, grads = model_grads(model, compiled, *args)
    assert_close(out, ref, torch.float32)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, torch.float32)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_dynamic_shapes_and_float_options(backend):
    """dynamic=True: shapes and Python floats (label_smoothing, z_loss, softcap) are symbolic;
    the option checks must not call math functions on them."""
    torch._dynamo.reset()

    def f(x, t, ls, zl, cap):
        return sc.cross_entropy(x, t, label_smoothing=ls, z_loss=zl, softcap=cap)

    compiled = torch.compile(f, backend=backend, fullgraph=True, dynamic=True)
    for N, V, ls in ((5, 30, 0.1), (7, 33, 0.2)):
        x = torch.randn(N, V, device=DEVICE)
        t = torch.randint(0, V, (N,), device=DEVICE)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out = compiled(xa, t, ls, 1e-3, 20.0)
        ref = f(xb, t, ls, 1e-3, 20.0)
        out.backward()
        ref.backward()
        assert_close(out, ref, torch.float32)
        assert_close(xa.grad, xb.grad, torch.float32)


def test_with_grad_compiles():
    torch._dynamo.reset()
    x = torch.randn(5, 30, device=DEVICE)
    t = torch.randint(0, 30, (5,), device=DEVICE)

    def f(x, t):
        return sc.cross_entropy_with_grad(x, t, label_smoothing=0.1)

    loss, grad = torch.compile(f, backend="aot_eager", fullgraph=True)(x, t)
    ref_loss, ref_grad = f(x, t)
    assert_close(loss, ref_loss, torch.float32)
    assert_close(grad, ref_grad, torch.float32)


def test_export():
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 24)

        def forward(self, h, t):
            logits = self.lin(h)
            return sc.cross_entropy(logits, t, z_loss=1e-3), sc.log_softmax(logits)

    model = Head().to(DEVICE)
    h = torch.randn(4, 8, device=DEVICE)
    t = torch.randint(0, 24, (4,), device=DEVICE)
    exported = torch.export.export(model, (h, t))
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any("softmax_ce_gpu.cross_entropy_forward" in o for o in ops), ops
    assert any("softmax_ce_gpu.softmax_fwd" in o for o in ops), ops
    for a, b in zip(exported.module()(h, t), model(h, t)):
        assert_close(a, b, torch.float32)


def _ce_args(N=5, V=37, dtype=torch.float32, prob=False):
    x = torch.randn(N, V, device=DEVICE, dtype=dtype)
    t = (torch.rand(N, V, device=DEVICE).softmax(1).to(dtype) if prob
         else torch.randint(0, V, (N,), device=DEVICE))
    w = torch.rand(V, device=DEVICE, dtype=dtype) + 0.5
    scale = torch.tensor(0.25, device=DEVICE)
    return x, t, w, scale


@pytest.mark.parametrize("case", [
    dict(),
    dict(weight=True, label_smoothing=0.1),
    dict(prob=True, z_loss=1e-3, softcap=5.0),
    dict(dtype=torch.bfloat16, weight=True, z_loss=1e-3),
], ids=["plain", "weight-smoothing", "prob-zloss-softcap", "bf16"])
def test_opcheck_cross_entropy_ops(case):
    case = dict(case)
    x, t, w, scale = _ce_args(dtype=case.pop("dtype", torch.float32), prob=case.pop("prob", False))
    w = w if case.pop("weight", False) else None
    opts = (-100, case.get("label_smoothing", 0.0), case.get("z_loss", 0.0), case.get("softcap"))
    prob = t.is_floating_point()
    fn = "cross_entropy"
    for reduction in ("mean", "sum", "none"):
        fwd = (x, t, w, -100, reduction, *opts[1:], torch.float32, False, fn)
        for with_grad, with_stats in ((False, False), (True, False), (True, True)):
            torch.library.opcheck(_ops.cross_entropy_forward,
                                  fwd[:-2] + (with_stats, fn, with_grad, prob))
        torch.library.opcheck(_ops.cross_entropy_forward_out, fwd + (torch.empty_like(x),))
        torch.library.opcheck(_ops.cross_entropy_forward_inplace,
                              (x.clone(),) + fwd[1:] + (prob,))
    _, stats, _, _, _ = _ops.cross_entropy_forward(x, t, w, -100, "sum", *opts[1:], x.dtype,
                                                   False, fn, False, False)
    dloss = torch.rand(x.shape[0], device=DEVICE, dtype=x.dtype)
    bwd_args = (t, w, stats, dloss, scale, *opts)
    torch.library.opcheck(_ops.cross_entropy_bwd, (x, *bwd_args, True, prob))
    torch.library.opcheck(_ops.cross_entropy_bwd_inplace, (x.clone(), *bwd_args, prob))
    torch.library.opcheck(_ops.scale_grad_, (x.clone(), torch.tensor(0.5, device=DEVICE)))
    for mean in (False, True):
        torch.library.opcheck(_ops.loss_scale, (x, t, w, x.shape[1], -100, mean, prob,
                                                "cross_entropy"))
        rows = torch.rand(x.shape[0], device=DEVICE)
        torch.library.opcheck(_ops.loss_reduce, (rows, torch.tensor([1 / 3, 3.0], device=DEVICE),
                                                 mean, x.dtype))


def test_opcheck_softmax_ops():
    x = torch.randn(3, 50, 2, device=DEVICE)
    for log in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            xd = x.to(dtype)
            torch.library.opcheck(_ops.softmax_fwd, (xd, log, torch.float32))
            y = _ops.softmax_fwd(xd, log, torch.float32)
            torch.library.opcheck(_ops.softmax_bwd, (y, torch.randn_like(y), log, dtype))


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (CUDA graph capture)")
def test_cuda_graph_capture_and_replay():
    model = TinyLM().to(DEVICE)
    h, t, p = _inputs()
    static = [h.clone(), t.clone(), p.clone()]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up: compile the kernels outside the capture
        for _ in range(2):
            model.zero_grad(set_to_none=False)
            model(*static).backward()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        loss = model(*static)
        loss.backward()
    for _ in range(2):
        new = _inputs()
        for buf, val in zip(static, new):
            buf.copy_(val)
        model.zero_grad(set_to_none=False)
        graph.replay()
        out, grads = loss.clone(), [q.grad.clone() for q in model.parameters()]
        ref, ref_grads = model_grads(model, model, *new)
        assert_close(out, ref, torch.float32)
        for g, r in zip(grads, ref_grads):
            assert_close(g, r, torch.float32)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (CUDA graph capture)")
@pytest.mark.parametrize("into", ["new", "out"])
def test_cuda_graph_cross_entropy_with_grad(into):
    """cross_entropy_with_grad captured once (its gradient a new tensor, or written into a
    caller's buffer) and replayed on new inputs: loss and gradient as eager's."""
    N, V = 64, 1000

    def new_inputs():
        x = torch.randn(N, V, device=DEVICE, dtype=torch.bfloat16)
        t = torch.randint(0, V, (N,), device=DEVICE)
        t[::5] = -100
        return x, t

    static_x, static_t = new_inputs()
    out = torch.empty_like(static_x) if into == "out" else None

    def step():
        return sc.cross_entropy_with_grad(static_x, static_t, label_smoothing=0.1, z_loss=1e-4,
                                          out=out)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up: compile the kernels outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, grad = step()
    for _ in range(2):
        x, t = new_inputs()
        static_x.copy_(x)
        static_t.copy_(t)
        graph.replay()
        ref_loss, ref_grad = sc.cross_entropy_with_grad(x, t, label_smoothing=0.1, z_loss=1e-4)
        assert_close(loss, ref_loss, torch.bfloat16)
        assert_close(grad, ref_grad, torch.bfloat16)
