"""End to end on a tiny random BERT: finetune -> files -> evaluate -> resume (bit-exact) -> divergence."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

import lorakit
from conftest import save_tiny_bert
from lorakit.train import FinetuneConfig, MethodSpec, TrainingDivergedError, compare, evaluate_run, finetune
from lorakit.train.run import RunFolder

WORDS = [
    "good",
    "great",
    "fine",
    "nice",
    "bad",
    "awful",
    "poor",
    "sad",
    "the",
    "movie",
    "was",
    "very",
    "plot",
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-layer, width-32 BERT encoder checkpoint + a word-level tokenizer, saved offline."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    save_tiny_bert(folder, WORDS, hidden=32, layers=2, heads=4, intermediate=48, encoder_only=True)
    return str(folder)


@pytest.fixture(scope="module")
def sentiment_files(tmp_path_factory):
    """pos/neg sentences decided by their sentiment words (learnable by a tiny model)."""
    folder = tmp_path_factory.mktemp("data")
    rng = random.Random(0)

    def rows(n):
        out = []
        for _ in range(n):
            label = rng.choice(["pos", "neg"])
            word = rng.choice(WORDS[:4] if label == "pos" else WORDS[4:8])
            out.append(f"the movie was very {word}\t{label}")
        return out

    (folder / "train.tsv").write_text("text\tlabel\n" + "\n".join(rows(96)) + "\n")
    (folder / "dev.tsv").write_text("text\tlabel\n" + "\n".join(rows(32)) + "\n")
    return folder


def _config(tiny_model, data, out, **kw):
    base = dict(
        data=str(data / "train.tsv"), eval_data=str(data / "dev.tsv"), model=tiny_model, batch_size=8,
        max_steps=8, eval_every=4, log_every=2, save_every=4, max_length=16, progress=False,
        method=MethodSpec("loraplus", rank=2, lr=1e-2, targets=("query", "value")), out=str(out),
    )  # fmt: skip
    base.update(kw)
    return FinetuneConfig(**base)


def _adapter(run_dir):
    from safetensors.torch import load_file

    return load_file(f"{run_dir}/adapter/adapter_model.safetensors")


def test_finetune_records_curvature_terms_for_the_curvature_criterion(tiny_model, sentiment_files, tmp_path):
    from lorakit.analysis.diagnostics import suggest_ratio

    with pytest.raises(ValueError, match="needs --diagnostics-every"):
        finetune(_config(tiny_model, sentiment_files, tmp_path / "bad", diagnostics_curvature=True))
    out = tmp_path / "run"
    config = _config(
        tiny_model, sentiment_files, out, max_steps=4, diagnostics_every=2, diagnostics_curvature=True,
        grad_accum=2, save_every=None, eval_every=4,
    )  # fmt: skip
    assert finetune(config).status == "finished"
    diagnostics = [json.loads(line) for line in (out / "diagnostics.jsonl").read_text().splitlines()]
    layers = [layer for record in diagnostics for layer in record["layers"].values()]
    assert layers and all(math.isfinite(layer["curv2"]) for layer in layers)
    # B starts at 0, so the step-0 gradient of A is 0: no A step, zero curvature along it.
    assert all(layer["curv1"] == 0.0 for layer in diagnostics[0]["layers"].values())
    assert all(math.isfinite(layer["curv1"]) for layer in diagnostics[-1]["layers"].values())
    try:  # early in training the curvature along a step can be negative: then there is no suggestion
        assert suggest_ratio(out / "diagnostics.jsonl", criterion="curvature", skip_fraction=0.0).ratio > 0
    except ValueError as error:
        assert "no measurement" in str(error)


def test_finetune_writes_run_folder_and_evaluate_matches(tiny_model, sentiment_files, tmp_path):
    out = tmp_path / "run"
    summary = finetune(_config(tiny_model, sentiment_files, out, diagnostics_every=4))
    assert summary.status == "finished" and summary.steps == 8
    assert 0.0 <= summary.final_metrics["accuracy"] <= 1.0
    assert summary.trainable_params > 0 and summary.train_samples_per_s > 0 and summary.peak_memory_mb > 0
    for name in ("config.json", "metrics.jsonl", "summary.json", "adapter/adapter_config.json"):
        assert (out / name).exists(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "eval"] == [4, 8]
    assert [r["step"] for r in records if r["type"] == "train"] == [2, 4, 6, 8]
    assert all({"epoch", "wall_time", "train_time"} <= set(r) for r in records)
    lr = records[0]["lr"]
    assert lr["lora_B"] == pytest.approx(16 * lr["lora_A"])  # LoRA+ ratio applied
    adapter_keys = set(_adapter(out))
    assert any(k.endswith("query.lora_A.weight") for k in adapter_keys)
    assert any(".classifier." in k for k in adapter_keys)  # the fresh head is saved with the adapter
    # B starts at zero (init "lora"): non-zero B factors show the optimizer updated the adapters.
    assert all(v.abs().sum() > 0 for k, v in _adapter(out).items() if k.endswith("lora_B.weight"))
    assert json.loads((out / "summary.json").read_text())["final_metrics"] == summary.final_metrics
    diagnostics = [json.loads(line) for line in (out / "diagnostics.jsonl").read_text().splitlines()]
    assert [d["step"] for d in diagnostics] == [0, 4] and diagnostics[1]["overall"]["delta2"] > 0

    # Same data through evaluate (labels renamed through --label-map) reproduces the final metrics.
    renamed = tmp_path / "renamed.csv"
    lines = (sentiment_files / "dev.tsv").read_text().splitlines()[1:]
    renamed.write_text(
        "sentence,polarity\n" + "\n".join(ln.replace("\tpos", ",1").replace("\tneg", ",0") for ln in lines)
    )
    result = evaluate_run(out, renamed, label_col="polarity", label_map={"1": "pos", "0": "neg"})
    assert result["examples"] == 32
    assert result["metrics"]["accuracy"] == pytest.approx(summary.final_metrics["accuracy"])
    assert (out / "eval-renamed.json").exists()


def test_resume_is_exact_and_divergence_keeps_last_checkpoint(tiny_model, sentiment_files, tmp_path):
    straight = finetune(_config(tiny_model, sentiment_files, tmp_path / "a"))

    class Crash:
        def after_step(self, step):
            if step == 5:
                raise KeyboardInterrupt

    # Run b also records diagnostics (measuring must not change training) every 2 steps.
    with pytest.raises(KeyboardInterrupt):
        finetune(
            _config(tiny_model, sentiment_files, tmp_path / "b", diagnostics_every=2), callbacks=[Crash()]
        )
    assert RunFolder(tmp_path / "b").latest_checkpoint().name == "step-0000004"
    resumed = finetune(_config(tiny_model, sentiment_files, tmp_path / "b", resume=True, diagnostics_every=2))
    assert resumed.steps == 8
    a, b = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert resumed.final_metrics == pytest.approx(straight.final_metrics)
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(8) == 2  # no duplicate records after the resume
    lines = (tmp_path / "b" / "diagnostics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 2, 4, 6]  # kept from before the crash, then resumed

    class Poison:
        def after_step(self, step):
            if step == 5:
                with torch.no_grad():
                    next(p for p in model_params if p.requires_grad).fill_(float("nan"))

    class Grab:
        def before_step(self, step):
            if step == 0:
                model_params.extend(p for g in optimizer_holder for p in g)

    model_params: list = []
    optimizer_holder: list = []
    config = _config(tiny_model, sentiment_files, tmp_path / "c")

    import lorakit.train.run as run_module

    original = run_module.make_method_optimizer

    def capture(model, spec, weight_decay=0.0):
        optimizer = original(model, spec, weight_decay)
        optimizer_holder.append([p for g in optimizer.param_groups for p in g["params"]])
        return optimizer

    run_module.make_method_optimizer = capture
    try:
        with pytest.raises(TrainingDivergedError, match=r"diverged at step 7.*step-0000004"):
            finetune(config, callbacks=[Grab(), Poison()])
    finally:
        run_module.make_method_optimizer = original
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["status"] == "diverged" and "NaN" not in json.dumps(summary["final_metrics"])
    assert RunFolder(tmp_path / "c").latest_checkpoint().name == "step-0000004"


@pytest.mark.parametrize("method", ["asym", "freeze-b", "head", "full"])
def test_other_methods_train_the_right_parameters(tiny_model, sentiment_files, tmp_path, method):
    spec = MethodSpec(method, rank=2)
    summary = finetune(_config(tiny_model, sentiment_files, tmp_path / method, method=spec, max_steps=2))
    head = 32 * 2 + 2  # classifier weight + bias
    one_factor = 2 * 2 * (2 * 32)  # 2 layers x (query, value) x one r x 32 factor, r = 2
    expected = {
        "asym": one_factor + head,
        "freeze-b": one_factor + head,
        "head": head,
        "full": summary.total_params,
    }[method]
    assert summary.trainable_params == expected


def test_compare_table_json_png_and_reuse(tiny_model, sentiment_files, tmp_path):
    base = _config(tiny_model, sentiment_files, None, max_steps=2, eval_every=2, save_every=2)
    result = compare(base, ["lora", "asym:r=4"], seeds=[0, 1], out=tmp_path / "cmp")
    assert [(r.method, len(r.scores)) for r in result.rows] == [("lora r=2", 2), ("asym r=4", 2)]
    assert "mean ± std" in result.table() and "asym r=4" in result.table()
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert len(saved["runs"]) == 4 and saved["rows"][0]["std"] >= 0
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    # A second call reuses the finished runs (same summaries, no new training).
    again = compare(base, ["lora", "asym:r=4"], seeds=[0, 1], out=tmp_path / "cmp")
    assert [r.wall_time_s for r in again.runs] == [r.wall_time_s for r in result.runs]


def test_compare_cli_with_curves(tiny_model, sentiment_files, tmp_path, capsys):
    import lorakit.cli

    out = tmp_path / "cmp"
    data = ["--data", str(sentiment_files / "train.tsv"), "--eval-data", str(sentiment_files / "dev.tsv")]
    options = ["--model", tiny_model, "--methods", "lora", "loraplus", "--rank", "2", "--max-steps", "4"]
    options += ["--eval-every", "2", "--batch-size", "8", "--max-length", "16", "--no-progress"]
    assert lorakit.cli.main(["compare", *data, *options, "--curves", "--out", str(out)]) == 0
    report = json.loads((out / "curves" / "curves.json").read_text())
    assert report and (out / "curves" / "curves.png").stat().st_size > 1000
    assert "lora" in capsys.readouterr().out


def test_liger_kernel_option_refuses_without_cuda_and_keeps_the_earlier_run(
    tiny_model, sentiment_files, tmp_path, monkeypatch, capsys
):
    """--liger-kernel where no CUDA GPU is visible: an error naming the option, raised before the run folder
    is touched (through the API and the command line)."""
    import lorakit.cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")  # an earlier run's file, which a fresh run would remove
    config = _config(tiny_model, sentiment_files, out, max_steps=1, liger_kernel=True)
    with pytest.raises(ValueError, match=r"FinetuneConfig\.liger_kernel \(--liger-kernel\): .*(CUDA|liger)"):
        finetune(config)
    argv = [
        "finetune",
        "--model",
        tiny_model,
        "--data",
        str(sentiment_files / "train.tsv"),
        "--out",
        str(out),
    ]
    assert lorakit.cli.main([*argv, "--liger-kernel"]) == 2
    assert "--liger-kernel" in capsys.readouterr().err
    assert (out / "summary.json").read_text() == "{}"


def test_liger_kernel_option_applies_liger_before_the_adapters(
    tiny_model, sentiment_files, tmp_path, monkeypatch
):
    from lorakit.train import liger

    seen = []
    monkeypatch.setattr(liger, "unavailable_reason", lambda: None)
    monkeypatch.setattr(
        liger, "apply_liger_kernels", lambda model: seen.append(len(list(lorakit.lora_layers(model))))
    )
    finetune(_config(tiny_model, sentiment_files, tmp_path / "run", max_steps=1, liger_kernel=True))
    assert seen == [0]  # called once, on the model as loaded
    finetune(_config(tiny_model, sentiment_files, tmp_path / "plain", max_steps=1))
    assert seen == [0]
