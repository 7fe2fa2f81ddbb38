"""Held-out check of the GLUE table's learning rates: each LR is chosen on some seeds and scored on others.

Takes a finished ``benchmarks.glue_table`` report (``--source``); per method and task every grid LR is trained on
the first ``--select-seeds`` seeds, the LR with the best mean final dev score over them is chosen and scored on
the report's other seeds. The source's runs are reused once each task's rerun of its chosen ROSA run scores the
same. How each committed check was made, with its command: docs/experiments/glue-protocols.md.

    OMP_NUM_THREADS=1 python -m benchmarks.glue_heldout --workers 2 --select-seeds 3 \\
        --source benchmarks/results --out benchmarks/results/glue-heldout
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks import glue_table
from benchmarks.glue_table import BUDGETS, REPO, ROSA_VARIANT, Budget, widened
from rosa.experiments.methods import METHODS
from rosa.experiments.reporting import format_table, machine_info

LENT_KEYS = ("chosen_lr", "selection_means", "seeds", "scores")  # what a --baseline check lends of each lent method
Scores = dict[str, dict[str, dict[str, float]]]  # method -> LR (as "%g") -> seed (as str) -> final dev score


def source_scores(result: dict[str, Any], first_seed: int) -> Scores:
    """The final dev scores one task of a table holds: every grid LR on the first seed, the chosen LR on every seed."""
    scores: Scores = {}
    for method, runs in result["runs"].items():
        scores[method] = {lr: {str(first_seed): run["final_score"]} for lr, run in runs.items()}
        chosen = scores[method][f"{result['chosen'][method]['lr']:g}"]
        chosen.update({str(first_seed + i): score for i, score in enumerate(result["seeds"][method])})
    return scores


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
    """Train the ``(method, LR, seed)`` runs of ``wanted`` that ``scores`` lacks and add their scores; returns how many."""
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
    """One task: each method's LR chosen on the ``select`` seeds and scored on the ``held_out`` ones, over the
    source's grid or that of ``previous`` (this task in the ``--widen`` check) widened past the ends it chose.
    ``reused`` (this task in the ``--baseline`` check, cut to the methods it lends) is taken as it is, once the
    first lent method's chosen run scores here what it scored there."""
    first_seed = glue_table.seed_data(task, budget, args, select[0])
    reproduced = glue_table.check_reproduction(source, *first_seed, args)
    lent = reused["seeds"] if reused is not None else {}
    checked = {}
    if lent:
        lender = next(m for m in METHODS if m in lent)
        lr = reused["chosen_lr"][lender]
        expected = reused["scores"][lender][lr][str(select[0])]
        checked["baseline_reproduced"] = glue_table.check_rerun(lender, float(lr), expected, *first_seed, args)
    scores = source_scores(source, select[0])
    methods = [m for m in METHODS if m not in lent]
    grid = {m: [f"{lr:g}" for lr in budget.lr_grid[m]] for m in METHODS}
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
        taken = {"grid": reused.get("grid", grid), **{k: reused[k] for k in LENT_KEYS}}  # older checks kept no grid
        result |= {k: {m: (taken[k] if m in lent else result[k])[m] for m in METHODS} for k in taken}
    return result


def load_source(directory: Path, select_seeds: int) -> tuple[dict[str, Any], Budget]:
    """A finished table and its budget; ``ValueError`` unless it leaves a held-out seed."""
    path = directory / "glue.json"
    if not path.is_file():
        raise ValueError(f"--source: {path} does not exist; pass the --out folder of a finished glue_table run")
    source = json.loads(path.read_text())
    if not source.get("complete"):
        raise ValueError(f"--source: {path} is a partial run; finish it (glue_table --resume) first")
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
    """The finished check of ``report``'s tasks in ``directory/heldout.json``; ``ValueError`` naming ``option`` otherwise."""
    path = directory / "heldout.json"
    if not path.is_file():
        raise ValueError(f"{option}: {path} does not exist; pass the --out folder of a finished glue_heldout run")
    previous = json.loads(path.read_text())
    if not previous.get("complete") or list(previous["tasks"]) != report["task_list"]:
        raise ValueError(f"{option}: {path} is a partial run; finish it first")
    return previous


