"""Injection edge cases: failed injects leave the model as it was, modules_to_save, torch's Transformer
layers, dtype casts after injection, and weight read-through."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.adapters.layers import LoraLayer


class Tagger(nn.Module):
    """An encoder and a head that both have a ``dense`` layer (like RoBERTa's classification head)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential()
        self.encoder.add_module("dense", nn.Linear(8, 8))
        self.classifier = nn.Sequential()
        self.classifier.add_module("dense", nn.Linear(8, 8))
        self.classifier.add_module("out", nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.encoder(x)))


def _randomise_factors(model: nn.Module) -> None:
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora_A.normal_()
            layer.lora_B.normal_()


def _state(model: nn.Module) -> dict:
    return {
        "types": {n: type(m) for n, m in model.named_modules()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def test_modules_inside_modules_to_save_are_not_adapted_and_the_adapter_saves(tmp_path) -> None:
    model = lorakit.inject(
        Tagger(), lorakit.LoraConfig(r=2, targets=["dense"], modules_to_save=["classifier"])
    )
    assert [name for name, _ in lorakit.lora_layers(model)] == ["encoder.dense"]
    assert all(p.requires_grad for p in model.classifier.parameters())
    lorakit.save(model, tmp_path / "adapter")  # before: classifier.dense's factors were written twice


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (lorakit.LoraConfig(r=2, targets=["dense"], modules_to_save=["classifer"]), "classifer"),
        (lorakit.LoraConfig(r=9, targets=["dense"]), "exceeds"),
    ],
    ids=["misspelled-modules-to-save", "rank-too-large"],
)
def test_a_failed_inject_leaves_the_model_as_it_was(config, match) -> None:
    model = Tagger()
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        lorakit.inject(model, config)
    assert _state(model) == before and not hasattr(model, "lora_config")
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["dense"]))  # a corrected config still works
    assert len(list(lorakit.lora_layers(model))) == 2


def test_all_linear_that_matches_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="all-linear"):
        lorakit.inject(nn.Sequential(nn.Embedding(5, 4), nn.LayerNorm(4)), lorakit.LoraConfig())


@pytest.fixture
def restore_fastpath():
    enabled = torch.backends.mha.get_fastpath_enabled()
    yield
    torch.backends.mha.set_fastpath_enabled(enabled)


def test_torch_transformer_layer_adapters_run_in_its_inference_path(restore_fastpath) -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True, dropout=0.0)
    torch.backends.mha.set_fastpath_enabled(True)
    lorakit.inject(layer, lorakit.LoraConfig(r=2))
    _randomise_factors(layer)
    adapted = sorted(name for name, _ in lorakit.lora_layers(layer))
    assert adapted == ["linear1", "linear2"]  # MultiheadAttention reads out_proj.weight itself
    layer.eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():  # where torch would take its fast path, reading linear1/linear2 weights
        fast = layer(x)
    slow = layer(x.requires_grad_(True)).detach()  # the module path, which calls the adapted layers
    torch.testing.assert_close(fast, slow)
    lorakit.unload(layer)
    with torch.no_grad():
        assert not torch.allclose(layer(x), fast, atol=1e-4)  # the adapters did change the output
    with pytest.raises(ValueError, match="MultiheadAttention"):
        lorakit.inject(layer, lorakit.LoraConfig(r=2, targets=["self_attn.out_proj"]))


def test_weight_reads_through_so_gpt2_ties_its_adapted_embedding() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    lorakit.inject(model, lorakit.LoraConfig(r=2, targets=["wte", "c_attn"]))
    wte = model.transformer.wte
    assert isinstance(wte, LoraLayer) and wte.weight is wte.base_layer.weight
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == wte.base_layer.weight.data_ptr()


def test_casting_the_model_to_bf16_keeps_float32_master_factors() -> None:
    torch.manual_seed(0)
    model = lorakit.inject(nn.Sequential(nn.Linear(8, 8)), lorakit.LoraConfig(r=2))
    _randomise_factors(model)
    model.to(torch.bfloat16)
    layer = model[0]
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    before = layer.lora_B.detach().clone()
    optimizer = torch.optim.SGD(lorakit.make_optimizer(model, lr=1e-3).param_groups, lr=1e-3)
    model(torch.randn(4, 8, dtype=torch.bfloat16)).float().square().sum().backward()
    optimizer.step()
    assert layer.lora_B.grad.dtype == torch.float32
    assert not torch.equal(layer.lora_B.detach(), before)  # small updates are not lost to bf16 rounding
    model.double()  # a cast up is applied to the factors too
    assert layer.lora_A.dtype == torch.float64


def test_config_errors_name_the_field_and_accept_peft_style_none() -> None:
    with pytest.raises(ValueError, match=r"LoraConfig.targets: 're:\(query' is not a valid regular"):
        lorakit.LoraConfig(targets="re:(query")
    config = lorakit.LoraConfig(exclude=None, modules_to_save=None)
    assert config.exclude == () and config.modules_to_save == ()
    with pytest.raises(ValueError, match="ratio"):
        lorakit.make_optimizer(
            lorakit.inject(nn.Sequential(nn.Linear(4, 4)), lorakit.LoraConfig(r=2)),
            lr=1e-3,
            ratio=float("inf"),
        )


def test_inject_with_a_peft_config_says_so() -> None:
    peft = pytest.importorskip("peft")
    with pytest.raises(TypeError, match=r"peft\..*LoraConfig; build a lorakit.LoraConfig"):
        lorakit.inject(nn.Sequential(nn.Linear(4, 4)), peft.LoraConfig(r=2, target_modules=["0"]))
