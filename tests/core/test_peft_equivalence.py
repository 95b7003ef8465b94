"""Same weights ⇒ same outputs and gradients as PEFT; checkpoints load in both directions."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import lorakit
from lorakit import LoraConfig

peft = pytest.importorskip("peft")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _randomise_factors(model) -> None:
    generator = torch.Generator().manual_seed(1)
    for _, layer in lorakit.lora_layers(model):
        layer.lora_A.data.copy_(torch.randn(layer.lora_A.shape, generator=generator) * 0.3)
        layer.lora_B.data.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.3)


def _peft_twin(base, directory):
    model = peft.PeftModel.from_pretrained(base, directory, is_trainable=True)
    return model.eval()


def _inputs(vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (3, 9), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("scaling", ["standard", "rslora"])
@pytest.mark.parametrize("model_name", ["tiny_bert", "tiny_gpt2"])
def test_outputs_and_gradients_match_peft(request, tmp_path, model_name, scaling):
    base = request.getfixturevalue(model_name)
    reference_base = copy.deepcopy(base)
    targets = (
        ["query", "value", "word_embeddings"] if model_name == "tiny_bert" else ["c_attn", "c_fc", "wte"]
    )
    model = lorakit.inject(base, LoraConfig(r=4, alpha=8, scaling=scaling, targets=targets)).eval()
    _randomise_factors(model)
    lorakit.save(model, tmp_path)
    twin = _peft_twin(reference_base, tmp_path)

    x = _inputs()
    ours = model(x).logits
    theirs = twin(x).logits
    assert _rel(ours, theirs) <= 1e-6
    ours.square().sum().backward()
    theirs.square().sum().backward()
    peft_grads = {n: p.grad for n, p in twin.named_parameters() if p.grad is not None}
    compared = 0
    for name, layer in lorakit.lora_layers(model):
        for ours_name, peft_suffix in (("lora_A", "A"), ("lora_B", "B")):
            key = next(
                k
                for k in peft_grads
                if k.startswith(f"base_model.model.{name}.lora_") and peft_suffix in k.split(".lora_")[1][:12]
            )
            assert _rel(getattr(layer, ours_name).grad, peft_grads[key]) <= 1e-6, (name, ours_name)
            compared += 1
    assert compared == 2 * len(dict(lorakit.lora_layers(model)))


def test_peft_adapter_loads_into_lorakit(tiny_bert, tmp_path):
    reference_base = copy.deepcopy(tiny_bert)
    peft_config = peft.LoraConfig(
        r=4,
        lora_alpha=12,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        rank_pattern={"value": 2},
    )
    twin = peft.get_peft_model(reference_base, peft_config)
    for name, param in twin.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            param.data.normal_(0, 0.3)
    twin.save_pretrained(tmp_path)
    twin.eval()

    model = lorakit.load(tiny_bert, tmp_path).eval()
    layers = dict(lorakit.lora_layers(model))
    assert layers["bert.encoder.layer.0.attention.self.value"].r == 2
    x = _inputs()
    assert _rel(model(x).logits, twin(x).logits) <= 1e-6


def test_lorakit_settings_go_to_their_own_file(tiny_bert, tmp_path):
    lorakit.inject(tiny_bert, LoraConfig(r=2, targets=["query"], init="orthonormal-a", train="B", seed=7))
    lorakit.save(tiny_bert, tmp_path, extra={"ratio": 16.0})
    peft_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == "LORA" and "init" not in peft_config
    ours = json.loads((tmp_path / "lorakit_config.json").read_text())
    assert ours["lorakit"]["train"] == "B" and ours["ratio"] == 16.0
    assert lorakit.read_adapter_config(tmp_path).init == "orthonormal-a"


def test_round_trip_restores_frozen_factors(tiny_bert, tmp_path):
    config = LoraConfig(r=4, targets=["query", "value"], init="orthonormal-a", train="B", seed=3)
    source = lorakit.inject(copy.deepcopy(tiny_bert), config)
    _randomise_factors(source)
    lorakit.save(source, tmp_path)
    restored = lorakit.load(copy.deepcopy(tiny_bert), tmp_path)
    for (name, a), (_, b) in zip(lorakit.lora_layers(source), lorakit.lora_layers(restored), strict=True):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B), name
        assert not b.train_a and b.train_b


def test_merge_refuses_tied_weights(tiny_gpt2):
    model = lorakit.inject(tiny_gpt2, LoraConfig(r=4, targets=["wte"]))
    with pytest.raises(ValueError, match="'transformer.wte'.*tied to \\['lm_head.weight'\\]"):
        lorakit.merge(model)


def test_merge_unmerge_matches_adapter_forward(tiny_gpt2, tiny_bert):
    bert = lorakit.inject(tiny_bert, LoraConfig(r=4, targets=["word_embeddings", "query"]))
    _randomise_factors(bert)
    x = _inputs()
    adapted = bert(x).logits
    assert _rel(lorakit.merge(bert)(x).logits, adapted) <= 1e-6
    model = lorakit.inject(tiny_gpt2, LoraConfig(r=4, targets=["c_attn", "c_proj"]))
    _randomise_factors(model)
    x = _inputs()
    adapted = model(x).logits
    lorakit.merge(model)
    assert _rel(model(x).logits, adapted) <= 1e-6
    lorakit.unmerge(model)
    assert _rel(model(x).logits, adapted) <= 1e-6
    lorakit.unload(model, merge=True)
    assert _rel(model(x).logits, adapted) <= 1e-6
