"""LoraConfig validation and target selection."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.adapters import LoraConv1D, LoraEmbedding, LoraLinear, find_targets


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("r", 0, "LoraConfig.r"),
        ("r", 2.5, "LoraConfig.r"),
        ("alpha", -1, "LoraConfig.alpha"),
        ("scaling", "sqrt", "LoraConfig.scaling"),
        ("dropout", 1.0, "LoraConfig.dropout"),
        ("targets", [], "LoraConfig.targets"),
        ("targets", ["q", ""], "LoraConfig.targets"),
        ("init", "xavier", "LoraConfig.init"),
        ("train", "BA", "LoraConfig.train"),
        ("rank_pattern", {"q": 0}, "rank_pattern['q']"),
        ("alpha_pattern", {"q": float("nan")}, "alpha_pattern['q']"),
        ("seed", "0", "LoraConfig.seed"),
        ("kernel", "cuda", "LoraConfig.kernel"),
        ("save_merged_weight", "yes", "LoraConfig.save_merged_weight"),
    ],
)
def test_bad_config_field_is_named(field, value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        LoraConfig(**{field: value})


def test_config_round_trips_through_dict():
    config = LoraConfig(r=4, targets=["query"], rank_pattern={"value": 2}, modules_to_save=["classifier"])
    assert LoraConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown field"):
        LoraConfig.from_dict({**config.to_dict(), "rnak": 3})


def test_suffix_glob_and_regex_targets(tiny_bert):
    by_suffix = find_targets(tiny_bert, LoraConfig(targets=["query"]))
    by_glob = find_targets(tiny_bert, LoraConfig(targets=["*.self.query"]))
    by_regex = find_targets(tiny_bert, LoraConfig(targets=["re:.*layer\\.\\d+\\.attention\\.self\\.query"]))
    assert by_suffix == by_glob == by_regex
    assert by_suffix == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)]


def test_all_linear_excludes_head_and_respects_exclude(tiny_bert, tiny_gpt2):
    names = find_targets(tiny_bert, LoraConfig(targets="all-linear", exclude=["pooler.dense"]))
    assert "classifier" not in names and "bert.pooler.dense" not in names
    assert len(names) == 2 * 6
    gpt_names = find_targets(tiny_gpt2, LoraConfig(targets="all-linear"))
    assert "lm_head" not in gpt_names and len(gpt_names) == 2 * 4


def test_no_match_lists_closest_names(tiny_bert):
    with pytest.raises(ValueError, match=r"matched no module.*querry|Closest module names: \['query'"):
        lorakit.inject(tiny_bert, LoraConfig(targets=["querry"]))


def test_unsupported_type_is_an_error(tiny_bert):
    with pytest.raises(ValueError, match="'bert.embeddings.LayerNorm'.*LayerNorm"):
        lorakit.inject(tiny_bert, LoraConfig(targets=["LayerNorm"]))


def test_inject_layer_types_freezing_and_patterns(tiny_gpt2):
    config = LoraConfig(
        r=4,
        targets=["c_attn", "c_fc", "wte"],
        rank_pattern={"h.1.attn.c_attn": 2},
        alpha_pattern={"c_fc": 32},
        train="B",
    )
    lorakit.inject(tiny_gpt2, config)
    layers = dict(lorakit.lora_layers(tiny_gpt2))
    assert isinstance(layers["transformer.h.0.attn.c_attn"], LoraConv1D)
    assert isinstance(layers["transformer.wte"], LoraEmbedding)
    assert layers["transformer.h.1.attn.c_attn"].r == 2 and layers["transformer.h.0.attn.c_attn"].r == 4
    assert layers["transformer.h.0.mlp.c_fc"].scaling == 32 / 4
    trainable = {n for n, p in tiny_gpt2.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("lora_B") for n in trainable)
    assert lorakit.trainable_summary(tiny_gpt2).trainable == sum(
        layer.lora_B.numel() for layer in layers.values()
    )


def test_rank_larger_than_layer_is_an_error():
    model = nn.Sequential(nn.Linear(8, 3))
    with pytest.raises(ValueError, match="module '0': rank r=4 exceeds its smallest dimension 3"):
        lorakit.inject(model, LoraConfig(r=4, targets=["0"]))


def test_modules_to_save_trained_and_missing_one_named(tiny_bert):
    lorakit.inject(tiny_bert, LoraConfig(targets=["query"], modules_to_save=["classifier"]))
    assert tiny_bert.classifier.weight.requires_grad
    assert not tiny_bert.bert.pooler.dense.weight.requires_grad
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="modules_to_save entry 'head'"):
        lorakit.inject(model, LoraConfig(targets=["0"], r=2, modules_to_save=["head"]))


@pytest.mark.parametrize("second_targets", [["query"], ["value"]])
def test_double_inject_is_refused_and_keeps_the_first_adapters(tiny_bert, second_targets):
    lorakit.inject(tiny_bert, LoraConfig(targets=["query"]))
    first = tiny_bert.lora_config
    with pytest.raises(ValueError, match=r"already has LoRA adapters on 2 module\(s\), e.g. '.*query'"):
        lorakit.inject(tiny_bert, LoraConfig(targets=second_targets))
    assert tiny_bert.lora_config is first
    trainable = {name for name, p in tiny_bert.named_parameters() if p.requires_grad}
    assert trainable and all("query.lora_" in name for name in trainable)
    lorakit.unload(tiny_bert)
    lorakit.inject(tiny_bert, LoraConfig(targets=second_targets))
    assert len(list(lorakit.lora_layers(tiny_bert))) == 2


def test_unload_restores_plain_modules(tiny_bert):
    x = torch.randint(0, 64, (2, 7))
    before = tiny_bert(x).logits
    lorakit.inject(tiny_bert, LoraConfig(targets=["query", "value"], init="gaussian-b"))
    for _, layer in lorakit.lora_layers(tiny_bert):
        layer.lora_A.data.normal_()
    assert not torch.allclose(tiny_bert(x).logits, before)
    lorakit.unload(tiny_bert)
    assert not any(isinstance(m, LoraLinear) for m in tiny_bert.modules())
    torch.testing.assert_close(tiny_bert(x).logits, before, rtol=0, atol=1e-6)


def test_float32_master_factors_on_a_bf16_base():
    model = nn.Sequential(nn.Linear(16, 16), nn.Embedding(10, 16)).to(torch.bfloat16)
    lorakit.inject(model, LoraConfig(r=4, targets=["0", "1"], init="gaussian-b"))
    layers = dict(lorakit.lora_layers(model))
    assert all(f.dtype == torch.float32 for layer in layers.values() for f in (layer.lora_A, layer.lora_B))
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    out = model[0](x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layers["0"].lora_B.grad.dtype == torch.float32
    assert model[1](torch.tensor([1, 2])).dtype == torch.bfloat16
