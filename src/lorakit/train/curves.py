"""Time to accuracy: eval metric against training steps and wall-clock, per method, from run folders.

LoRA+ (Hayou, Ghosh & Yu, ICML 2024, Fig. 7) reports that on MNLI, LoRA+ (λ = 2⁴) reaches standard
LoRA's final 3-epoch accuracy after about 1.6 epochs. This module measures the same quantity on our runs:
the *target* is the reference method's final score, averaged over its seeds,

    target = mean_s  m_ref,s(T),

and for each method the time to accuracy is the first evaluation step t at which its seed-mean eval curve
m̄(t) = mean_s m_s(t) reaches the target (m̄(t) ≥ target, or ≤ for losses). The per-seed first steps are
reported too. Runs are read from ``metrics.jsonl`` (``type == "eval"`` records: step, epoch, train_time,
wall_time, metrics) and ``summary.json``/``config.json`` (method, task, seed, main metric).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.train.metrics import higher_is_better
from lorakit.utils import atomic_save_figure, atomic_write_json, read_json, read_jsonl

logger = logging.getLogger(__name__)

__all__ = [
    "NoEvalRecordsError",
    "RunCurve",
    "curves_report",
    "find_runs",
    "load_curve",
    "plot_curves",
    "time_to_accuracy",
]

TIME_KEYS = ("train_time", "wall_time")
RUN_FILES = ("metrics.jsonl", "summary.json")


class NoEvalRecordsError(ValueError):
    """A run folder without eval records (e.g. a run that diverged before its first evaluation)."""


@dataclass
class RunCurve:
    """The eval curve of one run."""

    run_dir: str
    method: str
    task: str
    seed: int
    metric: str
    steps: list[int]
    epochs: list[float]
    times: dict[str, list[float]]
    values: list[float]

    @property
    def final(self) -> float:
        return self.values[-1]


def find_runs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Run folders in ``paths``: each path is a run or a folder searched below. A run folder holds
    ``metrics.jsonl`` or ``summary.json`` (a run that stopped before its first log line has only the
    summary; :func:`curves_report` lists it as left out)."""
    found: list[Path] = []
    for item in paths:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such run folder")
        if any((path / name).exists() for name in RUN_FILES):
            found.append(path)
        else:
            found += sorted({p.parent for name in RUN_FILES for p in path.rglob(name)})
    if not found:
        raise FileNotFoundError(
            f"no run folder (with metrics.jsonl or summary.json) in {[str(p) for p in paths]}"
        )
    return list(dict.fromkeys(found))


def load_curve(run_dir: str | os.PathLike, metric: str | None = None) -> RunCurve:
    """Read one run's eval records; ``metric`` defaults to the run's main metric."""
    run = Path(run_dir)
    info: dict[str, Any] = {}
    for name in ("summary.json", "config.json"):
        if (run / name).exists():
            info[name] = read_json(run / name)
    summary, config = info.get("summary.json", {}), info.get("config.json", {})
    method = summary.get("method") or config.get("config", {}).get("method", {}).get("name") or run.name
    task = summary.get("task") or config.get("task", {}).get("name") or "task"
    seed = int(summary.get("seed", config.get("config", {}).get("seed", 0)))
    path = run / "metrics.jsonl"
    records = (
        [record for _, record in read_jsonl(path) if record.get("type") == "eval"] if path.exists() else []
    )
    if metric is None:
        metric = summary.get("main_metric") or (config.get("task", {}).get("metrics") or [None])[0]
    if not records:
        status = summary.get("status")
        if status and status != "finished":
            why = f"the run {status} before its first evaluation"
        else:
            why = "set eval_every to get a curve"
        where = (
            f"{path}: no eval records (type == 'eval')"
            if path.exists()
            else f"{run}: no eval records (no metrics.jsonl)"
        )
        raise NoEvalRecordsError(f"{where}; {why}")
    if metric is None or metric not in records[-1]:
        raise ValueError(f"{path}: eval records have no metric {metric!r} (have {sorted(records[-1])})")
    records.sort(key=lambda r: r["step"])
    return RunCurve(
        run_dir=str(run),
        method=str(method),
        task=str(task),
        seed=seed,
        metric=metric,
        steps=[int(r["step"]) for r in records],
        epochs=[float(r.get("epoch", math.nan)) for r in records],
        times={k: [float(r.get(k, math.nan)) for r in records] for k in TIME_KEYS},
        values=[float(r[metric]) for r in records],
    )


