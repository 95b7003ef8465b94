"""Data loaders: GLUE folders (columns, labels, metrics), generic files, the tweets default, and errors."""

from __future__ import annotations

import json

import pytest

from lorakit.train.data import (
    DataError,
    glue_spec,
    infer_task_type,
    load_eval_split,
    load_files,
    load_task,
    load_tweets,
    parse_label_map,
)
from lorakit.train.metrics import compute_metrics


def test_glue_names_are_recognised():
    assert glue_spec("SST-2").name == "SST-2"
    assert glue_spec("/data/glue/sst2").name == "SST-2"
    assert glue_spec("STS-B").label_names is None
    assert glue_spec("my-data") is None


def test_sst2_columns_labels_and_metric(glue_root):
    task = load_task(glue_root / "SST-2")
    assert (task.name, task.task_type, task.label_names, task.metrics) == (
        "SST-2", "classification", ["0", "1"], ["accuracy"],
    )  # fmt: skip
    assert len(task.train) == 67349 and len(task.eval) == 872
    assert task.train.texts[0] == ("hide new secretions from the parental units ",)
    assert task.train.labels[:2] == [0, 0]
    assert task.eval.texts[0][0].startswith("it 's a charming and often affecting journey")
    assert task.eval.labels[0] == 1


def test_cola_has_no_header_and_uses_matthews(glue_root):
    task = load_task(glue_root / "CoLA")
    assert task.metrics[0] == "matthews"
    assert len(task.train) == 8551 and len(task.eval) == 1043  # no header: every line is an example
    assert task.train.texts[0] == ("Our friends won't buy this analysis, let alone the next one we propose.",)
    assert task.train.labels[0] == 1
    # Matthews on the dev labels against an always-"1" predictor is 0; against the labels it is 1.
    gold = task.eval.labels
    assert compute_metrics(task.metrics, gold, gold)["matthews"] == pytest.approx(1.0)
    assert compute_metrics(task.metrics, [1] * len(gold), gold)["matthews"] == 0.0


def test_mrpc_pairs_f1_and_rte_named_labels(glue_root):
    mrpc = load_task(glue_root / "MRPC")
    assert mrpc.metrics == ["f1", "accuracy"]
    assert len(mrpc.train.texts[0]) == 2
    assert mrpc.train.texts[0][0].startswith("Amrozi accused his brother")
    assert mrpc.train.labels[:2] == [1, 0]
    positives = sum(mrpc.eval.labels)
    # All-positive predictor: precision = P/N, recall = 1 -> F1 = 2P / (P + N).
    scores = compute_metrics(mrpc.metrics, [1] * len(mrpc.eval), mrpc.eval.labels)
    assert scores["f1"] == pytest.approx(2 * positives / (positives + len(mrpc.eval)))
    assert scores["accuracy"] == pytest.approx(positives / len(mrpc.eval))
    rte = load_task(glue_root / "RTE")
    assert rte.label_names == ["entailment", "not_entailment"]
    assert rte.train.texts[0] == (
        "No Weapons of Mass Destruction Found in Iraq Yet.",
        "Weapons of Mass Destruction Found in Iraq.",
    )
    assert rte.train.labels[0] == 1  # not_entailment
    assert len(rte.eval) == 277


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_glue_layout_with_bad_label_names_the_line(tmp_path):
    folder = tmp_path / "RTE"
    header = "index\tsentence1\tsentence2\tlabel\n"
    _write(folder / "train.tsv", header + "0\ta\tb\tentailment\n1\tc\td\tmaybe\n")
    _write(folder / "dev.tsv", header + "0\ta\tb\tentailment\n")
    with pytest.raises(
        DataError, match=r"train\.tsv:3: label 'maybe' in column 'label' is not in the label set"
    ):
        load_task(folder)


def test_stsb_layout_is_regression(tmp_path):
    folder = tmp_path / "STS-B"
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    rows = "".join(f"{i}\tg\tf\t2012\t{i}\ts\ts\tA man {i}.\tA dog {i}.\t{i * 0.5}\n" for i in range(4))
    _write(folder / "train.tsv", header + rows)
    _write(folder / "dev.tsv", header + rows)
    task = load_task(folder)
    assert task.task_type == "regression" and task.metrics == ["pearson", "spearman"]
    assert task.train.labels == [0.0, 0.5, 1.0, 1.5]
    assert task.train.texts[1] == ("A man 1.", "A dog 1.")


