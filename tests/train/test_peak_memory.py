"""``peak_memory`` after ``reset_peak_memory``: each run of a compare or sweep reports its own peak."""

from __future__ import annotations

import numpy as np
import pytest

from lorakit.train.trainer import peak_memory, reset_peak_memory


def test_a_reset_starts_a_new_cpu_peak() -> None:
    reset_peak_memory()
    before, kind = peak_memory()
    if kind != "cpu_peak_rss":
        pytest.skip(f"the peak cannot be reset here ({kind}: not Linux, or /proc/self/clear_refs refused)")
    block = np.ones(160 * 2**20 // 8)  # 160 MiB, touched
    raised, _ = peak_memory()
    del block
    reset_peak_memory()
    after, _ = peak_memory()
    assert raised > before + 120
    assert after < raised - 120  # an earlier run's peak does not carry over


def test_a_peak_that_could_not_be_reset_is_labelled_the_process_peak(tmp_path, monkeypatch) -> None:
    from lorakit.train import trainer

    monkeypatch.setattr(trainer, "_PROC_CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    reset_peak_memory()
    assert peak_memory()[1] in ("cpu_process_peak_rss", "cuda_max_allocated")
