"""δ¹/δ²/δ³ diagnostics: hand-checked values, frozen factors, JSONL round trip, ratio suggestion, CLI."""

from __future__ import annotations

import argparse
import math
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
    a1, b1 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
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
    # loss1/loss2 are the first-order loss contributions ⟨dZ̄, δ¹⟩, ⟨dZ̄, δ²⟩ (LoRA+ App. B), dZ̄ = dL/d(output)
    outputs = []
    handle = layer.register_forward_hook(lambda _m, _i, out: outputs.append(out.retain_grad() or out))
    with torch.no_grad():
        layer.lora_A.copy_(a0)
        layer.lora_B.copy_(b0)
    model.zero_grad()
    model(x).pow(2).mean().backward()
    handle.remove()
    d_out = outputs[0].grad
    delta1 = s * x @ (a1 - a0).T @ b0.T
    delta2 = s * x @ a0.T @ (b1 - b0).T
    assert got["loss1"] == pytest.approx(float((d_out * delta1).sum()), rel=1e-4)
    assert got["loss2"] == pytest.approx(float((d_out * delta2).sum()), rel=1e-4)
    assert got["loss1"] < 0 and got["loss2"] < 0  # an SGD step lowers the loss through each factor
    # the three terms add up to the exact change of the LoRA features
    change = s * (x @ a1.T @ b1.T - x @ a0.T @ b0.T)
    parts = s * (x @ (a1 - a0).T @ b0.T + x @ a0.T @ (b1 - b0).T + x @ (a1 - a0).T @ (b1 - b0).T)
    torch.testing.assert_close(change, parts)