def test_generic_csv_jsonl_inference_and_holdout(tmp_path):
    csv_path = _write(
        tmp_path / "reviews.csv", "review,stars\n" + "".join(f'"good, {i}",{i % 3}\n' for i in range(30))
    )
    task = load_files(csv_path, text_cols=["review"], label_col="stars", eval_fraction=0.2, seed=1)
    assert task.task_type == "classification" and task.label_names == ["0", "1", "2"]
    assert (len(task.train), len(task.eval)) == (24, 6)
    assert set(task.train.texts) | set(task.eval.texts) == {(f"good, {i}",) for i in range(30)}
    jsonl = _write(
        tmp_path / "scores.jsonl",
        "".join(json.dumps({"text": f"t{i}", "label": i / 7}) + "\n" for i in range(9)),
    )
    reg = load_files(jsonl, eval_path=jsonl)
    assert reg.task_type == "regression" and reg.eval.labels[1] == pytest.approx(1 / 7)
    assert load_files(jsonl, eval_path=jsonl, task_type="causal-lm").train.labels[0] is None
    assert infer_task_type(["1", "2", "1"]) == "classification"
    assert infer_task_type(["1.5", "2"]) == "regression"
    assert infer_task_type(["pos", "neg"]) == "classification"


def test_eval_split_label_map_and_skip(tmp_path):
    path = _write(tmp_path / "other.tsv", "text\tsentiment\nnice\tpos\nbad\tneg\nmeh\tneutral\n")
    split, cols, label_col = load_eval_split(
        path, task_type="classification", label_names=["0", "1"],
        label_map=parse_label_map("neg=0,pos=1"), skip_labels=["neutral"],
    )  # fmt: skip
    assert split.texts == [("nice",), ("bad",)] and split.labels == [1, 0]
    assert (cols, label_col) == (["text"], "sentiment")
    with pytest.raises(DataError, match=r"other\.tsv:4: label 'neutral'"):
        load_eval_split(
            path, task_type="classification", label_names=["0", "1"], label_map={"neg": "0", "pos": "1"}
        )
    with pytest.raises(DataError, match="raw=label"):
        parse_label_map("neg:0")


def test_eval_split_encoding(tmp_path):
    """A latin-1 file fails as UTF-8 with a hint to name the encoding, and loads with ``encoding``."""
    path = tmp_path / "tweets.csv"
    path.write_bytes("text,sentiment\ncaf\u00e9 ok,positive\nna\u00efve no,negative\n".encode("latin-1"))
    kwargs = {
        "task_type": "classification",
        "label_names": ["0", "1"],
        "label_map": parse_label_map("negative=0,positive=1"),
    }
    with pytest.raises(
        DataError, match=r"tweets\.csv: cannot decode the file as utf-8-sig.*--encoding latin-1"
    ):
        load_eval_split(path, **kwargs)
    split, _, _ = load_eval_split(path, encoding="latin-1", **kwargs)
    assert split.texts == [("caf\u00e9 ok",), ("na\u00efve no",)] and split.labels == [1, 0]
    with pytest.raises(DataError, match="unknown text encoding 'no-such-codec'"):
        load_eval_split(path, encoding="no-such-codec", **kwargs)


@pytest.mark.parametrize(
    ("name", "content", "kwargs", "message"),
    [
        ("data.csv", "text,label\n", {}, "no data rows"),
        ("data.csv", "", {}, "no data rows"),
        (
            "data.csv",
            "text,target\nhi,1\n",
            {"label_col": "label"},
            "missing label column 'label'.*text, target",
        ),
        ("data.csv", "sentence,label\nhi,1\n", {"text_cols": ["body"]}, "missing text column 'body'"),
        ("data.xml", "<a/>", {}, "unknown data format '.xml'"),
        ("data.jsonl", '{"text": "a", "label": 1}\nnot json\n', {}, r"data\.jsonl:2: invalid JSON"),
        ("data.tsv", "text\tlabel\nonly-one-field\n", {}, r"data\.tsv:2: expected 2 columns"),
        ("data.tsv", "text\tlabel\na\tb\t1\n", {}, r"data\.tsv:2: expected 2 columns.*got 3.*tab"),
        ("data.csv", "text,text,label\na,b,1\n", {}, r"data\.csv:1: .*'text' more than once"),
        (
            "data.jsonl",
            '{"text": "a", "label": 1}\n{"text": "b", "label": 0, "label": 1}\n',
            {},
            r"data\.jsonl:2: key 'label' appears more than once",
        ),
    ],
)
def test_clear_errors(tmp_path, name, content, kwargs, message):
    path = _write(tmp_path / name, content)
    with pytest.raises(DataError, match=message):
        load_files(path, **kwargs)


