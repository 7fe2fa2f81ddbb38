"""The README's examples run; its and the reports' result tables are the ones the commands wrote; links resolve;
the project's text speaks of the project only."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def block_after(marker: str, text: str = README) -> str:
    """The fenced code block (or table) that follows ``marker`` in ``text``."""
    rest = text.split(marker, 1)[1]
    fenced = re.match(r"\s*```\w*\n(.*?)```", rest, re.S)
    if fenced:
        return fenced.group(1)
    return re.match(r"\s*((?:\|.*\n)+)", rest).group(1)


def result_tables() -> list[tuple[str, str, str]]:
    """``(document, PATH or PATH#NAME, table)`` for every ``<!-- results:... -->`` marker in README and docs."""
    tables = []
    for doc in DOCS:
        text = doc.read_text()
        for found in re.finditer(r"<!-- results:(\S+) -->", text):
            table = re.match(r"\s*((?:\|.*\n)+)", text[found.end():])
            tables.append((relative(doc), found.group(1), table.group(1) if table else ""))
    return tables


RESULT_TABLES = result_tables()


def test_api_example_runs():
    exec(compile(block_after("<!-- example:api -->"), "README-example", "exec"), {})


def test_trainer_example_runs():
    exec(compile(block_after("<!-- example:trainer -->"), "README-trainer-example", "exec"), {})


def test_setup_command_pins_cpu_torch_before_the_package():
    setup = block_after("<!-- ci:setup -->")
    assert setup.index("torch==2.13.0") < setup.index('-e ".[all]"')


def test_readme_and_every_report_have_result_tables():
    with_tables = {doc for doc, _, _ in RESULT_TABLES}
    reports = {f"docs/experiments/{name}.md" for name in ("synthetic", "glue", "e2e", "e2e-rank-sweep", "vision", "performance")}
    assert "README.md" in with_tables
    assert reports <= with_tables, f"reports without a results table: {sorted(reports - with_tables)}"


@pytest.mark.parametrize("doc,marker,table", RESULT_TABLES, ids=[f"{d}:{m}" for d, m, _ in RESULT_TABLES])
def test_result_table_is_the_one_the_command_wrote(doc, marker, table):
    assert table, f"{doc}: no table follows <!-- results:{marker} -->"
    written = (ROOT / marker.split("#")[0]).read_text()  # PATH, or PATH#NAME for a file's second table
    assert is_whole_table(table, written), f"{doc}: the table after <!-- results:{marker} --> is not one of its tables"


def is_whole_table(table: str, written: str) -> bool:
    """Whether ``table`` is one of ``written``'s tables, every row of it and nothing more."""
    lines = written.splitlines()
    rows = table.strip().splitlines()
    for start in range(len(lines) - len(rows) + 1):
        if lines[start:start + len(rows)] == rows:
            before = lines[start - 1] if start else ""
            after = lines[start + len(rows)] if start + len(rows) < len(lines) else ""
            if not before.startswith("|") and not after.startswith("|"):
                return True
    return False


def test_a_cut_table_is_not_the_one_the_command_wrote():
    written = (ROOT / "benchmarks/results/glue.md").read_text()
    table = block_after("<!-- results:benchmarks/results/glue.md -->")
    assert is_whole_table(table, written)
    assert not is_whole_table("\n".join(table.strip().splitlines()[:-1]), written)


def markdown_links(text: str) -> list[str]:
    """Targets of ``[text](target)`` and ``![alt](target)`` outside fenced code blocks."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.findall(r"\]\(([^)\s]+)\)", prose)


def anchors(text: str) -> set[str]:
    """The anchors a Markdown renderer gives the headings of ``text`` (lowercase, punctuation dropped, spaces to -)."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", prose, re.M)}


LINKS = list(dict.fromkeys((relative(doc), target) for doc in DOCS for target in markdown_links(doc.read_text())
                           if not re.match(r"[a-z]+:", target)))


def test_docs_have_relative_links():
    assert any(doc.startswith("docs/experiments/") for doc, _ in LINKS)
    assert "ablation-where-the-singular-values-go" in anchors((ROOT / "docs/experiments/glue.md").read_text())


@pytest.mark.parametrize("doc,target", LINKS, ids=[f"{d}->{t}" for d, t in LINKS])
def test_relative_link_points_to_an_existing_file(doc, target):
    file, _, anchor = target.partition("#")
    path = (ROOT / doc).parent / file if file else ROOT / doc
    assert path.exists(), f"{doc} links to {target}, which does not exist"
    if anchor and path.suffix == ".md":
        assert anchor in anchors(path.read_text()), f"{doc} links to {target}: {relative(path)} has no such heading"


# Built from pieces so that this file does not match its own pattern.
OUTSIDE_WORDS = re.compile("|".join([r"\bsess" r"ions?\b", r"the iss" r"ue'?s?\b", r"\biss" r"ues? [0-9]",
                                     r"DESI" r"GN\.md"]), re.I)
PROJECT_TEXT = sorted({*DOCS, *(ROOT / "src").rglob("*.py"), *(ROOT / "tests").rglob("*.py"),
                       *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "benchmarks").glob("*.sh"),
                       *(p for p in (ROOT / "examples").rglob("*") if p.is_file()),
                       *(p for p in (ROOT / ".ci").rglob("*") if p.is_file()), ROOT / "pyproject.toml"})


def test_outside_word_pattern_catches_what_it_should():
    hits = ["fixed in sess" "ion 12", "Sess" "ions", "the iss" "ue's targets", "see iss" "ue 28", "as DESI" "GN.md says"]
    misses = ["the library's default split", "fixed before it ran (commit abc123)", "a tissue"]
    assert all(OUTSIDE_WORDS.search(s) for s in hits)
    assert not any(OUTSIDE_WORDS.search(s) for s in misses)


def test_project_text_speaks_of_the_project_only():
    found = [f"{relative(path)}:{number}: {line.strip()}"
             for path in PROJECT_TEXT
             for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
             if OUTSIDE_WORDS.search(line)]
    assert not found, "mentions of things outside the repository:\n" + "\n".join(found)
