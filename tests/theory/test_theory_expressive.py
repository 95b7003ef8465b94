"""``lorakit reproduce expressive`` end to end on a tiny configuration (same code path as --quick)."""

import argparse
import itertools
import json

import pytest

from lorakit.experiments import expressive


@pytest.mark.slow
def test_tiny_reproduction_reaches_zero_at_threshold(tmp_path) -> None:
    parser = argparse.ArgumentParser()
    expressive.add_arguments(parser)
    args = parser.parse_args(
        [
            "--out",
            str(tmp_path),
            "--width",
            "8",
            "--seeds",
            "1",
            "--steps",
            "30",
            "--tfn-steps",
            "3",
            "--ranks",
            "1-5",
            "--no-progress",
        ]
    )
    assert expressive.run(args) == 0
    summary = json.loads((tmp_path / "expressive.json").read_text())
    assert set(summary["results"]) == set(expressive.FAMILIES)
    for family in ("linear", "fnn-1-2", "fnn-2-4", "tfn-1", "tfn-2"):
        result = summary["results"][family]
        assert result["threshold_rank"] == 4
        construction = dict(zip(result["ranks"], result["construction"]["median"], strict=True))
        assert construction[4] <= 1e-8, family
        assert construction[3] > 1e-6, family
        below = [construction[r] for r in range(1, 5)]
        assert all(a >= b for a, b in itertools.pairwise(below)), family  # monotone up to the threshold
        assert "gradient" in result and len(result["gradient"]["median"]) >= 1
        assert (tmp_path / f"{family.replace('-', '_')}.png").stat().st_size > 0
    linear = summary["results"]["linear"]
    predictions = linear["theory_gaussian_mse"]["median"]
    for got, predicted in zip(linear["construction"]["median"], predictions, strict=True):
        assert got == pytest.approx(predicted, rel=0.1, abs=1e-12)  # (1/D) Σ_{i>RL} σ_i², sampled
    flt = summary["results"]["flt"]
    assert len(flt["final_layers"]["median"]) == 7 and (tmp_path / "flt.png").exists()


def test_bad_arguments_are_named(tmp_path) -> None:
    parser = argparse.ArgumentParser()
    expressive.add_arguments(parser)
    with pytest.raises(ValueError, match="--families"):
        expressive.run(parser.parse_args(["--out", str(tmp_path), "--families", "nope"]))
    with pytest.raises(ValueError, match="--ranks"):
        expressive.run(parser.parse_args(["--out", str(tmp_path), "--ranks", "0-40"]))