def _reached(value: float, target: float, higher: bool) -> bool:
    return value >= target if higher else value <= target


def _mean_curve(curves: Sequence[RunCurve]) -> dict[str, list[float]]:
    """Seed-mean curve over the steps that every run evaluated (runs of one method share their steps)."""
    common = sorted(set.intersection(*(set(c.steps) for c in curves)))

    def at(c: RunCurve, values: Sequence[float], step: int) -> float:
        return values[c.steps.index(step)]

    out: dict[str, list[float]] = {"step": [float(s) for s in common]}
    out["value"] = [float(np.mean([at(c, c.values, s) for c in curves])) for s in common]
    out["epoch"] = [float(np.mean([at(c, c.epochs, s) for c in curves])) for s in common]
    for key in TIME_KEYS:
        out[key] = [float(np.mean([at(c, c.times[key], s) for c in curves])) for s in common]
    return out


def _first(curve: dict[str, list[float]], target: float, higher: bool) -> int | None:
    return next((i for i, v in enumerate(curve["value"]) if _reached(v, target, higher)), None)


def time_to_accuracy(
    curves: Sequence[RunCurve], reference: str = "lora", time_key: str = "train_time"
) -> dict[str, Any]:
    """Per task: the target (reference method's seed-mean final score) and, per method, when it is reached.

    Returns ``{task: {"metric", "target", "reference", "methods": {method: {...}}}}`` where each method has
    ``final_mean``, ``mean_curve_step/epoch/time`` (None if never reached), ``seed_steps`` (per seed first
    step, None if never), ``steps_ratio`` (reference's step / this method's step) and its ``curve``.
    """
    if time_key not in TIME_KEYS:
        raise ValueError(f"time_to_accuracy: time_key must be one of {TIME_KEYS}, got {time_key!r}")
    tasks: dict[str, Any] = {}
    for task in dict.fromkeys(c.task for c in curves):
        part = [c for c in curves if c.task == task]
        metrics = {c.metric for c in part}
        if len(metrics) > 1:
            raise ValueError(f"task {task}: runs report different metrics {sorted(metrics)}; pass --metric")
        metric = metrics.pop()
        higher = higher_is_better(metric)
        by_method: dict[str, list[RunCurve]] = {}
        for c in part:
            by_method.setdefault(c.method, []).append(c)
        if reference not in by_method:
            raise ValueError(
                f"task {task}: no run of the reference method {reference!r} (have {sorted(by_method)})"
            )
        target = float(np.mean([c.final for c in by_method[reference]]))
        entry: dict[str, Any] = {"metric": metric, "target": target, "reference": reference, "methods": {}}
        for method, runs in by_method.items():
            curve = _mean_curve(runs)
            index = _first(curve, target, higher)
            seed_steps = {}
            for run in sorted(runs, key=lambda r: r.seed):
                hit = next(
                    (s for s, v in zip(run.steps, run.values, strict=True) if _reached(v, target, higher)),
                    None,
                )
                seed_steps[str(run.seed)] = hit
            entry["methods"][method] = {
                "runs": len(runs),
                "final_mean": float(np.mean([r.final for r in runs])),
                "total_steps": int(curve["step"][-1]) if curve["step"] else None,
                "mean_curve_step": None if index is None else int(curve["step"][index]),
                "mean_curve_epoch": None if index is None else curve["epoch"][index],
                "mean_curve_time": None if index is None else curve[time_key][index],
                "seed_steps": seed_steps,
                "curve": curve,
            }
        ref_step = entry["methods"][reference]["mean_curve_step"]
        for info in entry["methods"].values():
            step = info["mean_curve_step"]
            info["steps_ratio"] = None if (step is None or ref_step is None or step == 0) else ref_step / step
        tasks[task] = entry
    return tasks


