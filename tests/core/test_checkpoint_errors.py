"""Every checkpoint error names its culprit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lorakit
from lorakit import LoraConfig


def _saved(tmp_path, r=4, targets=("0", "2")):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    lorakit.inject(model, LoraConfig(r=r, targets=list(targets)))
    lorakit.save(model, tmp_path)
    return model


def _fresh():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lorakit.load(_fresh(), tmp_path / "nope")
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors is missing"):
        lorakit.load(_fresh(), tmp_path)


def test_pickled_checkpoint_is_refused(tmp_path):
    torch.save({"x": torch.zeros(1)}, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"adapter_model.bin.*never unpickles"):
        lorakit.load(_fresh(), tmp_path)


def test_corrupt_safetensors_and_json(tmp_path):
    _saved(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        lorakit.load(_fresh(), tmp_path)
    (tmp_path / "lorakit_config.json").write_text("{\n  'r': 4")
    with pytest.raises(ValueError, match=r"lorakit_config.json: invalid JSON at line 2"):
        lorakit.load(_fresh(), tmp_path)


def test_module_missing_from_model(tmp_path):
    _saved(tmp_path)
    model = lorakit.inject(_fresh(), LoraConfig(r=4, targets=["0"]))
    with pytest.raises(ValueError, match=r"'base_model.model.2.lora_A.weight' has no matching module"):
        lorakit.load(model, tmp_path)


def test_shape_mismatch_names_module_expected_and_found(tmp_path):
    _saved(tmp_path, r=4)
    model = lorakit.inject(_fresh(), LoraConfig(r=2, targets=["0", "2"]))
    with pytest.raises(
        ValueError, match=r"'base_model.model.0.lora_A.weight' has shape \(4, 8\), the model expects \(2, 8\)"
    ):
        lorakit.load(model, tmp_path)


def test_missing_tensor_is_named(tmp_path):
    _saved(tmp_path)
    save_file({"base_model.model.0.lora_A.weight": torch.zeros(4, 8)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="no tensor for 'base_model.model.0.lora_B.weight'"):
        lorakit.load(_fresh(), tmp_path)


def test_non_lora_peft_config_is_refused(tmp_path):
    _saved(tmp_path)
    (tmp_path / "lorakit_config.json").unlink()
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="peft_type is 'IA3'"):
        lorakit.load(_fresh(), tmp_path)


def test_save_without_adapters_and_atomic_overwrite(tmp_path):
    with pytest.raises(ValueError, match="no lorakit adapters"):
        lorakit.save(_fresh(), tmp_path)
    _saved(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "lorakit_config.json",
    ]