def test_every_layer_gets_its_own_terms_in_a_mixed_model() -> None:
    """Layers of different shapes, one with A frozen: the batched first-order sums map back to the right
    layer and factor (each equals ⟨g, Δθ⟩ of that factor alone)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1))
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, targets=["0", "2", "4"], rank_pattern={"4": 1}))
    layers = list(lorakit.lora_layers(model))
    with torch.no_grad():
        for _, layer in layers:
            layer.lora_B.copy_(torch.randn_like(layer.lora_B))
    model[4].lora_A.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
    d = DeltaDiagnostics(model, every=1, optimizer=opt)
    x = torch.randn(9, 6)
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    before = {
        name: [
            (t.detach().clone(), None if t.grad is None else t.grad.clone()) for t in (lay.lora_A, lay.lora_B)
        ]
        for name, lay in layers
    }
    d.before_step()
    opt.step()
    record = d.after_step()
    assert set(record["layers"]) == {n for n, _ in layers}
    for name, layer in layers:
        got = record["layers"][name]
        for key, (prev, grad), new in zip(
            ("loss1", "loss2"), before[name], (layer.lora_A, layer.lora_B), strict=True
        ):
            if grad is None:
                assert got[key] is None, (name, key)
            else:
                assert got[key] == pytest.approx(
                    diag.first_order_loss_term(grad, prev, new.detach()), rel=1e-12
                ), (
                    name,
                    key,
                )
        assert (got["delta1"] == 0.0) == (name.endswith("4"))


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
    assert all(r["layers"][name]["loss1"] is None for r in d.records)  # a buffer has no gradient
    for criterion in ("feature", "loss"):
        with pytest.raises(ValueError, match="frozen"):
            suggest_ratio(d.records, criterion=criterion)
    with pytest.raises(ValueError, match="criterion"):
        suggest_ratio(d.records, criterion="rms")


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
    got = suggest_ratio(records, skip_fraction=0.0, criterion="feature")
    assert got.ratio == pytest.approx(expected)
    assert got.current_ratio == pytest.approx(4.0)
    decreasing = [
        r["layers"][name]
        for r in records[1:]
        if max(r["layers"][name]["loss1"], r["layers"][name]["loss2"]) < 0
    ]
    if decreasing:  # the default criterion balances the first-order loss decreases
        got = suggest_ratio(records, skip_fraction=0.0)
        assert got.criterion == "loss"
        assert got.ratio == pytest.approx(
            statistics.median(4.0 * v["loss1"] / v["loss2"] for v in decreasing)
        )
    assert suggest_ratio(records, skip_fraction=0.0, criterion="feature", max_step=3).samples == 1
    # the hook keeps at most max_rows rows: a second identical run with max_rows large changes the values
    assert d._tracked and d._tracked[0].x is None  # released after each step

    args = argparse.Namespace(
        run=str(tmp_path), plot=None, lr_a=None, lr_b=None, skip_fraction=0.1, criterion="loss"
    )
    assert diagnose.run_diagnose(args) == 0
    assert (tmp_path / "diagnostics.png").stat().st_size > 0


@pytest.mark.parametrize("criterion", ["feature", "loss"])
def test_suggested_ratio_balances_one_gd_step_on_the_toy(criterion: str) -> None:
    """The derivation: under GD each term is linear in its factor's rate at a fixed state, so one step from
    the same state at (η, λ'·η) must make the two terms equal (the LoRA+ Fig. 2 toy, n = 100)."""
    toy = pytest.importorskip("lorakit.experiments.loraplus_toy")
    problem = toy.make_problem(100, n_train=200, n_test=10, seed=3)

    def step_terms(eta_a: float, eta_b: float) -> dict[str, float]:
        result = toy.train_configs(problem, [eta_a], [eta_b], 1, "gd", [1], delta_steps=[1])
        values = (*result.deltas[:2, 0, 0], *result.loss_terms[:, 0, 0])
        return {k: float(v) for k, v in zip(("delta1", "delta2", "loss1", "loss2"), values, strict=True)}

    eta = 1e-3
    first = step_terms(eta, eta)
    record = {"step": 1, "layers": {"toy": {**first, "lr_A": eta, "lr_B": eta}}}
    lam = suggest_ratio([record], skip_fraction=0.0, criterion=criterion).ratio
    key1, key2 = ("delta1", "delta2") if criterion == "feature" else ("loss1", "loss2")
    assert not math.isclose(first[key1], first[key2], rel_tol=0.1)  # unbalanced at λ = 1: the check can fail
    balanced = step_terms(eta, lam * eta)
    assert balanced[key1] == pytest.approx(first[key1], rel=1e-4)  # the A term does not depend on η_B
    assert balanced[key2] == pytest.approx(balanced[key1], rel=1e-3)


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


def _linear_model(seed: int = 0) -> nn.Module:
    """One adapted nn.Linear in float64: with the other factor fixed, an MSE loss is quadratic in each."""
    torch.manual_seed(seed)
    model = lorakit.inject(nn.Sequential(nn.Linear(6, 5)), lorakit.LoraConfig(r=2, alpha=4, targets=["0"]))
    model = model.double()
    (_, layer), *_ = lorakit.lora_layers(model)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn_like(layer.lora_A))
        layer.lora_B.copy_(torch.randn_like(layer.lora_B))
    return model


