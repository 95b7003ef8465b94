"""lorakit.load: PEFT configs translated with PEFT's own matching rules, config checks against existing
adapters, and a failed load that leaves the model as it was."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit import LoraConfig

peft = pytest.importorskip("peft")


def _inputs() -> torch.Tensor:
    return torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(2))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _peft_saved(base, directory, **kwargs):
    """A PEFT adapter on ``base`` with random factors (modules_to_save shifted), saved to ``directory``."""
    twin = peft.get_peft_model(base, peft.LoraConfig(**kwargs))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in twin.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
            elif "modules_to_save" in name:
                param.add_(0.5)
    twin.save_pretrained(directory)
    return twin.eval()


def _snapshot(model):
    return (
        [(name, id(module)) for name, module in model.named_modules()],
        [(name, param.requires_grad) for name, param in model.named_parameters()],
        hasattr(model, "lora_config"),
    )


def _random_factors(model):
    generator = torch.Generator().manual_seed(1)
    for _, layer in lorakit.lora_layers(model):
        layer.lora_A.data.copy_(torch.randn(layer.lora_A.shape, generator=generator) * 0.3)
        layer.lora_B.data.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.3)


def test_peft_sequence_classification_adapter_loads(tiny_bert, tmp_path):
    # PEFT writes modules_to_save ["classifier", "score"] for SEQ_CLS; BERT has no "score".
    twin = _peft_saved(
        copy.deepcopy(tiny_bert),
        tmp_path,
        task_type="SEQ_CLS",
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
    )
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == [
        "classifier",
        "score",
    ]
    model = lorakit.load(tiny_bert, tmp_path).eval()
    assert model.lora_config.modules_to_save == ("classifier",)
    assert all(p.requires_grad for p in model.classifier.parameters())
    assert _rel(model(_inputs()).logits, twin(_inputs()).logits) <= 1e-6


def test_unmatched_modules_to_save_still_needs_every_tensor_consumed(tiny_bert, tmp_path):
    _peft_saved(copy.deepcopy(tiny_bert), tmp_path, task_type="SEQ_CLS", r=4, target_modules=["query"])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["modules_to_save"] = ["score"]  # the file still holds classifier.weight / classifier.bias
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"base_model\.model\.classifier\.\w+' has no matching module"):
        lorakit.load(tiny_bert, tmp_path)


@pytest.mark.parametrize(
    ("field", "source", "target"),
    [
        ("alpha", {"alpha": 32}, {"alpha": 8}),
        ("scaling", {"scaling": "rslora"}, {"scaling": "standard"}),
        ("dropout", {"dropout": 0.1}, {"dropout": 0.0}),
        ("train", {"train": "B", "init": "orthonormal-a"}, {"train": "AB"}),
    ],
)
def test_load_into_adapters_with_another_config_names_the_field(tiny_bert, tmp_path, field, source, target):
    source_model = lorakit.inject(
        copy.deepcopy(tiny_bert), LoraConfig(r=4, targets=["query", "value"], **source)
    )
    _random_factors(source_model)
    lorakit.save(source_model, tmp_path)
    model = lorakit.inject(tiny_bert, LoraConfig(r=4, targets=["query", "value"], **target))
    before = {name: layer.lora_A.clone() for name, layer in lorakit.lora_layers(model)}
    ours, theirs = source.get(field, "AB"), target.get(field, "AB")
    with pytest.raises(ValueError, match=rf"module 'bert\.\S+': the checkpoint has {field}=") as error:
        lorakit.load(model, tmp_path)
    assert repr(float(ours) if field in ("alpha", "dropout") else ours) in str(error.value)
    assert repr(float(theirs) if field in ("alpha", "dropout") else theirs) in str(error.value)
    for name, layer in lorakit.lora_layers(model):  # nothing was copied
        assert torch.equal(layer.lora_A, before[name]), name


def test_peft_alpha_pattern_mismatch_names_the_field(tiny_bert, tmp_path):
    _peft_saved(
        copy.deepcopy(tiny_bert),
        tmp_path,
        r=4,
        lora_alpha=8,
        target_modules=["query"],
        alpha_pattern={"query": 3},
    )
    model = lorakit.inject(tiny_bert, LoraConfig(r=4, alpha=8, targets=["query"]))
    with pytest.raises(
        ValueError, match=r"the checkpoint has alpha=3\.0, the model's adapter has alpha=8\.0"
    ):
        lorakit.load(model, tmp_path)


def test_load_into_adapters_with_the_same_config_works(tiny_bert, tmp_path):
    config = LoraConfig(r=4, alpha=32, scaling="rslora", dropout=0.1, targets=["query", "value"])
    source = lorakit.inject(copy.deepcopy(tiny_bert), config).eval()
    _random_factors(source)
    lorakit.save(source, tmp_path)
    model = lorakit.load(lorakit.inject(tiny_bert, config), tmp_path).eval()
    assert _rel(model(_inputs()).logits, source(_inputs()).logits) <= 1e-6


def test_failed_load_leaves_the_model_unchanged(tiny_bert, tmp_path):
    source = lorakit.inject(copy.deepcopy(tiny_bert), LoraConfig(r=4, targets=["query", "value"]))
    lorakit.save(source, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight"
    tensors[key] = torch.zeros(32, 3)  # a wrong shape, found only after the query adapters
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    before, expected = _snapshot(tiny_bert), tiny_bert(_inputs()).logits
    with pytest.raises(ValueError, match=r"value\.lora_B\.weight' has shape \(32, 3\)"):
        lorakit.load(tiny_bert, tmp_path)
    assert _snapshot(tiny_bert) == before
    assert torch.equal(tiny_bert(_inputs()).logits, expected)


def test_failure_after_injection_is_undone(tiny_bert, tmp_path, monkeypatch):
    source = lorakit.inject(
        copy.deepcopy(tiny_bert), LoraConfig(r=4, targets=["query"], modules_to_save=["classifier"])
    )
    lorakit.save(source, tmp_path)
    tiny_bert.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # a user's own freezing
    before, expected = _snapshot(tiny_bert), tiny_bert(_inputs()).logits
    real_inject = lorakit.checkpoint.inject

    def inject_then_fail(model, config):
        real_inject(model, config)
        raise RuntimeError("late failure")

    monkeypatch.setattr(lorakit.checkpoint, "inject", inject_then_fail)
    with pytest.raises(RuntimeError, match="late failure"):
        lorakit.load(tiny_bert, tmp_path)
    assert _snapshot(tiny_bert) == before
    assert torch.equal(tiny_bert(_inputs()).logits, expected)


def test_peft_rank_pattern_alternation(tiny_bert, tmp_path):
    twin = _peft_saved(
        copy.deepcopy(tiny_bert),
        tmp_path / "rank",
        r=4,
        lora_alpha=8,
        target_modules=["query", "key", "value"],
        rank_pattern={"query|value": 2},
        alpha_pattern={"key|value": 6},
    )
    model = lorakit.load(copy.deepcopy(tiny_bert), tmp_path / "rank").eval()
    ranks = {name.rsplit(".", 1)[-1]: layer.r for name, layer in lorakit.lora_layers(model)}
    assert ranks == {"query": 2, "key": 4, "value": 2}
    assert _rel(model(_inputs()).logits, twin(_inputs()).logits) <= 1e-6


def test_peft_string_exclude_modules_is_a_regex(tiny_bert, tmp_path):
    twin = _peft_saved(
        copy.deepcopy(tiny_bert),
        tmp_path / "exclude",
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
        exclude_modules=r".*layer\.0\..*",
    )
    model = lorakit.load(copy.deepcopy(tiny_bert), tmp_path / "exclude").eval()
    assert sorted(name for name, _ in lorakit.lora_layers(model)) == [
        "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.1.attention.self.value",
    ]
    assert _rel(model(_inputs()).logits, twin(_inputs()).logits) <= 1e-6


@pytest.mark.parametrize(
    "layers",
    [
        {"layers_to_transform": [1]},
        {"layers_to_transform": 0, "layers_pattern": "layer"},
        {"layers_to_transform": [1], "layers_pattern": ["h", "layer"]},
    ],
)
def test_peft_layers_to_transform_matches_peft(tiny_bert, tmp_path, layers):
    twin = _peft_saved(
        copy.deepcopy(tiny_bert), tmp_path, r=4, lora_alpha=8, target_modules=["query", "value"], **layers
    )
    model = lorakit.load(tiny_bert, tmp_path).eval()
    index = layers["layers_to_transform"]
    index = index[0] if isinstance(index, list) else index
    assert {name.split(".")[3] for name, _ in lorakit.lora_layers(model)} == {str(index)}
    assert len(list(lorakit.lora_layers(model))) == 2
    assert _rel(model(_inputs()).logits, twin(_inputs()).logits) <= 1e-6


def test_unsupported_layers_to_transform_errors_clearly(tiny_bert, tmp_path):
    _peft_saved(copy.deepcopy(tiny_bert), tmp_path, r=4, target_modules=["query"])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    # PEFT itself refuses layers_to_transform with a regex target_modules.
    config.update(target_modules=r".*\.query", layers_to_transform=[1])
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    before = _snapshot(tiny_bert)
    with pytest.raises(
        ValueError, match=r"layers_to_transform \[1\] with a string target_modules .* not supported"
    ):
        lorakit.load(tiny_bert, tmp_path)
    config.update(target_modules=["query"], layers_to_transform=None, layers_pattern="layer")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="layers_pattern 'layer' is set without layers_to_transform"):
        lorakit.load(tiny_bert, tmp_path)
    assert _snapshot(tiny_bert) == before


def test_unsupported_peft_variant_is_refused_by_name(tiny_bert, tmp_path):
    _peft_saved(copy.deepcopy(tiny_bert), tmp_path, r=4, target_modules=["query"])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "alora_invocation_tokens": [5, 6]}))
    with pytest.raises(ValueError, match=r"\['alora_invocation_tokens'\] adapters are not supported"):
        lorakit.read_adapter_config(tmp_path)


def test_saved_modules_to_save_are_the_matched_names_that_peft_can_read(tiny_bert, tmp_path):
    model = lorakit.inject(
        copy.deepcopy(tiny_bert), LoraConfig(r=4, targets=["query"], modules_to_save=["re:classif.*"])
    )
    _random_factors(model)
    with torch.no_grad():
        model.classifier.weight.add_(0.5)
    lorakit.save(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    twin = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_bert), tmp_path).eval()
    assert _rel(twin(_inputs()).logits, model.eval()(_inputs()).logits) <= 1e-6
