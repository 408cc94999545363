"""linear_cross_entropy and LinearCrossEntropyLoss under torch.compile (fullgraph, no graph
break), torch.export, opcheck and CUDA graphs.

The chunk loops are custom ops (softmax_ce_gpu/_linear_ops.py); the autograd Function around
them is traced by dynamo. Compiled values and gradients are compared with eager's, and no
N x V tensor appears under compile either: not among the compiled graphs' values, and not
among the allocations of the compiled code as it runs (test_linear's allocation probe).
"""

import pytest
import torch
from conftest import DEVICE
from helpers import OpRecorder, assert_close, head_inputs, model_grads
from torch._dynamo.backends.common import aot_autograd
from torch.utils._pytree import tree_leaves

import softmax_ce_gpu as sc
from softmax_ce_gpu import _linear_ops

BACKENDS = ["aot_eager", "inductor"]


class LinearHead(torch.nn.Module):
    """A projection feeding linear_cross_entropy three ways: the module (class ids, every
    option, several chunks), the function with 'none' (the late path), and probabilities
    with the default chunk rule."""

    def __init__(self, H=8, V=40):
        super().__init__()
        self.proj = torch.nn.Linear(H, H)
        self.crit = sc.LinearCrossEntropyLoss(H, V, bias=True, label_smoothing=0.1, z_loss=1e-3,
                                              softcap=20.0, chunk_size=4)
        self.head = torch.nn.Linear(H, V, bias=False)

    def forward(self, h, t, p):
        z = torch.tanh(self.proj(h))
        out = self.crit(z, t)
        out = out + sc.linear_cross_entropy(z, self.head.weight, t, reduction="none",
                                            ignore_index=3, chunk_size=4).sum()
        out = out + sc.linear_cross_entropy(z, self.head.weight, p, reduction="sum")
        return out


def _inputs(N=6, H=8, V=40):
    return head_inputs(N, H, V, DEVICE)


def test_no_graph_break():
    torch._dynamo.reset()
    model = LinearHead().to(DEVICE)
    explained = torch._dynamo.explain(model)(*_inputs())
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_matches_eager(backend):
    torch._dynamo.reset()
    model = LinearHead().to(DEVICE)
    args = _inputs()
    ref, ref_grads = model_grads(model, model, *args)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    out, grads = model_grads(model, compiled, *args)
    assert_close(out, ref, torch.float32)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, torch.float32)


def _case(kind):
    """(loss function, leaves that get gradients, other arguments, dtype) of one path."""
    N, H, V = 5, 8, 30
    dtype = torch.float16 if kind == "fp16-late" else torch.float32
    x = torch.randn(N, H, device=DEVICE).to(dtype).requires_grad_()
    if kind == "k-dim-heads":
        lw = torch.randn(V, 2, 3, H, device=DEVICE, requires_grad=True)
        lb = torch.randn(V, 2, 3, device=DEVICE, requires_grad=True)
        t = torch.randint(0, V, (N, 2, 3), device=DEVICE)
        t[0, 1, 2] = -100
        return (lambda x, lw, lb, t: sc.linear_cross_entropy(x, lw, t, linear_bias=lb,
                                                             reduction="sum", chunk_size=2),
                [x, lw, lb], [t], dtype)
    lw = (torch.randn(V, H, device=DEVICE) / 3).to(dtype)
    t = torch.randint(0, V, (N,), device=DEVICE)
    if kind == "prob-target-stats":  # the target's gradient, and the statistics
        lw.requires_grad_()
        p = torch.rand(N, V, device=DEVICE).softmax(1).requires_grad_()

        def f(x, lw, p):
            loss, stats = sc.linear_cross_entropy(x, lw, p, label_smoothing=0.1, chunk_size=2,
                                                  return_stats=True)
            return loss + 0.0 * stats.entropy.sum() + stats.lse.sum().detach() * 0.0

        return f, [x, lw, p], [], dtype
    if kind == "frozen-weight":  # only the input gets a gradient
        w = torch.rand(V, device=DEVICE) + 0.5
        return (lambda x, t: sc.linear_cross_entropy(x, lw, t, weight=w, label_smoothing=0.1,
                                                     chunk_size=2),
                [x], [t], dtype)
    # fp16 'mean': the gradient is made in backward (the late path), with an upstream scale
    lw.requires_grad_()
    return (lambda x, lw, t: sc.linear_cross_entropy(x, lw, t, z_loss=1e-3, chunk_size=2) * 64.0,
            [x, lw], [t], dtype)


