"""The ``lorakit`` command line: one sub-command module per feature, each exposing ``register``.

A command module defines ``register(subparsers)`` which adds its parser(s) and sets
``func=<callable taking the parsed args and returning an exit code>``. Adding a command means writing
such a module and listing it in :data:`COMMAND_MODULES`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

COMMAND_MODULES: tuple[str, ...] = ("finetune", "sweep", "reproduce", "diagnose", "analyze", "advisor")


class LorakitError(Exception):
    """An error caused by user input: printed as one clear line, without a traceback."""


class ExampleFormatter(argparse.HelpFormatter):
    """argparse's formatter, except that an epilog starting with "example" is printed as written: wrapping
    it would break a command (argparse also breaks words at hyphens, e.g. inside a path)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("example"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="LoRA, LoRA+ and asymmetric LoRA: fine-tune, compare, analyse and reproduce the papers.",
        epilog=(
            "example: lorakit compare    # LoRA vs LoRA+ vs asymmetric LoRA on the embedded default data\n"
            "Run 'lorakit COMMAND --help' for each command's options and an example."
        ),
        formatter_class=ExampleFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in dict.fromkeys(COMMAND_MODULES):  # ordered, without duplicates
        importlib.import_module(f"lorakit.cli.{module_name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (LorakitError, ValueError, FileNotFoundError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"lorakit {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
