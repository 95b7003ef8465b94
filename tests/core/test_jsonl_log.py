"""``lorakit.utils.JsonlLog``: append-only metrics/diagnostics logs that survive crashes and resumes."""

from __future__ import annotations

import json

import pytest

from lorakit.utils import JsonlLog, read_jsonl


def _steps(path) -> list[int]:
    return [record["step"] for _, record in read_jsonl(path)]


def test_first_write_replaces_a_stale_file_then_records_are_appended(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 99}\n', encoding="utf-8")  # left by an earlier run in the same folder
    log = JsonlLog(path)
    log.add({"step": 1})
    assert _steps(path) == [1]
    inode = path.stat().st_ino
    log.add({"step": 2})
    log.add({"step": 3})
    assert _steps(path) == [1, 2, 3]
    assert path.stat().st_ino == inode  # appended in place, not rewritten through a new file


def test_load_keeps_the_records_before_the_resume_point_and_drops_the_rest_on_next_write(tmp_path):
    path = tmp_path / "diagnostics.jsonl"
    first = JsonlLog(path)
    for step in range(5):
        first.add({"step": step})
    resumed = JsonlLog(path)
    resumed.load(lambda record: record["step"] < 3)
    assert [r["step"] for r in resumed.records] == [0, 1, 2]
    assert _steps(path) == [0, 1, 2, 3, 4]  # nothing is lost before the resumed run writes
    resumed.add({"step": 3})
    assert _steps(path) == [0, 1, 2, 3]


def test_a_torn_last_line_is_skipped_but_a_bad_middle_line_is_an_error(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo', encoding="utf-8")
    with caplog.at_level("WARNING"):
        assert _steps(path) == [1, 2]
    assert "line 3: skipping a torn last line" in caplog.text
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: invalid JSON"):
        _steps(path)


def test_resume_after_a_torn_write_rewrites_a_clean_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo', encoding="utf-8")
    log = JsonlLog(path)
    log.load(lambda record: True)
    log.add({"step": 2})
    assert [json.loads(line)["step"] for line in path.read_text(encoding="utf-8").splitlines()] == [1, 2]


def test_memory_only_log_writes_nothing_and_rewrite_says_why(tmp_path):
    log = JsonlLog(None)
    log.add({"step": 1})
    assert log.records == [{"step": 1}]
    with pytest.raises(ValueError, match="no path given"):
        log.rewrite()
