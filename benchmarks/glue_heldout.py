"""Held-out check of the GLUE table's learning rates: each LR is chosen on some seeds and scored on others.

``glue_table.py`` chooses a method's learning rate by one seed's dev score (seed 0) and then averages
over seeds that include it, so the chosen LR is partly scored on the run that chose it: optimistic,
and noisy, since one seed's dev score can pick a poor LR. This script takes a finished
``glue_table.py`` report (``--source``) and keeps choice and score apart. Per method and task every grid
LR is trained on the first ``--select-seeds`` seeds; the LR with the best mean final dev score over
them is chosen; the table shows that LR on the report's remaining seeds only (held out from the
choice), with the same paired differences and targets as the source table.

Runs that the source holds are reused: its grid on the first seed and its seed repeats at its chosen
LRs. A seed fixes the train and dev subsets, head init, data order and ROSA's subspaces, so a rerun
reproduces a run; each task first retrains the source's ROSA run at its chosen LR on the first seed
and stops if the score differs (other torch build, thread count or data). Only missing runs are
trained: with ``--select-seeds 3`` on the 7-seed default table, two more seeds of every LR not
chosen before (40 runs), then the held-out seeds of any LR whose choice changed (8 more in the
committed run: 48 runs, 91 minutes with two workers on a machine 1.3 to 2 times slower per step
than the one that ran the table). Finished tasks are kept in ``heldout.json`` and finished runs of the others in
``OUT/runs/TASK/``, so rerunning the same command after a crash retrains only the runs in progress.

    OMP_NUM_THREADS=1 python benchmarks/glue_heldout.py --workers 2 --select-seeds 3 \\
        --source benchmarks/results --out benchmarks/results/glue-heldout

The committed ``benchmarks/results/glue-heldout`` is that command; its protocol (seeds 0 to 2 choose,
seeds 3 to 6 score, reported whatever it shows) was fixed and committed with this script before it ran.

``--widen PREVIOUS`` (a finished check of the same source and seeds) tests whether the grid's ends held
a choice back: for every method and task whose choice in ``PREVIOUS`` sat at an end of its grid, one LR
is added past that end (see :func:`widened`), trained on the selection seeds, and the choice is made again
over the widened grid; all of ``PREVIOUS``'s runs are reused. The committed
``benchmarks/results/glue-heldout-wide`` is ::

    OMP_NUM_THREADS=1 python benchmarks/glue_heldout.py --workers 2 --select-seeds 3 \\
        --source benchmarks/results --widen benchmarks/results/glue-heldout \\
        --out benchmarks/results/glue-heldout-wide

with its protocol fixed and committed with this option before it ran: one widening, of the nine ends
chosen in ``glue-heldout`` (ROSA on CoLA, RTE, STS-B; LoRA on CoLA, RTE; full fine-tuning on all four
tasks), each added LR trained on seeds 0 to 2, reported whatever it shows. ``--widen`` goes with ``--baseline``
(below) when the widened check was run with that same ``--baseline``: only the methods chosen here are widened
and trained; the lent ones stay as the ``--baseline`` check has them.

``--baseline PREVIOUS`` checks a ROSA ablation (a ``glue_table.py --baseline`` report, which reused LoRA's and
full fine-tuning's runs from another table): ``PREVIOUS`` is the finished check of that other table, with the
same seeds. Only ROSA is chosen and trained here; LoRA's and full fine-tuning's grids, choices and held-out
scores are ``PREVIOUS``'s (the runs are the same runs: every score the two hold in common must agree, and each
task first reruns the first lent method's chosen run on seed 0 and stops unless it scores the same here), and
the paired table adds ROSA minus ``PREVIOUS``'s held-out ROSA, the ablation's effect under a held-out choice.
A ``glue_table.py --rank`` source (which reused only full fine-tuning's runs from a table of another rank) takes
only full fine-tuning from ``PREVIOUS``, the check of that table: ROSA and LoRA are both chosen here, and the
paired table also has LoRA minus ``PREVIOUS``'s LoRA and the change in ROSA minus LoRA between the two ranks.
The committed ``benchmarks/results/glue-heldout-no-resample`` is ::

    OMP_NUM_THREADS=1 python benchmarks/glue_heldout.py --workers 2 --select-seeds 3 \\
        --source benchmarks/results/glue-ablation-no-resample --baseline benchmarks/results/glue-heldout \\
        --out benchmarks/results/glue-heldout-no-resample

Its protocol was fixed and committed with this option before it ran. Question: does never resampling beat
resampling once per epoch at the 3-epoch budget (+0.9 [+0.4, +1.5] in ``glue-ablation-no-resample``, where
each ROSA's LR was chosen on seed 0 and scored on seeds 0 to 6) when each ROSA's LR is chosen on seeds 0 to
2 and scored on seeds 3 to 6? Read from the paired "rosa - baseline rosa" average on the held-out seeds;
ROSA minus LoRA there is read too. Reported whatever it shows (about 50 min with two workers).

Fixed and committed while that check ran, before its result was seen: the same check of the fewer-resamples
ablation, run next whatever the first shows, so that no, one and two resamples (never, every 320 steps, once
per epoch) are each scored under a held-out choice ::

    OMP_NUM_THREADS=1 python benchmarks/glue_heldout.py --workers 2 --select-seeds 3 \\
        --source benchmarks/results/glue-ablation-resample-320 --baseline benchmarks/results/glue-heldout \\
        --out benchmarks/results/glue-heldout-resample-320

read by the same rules (the paired "rosa - baseline rosa" average on seeds 3 to 6, then ROSA minus LoRA).

Fixed and committed after both had run (no-resample +0.4 [-1.0, +1.8], resample-320 +0.2 [-0.5, +1.0]), before
this one ran: the same check of the no-re-warmup ablation, so that every 3-epoch resampling ablation is scored
under a held-out choice (about 35 min), read by the same rules and reported whatever it shows ::

    OMP_NUM_THREADS=1 python benchmarks/glue_heldout.py --workers 2 --select-seeds 3 \\
        --source benchmarks/results/glue-ablation-no-rewarmup --baseline benchmarks/results/glue-heldout \\
        --out benchmarks/results/glue-heldout-no-rewarmup

Fixed and committed with the other-rank ``--baseline`` (session 14), while ``glue_table.py --widen`` widened the
rank-1 table's grids and before that result was seen, run next and reported whatever it shows: the rank-1 table
(``glue-rank1``: ROSA and LoRA at rank 1, full reused from the rank-8 table) checked the same way, seeds 0 to 2
choosing each adapter's LR over the table's grid, seeds 3 to 6 scoring it, full fine-tuning taken from
``glue-heldout`` (about 55 min) ::

    OMP_NUM_THREADS=1 python benchmarks/glue_heldout.py --workers 2 --select-seeds 3 \\
        --source benchmarks/results/glue-rank1 --baseline benchmarks/results/glue-heldout \\
        --out benchmarks/results/glue-heldout-rank1

Question: does the rank check's reading survive a held-out choice? Read from the paired "(rosa - lora) -
baseline (rosa - lora)" average on seeds 3 to 6 (rank-1 ROSA minus LoRA, less the same in ``glue-heldout`` at
rank 8; +0.9 [-0.1, +2.0] on seeds 0 to 6 with the seed-0 choice): above 0, ROSA's standing against LoRA
improves at rank 1; below 0, it worsens; an interval containing 0, four seeds cannot tell. Also read: "rosa -
lora" at rank 1 and "lora - baseline lora" (does rank 1 still cost LoRA under this choice).

Fixed and committed after that check had run (+0.9 [-1.3, +3.0]), before this ran, reported whatever it shows:
the rank-1 no-resample ablation (``glue-rank1-no-resample``, one rank-1 subspace for all 480 steps) checked
the same way, LoRA and full taken from ``glue-heldout-rank1`` (about 30 min) ::

    OMP_NUM_THREADS=1 python benchmarks/glue_heldout.py --workers 2 --select-seeds 3 \\
        --source benchmarks/results/glue-rank1-no-resample --baseline benchmarks/results/glue-heldout-rank1 \\
        --out benchmarks/results/glue-heldout-rank1-no-resample

Question: does never resampling still beat resampling once per epoch at rank 1 (+1.0 [+0.3, +1.7] with the
seed-0 choice) when both ROSAs' LRs are chosen on seeds 0 to 2? Read from the paired "rosa - baseline rosa"
average on seeds 3 to 6: above 0, resampling costs at rank 1; below 0, it pays; an interval containing 0, four
seeds cannot tell. "rosa - lora" is read too. Known before it ran: both ROSAs choose over the unwidened grid,
whose top end the per-epoch one chose on every task there.

Fixed and committed with ``--widen`` beside ``--baseline`` (session 15), before it ran, reported whatever it
shows: the rank-1 check widened once. In ``glue-heldout-rank1`` ROSA chose the top of the adapter grid (2e-3) on
all four tasks and LoRA on CoLA, MRPC and STS-B; 4e-3 is added for those seven, trained on seeds 0 to 2, each
choice made again, seeds 3 to 6 trained where it moved; full fine-tuning stays lent by ``glue-heldout``
(about 40 to 70 min) ::

    OMP_NUM_THREADS=1 python benchmarks/glue_heldout.py --workers 2 --select-seeds 3 \
        --source benchmarks/results/glue-rank1 --baseline benchmarks/results/glue-heldout \
        --widen benchmarks/results/glue-heldout-rank1 --out benchmarks/results/glue-heldout-rank1-wide

Question: does the rank-1 held-out reading change once the adapters' grids reach 4e-3 (where the seed-0
choice moved ROSA on CoLA and STS-B, ``glue-rank1-wide``)? Read from the paired "(rosa - lora) - baseline
(rosa - lora)" average on seeds 3 to 6 (+0.9 [-1.3, +3.0] before widening; the rank-8 side is ``glue-heldout``,
whose own widening, ``glue-heldout-wide``, chose no added LR, so its held-out scores stand) and "rosa - lora"
at rank 1 (-0.2 [-2.2, +1.9]); also how many choices moved. One widening: a choice at the new end is reported,
not widened again.

Fixed and committed after the rank-8 top-selection ablation had run (``glue-ablation-top``: top minus random
selection +1.1 [+0.3, +1.9] with the seed-0 choice), while the check above ran and before this one ran, reported
whatever it shows: that ablation checked the same way, LoRA and full taken from ``glue-heldout`` (about 35 min) ::

    OMP_NUM_THREADS=1 python benchmarks/glue_heldout.py --workers 2 --select-seeds 3 \
        --source benchmarks/results/glue-ablation-top --baseline benchmarks/results/glue-heldout \
        --out benchmarks/results/glue-heldout-top

Question: does training each layer's top 8 singular directions still beat the paper's random 8 when each ROSA's
LR is chosen on seeds 0 to 2 and scored on seeds 3 to 6 (every earlier rank-8 ablation's seed-0 effect shrank
under this choice)? Read from the paired "rosa - baseline rosa" average on seeds 3 to 6: above 0, it survives;
below 0, random selection is better; an interval containing 0, four seeds cannot tell. "rosa - lora" (the first
target's comparison) is read too.

Fixed and committed before the rank-8 block-selection ablation (``glue_table.py --selection block``, the paper
authors' consecutive draw) ran, reported whatever it shows: that ablation checked the same way, LoRA and full
taken from ``glue-heldout`` (about 35 min) ::

    OMP_NUM_THREADS=1 python benchmarks/glue_heldout.py --workers 2 --select-seeds 3 \
        --source benchmarks/results/glue-ablation-block --baseline benchmarks/results/glue-heldout \
        --out benchmarks/results/glue-heldout-block

Read from the paired "rosa - baseline rosa" average on seeds 3 to 6 (block minus uniform): above 0, the
authors' draw trains better under a held-out choice; below 0, worse; an interval containing 0, four seeds
cannot tell. "rosa - lora" and "rosa - full" are read too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # glue_table.py beside this script

import glue_table  # noqa: E402
from glue_table import BUDGETS, REPO, Budget, widened  # noqa: E402

from rosa.experiments.methods import METHODS  # noqa: E402
from rosa.experiments.reporting import format_table, machine_info  # noqa: E402

ROSA_VARIANT = ("rosa_singular_values", "rosa_resample_every", "rosa_rewarmup_steps",  # a ROSA ablation's settings
                "rosa_selection")
LENT_KEYS = ("chosen_lr", "selection_means", "seeds", "scores")  # what a --baseline check lends of each lent method
Scores = dict[str, dict[str, dict[str, float]]]  # method -> LR (as "%g") -> seed (as str) -> final dev score


def source_scores(result: dict[str, Any], first_seed: int) -> Scores:
    """The final dev scores of the runs one task of a ``glue_table`` report holds: every grid LR on the
    first seed, and the chosen LR on every seed."""
    scores: Scores = {}
    for method, runs in result["runs"].items():
        scores[method] = {lr: {str(first_seed): run["final_score"]} for lr, run in runs.items()}
        chosen = scores[method][f"{result['chosen'][method]['lr']:g}"]
        chosen.update({str(first_seed + i): score for i, score in enumerate(result["seeds"][method])})
    return scores


def grid_keys(lr_grid: dict[str, Any]) -> dict[str, list[str]]:
    """Each method's grid LRs as the ``"%g"`` strings that key runs and scores."""
    return {m: [f"{lr:g}" for lr in lr_grid[m]] for m in METHODS}


