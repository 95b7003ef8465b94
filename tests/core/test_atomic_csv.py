"""``lorakit.utils.atomic_write_csv``: CSV tables written whole or not at all."""

from __future__ import annotations

import csv

import pytest

from lorakit.utils import atomic_write_csv


def test_writes_header_rows_and_empty_cells_for_none(tmp_path):
    path = tmp_path / "cells.csv"
    atomic_write_csv(path, ["id", "note", "value"], [["a", 'has "quotes", comma', 1.5], ["b", None, None]])
    with open(path, newline="", encoding="utf-8") as handle:
        assert list(csv.reader(handle)) == [
            ["id", "note", "value"],
            ["a", 'has "quotes", comma', "1.5"],
            ["b", "", ""],
        ]
    assert b"\r" not in path.read_bytes()


def test_a_failure_mid_table_keeps_the_previous_file(tmp_path):
    path = tmp_path / "summary.csv"
    path.write_text("old\n", encoding="utf-8")

    def rows():
        yield ["x"]
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError, match="crash while writing"):
        atomic_write_csv(path, ["col"], rows())
    assert path.read_text(encoding="utf-8") == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.csv"]
