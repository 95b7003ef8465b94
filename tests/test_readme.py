"""The README's set-up commands and Python examples run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


def test_readme_opens_with_two_setup_commands():
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    assert len(blocks) >= 2
    main_job, tests = (b.strip() for b in blocks[:2])
    assert "pip install torch==2.13.0" in main_job and "pip install torch==2.13.0" in tests
    assert tests.endswith("python -m pytest -q")
    assert README.index("<!-- test-command -->") < README.index(blocks[1])


def test_readme_python_examples_run(tmp_path):
    for block in re.findall(r"```python\n(.*?)```", README, flags=re.S):
        result = subprocess.run(
            [sys.executable, "-c", block],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        assert result.returncode == 0, f"README example failed:\n{block}\n{result.stderr[-3000:]}"
