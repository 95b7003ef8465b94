"""``lorakit finetune/compare/evaluate``: bad input gives one clear line and exit code 2, no traceback."""

from __future__ import annotations

import re

import pytest

import lorakit.cli


@pytest.fixture
def cli(monkeypatch):
    monkeypatch.setattr(lorakit.cli, "COMMAND_MODULES", (*lorakit.cli.COMMAND_MODULES, "finetune"))

    def run(*argv: str) -> int:
        try:
            return lorakit.cli.main(list(argv))
        except SystemExit as exit_:  # argparse rejects bad values with SystemExit(2)
            return int(exit_.code)

    return run


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["finetune", "--rank", "0"], r"--rank/-r: expected a positive integer, got '0'"),
        (["finetune", "--lr", "-1"], "--lr: expected a positive number"),
        (["finetune", "--method", "dora"], "invalid choice: 'dora'"),
        (["finetune", "--text-cols", "a,b,c"], "one or two comma-separated column names"),
        (["finetune", "--warmup-ratio", "1.5"], r"expected a number in \[0, 1\)"),
        (["compare", "--seeds", "x"], "invalid int value: 'x'"),
        (["evaluate"], "the following arguments are required: RUN"),
    ],
)
def test_bad_cli_values(cli, capsys, argv, message):
    assert cli(*argv) == 2
    assert re.search(message, capsys.readouterr().err)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        ("text,label\n", [], "no data rows"),
        ("text,target\nhi,1\n", ["--label-col", "label"], "missing label column 'label'"),
        ("text,label\n\xff", [], None),
    ],
)
def test_data_errors_are_one_line(cli, capsys, tmp_path, content, extra, message):
    path = tmp_path / "data.csv"
    if message is None:
        path.write_bytes(b"text,label\n\xff\xfe\x81,1\n")
        message = "cannot decode"
    else:
        _write(path, content)
    assert cli("finetune", "--data", str(path), "--out", str(tmp_path / "run"), *extra) == 2
    err = capsys.readouterr().err
    assert "lorakit finetune: error:" in err and message in err and "Traceback" not in err


def test_unknown_layout_bad_label_and_missing_run(cli, capsys, tmp_path):
    folder = tmp_path / "mydata"
    folder.mkdir()
    assert cli("finetune", "--data", str(folder)) == 2
    assert "unknown task layout" in capsys.readouterr().err
    rte = tmp_path / "RTE"
    rte.mkdir()
    header = "index\tsentence1\tsentence2\tlabel\n"
    _write(rte / "train.tsv", header + "0\ta\tb\tentailment\n1\tc\td\tyes\n")
    _write(rte / "dev.tsv", header + "0\ta\tb\tentailment\n")
    assert cli("finetune", "--data", str(rte)) == 2
    assert "train.tsv:3: label 'yes' in column 'label' is not in the label set" in capsys.readouterr().err
    assert cli("evaluate", str(tmp_path / "no-run"), "--data", str(rte)) == 2
    assert "a lorakit run folder?" in capsys.readouterr().err
    assert cli("compare", "--methods", "lora:rank=x", "--data", str(rte)) == 2
    assert "bad value for 'rank'" in capsys.readouterr().err


def test_help_shows_the_preset_defaults(cli, capsys):
    """--help states each preset's learning rate and the default tweets sizes as the code defines them."""
    from lorakit.train.methods import PRESETS
    from lorakit.train.run import FinetuneConfig

    for command in ("finetune", "compare"):
        assert cli(command, "--help") == 0
        text = " ".join(capsys.readouterr().out.split())
        for name, preset in PRESETS.items():
            mantissa, exponent = f"{preset.lr:e}".split("e")
            assert f"{name} {float(mantissa):g}e{int(exponent)}" in text, (command, name)
    assert f"{FinetuneConfig.tweets_train:,} train / {FinetuneConfig.tweets_eval:,} eval" in text
