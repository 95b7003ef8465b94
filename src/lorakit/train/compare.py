"""``compare``: run several methods × seeds (× datasets) and tabulate mean ± std of the task metric.

For each dataset, method and seed one :func:`~lorakit.train.run.finetune` run is written to
``OUT/<task>/<method>-s<seed>/`` (a finished run whose config matches is reused, so an interrupted
comparison continues where it stopped). ``<task>`` is the task's name (GLUE task, file stem or folder);
datasets that share a name get their parent folders in it (``d1/train`` → ``OUT/d1-train/``). An
``eval_data`` file needs exactly one dataset. The table reports, per method, the mean ± sample standard
deviation (ddof = 1; 0 for one seed) of the final main metric, the mean train samples/s, the trainable
parameter count and the peak memory; ``OUT/compare.json`` holds the table plus every run's summary (each
run's ``metrics.jsonl`` has step/epoch/wall time for curves), ``OUT/compare.png`` the bar chart.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.train.data import load_task
from lorakit.train.methods import MethodSpec, parse_method, slug
from lorakit.train.run import (
    CONFIG_FILE,
    SUMMARY_FILE,
    FinetuneConfig,
    ResumeMismatchError,
    RunFolder,
    RunSummary,
    finetune,
    with_local_paths,
)
from lorakit.train.trainer import TrainingDivergedError
from lorakit.utils import atomic_save_figure, atomic_write_json

logger = logging.getLogger(__name__)

DEFAULT_METHODS = ("lora", "loraplus", "asym")


@dataclass
class CompareRow:
    """One (task, method) line of the table; two datasets with one name (``d1/train.jsonl``,
    ``d2/train.jsonl``) get distinct ``task`` names (see :func:`unique_task_names`)."""

    task: str
    method: str
    metric: str
    mean: float | None
    std: float | None
    scores: list[float]
    seeds: list[int]
    samples_per_s: float
    trainable_params: int
    peak_memory_mb: float
    diverged: int = 0
    # the dataset as given (None: the embedded tweets); ``task`` names one dataset only
    data: str | None = None


@dataclass
class CompareResult:
    rows: list[CompareRow]
    runs: list[RunSummary] = field(default_factory=list)
    out: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": [dataclasses.asdict(r) for r in self.rows],
            "runs": [r.to_dict() for r in self.runs],
            "out": self.out,
        }

    def table(self) -> str:
        return format_table(self.rows)


def compare(
    base: FinetuneConfig | None = None,
    methods: Sequence[str | MethodSpec] = DEFAULT_METHODS,
    seeds: Sequence[int] = (0,),
    datasets: Sequence[str | None] | None = None,
    out: str | os.PathLike = "runs/compare",
    equal_params: bool = False,
    reuse: bool = True,
) -> CompareResult:
    """Fine-tune every method × seed on every dataset (``datasets`` None → ``[base.data]``) and compare.

    ``methods`` are preset names, ``NAME:key=value,...`` strings (:func:`parse_method`) or MethodSpecs,
    applied over ``base.method`` (rank, alpha, targets...). ``equal_params`` doubles the rank of
    ``asym``/``freeze-b`` so they train as many parameters as ``lora``. A diverged run is recorded and
    counted, not fatal. Example — the GLUE study in one call::

        compare(FinetuneConfig(max_train_samples=2000), ["lora", "loraplus", "asym"], seeds=[0, 1, 2],
                datasets=["glue/RTE", "glue/MRPC", "glue/CoLA"], out="runs/glue")
    """
    base = base or FinetuneConfig()
    if not methods:
        raise ValueError("compare: give at least one method")
    if not seeds:
        raise ValueError("compare: give at least one seed")
    specs = [m if isinstance(m, MethodSpec) else parse_method(m, base.method) for m in methods]
    if equal_params:
        specs = [s.with_equal_params() for s in specs]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"compare: two methods share a name {names}; add label=... to tell them apart")
    out = Path(out)
    datasets = list(datasets) if datasets else [base.data]
    _check_datasets(datasets, base.eval_data)
    tasks = [
        load_task(
            data,
            eval_data=base.eval_data,
            text_cols=base.text_cols,
            label_col=base.label_col,
            task_type=base.task,
            label_names=base.labels,
            eval_fraction=base.eval_fraction,
            seed=0,
            tweets_train=base.tweets_train,
            tweets_eval=base.tweets_eval,
        )
        for data in datasets
    ]
    names = unique_task_names(datasets, [task.name for task in tasks])
    rows: list[CompareRow] = []
    summaries: list[RunSummary] = []
    for data, task, name in zip(datasets, tasks, names, strict=True):
        if name != task.name:
            logger.info("compare: %s is task %r (another dataset is also named %r)", data, name, task.name)
            task = replace(task, name=name)  # run folder, summary and curves name it so
        task_runs: dict[str, list[RunSummary]] = {}
        for spec in specs:
            for seed in seeds:
                run_dir = out / slug(task.name) / f"{slug(spec.name)}-s{seed}"
                config = replace(base, data=data, method=spec, seed=int(seed), out=str(run_dir), resume=False)
                state, summary = _previous_run(run_dir, config) if reuse else ("none", None)
                if state == "unfinished":
                    logger.info("compare: resuming the interrupted run in %s", run_dir)
                    config = replace(config, resume=True)
                if summary is None:
                    logger.info("compare: %s, %s, seed %d -> %s", task.name, spec.name, seed, run_dir)
                    try:
                        summary = _finetune_or_restart(config, task)
                    except TrainingDivergedError as error:
                        logger.warning("compare: %s", error)
                        summary = RunFolder(run_dir).read_summary()
                summaries.append(summary)
                task_runs.setdefault(spec.name, []).append(summary)
        rows += [_row(task.name, method, runs, data) for method, runs in task_runs.items()]
    result = CompareResult(rows, summaries, str(out))
    atomic_write_json(out / "compare.json", {**result.to_dict(), "base_config": base.to_dict()})
    plot_compare(rows, out / "compare.png")
    return result


def _finetune_or_restart(config: FinetuneConfig, task: Any) -> RunSummary:
    """``finetune``; an interrupted run that can no longer be resumed (its data changed) starts over."""
    try:
        return finetune(config, task=task)
    except ResumeMismatchError as error:
        logger.warning("compare: cannot resume %s (%s); starting it again", config.out, error)
        return finetune(replace(config, resume=False), task=task)


def _previous_run(run_dir: Path, config: FinetuneConfig) -> tuple[str, RunSummary | None]:
    """What ``run_dir`` holds of a run with the same config: ``("finished", summary)``, ``("unfinished",
    None)`` when it left a checkpoint to resume from, else ``("none", None)`` (absent, or other settings)."""
    try:
        saved = json.loads((run_dir / CONFIG_FILE).read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return "none", None
    # paths compared as config.json stores them: absolute where they name local files
    saved, wanted = with_local_paths(saved), json.loads(json.dumps(with_local_paths(config.to_dict())))
    ignore = ("progress", "resume")
    if not all(saved.get(k) == v for k, v in wanted.items() if k not in ignore):
        return "none", None
    try:
        summary = RunSummary.from_dict(json.loads((run_dir / SUMMARY_FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        summary = None
    if summary is not None and summary.status == "finished":
        logger.info("compare: reusing the finished run in %s", run_dir)
        return "finished", summary
    if summary is None and RunFolder(run_dir).latest_checkpoint() is not None:
        return "unfinished", None
    return "none", None


def _check_datasets(datasets: Sequence[str | os.PathLike | None], eval_data: str | None) -> None:
    """Refuse a dataset given twice, and ``eval_data`` with several datasets (whose eval split would it be?
    one file cannot be every dataset's, and silently dropping it would train against the wrong split)."""
    seen: dict[str, str | os.PathLike | None] = {}
    for data in datasets:
        key = "<tweets>" if data is None else str(Path(data).resolve() if Path(data).exists() else data)
        if key in seen:
            raise ValueError(f"compare: dataset {data} is given twice (as {seen[key]} and {data})")
        seen[key] = data
    if eval_data is not None and len(datasets) > 1:
        raise ValueError(
            f"compare: --eval-data {eval_data} needs exactly one --data, got {len(datasets)} datasets "
            f"({', '.join(str(d) for d in datasets)}); give each dataset its own dev file in a folder "
            "(train.* + dev.*) or run compare once per dataset"
        )


def unique_task_names(datasets: Sequence[str | os.PathLike | None], names: Sequence[str]) -> list[str]:
    """One distinct task name per dataset: a name that two datasets share (e.g. ``train`` for
    ``d1/train.jsonl`` and ``d2/train.jsonl``) gets the fewest parent folders that tell them apart
    (``d1/train``, ``d2/train``), else a 1-based index in the order given (``train#1``, ``train#2``).

    Names are compared as run-folder names (:func:`slug`, case-insensitively), so no two datasets share a
    folder; a name that no other dataset has is kept as it is.
    """

    def key(name: str) -> str:
        return slug(name).lower()

    def clashes(candidates: Sequence[str]) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(candidates):
            groups.setdefault(key(name), []).append(i)
        return {k: members for k, members in groups.items() if len(members) > 1}

    result = list(names)
    for members in clashes(names).values():
        parents = [_parent_parts(datasets[i]) for i in members]
        for depth in range(1, max(len(p) for p in parents) + 1):
            candidates = [
                "/".join([*p[max(len(p) - depth, 0) :], names[i]])
                for p, i in zip(parents, members, strict=True)
            ]
            if not clashes(candidates):
                break
        else:
            candidates = [f"{names[i]}#{n}" for n, i in enumerate(members, 1)]
        for i, candidate in zip(members, candidates, strict=True):
            result[i] = candidate
    for members in clashes(result).values():  # a new name that is another dataset's own name
        for n, i in enumerate(members, 1):
            result[i] = f"{result[i]}#{n}"
    if clashes(result):
        raise ValueError(f"compare: cannot give the datasets distinct task names (got {result})")
    return result


def _parent_parts(data: str | os.PathLike | None) -> tuple[str, ...]:
    """The folders above a local dataset (absolute), or () for the tweets default and HF hub names."""
    if data is None or not Path(data).exists():
        return ()
    return Path(data).resolve().parent.parts


def _row(task: str, method: str, runs: list[RunSummary], data: Any = None) -> CompareRow:
    ok = [r for r in runs if r.status == "finished" and r.score is not None]
    scores = [float(r.score) for r in ok]
    return CompareRow(
        task=task,
        method=method,
        metric=runs[0].main_metric,
        mean=float(np.mean(scores)) if scores else None,
        std=float(np.std(scores, ddof=1)) if len(scores) > 1 else (0.0 if scores else None),
        scores=scores,
        seeds=[r.seed for r in ok],
        samples_per_s=float(np.mean([r.train_samples_per_s for r in runs])),
        trainable_params=runs[0].trainable_params,
        peak_memory_mb=float(max(r.peak_memory_mb for r in runs)),
        diverged=len(runs) - len(ok),
        data=None if data is None else str(data),
    )


def format_table(rows: Sequence[CompareRow]) -> str:
    """A plain-text table: task, method, metric mean ± std (n), samples/s, trainable params, peak memory."""
    header = ["task", "method", "metric", "mean ± std (n)", "samples/s", "trainable", "peak MiB"]
    lines = []
    for r in rows:
        score = "diverged" if r.mean is None else f"{r.mean:.4f} ± {r.std:.4f} ({len(r.scores)})"
        if r.diverged and r.mean is not None:
            score += f" [{r.diverged} diverged]"
        lines.append(
            [
                r.task,
                r.method,
                r.metric,
                score,
                f"{r.samples_per_s:.1f}",
                f"{r.trainable_params:,}",
                f"{r.peak_memory_mb:.0f}",
            ]
        )
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt.format(*header), rule, *(fmt.format(*line) for line in lines)])


