"""``lorakit sweep`` (a resumable (η_A, η_B) [× rank × seed] grid of fine-tuning runs, local or on Ray) and
``lorakit curves`` (time-to-accuracy curves from run folders); see :mod:`lorakit.train.sweep` and
:mod:`lorakit.train.curves`."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os

from lorakit.cli import LorakitError

logger = logging.getLogger(__name__)


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(v > 0 and math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got {text!r}")
    return values


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return values


# finetune options that a sweep cell would ignore, and what takes their place (see _NotASweepOption)
NOT_SWEEP_OPTIONS: dict[tuple[str, ...], str] = {
    ("--lr",): "the grid sets each cell's learning rates: --eta-a gives eta_A (finetune's --lr)",
    ("--ratio",): "the grid sets each cell's learning rates: --eta-b gives eta_B, so eta_B/eta_A varies "
    "over the grid (finetune's --ratio)",
    ("--method", "-m"): "every cell fine-tunes a LoRA adapter (finetune's --method lora) at the grid's "
    "eta_A and eta_B, which covers loraplus (lora with eta_B = 16 x eta_A); --init, --rank, --alpha, "
    "--targets, --dropout and --rslora shape the adapter",
    ("--resume",): "a sweep always resumes: run the same command again and the recorded cells are skipped",
    ("--no-progress",): "sweep cells never show a progress bar",
}


class _NotASweepOption(argparse.Action):
    """A ``finetune`` option that a sweep would ignore: giving it is a usage error that says what to use."""

    def __init__(self, option_strings: list[str], dest: str, instead: str = "", **kwargs: object) -> None:
        kwargs.update(nargs="?", help=argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)  # type: ignore[arg-type]
        self.instead = instead

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: object, values: object, option=None
    ) -> None:
        parser.error(f"{option} is not a sweep option: {self.instead}")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sweep`` and ``curves``."""
    formatter = argparse.RawDescriptionHelpFormatter
    sweep = subparsers.add_parser(
        "sweep",
        help="grid over (eta_A, eta_B) [x rank x seed]: CSV, heatmaps, median top-k eta_B/eta_A",
        description="Fine-tune one run per (eta_A, eta_B[, rank][, seed]) cell in a local process pool or on "
        "a Ray cluster. Finished cells are recorded in OUT/cells/ and skipped when the command is run "
        "again (after a crash or Ctrl-C). Writes OUT/cells.csv, OUT/grid.csv (mean/std over seeds), "
        "OUT/heatmap_metric[_rR].png and heatmap_train_loss (eta_A = eta_B dashed, best cell boxed, cells "
        "within 1% of the best dotted) and OUT/sweep.json with the LoRA+ Fig. 6 statistic: the median "
        "eta_B/eta_A of the top-k cells. Cells are ranked by the task's main eval metric (accuracy, F1, "
        "MCC, Pearson, ...; for --task causal-lm the eval loss, where lower is better).\n\n"
        "Every cell fine-tunes a LoRA adapter as 'lorakit finetune --method lora' would: the data, "
        "adapter (--rank, --alpha, --targets, --init, --dropout, --rslora) and training options below are "
        "finetune's and apply to every cell. The grid takes the place of finetune's --lr and --ratio "
        "(--eta-a, --eta-b), --seed (--seeds) and, with --ranks, --rank; --method, --resume, --no-progress "
        "and the --diagnostics options are not sweep options. A rerun resumes; if its settings differ from "
        "the recorded ones it stops with an error naming them (use a new --out for new settings).",
        epilog="examples:\n"
        "  lorakit sweep --data ../shared/data/glue/MRPC --eta-a 1e-4,2e-4,5e-4,1e-3 \\\n"
        "      --eta-b 2e-4,5e-4,1e-3,4e-3,1e-2 --seeds 0,1 --workers 2 --epochs 3 --out runs/sweep-mrpc\n"
        "  lorakit sweep --data ../shared/data/glue/RTE --eta-a 1e-4,1e-3 --eta-b 1e-3,1e-2 --ranks 8,16 \\\n"
        "      --ray-address auto --gpus-per-cell 0.25 --out runs/sweep-rte      # on a Ray cluster\n"
        "  lorakit sweep --synthetic --eta-a 1e-5,1e-4,1e-3 --eta-b 1e-4,1e-3,1e-2 --out runs/dry",
        formatter_class=formatter,
        conflict_handler="resolve",
    )
    from lorakit.cli.finetune import _add_data_args, _add_method_args, _add_train_args

    grid = sweep.add_argument_group("grid")
    grid.add_argument("--eta-a", type=_floats, required=True, help="learning rates of A, comma-separated")
    grid.add_argument("--eta-b", type=_floats, required=True, help="learning rates of B, comma-separated")
    grid.add_argument(
        "--ranks", type=_ints, default=None, help="ranks, comma-separated (default: --rank, or 8)"
    )
    grid.add_argument("--seeds", type=_ints, default=[0], help="seeds, comma-separated (default 0)")
    grid.add_argument("--top-k", type=int, default=4, help="cells in the median-ratio statistic (default 4)")
    grid.add_argument(
        "--synthetic",
        action="store_true",
        help="score cells with a closed-form function instead of training (checks a Ray/pool setup)",
    )
    engine = sweep.add_argument_group("engine")
    engine.add_argument("--workers", type=int, default=1, help="local processes (default 1: this process)")
    engine.add_argument(
        "--gpus", default="", help="device ids for the local workers, comma-separated (one per worker)"
    )
    engine.add_argument(
        "--ray-address", default=None, help="run the cells as Ray tasks on this cluster ('auto', ray://...)"
    )
    engine.add_argument("--cpus-per-cell", type=float, default=1.0, help="Ray CPUs per cell (default 1)")
    engine.add_argument("--gpus-per-cell", type=float, default=0.0, help="Ray GPUs per cell (default 0)")
    known = set(sweep._actions)
    _add_data_args(sweep, "GLUE folder, folder with train/dev files or CSV/TSV/JSONL file (default: tweets)")
    _add_method_args(sweep)
    _add_train_args(sweep, epochs=1.0)
    for options, instead in NOT_SWEEP_OPTIONS.items():
        # replaces finetune's --lr, --ratio and --no-progress (the parser resolves the conflict)
        dest = options[0].lstrip("-").replace("-", "_")
        sweep.add_argument(*options, action=_NotASweepOption, dest=dest, default=None, instead=instead)
    # --rank defaults to None here so that --rank with --ranks (which would ignore it) can be told apart
    sweep.set_defaults(rank=None)
    # what --synthetic ignores: every finetune option (option string, dest, default)
    finetune_options = [
        (a.option_strings[0], a.dest, a.default)
        for a in sweep._actions
        if a not in known and a.option_strings and not isinstance(a, _NotASweepOption)
    ]
    sweep.add_argument("--out", default="runs/sweep", help="sweep folder (default runs/sweep)")
    sweep.set_defaults(func=run_sweep_command, _finetune_options=finetune_options)

    curves = subparsers.add_parser(
        "curves",
        help="time to accuracy: eval metric vs steps and wall-clock per method, from run folders",
        description="Plot the eval metric against optimizer steps and training time for each method (mean "
        "over seeds) and report the step at which each method first reaches the reference method's final "
        "score (LoRA+'s '1.6 vs 3 epochs'). RUN_DIR may be a run folder or a folder holding run folders "
        "(e.g. a 'lorakit compare' output). Writes OUT/curves.png and OUT/curves.json.",
        epilog="examples:\n"
        "  lorakit curves runs/glue --reference lora --out runs/glue/curves\n"
        "  lorakit curves runs/rte-lora-s0 runs/rte-loraplus-s0 --time wall_time",
        formatter_class=formatter,
    )
    curves.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders or their parents")
    curves.add_argument("--reference", default="lora", help="method whose final score is the target")
    curves.add_argument("--metric", default=None, help="eval metric (default: each run's main metric)")
    curves.add_argument(
        "--time",
        dest="time_key",
        choices=("train_time", "wall_time"),
        default="train_time",
        help="x-axis of the right panel: training seconds without eval (default) or wall-clock with eval",
    )
    curves.add_argument("--out", default=None, help="output folder (default: the first RUN_DIR/curves)")
    curves.set_defaults(func=run_curves_command)