def merged(*many: Scores) -> Scores:
    """The runs of all of ``many`` in one :data:`Scores` (a later one's score wins on a repeated run)."""
    scores: Scores = {}
    for one in many:
        for method, by_lr in one.items():
            for lr, by_seed in by_lr.items():
                scores.setdefault(method, {}).setdefault(lr, {}).update(by_seed)
    return scores


def train_missing(task: str, wanted: list[tuple[str, str, int]], scores: Scores, budget: Budget,
                  args: argparse.Namespace) -> int:
    """Train the ``(method, LR, seed)`` runs of ``wanted`` that ``scores`` lacks and add their scores;
    returns how many were trained."""
    missing = [(m, lr, s) for m, lr, s in wanted if str(s) not in scores[m].get(lr, {})]
    for seed in sorted({s for _, _, s in missing}):
        settings, data, tokenizer = glue_table.seed_data(task, budget, args, seed)
        for method, lr, _ in (run for run in missing if run[2] == seed):
            result = glue_table.train(method, float(lr), settings, data, tokenizer, args)
            scores[method].setdefault(lr, {})[str(seed)] = result["final_score"]
    return len(missing)


def run_task(task: str, source: dict[str, Any], select: list[int], held_out: list[int], budget: Budget,
             args: argparse.Namespace, previous: Optional[dict[str, Any]] = None,
             reused: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Choose each method's LR on the ``select`` seeds (the source's first seeds) and score it on the
    ``held_out`` ones, for one task; over the source's grid, or the grid of ``previous`` (this task's
    result in an earlier check) widened past the ends it chose. ``reused`` (this task's result in the
    ``--baseline`` check, cut to the methods it lends: see :func:`lent_methods`) is taken as it is; only the
    other methods are chosen."""
    first_seed = glue_table.seed_data(task, budget, args, select[0])
    reproduced = glue_table.check_reproduction(source, *first_seed, args)
    lent = reused["seeds"] if reused is not None else {}
    checked = {}
    if lent:  # the lent runs must score here what they scored in the --baseline check before new runs pair with them
        lender = next(m for m in METHODS if m in lent)
        lr = reused["chosen_lr"][lender]
        expected = reused["scores"][lender][lr][str(select[0])]
        checked["baseline_reproduced"] = glue_table.check_rerun(lender, float(lr), expected, *first_seed, args)
    scores = source_scores(source, select[0])
    methods = [m for m in METHODS if m not in lent]
    grid = grid_keys(budget.lr_grid)
    if previous is not None:  # only the methods chosen here are widened; the lent ones stay as lent
        scores = merged(scores, previous["scores"])
        grid |= {m: widened(previous.get("grid", grid)[m], previous["chosen_lr"][m]) for m in methods}
    trained = train_missing(task, [(m, lr, s) for s in select for m in methods for lr in grid[m]], scores, budget, args)
    selection_means = {m: {lr: statistics.fmean(scores[m][lr][str(s)] for s in select) for lr in grid[m]}
                       for m in methods}
    chosen = {m: max(grid[m], key=selection_means[m].__getitem__) for m in methods}
    trained += train_missing(task, [(m, chosen[m], s) for s in held_out for m in methods], scores, budget, args)
    result = {
        "grid": grid, "chosen_lr": chosen,
        "source_chosen_lr": {m: f"{source['chosen'][m]['lr']:g}" for m in METHODS}, "selection_means": selection_means,
        "seeds": {m: [scores[m][chosen[m]][str(s)] for s in held_out] for m in methods},
        "scores": scores, "trained_runs": trained, "reproduced": reproduced, **checked,
    }
    if reused is not None:
        taken = {"grid": reused.get("grid", grid),  # checks before --widen kept no grid
                 **{k: reused[k] for k in LENT_KEYS}}
        result |= {k: {m: (taken[k] if m in lent else result[k])[m] for m in METHODS} for k in taken}
    return result


def source_seconds(result: dict[str, Any]) -> float:
    """The wall seconds of one task's grid runs in a ``glue_table`` report."""
    return sum(run["wall_seconds"] for runs in result["runs"].values() for run in runs.values())


