"""A gated MLP's down projection given the two factors of its input, ``silu(gate) * up`` (CPU).

``fused.lora_gated_linear`` must compute what ``lora_linear`` computes on the product, keep gate and up
instead of the product, and fall back to the plain product where it does not apply. ``gated_mlp.attach``
routes transformers' Llama-style MLPs there under ``torch.compile`` only, and ``unload`` undoes it.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

import lorakit
from conftest import LLAMA_TARGETS, adapted_tiny_llama, llama_lora_grads, tiny_llama
from lorakit.adapters import fused, gated_mlp
from lorakit.adapters.fused import lora_gated_linear, reference_lora_linear

T, INNER, OUT, R = 40, 24, 12, 4


def routed(module: torch.nn.Module) -> bool:
    """Whether ``gated_mlp.attach`` routed ``module`` (its class is the routed subclass)."""
    return type(module) in gated_mlp._ORIGINAL


@pytest.fixture
def gated_passes(monkeypatch):
    """The backward passes that formed dA from a gate and an up (``silu=True``)."""
    calls = []
    original = fused._product_backward

    def counting(*args):
        if args[5:] and args[5]:
            calls.append(args[1].shape)
        return original(*args)

    monkeypatch.setattr(fused, "_product_backward", counting)
    return calls


def make_inputs(dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gate, up = (torch.randn(2, T // 2, INNER, generator=g, dtype=dtype) for _ in range(2))
    weight = torch.randn(OUT, INNER, generator=g, dtype=dtype) / INNER**0.5
    factor = torch.float64 if dtype == torch.float64 else torch.float32
    lora_a = torch.randn(R, INNER, generator=g, dtype=factor) / INNER**0.5
    lora_b = torch.randn(OUT, R, generator=g, dtype=factor)
    return gate, up, weight, lora_a, lora_b


def run(fn, inputs, train: str = "AB", **kwargs):
    """Output and the gradients of gate, up, A and B (None where not trained) of ``fn(gate, up, ...)``."""
    gate, up, weight, lora_a, lora_b = (t.clone() for t in inputs)
    gate.requires_grad_(True)
    up.requires_grad_(True)
    lora_a.requires_grad_("A" in train)
    lora_b.requires_grad_("B" in train)
    y = fn(gate, up, weight, None, lora_a, lora_b, 2.0, **kwargs)
    y.square().sum().backward()
    return [y.detach(), gate.grad, up.grad, lora_a.grad, lora_b.grad]


def assert_close(got: dict, want: dict, tol: float = 1e-5) -> None:
    """Every gradient within ``tol`` of the other run's, relative to its norm (some are exactly zero: B
    starts random and A at zero, so dB is zero on the first step)."""
    assert got.keys() == want.keys()
    for name, g in got.items():
        assert float((g - want[name]).norm()) <= tol * float(want[name].norm()) + 1e-12, name


def reference(gate, up, *args, **kwargs):
    return reference_lora_linear(F.silu(gate) * up, *args, **kwargs)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("strategy", ["merged", "addmm"])
@pytest.mark.parametrize("train", ["AB", "A"])
def test_matches_the_reference_and_forms_da_from_the_factors(dtype, tol, strategy, train, gated_passes):
    inputs = make_inputs(dtype)
    want = run(reference, inputs, train)
    got = run(lora_gated_linear, inputs, train, strategy=strategy)
    assert gated_passes == [torch.Size([T, INNER])]
    for name, g, w in zip(("y", "dgate", "dup", "dA", "dB"), got, want, strict=True):
        if w is None:
            assert g is None, name
            continue
        assert float((g - w).norm() / w.norm()) <= tol, name


def test_keeps_gate_and_up_not_their_product():
    gate, up, weight, lora_a, lora_b = make_inputs(torch.float64)
    gate.requires_grad_(True)
    up.requires_grad_(True)
    lora_a.requires_grad_(True)
    lora_b.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_gated_linear(gate, up, weight, None, lora_a, lora_b, 2.0)
    wide = [t for t in saved if t.shape[-1] == INNER and t.numel() == T * INNER]
    assert len(wide) == 2
    product = F.silu(gate) * up
    assert all(not torch.equal(t.reshape(product.shape), product) for t in wide)
    assert {t.data_ptr() for t in wide} == {gate.data_ptr(), up.data_ptr()}


@pytest.mark.parametrize(
    "case",
    ["train B only", "dropout", "no grad for the factors", "autocast"],
)
def test_falls_back_to_the_plain_product(case, gated_passes):
    """Where the rule does not apply, the layer runs on ``silu(gate) * up`` as ``lora_linear`` would."""
    inputs = make_inputs(torch.float32)
    kwargs = {"dropout_p": 0.3, "training": True} if case == "dropout" else {}
    train = "B" if case == "train B only" else "AB"

    def plain(gate, up, *args, **kw):
        return fused.lora_linear(F.silu(gate) * up, *args, **kw)

    def in_context(fn):
        def wrapped(gate, up, *args, **kw):
            if case == "no grad for the factors":
                gate, up = gate.detach(), up.detach()
            if case == "autocast":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return fn(gate, up, *args, **kw).float()
            return fn(gate, up, *args, **kw)

        return wrapped

    torch.manual_seed(5)
    want = run(in_context(plain), inputs, train, **kwargs)
    torch.manual_seed(5)
    got = run(in_context(lora_gated_linear), inputs, train, **kwargs)
    assert not gated_passes
    for g, w in zip(got, want, strict=True):
        assert (g is None and w is None) or torch.equal(g, w)


class GraphRecorder:
    """A ``torch.compile`` backend that keeps dynamo's graphs and runs them as they are. In the gated route
    the SiLU runs inside the layer's Function (a subgraph), so the top-level graphs call no ``silu``."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs) -> object:
        self.graphs.append(gm)
        return gm.forward

    def silu_calls(self) -> int:
        return sum(
            "silu" in str(n.target) for g in self.graphs for n in g.graph.nodes if n.op == "call_function"
        )


