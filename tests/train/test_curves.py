"""Time-to-accuracy curves from hand-written run folders (no training)."""

from __future__ import annotations

import json

import pytest

from lorakit.train.curves import curves_report, find_runs, format_report, load_curve, time_to_accuracy


def write_run(
    folder, method, seed, values, metric="accuracy", task="RTE", step_every=10, seconds_per_step=0.5
):
    folder.mkdir(parents=True)
    lines = []
    for i, value in enumerate(values, 1):
        step = i * step_every
        lines.append(json.dumps({"type": "train", "step": step, "loss": 1.0 / i}))
        lines.append(
            json.dumps(
                {
                    "type": "eval",
                    "step": step,
                    "epoch": step / 30,
                    metric: value,
                    "train_time": step * seconds_per_step,
                    "wall_time": step * seconds_per_step + i,
                }
            )
        )
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    summary = {"method": method, "task": task, "seed": seed, "main_metric": metric, "status": "finished"}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "compare" / "RTE"
    write_run(root / "lora-s0", "lora", 0, [0.50, 0.55, 0.60, 0.64, 0.70])
    write_run(root / "lora-s1", "lora", 1, [0.52, 0.57, 0.62, 0.66, 0.72])
    write_run(root / "loraplus-s0", "loraplus", 0, [0.55, 0.66, 0.70, 0.73, 0.74])
    write_run(root / "loraplus-s1", "loraplus", 1, [0.57, 0.68, 0.72, 0.74, 0.76])
    write_run(root / "asym-s0", "asym", 0, [0.50, 0.51, 0.52, 0.53, 0.54], seconds_per_step=0.25)
    return tmp_path / "compare"


def test_time_to_accuracy_finds_the_first_step_at_the_reference_final(runs):
    curves = [load_curve(d) for d in find_runs([runs])]
    assert len(curves) == 5
    report = time_to_accuracy(curves, reference="lora")["RTE"]
    assert report["target"] == pytest.approx(0.71)
    lora, plus, asym = (report["methods"][m] for m in ("lora", "loraplus", "asym"))
    # the reference reaches its own mean final only at its last evaluation
    assert lora["mean_curve_step"] == 50 and lora["steps_ratio"] == 1.0
    # loraplus seed-mean curve: 0.56, 0.67, 0.71 ≥ 0.71 at step 30 (epoch 1.0, 15 s of training)
    assert plus["mean_curve_step"] == 30
    assert plus["mean_curve_epoch"] == pytest.approx(1.0)
    assert plus["mean_curve_time"] == pytest.approx(15.0)
    assert plus["steps_ratio"] == pytest.approx(50 / 30)
    assert plus["seed_steps"] == {"0": 40, "1": 30}
    assert asym["mean_curve_step"] is None and asym["seed_steps"] == {"0": None}
    assert plus["curve"]["value"][:2] == pytest.approx([0.56, 0.67])


def test_loss_metrics_count_down(tmp_path):
    write_run(tmp_path / "a", "lora", 0, [3.0, 2.0, 1.5], metric="loss", task="lm")
    write_run(tmp_path / "b", "loraplus", 0, [2.5, 1.4, 1.0], metric="loss", task="lm")
    report = time_to_accuracy([load_curve(tmp_path / "a"), load_curve(tmp_path / "b")])["lm"]
    assert report["target"] == 1.5 and report["methods"]["loraplus"]["mean_curve_step"] == 20


