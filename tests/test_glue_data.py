"""Tests for the GLUE readers and metrics (no network)."""

from __future__ import annotations

import math
import re
import sys
import types
import warnings
from collections import Counter
from pathlib import Path

import pytest

from rosa.experiments.glue_data import (
    GLUE_TASKS,
    compute_glue_metrics,
    get_task_spec,
    load_glue_hub,
    main_score,
    read_glue_split,
)

from helpers import GLUE_DIR, needs_glue


# ---------------------------------------------------------------- real files


@needs_glue
@pytest.mark.parametrize(
    "task, split, rows",
    [
        ("CoLA", "train", 8551),
        ("CoLA", "dev", 1043),
        ("MRPC", "train", 3668),
        ("MRPC", "dev", 408),
        ("RTE", "train", 2490),
        ("RTE", "dev", 277),
        ("STS-B", "train", 5749),
        ("STS-B", "dev", 1500),
    ],
)
def test_real_row_counts(task: str, split: str, rows: int) -> None:
    data = read_glue_split(GLUE_DIR, task, split)
    assert len(data.texts_a) == len(data.labels) == rows
    pair_task = get_task_spec(task).text_b is not None
    assert (data.texts_b is not None) == pair_task
    if data.texts_b is not None:
        assert len(data.texts_b) == rows


@needs_glue
def test_real_rte_label_balance() -> None:
    data = read_glue_split(GLUE_DIR, "rte", "train")
    labels = get_task_spec("rte").labels
    assert Counter(data.labels) == {
        labels.index("entailment"): 1249,
        labels.index("not_entailment"): 1241,
    }


@needs_glue
def test_real_mrpc_has_no_bom_and_keeps_quotes() -> None:
    data = read_glue_split(GLUE_DIR, "mrpc", "train")
    assert not data.texts_a[0].startswith("\ufeff")
    assert data.texts_a[0].startswith("Amrozi accused his brother")
    assert Counter(data.labels) == {1: 2474, 0: 1194}
    dev = read_glue_split(GLUE_DIR, "mrpc", "dev")
    assert dev.texts_b[0].startswith('"The foodservice pie business')


@needs_glue
def test_real_cola_dev_without_final_newline() -> None:
    raw = (GLUE_DIR / "CoLA" / "dev.tsv").read_bytes()
    assert not raw.endswith(b"\n")
    data = read_glue_split(GLUE_DIR, "cola", "dev")
    assert len(data.labels) == 1043
    assert data.texts_a[-1] == raw.decode("utf-8").rsplit("\t", 1)[-1]
    assert Counter(data.labels) == {1: 721, 0: 322}


@needs_glue
def test_real_stsb_scores_are_floats_in_range() -> None:
    data = read_glue_split(GLUE_DIR, "stsb", "dev")
    assert all(isinstance(y, float) and 0.0 <= y <= 5.0 for y in data.labels)
    assert data.labels[0] == 5.0


# ------------------------------------------------------- synthetic TSV files


def _write(tmp_path: Path, task_dir: str, name: str, text: str) -> Path:
    path = tmp_path / task_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


RTE_HEADER = "index\tsentence1\tsentence2\tlabel\n"


def test_crlf_bom_and_missing_final_newline(tmp_path: Path) -> None:
    _write(
        tmp_path,
        "RTE",
        "train.tsv",
        "\ufeff" + RTE_HEADER.replace("\n", "\r\n")
        + '0\t"quoted\tb\tentailment\r\n1\tc\td\tnot_entailment',
    )
    data = read_glue_split(tmp_path, "RTE", "train")
    assert data.texts_a == ['"quoted', "c"]
    assert data.texts_b == ["b", "d"]
    assert data.labels == [0, 1]


def test_too_few_columns(tmp_path: Path) -> None:
    _write(tmp_path, "RTE", "dev.tsv", RTE_HEADER + "0\ta\tb\tentailment\n1\ta\tb\n")
    with pytest.raises(ValueError, match=r"dev\.tsv: line 3: .*columns"):
        read_glue_split(tmp_path, "rte", "dev")


