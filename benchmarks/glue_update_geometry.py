"""GLUE update geometry: how many directions each method's update spans on MiniLM-L6, and how far
ROSA's consecutive subspaces move.

Each method's seed-0 run at its chosen learning rate in finished ``benchmarks.glue_table`` reports is trained
again (random-selection ROSA, LoRA and full fine-tuning from ``--from``, top-selection ROSA from
``--top-from``) and must score what the report holds. Per adapted layer it measures the update
``W_final - W_0`` (90%-energy rank, stable rank) and, for ROSA, the overlap of each new subspace with the
previous one. The protocol and its reading: docs/experiments/glue-protocols.md.

    OMP_NUM_THREADS=1 python -m benchmarks.glue_update_geometry --workers 2        # ~25 min on 2 cores
    python -m benchmarks.glue_update_geometry --tiny --out /tmp/geometry-smoke    # seconds; numbers mean nothing
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from statistics import fmean as mean
from typing import Any, Optional

import rosa
from benchmarks import glue_table
from benchmarks.glue_table import (BUDGETS, REPO, REPRODUCE_TOLERANCE, ROSA_VARIANT, TASKS, VARIANT_DEFAULTS, Budget,
                                   in_workers)
from rosa.experiments import glue
from rosa.experiments.glue_data import get_task_spec
from rosa.experiments.models import load_sequence_classifier
from rosa.experiments.reporting import format_table, machine_info, write_json
from rosa.experiments.update_geometry import consecutive_overlaps, factor_subspaces, layer_weights, update_ranks
from rosa.targets import find_targets

# variant -> (method, ROSA selection); each reruns the seed-0 choice of the report of its selection
VARIANTS = {"rosa": ("rosa", "random"), "rosa-top": ("rosa", "top"), "lora": ("lora", "random"), "full": ("full", "random")}
SOURCE_OPTIONS = {"random": "--from", "top": "--top-from"}  # selection -> the option naming its report
# ROSA settings of glue_table.py that both reports must have left at their defaults (the reruns use those)
DEFAULT_VARIANT = tuple(k for k in ROSA_VARIANT if k != "rosa_selection")
ENERGY = 0.9  # of the update's squared Frobenius norm
DEFAULT_OUT = REPO / "benchmarks" / "results" / "glue-update-geometry"
TINY = replace(BUDGETS["tiny"], epochs=2)  # --tiny: two subspaces, so one resample is measured


def chosen_run(report: dict[str, Any], task: str, method: str) -> tuple[float, float]:
    """The learning rate and seed-0 score of ``method``'s chosen run on ``task`` in a ``glue_table.py`` report."""
    chosen = report["tasks"][task]["chosen"][method]
    return chosen["lr"], chosen["final_score"]


def plan(task: str, reports: dict[str, dict[str, Any]], budget: Budget) -> dict[str, dict[str, Any]]:
    """Variant -> its method, selection, learning rate and the score it should reproduce (None without reports)."""
    planned = {}
    for variant, (method, selection) in VARIANTS.items():
        lr, score = chosen_run(reports[selection], task, method) if reports else (budget.lr_grid[method][0], None)
        planned[variant] = {"method": method, "selection": selection, "lr": lr, "source_score": score}
    return planned


def measure_task(task: str, planned: dict[str, dict[str, Any]], budget: Budget,
                 args: argparse.Namespace) -> dict[str, Any]:
    """Train each planned variant on ``task`` (seed 0) and measure its update and subspaces."""
    settings, data, tokenizer = glue_table.seed_data(task, budget, args, seed=0)
    pretrained = load_sequence_classifier(settings.model, data.spec.num_labels)
    targets = [name for name, _ in find_targets(pretrained, rosa.RosaConfig(rank=settings.rank))]
    before = layer_weights(pretrained, targets)
    results = {}
    for variant, p in planned.items():
        s = replace(settings, methods=[p["method"]], selection=p["selection"])
        snapshots: list = []

        def observe(model, epoch: int) -> None:  # each subspace as drawn: before epoch 1, after each resample
            if p["method"] == "rosa" and epoch < s.epochs:
                snapshots.append(factor_subspaces(model))

        start = time.perf_counter()
        run = glue.train_method(p["method"], p["lr"], s, data, tokenizer, observe=observe)
        score = run.result["final_score"]
        results[variant] = {
            **p, "score": score, "seconds": time.perf_counter() - start,
            "reproduced": None if p["source_score"] is None else abs(score - p["source_score"]) <= REPRODUCE_TOLERANCE,
            **update_ranks(before, layer_weights(run.model, targets), ENERGY),
            "overlaps": consecutive_overlaps(snapshots),
        }
        print(f"{task:6s} {variant:8s} lr={p['lr']:<7g} score={score:.4f} "
              f"energy rank {results[variant]['energy_rank_mean']:.1f} overlaps "
              + ", ".join(f"{o:.3f}" for o in results[variant]["overlaps"]), flush=True)
    shapes = [w.shape for w in before.values()]
    random_overlap = sum(settings.rank / n for shape in shapes for n in shape) / (2 * len(shapes))
    return {"layers": len(targets), "random_overlap": random_overlap, "variants": results}


def rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One table row per task and variant, then one per variant averaged over tasks."""
    table = []
    for task, result in report["tasks"].items():
        for variant, r in result["variants"].items():
            table.append({"task": task, "method": variant, "lr": f"{r['lr']:g}", "score": 100 * r["score"],
                          "reproduced": {None: "-", True: "yes", False: "no"}[r["reproduced"]],
                          "energy rank (mean / max)": f"{r['energy_rank_mean']:.1f} / {r['energy_rank_max']}",
                          "stable rank": r["stable_rank_mean"],
                          "overlap per resample": ", ".join(f"{o:.2f}" for o in r["overlaps"]) or "-"})
    for variant in VARIANTS:
        results = [t["variants"][variant] for t in report["tasks"].values()]
        overlaps = [o for r in results for o in r["overlaps"]]
        table.append({"task": "**mean**", "method": variant, "lr": "", "score": mean([100 * r["score"] for r in results]),
                      "reproduced": "", "energy rank (mean / max)": f"{mean([r['energy_rank_mean'] for r in results]):.1f}",
                      "stable rank": mean([r["stable_rank_mean"] for r in results]),
                      "overlap per resample": f"{mean(overlaps):.2f}" if overlaps else "-"})
    return table


def verdict(report: dict[str, Any]) -> str:
    """The pre-registered reading of the top-selection statement (docs/experiments/glue-protocols.md)."""
    tasks = report["tasks"].values()
    if not all(t["variants"]["rosa-top"]["overlaps"] for t in tasks):
        return "No resample in this budget: nothing to read on how far the subspaces move."
    top_overlap = [mean(t["variants"]["rosa-top"]["overlaps"]) for t in tasks]
    lower_rank = [t["variants"]["rosa-top"]["energy_rank_mean"] < t["variants"]["rosa"]["energy_rank_mean"] for t in tasks]
    if all(o > 0.5 for o in top_overlap) and all(lower_rank):
        reading = "supported"
    elif all(o < 0.5 for o in top_overlap):
        reading = "refuted"
    else:
        reading = "mixed"
    return (f"Top selection's mean consecutive overlap per task: {', '.join(f'{o:.2f}' for o in top_overlap)}; its "
            f"update's 90%-energy rank is below random ROSA's on {sum(lower_rank)} of {len(lower_rank)} tasks. "
            f"Pre-registered reading of \"top selection does not spread its subspaces\": **{reading}**.")


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: the table, what it measured, the reading."""
    budget = report["budget"]
    first = next(iter(report["tasks"].values()))
    columns = ["task", "method", "lr", "score", "reproduced", "energy rank (mean / max)", "stable rank",
               "overlap per resample"]
    return "\n".join([
        f"# GLUE update geometry ({report['model']}, rank {report['rank']})", "",
        f"Run {report['machine']['date']} on {report['machine']['platform']}, {report['machine']['cpu_count']} CPUs, "
        f"torch {report['machine']['torch']}; {report['total_seconds'] / 60:.0f} min. Budget `{report['budget_name']}` "
        f"({budget['epochs']} epochs, ROSA resampling once per epoch), seed 0, each method at its chosen learning rate "
        f"of {report['sources']}.", "",
        format_table(rows(report), columns, floatfmt=".1f"), "",
        f"Score: the task's dev score x100 (\"reproduced\": equal to the report's seed-0 run). Energy rank: the fewest "
        f"singular directions of a layer's update W_final - W_0 holding {ENERGY:.0%} of its squared Frobenius norm, "
        f"mean and largest over the {first['layers']} adapted layers; stable rank ||dW||_F^2 / ||dW||_2^2, mean over "
        "them. LoRA's update has rank at most R; one ROSA subspace's at most 2R (both factors train). Overlap per "
        "resample: mean squared cosine of the principal angles between a ROSA subspace as drawn and the previous one, "
        f"over layers and both sides; 1 is the same subspace, two independent random ones give {first['random_overlap']:.3f}.",
        "", verdict(report), "",
    ])