def load_source(directory: Path, select_seeds: int) -> tuple[dict[str, Any], Budget]:
    """A finished ``glue_table`` report and its budget; ``ValueError`` unless it leaves a held-out seed."""
    path = directory / "glue.json"
    if not path.is_file():
        raise ValueError(f"--source: {path} does not exist; pass the --out folder of a finished glue_table.py run")
    source = json.loads(path.read_text())
    if not source.get("complete"):
        raise ValueError(f"--source: {path} is a partial run; finish it (glue_table.py --resume) first")
    budget = BUDGETS.get(source["budget_name"])
    if budget is None or json.loads(json.dumps(glue_table.asdict(budget))) != source["budget"]:
        raise ValueError(f"--source: {path} was run with a budget glue_table.py no longer defines "
                         f"({source['budget_name']}: {source['budget']})")
    if source.get("widen"):
        raise ValueError(f"--source: {path} widened the grids of {source['widen']} (glue_table.py --widen), so its "
                         "grids differ by task; check that table instead and widen the check with --widen")
    if not 1 <= select_seeds < source["seeds"]:
        raise ValueError(f"--select-seeds must be from 1 to {source['seeds'] - 1} so that {path}'s "
                         f"{source['seeds']} seeds leave at least one held out; got {select_seeds}")
    return source, budget