def sweep_plan(args: argparse.Namespace) -> tuple[list[dict], str, dict, str]:
    """The cells, cell function, context and (absolute) output folder of a parsed ``sweep`` command line.

    Paths are made absolute here, in the driver (see :func:`lorakit.train.sweep.finetune_context`): Ray
    workers run the cells in another working directory.
    """
    from lorakit.train.sweep import expand_grid, finetune_context

    if args.ranks and args.rank is not None:
        raise LorakitError("--rank and --ranks: give one (--ranks makes the rank a grid axis)")
    if args.synthetic:
        given = [option for option, dest, default in args._finetune_options if getattr(args, dest) != default]
        if given:
            raise LorakitError(
                f"--synthetic scores cells with a closed-form function and trains nothing: "
                f"{', '.join(given)} would be ignored"
            )
    axes: dict[str, list] = {"eta_a": args.eta_a, "eta_b": args.eta_b}
    if args.ranks:
        axes["rank"] = args.ranks
    axes["seed"] = args.seeds
    cells = expand_grid(axes)
    out = os.path.abspath(os.path.expanduser(args.out))
    if args.synthetic:
        return cells, "lorakit.train.sweep:synthetic_cell", {}, out
    from lorakit.cli.finetune import _base_config

    if args.rank is None:
        args = argparse.Namespace(**{**vars(args), "rank": 8})
    base = _base_config(args, "lora")
    return cells, "lorakit.train.sweep:finetune_cell", finetune_context(base, out, "lora"), out