def test_report_files_and_text(runs, tmp_path):
    data = curves_report([runs], reference="lora", out=tmp_path / "out", time_key="wall_time")
    assert (tmp_path / "out" / "curves.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "out" / "curves.json").read_text())
    assert saved["tasks"]["RTE"]["methods"]["loraplus"]["mean_curve_step"] == 30
    # wall_time includes the evaluations: 30 steps * 0.5 s + 3 evals
    assert saved["tasks"]["RTE"]["methods"]["loraplus"]["mean_curve_time"] == pytest.approx(18.0)
    text = format_report(data)
    assert "loraplus" in text and "step 30 of 50" in text and "not reached" in text


def test_errors_name_the_culprit(runs, tmp_path):
    curves = [load_curve(d) for d in find_runs([runs / "RTE" / "asym-s0"])]
    with pytest.raises(ValueError, match="reference method 'lora'"):
        time_to_accuracy(curves)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text(json.dumps({"type": "train", "step": 1, "loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match="no eval records"):
        load_curve(empty)
    with pytest.raises(ValueError, match="no metric 'f1'"):
        load_curve(runs / "RTE" / "lora-s0", metric="f1")
    (empty / "metrics.jsonl").write_text("{broken\n")
    with pytest.raises(ValueError, match="line 1"):
        load_curve(empty)
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        find_runs([tmp_path / "out-missing"])


def test_runs_without_eval_records_are_left_out_and_named(runs, tmp_path, caplog):
    # A run that diverged before its first evaluation: train records only, status "diverged".
    diverged = runs / "RTE" / "loraplus-s2"
    diverged.mkdir()
    (diverged / "metrics.jsonl").write_text(json.dumps({"type": "train", "step": 1, "loss": 9.9}) + "\n")
    summary = {
        "method": "loraplus",
        "task": "RTE",
        "seed": 2,
        "main_metric": "accuracy",
        "status": "diverged",
    }
    (diverged / "summary.json").write_text(json.dumps(summary))
    # One that stopped before its first log line has a summary but no metrics.jsonl at all.
    silent = runs / "RTE" / "lora-s9"
    silent.mkdir()
    (silent / "summary.json").write_text(json.dumps({**summary, "method": "lora", "seed": 9}))
    with caplog.at_level("WARNING", logger="lorakit.train.curves"):
        data = curves_report([runs], reference="lora", out=tmp_path / "out")
    assert str(diverged) in caplog.text and "diverged before its first evaluation" in caplog.text
    assert [item["run"] for item in data["skipped"]] == [str(silent), str(diverged)]
    assert "no metrics.jsonl" in data["skipped"][0]["reason"]
    assert str(diverged) not in data["runs"] and len(data["runs"]) == 5
    assert data["tasks"]["RTE"]["target"] == pytest.approx(0.71)  # lora's two runs with curves
    # the other runs are drawn as before: the diverged seed does not enter loraplus's mean curve
    methods = data["tasks"]["RTE"]["methods"]
    assert methods["loraplus"]["runs"] == 2 and methods["loraplus"]["mean_curve_step"] == 30
    saved = json.loads((tmp_path / "out" / "curves.json").read_text())
    assert saved["skipped"][1]["run"] == str(diverged)
    assert (tmp_path / "out" / "curves.png").stat().st_size > 1000
    assert f"left out {diverged}" in format_report(data)
    # Only the diverged run: nothing to draw is an error that names it.
    with pytest.raises(ValueError, match=r"no run has eval records.*loraplus-s2"):
        curves_report([diverged], out=tmp_path / "none")
    # The reference's only run left out: the error says so.
    lora = runs / "RTE" / "lora-s0"
    with pytest.raises(ValueError, match=r"reference method 'lora'.*left out.*loraplus-s2"):
        curves_report([lora.parent / "asym-s0", diverged], out=tmp_path / "noref")


def test_cli_curves(runs, tmp_path, monkeypatch, capsys):
    import lorakit.cli

    monkeypatch.setattr(lorakit.cli, "COMMAND_MODULES", ("sweep",))
    assert lorakit.cli.main(["curves", str(runs), "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "RTE: target = lora final accuracy 0.7100" in out
    assert (tmp_path / "c" / "curves.json").exists()
    assert lorakit.cli.main(["curves", str(runs), "--reference", "nope", "--out", str(tmp_path / "d")]) == 2
    assert "reference method 'nope'" in capsys.readouterr().err