def load_widened(directory: Path, report: dict[str, Any], out: Path) -> dict[str, Any]:
    """The tasks of the check ``--widen`` widens: of the same source and seeds, with the same ``--baseline``,
    kept apart from ``out``; ``ValueError`` otherwise."""
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
    """The check that ``--baseline`` takes the :func:`lent_methods` from; ``ValueError`` unless ``source`` is a
    ``glue_table --baseline`` report of the table that check checked: same budget and seeds, that table's rank,
    the same runs of those methods."""
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
        for method, lr, seed, score in ((m, lr, s, x) for m in lent_methods(previous, source)
                                        for lr, by_seed in ours[m].items() for s, x in by_seed.items()):
            theirs = result["scores"][method].get(lr, {}).get(seed, score)
            if theirs != score:
                raise ValueError(f"--baseline: {path} scored {method} on {task} at lr {lr}, seed {seed} {theirs}, the "
                                 f"source {score}: not the runs the source reused; pass the check of {source['baseline']}")
    return previous


def lent_methods(check: dict[str, Any], source: dict[str, Any]) -> tuple[str, ...]:
    """The methods a ``--baseline`` check lends: those ``source`` reused from the table it checked."""
    return glue_table.reused_by(check["source"], source["rank"])


def finished_tasks(out: Path, report: dict[str, Any]) -> dict[str, Any]:
    """The tasks an earlier run of the same check finished in ``out/heldout.json``."""
    path = out / "heldout.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    if any(previous.get(k) != report[k] for k in ("source", "select_seeds", "held_out_seeds", "widen_dir",
                                                  "baseline_dir")):
        return {}
    print(f"glue_heldout: keeping {', '.join(previous['tasks']) or 'no tasks'} from {path}", flush=True)
    return previous["tasks"]


def run_arguments(args: argparse.Namespace, source: dict[str, Any]) -> argparse.Namespace:
    """What ``glue_table.train`` and ``task_settings`` read, set as the source was run (runs saved in ``OUT/runs``
    are reused, so a rerun after a crash resumes)."""
    variant = glue_table.settings_of(source, ROSA_VARIANT)
    return argparse.Namespace(data_dir=args.data_dir, model=source["model"], rank=source["rank"], out=args.out,
                              resume=True, **{k.removeprefix("rosa_"): v for k, v in variant.items()})


def variant_note(report: dict[str, Any]) -> list[str]:
    """A sentence on the source's ROSA ablation, if it ran one, and on LoRA and full taken from ``--baseline``."""
    default = glue_table.settings_of({}, ROSA_VARIANT)
    ran = {**default, **report.get("rosa_variant", {})}  # older checks lack the later keys: they ran the defaults
    variant = {"budget": report["source"]["budget"], **ran}
    notes = []
    if ran != default:
        selection = variant["rosa_selection"]
        notes.append(f"**ROSA ablation** (as the source ran it): singular values `{variant['rosa_singular_values']}`, "
                     + (f"selection `{selection}`, " if selection != default["rosa_selection"] else "")
                     + f"resampling {glue_table.resample_phrase(variant)}, {glue_table.rewarmup_phrase(variant)}.")
    if report.get("baseline_dir"):
        other_rank = report.get("baseline_rank", report["source"]["rank"]) != report["source"]["rank"]
        lent, theirs = (("Full fine-tuning was", "its grid, choice") if other_rank else
                        ("LoRA and full fine-tuning were", "their grids, choices"))
        rank = f" (its ROSA and LoRA had rank {report['baseline_rank']})" if other_rank else ""
        notes.append(f"**{lent} not chosen or trained in this check**: {theirs} and held-out scores are those of the "
                     f"check in `{report['baseline_dir']}`, whose source's runs this source reused{rank}."
                     + glue_table.lent_rows(report["tasks"], other_rank, "that check", held_out=True))
    return ["", " ".join(notes)] if notes else []


