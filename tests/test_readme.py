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


def test_readme_cli_examples_parse():
    import shlex

    from lorakit.cli import build_parser

    block = README.split("## Command line", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line.split("  #")[0].strip() for line in block.replace("\\\n", " ").splitlines()]
    commands = [line for line in lines if line.startswith(("lorakit ", "accelerate launch -m lorakit "))]
    assert len(commands) >= 10
    parser = build_parser()
    for command in commands:
        words = shlex.split(command)
        words = words[words.index("lorakit") + 1 :]
        if len(words) > 1 and "|" in words[1]:  # "reproduce a|b|c": each choice
            for name in words[1].split("|"):
                parser.parse_args([words[0], name, *words[2:]])
        else:
            parser.parse_args(words)
