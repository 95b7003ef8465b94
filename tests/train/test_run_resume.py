"""Resuming and restarting run folders: the saved config rules a resume (library and CLI), a fresh run
removes an earlier run's files, a finished run resumes to real final metrics, the train-loss window
survives a resume, and Ctrl-C in ``lorakit finetune`` ends with one line and exit code 130."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

import pytest
import test_finetune_e2e as e2e
import torch

import lorakit.cli
from lorakit.train import MethodSpec, finetune
from lorakit.train.run import RunFolder
from lorakit.train.trainer import Trainer

# The tiny offline BERT, the sentiment files and the run config of the end-to-end tests.
tiny_model, sentiment_files, _config, _adapter = (
    e2e.tiny_model,
    e2e.sentiment_files,
    e2e._config,
    e2e._adapter,
)

# log_every 3 and save_every 4: the step-4 checkpoint falls inside a train-loss window (steps 4-6).
RUN = dict(log_every=3, max_train_samples=64)


class Crash:
    """Ctrl-C during step 5, after the step-4 checkpoint."""

    def after_step(self, step):
        if step == 5:
            raise KeyboardInterrupt


def _records(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


@pytest.fixture(scope="module")
def runs(tiny_model, sentiment_files, tmp_path_factory):
    """``straight``: a finished 8-step loraplus run; ``crashed``: the same run stopped after step 4."""
    root = tmp_path_factory.mktemp("runs")
    straight = finetune(_config(tiny_model, sentiment_files, root / "straight", **RUN))
    with pytest.raises(KeyboardInterrupt):
        finetune(_config(tiny_model, sentiment_files, root / "crashed", **RUN), callbacks=[Crash()])
    assert RunFolder(root / "crashed").latest_checkpoint().name == "step-0000004"
    return {"straight": root / "straight", "crashed": root / "crashed", "summary": straight}


def _copy(runs, name, tmp_path):
    return shutil.copytree(runs[name], tmp_path / name)


def _cli(*args):
    try:
        return lorakit.cli.main(["finetune", *map(str, args)])
    except KeyboardInterrupt:  # would otherwise stop the whole pytest session
        pytest.fail("KeyboardInterrupt escaped lorakit finetune")


def test_resume_with_another_config_is_refused_before_config_json_changes(
    runs,
    tiny_model,
    sentiment_files,
    tmp_path,
):
    run_dir = _copy(runs, "crashed", tmp_path)
    saved = (run_dir / "config.json").read_bytes()
    lora = MethodSpec("lora", rank=2, lr=1e-2, targets=("query", "value"))
    other = _config(tiny_model, sentiment_files, run_dir, resume=True, log_every=3, method=lora)
    with pytest.raises(ValueError) as error:
        finetune(other)
    message = str(error.value)
    assert "method.method: saved 'loraplus', given 'lora'" in message
    assert "max_train_samples: saved 64, given None" in message
    assert (run_dir / "config.json").read_bytes() == saved
    assert RunFolder(run_dir).latest_checkpoint().name == "step-0000004"

    # Display fields may differ: the same run with a progress bar resumes.
    resumed = finetune(_config(tiny_model, sentiment_files, run_dir, resume=True, progress=True, **RUN))
    assert resumed.method == "loraplus r=2" and resumed.steps == 8


def test_cli_resume_takes_the_saved_config_and_names_conflicting_options(
    runs,
    sentiment_files,
    tmp_path,
    capsys,
):
    run_dir = _copy(runs, "crashed", tmp_path)
    saved = (run_dir / "config.json").read_bytes()
    assert _cli("--out", run_dir, "--resume", "--method", "lora", "--max-train-samples", "32") == 2
    err = capsys.readouterr().err
    assert "--method: saved 'loraplus', given 'lora'" in err
    assert "--max-train-samples: saved 64, given 32" in err and "another --out" in err
    assert "Traceback" not in err and (run_dir / "config.json").read_bytes() == saved

    # The README's line: same --data, nothing else; the rest (method, samples, model...) is the saved config.
    assert _cli("--out", run_dir, "--data", sentiment_files / "train.tsv", "--resume", "--no-progress") == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "loraplus r=2" and summary["steps"] == 8 and summary["train_samples"] == 64
    config = json.loads((run_dir / "config.json").read_text())["config"]
    assert config["method"]["method"] == "loraplus" and config["max_train_samples"] == 64
    straight = _adapter(runs["straight"])
    for key, value in _adapter(run_dir).items():
        torch.testing.assert_close(value, straight[key], rtol=0, atol=1e-6, msg=key)


def test_cli_resume_without_data_uses_the_saved_data(runs, tmp_path):
    run_dir = _copy(runs, "crashed", tmp_path)
    assert _cli("--out", run_dir, "--resume", "--no-progress") == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "loraplus r=2" and summary["steps"] == 8 and summary["train_samples"] == 64


def test_fresh_run_removes_the_earlier_runs_files_before_training(
    runs,
    tiny_model,
    sentiment_files,
    tmp_path,
    caplog,
):
    run_dir = _copy(runs, "straight", tmp_path)
    (run_dir / "eval-other.json").write_text("{}")
    (run_dir / "notes.txt").write_text("mine")

    class Stop:  # Ctrl-C in the first step, before the new run writes anything but its config
        def before_step(self, step):
            raise KeyboardInterrupt

    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        finetune(_config(tiny_model, sentiment_files, run_dir, max_steps=4), callbacks=[Stop()])
    for name in ("summary.json", "adapter", "checkpoints", "metrics.jsonl", "eval-other.json"):
        assert not (run_dir / name).exists(), name
    assert (run_dir / "notes.txt").exists()  # not a run file
    warning = caplog.text
    assert "overwriting" in warning and "summary.json" in warning and "adapter/" in warning


def test_resuming_a_finished_run_keeps_real_final_metrics(runs, tiny_model, sentiment_files, tmp_path):
    expected = runs["summary"].final_metrics
    assert expected
    run_dir = _copy(runs, "straight", tmp_path)
    resumed = finetune(_config(tiny_model, sentiment_files, run_dir, resume=True, **RUN))
    assert resumed.final_metrics == pytest.approx(expected) and resumed.steps == 8
    # Stopped after the final checkpoint but before summary.json and adapter/ were written.
    (run_dir / "summary.json").unlink()
    shutil.rmtree(run_dir / "adapter")
    finetune(_config(tiny_model, sentiment_files, run_dir, resume=True, **RUN))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_metrics"] == pytest.approx(expected) and (run_dir / "adapter").is_dir()
    assert len([r for r in _records(run_dir, "eval") if r["step"] == 8]) == 1  # no extra eval record


def test_first_train_record_after_resume_averages_the_whole_window(
    runs, tiny_model, sentiment_files, tmp_path
):
    run_dir = _copy(runs, "crashed", tmp_path)
    finetune(_config(tiny_model, sentiment_files, run_dir, resume=True, **RUN))
    straight, resumed = _records(runs["straight"], "train"), _records(run_dir, "train")
    assert [r["step"] for r in resumed] == [3, 6, 8]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight], rel=1e-6)


def test_ctrl_c_in_finetune_prints_one_line_and_exits_130(
    tiny_model,
    sentiment_files,
    tmp_path,
    capsys,
    monkeypatch,
):
    original = Trainer._checkpoint

    def checkpoint_then_ctrl_c(self):
        original(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_checkpoint", checkpoint_then_ctrl_c)
    out = tmp_path / "run"
    data = ["--data", sentiment_files / "train.tsv", "--eval-data", sentiment_files / "dev.tsv"]
    options = ["--model", tiny_model, "--rank", "2", "--max-steps", "8", "--save-every", "4"]
    options += ["--batch-size", "8", "--max-length", "16", "--no-progress", "--out", out]
    assert _cli(*data, *options) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("lorakit finetune: interrupted; the last checkpoint is")
    assert "step-0000004 (step 4)" in err[-1] and f"lorakit finetune --out {out} --resume" in err[-1]


def test_resume_removes_temporaries_a_killed_write_left(runs, tiny_model, sentiment_files, tmp_path):
    run_dir = _copy(runs, "crashed", tmp_path)
    stale = [run_dir / ".summary.json.k3j2.tmp", run_dir / "checkpoints" / ".latest.json.x9.tmp"]
    for path in stale:
        path.write_text("half-written")
    finetune(_config(tiny_model, sentiment_files, run_dir, resume=True, **RUN))
    assert not any(path.exists() for path in stale)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


def test_ctrl_c_before_a_fresh_run_cleared_the_folder_does_not_offer_the_earlier_run(
    runs, sentiment_files, tmp_path, capsys, monkeypatch
):
    import lorakit.train.run as run_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. while the data loads, before the earlier run's files are removed

    out = _copy(runs, "crashed", tmp_path)  # an earlier loraplus run with a step-4 checkpoint
    monkeypatch.setattr(run_module, "finetune", interrupted)
    data = ["--data", sentiment_files / "train.tsv", "--eval-data", sentiment_files / "dev.tsv"]
    assert _cli(*data, "--method", "asym", "--no-progress", "--out", out) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "nothing to resume" in err and "--resume" not in err.replace("nothing to resume", "")


def test_cli_resume_from_another_directory_after_a_run_named_its_data_relatively(
    tiny_model, sentiment_files, tmp_path, monkeypatch
):
    """config.json stores local paths absolute, so ``--resume`` works from any working directory."""
    run_dir = tmp_path / "relative"
    monkeypatch.chdir(sentiment_files)
    config = _config(tiny_model, sentiment_files, run_dir, **RUN)
    model = os.path.relpath(tiny_model)
    config = dataclasses.replace(config, data="train.tsv", eval_data="./dev.tsv", model=model)
    with pytest.raises(KeyboardInterrupt):
        finetune(config, callbacks=[Crash()])
    saved = json.loads((run_dir / "config.json").read_text())["config"]
    assert saved["data"] == str(sentiment_files / "train.tsv")
    assert saved["eval_data"] == str(sentiment_files / "dev.tsv")
    assert saved["model"] == tiny_model
    assert json.loads((run_dir / "config.json").read_text())["model"] == tiny_model

    monkeypatch.chdir(tmp_path)  # the relative names would not resolve here
    assert _cli("--out", run_dir, "--resume", "--no-progress") == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["train_samples"] == 64