def plot_curves(
    report: dict[str, Any],
    path: str | os.PathLike,
    time_key: str = "train_time",
    skipped: Sequence[str] = (),
) -> None:
    """One row per task: metric vs step (left) and vs ``time_key`` seconds (right), seed-mean per method,
    the target dashed and the first point at or past it marked; ``skipped`` runs (no eval records) are
    named under the plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report)
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 3.4 * len(tasks)), squeeze=False)
    label = "training time (s, excl. eval)" if time_key == "train_time" else "wall-clock (s)"
    for row, task in zip(axes, tasks, strict=True):
        entry = report[task]
        for color, (method, info) in enumerate(entry["methods"].items()):
            curve = info["curve"]
            for ax, x_key in zip(row, ("step", time_key), strict=True):
                ax.plot(curve[x_key], curve["value"], "-o", markersize=3, color=f"C{color}", label=method)
                if info["mean_curve_step"] is not None:
                    i = curve["step"].index(float(info["mean_curve_step"]))
                    ax.plot(
                        curve[x_key][i], curve["value"][i], "*", markersize=13, color=f"C{color}", mec="k"
                    )
        for ax, xlabel in zip(row, ("optimizer step", label), strict=True):
            ax.axhline(entry["target"], color="k", linestyle="--", linewidth=1)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(entry["metric"])
            ax.set_title(
                f"{task}: ★ first reaches {entry['reference']}'s final ({entry['target']:.3f})", fontsize=9
            )
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7)
    if skipped:
        note = "left out (no eval records): " + ", ".join(skipped)
        fig.text(0.01, 0.005, note, fontsize=7, color="firebrick", va="bottom", wrap=True)
        fig.tight_layout(rect=(0, 0.06 / len(tasks), 1, 1))
    else:
        fig.tight_layout()
    atomic_save_figure(fig, path)


def curves_report(
    runs: Iterable[str | os.PathLike],
    reference: str = "lora",
    out: str | os.PathLike = "runs/curves",
    metric: str | None = None,
    time_key: str = "train_time",
) -> dict[str, Any]:
    """Load runs (folders or parents of run folders), compute :func:`time_to_accuracy`, write
    ``OUT/curves.png`` and ``OUT/curves.json``; returns the JSON data.

    A run without eval records (one that diverged or stopped before its first evaluation) is left out with
    a warning; ``runs`` lists the runs drawn, ``skipped`` the ones left out (``run``, ``reason``), and the
    plot names them. Only when no run has eval records is it an error.
    """
    dirs = find_runs(runs)
    curves: list[RunCurve] = []
    skipped: list[dict[str, str]] = []
    for d in dirs:
        try:
            curves.append(load_curve(d, metric))
        except NoEvalRecordsError as error:
            logger.warning("curves: leaving out %s: %s", d, error)
            skipped.append({"run": str(d), "reason": str(error)})
    if not curves:
        raise NoEvalRecordsError(
            f"no run has eval records, so there is no curve to draw: "
            f"{'; '.join(s['reason'] for s in skipped)}"
        )
    try:
        tasks = time_to_accuracy(curves, reference, time_key)
    except ValueError as error:
        if not skipped:
            raise
        left_out = ", ".join(s["run"] for s in skipped)
        raise ValueError(f"{error}; left out for lack of eval records: {left_out}") from error
    out = Path(out)
    plot_curves(tasks, out / "curves.png", time_key, skipped=[s["run"] for s in skipped])
    data = {
        "reference": reference,
        "time_key": time_key,
        "runs": [c.run_dir for c in curves],
        "skipped": skipped,
        "tasks": tasks,
    }
    atomic_write_json(out / "curves.json", data)
    return data


def format_report(data: dict[str, Any]) -> str:
    """Plain-text lines: per task and method, the first step (epoch, seconds) at the reference's final."""
    lines = []
    for item in data.get("skipped", []):
        lines.append(f"left out {item['run']}: no eval records")
    for task, entry in data["tasks"].items():
        lines.append(f"{task}: target = {entry['reference']} final {entry['metric']} {entry['target']:.4f}")
        for method, info in entry["methods"].items():
            if info["mean_curve_step"] is None:
                when = "not reached"
            else:
                when = (
                    f"step {info['mean_curve_step']} of {info['total_steps']} "
                    f"(epoch {info['mean_curve_epoch']:.2f}, {info['mean_curve_time']:.1f} s)"
                )
            lines.append(f"  {method:<16} final {info['final_mean']:.4f}  reaches target at {when}")
    return "\n".join(lines)
