"""Sweep engine: grid expansion, resume after failure/Ctrl-C, CSV ↔ heatmap ↔ sweep.json consistency,
process pool and Ray backends, and a tiny random model through the fine-tuning API; the metric direction
(a loss is minimised), absolute paths for Ray workers, reruns with changed settings, and the CLI's options."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from conftest import save_tiny_bert
from lorakit.train.sweep import (
    aggregate,
    cell_id,
    compared_metric,
    expand_grid,
    load_cells,
    run_sweep,
    synthetic_cell,
    top_k_ratio,
    write_reports,
)


def counting_cell(cell: dict, log: str, control: str | None = None) -> dict:
    """Synthetic metric; appends the cell id to ``log`` so the test can count calls. ``control``: a JSON file
    (read if it exists) naming the cell to fail (``fail_on``) and the one to interrupt (``interrupt_on``),
    so that a rerun with the same context can behave differently."""
    cid = cell_id(cell)
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(cid + "\n")
    plan = json.loads(Path(control).read_text()) if control and Path(control).exists() else {}
    if cid == plan.get("interrupt_on"):
        raise KeyboardInterrupt
    if cid == plan.get("fail_on"):
        raise ValueError("boom")
    return synthetic_cell(cell)


def _calls(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


GRID = {"eta_a": [1e-5, 1e-4, 1e-3], "eta_b": [1e-4, 1e-3, 1e-2]}


def test_expand_grid_product_order_and_errors():
    cells = expand_grid({**GRID, "seed": [0, 1]})
    assert len(cells) == 18
    assert cells[0] == {"eta_a": 1e-5, "eta_b": 1e-4, "seed": 0}
    assert cells[1] == {"eta_a": 1e-5, "eta_b": 1e-4, "seed": 1}
    assert len({cell_id(c) for c in cells}) == 18
    assert cell_id({"eta_a": 1e-4, "eta_b": 2e-3, "rank": 8}) == "eta_a=0.0001,eta_b=0.002,rank=8"
    with pytest.raises(ValueError, match="axis 'eta_b'"):
        expand_grid({"eta_a": [1e-4], "eta_b": []})
    with pytest.raises(ValueError, match="repeats"):
        expand_grid({"eta_a": [1e-4, 1e-4]})


def test_resume_skips_finished_cells_after_interrupt_and_reruns_failed(tmp_path):
    cells = expand_grid(GRID)
    ids = [cell_id(c) for c in cells]
    log, out, control = tmp_path / "calls.txt", tmp_path / "sweep", tmp_path / "control.json"
    context = {"log": str(log), "control": str(control)}
    control.write_text(json.dumps({"fail_on": ids[1], "interrupt_on": ids[4]}))
    with pytest.raises(KeyboardInterrupt):
        run_sweep(counting_cell, cells, out, context=context)
    recorded = {r["id"]: r["status"] for r in load_cells(out)}
    assert recorded == {ids[0]: "finished", ids[1]: "failed", ids[2]: "finished", ids[3]: "finished"}
    assert "boom" in next(r["error"] for r in load_cells(out) if r["id"] == ids[1])
    log.unlink()
    control.unlink()
    result = run_sweep(counting_cell, cells, out, context=context)
    # the failed cell and the never-finished ones run again; the three finished cells do not
    assert sorted(_calls(log)) == sorted([ids[1], *ids[4:]])
    assert sorted(result.skipped) == sorted([ids[0], ids[2], ids[3]])
    assert len(load_cells(out)) == 9 and all(r["status"] == "finished" for r in load_cells(out))
    log.unlink()
    again = run_sweep(counting_cell, cells, out, context=context)
    assert _calls(log) == [] and len(again.skipped) == 9


@pytest.mark.parametrize("metric", ["metric", "train_loss"])
def test_heatmap_csv_and_json_agree_on_best_cell(tmp_path, metric):
    cells = expand_grid({**GRID, "seed": [0, 1]})
    result = run_sweep(synthetic_cell, cells, tmp_path, context={"noise": 0.05}, metric=metric)
    with open(tmp_path / "grid.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 9 and all(r["n"] == "2" for r in rows)
    pick = max if metric == "metric" else min
    best_csv = pick(rows, key=lambda r: float(r["mean"]))
    summary = json.loads((tmp_path / "sweep.json").read_text())
    best = summary["ranks"]["None"]["best"]
    assert (best["eta_a"], best["eta_b"]) == (float(best_csv["eta_a"]), float(best_csv["eta_b"]))
    heat = json.loads((tmp_path / f"heatmap_{metric}.json").read_text())
    flat = [
        (a, b, v)
        for a, row in zip(heat["eta_a"], heat["values"], strict=True)
        for b, v in zip(heat["eta_b"], row, strict=True)
    ]
    assert pick(flat, key=lambda t: t[2])[:2] == (best["eta_a"], best["eta_b"])
    assert (tmp_path / f"heatmap_{metric}.png").stat().st_size > 1000
    # the within-1% set is exactly the cells whose CSV mean is within 1% of the best
    margin = 0.01 * abs(float(best_csv["mean"]))
    sign = 1 if metric == "metric" else -1
    expected = {
        (float(r["eta_a"]), float(r["eta_b"]))
        for r in rows
        if sign * (float(r["mean"]) - float(best_csv["mean"])) >= -margin
    }
    assert {(c["eta_a"], c["eta_b"]) for c in heat["within_tolerance"]} == expected
    # cells.csv has one row per (cell, seed) and its means reproduce grid.csv
    with open(tmp_path / "cells.csv", newline="") as handle:
        raw = list(csv.DictReader(handle))
    assert len(raw) == 18
    group = [
        float(r[metric])
        for r in raw
        if (float(r["eta_a"]), float(r["eta_b"])) == (best["eta_a"], best["eta_b"])
    ]
    assert sum(group) / 2 == pytest.approx(float(best_csv["mean"]))
    assert result.report["top_k_all_ranks"]["k"] == 4


def test_top_k_ratio_is_the_median_of_the_best_cells():
    rows = [
        {"eta_a": 1e-4, "eta_b": 1.6e-3, "mean": 0.9},
        {"eta_a": 1e-4, "eta_b": 1e-4, "mean": 0.5},
        {"eta_a": 1e-3, "eta_b": 4e-3, "mean": 0.8},
        {"eta_a": 1e-5, "eta_b": 6.4e-4, "mean": 0.85},
        {"eta_a": 1e-3, "eta_b": 1e-3, "mean": math.nan},
    ]
    stat = top_k_ratio(rows, k=3)
    assert stat["ratios"] == pytest.approx([16.0, 64.0, 4.0])
    assert stat["median_ratio"] == pytest.approx(16.0) and stat["median_log2_ratio"] == pytest.approx(4.0)
    assert top_k_ratio(rows, k=2, higher=False)["ratios"] == pytest.approx([1.0, 4.0])


def test_synthetic_sweep_recovers_the_planted_ratio(tmp_path):
    cells = expand_grid({"eta_a": [1e-5, 1e-4, 1e-3], "eta_b": [1e-5, 1e-4, 1.6e-3, 1.6e-2, 1e-1]})
    report = run_sweep(synthetic_cell, cells, tmp_path, context={"optimum_ratio": 16.0}).report
    assert report["top_k_all_ranks"]["median_ratio"] == pytest.approx(16.0)


def test_failed_and_diverged_cells_are_left_out_of_the_mean():
    records = [
        {"cell": {"eta_a": 1e-4, "eta_b": 1e-3, "seed": 0}, "status": "finished", "metrics": {"metric": 0.8}},
        {
            "cell": {"eta_a": 1e-4, "eta_b": 1e-3, "seed": 1},
            "status": "diverged",
            "metrics": {"metric": math.nan},
        },
        {"cell": {"eta_a": 1e-4, "eta_b": 1e-3, "seed": 2}, "status": "failed", "metrics": {}},
    ]
    (row,) = aggregate(records, "metric")
    assert row["n"] == 1 and row["n_bad"] == 2 and row["mean"] == pytest.approx(0.8)


def test_process_pool_backend(tmp_path):
    cells = expand_grid({"eta_a": [1e-4, 1e-3], "eta_b": [1e-3, 1e-2]})
    result = run_sweep("lorakit.train.sweep:synthetic_cell", cells, tmp_path, workers=2)
    records = load_cells(tmp_path)
    assert len(result.ran) == 4 and len({r["pid"] for r in records}) >= 1
    for r in records:
        assert r["metrics"]["metric"] == pytest.approx(synthetic_cell(r["cell"])["metric"])


def test_ray_backend(tmp_path):
    ray = pytest.importorskip(
        "ray",
        reason="Ray is not installed (optional extra: pip install 'lorakit[ray]'); Ray backend not tested",
    )
    cells = expand_grid({"eta_a": [1e-4, 1e-3], "eta_b": [1e-3, 1e-2]})
    run_sweep(synthetic_cell, cells[:2], tmp_path)  # recorded locally first: Ray must skip these two
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = run_sweep("lorakit.train.sweep:synthetic_cell", cells, tmp_path, backend="ray")
    finally:
        ray.shutdown()
    assert len(result.skipped) == 2 and len(result.ran) == 2
    records = load_cells(tmp_path)
    assert len(records) == 4 and all(r["status"] == "finished" for r in records)
    for r in records:
        assert r["metrics"]["metric"] == pytest.approx(synthetic_cell(r["cell"])["metric"])


def test_reports_without_grid_axes_skip_heatmaps(tmp_path):
    records = [{"id": "a", "cell": {"x": 1}, "status": "finished", "metrics": {"metric": 1.0}}]
    summary = write_reports(tmp_path, records)
    assert "heatmap" not in summary["ranks"]["None"] and (tmp_path / "cells.csv").exists()


@pytest.fixture
def tiny_task(tmp_path):
    """A tiny random BERT classifier saved with its own word-level tokenizer, and a 2-class CSV task."""
    words = ["good", "great", "fine", "bad", "awful", "poor", "movie", "the", "was"]
    model_dir = save_tiny_bert(tmp_path / "model", words, hidden=16, layers=1, heads=2, intermediate=24)
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 24), ("dev", 8)):
        lines = ["text,label"] + [
            f"the movie was {words[i % 6]},{'pos' if i % 6 < 3 else 'neg'}" for i in range(n)
        ]
        (data / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return model_dir, data


def test_finetune_cells_with_a_tiny_random_model(tiny_task, tmp_path):
    from lorakit.train.run import FinetuneConfig

    model_dir, data = tiny_task
    base = FinetuneConfig(
        data=str(data),
        model=str(model_dir),
        max_steps=2,
        batch_size=8,
        max_length=16,
        progress=False,
        precision="fp32",
    ).to_dict()
    out = tmp_path / "sweep"
    cells = expand_grid({"eta_a": [1e-3], "eta_b": [1e-3, 1.6e-2]})
    result = run_sweep(
        "lorakit.train.sweep:finetune_cell", cells, out, context={"base": base, "runs": str(out / "runs")}
    )
    assert not result.failed, [r.get("error") for r in load_cells(out)]
    for record in load_cells(out):
        summary = json.loads((Path(record["metrics"]["run_dir"]) / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["steps"] == 2
        assert record["metrics"]["metric"] == pytest.approx(summary["final_metrics"]["accuracy"])
        assert math.isfinite(record["metrics"]["train_loss"])
        config = json.loads((Path(record["metrics"]["run_dir"]) / "config.json").read_text())
        method = config["config"]["method"]
        assert method["lr"] == record["cell"]["eta_a"]
        assert method["lr"] * method["ratio"] == pytest.approx(record["cell"]["eta_b"])
    assert (out / "heatmap_metric.png").exists() and (out / "heatmap_train_loss.png").exists()
    again = run_sweep(
        "lorakit.train.sweep:finetune_cell", cells, out, context={"base": base, "runs": str(out / "runs")}
    )
    assert len(again.skipped) == 2 and not again.ran


def test_cli_sweep_synthetic(tmp_path, monkeypatch, capsys):
    import lorakit.cli

    monkeypatch.setattr(lorakit.cli, "COMMAND_MODULES", ("sweep",))
    out = tmp_path / "dry"
    argv = [
        "sweep",
        "--synthetic",
        "--eta-a",
        "1e-5,1e-4,1e-3",
        "--eta-b",
        "1e-4,1e-3,1e-2",
        "--out",
        str(out),
    ]
    assert lorakit.cli.main(argv) == 0
    assert "9 cells ran" in capsys.readouterr().out
    assert lorakit.cli.main(argv) == 0
    assert "0 cells ran, 9 skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        lorakit.cli.main(["sweep", "--synthetic", "--eta-a", "x", "--eta-b", "1"])
    assert "expected comma-separated numbers" in capsys.readouterr().err


# ------------------------------------------------------------------ direction, paths, reruns, CLI options


def loss_cell(cell: dict, main_metric: str = "loss") -> dict:
    """A cell function whose ``metric`` is a task's main metric named ``main_metric`` (as finetune_cell's)."""
    value = synthetic_cell(cell)["metric"]
    return {"metric": 1.0 - value if main_metric == "loss" else value, "main_metric": main_metric}


@pytest.mark.parametrize("main_metric", ["loss", "accuracy"])
def test_reports_rank_in_the_direction_of_the_recorded_main_metric(tmp_path, main_metric):
    cells = expand_grid(GRID)
    report = run_sweep(loss_cell, cells, tmp_path, context={"main_metric": main_metric}).report
    means = {(r["cell"]["eta_a"], r["cell"]["eta_b"]): r["metrics"]["metric"] for r in load_cells(tmp_path)}
    pick = min if main_metric == "loss" else max
    best = report["ranks"]["None"]["best"]
    assert (best["eta_a"], best["eta_b"]) == pick(means, key=means.get)
    assert report["higher_is_better"] is (main_metric != "loss")
    assert report["main_metric"] == main_metric
    ranked = sorted(means.values(), reverse=main_metric != "loss")[:4]
    assert [c["mean"] for c in report["top_k_all_ranks"]["cells"]] == pytest.approx(ranked)
    heat = json.loads((tmp_path / "heatmap_metric.json").read_text())
    assert heat["higher_is_better"] is (main_metric != "loss")
    assert (heat["best"]["eta_a"], heat["best"]["eta_b"]) == (best["eta_a"], best["eta_b"])
    records = [
        {"id": "a", "cell": {"eta_a": 1e-4, "eta_b": 1e-3}, "status": "finished", "metrics": {"metric": 1.0}}
    ]
    records.append({**records[0], "id": "b", "metrics": {"metric": 2.0, "main_metric": "loss"}})
    records.append({**records[0], "id": "c", "metrics": {"metric": 0.5, "main_metric": "accuracy"}})
    with pytest.raises(ValueError, match="same direction"):
        write_reports(tmp_path / "mixed", records)
    # two lower-is-better names (tasks of different kinds in one sweep) keep their shared direction
    both = [records[1], {**records[0], "id": "d", "metrics": {"metric": 3.0, "main_metric": "perplexity"}}]
    assert compared_metric(both) == ("loss/perplexity", False)
    assert compared_metric(both, "eval_accuracy") == ("eval_accuracy", True)


def save_tiny_gpt2(folder: Path, words: list[str]) -> Path:
    """A random 1-layer GPT-2 LM and a word-level tokenizer over ``words`` (no download)."""
    import torch
    from transformers import BertTokenizerFast, GPT2Config, GPT2LMHeadModel

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(folder)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(vocab), n_embd=16, n_layer=1, n_head=2, n_positions=32,
        bos_token_id=2, eos_token_id=3, pad_token_id=0,
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def _cli(monkeypatch):
    import lorakit.cli

    monkeypatch.setattr(lorakit.cli, "COMMAND_MODULES", ("sweep",))
    return lorakit.cli


def test_cli_causal_lm_sweep_picks_the_lowest_loss_and_refuses_changed_settings(
    tmp_path, monkeypatch, capsys
):
    """--task causal-lm ranks by eval loss (lower is better); relative paths from the command line end up
    absolute in the cells; a rerun with another --max-steps stops and names the setting."""
    cli = _cli(monkeypatch)
    words = ["the", "cat", "dog", "sat", "ran", "on", "mat", "far"]
    save_tiny_gpt2(tmp_path / "gpt", words)
    lines = [json.dumps({"text": " ".join(words[(i * 3 + j) % 8] for j in range(6))}) for i in range(24)]
    (tmp_path / "lm.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)
    argv = [
        "sweep", "--data", "lm.jsonl", "--model", "gpt", "--task", "causal-lm", "--targets", "c_attn",
        "--max-length", "12", "--batch-size", "8", "--precision", "fp32",
        "--eta-a", "1e-4,1e-2", "--eta-b", "1e-4,2e-1", "--out", "sweep",
    ]  # fmt: skip
    assert cli.main([*argv, "--max-steps", "2"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    with open(tmp_path / "sweep" / "grid.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    lowest = min(rows, key=lambda r: float(r["mean"]))
    assert len({r["mean"] for r in rows}) == 4  # four different losses: the direction matters
    best = summary["ranks"]["None"]["best"]
    assert (best["eta_a"], best["eta_b"]) == (float(lowest["eta_a"]), float(lowest["eta_b"]))
    assert summary["higher_is_better"] is False and summary["main_metric"] == "loss"
    assert f"loss={float(lowest['mean']):.4f}" in printed
    for record in load_cells(tmp_path / "sweep"):
        assert record["status"] == "finished" and record["metrics"]["main_metric"] == "loss"
        assert record["metrics"]["metric"] == pytest.approx(record["metrics"]["eval_loss"])
        assert Path(record["metrics"]["run_dir"]).is_absolute()
    saved = (tmp_path / "sweep" / "sweep_config.json").read_text()

    assert cli.main([*argv, "--max-steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "base.max_steps: saved 2, given 3" in err and "--out" in err
    assert (tmp_path / "sweep" / "sweep_config.json").read_text() == saved
    assert len(load_cells(tmp_path / "sweep")) == 4

    # the same files named from another working directory are the same settings: nothing reruns
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    moved = [
        ("../" + a if b in ("--data", "--model", "--out") else a)
        for b, a in zip(["", *argv[:-1]], argv, strict=True)
    ]
    assert cli.main([*moved, "--max-steps", "2"]) == 0
    assert "0 cells ran, 4 skipped" in capsys.readouterr().out


def settings_cell(cell: dict, **settings) -> dict:
    """Synthetic metric; takes any context (standing for finetune_cell's base config)."""
    return synthetic_cell(cell)


def test_rerun_with_changed_context_errors_and_keeps_the_results(tmp_path):
    cells = expand_grid(GRID)
    out = tmp_path / "sweep"
    context = {"base": {"epochs": 1.0, "data": "d.csv", "progress": True}, "runs": "r"}
    run_sweep(settings_cell, cells[:4], out, context=context)
    saved = (out / "sweep_config.json").read_text()
    changed = {**context, "base": {**context["base"], "epochs": 5.0}}
    with pytest.raises(ValueError, match="use a new output folder") as error:
        run_sweep(settings_cell, cells, out, context=changed)
    assert "base.epochs: saved 1.0, given 5.0" in str(error.value)
    assert (out / "sweep_config.json").read_text() == saved and len(load_cells(out)) == 4
    with pytest.raises(ValueError, match="fn: saved"):
        run_sweep(counting_cell, cells, out, context=context)
    # a setting finetune_cell overrides does not count; more cells with the same settings extend the grid
    quiet = {**context, "base": {**context["base"], "progress": False}}
    result = run_sweep(settings_cell, cells, out, context=quiet)
    assert len(result.skipped) == 4 and len(result.ran) == 5


def test_cell_context_has_absolute_paths_before_dispatch(tmp_path, monkeypatch):
    """Ray workers run in another working directory: --data, --eval-data, --model and --out reach them
    absolute (a hub model name stays as given)."""
    import lorakit.train.sweep as sweep_module
    from lorakit.train.sweep import SweepResult

    cli = _cli(monkeypatch)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.csv").write_text("text,label\na,0\n")
    (tmp_path / "data" / "dev.csv").write_text("text,label\na,0\n")
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    calls = []

    def fake_run_sweep(fn, cells, out, **kwargs):
        calls.append({"fn": fn, "cells": cells, "out": out, **kwargs})
        return SweepResult(str(out), [])

    monkeypatch.setattr(sweep_module, "run_sweep", fake_run_sweep)
    common = [
        "sweep",
        "--eta-a",
        "1e-4",
        "--eta-b",
        "1e-3",
        "--ray-address",
        "auto",
        "--data",
        "data/train.csv",
    ]
    assert cli.main([*common, "--eval-data", "data/dev.csv", "--model", "model", "--out", "runs/s"]) == 0
    assert cli.main([*common, "--model", "org/hub-model"]) == 0
    local, hub = calls
    assert local["backend"] == "ray" and Path(local["out"]) == tmp_path / "runs" / "s"
    base = local["context"]["base"]
    assert base["data"] == str(tmp_path / "data" / "train.csv")
    assert base["eval_data"] == str(tmp_path / "data" / "dev.csv")
    assert base["model"] == str(tmp_path / "model")
    assert local["context"]["runs"] == str(tmp_path / "runs" / "s" / "runs")
    assert hub["context"]["base"]["model"] == "org/hub-model" and hub["context"]["base"]["eval_data"] is None
    assert hub["context"]["runs"] == str(tmp_path / "runs" / "sweep" / "runs")
    # the library function the CLI uses, on a plain dict
    from lorakit.train.sweep import finetune_context

    context = finetune_context({"data": "data", "model": None, "eval_data": None}, "out")
    assert context["base"] == {"data": str(tmp_path / "data"), "model": None, "eval_data": None}
    assert context["runs"] == str(tmp_path / "out" / "runs")


def test_cli_sweep_help_and_options_a_sweep_would_ignore(tmp_path, monkeypatch, capsys):
    cli = _cli(monkeypatch)
    with pytest.raises(SystemExit):
        cli.main(["sweep", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Every other option is the same" not in text
    assert "--eta-a, --eta-b" in text and "--seeds" in text and "lower is better" in text
    for option in (
        "--lr LR",
        "--ratio RATIO",
        "--method",
        "--resume",
        "--no-progress",
        "--diagnostics-every",
    ):
        assert f"[{option}" not in text  # not in the usage line
    grid = ["sweep", "--synthetic", "--eta-a", "1e-4", "--eta-b", "1e-3", "--out", str(tmp_path / "s")]
    for extra, says in (
        (["--lr", "1e-3"], "--eta-a"),
        (["--ratio", "16"], "--eta-b"),
        (["--method", "loraplus"], "lora"),
        (["--resume"], "always resumes"),
    ):
        with pytest.raises(SystemExit):
            cli.main([*grid, *extra])
        err = capsys.readouterr().err
        assert f"{extra[0]} is not a sweep option" in err and says in err, err
    assert cli.main([*grid, "--ranks", "4,8", "--rank", "4"]) == 2
    assert "--rank and --ranks" in capsys.readouterr().err
    assert cli.main([*grid, "--epochs", "3", "--model", "m"]) == 2
    assert "--model, --epochs would be ignored" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    # engine options of the backend not in use
    assert cli.main([*grid, "--gpus-per-cell", "0.5"]) == 2
    assert "--gpus-per-cell: options of Ray" in capsys.readouterr().err
    assert cli.main([*grid, "--ray-address", "auto", "--workers", "4"]) == 2
    assert "--workers: options of the local process pool" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