@pytest.mark.parametrize("kind", ["fp16-late", "k-dim-heads", "frozen-weight",
                                  "prob-target-stats"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_paths(backend, kind):
    torch._dynamo.reset()
    f, leaves, others, dtype = _case(kind)
    ref = f(*leaves, *others)
    ref.backward()
    ref_grads = [a.grad.clone() for a in leaves]
    for a in leaves:
        a.grad = None
    out = torch.compile(f, backend=backend, fullgraph=True)(*leaves, *others)
    out.backward()
    assert_close(out, ref, dtype)
    for a, r in zip(leaves, ref_grads):
        assert_close(a.grad, r, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_dynamic_shapes(backend):
    """dynamic=True: the number of rows is symbolic (the default chunk is chosen at run time,
    inside the op); under torch.no_grad only the loss is made."""
    torch._dynamo.reset()
    H, V = 8, 30

    def f(x, lw, t, ls):
        return sc.linear_cross_entropy(x, lw, t, label_smoothing=ls, z_loss=1e-3)

    compiled = torch.compile(f, backend=backend, fullgraph=True, dynamic=True)
    lw = torch.randn(V, H, device=DEVICE, requires_grad=True)
    for N, ls in ((5, 0.1), (7, 0.2)):
        x = torch.randn(N, H, device=DEVICE, requires_grad=True)
        t = torch.randint(0, V, (N,), device=DEVICE)
        ref = f(x, lw, t, ls)
        ref_grads = torch.autograd.grad(ref, (x, lw))
        out = compiled(x, lw, t, ls)
        grads = torch.autograd.grad(out, (x, lw))
        assert_close(out, ref, torch.float32)
        for g, r in zip(grads, ref_grads):
            assert_close(g, r, torch.float32)
        with torch.no_grad():
            loss = compiled(x, lw, t, ls)
        assert not loss.requires_grad
        assert_close(loss, ref, torch.float32)


def _capturing_backend():
    """aot_eager that keeps the forward and backward graphs and the compiled callable."""
    seen = {"graphs": []}

    def keep(gm, example_inputs):
        seen["graphs"].append(gm)
        return gm

    def backend(gm, example_inputs):
        seen["compiled"] = aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, example_inputs)
        return seen["compiled"]

    return backend, seen


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_never_makes_n_by_v(reduction):
    """The compiled forward and backward graphs hold no tensor of N x V elements (their fake
    values), and neither does the compiled code as it runs: the allocation probe of
    test_linear, around the callable that dynamo made. (A dispatch mode around the
    torch.compile'd function itself would make dynamo skip the frame, so the probe wraps
    what it would run, once compiled and warmed up.)"""
    N, H, V, chunk = 8, 4, 200, 3
    x = torch.randn(N, H, device=DEVICE, requires_grad=True)
    lw = torch.randn(V, H, device=DEVICE, requires_grad=True)
    lb = torch.randn(V, device=DEVICE, requires_grad=True)
    t = torch.randint(0, V, (N,), device=DEVICE)
    t[::3] = -100

    def f(x, lw, lb, t):
        return sc.linear_cross_entropy(x, lw, t, linear_bias=lb, reduction=reduction,
                                       label_smoothing=0.1, z_loss=1e-3, softcap=5.0,
                                       chunk_size=chunk)

    torch._dynamo.reset()
    backend, seen = _capturing_backend()
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    compiled(x, lw, lb, t).sum().backward()  # compiles the forward and the backward
    assert len(seen["graphs"]) == 2
    n_by_v = N * V * x.element_size()
    for gm in seen["graphs"]:
        sizes = [(v.numel() * v.element_size(), node.name) for node in gm.graph.nodes
                 for v in tree_leaves(node.meta.get("val")) if isinstance(v, torch.Tensor)]
        assert max(sizes)[0] < n_by_v, sorted(sizes, reverse=True)[:5]
    grads = [a.grad.clone() for a in (x, lw, lb)]
    for a in (x, lw, lb):
        a.grad = None
    with OpRecorder() as rec:
        (loss,) = seen["compiled"](x, lw, lb, t)
        loss.sum().backward()
    biggest = max(size for _, size in rec.ops)
    assert biggest < n_by_v, sorted(rec.ops, key=lambda o: -o[1])[:5]
    assert biggest == V * H * x.element_size()  # the weight and its gradient
    names = [name for name, _ in rec.ops]
    assert "softmax_ce_gpu.linear_cross_entropy_fwd" in names
    assert any(size == chunk * V * x.element_size() for _, size in rec.ops)  # it saw inside
    for a, g in zip((x, lw, lb), grads):
        assert_close(a.grad, g, torch.float32)


def test_export():
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
            self.crit = sc.LinearCrossEntropyLoss(8, 24, bias=True, z_loss=1e-3, chunk_size=3)

        def forward(self, h, t):
            z = self.proj(h)
            return (self.crit(z, t),
                    sc.linear_cross_entropy(z, self.crit.linear.weight, t, reduction="none",
                                            label_smoothing=0.1))

    model = Head().to(DEVICE)
    h = torch.randn(5, 8, device=DEVICE)
    t = torch.randint(0, 24, (5,), device=DEVICE)
    exported = torch.export.export(model, (h, t))
    ops = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert sum("softmax_ce_gpu.linear_cross_entropy_fwd" in o for o in ops) == 2, ops
    for a, b in zip(exported.module()(h, t), model(h, t)):
        assert_close(a, b, torch.float32)


def _lce_args(N=5, H=6, V=30, D=1, dtype=torch.float32, prob=False, bias=True):
    x = torch.randn(N, H, device=DEVICE, dtype=dtype)
    lw = torch.randn((V, H) if D == 1 else (V, D, H), device=DEVICE, dtype=dtype)
    lb = torch.randn(lw.shape[:-1], device=DEVICE, dtype=dtype) if bias else None
    if prob:
        t = torch.rand(N, V * D, device=DEVICE).softmax(1).to(dtype)
    else:
        t = torch.randint(0, V, (N, D) if D > 1 else (N,), device=DEVICE)
    w = None if prob else torch.rand(V, device=DEVICE, dtype=dtype) + 0.5
    return x, lw, lb, t, w


@pytest.mark.parametrize("case", [
    dict(),
    dict(D=2, label_smoothing=0.1),
    dict(prob=True, z_loss=1e-3, softcap=5.0, bias=False),
    dict(dtype=torch.bfloat16, label_smoothing=0.1, z_loss=1e-3),
], ids=["plain", "two-heads-smoothing", "prob-zloss-softcap", "bf16"])
def test_opcheck_linear_ops(case):
    case = dict(case)
    D, prob = case.pop("D", 1), case.pop("prob", False)
    x, lw, lb, t, w = _lce_args(D=D, dtype=case.pop("dtype", torch.float32), prob=prob,
                                bias=case.pop("bias", True))
    opts = (-100, case.get("label_smoothing", 0.0), case.get("z_loss", 0.0), case.get("softcap"))
    scale = torch.tensor(0.25, device=DEVICE)
    need_b = lb is not None
    # (chunk, need input/weight/bias/target, with_stats); the target's gradient only for
    # probabilities
    for chunk, need, with_stats in ((2, (True, True, need_b, prob), False),
                                    (None, (False, False, False, False), True),
                                    (3, (False, True, False, prob), True)):
        torch.library.opcheck(_linear_ops.linear_cross_entropy_fwd,
                              (x, lw, lb, t, w, scale, D, prob, chunk, *need, with_stats, *opts))
    stats = _linear_ops.linear_cross_entropy_fwd(x, lw, lb, t, w, scale, D, prob, 2,
                                                 False, False, False, False, False, *opts)[0]
    for dloss in (torch.rand(x.shape[0], D, device=DEVICE), torch.tensor(2.0, device=DEVICE)):
        torch.library.opcheck(_linear_ops.linear_cross_entropy_bwd,
                              (x, lw, lb, t, w, stats, dloss, scale, D, prob, 2, True, True,
                               need_b, prob, *opts))
    torch.library.opcheck(_linear_ops.scale_flat_,
                          (torch.randn(3, 7000, device=DEVICE, dtype=x.dtype),
                           torch.tensor(0.5, device=DEVICE)))


# ----------------------------------------------------------------------------- CUDA graphs


def _capture(step):
    """Warm step up on a side stream (the kernels compile there), then capture it."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (CUDA graph capture)")
@pytest.mark.parametrize("entry", ["function", "module"])
def test_cuda_graph_capture_and_replay(entry):
    """A training step of linear_cross_entropy ('none', the late path, several chunks) and of
    LinearCrossEntropyLoss ('mean', the fused path, the default chunk rule) captured once and
    replayed on new inputs: loss and gradients as eager's."""
    N, H, V = 64, 32, 1000
    torch.manual_seed(0)
    if entry == "module":
        model = sc.LinearCrossEntropyLoss(H, V, bias=True, label_smoothing=0.1, z_loss=1e-4,
                                          device=DEVICE, dtype=torch.bfloat16)

        def loss_of(h, t):
            return model(h, t)
    else:
        model = torch.nn.Linear(H, V, device=DEVICE, dtype=torch.bfloat16)

        def loss_of(h, t):
            return sc.linear_cross_entropy(h, model.weight, t, linear_bias=model.bias,
                                           reduction="none", softcap=30.0, chunk_size=24).sum()
    params = list(model.parameters())

    def new_inputs():
        h = torch.randn(N, H, device=DEVICE, dtype=torch.bfloat16)
        t = torch.randint(0, V, (N,), device=DEVICE)
        t[::5] = -100
        return h, t

    static_h, static_t = new_inputs()

    def step():
        for p in params:
            p.grad = None
        loss = loss_of(static_h, static_t)
        loss.backward()
        return loss

    graph, loss = _capture(step)
    static_grads = [p.grad for p in params]
    for _ in range(2):
        h, t = new_inputs()
        static_h.copy_(h)
        static_t.copy_(t)
        graph.replay()
        out, grads = loss.clone(), [g.clone() for g in static_grads]
        for p in params:
            p.grad = None
        ref = loss_of(h, t)
        ref.backward()
        assert_close(out, ref, torch.bfloat16)
        for g, p in zip(grads, params):
            assert_close(g, p.grad, torch.bfloat16)