def test_bad_label(tmp_path: Path) -> None:
    _write(tmp_path, "CoLA", "train.tsv", "s\t1\t\tok\ns\t1\t\tok\ns\t2\t\tbad\n")
    with pytest.raises(ValueError, match=r"train\.tsv: line 3: label '2'"):
        read_glue_split(tmp_path, "cola", "train")


def test_bad_float(tmp_path: Path) -> None:
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\t"
    header += "sentence1\tsentence2\tscore\n"
    row = "0\tg\tf\ty\t0\tn\tn\ta\tb\t{}\n"
    _write(tmp_path, "STS-B", "dev.tsv", header + row.format("1.5") + row.format("x"))
    with pytest.raises(ValueError, match=r"STS-B.dev\.tsv: line 3: .*'x'"):
        read_glue_split(tmp_path, "sts-b", "dev")


@pytest.mark.parametrize("task, text", [("RTE", RTE_HEADER), ("RTE", RTE_HEADER + "\n\n"), ("CoLA", ""), ("CoLA", "\n")])
def test_file_without_data_rows_names_the_file(tmp_path: Path, task: str, text: str) -> None:
    path = _write(tmp_path, task, "train.tsv", text)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: no data rows"):
        read_glue_split(tmp_path, task, "train")


def test_rosa_glue_with_a_header_only_file_exits_with_the_message(tmp_path: Path) -> None:
    from rosa.cli import main as cli_main

    path = _write(tmp_path, "RTE", "train.tsv", RTE_HEADER)
    _write(tmp_path, "RTE", "dev.tsv", RTE_HEADER + "0\ta\tb\tentailment\n")
    with pytest.raises(SystemExit, match=rf"rosa glue: {re.escape(str(path))}: no data rows \(only a header line\)"):
        cli_main(["glue", "--task", "RTE", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")])


def test_missing_file_names_path_and_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"MNLI.dev_matched\.tsv.*glue_data"):
        read_glue_split(tmp_path, "mnli", "dev")


# ----------------------------------------------------------------- task specs


@pytest.mark.parametrize("name", ["cola", "CoLA", "sts-b", "stsb", "STS_B", "sst2"])
def test_task_names_case_insensitive(name: str) -> None:
    assert get_task_spec(name).name in GLUE_TASKS


def test_unknown_task_lists_known_tasks() -> None:
    with pytest.raises(ValueError) as info:
        get_task_spec("wnli")
    for known in ("CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE"):
        assert known in str(info.value)


def test_spec_shapes() -> None:
    assert get_task_spec("stsb").num_labels == 1
    assert get_task_spec("mnli").num_labels == 3
    assert get_task_spec("mnli").dev_file == "dev_matched.tsv"
    assert get_task_spec("cola").metrics == ("matthews",)
    assert get_task_spec("qqp").metrics == ("accuracy", "f1")
    for spec in GLUE_TASKS.values():
        assert spec.is_regression or len(spec.labels) == spec.num_labels


# -------------------------------------------------------------------- metrics

LABELS = [1, 1, 1, 0, 0, 0, 1, 0]
PREDS = [1, 0, 1, 0, 1, 0, 1, 1]


def _confusion() -> tuple[int, int, int, int]:
    pairs = list(zip(PREDS, LABELS))
    tp = sum(p == 1 and y == 1 for p, y in pairs)
    tn = sum(p == 0 and y == 0 for p, y in pairs)
    fp = sum(p == 1 and y == 0 for p, y in pairs)
    fn = sum(p == 0 and y == 1 for p, y in pairs)
    return tp, tn, fp, fn


def test_matthews_by_hand() -> None:
    tp, tn, fp, fn = _confusion()
    assert (tp, tn, fp, fn) == (3, 2, 2, 1)
    expected = (tp * tn - fp * fn) / math.sqrt(
        (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    )
    metrics = compute_glue_metrics("cola", PREDS, LABELS)
    assert metrics.keys() == {"matthews"}
    assert type(metrics["matthews"]) is float
    assert metrics["matthews"] == pytest.approx(expected, abs=1e-9)
    assert main_score("cola", metrics) == metrics["matthews"]


def test_accuracy_and_f1_by_hand() -> None:
    tp, tn, fp, fn = _confusion()
    accuracy = (tp + tn) / len(LABELS)
    f1 = 2 * tp / (2 * tp + fp + fn)
    metrics = compute_glue_metrics("MRPC", PREDS, LABELS)
    assert metrics == pytest.approx({"accuracy": accuracy, "f1": f1}, abs=1e-9)
    assert all(type(v) is float for v in metrics.values())
    assert main_score("mrpc", metrics) == pytest.approx((accuracy + f1) / 2, abs=1e-9)


def test_mnli_accuracy() -> None:
    metrics = compute_glue_metrics("mnli", [0, 1, 2, 2], [0, 1, 1, 2])
    assert metrics == {"accuracy": 0.75}
    assert main_score("mnli", metrics) == 0.75


def test_pearson_and_spearman_by_hand() -> None:
    preds = [0.5, 2.0, 1.0, 4.5, 3.0]
    gold = [1.0, 1.5, 2.5, 5.0, 3.5]
    n = len(preds)
    mp, mg = sum(preds) / n, sum(gold) / n
    cov = sum((p - mp) * (g - mg) for p, g in zip(preds, gold))
    pearson = cov / math.sqrt(
        sum((p - mp) ** 2 for p in preds) * sum((g - mg) ** 2 for g in gold)
    )

    def ranks(values: list[float]) -> list[int]:
        return [sorted(values).index(v) + 1 for v in values]

    d2 = sum((a - b) ** 2 for a, b in zip(ranks(preds), ranks(gold)))
    spearman = 1 - 6 * d2 / (n * (n * n - 1))

    metrics = compute_glue_metrics("sts-b", preds, gold)
    assert metrics == pytest.approx({"pearson": pearson, "spearman": spearman}, abs=1e-9)
    assert main_score("stsb", metrics) == metrics["pearson"]


def test_constant_predictions_give_zero_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stsb = compute_glue_metrics("stsb", [2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
        cola = compute_glue_metrics("cola", [1, 1, 1], [1, 0, 1])
        mrpc = compute_glue_metrics("mrpc", [0, 0], [0, 0])
    assert stsb == {"pearson": 0.0, "spearman": 0.0}
    assert cola == {"matthews": 0.0}
    assert mrpc == {"accuracy": 1.0, "f1": 0.0}


def test_metric_input_errors() -> None:
    with pytest.raises(ValueError, match="2 predictions but 3 labels"):
        compute_glue_metrics("rte", [0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="needs metrics"):
        main_score("qqp", {"accuracy": 0.9})


# ------------------------------------------------------------ hub (offline)


def test_hub_without_datasets_is_runtime_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(RuntimeError, match="datasets"):
        load_glue_hub("rte", "train")


def _fake_datasets(monkeypatch: pytest.MonkeyPatch, load_dataset) -> None:
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_hub_load_failure_is_runtime_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    _fake_datasets(monkeypatch, offline)
    with pytest.raises(RuntimeError, match="no network"):
        load_glue_hub("cola", "dev")


def test_hub_rows_map_to_glue_split(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake(path, name, split):
        calls.append((path, name, split))
        return {"premise": ["p"], "hypothesis": ["h"], "label": [2], "idx": [0]}

    _fake_datasets(monkeypatch, fake)
    data = load_glue_hub("MNLI", "dev")
    assert calls == [("nyu-mll/glue", "mnli", "validation_matched")]
    assert (data.texts_a, data.texts_b, data.labels) == (["p"], ["h"], [2])