def load_check(directory: Path, report: dict[str, Any], option: str) -> dict[str, Any]:
    """The finished check in ``directory`` (its ``heldout.json``) of the same tasks as ``report``; ``ValueError``
    naming ``option`` otherwise."""
    path = directory / "heldout.json"
    if not path.is_file():
        raise ValueError(f"{option}: {path} does not exist; pass the --out folder of a finished glue_heldout.py run")
    previous = json.loads(path.read_text())
    if not previous.get("complete") or list(previous["tasks"]) != report["task_list"]:
        raise ValueError(f"{option}: {path} is a partial run; finish it first")
    return previous


def load_widened(directory: Path, report: dict[str, Any], out: Path) -> dict[str, Any]:
    """The tasks of the finished check in ``directory`` that ``--widen`` widens; ``ValueError`` unless it
    is a finished check of the same source and seeds, with the same ``--baseline``, kept apart from ``out``."""
    if directory.resolve() == out.resolve():
        raise ValueError(f"--widen: {directory} is also --out; write the widened check to another folder")
    previous = load_check(directory, report, "--widen")
    differ = [key for key in ("source", "select_seeds", "held_out_seeds") if previous[key] != report[key]]
    if differ:
        raise ValueError(f"--widen: {directory / 'heldout.json'} checked another source table or seeds "
                         f"({', '.join(differ)} differ); pass the --source and --select-seeds it was run with")
    theirs, mine = (d and Path(d).resolve() for d in (previous.get("baseline_dir"), report["baseline_dir"]))
    if theirs != mine:
        raise ValueError(f"--widen: {directory / 'heldout.json'} was run with --baseline {previous.get('baseline_dir')}, "
                         f"this run with --baseline {report['baseline_dir']}; pass the --baseline it was run with")
    return previous["tasks"]


