"""GLUE task definitions, TSV readers and metrics.

Local files are expected in the standard ``glue_data/`` layout written by
``download_glue_data.py``: ``<data_dir>/<TaskDir>/{train,dev}.tsv`` (MNLI uses
``dev_matched.tsv``). Test splits are not supported because their labels are
not public.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

Column = int | str
"""A 0-based column index, or a header name for files that have a header."""

SPLITS = ("train", "dev")


@dataclass(frozen=True)
class TaskSpec:
    """How one GLUE task is stored on disk and how it is scored.

    ``labels`` lists the label strings in class-id order (empty for the STS-B
    regression task). The order matches the ``nyu-mll/glue`` hub dataset, so
    hub label ids equal local label ids.

    ``main_metrics`` are averaged into the task's summary score: a single
    metric for most tasks, and the mean of accuracy and F1 for MRPC and QQP,
    as on the GLUE leaderboard.
    """

    name: str
    dir_name: str
    dev_file: str
    has_header: bool
    text_a: Column
    text_b: Column | None
    label: Column
    labels: tuple[str, ...]
    num_labels: int
    metrics: tuple[str, ...]
    main_metrics: tuple[str, ...]
    hub_name: str
    hub_text_a: str
    hub_text_b: str | None

    @property
    def is_regression(self) -> bool:
        """True for tasks scored on a real-valued label (STS-B)."""
        return self.num_labels == 1


_BINARY = ("0", "1")

GLUE_TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="CoLA", dir_name="CoLA", dev_file="dev.tsv", has_header=False,
            text_a=3, text_b=None, label=1, labels=_BINARY, num_labels=2,
            metrics=("matthews",), main_metrics=("matthews",),
            hub_name="cola", hub_text_a="sentence", hub_text_b=None,
        ),
        TaskSpec(
            name="SST-2", dir_name="SST-2", dev_file="dev.tsv", has_header=True,
            text_a="sentence", text_b=None, label="label", labels=_BINARY,
            num_labels=2, metrics=("accuracy",), main_metrics=("accuracy",),
            hub_name="sst2", hub_text_a="sentence", hub_text_b=None,
        ),
        TaskSpec(
            name="MRPC", dir_name="MRPC", dev_file="dev.tsv", has_header=True,
            text_a="#1 String", text_b="#2 String", label="Quality",
            labels=_BINARY, num_labels=2, metrics=("accuracy", "f1"),
            main_metrics=("accuracy", "f1"),
            hub_name="mrpc", hub_text_a="sentence1", hub_text_b="sentence2",
        ),
        TaskSpec(
            name="STS-B", dir_name="STS-B", dev_file="dev.tsv", has_header=True,
            text_a="sentence1", text_b="sentence2", label="score", labels=(),
            num_labels=1, metrics=("pearson", "spearman"),
            main_metrics=("pearson",),
            hub_name="stsb", hub_text_a="sentence1", hub_text_b="sentence2",
        ),
        TaskSpec(
            name="QQP", dir_name="QQP", dev_file="dev.tsv", has_header=True,
            text_a="question1", text_b="question2", label="is_duplicate",
            labels=_BINARY, num_labels=2, metrics=("accuracy", "f1"),
            main_metrics=("accuracy", "f1"),
            hub_name="qqp", hub_text_a="question1", hub_text_b="question2",
        ),
        TaskSpec(
            name="MNLI", dir_name="MNLI", dev_file="dev_matched.tsv",
            has_header=True, text_a="sentence1", text_b="sentence2",
            label="gold_label",
            labels=("entailment", "neutral", "contradiction"), num_labels=3,
            metrics=("accuracy",), main_metrics=("accuracy",),
            hub_name="mnli", hub_text_a="premise", hub_text_b="hypothesis",
        ),
        TaskSpec(
            name="QNLI", dir_name="QNLI", dev_file="dev.tsv", has_header=True,
            text_a="question", text_b="sentence", label="label",
            labels=("entailment", "not_entailment"), num_labels=2,
            metrics=("accuracy",), main_metrics=("accuracy",),
            hub_name="qnli", hub_text_a="question", hub_text_b="sentence",
        ),
        TaskSpec(
            name="RTE", dir_name="RTE", dev_file="dev.tsv", has_header=True,
            text_a="sentence1", text_b="sentence2", label="label",
            labels=("entailment", "not_entailment"), num_labels=2,
            metrics=("accuracy",), main_metrics=("accuracy",),
            hub_name="rte", hub_text_a="sentence1", hub_text_b="sentence2",
        ),
    )
}


def _normalize(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


_BY_KEY = {_normalize(name): spec for name, spec in GLUE_TASKS.items()}


def get_task_spec(task: str) -> TaskSpec:
    """Return the spec of a GLUE task, matching names case-insensitively and
    ignoring ``-``/``_`` (``cola``, ``STS-B`` and ``stsb`` all work)."""
    spec = _BY_KEY.get(_normalize(task))
    if spec is None:
        known = ", ".join(GLUE_TASKS)
        raise ValueError(f"unknown GLUE task {task!r}; known tasks: {known}")
    return spec


@dataclass
class GlueSplit:
    """One split of a GLUE task: texts and labels (class ids, or STS-B scores)."""

    texts_a: list[str]
    texts_b: list[str] | None
    labels: list[int] | list[float]

    def __len__(self) -> int:
        return len(self.labels)


def split_path(data_dir: str | Path, task: str, split: str) -> Path:
    """Path of a task's ``train`` or ``dev`` TSV inside ``data_dir``."""
    spec = get_task_spec(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    file_name = spec.dev_file if split == "dev" else "train.tsv"
    return Path(data_dir) / spec.dir_name / file_name


def read_glue_split(data_dir: str | Path, task: str, split: str) -> GlueSplit:
    """Read a ``train`` or ``dev`` split of a GLUE task from local TSV files.

    Fields are split on tabs with no quote processing. Blank lines are
    ignored. A malformed row raises ValueError naming the file and the 1-based
    line number; so does a file without data rows.
    """
    spec = get_task_spec(task)
    path = split_path(data_dir, task, split)
    if not path.is_file():
        raise FileNotFoundError(
            f"GLUE file not found: {path}. Expected the glue_data/ layout "
            f"written by download_glue_data.py: <data_dir>/{spec.dir_name}/"
            f"{{train.tsv,{spec.dev_file}}}"
        )
    rows = _read_tsv(path)
    if spec.has_header:
        if not rows:
            raise ValueError(f"{path}: file is empty, expected a header line")
        (_, header), rows = rows[0], rows[1:]
        columns = _resolve_columns(spec, header, path)
    else:
        columns = (spec.text_a, spec.text_b, spec.label)
    if not rows:
        what = "only a header line" if spec.has_header else "only blank lines"
        raise ValueError(f"{path}: no data rows ({what}); {spec.name} {split} needs at least one example")
    return _parse_rows(spec, rows, columns, path)


def _read_tsv(path: Path) -> list[tuple[int, list[str]]]:
    """Non-blank lines of a TSV as (1-based line number, fields)."""
    rows = []
    with open(path, encoding="utf-8-sig", newline="\n") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.removesuffix("\n").removesuffix("\r")
            if line:
                rows.append((number, line.split("\t")))
    return rows


def _resolve_columns(
    spec: TaskSpec, header: list[str], path: Path
) -> tuple[int, int | None, int]:
    """Column indices of text_a, text_b and label given a header row."""

    def index(column: Column) -> int:
        if isinstance(column, int):
            return column
        if column not in header:
            raise ValueError(
                f"{path}: line 1: header has no column {column!r} "
                f"(found {header})"
            )
        return header.index(column)

    text_b = None if spec.text_b is None else index(spec.text_b)
    return index(spec.text_a), text_b, index(spec.label)


def _parse_rows(
    spec: TaskSpec,
    rows: list[tuple[int, list[str]]],
    columns: tuple[int, int | None, int],
    path: Path,
) -> GlueSplit:
    text_a, text_b, label = columns
    needed = max(c for c in columns if c is not None) + 1
    texts_a: list[str] = []
    texts_b: list[str] | None = None if text_b is None else []
    labels: list = []
    for number, fields in rows:
        if len(fields) < needed:
            raise ValueError(
                f"{path}: line {number}: expected at least {needed} "
                f"tab-separated columns, found {len(fields)}"
            )
        texts_a.append(fields[text_a])
        if texts_b is not None:
            texts_b.append(fields[text_b])
        labels.append(_parse_label(spec, fields[label], path, number))
    return GlueSplit(texts_a=texts_a, texts_b=texts_b, labels=labels)


def _parse_label(spec: TaskSpec, raw: str, path: Path, number: int) -> int | float:
    value = raw.strip()
    if spec.is_regression:
        try:
            score = float(value)
        except ValueError:
            score = math.nan
        if not math.isfinite(score):
            raise ValueError(
                f"{path}: line {number}: {spec.name} score {raw!r} is not a "
                "finite number"
            )
        return score
    if value not in spec.labels:
        raise ValueError(
            f"{path}: line {number}: label {raw!r} is not one of {spec.labels}"
        )
    return spec.labels.index(value)


def compute_glue_metrics(
    task: str,
    predictions: Sequence[int] | Sequence[float],
    labels: Sequence[int] | Sequence[float],
) -> dict[str, float]:
    """Compute the task's GLUE metrics as plain floats (not percentages).

    Predictions are class ids, or real-valued scores for STS-B. F1 is binary
    F1 of class 1. Correlations that are undefined (fewer than two examples,
    or constant predictions or labels) are reported as 0.0, and so is
    Matthews correlation for constant predictions.
    """
    spec = get_task_spec(task)
    if len(predictions) != len(labels):
        raise ValueError(
            f"{len(predictions)} predictions but {len(labels)} labels"
        )
    if len(labels) == 0:
        raise ValueError("cannot compute metrics on zero examples")
    if spec.is_regression:
        return _correlations([float(p) for p in predictions],
                             [float(y) for y in labels])
    return _classification_metrics(spec, [int(p) for p in predictions],
                                   [int(y) for y in labels])


def _classification_metrics(
    spec: TaskSpec, predictions: list[int], labels: list[int]
) -> dict[str, float]:
    scorers = {
        "accuracy": lambda: accuracy_score(labels, predictions),
        "f1": lambda: f1_score(labels, predictions, zero_division=0.0),
        "matthews": lambda: matthews_corrcoef(labels, predictions),
    }
    return {name: float(scorers[name]()) for name in spec.metrics}


def _correlations(predictions: list[float], labels: list[float]) -> dict[str, float]:
    if len(labels) < 2 or len(set(predictions)) < 2 or len(set(labels)) < 2:
        return {"pearson": 0.0, "spearman": 0.0}
    return {
        "pearson": float(pearsonr(predictions, labels)[0]),
        "spearman": float(spearmanr(predictions, labels)[0]),
    }


def main_score(task: str, metrics: Mapping[str, float]) -> float:
    """The task's single summary score from its metrics: Matthews for CoLA,
    Pearson for STS-B, the mean of accuracy and F1 for MRPC and QQP (as on
    the GLUE leaderboard), accuracy otherwise."""
    spec = get_task_spec(task)
    missing = [name for name in spec.main_metrics if name not in metrics]
    if missing:
        raise ValueError(f"{spec.name} main score needs metrics {missing}")
    return sum(float(metrics[name]) for name in spec.main_metrics) / len(
        spec.main_metrics
    )


def load_glue_hub(task: str, split: str) -> GlueSplit:
    """Load a ``train`` or ``dev`` split from the ``nyu-mll/glue`` hub dataset.

    Needs the optional ``datasets`` package and usually network access; only
    call it on explicit request. Note that the hub's MRPC text is the
    tokenized SentEval version, not the untokenized text of the local files.
    Failures to import or load are raised as RuntimeError.
    """
    spec = get_task_spec(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    hub_split = _hub_split_name(spec, split)
    try:
        from datasets import load_dataset
    except ImportError as error:
        raise RuntimeError(
            "load_glue_hub needs the optional 'datasets' package "
            "(pip install datasets); or read local files with read_glue_split"
        ) from error
    try:
        dataset = load_dataset("nyu-mll/glue", spec.hub_name, split=hub_split)
    except Exception as error:
        raise RuntimeError(
            f"could not load nyu-mll/glue {spec.hub_name!r} split "
            f"{hub_split!r} (is the network or hub cache available?): {error}"
        ) from error
    return _split_from_hub(spec, dataset)


def _hub_split_name(spec: TaskSpec, split: str) -> str:
    if split == "train":
        return "train"
    return "validation_matched" if spec.name == "MNLI" else "validation"


def _split_from_hub(spec: TaskSpec, dataset) -> GlueSplit:
    raw_labels = list(dataset["label"])
    if spec.is_regression:
        labels: list = [float(y) for y in raw_labels]
    else:
        labels = [int(y) for y in raw_labels]
        if any(not 0 <= y < spec.num_labels for y in labels):
            raise ValueError(
                f"{spec.name} hub split has labels outside "
                f"0..{spec.num_labels - 1} (test splits are unlabeled)"
            )
    texts_b = None if spec.hub_text_b is None else list(dataset[spec.hub_text_b])
    return GlueSplit(texts_a=list(dataset[spec.hub_text_a]), texts_b=texts_b,
                     labels=labels)