def load_reports(sources: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Selection -> its ``glue_table.py`` report (``sources``: selection -> folder), checked to be of that
    selection, otherwise the default ROSA, and to share the budget, model and rank."""
    reports = {}
    for selection, folder in sources.items():
        path, option = folder / "glue.json", SOURCE_OPTIONS[selection]
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise SystemExit(f"glue_update_geometry: cannot read {option} {path}: {err}") from None
        changed = [k for k in DEFAULT_VARIANT if report.get(k, VARIANT_DEFAULTS[k]) != VARIANT_DEFAULTS[k]]
        if report.get("rosa_selection", "random") != selection or changed:
            raise SystemExit(f"glue_update_geometry: {option} {folder} must be a {selection}-selection glue_table.py "
                             f"report with default ROSA settings otherwise; it has rosa_selection "
                             f"{report.get('rosa_selection', 'random')!r}" + "".join(f", {k} {report[k]!r}" for k in changed))
        reports[selection] = report
    for key in ("budget_name", "model", "rank"):
        if len({r[key] for r in reports.values()}) > 1:
            raise SystemExit(f"glue_update_geometry: --from and --top-from differ in {key}: "
                             + ", ".join(f"{r[key]!r}" for r in reports.values()))
    return reports


def shown(path: Path) -> str:
    """``path`` relative to the repository when inside it."""
    return str(path.resolve().relative_to(REPO)) if path.resolve().is_relative_to(REPO) else str(path)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="from_", type=Path, default=REPO / "benchmarks" / "results",
                        help="glue_table.py report with random-selection ROSA, LoRA and full (default: %(default)s)")
    parser.add_argument("--top-from", type=Path, default=REPO / "benchmarks" / "results" / "glue-ablation-top",
                        help="glue_table.py --selection top report of the same budget (default: %(default)s)")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "glue")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), help="subset of %(default)s")
    parser.add_argument("--workers", type=int, default=1, help="tasks measured at once, each in its own process")
    parser.add_argument("--tiny", action="store_true",
                        help=f"tiny budget for {TINY.epochs} epochs, first grid LRs, no reports read "
                             "(CI smoke test; the numbers mean nothing)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    return args


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the measurement; returns the report written to ``OUT/geometry.json``."""
    args = parse_args(argv)
    reports = {} if args.tiny else load_reports({"random": args.from_, "top": args.top_from})
    name = "tiny" if args.tiny else reports["random"]["budget_name"]
    budget = TINY if args.tiny else BUDGETS[name]
    model, rank = (reports["random"]["model"], reports["random"]["rank"]) if reports else ("minilm", 8)
    # glue_table.py's defaults for everything else: the ROSA variant both reports were checked to have
    run_args = glue_table.parse_args(["--data-dir", str(args.data_dir), "--model", model, "--rank", str(rank)])
    tasks = [get_task_spec(t).name for t in args.tasks]
    start = time.perf_counter()
    jobs = {t: (t, plan(t, reports, budget), budget, run_args) for t in tasks}
    measured = dict(in_workers(measure_task, jobs, args.workers))
    report = {"benchmark": "glue_update_geometry", "budget_name": name, "budget": asdict(budget),
              "model": model, "rank": rank,
              "sources": f"`{shown(args.from_)}` and `{shown(args.top_from)}`" if reports else "no report",
              "machine": machine_info(), "tasks": {t: measured[t] for t in tasks},
              "total_seconds": time.perf_counter() - start}
    write_json(args.out / "geometry.json", report)
    text = markdown(report)
    (args.out / "geometry.md").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
