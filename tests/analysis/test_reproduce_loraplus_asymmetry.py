"""End-to-end: ``lorakit reproduce loraplus`` / ``asymmetry`` code paths on small configurations."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lorakit.experiments import asymmetry, loraplus_toy

pytestmark = pytest.mark.slow


def test_loraplus_small_reproduction(tmp_path) -> None:
    config = loraplus_toy.ToyConfig(
        fig2_etas=tuple(np.logspace(-3, 0, 4)),
        fig2_steps=30,
        fig2_seeds=2,
        n_train=200,
        ratio_scan_per_decade=4,
        ratio_scan_decades=1.0,
        ratio_iterations=2,
        widths=(64, 1024),
        width_seeds=2,
        width_n_train=32,
        width_steps=20,
        bootstrap=50,
        delta_steps=5,
        optimizers=("adam",),
    )
    loraplus_toy.reproduce(config, tmp_path, progress=False)
    data = json.loads((tmp_path / "loraplus_toy.json").read_text())
    assert (tmp_path / "fig2_heatmaps.png").stat().st_size > 0
    assert (tmp_path / "width_scaling.png").stat().st_size > 0
    etas = data["fig2"]["eta_grid"]
    for panel in data["fig2"]["panels"].values():
        grid = np.asarray(panel["loss_grid"])
        i, j = np.unravel_index(np.argmin(grid), grid.shape)
        assert panel["best"]["index"] == [i, j]
        assert panel["best"]["eta_A"] == etas[i] and panel["best"]["eta_B"] == etas[j]
        assert [int(i), int(j)] in panel["near_best"]
    adam = data["width_scaling"]["optimizers"]["adam"]
    widths = data["width_scaling"]["widths"]
    for width, ratio in zip(widths, adam["best_ratio"], strict=True):
        if width >= 1024:
            assert ratio > 1.0
    # δ¹ grows with width at a shared rate; with eta_A ∝ 1/n it stays within a factor 2
    shared = data["deltas_vs_width"]["settings"]["shared"]["delta1"]
    scaled = data["deltas_vs_width"]["settings"]["eta_A_inv_n"]["delta1"]
    assert shared[-1] > 4 * shared[0]
    assert 0.5 < scaled[-1] / scaled[0] < 2.0
    # ratio check: the band is what the scan and grid say, and inside_band is what the numbers say
    check = data["ratio_suggestion_check"]
    assert check["criterion"] == "loss"
    for t, entry in check["by_step"].items():
        band = entry["band"]
        scan = np.asarray(band["scan_loss"])
        limit = band["best_loss"] * (1 + config.tolerance)
        assert (
            band["best_loss"] <= np.min(scan)
            and band["best_loss"] <= data["fig2"]["panels"][f"train@{t}"]["best"]["loss"]
        )
        near = np.asarray(band["scan_ratios"])[np.isfinite(scan) & (scan <= limit)]
        assert sorted(near.tolist()) == pytest.approx(band["points_scan"])
        points = band["points_scan"] + band["points_grid"]
        assert points and band["band"][0] < min(points) <= max(points) < band["band"][1]
        for criterion, found in entry["suggestions"].items():
            assert found["ratio"] > 0 and len(found["per_seed"]) == config.fig2_seeds, criterion
            assert found["inside_band"] == (band["band"][0] <= found["ratio"] <= band["band"][1])
    final = check["by_step"][str(config.fig2_steps)]
    assert set(final["suggestions"]) == {"feature", "loss", "curvature", "sharpness"}
    assert check["criteria_at_T"] == {
        name: {"ratio": found["ratio"], "inside_band": found["inside_band"]}
        for name, found in final["suggestions"].items()
    }
    assert check["suggested_ratio"] == final["suggestions"]["loss"]["ratio"]
    assert check["band"] == final["band"]["band"]
    assert check["inside_band"] == (check["band"][0] <= check["suggested_ratio"] <= check["band"][1])
    assert check["iterated"][0] == 1.0 and check["iterated"][1] == pytest.approx(check["suggested_ratio"])


def test_asymmetry_small_reproduction(tmp_path) -> None:
    config = asymmetry.AsymmetryConfig(
        dims=(8, 16),
        ranks=(1, 4),
        mc_samples=60,
        n_train=600,
        n_test=600,
        curve_dim=16,
        curve_ranks=(1, 4, 8),
        gd_steps=400,
    )
    asymmetry.reproduce(config, tmp_path, progress=False)
    data = json.loads((tmp_path / "asymmetry.json").read_text())
    assert (tmp_path / "loss_vs_rank.png").stat().st_size > 0
    for row in data["monte_carlo"]:
        assert abs(row["frozen_B_z"]) < 4.0
        if row["sigma"] == "aniso":
            assert row["frozen_A_mc"] < row["frozen_B_mc"]
    curve = data["loss_vs_rank"]
    assert all(a < b for a, b in zip(curve["frozen_A_mc"], curve["frozen_B_mc"], strict=True))
    assert all(o <= g * (1 + 1e-9) for o, g in zip(curve["lora_optimum"], curve["lora_gd"], strict=True))