def load_baseline(directory: Path, report: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    """The finished check in ``directory`` that ``--baseline`` takes the :func:`lent_methods` from; ``ValueError``
    unless ``source`` is a ``glue_table.py --baseline`` report (a ROSA ablation, or a run at another rank) of
    the table that check checked: same budget and seeds, that table's rank, the same runs of those methods."""
    if not source.get("baseline"):
        raise ValueError("--baseline: --source trained its own LoRA and full runs; --baseline is for a ROSA "
                         "ablation made with glue_table.py --baseline, whose other table that check checked")
    previous = load_check(directory, report, "--baseline")
    path = directory / "heldout.json"
    differ = [key for key in ("select_seeds", "held_out_seeds") if previous[key] != report[key]]
    table = {**report["source"], "rank": source.get("baseline_rank", source["rank"])}  # the table the source reused
    differ += [key for key in (*glue_table.SHARED_SETTINGS, "seeds") if previous["source"][key] != table[key]]
    if differ:
        raise ValueError(f"--baseline: {path} checked another budget, rank or seeds ({', '.join(differ)} differ); pass "
                         f"the check of {source['baseline']} with --select-seeds {len(report['select_seeds'])}")
    for task, result in previous["tasks"].items():
        ours = source_scores(source["tasks"][task], report["select_seeds"][0])
        for method, lr, seed, score in ((m, lr, s, x) for m in lent_methods(previous, source) for lr, by_seed in ours[m].items()
                                        for s, x in by_seed.items()):
            theirs = result["scores"][method].get(lr, {}).get(seed, score)
            if theirs != score:
                raise ValueError(f"--baseline: {path} scored {method} on {task} at lr {lr}, seed {seed} {theirs}, the "
                                 f"source {score}: not the runs the source reused; pass the check of {source['baseline']}")
    return previous


def lent_methods(check: dict[str, Any], source: dict[str, Any]) -> tuple[str, ...]:
    """The methods a ``--baseline`` check lends: those ``source`` reused from the table it checked (LoRA and full,
    or full alone when the source has another rank)."""
    return glue_table.reused_by(check["source"], source["rank"])


def finished_tasks(out: Path, report: dict[str, Any]) -> dict[str, Any]:
    """The tasks an earlier run of the same check (same source, seeds and widened check) finished in
    ``out/heldout.json``."""
    path = out / "heldout.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    if any(previous.get(k) != report[k] for k in ("source", "select_seeds", "held_out_seeds", "widen_dir",
                                                  "baseline_dir")):
        return {}
    print(f"glue_heldout: keeping {', '.join(previous['tasks']) or 'no tasks'} from {path}", flush=True)
    return previous["tasks"]


