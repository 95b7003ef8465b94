"""``lorakit reproduce NAME``: one command per paper claim, each implemented in ``lorakit.experiments``.

An experiment module exposes ``add_arguments(parser)`` (its own options) and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib

from lorakit.cli import ExampleFormatter

EXPERIMENTS: dict[str, tuple[str, str]] = {
    "expressive": (
        "lorakit.experiments.expressive",
        "Zeng & Lee (ICLR 2024): MSE vs LoRA rank for linear, FNN and transformer targets; LoRA vs "
        "tuning final layers.",
    ),
    "loraplus": (
        "lorakit.experiments.loraplus_toy",
        "Hayou et al. (ICML 2024): the (eta_A, eta_B) toy grid of Fig. 2 and the width-scaling study.",
    ),
    "asymmetry": (
        "lorakit.experiments.asymmetry",
        "Zhu et al. (ICML 2024): frozen-A vs frozen-B in linear regression, closed forms and Monte Carlo.",
    ),
    "asymmetry-similarity": (
        "lorakit.experiments.asymmetry_similarity",
        "Zhu et al. Fig. 1: similarity of learned A and B across tasks and seeds on real data.",
    ),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "reproduce",
        help="reproduce a paper's small-scale claims (figures + JSON)",
        description="Regenerate a paper's figures and numbers into an output folder.",
        epilog="example: lorakit reproduce expressive --quick --out runs/expressive",
        formatter_class=ExampleFormatter,
    )
    experiments = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    for name, (module_name, summary) in EXPERIMENTS.items():
        sub = experiments.add_parser(
            name,
            help=summary,
            description=summary,
            epilog=f"example: lorakit reproduce {name} --out runs/{name}",
            formatter_class=ExampleFormatter,
        )
        sub.set_defaults(func=_runner(module_name, sub))


def _runner(module_name: str, parser: argparse.ArgumentParser):
    module = importlib.import_module(module_name)
    module.add_arguments(parser)
    return module.run
