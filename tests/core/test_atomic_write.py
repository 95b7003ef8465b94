"""``atomic_write``: the file gets the permissions a plain ``open`` would give it, not mkstemp's 0600."""

from __future__ import annotations

import os
import stat

import pytest

from lorakit import utils
from lorakit.utils import atomic_write, atomic_write_json


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_new_file_gets_umask_permissions_and_existing_file_keeps_its_own(tmp_path) -> None:
    path = tmp_path / "summary.json"
    atomic_write_json(path, {"a": 1})
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~utils._UMASK
    os.chmod(path, 0o640)
    with atomic_write(path) as handle:
        handle.write("{}\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert path.read_text() == "{}\n"