def run_arguments(args: argparse.Namespace, source: dict[str, Any]) -> argparse.Namespace:
    """What ``glue_table.train`` and ``task_settings`` read, set as the source was run (finished runs
    in ``OUT/runs`` are reused, so a rerun after a crash resumes)."""
    variant = rosa_variant(source)
    return argparse.Namespace(
        data_dir=args.data_dir, model=source["model"], rank=source["rank"],
        singular_values=variant["rosa_singular_values"], resample_every=variant["rosa_resample_every"],
        rewarmup_steps=variant["rosa_rewarmup_steps"], selection=variant["rosa_selection"],
        out=args.out, resume=True)


def rosa_variant(source: dict[str, Any]) -> dict[str, Any]:
    """How the source ran ROSA: its ``--singular-values``, ``--resample-every``, ``--rewarmup-steps`` and
    ``--selection``."""
    return glue_table.settings_of(source, ROSA_VARIANT)


def variant_note(report: dict[str, Any]) -> list[str]:
    """A sentence on the source's ROSA ablation, if it ran one, and on LoRA and full taken from ``--baseline``."""
    default = glue_table.settings_of({}, ROSA_VARIANT)
    ran = {**default, **report.get("rosa_variant", {})}  # older checks lack the later keys: they ran the defaults
    variant = {"budget": report["source"]["budget"], **ran}
    notes = []
    if ran != default:  # an ablation
        selection = variant["rosa_selection"]
        notes.append(f"**ROSA ablation** (as the source ran it): singular values `{variant['rosa_singular_values']}`, "
                     + (f"selection `{selection}`, " if selection != default["rosa_selection"] else "")
                     + f"resampling {glue_table.resample_phrase(variant)}, {glue_table.rewarmup_phrase(variant)}.")
    if report.get("baseline_dir"):
        notes.append(lent_note(report))
    return ["", " ".join(notes)] if notes else []


def lent_note(report: dict[str, Any]) -> str:
    """What a ``--baseline`` check lent: LoRA and full, or full alone when the source has another rank."""
    other_rank = report.get("baseline_rank", report["source"]["rank"]) != report["source"]["rank"]
    lent, theirs = (("Full fine-tuning was", "its grid, choice") if other_rank else
                    ("LoRA and full fine-tuning were", "their grids, choices"))
    rank = f" (its ROSA and LoRA had rank {report['baseline_rank']})" if other_rank else ""
    rows = ("`baseline rosa` and `baseline lora` in the paired table are that check's held-out ROSA and LoRA, and "
            "`(rosa - lora) - baseline (rosa - lora)` is how much ROSA's difference from LoRA changed with the rank."
            if other_rank else "`baseline rosa` in the paired table is that check's held-out ROSA.")
    return (f"**{lent} not chosen or trained in this check**: {theirs} and held-out scores are those of the check in "
            f"`{report['baseline_dir']}`, whose source's runs this source reused{rank}."
            f"{glue_table.lent_check_note(report['tasks'], 'that check')} {rows}")


