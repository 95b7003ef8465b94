"""δ¹/δ²/δ³ diagnostics: hand-checked values, frozen factors, JSONL round trip, ratio suggestion, CLI."""

from __future__ import annotations

import argparse
import statistics
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import lorakit
from lorakit.analysis import diagnostics as diag
from lorakit.analysis.diagnostics import DeltaDiagnostics, read_diagnostics, suggest_ratio
from lorakit.cli import diagnose


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 5)
        self.head = nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(x)))


def _model(train: str = "AB", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = lorakit.inject(TwoLayer(), lorakit.LoraConfig(r=2, alpha=4, targets=["proj"], train=train))
    (_, layer), *_ = lorakit.lora_layers(model)
    with torch.no_grad():  # both factors non-zero so that every δ term is non-trivial
        layer.lora_A.copy_(torch.randn_like(layer.lora_A))
        layer.lora_B.copy_(torch.randn_like(layer.lora_B))
    return model


def _step(model: nn.Module, opt: torch.optim.Optimizer, d: DeltaDiagnostics, x: torch.Tensor) -> None:
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    d.before_step()
    opt.step()
    d.after_step()


def test_deltas_equal_direct_computation() -> None:
    model = _model()
    (name, layer), *_ = lorakit.lora_layers(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.3)
    d = DeltaDiagnostics(model, every=1, optimizer=opt)
    x = torch.randn(7, 6)
    a0, b0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    _step(model, opt, d, x)
    a1, b1 = layer.lora_A.detach(), layer.lora_B.detach()
    s = layer.scaling
    assert s == pytest.approx(2.0)
    expected = [
        (s * (x @ (a1 - a0).T @ b0.T)).pow(2).mean().sqrt(),
        (s * (x @ a0.T @ (b1 - b0).T)).pow(2).mean().sqrt(),
        (s * (x @ (a1 - a0).T @ (b1 - b0).T)).pow(2).mean().sqrt(),
    ]
    got = d.records[0]["layers"][name]
    for key, value in zip(("delta1", "delta2", "delta3"), expected, strict=True):
        assert got[key] == pytest.approx(float(value), rel=1e-5)
        assert got[key] > 0
    assert got["lr_A"] == got["lr_B"] == pytest.approx(0.3)
    # the three terms add up to the exact change of the LoRA features
    change = s * (x @ a1.T @ b1.T - x @ a0.T @ b0.T)
    parts = s * (x @ (a1 - a0).T @ b0.T + x @ a0.T @ (b1 - b0).T + x @ (a1 - a0).T @ (b1 - b0).T)
    torch.testing.assert_close(change, parts)


def test_delta1_zero_when_a_frozen() -> None:
    model = _model(train="B")
    (name, layer), *_ = lorakit.lora_layers(model)
    assert not isinstance(layer.lora_A, nn.Parameter)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    d = DeltaDiagnostics(model, every=1, optimizer=opt)
    for _ in range(3):
        _step(model, opt, d, torch.randn(4, 6))
    assert all(r["layers"][name]["delta1"] == 0.0 for r in d.records)
    assert all(r["layers"][name]["delta2"] > 0 for r in d.records)
    with pytest.raises(ValueError, match="frozen"):
        suggest_ratio(d.records)


def test_every_k_jsonl_and_suggestion(tmp_path) -> None:
    model = _model(seed=1)
    (name, _), *_ = lorakit.lora_layers(model)
    opt = lorakit.make_optimizer(model, lr=1e-3, ratio=4.0)
    d = DeltaDiagnostics(model, every=3, run_dir=tmp_path, optimizer=opt, max_rows=5)
    for _ in range(10):
        _step(model, opt, d, torch.randn(8, 6))
    records = read_diagnostics(tmp_path)
    assert [r["step"] for r in records] == [0, 3, 6, 9]
    layer = records[1]["layers"][name]
    assert layer["lr_A"] == pytest.approx(1e-3)
    assert layer["lr_B"] == pytest.approx(4e-3)
    # suggestion = median over measured steps > 0 (none skipped at 3 records) of 4 * δ¹/δ²
    expected = statistics.median(
        4.0 * r["layers"][name]["delta1"] / r["layers"][name]["delta2"] for r in records[1:]
    )
    got = suggest_ratio(records, skip_fraction=0.0)
    assert got.ratio == pytest.approx(expected)
    assert got.current_ratio == pytest.approx(4.0)
    # the hook keeps at most max_rows rows: a second identical run with max_rows large changes the values
    assert d._tracked and d._tracked[0].x is None  # released after each step

    args = argparse.Namespace(run=str(tmp_path), plot=None, lr_a=None, lr_b=None, skip_fraction=0.1)
    assert diagnose.run_diagnose(args) == 0
    assert (tmp_path / "diagnostics.png").stat().st_size > 0


def test_diagnose_cli_errors(tmp_path) -> None:
    (tmp_path / "diagnostics.jsonl").write_text('{"step": 1, "layers": {"x": {"delta1": 1.0}}}\n')
    with pytest.raises(ValueError, match=r"line 1: layer 'x' lacks \['delta2'\]"):
        read_diagnostics(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_diagnostics(tmp_path / "missing")


def test_hf_callback_drives_diagnostics(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    model = _model(seed=2)
    callback_cls = diag.HFDeltaDiagnosticsCallback
    assert issubclass(callback_cls, transformers.TrainerCallback)
    callback = callback_cls(every=2)
    args, state, control = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=0), None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    callback.on_train_begin(args, state, control, model=model)
    for _ in range(5):
        callback.on_step_begin(args, state, control)
        model(torch.randn(4, 6)).pow(2).mean().backward()
        callback.on_pre_optimizer_step(args, state, control, optimizer=opt)
        opt.step()
        callback.on_optimizer_step(args, state, control)
        opt.zero_grad()
        state.global_step += 1
    callback.on_train_end(args, state, control)
    assert [r["step"] for r in read_diagnostics(tmp_path)] == [0, 2, 4]
