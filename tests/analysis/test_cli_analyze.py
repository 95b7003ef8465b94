"""``lorakit analyze similarity|spectrum`` on tiny adapters saved in PEFT's layout, and adapter reading."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorakit.cli
from lorakit.analysis.adapter_io import load_adapter_factors, module_scaling

MODULES = ("encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value")


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(lorakit.cli, "COMMAND_MODULES", (*lorakit.cli.COMMAND_MODULES, "analyze"))
    return lorakit.cli.main


def _save(folder: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (A, B) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = A.clone().contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = B.clone().contiguous()
    tensors["base_model.model.classifier.modules_to_save.weight"] = torch.zeros(2, 16)  # ignored
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    payload = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": False, **config}
    (folder / "adapter_config.json").write_text(json.dumps(payload))
    return folder


def _factors(seed: int, A_seed: int | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ga = torch.Generator().manual_seed(A_seed) if A_seed is not None else g
    return {m: (torch.randn(4, 16, generator=ga), torch.randn(12, 4, generator=g)) for m in MODULES}


def test_similarity_cli_writes_matrices_and_heatmap(
    tmp_path: Path, cli, capsys: pytest.CaptureFixture
) -> None:
    run1 = _save(tmp_path / "run1" / "adapter", _factors(0, A_seed=100))  # run folder with adapter/ inside
    run2 = _save(
        tmp_path / "run2", _factors(1, A_seed=100)
    )  # bare adapter folder; same A: frozen shared init
    out = tmp_path / "sim"
    code = cli(["analyze", "similarity", str(run1.parent), str(run2), "--out", str(out)])
    assert code == 0
    data = json.loads((out / "similarity.json").read_text())
    assert (out / "similarity.png").stat().st_size > 1000
    assert data["labels"] == ["run1", "run2"]
    assert set(data["matrices"]) == {"query", "value", "all"}
    a = data["matrices"]["all"]["A"]["cca2"]
    assert a[0][1] == pytest.approx(1.0) and data["identical"]["all"]["A"][0][1] == 1.0
    b = data["matrices"]["all"]["B"]["cca2"]
    assert b[0][0] == 1.0 and b[0][1] < 0.9
    assert data["baselines"]["all"]["B"]["cca2"] == pytest.approx(4 / 12)
    assert "bit-identical" in capsys.readouterr().out


def test_similarity_cli_errors_name_the_file(tmp_path: Path, cli, capsys: pytest.CaptureFixture) -> None:
    good = _save(tmp_path / "good", _factors(0))
    corrupt = _save(tmp_path / "corrupt", _factors(1))
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    assert cli(["analyze", "similarity", str(good), str(corrupt), "--out", str(tmp_path / "o")]) == 2
    assert str(corrupt / "adapter_model.safetensors") in capsys.readouterr().err
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    assert cli(["analyze", "similarity", str(good), str(pickled), "--out", str(tmp_path / "o")]) == 2
    assert "never unpickles" in capsys.readouterr().err
    assert (
        cli(["analyze", "similarity", str(good), str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "missing" in capsys.readouterr().err


def test_spectrum_cli(tmp_path: Path, cli) -> None:
    # rank-4 factors whose ΔW has singular values (4, 2, 1, 0.5) · s with s = 8/4
    Q_out = torch.linalg.qr(torch.randn(12, 4, generator=torch.Generator().manual_seed(3)))[0]
    Q_in = torch.linalg.qr(torch.randn(16, 4, generator=torch.Generator().manual_seed(4)))[0]
    B = Q_out @ torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.5]))
    run = _save(tmp_path / "run", {m: (Q_in.T.contiguous(), B) for m in MODULES})
    assert cli(["analyze", "spectrum", str(run)]) == 0
    data = json.loads((run / "analysis" / "spectrum.json").read_text())
    assert (run / "analysis" / "spectrum.png").exists()
    layer = data["layers"][MODULES[0]]
    assert layer["singular_values"] == pytest.approx([8.0, 4.0, 2.0, 1.0], rel=1e-5)
    # energies 64, 16, 4, 1 of 85: 90% needs 2 directions (80/85 = 0.94), 99% needs 4 (84/85 = 0.988)
    assert (layer["rank_90"], layer["rank_99"], layer["rank"]) == (2, 4, 4)
    assert data["summary"]["query"]["modules"] == 1 and data["summary"]["all"]["max_rank_99"] == 4


def test_reader_handles_rslora_patterns_embeddings_and_lorakit_frozen(tmp_path: Path) -> None:
    folder = tmp_path / "ad"
    folder.mkdir()
    g = torch.Generator().manual_seed(5)
    tensors = {
        "base_model.model.encoder.layer.1.attention.self.query.lora_A.weight": torch.randn(
            2, 16, generator=g
        ),
        "base_model.model.encoder.layer.1.attention.self.query.lora_B.weight": torch.randn(
            12, 2, generator=g
        ),
        "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight": torch.randn(
            4, 16, generator=g
        ),
        "base_model.model.encoder.layer.0.attention.self.query.lora_B.weight": torch.randn(
            12, 4, generator=g
        ),
        "base_model.model.embeddings.word_embeddings.lora_embedding_A": torch.randn(4, 30, generator=g),
        "base_model.model.embeddings.word_embeddings.lora_embedding_B": torch.randn(8, 4, generator=g),
        "base_model.model.conv.lora_A.weight": torch.randn(4, 3, 2, 2, generator=g),
        "base_model.model.conv.lora_B.weight": torch.randn(5, 4, 1, 1, generator=g),
    }
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "r": 4,
        "lora_alpha": 16,
        "use_rslora": True,
        "rank_pattern": {"layer.1.attention.self.query": 2},
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "lorakit_config.json").write_text(json.dumps({"lorakit": {"train": "B"}}))
    adapter = load_adapter_factors(folder)
    assert list(adapter.layers)[:2] == ["conv", "embeddings.word_embeddings"]
    layer0, layer1 = (adapter.layers[f"encoder.layer.{i}.attention.self.query"] for i in (0, 1))
    assert list(adapter.layers).index(layer0.name) < list(adapter.layers).index(layer1.name)  # natural order
    assert layer0.scaling == pytest.approx(16 / 2) and layer1.scaling == pytest.approx(16 / math.sqrt(2))
    assert adapter.layers["embeddings.word_embeddings"].kind == "embedding"
    assert adapter.layers["conv"].A.shape == (4, 12) and adapter.layers["conv"].B.shape == (5, 4)
    assert adapter.frozen == frozenset({"A"})
    # PEFT's suffix rule: "query" must not match "...query_proj" and must match "...self.query"
    assert module_scaling({"r": 8, "lora_alpha": 8, "alpha_pattern": {"query": 16}}, "a.query_proj", 8) == 1.0
    assert module_scaling({"r": 8, "lora_alpha": 8, "alpha_pattern": {"query": 16}}, "a.self.query", 8) == 2.0
    with pytest.raises(ValueError, match="config gives rank 8"):
        module_scaling({"r": 8, "lora_alpha": 8}, "x", 4, Path("cfg.json"))


def test_reader_accepts_adapters_saved_by_peft(tmp_path: Path, tiny_bert) -> None:
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights="gaussian"
    )
    model = peft.get_peft_model(tiny_bert, config)
    model.save_pretrained(str(tmp_path / "peft"))
    adapter = load_adapter_factors(tmp_path / "peft")
    assert len(adapter.layers) == 4  # 2 layers × (query, value)
    name = "bert.encoder.layer.0.attention.self.query"
    peft_layer = model.get_submodule(f"base_model.model.{name}")
    assert torch.allclose(adapter.layers[name].A, peft_layer.lora_A["default"].weight)
    assert adapter.layers[name].scaling == pytest.approx(peft_layer.scaling["default"])
    expected = peft_layer.get_delta_weight("default").double()
    assert torch.allclose(adapter.layers[name].delta_weight(), expected, atol=1e-6)


def test_reader_accepts_adapters_saved_by_lorakit(tmp_path: Path, tiny_bert) -> None:
    import lorakit

    config = lorakit.LoraConfig(
        r=4, alpha=8, targets=["query", "value"], init="orthonormal-a", train="B", seed=3
    )
    model = lorakit.inject(tiny_bert, config)
    lorakit.save(model, tmp_path / "run" / "adapter")
    adapter = load_adapter_factors(tmp_path / "run")
    assert adapter.frozen == frozenset({"A"}) and adapter.label == "run"
    for name, layer in lorakit.lora_layers(model):
        assert torch.allclose(adapter.layers[name].A, layer.lora_A.detach())
        assert torch.allclose(adapter.layers[name].delta_weight(), layer.delta_weight().double(), atol=1e-6)


def test_reproduce_asymmetry_similarity_rejects_missing_data(tmp_path: Path) -> None:
    import argparse

    from lorakit.cli import LorakitError
    from lorakit.experiments import asymmetry_similarity

    parser = argparse.ArgumentParser()
    asymmetry_similarity.add_arguments(parser)
    args = parser.parse_args(["--glue-dir", str(tmp_path), "--out", str(tmp_path / "out"), "--quick"])
    with pytest.raises(LorakitError, match=r"dataset not found: .*SST-2"):
        asymmetry_similarity.run(args)
    args = parser.parse_args(["--data", str(tmp_path), "--seeds", "0"])
    with pytest.raises(LorakitError, match="at least two seeds"):
        asymmetry_similarity.run(args)
