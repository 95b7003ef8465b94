"""``lorakit reproduce expressive``: the synthetic experiments of Zeng & Lee (ICLR 2024, Sec. 5, Figs. 2-4).

For each family (linear L̄=1/L=2; ReLU FNN (L̄, L) = (1, 2) and (2, 4); TFN with L = 1, 2 blocks) and each
LoRA rank R it records the test MSE (median over seeds) of the closed-form construction, of Adam-trained
LoRA (grid search, best validation run per seed) and the error bound; then LoRA against tuning the final k
layers at equal parameter count (L̄ = 1, L = 8). Protocol in :mod:`lorakit.theory.baselines`. Frozen and
target models are independent random networks (target drawn first), one model stream per seed and family;
train/validation/test/calibration inputs come from separate generators.

``--quick`` (default) keeps every rank 1..16 for the constructions but trains fewer seeds, steps and grid
points; ``--full`` uses the paper's sizes (5 seeds, 5,000 Adam steps, the 3 x 4 grid, tune_bias ∈ {0, 1}),
which takes hours on a CPU.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lorakit.experiments import add_size_arguments
from lorakit.theory.baselines import (
    PAPER_LRS,
    PAPER_WEIGHT_DECAYS,
    TrainSettings,
    median,
    merge_selections,
    split_inputs,
    train_final_layers_fnn,
    train_lora_fnn,
    train_lora_tfn,
)
from lorakit.theory.bounds import fnn_error_bound
from lorakit.theory.fnn import DomainWarning, construct_fnn
from lorakit.theory.linear import construct_linear, gaussian_mse
from lorakit.theory.models import FNN, TFN
from lorakit.theory.rank import uniform_rank
from lorakit.theory.transformer import construct_tfn
from lorakit.utils import atomic_save_figure, atomic_write_json, named_generator

logger = logging.getLogger(__name__)

FAMILIES = ("linear", "fnn-1-2", "fnn-2-4", "tfn-1", "tfn-2", "flt")


@dataclass
class Plan:
    """Sizes of one reproduction run."""

    seeds: int
    steps: int
    tfn_steps: int
    lrs: tuple[float, ...]
    weight_decays: tuple[float, ...]
    tune_bias: tuple[bool, ...]
    ranks: list[int]
    gradient_ranks: list[int]
    tfn_gradient_ranks: list[int]
    tfn_batch: int
    tfn_lrs: tuple[float, ...] = PAPER_LRS
    width: int = 16
    heads: int = 2
    tokens: int = 10
    test_size: int = 5000
    calibration_size: int = 1024
    margin: float = 1.0
    families: tuple[str, ...] = FAMILIES
    gradient: bool = True
    progress: bool = True


def quick_plan(width: int = 16) -> Plan:
    ranks = list(range(1, width + 1))
    half = math.ceil(width / 2)
    return Plan(
        seeds=2,
        steps=1000,
        tfn_steps=200,
        lrs=(1e-2, 1e-3),
        weight_decays=(0.0,),
        tune_bias=(True,),
        ranks=ranks,
        gradient_ranks=ranks,
        tfn_gradient_ranks=sorted({1, width // 4 or 1, half, width}),
        tfn_batch=32,
        tfn_lrs=(1e-2,),
        width=width,
    )


def full_plan(width: int = 16) -> Plan:
    ranks = list(range(1, width + 1))
    return Plan(
        seeds=5,
        steps=5000,
        tfn_steps=5000,
        lrs=PAPER_LRS,
        weight_decays=PAPER_WEIGHT_DECAYS,
        tune_bias=(False, True),
        ranks=ranks,
        gradient_ranks=ranks,
        tfn_gradient_ranks=ranks,
        tfn_batch=256,
        width=width,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_size_arguments(
        parser, "expressive", "small run, <= 5 min on 2 cores", "the paper's sizes (hours on a CPU)"
    )
    parser.add_argument("--seeds", type=int, help="number of seeds (overrides the mode)")
    parser.add_argument("--steps", type=int, help="Adam steps for FNN/linear baselines (overrides the mode)")
    parser.add_argument("--tfn-steps", type=int, help="Adam steps for the TFN baseline (overrides the mode)")
    parser.add_argument("--width", type=int, default=16, help="width D of every model (paper: 16)")
    parser.add_argument(
        "--families", default=",".join(FAMILIES), help=f"comma-separated subset of {', '.join(FAMILIES)}"
    )
    parser.add_argument("--ranks", help="ranks to evaluate, e.g. '1-16' or '1,4,8' (default 1..D)")
    parser.add_argument(
        "--no-gradient", action="store_true", help="skip the Adam baselines (constructions only)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the matrices are tiny; extra threads thrash on a busy CPU)",
    )


def _parse_ranks(text: str, width: int) -> list[int]:
    ranks: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            lo, _, hi = part.partition("-")
            ranks.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise ValueError(
                f"--ranks: expected integers or ranges like '1-16' or '1,4,8', got {part!r}"
            ) from None
    if not ranks or min(ranks) < 1 or max(ranks) > width:
        raise ValueError(f"--ranks: expected ranks between 1 and the width {width}, got {sorted(ranks)}")
    return sorted(ranks)


def plan_from_args(args: argparse.Namespace) -> Plan:
    width = int(args.width)
    if width < 2:
        raise ValueError(f"--width: expected at least 2, got {width}")
    plan = full_plan(width) if args.full else quick_plan(width)
    if args.seeds is not None:
        if args.seeds < 1:
            raise ValueError(f"--seeds: expected a positive number, got {args.seeds}")
        plan.seeds = args.seeds
    if args.steps is not None:
        plan.steps = args.steps
    if args.tfn_steps is not None:
        plan.tfn_steps = args.tfn_steps
    if args.ranks:
        plan.ranks = _parse_ranks(args.ranks, width)
        plan.gradient_ranks = plan.ranks
        plan.tfn_gradient_ranks = [r for r in plan.tfn_gradient_ranks if r in plan.ranks] or plan.ranks
    families = tuple(f.strip() for f in args.families.split(",") if f.strip())
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise ValueError(
            f"--families: unknown {unknown or families}; expected a subset of {', '.join(FAMILIES)}"
        )
    plan.families = families
    plan.gradient = not args.no_gradient
    plan.progress = not args.no_progress
    return plan


def _settings(
    plan: Plan, steps: int, batch: int = 256, lrs: tuple[float, ...] | None = None
) -> TrainSettings:
    return TrainSettings(
        steps=steps,
        lrs=lrs or plan.lrs,
        weight_decays=plan.weight_decays,
        batch=batch,
        val_size=256,
        test_size=plan.test_size,
        tokens=plan.tokens,
        progress=plan.progress,
    )


def _fnn_pair(
    seed: int, family: str, width: int, target_depth: int, depth: int, relu: bool
) -> tuple[FNN, FNN]:
    generator = named_generator(seed, f"expressive/models/{family}")
    target = FNN.random(width, target_depth, generator, relu=relu)  # target first, as in the authors' code
    frozen = FNN.random(width, depth, generator, relu=relu)
    return frozen, target


def _tfn_pair(seed: int, family: str, plan: Plan, depth: int) -> tuple[TFN, TFN]:
    generator = named_generator(seed, f"expressive/models/{family}")
    target = TFN.random(plan.width, depth, plan.heads, generator)
    frozen = TFN.random(plan.width, depth, plan.heads, generator)
    return frozen, target


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean())


def _gradient_fnn(
    plan: Plan, frozen: list[FNN], targets: list[FNN], ranks: list[int], tune: tuple[bool, ...]
):
    seeds = list(range(plan.seeds))
    settings = _settings(plan, plan.steps)
    result = None
    for tune_bias in tune:
        run = train_lora_fnn(frozen, targets, ranks, seeds, settings, tune_bias=tune_bias)
        result = run if result is None else merge_selections(result, run)
    return result


def run_linear(plan: Plan) -> dict:
    """L̄ = 1, L = 2, no biases or activations: construction, Gaussian-identity prediction, gradient LoRA."""
    D, depth = plan.width, 2
    pairs = [_fnn_pair(s, "linear", D, 1, depth, relu=False) for s in range(plan.seeds)]
    construction, predicted, spectral = [], [], []
    for seed, (frozen, target) in enumerate(pairs):
        x = split_inputs(seed, "test", plan.test_size, (D,))
        rows, preds, specs = [], [], []
        for rank in plan.ranks:
            lin = construct_linear(frozen.weights, target.weights[0], rank)
            adapted = frozen.adapted(lin.deltas)
            rows.append(_mse(adapted(x), target(x)))
            preds.append(gaussian_mse(lin.singular_values, rank * depth, D))
            specs.append(lin.spectral_error)
        construction.append(rows)
        predicted.append(preds)
        spectral.append(specs)
    result = {
        "family": "linear",
        "target_depth": 1,
        "frozen_depth": depth,
        "threshold_rank": math.ceil(D / depth),
        "ranks": plan.ranks,
        "construction": _summary(construction),
        "theory_gaussian_mse": _summary(predicted),
        "bound": _summary([[s**2 for s in row] for row in spectral]),
        "bound_note": "σ_{RL+1}(E)² = (spectral error)²: bounds the per-output MSE for x ~ N(0, I)",
    }
    if plan.gradient:
        frozen, targets = zip(*pairs, strict=True)
        result["gradient"] = _gradient_fnn(plan, list(frozen), list(targets), plan.gradient_ranks, (False,))
    return result


def run_fnn(plan: Plan, target_depth: int, depth: int) -> dict:
    """ReLU FNN (L̄, L): construction (uniform partition), bound, shifted-domain check, gradient LoRA."""
    D, family = plan.width, f"fnn-{target_depth}-{depth}"
    pairs = [_fnn_pair(s, family, D, target_depth, depth, relu=True) for s in range(plan.seeds)]
    threshold = uniform_rank(D, target_depth, depth)
    construction, bounds, violations, shifted = [], [], [], []
    for seed, (frozen, target) in enumerate(pairs):
        x = split_inputs(seed, "test", plan.test_size, (D,))
        calibration = split_inputs(seed, "calibration", plan.calibration_size, (D,))
        y = target(x)
        rows, bound_row = [], []
        for rank in plan.ranks:
            built = construct_fnn(frozen, target, rank, calibration, margin=plan.margin)
            rows.append(_mse(built(x, check_domain=False), y))
            bound_row.append(fnn_error_bound(frozen, target, rank)["mse"])
            if rank == threshold:
                violations.append(sum(built.bypass_violations(x).values()))
                x_far = 5 * split_inputs(seed, "shifted-test", plan.test_size, (D,))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DomainWarning)
                    shifted.append(_mse(built(x_far), target(x_far)))
        construction.append(rows)
        bounds.append(bound_row)
    result = {
        "family": family,
        "target_depth": target_depth,
        "frozen_depth": depth,
        "threshold_rank": threshold,
        "ranks": plan.ranks,
        "construction": _summary(construction),
        "bound": _summary(bounds),
        "bound_note": "lorakit.theory.bounds.fnn_error_bound (rms² / D); valid where bypassed ReLUs stay on",
        "test_points_outside_domain_at_threshold": violations,
        "shifted_test_mse_at_threshold": {"per_seed": shifted, "median": median(shifted), "input_scale": 5.0},
    }
    if plan.gradient:
        frozen, targets = zip(*pairs, strict=True)
        result["gradient"] = _gradient_fnn(
            plan, list(frozen), list(targets), plan.gradient_ranks, plan.tune_bias
        )
    return result


def run_tfn(plan: Plan, depth: int) -> dict:
    """Simplified transformer with ``depth`` blocks: construction (float64) and gradient LoRA (float32)."""
    D, family = plan.width, f"tfn-{depth}"
    pairs = [_tfn_pair(s, family, plan, depth) for s in range(plan.seeds)]
    construction = []
    for seed, (frozen, target) in enumerate(pairs):
        X = split_inputs(seed, "test", plan.test_size, (D, plan.tokens))
        y = target(X)
        construction.append([_mse(construct_tfn(frozen, target, rank)(X), y) for rank in plan.ranks])
    result = {
        "family": family,
        "blocks": depth,
        "heads": plan.heads,
        "tokens": plan.tokens,
        "threshold_rank": math.ceil(D / 2),
        "ranks": plan.ranks,
        "construction": _summary(construction),
    }
    if plan.gradient:
        frozen, targets = zip(*pairs, strict=True)
        settings = _settings(plan, plan.tfn_steps, batch=plan.tfn_batch, lrs=plan.tfn_lrs)
        result["gradient"] = train_lora_tfn(
            list(frozen), list(targets), plan.tfn_gradient_ranks, list(range(plan.seeds)), settings
        )
    return result


def run_flt(plan: Plan) -> dict:
    """L̄ = 1, L = 8: LoRA (all layers, biases tuned) vs tuning the last k layers, by tunable parameters."""
    D, depth = plan.width, 8
    pairs = [_fnn_pair(s, "flt", D, 1, depth, relu=True) for s in range(plan.seeds)]
    frozen, targets = (list(t) for t in zip(*pairs, strict=True))
    seeds = list(range(plan.seeds))
    lora = _gradient_fnn(plan, frozen, targets, plan.gradient_ranks, (True,))
    flt = train_final_layers_fnn(frozen, targets, list(range(1, depth)), seeds, _settings(plan, plan.steps))
    return {
        "family": "flt",
        "target_depth": 1,
        "frozen_depth": depth,
        "lora": {**lora, "params": [2 * r * D * depth for r in plan.gradient_ranks]},
        "final_layers": {**flt, "params": [k * D * D for k in range(1, depth)]},
        "params_note": "2·R·D·L for LoRA, k·D² for final-layer tuning (biases not counted, as in the paper)",
    }


def _summary(rows: list[list[float]]) -> dict:
    columns = list(zip(*rows, strict=True))
    return {"per_seed": rows, "median": [median(list(c)) for c in columns]}


def _plot_family(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ranks = result["ranks"]
    for ax, log in zip(axes, (False, True), strict=True):
        ax.plot(ranks, result["construction"]["median"], "o-", label="our construction")
        if "gradient" in result:
            ax.plot(
                result["gradient"]["variants"], result["gradient"]["median"], "s--", label="gradient update"
            )
        if "bound" in result:
            ax.plot(ranks, result["bound"]["median"], ":", color="gray", label="bound")
        if "theory_gaussian_mse" in result:
            ax.plot(ranks, result["theory_gaussian_mse"]["median"], "x", color="k", label="(1/D)Σ_{i>RL}σ_i²")
        ax.axvline(
            result["threshold_rank"], color="red", alpha=0.3, label=f"threshold R={result['threshold_rank']}"
        )
        ax.set_xlabel("LoRA rank R")
        ax.set_ylabel("test MSE" + (" (log)" if log else ""))
        if log:
            ax.set_yscale("log")
        else:
            top = max(v for v in result["construction"]["median"] if math.isfinite(v))
            ax.set_ylim(bottom=0, top=1.15 * top if top > 0 else 1)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Zeng & Lee reproduction: {result['family']} (median over seeds)")
    atomic_save_figure(fig, path)


def _plot_flt(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(result["lora"]["params"], result["lora"]["median"], "o-", label="LoRA (all 8 layers)")
    ax.plot(
        result["final_layers"]["params"],
        result["final_layers"]["median"],
        "s-",
        label="tuning final k layers",
    )
    ax.set_xlabel("# tunable parameters (biases not counted)")
    ax.set_ylabel("test MSE (log)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("L̄=1, L=8: LoRA vs final-layer tuning")
    atomic_save_figure(fig, path)


def run(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    if args.threads < 1:
        raise ValueError(f"--threads: expected a positive number, got {args.threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(plan, args)
    finally:
        torch.set_num_threads(previous)


def _run(plan: Plan, args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    jobs = {
        "linear": lambda: run_linear(plan),
        "fnn-1-2": lambda: run_fnn(plan, 1, 2),
        "fnn-2-4": lambda: run_fnn(plan, 2, 4),
        "tfn-1": lambda: run_tfn(plan, 1),
        "tfn-2": lambda: run_tfn(plan, 2),
        "flt": lambda: run_flt(plan),
    }
    summary: dict = {"mode": "full" if args.full else "quick", "plan": _plan_dict(plan), "results": {}}
    for family in tqdm(plan.families, desc="expressive", disable=not plan.progress):
        tic = time.perf_counter()
        result = jobs[family]()
        result["seconds"] = round(time.perf_counter() - tic, 2)
        name = family.replace("-", "_")
        atomic_write_json(out / f"{name}.json", result)
        (_plot_flt if family == "flt" else _plot_family)(result, out / f"{name}.png")
        summary["results"][family] = result
        logger.info("%s done in %.1f s", family, result["seconds"])
    summary["seconds"] = round(time.perf_counter() - start, 2)
    atomic_write_json(out / "expressive.json", summary)
    logger.info("wrote %s (%.1f s)", out / "expressive.json", summary["seconds"])
    return 0


def _plan_dict(plan: Plan) -> dict:
    return dict(vars(plan))