def markdown(report: dict[str, Any]) -> str:
    """The README section's tables: held-out scores, the LR choice, paired differences and targets."""
    tasks, source, machine = report["tasks"], report["source"], report["machine"]
    names = list(tasks)
    select, held_out = report["select_seeds"], report["held_out_seeds"]
    rows = [{"method": m, **{t: glue_table.mean_and_spread(tasks[t]["seeds"][m]) for t in names},
             "average": 100 * report["average"][m] if report["average"] else None} for m in METHODS]
    source_grid = grid_keys(source["budget"]["lr_grid"])
    grids = {t: tasks[t].get("grid", source_grid) for t in names}  # checks before --widen kept no grid
    grid_rows = [{"method": m, "lr": lr, **{t: bold_if(tasks[t]["chosen_lr"][m] == lr,
                                                       f"{100 * tasks[t]['selection_means'][m][lr]:.1f}")
                                              for t in names if lr in grids[t][m]}}
                 for m in METHODS for lr in sorted({lr for t in names for lr in grids[t][m]}, key=float)]
    added = [(m, t, lr) for t in names for m in METHODS for lr in grids[t][m] if lr not in source_grid[m]]
    changes = [f"{m} on {t} {tasks[t]['source_chosen_lr'][m]} -> {tasks[t]['chosen_lr'][m]}"
               for t in names for m in METHODS if tasks[t]["chosen_lr"][m] != tasks[t]["source_chosen_lr"][m]]
    largest = glue_table.largest_rerun_difference(tasks)
    lines = [
        f"# GLUE learning rates chosen on {glue_table.seed_range(select[0], len(select))}, scored on "
        f"{glue_table.seed_range(held_out[0], len(held_out))} ({source['model']}, rank {source['rank']})",
        "",
        ("Status: **complete**." if report["complete"] else
         f"Status: **partial**, {len(names)} of {len(report['task_list'])} tasks done."),
        f"Source: the `{source['budget_name']}` budget table in `{report['source_dir']}` (run {source['date']}, "
        f"{source['seeds']} seeds); its budget, subsets and grids are used "
        + (f"unchanged, the grids widened from the check in `{report['widen_dir']}`" if report.get("widen_dir")
           else "unchanged") + f". This run: {machine['date']} on "
        f"{machine['platform']}, {machine['cpu_count']} CPUs, torch {machine['torch']}, total wall time "
        f"{report['total_seconds'] / 60:.0f} min; {sum(t['trained_runs'] for t in tasks.values())} runs trained, "
        f"the others reused from the source{reused_from(report)} after each "
        f"task's check rerun of its ROSA seed-{select[0]} run (largest score difference {largest:.1g}).",
        *variant_note(report),
        "",
        f"Dev scores x100 on the held-out {glue_table.seed_range(held_out[0], len(held_out))} (mean ± standard "
        "deviation) at each method's chosen learning rate:",
        "",
        format_table(rows, ["method", *names, "average"], ".1f"),
        "",
        f"Each grid learning rate's mean dev score x100 over {glue_table.seed_range(select[0], len(select))}; "
        "the chosen one, the highest, in bold:",
        "",
        format_table(grid_rows, ["method", "lr", *names]),
        "",
        ("Choices that differ from the source table's (seed-0) choice: " + "; ".join(changes) + "."
         if changes else "Every choice is the source table's (seed-0) choice."),
    ]
    if added:
        chosen_added = [f"{m} on {t} {lr}" for m, t, lr in added if tasks[t]["chosen_lr"][m] == lr]
        lines += ["", "Learning rates added, each past the end of its grid that the earlier check chose: "
                  + "; ".join(f"{m} on {t} {lr}" for m, t, lr in added) + ". Chosen among them: "
                  + ("; ".join(chosen_added) + " (each at the new end of its grid, so a wider grid may still "
                     "change it)" if chosen_added else "none") + "."]
    if report.get("paired"):
        lines += ["", glue_table.PAIRED_NOTE + " Held-out seeds only.", "",
                  glue_table.paired_table(report["paired"], names)]
    if report["targets"]:
        lines += ["", glue_table.targets_line(report["targets"]) + " (on the held-out means; the step time is the "
                                                                   "source's)."]
    return "\n".join(lines) + "\n"