def test_rows_with_more_fields_than_the_header_name_the_line(tmp_path):
    # An unquoted comma used to be cut off silently: "good, very good,1" became text "good", label
    # " very good" (a new class), and the "1" was dropped.
    path = _write(tmp_path / "extra.csv", "text,label\nhello there,1\nbad day,0\ngood, very good,1\nmeh,0\n")
    with pytest.raises(DataError, match=r"extra\.csv:4: expected 2 columns \(text, label\), got 3.*quote"):
        load_files(path)
    quoted = _write(tmp_path / "quoted.csv", 'text,label\nhello there,1\nbad day,0\n"good, very good",1\n')
    task = load_files(quoted, eval_path=quoted)
    assert task.label_names == ["0", "1"] and task.train.texts[2] == ("good, very good",)
    # A headerless GLUE file (CoLA) with a stray tab on one line: checked against the first line's width.
    cola = tmp_path / "CoLA"
    _write(cola / "train.tsv", "src\t1\t\tA fine sentence.\nsrc\t0\t\tA\tbroken one.\n")
    _write(cola / "dev.tsv", "src\t1\t\tA fine sentence.\n")
    with pytest.raises(DataError, match=r"CoLA/train\.tsv:2: expected 4 columns \(as on line 1.*got 5"):
        load_task(cola)


def test_glue_folder_honours_an_explicit_eval_file(tmp_path):
    folder = tmp_path / "SST-2"
    header = "sentence\tlabel\n"
    _write(folder / "train.tsv", header + "a fine film\t1\na dull film\t0\n")
    _write(folder / "dev.tsv", header + "dev one\t1\ndev two\t0\ndev three\t1\n")
    assert len(load_task(folder).eval) == 3  # the folder's dev.tsv by default
    tiny = _write(tmp_path / "tiny_dev.tsv", header + "only this\t0\n")
    task = load_task(folder, eval_data=tiny)
    assert task.name == "SST-2" and task.metrics == ["accuracy"]
    assert (task.eval.texts, task.eval.labels, task.eval.source) == ([("only this",)], [0], str(tiny))
    assert len(task.train) == 2
    as_csv = _write(tmp_path / "dev.csv", "sentence,label\nfrom a csv,1\n")
    assert load_task(folder, eval_data=as_csv).eval.texts == [("from a csv",)]
    wrong = _write(tmp_path / "wrong.tsv", "text\tlabel\nx\t1\n")
    with pytest.raises(DataError, match=r"wrong\.tsv: missing text column 'sentence'"):
        load_task(folder, eval_data=wrong)


def test_eval_file_replaces_the_tweets_eval_sample(tmp_path):
    try:
        load_tweets(n_train=5, n_eval=5)
    except DataError as error:
        pytest.skip(str(error))
    ood = _write(tmp_path / "ood.csv", "text,sentiment\ngreat,positive\nawful,negative\n")
    task = load_task(None, eval_data=ood, tweets_train=5, tweets_eval=5)
    assert task.eval.texts == [("great",), ("awful",)] and task.eval.labels == [2, 0]


def test_unreadable_and_missing_files(tmp_path):
    binary = tmp_path / "blob.csv"
    binary.write_bytes(b"text,label\n\xff\xfe\x00\x81,1\n")
    with pytest.raises(DataError, match="cannot decode"):
        load_files(binary)
    with pytest.raises(DataError, match="file not found"):
        load_files(tmp_path / "nope.csv")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="unknown task layout"):
        load_task(tmp_path / "folder")


def test_embedded_tweets_sample():
    try:
        task = load_tweets(n_train=50, n_eval=20, seed=0)
    except DataError as error:
        pytest.skip(str(error))
    assert task.label_names == ["negative", "neutral", "positive"]
    assert (len(task.train), len(task.eval)) == (50, 20)
    assert not set(task.train.texts) & set(task.eval.texts) or len(set(task.train.texts)) < 50
    assert set(task.train.labels) <= {0, 1, 2}
    assert load_tweets(n_train=50, n_eval=20, seed=0).train.texts == task.train.texts
