"""Tests for E2E CSV reading, MR grouping, splitting and prompt formatting."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rosa.experiments.e2e_data import (
    E2EExample,
    MRGroup,
    format_prompt,
    group_by_mr,
    parse_mr,
    read_e2e_csv,
    split_by_mr,
)

from helpers import SHARED_DATA
DEV_CSV = SHARED_DATA / "e2e" / "dev.csv"
needs_dev = pytest.mark.skipif(
    not DEV_CSV.is_file(), reason=f"E2E dev set not found at {DEV_CSV} (set ROSA_SHARED_DATA)"
)


def write_csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "data.csv"
    path.write_bytes(text.replace("\n", "\r\n").encode("utf-8"))
    return path


def test_read_quoted_rows_with_crlf(tmp_path):
    path = write_csv(
        tmp_path,
        'mr,ref\n"name[A], food[Thai]","A serves Thai, cheaply."\n"name[A], food[Thai]",A is Thai.\n',
    )
    assert read_e2e_csv(path) == [
        E2EExample("name[A], food[Thai]", "A serves Thai, cheaply."),
        E2EExample("name[A], food[Thai]", "A is Thai."),
    ]


@pytest.mark.parametrize(
    "row, line",
    [
        ('"name[A]",ok\n"name[B]"\n', 3),  # one field
        ('"name[A]",ok\n"name[B]",x,y\n', 3),  # three fields
        ('"name[A]",\n', 2),  # empty ref
        (',"A is Thai."\n', 2),  # empty mr
        ('"name[A]",ok\n"name[B]","multi\nline"\n"name[C]",\n', 5),  # quoted newline before
    ],
)
def test_malformed_row_names_file_and_line(tmp_path, row, line):
    path = write_csv(tmp_path, "mr,ref\n" + row)
    with pytest.raises(ValueError, match=rf"{path.name}:{line}:"):
        read_e2e_csv(path)


@pytest.mark.parametrize("header", ["meaning,ref\n", "", "ref,mr\n"])
def test_missing_header(tmp_path, header):
    path = write_csv(tmp_path, header + '"name[A]",ok\n')
    with pytest.raises(ValueError, match="header 'mr,ref'"):
        read_e2e_csv(path)


def test_header_only_file_names_the_file(tmp_path):
    path = write_csv(tmp_path, "mr,ref\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: no data rows"):
        read_e2e_csv(path)


def test_rosa_e2e_with_a_header_only_file_exits_with_the_message(tmp_path):
    from rosa.cli import main as cli_main

    train = write_csv(tmp_path, "mr,ref\n")
    evaluation = tmp_path / "eval.csv"
    evaluation.write_text('mr,ref\n"name[A]",A.\n')
    with pytest.raises(SystemExit, match=rf"rosa e2e: {re.escape(str(train))}: no data rows"):
        cli_main(["e2e", "--train-file", str(train), "--eval-file", str(evaluation), "--out", str(tmp_path / "out")])


def test_group_by_mr_keeps_first_appearance_order():
    examples = [E2EExample("b", "1"), E2EExample("a", "2"), E2EExample("b", "3")]
    assert group_by_mr(examples) == [MRGroup("b", ["1", "3"]), MRGroup("a", ["2"])]


@settings(max_examples=50, deadline=None)
@given(
    n_groups=st.integers(0, 60),
    eval_fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_split_never_leaks_an_mr(n_groups, eval_fraction, seed):
    groups = [MRGroup(f"name[R{i}]", [f"ref {i}"]) for i in range(n_groups)]
    train, evaluation = split_by_mr(groups, eval_fraction, seed)
    train_mrs, eval_mrs = {g.mr for g in train}, {g.mr for g in evaluation}
    assert not train_mrs & eval_mrs
    assert train_mrs | eval_mrs == {g.mr for g in groups}
    assert len(evaluation) == round(eval_fraction * n_groups)
    assert split_by_mr(groups, eval_fraction, seed) == (train, evaluation)


def test_split_rejects_bad_input():
    with pytest.raises(ValueError, match="eval_fraction"):
        split_by_mr([], eval_fraction=1.5)
    with pytest.raises(ValueError, match="distinct"):
        split_by_mr([MRGroup("a", ["x"]), MRGroup("a", ["y"])])


def test_split_depends_on_seed():
    groups = [MRGroup(str(i), ["r"]) for i in range(100)]
    assert split_by_mr(groups, seed=0)[1] != split_by_mr(groups, seed=1)[1]


def test_format_prompt_example():
    mr = "name[The Vaults], eatType[pub], priceRange[more than £30]"
    assert format_prompt(mr) == (
        "Describe the restaurant: name: The Vaults | eatType: pub | priceRange: more than £30"
        "\nDescription:"
    )


def test_parse_mr_allows_commas_in_values():
    assert parse_mr("name[A, B],food[Thai] ") == [("name", "A, B"), ("food", "Thai")]


@pytest.mark.parametrize(
    "mr", ["", "   ", "name", "name[A", "name[A] food[Thai]", "name[A],", "[A]", "name[]", "name[A]x"]
)
def test_parse_mr_rejects_malformed(mr):
    with pytest.raises(ValueError):
        parse_mr(mr)


@needs_dev
def test_real_dev_set_counts_and_prompt():
    examples = read_e2e_csv(DEV_CSV)
    groups = group_by_mr(examples)
    assert len(examples) == 4672
    assert len(groups) == 547
    assert sum(len(g.refs) for g in groups) == 4672
    assert groups[0].mr == "name[Alimentum], area[city centre], familyFriendly[no]"
    assert format_prompt(groups[0].mr) == (
        "Describe the restaurant: name: Alimentum | area: city centre | familyFriendly: no"
        "\nDescription:"
    )
    assert all(format_prompt(g.mr).startswith("Describe the restaurant: name: ") for g in groups)