def plot_compare(rows: Sequence[CompareRow], path: str | os.PathLike) -> None:
    """Bar chart of mean ± std per method, one panel per task (PNG; the numbers are in compare.json)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r.task for r in rows))
    fig, axes = plt.subplots(
        1, len(tasks), figsize=(1.5 + 1.6 * max(len(rows) // len(tasks), 1) * len(tasks), 3.6), squeeze=False
    )
    for ax, task in zip(axes[0], tasks, strict=True):
        task_rows = [r for r in rows if r.task == task]
        means = [r.mean if r.mean is not None else 0.0 for r in task_rows]
        stds = [r.std or 0.0 for r in task_rows]
        x = np.arange(len(task_rows))
        ax.bar(x, means, yerr=stds, capsize=4, color=[f"C{i}" for i in range(len(task_rows))])
        for xi, r in zip(x, task_rows, strict=True):
            ax.scatter([xi] * len(r.scores), r.scores, color="k", s=10, zorder=3)
        ax.set_xticks(x, [r.method for r in task_rows], rotation=20)
        ax.set_title(task)
        ax.set_ylabel(f"{task_rows[0].metric} (mean ± std)")
        finite = [m for m in means if m]
        if finite:
            low = min(m - s for m, s in zip(means, stds, strict=True) if m)
            ax.set_ylim(max(0.0, low - 0.1 * abs(low)) if low > 0 else None, None)
    fig.tight_layout()
    atomic_save_figure(fig, path)
