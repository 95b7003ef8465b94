"""liger-kernel's whole-model kernels on a lorakit-adapted Llama (CPU; ``lorakit.train.liger``).

liger's kernels are Triton GPU kernels, so nothing here runs one: the RMSNorm, RoPE and cross-entropy
kernels are switched off where a model runs, and liger's SwiGLU dispatch is replaced by the same torch
math, which also counts its calls (a call means the MLP ran liger's own forward, not lorakit's route). The
benchmark (``benchmarks/throughput.py``, ``+liger`` variants) checks liger with lorakit on the GPU.
"""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import lorakit
from conftest import LLAMA_TARGETS, adapted_tiny_llama, llama_lora_grads, tiny_llama
from lorakit.adapters import gated_mlp
from lorakit.train.liger import apply_liger_kernels

pytest.importorskip("transformers")
swiglu = pytest.importorskip("liger_kernel.transformers.swiglu", reason="liger-kernel is not installed")

# Only the SwiGLU MLP runs on a CPU (through lorakit's route or the stand-in dispatch below).
CPU_SAFE = {"rope": False, "rms_norm": False, "fused_linear_cross_entropy": False}


@pytest.fixture(autouse=True)
def restore_llama_module():
    """liger patches transformers' Llama module for the whole process; put it back after each test."""
    from transformers.models.llama import modeling_llama

    saved = dict(vars(modeling_llama))
    yield
    for name, value in saved.items():
        if getattr(modeling_llama, name, None) is not value:
            setattr(modeling_llama, name, value)


@pytest.fixture
def liger_dispatch(monkeypatch) -> list[int]:
    """liger's SiLU-multiply in torch (liger's forward looks it up at call time); returns its calls."""
    calls = []

    def dispatch(a, b, *multipliers):
        calls.append(a.shape[-1])
        return F.silu(a) * b

    monkeypatch.setattr(swiglu, "_swiglu_dispatch", dispatch)
    return calls


def mlps(model):
    return [layer.mlp for layer in model.model.layers]


@pytest.mark.parametrize("liger_first", [False, True])
def test_liger_mlps_are_routed_whichever_comes_first(liger_first):
    if liger_first:
        model = apply_liger_kernels(tiny_llama())
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets=LLAMA_TARGETS))
    else:
        model = apply_liger_kernels(adapted_tiny_llama())
    for mlp in mlps(model):
        assert gated_mlp.is_gated_mlp(mlp)
        assert type(mlp).forward is gated_mlp._routed_forward and "forward" not in vars(mlp)
        assert mlp._lorakit_gated == (swiglu.LigerSwiGLUMLP.forward, True)  # liger's, not LlamaMLP's
    norm = model.model.layers[0].input_layernorm
    assert type(norm).__name__ == "LlamaRMSNorm" and norm._get_name() == "LigerRMSNorm"
    assert model.forward.__func__.__name__ == "lce_forward"


def test_eager_route_matches_lorakit_without_liger(liger_dispatch):
    """A whole LM step with liger's MLPs: lorakit routes them (liger's SiLU-multiply never runs), and the
    outputs and gradients equal those of the same adapted model without liger."""
    reference = adapted_tiny_llama()
    model = apply_liger_kernels(copy.deepcopy(reference), **CPU_SAFE)
    want, got = llama_lora_grads(reference), llama_lora_grads(model)
    assert liger_dispatch == []
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_down_projection_keeps_gate_and_up_not_the_product(monkeypatch):
    model = apply_liger_kernels(adapted_tiny_llama(), **CPU_SAFE)
    calls = []
    real = gated_mlp.LoraLinear.forward_gated
    monkeypatch.setattr(
        gated_mlp.LoraLinear, "forward_gated", lambda self, g, u: calls.append(g.shape) or real(self, g, u)
    )
    llama_lora_grads(model)
    assert len(calls) == len(mlps(model))


def test_frozen_a_or_no_grad_runs_liger_own_forward(liger_dispatch):
    """The route pays only where the down projection would keep x: with A frozen, or without gradients,
    liger's MLP runs its own forward."""
    model = apply_liger_kernels(adapted_tiny_llama(), **CPU_SAFE)
    x = torch.randn(2, 5, model.config.hidden_size)
    mlp = mlps(model)[0]
    with torch.no_grad():
        mlp(x)
    assert len(liger_dispatch) == 1
    mlp.down_proj.lora_A.requires_grad_(False)
    mlp(x).sum().backward()
    assert len(liger_dispatch) == 2
    gated_mlp.LIGER_IN_EAGER, switch = False, gated_mlp.LIGER_IN_EAGER
    try:
        mlp.down_proj.lora_A.requires_grad_(True)
        mlp(x)
    finally:
        gated_mlp.LIGER_IN_EAGER = switch
    assert len(liger_dispatch) == 3


def test_unload_gives_back_liger_forward():
    model = apply_liger_kernels(adapted_tiny_llama())
    gated_mlp.detach(model)
    for mlp in mlps(model):
        assert isinstance(mlp.forward, types.MethodType)
        assert mlp.forward.__func__ is swiglu.LigerSwiGLUMLP.forward and mlp.forward.__self__ is mlp
    gated_mlp.attach(model)
    gated_mlp.attach(model)  # idempotent: keeps liger's forward, not its own
    assert all(m._lorakit_gated[0] is swiglu.LigerSwiGLUMLP.forward for m in mlps(model))
    gated_mlp.detach(model)
    assert all(type(m).__name__ == "LlamaMLP" and type(m) not in gated_mlp._ORIGINAL for m in mlps(model))
    assert all(m.forward.__func__ is swiglu.LigerSwiGLUMLP.forward for m in mlps(model))


def test_compiled_route_matches_eager():
    model = apply_liger_kernels(adapted_tiny_llama(), **CPU_SAFE)
    want = llama_lora_grads(model)
    got = llama_lora_grads(model, torch.compile(model, backend="aot_eager"))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


def test_lora_on_lm_head_is_refused_with_fused_cross_entropy():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["lm_head"]))
    with pytest.raises(ValueError, match=r"'lm_head' has a LoRA adapter.*fused_linear_cross_entropy=False"):
        apply_liger_kernels(model)
    apply_liger_kernels(model, fused_linear_cross_entropy=False)  # allowed without it
    assert "forward" not in model.__dict__


def test_unsupported_model_type_and_non_causal_lm_are_refused():
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    )
    with pytest.raises(ValueError, match=r"model_type='bert'.*BertModel.*it covers: .*llama"):
        apply_liger_kernels(bert)
    base = adapted_tiny_llama().model  # LlamaModel: no lm_head
    with pytest.raises(ValueError, match="fused_linear_cross_entropy=True needs a \\*ForCausalLM"):
        apply_liger_kernels(base, fused_linear_cross_entropy=True)
    apply_liger_kernels(base)  # None: off for a model without an LM head


def test_missing_liger_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", None)
    with pytest.raises(ImportError, match=r"lorakit\[liger\]"):
        apply_liger_kernels(adapted_tiny_llama())