def test_curvature_terms_closed_form_on_a_linear_layer() -> None:
    """``curv1 = ⟨ΔA, H_AA ΔA⟩ = (2/(M·d_out)) Σ_i ‖s·B ΔA x_i‖²`` for L = mean((W x + s·B A x − y)²), and
    ``curv2`` likewise with ``s·ΔB A x_i``: the finite difference is exact for a quadratic (float64)."""
    model = _linear_model()
    (name, layer), *_ = lorakit.lora_layers(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    d = DeltaDiagnostics(model, every=2, optimizer=opt)
    x, y = torch.randn(9, 6, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    calls = []

    def loss_fn() -> torch.Tensor:
        calls.append(1)
        return (model(x) - y).pow(2).mean()

    for step in range(3):
        a0, b0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
        opt.zero_grad()
        loss_fn().backward()
        calls.clear()
        d.before_step()
        opt.step()
        a1, b1 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
        d.after_step(loss_fn=loss_fn)
        assert len(calls) == (4 if step % 2 == 0 else 0)  # ±ε per factor, measured steps only
        torch.testing.assert_close(layer.lora_A.detach(), a1, rtol=0, atol=0)  # parameters restored
        torch.testing.assert_close(layer.lora_B.detach(), b1, rtol=0, atol=0)
    assert [r["step"] for r in d.records] == [0, 2]
    got = d.records[-1]["layers"][name]
    s = layer.scaling
    curv1 = 2.0 / y.numel() * (s * x @ (a1 - a0).T @ b0.T).pow(2).sum()
    curv2 = 2.0 / y.numel() * (s * x @ a0.T @ (b1 - b0).T).pow(2).sum()
    assert got["curv1"] == pytest.approx(float(curv1), rel=1e-10)
    assert got["curv2"] == pytest.approx(float(curv2), rel=1e-10)
    # the quadratic model m·loss + ½m²·curv of each factor: λ' = λ·(loss2/curv2)/(loss1/curv1), λ = 1
    got_ratio = suggest_ratio(d.records[-1:], skip_fraction=0.0, criterion="curvature").ratio
    assert got_ratio == pytest.approx((got["loss2"] / got["curv2"]) / (got["loss1"] / got["curv1"]))

    # and m*_A = −loss1/curv1 is the exact minimiser of the loss along ΔA (quadratic in A)
    def loss_along_a(m: float) -> float:
        with torch.no_grad():
            layer.lora_A.copy_(a0 + m * (a1 - a0))
            layer.lora_B.copy_(b0)
            return float((model(x) - y).pow(2).mean())

    m_star = -got["loss1"] / got["curv1"]
    assert loss_along_a(m_star) < min(loss_along_a(0.9 * m_star), loss_along_a(1.1 * m_star))


@pytest.mark.parametrize("with_optimizer", [True, False], ids=["optimizer", "model-only"])
def test_curvature_is_taken_with_a_trained_head_at_its_pre_step_value(with_optimizer: bool) -> None:
    """A trained task head moves in the same step; the curvature must still be the Hessian at the pre-step
    state of every trainable parameter, and the head must be back at its post-step value afterwards."""
    model = _model(seed=5).double()
    model.head.requires_grad_(True)
    (name, layer), *_ = lorakit.lora_layers(model)
    head = list(model.head.parameters())
    opt = torch.optim.SGD([{"params": [layer.lora_A, layer.lora_B], "lr": 0.05}, {"params": head, "lr": 0.5}])
    d = DeltaDiagnostics(model, every=1, optimizer=opt if with_optimizer else None, curvature_eps=1e-5)
    x = torch.randn(16, 6, dtype=torch.float64)

    def loss_fn() -> torch.Tensor:
        return model(x).pow(2).mean()

    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt.zero_grad()
    loss_fn().backward()
    d.before_step()
    opt.step()
    after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    got = d.after_step(loss_fn=loss_fn)["layers"][name]
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), after[n]), f"{n} not restored to its post-step value"
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(before[n])
    d_a = after[f"{name}.lora_A"] - before[f"{name}.lora_A"]
    d_b = after[f"{name}.lora_B"] - before[f"{name}.lora_B"]
    g_a, g_b = torch.autograd.grad(loss_fn(), (layer.lora_A, layer.lora_B), create_graph=True)
    h_a = torch.autograd.grad((g_a * d_a).sum(), layer.lora_A, retain_graph=True)[0]
    h_b = torch.autograd.grad((g_b * d_b).sum(), layer.lora_B)[0]
    assert got["curv1"] == pytest.approx(float((d_a * h_a).sum()), rel=1e-5)
    assert got["curv2"] == pytest.approx(float((d_b * h_b).sum()), rel=1e-5)


