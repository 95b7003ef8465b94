"""Paper reproductions dispatched by ``lorakit reproduce NAME`` (one module per experiment)."""

from __future__ import annotations

import argparse


def add_size_arguments(parser: argparse.ArgumentParser, name: str, quick_help: str, full_help: str) -> None:
    """The options every reproduction shares: ``--quick`` (default) / ``--full`` and ``--out runs/NAME``."""
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="full", action="store_false", help=f"{quick_help} (default)")
    size.add_argument("--full", dest="full", action="store_true", help=full_help)
    parser.set_defaults(full=False)
    parser.add_argument("--out", default=f"runs/{name}", help=f"output folder (default: runs/{name})")
