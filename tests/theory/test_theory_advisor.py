"""Rank advisor on constructed pairs with known spectra, on PEFT adapters, and through the CLI."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from lorakit.theory.advisor import (
    adapter_deltas,
    advise,
    frobenius_rank,
    spectral_rank,
)


def _with_spectrum(s: list[float], m: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return U @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ V.mT


def _brute_force(delta: torch.Tensor, tol: float) -> tuple[int, int]:
    U, S, Vh = torch.linalg.svd(delta)
    ranks = []
    for ord_ in ("fro", 2):
        for r in range(S.numel() + 1):
            approx = (U[:, :r] * S[:r]) @ Vh[:r]
            if torch.linalg.matrix_norm(delta - approx, ord=ord_) <= tol * torch.linalg.matrix_norm(
                delta, ord=ord_
            ):
                ranks.append(r)
                break
    return ranks[0], ranks[1]


def test_rank_rules_match_eckart_young() -> None:
    s = torch.tensor([10.0, 4.0, 3.0, 0.5, 0.2], dtype=torch.float64)
    assert frobenius_rank(s, 0.1) == 3  # sqrt(0.29 / 125.29) = 0.048 <= 0.1 < sqrt(9.29 / 125.29)
    assert spectral_rank(s, 0.1) == 3  # σ_4 / σ_1 = 0.05
    assert spectral_rank(s, 0.35) == 2 and frobenius_rank(s, 0.35) == 2
    assert frobenius_rank(torch.zeros(3), 0.1) == 0


def test_advisor_on_full_models_with_known_spectra() -> None:
    D = 12
    base = {f"model.layers.{i}.attn.q_proj.weight": torch.randn(D, D, dtype=torch.float64) for i in range(4)}
    base["model.layers.0.mlp.up.weight"] = torch.randn(2 * D, D, dtype=torch.float64)
    base["model.norm.weight"] = torch.ones(D, dtype=torch.float64)
    spectra = {0: [5.0, 1.0, 0.01], 1: [3.0, 2.0, 1.0, 0.5, 0.1], 2: [1.0], 3: [2.0, 2.0, 2.0, 2.0]}
    tuned = dict(base)
    for i, s in spectra.items():
        key = f"model.layers.{i}.attn.q_proj.weight"
        tuned[key] = base[key] + _with_spectrum(s, D, D, seed=i)
    up = _with_spectrum([4.0, 0.3, 0.2], 2 * D, D, seed=9)
    tuned["model.layers.0.mlp.up.weight"] = base["model.layers.0.mlp.up.weight"] + up
    result = advise(base, tuned, tol=0.15, group_size=2)
    assert len(result.weights) == 5  # norm weights and unchanged tensors are skipped
    by_name = {w.name: w for w in result.weights}
    for i, s in spectra.items():
        report = by_name[f"model.layers.{i}.attn.q_proj"]
        delta = tuned[f"model.layers.{i}.attn.q_proj.weight"] - base[f"model.layers.{i}.attn.q_proj.weight"]
        assert (report.rank_frobenius, report.rank_spectral) == _brute_force(delta, 0.15)
        assert report.numerical_rank == len(s)
    assert by_name["model.layers.0.mlp.up"].layer_type == "up"
    assert result.by_type["q_proj"]["count"] == 4
    assert result.overall["rank_spectral_max"] == 4
    # Stack bound: rank of the group discrepancy T_1 T_0 - B_1 B_0, divided by the group size.
    stacks = [st for st in result.stacks if st["layer_type"] == "q_proj"]
    assert [st["layers"] for st in stacks] == [[0, 1], [2, 3]]
    names = [f"model.layers.{i}.attn.q_proj.weight" for i in range(4)]
    E = tuned[names[1]] @ tuned[names[0]] - base[names[1]] @ base[names[0]]
    expected = frobenius_rank(torch.linalg.svdvals(E), 0.15)
    assert stacks[0]["group_rank_frobenius"] == expected
    assert stacks[0]["distributed_rank"] == math.ceil(expected / 2)


def test_adapter_deltas_match_peft(tmp_path) -> None:
    peft = pytest.importorskip("peft")

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = torch.nn.Linear(10, 8)
            self.k = torch.nn.Linear(10, 6)
            self.emb = torch.nn.Embedding(7, 10)

        def forward(self, x):
            return self.q(self.emb(x))

    torch.manual_seed(0)
    for rslora in (False, True):
        config = peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q", "k", "emb"],
            rank_pattern={"k": 2},
            alpha_pattern={"k": 5},
            use_rslora=rslora,
            init_lora_weights=False,
        )
        model = peft.get_peft_model(Tiny(), config)
        folder = tmp_path / f"adapter_{rslora}"
        model.save_pretrained(folder)
        deltas = adapter_deltas(folder)
        assert set(deltas) == {"q", "k", "emb"}
        for name in ("q", "k", "emb"):
            expected = getattr(model.base_model.model, name).get_delta_weight("default").double()
            assert torch.allclose(deltas[name], expected, atol=1e-6), name
        report = {w.name: w for w in advise(None, folder, tol=0.01).weights}
        assert report["k"].numerical_rank == 2 and report["q"].numerical_rank == 4


def test_adapter_errors_name_the_field(tmp_path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 3, "lora_alpha": 6}))
    save_file(
        {
            "base_model.model.layer.lora_A.weight": torch.randn(2, 5),
            "base_model.model.layer.lora_B.weight": torch.randn(4, 2),
        },
        str(folder / "adapter_model.safetensors"),
    )
    with pytest.raises(ValueError, match="config gives rank 3 but the saved factors have rank 2"):
        adapter_deltas(folder)


def test_cli_writes_table_json_and_plot(tmp_path, monkeypatch, capsys) -> None:
    import lorakit.cli as cli

    base = {"layers.0.w.weight": torch.randn(6, 6), "layers.1.w.weight": torch.randn(6, 6)}
    tuned = {k: v + 0.5 * torch.outer(torch.randn(6), torch.randn(6)) for k, v in base.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    (tmp_path / "tuned").mkdir()
    save_file(tuned, str(tmp_path / "tuned" / "model.safetensors"))
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("advisor",))
    argv = ["rank-advisor", "--base", str(tmp_path / "base.safetensors"), "--tuned", str(tmp_path / "tuned")]
    assert cli.main([*argv, "--group-size", "2", "--out", str(tmp_path / "out")]) == 0
    table = capsys.readouterr().out
    assert "overall" in table and "distributed bound" in table
    data = json.loads((tmp_path / "out" / "rank_advisor.json").read_text())
    assert data["overall"]["rank_frobenius_max"] == 1
    assert (tmp_path / "out" / "rank_advisor.png").stat().st_size > 0
    assert (
        cli.main(["rank-advisor", "--base", str(tmp_path / "missing"), "--tuned", str(tmp_path / "tuned")])
        == 2
    )
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize(("dtype", "size"), [(torch.float32, 1e-4), (torch.bfloat16, 0.05)])
def test_numerical_rank_of_a_small_update_ignores_the_rounding_of_the_stored_weights(dtype, size) -> None:
    """W_tuned = W_base + a rank-3 change of ``size`` × ‖W‖₂, both stored in ``dtype``: rounding the stored
    weights adds full-rank noise to their difference; only the 3 real directions are above it (bf16 keeps
    about 3 significant digits, so its change must be larger to stand out)."""
    g = torch.Generator().manual_seed(0)
    D = 64
    base_weight = torch.randn(D, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    change = torch.randn(D, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, D, generator=g, dtype=torch.float64
    )
    change *= (
        size * float(torch.linalg.matrix_norm(base_weight, 2)) / float(torch.linalg.matrix_norm(change, 2))
    )
    base = {"layers.0.q.weight": base_weight.to(dtype)}
    tuned = {"layers.0.q.weight": (base_weight + change).to(dtype)}
    (report,) = advise(base, tuned, tol=0.1).weights
    assert report.numerical_rank == 3
    delta = tuned["layers.0.q.weight"].double() - base["layers.0.q.weight"].double()
    assert int((torch.linalg.svdvals(delta) > 1e-12).sum()) == D  # the rounding noise is there, full rank