def test_curvature_matches_double_backward() -> None:
    """On a non-quadratic loss (tanh head) a small ε gives the Hessian at the pre-step state."""
    model = _model(seed=4).double()
    (name, layer), *_ = lorakit.lora_layers(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    d = DeltaDiagnostics(model, every=1, optimizer=opt, curvature_eps=1e-4)
    x = torch.randn(7, 6, dtype=torch.float64)

    def loss_fn() -> torch.Tensor:
        return model(x).pow(2).mean()

    a0, b0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    opt.zero_grad()
    loss_fn().backward()
    d.before_step()
    opt.step()
    d_a, d_b = layer.lora_A.detach() - a0, layer.lora_B.detach() - b0
    got = d.after_step(loss_fn=loss_fn)["layers"][name]
    with torch.no_grad():
        layer.lora_A.copy_(a0)
        layer.lora_B.copy_(b0)
    g_a, g_b = torch.autograd.grad(loss_fn(), (layer.lora_A, layer.lora_B), create_graph=True)
    h_a = torch.autograd.grad((g_a * d_a).sum(), layer.lora_A, retain_graph=True)[0]
    h_b = torch.autograd.grad((g_b * d_b).sum(), layer.lora_B)[0]
    assert got["curv1"] == pytest.approx(float((d_a * h_a).sum()), rel=1e-6)
    assert got["curv2"] == pytest.approx(float((d_b * h_b).sum()), rel=1e-6)


def test_curvature_and_sharpness_criteria_need_their_fields() -> None:
    model = _model(seed=5)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    d = DeltaDiagnostics(model, every=1, optimizer=opt)
    for _ in range(3):
        _step(model, opt, d, torch.randn(8, 6))
    assert all("curv1" not in layer for r in d.records for layer in r["layers"].values())
    assert suggest_ratio(d.records).ratio > 0  # the first-order criteria still work
    with pytest.raises(ValueError, match=r"'curvature' needs .*lack \['curv1', 'curv2'\].*loss_fn"):
        suggest_ratio(d.records, criterion="curvature")
    with pytest.raises(ValueError, match=r"lack \['sharp1', 'sharp2'\].*toy"):
        suggest_ratio(d.records, criterion="sharpness")
    with pytest.raises(ValueError, match="curvatures > 0"):
        diag.quadratic_model_ratio(-1.0, -1.0, 0.0, 1.0, 1.0)
    record = {"step": 1, "layers": {"x": {"delta1": 1.0, "delta2": 1.0, "sharp1": 6.0, "sharp2": 2.0}}}
    assert suggest_ratio([record], lr_A=1.0, lr_B=1.0, skip_fraction=0.0, criterion="sharpness").ratio == 3.0


def test_toy_curvature_terms_match_autograd() -> None:
    """The toy's hand-written ⟨Δθ, H Δθ⟩ and power-iteration λ_max per factor equal float64 autograd."""
    toy = pytest.importorskip("lorakit.experiments.loraplus_toy")
    problem = toy.make_problem(12, n_train=40, n_test=4, seed=2)
    eta_a, eta_b, steps = 0.02, 0.05, 3
    result = toy.train_configs(problem, [eta_a], [eta_b], steps, "gd", [steps], [1, 2, 3], curvature=True)
    h = torch.relu(problem.x_train @ problem.W_in.T).double()
    y, w_out = problem.y_train.double(), problem.W_out.double()
    a, b = problem.A0.double(), problem.B0.double()

    def loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (torch.relu(h @ a.T @ b.T) @ w_out - y).pow(2).mean()

    for col in range(steps):
        g_a, g_b = torch.autograd.functional.jacobian(loss, (a, b))
        d_a, d_b = -eta_a * g_a, -eta_b * g_b
        h_aa = torch.autograd.functional.hessian(lambda v, b=b: loss(v, b), a).reshape(a.numel(), -1)
        h_bb = torch.autograd.functional.hessian(lambda v, a=a: loss(a, v), b).reshape(b.numel(), -1)
        curv = [d_a.reshape(-1) @ h_aa @ d_a.reshape(-1), d_b.reshape(-1) @ h_bb @ d_b.reshape(-1)]
        top = [torch.linalg.eigvalsh(h_aa)[-1], torch.linalg.eigvalsh(h_bb)[-1]]
        for k in range(2):
            assert result.curvature[k, 0, col] == pytest.approx(float(curv[k]), rel=1e-4)
            assert result.sharpness[k, 0, col] == pytest.approx(float(top[k]), rel=1e-3)
        a, b = a + d_a, b + d_b
