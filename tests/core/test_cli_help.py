"""Every ``lorakit`` command's ``--help`` ends with an example, printed whole (never wrapped mid-command)."""

from __future__ import annotations

import argparse

import pytest

from lorakit.cli import build_parser


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) for the parser and every sub-command below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


@pytest.mark.parametrize("columns", ["60", "80"])
def test_every_command_shows_its_example_unwrapped(monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", columns)  # argparse wraps to the terminal width
    seen = 0
    for path, parser in _parsers(build_parser()):
        text = parser.format_help()
        assert parser.epilog and "example" in parser.epilog, f"lorakit {' '.join(path)}: no example"
        example_lines = [line for line in parser.epilog.splitlines() if line.strip()]
        for line in example_lines:
            assert line in text, f"lorakit {' '.join(path)} --help wraps its example line {line!r}"
        assert "%%" not in text, f"lorakit {' '.join(path)} --help prints a doubled %"
        seen += 1
    assert seen > 15  # the top level, its commands and their sub-commands