def reused_from(report: dict[str, Any]) -> str:
    """Where else the check's untrained runs came from: the widened check, the ``--baseline`` one, or both."""
    others = [name for key, name in (("widen_dir", "that check"), ("baseline_dir", "the `--baseline` check"))
              if report.get(key)]
    return "".join(f" and {name}" for name in others)


def bold_if(condition: bool, text: str) -> str:
    """``text`` in markdown bold when ``condition`` holds."""
    return f"**{text}**" if condition else text


def write_report(report: dict[str, Any], out: Path) -> str:
    """Write ``heldout.json`` and ``heldout.md`` for the tasks finished so far; returns the markdown."""
    glue_table.summarize(report, report["source"]["step_time"])
    return glue_table.write_files(report, out / "heldout", markdown)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=REPO / "benchmarks" / "results",
                        help="folder of a finished glue_table.py run (its glue.json; default: %(default)s)")
    parser.add_argument("--select-seeds", type=int, default=3,
                        help="the first this many seeds choose each LR, the source's others score it "
                             "(default: %(default)s)")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "glue",
                        help="glue_data/ folder the source was run on (default: ../shared/data/glue next to the repo)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "glue-heldout")
    parser.add_argument("--widen", type=Path, default=None,
                        help="folder of a finished glue_heldout.py run of the same source, seeds and --baseline: "
                             "add one LR past each end of the grid it chose, train it and choose again")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="for a --source made with glue_table.py --baseline: folder of the finished check of the "
                             "table it reused runs from; only ROSA (LoRA too at another --rank) is chosen and trained")
    parser.add_argument("--workers", type=int, default=1,
                        help="tasks trained at once, each in its own process (at most the CPU cores; "
                             "with OMP_NUM_THREADS=1 each)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the held-out check; returns the report written to ``heldout.json``."""
    args = parse_args(argv)
    if args.workers < 1:
        raise SystemExit(f"glue_heldout: --workers must be at least 1, got {args.workers}")
    try:
        source, budget = load_source(args.source, args.select_seeds)
    except ValueError as err:
        raise SystemExit(f"glue_heldout: {err}") from None
    first = source["seed"]
    report: dict[str, Any] = {
        "benchmark": "glue_heldout", "source_dir": str(args.source),
        "source": {k: source[k] for k in ("budget_name", "budget", "model", "rank", "seed", "seeds", "step_time")}
        | {"date": glue_table.run_dates(source)},
        "select_seeds": list(range(first, first + args.select_seeds)),
        "held_out_seeds": list(range(first + args.select_seeds, first + source["seeds"])),
        "task_list": list(source["tasks"]), "workers": args.workers, "machine": machine_info(),
        "widen_dir": args.widen and str(args.widen), "baseline_dir": args.baseline and str(args.baseline),
        "rosa_variant": rosa_variant(source), "tasks": {}, "complete": False, "total_seconds": 0.0,
    }
    try:
        previous = load_widened(args.widen, report, args.out) if args.widen else {}
        check = load_baseline(args.baseline, report, source) if args.baseline else {}
    except ValueError as err:
        raise SystemExit(f"glue_heldout: {err}") from None
    reused = {}
    if check:
        lent = lent_methods(check, source)
        reused = {t: {k: {m: r[k][m] for m in lent} for k in ("grid", *LENT_KEYS) if k in r}
                  for t, r in check["tasks"].items()}
        report["baseline_rank"] = check["source"]["rank"]
        report |= {f"baseline_{m}_seeds": {t: r["seeds"][m] for t, r in check["tasks"].items()}
                   for m in ("rosa", "lora") if m not in lent}
    report["tasks"] = finished_tasks(args.out, report)
    run_args = run_arguments(args, source)
    start = time.perf_counter()
    todo = sorted((t for t in report["task_list"] if t not in report["tasks"]),
                  key=lambda t: -source_seconds(source["tasks"][t]))  # the longest first, for the workers' sake
    jobs = {t: (t, source["tasks"][t], report["select_seeds"], report["held_out_seeds"], budget, run_args,
                previous.get(t), reused.get(t)) for t in todo}
    glue_table.record_tasks(glue_table.in_workers(run_task, jobs, args.workers), report, start, args.out, write_report)
    return glue_table.finish(report, start, args.out, write_report)


if __name__ == "__main__":
    main()
