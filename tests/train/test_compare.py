"""``compare`` with several datasets: distinct names and folders, --eval-data, curves after a divergence."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import save_tiny_bert
from lorakit.train import FinetuneConfig, MethodSpec, compare

WORDS = ["good", "great", "nice", "bad", "awful", "poor", "the", "film", "was"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-bert")
    save_tiny_bert(folder, WORDS, hidden=16, layers=1, heads=2, intermediate=24, encoder_only=True)
    return str(folder)


def _sentences(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice([0, 1])
        rows.append(
            {"text": f"the film was {rng.choice(WORDS[:3] if label else WORDS[3:6])}", "label": label}
        )
    return rows


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _base(model, **kw):
    settings = dict(
        model=model, batch_size=8, max_steps=2, eval_every=2, max_length=12, progress=False,
        method=MethodSpec("lora", rank=2, lr=1e-2, targets=("query", "value")),
    )  # fmt: skip
    settings.update(kw)
    return FinetuneConfig(**settings)


def test_datasets_that_share_a_name_get_their_own_run_folders(tiny_model, tmp_path):
    # d1/train.jsonl and d2/train.jsonl are both task "train": they used to write one folder, train/lora-s0,
    # the second run overwriting the first, and two compare.json rows both named "train".
    d1 = _jsonl(tmp_path / "d1" / "train.jsonl", _sentences(24, 1))
    d2 = _jsonl(tmp_path / "d2" / "train.jsonl", _sentences(40, 2))
    out = tmp_path / "dup"
    result = compare(_base(tiny_model), ["lora"], seeds=[0], datasets=[str(d1), str(d2)], out=out)
    assert [r.run_dir for r in result.runs] == [
        str(out / "d1-train" / "lora-r2-s0"),
        str(out / "d2-train" / "lora-r2-s0"),
    ]
    assert [(r.task, r.data) for r in result.rows] == [("d1/train", str(d1)), ("d2/train", str(d2))]
    for run, data, rows in zip(result.runs, (d1, d2), (24, 40), strict=True):
        config = json.loads((Path(run.run_dir) / "config.json").read_text())
        assert config["config"]["data"] == str(data)
        assert config["task"]["name"] == run.task and config["train_size"] + config["eval_size"] == rows
    saved = json.loads((out / "compare.json").read_text())
    assert [(row["task"], row["data"]) for row in saved["rows"]] == [
        ("d1/train", str(d1)),
        ("d2/train", str(d2)),
    ]
    assert [run["task"] for run in saved["runs"]] == ["d1/train", "d2/train"]


def test_unique_task_names(tmp_path):
    from lorakit.train.compare import unique_task_names

    def files(*names):
        paths = []
        for name in names:
            path = tmp_path / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x")
            paths.append(str(path))
        return paths

    same_parent = files("a/x/train.jsonl", "b/x/train.jsonl", "c/RTE.csv")
    assert unique_task_names(same_parent, ["train", "train", "RTE"]) == ["a/x/train", "b/x/train", "RTE"]
    one_folder = files("d/train.jsonl", "d/train.csv")
    assert unique_task_names(one_folder, ["train", "train"]) == ["train#1", "train#2"]
    # GLUE folders of one task in two places (folder names that differ only in case collide too)
    files("g1/SST-2/train.tsv", "g2/sst2/train.tsv")
    glue = [str(tmp_path / "g1" / "SST-2"), str(tmp_path / "g2" / "sst2")]
    assert unique_task_names(glue, ["SST-2", "sst-2"]) == ["g1/SST-2", "g2/sst-2"]
    # a new name that is another dataset's own name
    clash = files("p/train.jsonl", "q/train.jsonl", "p-train.jsonl")
    assert unique_task_names(clash, ["train", "train", "p-train"]) == ["p/train#1", "q/train", "p-train#2"]
    assert unique_task_names(["glue:sst2", None], ["glue:sst2", "tweets"]) == ["glue:sst2", "tweets"]


def test_eval_data_needs_exactly_one_dataset(tiny_model, tmp_path):
    d1 = _jsonl(tmp_path / "d1" / "train.jsonl", _sentences(16, 1))
    d2 = _jsonl(tmp_path / "d2" / "train.jsonl", _sentences(16, 2))
    dev = _jsonl(tmp_path / "dev.jsonl", _sentences(8, 3))
    base = _base(tiny_model, eval_data=str(dev))
    # with two datasets the eval file used to be dropped without a word
    with pytest.raises(ValueError, match=r"--eval-data .*dev\.jsonl needs exactly one --data, got 2"):
        compare(base, ["lora"], datasets=[str(d1), str(d2)], out=tmp_path / "two")
    assert not (tmp_path / "two").exists()  # refused before any training
    with pytest.raises(ValueError, match=r"train\.jsonl is given twice"):
        compare(
            _base(tiny_model),
            ["lora"],
            datasets=[str(d1), str(tmp_path / "d1" / ".." / "d1" / "train.jsonl")],
            out=tmp_path / "twice",
        )
    # with one dataset it is the eval split
    result = compare(base, ["lora"], datasets=[str(d1)], out=tmp_path / "one")
    config = json.loads((tmp_path / "one" / "train" / "lora-r2-s0" / "config.json").read_text())
    assert config["task"]["eval_source"] == str(dev) and config["eval_size"] == 8
    assert result.rows[0].task == "train"


def test_compare_curves_after_a_run_diverged_before_its_first_evaluation(tiny_model, tmp_path, capsys):
    import lorakit.cli

    data = _jsonl(tmp_path / "lm" / "train.jsonl", _sentences(48, 4))
    out = tmp_path / "cmpdiv"
    args = ["compare", "--data", str(data), "--model", tiny_model, "--methods", "lora", "loraplus:lr=1e30"]
    args += ["--rank", "2", "--max-steps", "4", "--eval-every", "2", "--batch-size", "8"]
    args += ["--max-length", "12", "--no-progress", "--curves", "--out", str(out)]
    assert lorakit.cli.main(args) == 0  # was exit 2: "metrics.jsonl: no eval records"
    summary = json.loads((out / "train" / "loraplus-r2-s0" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["steps"] < 2
    report = json.loads((out / "curves" / "curves.json").read_text())
    assert [item["run"] for item in report["skipped"]] == [str(out / "train" / "loraplus-r2-s0")]
    assert list(report["tasks"]["train"]["methods"]) == ["lora r=2"]
    assert (out / "curves" / "curves.png").stat().st_size > 1000
    assert "left out" in capsys.readouterr().out


def test_an_interrupted_run_is_resumed_not_restarted(tiny_model, tmp_path):
    """A run that left a checkpoint but no summary (killed mid-way) continues from that checkpoint."""
    data = str(_jsonl(tmp_path / "d" / "train.jsonl", _sentences(40, 3)))
    out = tmp_path / "cmp"
    base = _base(tiny_model, max_steps=4, save_every=2, eval_every=4)
    (first,) = compare(base, ["lora"], seeds=[0], datasets=[data], out=out).runs
    run_dir = Path(first.run_dir)
    (run_dir / "summary.json").unlink()  # as if killed after the last checkpoint
    metrics = (run_dir / "metrics.jsonl").read_text()
    (again,) = compare(base, ["lora"], seeds=[0], datasets=[data], out=out).runs
    assert again.status == "finished" and again.steps == first.steps == 4
    assert again.final_metrics == first.final_metrics
    # resumed from step 4: no step was trained again, so the metrics log is unchanged
    assert (run_dir / "metrics.jsonl").read_text() == metrics


def test_an_interrupted_run_whose_data_changed_starts_over(tiny_model, tmp_path):
    data = _jsonl(tmp_path / "d" / "train.jsonl", _sentences(40, 3))
    out = tmp_path / "cmp"
    base = _base(tiny_model, max_steps=4, save_every=2, eval_every=4)
    (first,) = compare(base, ["lora"], seeds=[0], datasets=[str(data)], out=out).runs
    (Path(first.run_dir) / "summary.json").unlink()
    _jsonl(data, _sentences(48, 3))  # more rows: the checkpoint no longer belongs to this data
    (again,) = compare(base, ["lora"], seeds=[0], datasets=[str(data)], out=out).runs
    assert again.status == "finished" and again.steps == 4
    saved = json.loads((Path(again.run_dir) / "config.json").read_text())
    assert saved["train_size"] + saved["eval_size"] == 48