@pytest.mark.parametrize("train", ["AB", "B"])  # the fused route, and the fallback to lora_linear
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"strategy": "fast"}, "strategy must be one of"),
        ({"dropout_p": 1.5}, r"dropout_p must be in \[0, 1\)"),
    ],
)
def test_bad_options_name_the_function(train, kwargs, message):
    with pytest.raises(ValueError, match="lora_gated_linear: " + message):
        run(lora_gated_linear, make_inputs(torch.float32), train, **kwargs)


def test_compiles_fullgraph_and_matches_eager():
    inputs = make_inputs(torch.float32)
    eager = run(lora_gated_linear, inputs, strategy="merged")
    recorder = GraphRecorder()
    run(torch.compile(lora_gated_linear, fullgraph=True, backend=recorder), inputs, strategy="merged")
    assert len(recorder.graphs) == 1 and recorder.silu_calls() == 0
    torch._dynamo.reset()
    compiled = torch.compile(lora_gated_linear, fullgraph=True, backend="aot_eager")
    got = run(compiled, inputs, strategy="merged")
    for name, g, w in zip(("y", "dgate", "dup", "dA", "dB"), got, eager, strict=True):
        assert float((g - w).norm() / w.norm()) <= 1e-5, name


def test_compiled_llama_takes_the_route_with_eager_gradients(monkeypatch):
    """``inject`` attaches the route to each Llama MLP; under ``torch.compile`` every down projection takes
    gate and up (and only with ``gated_mlp.UNDER_COMPILE``), and the gradients match eager's."""
    model = adapted_tiny_llama()
    mlps = [m for m in model.modules() if type(m).__name__ == "LlamaMLP"]
    assert len(mlps) == 2 and all(gated_mlp.is_gated_mlp(m) and routed(m) for m in mlps)
    eager = llama_lora_grads(model)
    silu_calls = {}
    for under_compile in (False, True):
        monkeypatch.setattr(gated_mlp, "UNDER_COMPILE", under_compile)
        torch._dynamo.reset()
        recorder = GraphRecorder()
        llama_lora_grads(model, torch.compile(model, backend=recorder))
        silu_calls[under_compile] = recorder.silu_calls()
    assert silu_calls == {False: 2, True: 0}
    torch._dynamo.reset()
    compiled = llama_lora_grads(model, torch.compile(model, backend="aot_eager"))
    assert len(eager) == 2 * 7 * 2
    assert_close(compiled, eager)


def test_in_eager_when_asked(gated_passes, monkeypatch):
    model = adapted_tiny_llama()
    want = llama_lora_grads(model)
    assert not gated_passes  # eager keeps its own route by default (fused.RECOMPUTE_PRODUCT_INPUT)
    monkeypatch.setattr(gated_mlp, "IN_EAGER", True)
    got = llama_lora_grads(model)
    assert len(gated_passes) == 2
    assert_close(got, want)


def test_other_mlps_keep_their_forward():
    from transformers.models.llama.modeling_llama import LlamaMLP

    gelu = adapted_tiny_llama("gelu")
    assert not any(routed(m) for m in gelu.modules())
    model = adapted_tiny_llama()
    lorakit.unload(model)
    assert not any(routed(m) or "forward" in vars(m) for m in model.modules())
    mlp = next(m for m in model.modules() if type(m).__name__ == "LlamaMLP")
    assert type(mlp) is LlamaMLP
    assert not gated_mlp.is_gated_mlp(mlp)  # its down projection has no adapter any more


def test_an_attached_model_copies_and_pickles():
    model = adapted_tiny_llama()
    want = llama_lora_grads(model)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        mlps = [m for m in clone.modules() if type(m).__name__ == "LlamaMLP"]
        assert len(mlps) == 2 and all(routed(m) for m in mlps)
        assert_close(llama_lora_grads(clone), want)  # the copies group q/k/v from their first step on


def test_layers_compiled_one_by_one_compile_the_mlp_once():
    """The route is a class, so a graph entered at every layer (each decoder layer compiled on its own,
    as FSDP2 recipes do) is compiled once, not once per layer up to torch's recompile limit."""
    from torch._dynamo.utils import counters

    graphs = {}
    for layers in (2, 10):
        model = tiny_llama(layers=layers)
        model.config.use_cache = False  # a KV cache's per-layer state would recompile on its own
        model.requires_grad_(False)
        for layer in model.model.layers:
            layer.compile(backend="eager")
        counters.clear()
        torch._dynamo.reset()
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 8, dtype=torch.long))
        plain = counters["stats"]["unique_graphs"]
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets=LLAMA_TARGETS, init="gaussian-b"))
        assert all(routed(layer.mlp) for layer in model.model.layers)
        counters.clear()
        torch._dynamo.reset()
        llama_lora_grads(model)
        graphs[layers] = (plain, counters["stats"]["unique_graphs"])
    assert graphs[2] == graphs[10], graphs