def markdown(report: dict[str, Any]) -> str:
    """The check as markdown: held-out scores, the LR choice, paired differences and targets."""
    tasks, source, machine = report["tasks"], report["source"], report["machine"]
    names = list(tasks)
    select, held_out = report["select_seeds"], report["held_out_seeds"]
    chose_on, scored_on = (glue_table.seed_range(seeds[0], len(seeds)) for seeds in (select, held_out))
    rows = [{"method": m, **{t: glue_table.mean_and_spread(tasks[t]["seeds"][m]) for t in names},
             "average": 100 * report["average"][m] if report["average"] else None} for m in METHODS]
    source_grid = {m: [f"{lr:g}" for lr in source["budget"]["lr_grid"][m]] for m in METHODS}
    grids = {t: tasks[t].get("grid", source_grid) for t in names}  # checks before --widen kept no grid
    grid_rows = [{"method": m, "lr": lr, **{t: bold_if(tasks[t]["chosen_lr"][m] == lr,
                                                       f"{100 * tasks[t]['selection_means'][m][lr]:.1f}")
                                              for t in names if lr in grids[t][m]}}
                 for m in METHODS for lr in sorted({lr for t in names for lr in grids[t][m]}, key=float)]
    added = [(m, t, lr) for t in names for m in METHODS for lr in grids[t][m] if lr not in source_grid[m]]
    changes = [f"{m} on {t} {tasks[t]['source_chosen_lr'][m]} -> {tasks[t]['chosen_lr'][m]}"
               for t in names for m in METHODS if tasks[t]["chosen_lr"][m] != tasks[t]["source_chosen_lr"][m]]
    reused_from = "".join(f" and {name}" for key, name in (("widen_dir", "that check"),
                                                           ("baseline_dir", "the `--baseline` check")) if report.get(key))
    lines = [
        f"# GLUE learning rates chosen on {chose_on}, scored on {scored_on} ({source['model']}, rank {source['rank']})",
        "",
        glue_table.status_line(report),
        f"Source: the `{source['budget_name']}` budget table in `{report['source_dir']}` (run {source['date']}, "
        f"{source['seeds']} seeds); its budget, subsets and grids are used "
        + (f"unchanged, the grids widened from the check in `{report['widen_dir']}`" if report.get("widen_dir")
           else "unchanged") + f". This run: {machine['date']} on "
        f"{machine['platform']}, {machine['cpu_count']} CPUs, torch {machine['torch']}, total wall time "
        f"{report['total_seconds'] / 60:.0f} min; {sum(t['trained_runs'] for t in tasks.values())} runs trained, "
        f"the others reused from the source{reused_from} after each task's check rerun of its ROSA seed-{select[0]} "
        f"run (largest score difference {glue_table.largest_rerun_difference(tasks):.1g}).",
        *variant_note(report),
        "",
        f"Dev scores x100 on the held-out {scored_on} (mean ± standard deviation) at each method's chosen learning rate:",
        "",
        format_table(rows, ["method", *names, "average"], ".1f"),
        "",
        f"Each grid learning rate's mean dev score x100 over {chose_on}; the chosen one, the highest, in bold:",
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


def bold_if(condition: bool, text: str) -> str:
    return f"**{text}**" if condition else text


def write_report(report: dict[str, Any], out: Path) -> str:
    """Write ``heldout.json`` and ``heldout.md`` for the tasks finished so far; returns the markdown."""
    glue_table.summarize(report, report["source"]["step_time"])
    return glue_table.write_files(report, out / "heldout", markdown)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=REPO / "benchmarks" / "results",
                        help="folder of a finished glue_table run (its glue.json; default: %(default)s)")
    parser.add_argument("--select-seeds", type=int, default=3,
                        help="the first this many seeds choose each LR, the source's others score it (default: 3)")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "glue",
                        help="glue_data/ folder the source was run on (default: ../shared/data/glue next to the repo)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "glue-heldout",
                        help="default: %(default)s")
    parser.add_argument("--widen", type=Path, default=None,
                        help="folder of a finished check of the same source, seeds and --baseline: add one LR past "
                             "each grid end it chose, train it and choose again")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="for a --source made with glue_table --baseline: folder of the finished check of the "
                             "table it reused runs from; only ROSA (LoRA too at another --rank) is chosen and trained")
    parser.add_argument("--workers", type=int, default=1,
                        help="tasks trained at once, each in its own process (at most the CPU cores, with "
                             "OMP_NUM_THREADS=1 each; default: 1)")
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
        "rosa_variant": glue_table.settings_of(source, ROSA_VARIANT), "tasks": {}, "complete": False,
        "total_seconds": 0.0,
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
    seconds = {t: sum(run["wall_seconds"] for runs in r["runs"].values() for run in runs.values())
               for t, r in source["tasks"].items()}
    todo = sorted((t for t in report["task_list"] if t not in report["tasks"]), key=lambda t: -seconds[t])  # longest first
    jobs = {t: (t, source["tasks"][t], report["select_seeds"], report["held_out_seeds"], budget, run_args,
                previous.get(t), reused.get(t)) for t in todo}
    glue_table.record_tasks(glue_table.in_workers(run_task, jobs, args.workers), report, start, args.out, write_report)
    return glue_table.finish(report, start, args.out, write_report)


if __name__ == "__main__":
    main()
