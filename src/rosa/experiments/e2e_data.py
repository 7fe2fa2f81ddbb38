"""Reading the E2E NLG Challenge data and turning meaning representations into prompts.

The E2E CSV format has a header row ``mr,ref`` and one (meaning representation,
human reference) pair per row, with standard CSV quoting. Several rows share one
MR; :func:`group_by_mr` collects them into multi-reference groups for evaluation,
and :func:`split_by_mr` splits groups so that no MR is in both parts.
"""

from __future__ import annotations

import csv
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

HEADER = ["mr", "ref"]
PROMPT_PREFIX = "Describe the restaurant: "
PROMPT_SUFFIX = "\nDescription:"

_SLOT = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]+)\]\s*")


@dataclass(frozen=True)
class E2EExample:
    """One (meaning representation, reference text) pair."""

    mr: str
    ref: str


@dataclass
class MRGroup:
    """A meaning representation with all of its reference texts."""

    mr: str
    refs: list[str] = field(default_factory=list)


def read_e2e_csv(path: str | Path) -> list[E2EExample]:
    """Read an E2E CSV file (header ``mr,ref``) into examples.

    Raises ValueError, naming the file and the 1-based line number, for a
    missing header or a row without exactly two non-empty fields, and naming
    the file when it has no data rows.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header != HEADER:
            raise ValueError(f"{path}: expected header 'mr,ref' on line 1, got {header!r}")
        examples = [_parse_row(row, path, reader.line_num) for row in reader]
    if not examples:
        raise ValueError(f"{path}: no data rows (only the header 'mr,ref'); an E2E CSV needs at least one mr,ref row")
    return examples


def _parse_row(row: list[str], path: Path, line_num: int) -> E2EExample:
    """Validate one CSV row and turn it into an example."""
    if len(row) != 2:
        raise ValueError(f"{path}:{line_num}: expected 2 fields (mr, ref), got {len(row)}")
    mr, ref = (value.strip() for value in row)
    if not mr or not ref:
        raise ValueError(f"{path}:{line_num}: empty mr or ref")
    return E2EExample(mr=mr, ref=ref)


def group_by_mr(examples: list[E2EExample]) -> list[MRGroup]:
    """Group examples with identical MRs, in order of each MR's first appearance."""
    groups: dict[str, MRGroup] = {}
    for example in examples:
        groups.setdefault(example.mr, MRGroup(example.mr)).refs.append(example.ref)
    return list(groups.values())


def split_by_mr(
    groups: list[MRGroup], eval_fraction: float = 0.2, seed: int = 0
) -> tuple[list[MRGroup], list[MRGroup]]:
    """Split MR groups at random (seeded) into (train, eval); no MR is in both.

    The eval part gets ``round(eval_fraction * len(groups))`` groups; both parts
    keep the input order.
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    if len({group.mr for group in groups}) != len(groups):
        raise ValueError("groups must have distinct MRs; use group_by_mr first")
    n_eval = round(eval_fraction * len(groups))
    eval_idx = set(random.Random(seed).sample(range(len(groups)), n_eval))
    train = [g for i, g in enumerate(groups) if i not in eval_idx]
    evaluation = [g for i, g in enumerate(groups) if i in eval_idx]
    return train, evaluation


def parse_mr(mr: str) -> list[tuple[str, str]]:
    """Parse ``key[value], key[value], ...`` into (key, value) pairs.

    Values may contain commas (not brackets). Raises ValueError if the MR does not parse.
    """
    pairs: list[tuple[str, str]] = []
    pos = 0
    while pos < len(mr):
        match = _SLOT.match(mr, pos)
        if match is None:
            raise ValueError(f"cannot parse meaning representation {mr!r} at position {pos}")
        pairs.append((match.group(1), match.group(2).strip()))
        pos = match.end()
        if pos < len(mr):
            if mr[pos] != ",":
                raise ValueError(f"expected ',' at position {pos} of meaning representation {mr!r}")
            pos += 1
            if pos == len(mr):
                raise ValueError(f"trailing ',' in meaning representation {mr!r}")
    if not pairs:
        raise ValueError(f"empty meaning representation {mr!r}")
    return pairs


def format_prompt(mr: str) -> str:
    """Turn an MR into the model prompt; the training target is ``" " + ref``.

    ``name[The Vaults], eatType[pub]`` becomes
    ``"Describe the restaurant: name: The Vaults | eatType: pub\\nDescription:"``.
    """
    slots = " | ".join(f"{key}: {value}" for key, value in parse_mr(mr))
    return f"{PROMPT_PREFIX}{slots}{PROMPT_SUFFIX}"