def run_sweep_command(args: argparse.Namespace) -> int:
    from lorakit.train.sweep import run_sweep

    backend = "ray" if args.ray_address else "local"
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    if args.workers < 1:
        raise LorakitError(f"--workers: expected a positive integer, got {args.workers}")
    # an engine option of the other backend would be ignored without a word
    ignored = (
        [name for name, used in (("--workers", args.workers != 1), ("--gpus", bool(gpus))) if used]
        if backend == "ray"
        else [
            name
            for name, used in (
                ("--cpus-per-cell", args.cpus_per_cell != 1.0),
                ("--gpus-per-cell", args.gpus_per_cell != 0.0),
            )
            if used
        ]
    )
    if ignored:
        other = "the local process pool" if backend == "ray" else "Ray (--ray-address)"
        raise LorakitError(f"{', '.join(ignored)}: options of {other}, which this sweep does not use")
    cells, fn, context, out = sweep_plan(args)
    result = run_sweep(
        fn,
        cells,
        out,
        context=context,
        backend=backend,
        workers=args.workers,
        gpus=gpus,
        ray_address=args.ray_address,
        cpus_per_cell=args.cpus_per_cell,
        gpus_per_cell=args.gpus_per_cell,
        top_k=args.top_k,
    )
    print(
        f"sweep {args.out}: {len(result.ran)} cells ran, {len(result.skipped)} skipped (already recorded), "
        f"{len(result.failed)} failed"
    )
    main = result.report.get("main_metric", "metric")
    for rank, entry in result.report.get("ranks", {}).items():
        best, top = entry["best"], entry["top_k"]
        if best:
            label = "" if rank == "None" else f"rank {rank}: "  # "None": no --ranks, the config's rank
            print(
                f"{label}best eta_A={best['eta_a']:g} eta_B={best['eta_b']:g} "
                f"{main}={best['mean']:.4f} (n={best['n']}); median eta_B/eta_A of top-{top['k']}: "
                f"{top['median_ratio']:g} (log2 {top['median_log2_ratio']:.2f})"
            )
    print(f"wrote {args.out}/cells.csv, grid.csv, heatmap_*.png, sweep.json")
    return 1 if result.failed else 0


def run_curves_command(args: argparse.Namespace) -> int:
    from lorakit.train.curves import curves_report, format_report

    out = args.out or f"{args.runs[0]}/curves"
    data = curves_report(
        args.runs, reference=args.reference, out=out, metric=args.metric, time_key=args.time_key
    )
    print(format_report(data))
    print(f"wrote {out}/curves.png and {out}/curves.json")
    logger.debug("%s", json.dumps({k: v for k, v in data.items() if k != "tasks"}))
    return 0
