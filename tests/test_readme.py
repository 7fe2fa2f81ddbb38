"""The README's examples run, and its result tables are the ones the commands wrote."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
RESULT_MARKERS = re.findall(r"<!-- results:(\S+) -->", README)


def block_after(marker: str) -> str:
    """The fenced code block (or table) that follows ``marker`` in the README."""
    rest = README.split(marker, 1)[1]
    fenced = re.match(r"\s*```\w*\n(.*?)```", rest, re.S)
    if fenced:
        return fenced.group(1)
    return re.match(r"\s*((?:\|.*\n)+)", rest).group(1)


def test_api_example_runs():
    exec(compile(block_after("<!-- example:api -->"), "README-example", "exec"), {})


def test_trainer_example_runs():
    exec(compile(block_after("<!-- example:trainer -->"), "README-trainer-example", "exec"), {})


def test_setup_command_pins_cpu_torch_before_the_package():
    setup = block_after("<!-- ci:setup -->")
    assert setup.index("torch==2.13.0") < setup.index('-e ".[all]"')


def test_readme_has_result_tables():
    assert "benchmarks/results/synthetic/summary.md" in RESULT_MARKERS


@pytest.mark.parametrize("marker", RESULT_MARKERS)
def test_result_table_is_the_one_the_command_wrote(marker):
    written = (ROOT / marker.split("#")[0]).read_text()  # PATH, or PATH#NAME for a file's second table
    assert block_after(f"<!-- results:{marker} -->").strip() in written
