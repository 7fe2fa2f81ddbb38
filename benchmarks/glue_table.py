"""GLUE table: ROSA vs PEFT LoRA vs full fine-tuning of MiniLM-L6 on CoLA, MRPC, RTE and STS-B.

Each method's learning rate is chosen from a grid by the seed-0 dev score, then rerun on ``--seeds`` seeds;
``glue.json`` and ``glue.md`` are rewritten in ``--out`` after every task. How each committed table was made,
with its command: docs/experiments/glue-protocols.md.

    OMP_NUM_THREADS=1 python -m benchmarks.glue_table --workers 2      # default budget, ~75 min on 2 cores
    python -m benchmarks.glue_table --tiny --out /tmp/glue-smoke       # seconds; the numbers mean nothing
    python -m benchmarks.glue_table --report-only --out benchmarks/results/glue-long   # table from glue.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import statistics
import time
from concurrent.futures import as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from scipy import stats

from rosa.subspace import SELECTIONS
from rosa.experiments import glue
from rosa.experiments.glue_data import get_task_spec
from rosa.experiments.methods import METHODS, classifier_head, prepare_model
from rosa.experiments.models import load_sequence_classifier
from rosa.experiments.reporting import default_device, format_table, machine_info, write_json
from rosa.experiments.workers import worker_pool
from rosa.subspace import SINGULAR_VALUE_PLACEMENTS

REPO = Path(__file__).resolve().parents[1]
TASKS = ("CoLA", "MRPC", "RTE", "STS-B")
# Settings a --resume or --widen report must share with this run (a --baseline report all but the rank).
SHARED_SETTINGS = ("budget_name", "budget", "model", "rank", "seed")
# The run's variant, which --resume must also share, with the value of reports from before each key existed:
# the ROSA ablation settings, then the reports it reused runs from.
ROSA_VARIANT = {"rosa_singular_values": "split", "rosa_resample_every": None, "rosa_rewarmup_steps": None,
                "rosa_selection": "random"}
VARIANT_DEFAULTS = {**ROSA_VARIANT, "baseline": None, "widen": None}
REPRODUCE_TOLERANCE = 1e-6  # a rerun of an earlier report's run must score this close to reuse that report's runs


@dataclass(frozen=True)
class Budget:
    """What every (task, method, learning rate) run gets."""

    train_samples: Optional[int]
    eval_samples: Optional[int]
    epochs: int
    max_length: int
    batch_size: int
    rewarmup_steps: int  # ROSA's LR re-warmup after each resample, unless --rewarmup-steps
    lr_grid: dict[str, tuple[float, ...]]


ADAPTER_LRS = (5e-4, 1e-3, 2e-3)  # ROSA and LoRA share one grid
BUDGETS = {
    "tiny": Budget(train_samples=16, eval_samples=16, epochs=1, max_length=32, batch_size=8, rewarmup_steps=1,
                   lr_grid={"rosa": (5e-4, 1.5e-3), "lora": (5e-4, 1.5e-3), "full": (3e-5, 1e-4)}),
    "default": Budget(train_samples=1280, eval_samples=800, epochs=3, max_length=128, batch_size=8, rewarmup_steps=20,
                      lr_grid={"rosa": ADAPTER_LRS, "lora": ADAPTER_LRS, "full": (3e-5, 1e-4)}),
    "long": Budget(train_samples=1280, eval_samples=800, epochs=10, max_length=128, batch_size=8, rewarmup_steps=20,
                   lr_grid={"rosa": (1e-3, 2e-3), "lora": (1e-3, 2e-3), "full": (3e-5, 1e-4)}),
}
TIMING_STEPS = {"tiny": 2, "default": 20, "long": 20}  # steps per method of the ROSA vs LoRA step-time comparison
TIMING_TOKENS = 64  # tokens per example of its batch
DEFAULT_SEEDS = 3


def task_settings(task: str, budget: Budget, args: argparse.Namespace, seed: int) -> glue.GlueSettings:
    """The ``rosa glue`` settings of one run; the seed also draws the train and dev subsets."""
    return glue.GlueSettings(
        task=task, data_dir=str(args.data_dir), model=args.model, rank=args.rank, epochs=budget.epochs,
        batch_size=budget.batch_size, max_length=budget.max_length,
        rewarmup_steps=rewarmup_steps(budget.rewarmup_steps, args.rewarmup_steps),
        seed=seed, max_train_samples=budget.train_samples, max_eval_samples=budget.eval_samples,
        singular_values=args.singular_values, resample_every=args.resample_every, selection=args.selection,
    )


def seed_data(task: str, budget: Budget, args: argparse.Namespace, seed: int) -> tuple[glue.GlueSettings, glue.GlueData, Any]:
    """The settings, tokenized train and dev data, and tokenizer of one task's runs on ``seed``."""
    settings = task_settings(task, budget, args, seed)
    tokenizer = glue.load_tokenizer(settings.model)
    return settings, glue.load_data(settings, tokenizer), tokenizer


def rewarmup_steps(budget_steps: int, option: Optional[int]) -> int:
    """ROSA's LR re-warmup steps after each resample: ``--rewarmup-steps`` (``option``) if given, else the budget's."""
    return budget_steps if option is None else option


def train(method: str, lr: float, settings: glue.GlueSettings, data: glue.GlueData, tokenizer,
          args: argparse.Namespace) -> dict[str, Any]:
    """One run's result, with a progress line. It waits in ``OUT/runs/TASK/`` until its task is in the report;
    with ``--resume`` a run saved there with the same settings is reused."""
    path = args.out / "runs" / settings.task / f"{method}-lr{lr:g}-seed{settings.seed}.json"
    settings = replace(settings, methods=[method])
    run_settings = json.loads(json.dumps({**asdict(settings), "lr": lr}))
    saved = {}
    with contextlib.suppress(OSError, ValueError):  # a missing or unreadable run is trained again
        saved = json.loads(path.read_text()) if args.resume else {}
    if saved.get("settings") == run_settings:
        result, how = saved["result"], f"reused from {path}"
    else:
        result = glue.train_method(method, lr, settings, data, tokenizer).result
        write_json(path, {"settings": run_settings, "result": result})
        how = f"{result['wall_seconds']:.0f} s, {1000 * result['step_seconds_median']:.0f} ms/step"
    print(f"{settings.task:6s} {method:5s} lr={lr:<7g} seed={settings.seed} score={result['final_score']:.4f} "
          f"({how})", flush=True)
    return result


def record_tasks(results: Iterator[tuple[str, dict[str, Any]]], report: dict[str, Any], start: float, out: Path,
                 write: Callable[[dict[str, Any], Path], str]) -> None:
    """Put each finished ``(task, result)`` into ``report["tasks"]`` (in task-list order), ``write`` the report,
    then delete the task's saved runs."""
    for task, result in results:
        report["tasks"][task] = result
        report["tasks"] = {t: report["tasks"][t] for t in report["task_list"] if t in report["tasks"]}
        report["total_seconds"] = time.perf_counter() - start
        write(report, out)
        shutil.rmtree(out / "runs" / task, ignore_errors=True)
        with contextlib.suppress(OSError):  # not empty: other tasks' runs are still waiting
            (out / "runs").rmdir()


def finish(report: dict[str, Any], start: float, out: Path, write: Callable[[dict[str, Any], Path], str]) -> dict[str, Any]:
    """Mark ``report`` complete, ``write`` it and print the markdown; returns it."""
    report["complete"] = True
    report["total_seconds"] = time.perf_counter() - start
    print(write(report, out))
    return report


def best(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The run of ``runs`` (LR -> result) with the best final dev score (the first such)."""
    return max(runs.values(), key=lambda r: r["final_score"])


def run_grid(task: str, budget: Budget, args: argparse.Namespace, methods: list[str]) -> dict[str, Any]:
    """Each of ``methods`` at every grid LR on one task (seed ``args.seed``), each choosing its best run."""
    settings, data, tokenizer = seed_data(task, budget, args, args.seed)
    runs = {m: {f"{lr:g}": train(m, lr, settings, data, tokenizer, args) for lr in budget.lr_grid[m]}
            for m in methods}
    return {"data": data.sizes, "chosen": {m: best(r) for m, r in runs.items()}, "runs": runs}


def widened(grid: list[str], chosen: str) -> list[str]:
    """``grid`` (``"%g"`` LRs) in ascending order, with one LR added past its end when ``chosen`` is its
    smallest or largest: as many times past that end as the end is past its neighbour, to 2 significant
    digits (more where 2 would not reach past the end): 1e-3, 2e-3 chosen at 2e-3 adds 4e-3."""
    lrs = sorted(grid, key=float)
    if len(lrs) < 2 or chosen not in (lrs[0], lrs[-1]):
        return lrs
    top = chosen == lrs[-1]
    end, neighbour = (float(lrs[-1]), float(lrs[-2])) if top else (float(lrs[0]), float(lrs[1]))
    exact = end * (end / neighbour)
    rounded = (f"{float(f'{exact:.{digits}g}'):g}" for digits in range(2, 7))
    added = next((lr for lr in rounded if (float(lr) > end if top else float(lr) < end)), repr(exact))
    return [*lrs, added] if top else [added, *lrs]


def check_reproduction(result: dict[str, Any], settings: glue.GlueSettings, data: glue.GlueData, tokenizer,
                       args: argparse.Namespace) -> dict[str, Any]:
    """:func:`check_rerun` of the chosen ROSA run of ``result`` (one task of an earlier report) on its first seed."""
    lr = result["chosen"]["rosa"]["lr"]
    return check_rerun("rosa", lr, result["runs"]["rosa"][f"{lr:g}"]["final_score"], settings, data, tokenizer, args)


def check_rerun(method: str, lr: float, expected: float, settings: glue.GlueSettings, data: glue.GlueData,
                tokenizer, args: argparse.Namespace) -> dict[str, Any]:
    """Retrain one earlier run that scored ``expected``; ``RuntimeError`` unless it scores the same (within
    :data:`REPRODUCE_TOLERANCE`), so that the earlier report's runs can stand beside new ones."""
    got = train(method, lr, settings, data, tokenizer, args)["final_score"]
    if abs(got - expected) > REPRODUCE_TOLERANCE:
        raise RuntimeError(f"{settings.task}: the earlier report's {method} run (lr {lr:g}, seed {settings.seed}) "
                           f"scored {expected}, a rerun here {got}; its runs cannot be reused. Run with its torch "
                           "build, OMP_NUM_THREADS and data, or run afresh.")
    return {"method": method, "lr": f"{lr:g}", "seed": settings.seed, "source_score": expected, "rerun_score": got}


def largest_rerun_difference(tasks: dict[str, Any], key: str = "reproduced") -> float:
    """The largest score difference of the tasks' :func:`check_rerun` reruns stored under ``key`` (0 for none)."""
    return max((abs(r[key]["rerun_score"] - r[key]["source_score"]) for r in tasks.values()), default=0.0)


def widen_grid(task: str, previous: dict[str, Any], budget: Budget, args: argparse.Namespace,
               methods: list[str]) -> dict[str, Any]:
    """``previous`` (this task in the ``--widen`` report, once a rerun of its chosen ROSA run scores the same)
    with one LR past each grid end one of ``methods`` chose (:func:`widened`), trained on seed ``args.seed``;
    a method whose choice moves loses its seed repeats, to be rerun at the new LR."""
    settings, data, tokenizer = seed_data(task, budget, args, args.seed)
    reproduced = check_reproduction(previous, settings, data, tokenizer, args)
    runs, chosen, seeds = dict(previous["runs"]), dict(previous["chosen"]), dict(previous["seeds"])
    added = {}
    for m in methods:
        grid = widened(list(runs[m]), f"{chosen[m]['lr']:g}")
        added[m] = [lr for lr in grid if lr not in runs[m]]
        runs[m] = {lr: runs[m][lr] if lr in runs[m] else train(m, float(lr), settings, data, tokenizer, args)
                   for lr in grid}
        if best(runs[m])["lr"] != chosen[m]["lr"]:
            chosen[m] = best(runs[m])
            seeds.pop(m, None)  # seed_scores then starts again from the new chosen run
    return {**previous, "runs": runs, "chosen": chosen, "seeds": seeds,
            "widened": {m: lrs for m, lrs in added.items() if lrs}, "reproduced": reproduced}


def run_seeds(task: str, result: dict[str, Any], budget: Budget, args: argparse.Namespace,
              methods: list[str]) -> dict[str, list[float]]:
    """Each of ``methods``' final dev scores at its chosen LR on seeds ``args.seed`` to ``args.seed + args.seeds - 1``:
    those ``result`` has, then the missing ones trained."""
    scores = {m: seed_scores(result, m)[:args.seeds] for m in methods}
    for seed in range(args.seed + min(map(len, scores.values())), args.seed + args.seeds):
        settings, data, tokenizer = seed_data(task, budget, args, seed)
        for m in (m for m in methods if len(scores[m]) == seed - args.seed):
            scores[m].append(train(m, result["chosen"][m]["lr"], settings, data, tokenizer, args)["final_score"])
    return scores


def run_task(task: str, done: Optional[dict[str, Any]], budget: Budget, args: argparse.Namespace,
             reused: dict[str, Any], widen: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """One task's grid (unless ``done`` has it; ``widen``'s widened if given) and missing seed repeats; the methods
    of ``reused`` (method -> runs, chosen run and seed scores from ``--baseline``) are not trained, but the first
    one's chosen run must first score here what it scored there."""
    methods = [m for m in METHODS if m not in reused]
    checked = {}
    if reused and not done:
        lender, parts = next(iter(reused.items()))
        checked["baseline_reproduced"] = check_rerun(lender, parts["chosen"]["lr"], parts["chosen"]["final_score"],
                                                     *seed_data(task, budget, args, args.seed), args)
    result = done or (widen_grid(task, widen, budget, args, methods) if widen else run_grid(task, budget, args, methods))
    result.update(checked)
    seeds = run_seeds(task, result, budget, args, methods)
    for m, parts in reused.items():
        result["runs"][m], result["chosen"][m], seeds[m] = parts["runs"], parts["chosen"], parts["seeds"]
    return {**result, "seeds": seeds}


def run_tasks(todo: dict[str, Optional[dict[str, Any]]], budget: Budget, args: argparse.Namespace,
              baseline: dict[str, Any], widen: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(task, result)`` for each task of ``todo`` (task -> its grid result, if done) as it finishes, the
    :func:`reused_by` methods taken from ``baseline``, the grids to widen from ``widen`` (task -> result)."""
    tasks = baseline.get("tasks", {})
    reused = {t: {m: {"runs": tasks[t]["runs"][m], "chosen": tasks[t]["chosen"][m],
                      "seeds": seed_scores(tasks[t], m)[:args.seeds]} for m in reused_by(baseline, args.rank)}
              for t in todo}
    jobs = {t: (t, done, budget, args, reused[t], widen.get(t)) for t, done in todo.items()}
    yield from in_workers(run_task, jobs, args.workers)


def in_workers(function: Callable[..., Any], jobs: dict[str, tuple], workers: int) -> Iterator[tuple[str, Any]]:
    """``(key, function(*jobs[key]))`` for each job as it finishes, ``workers`` at a time in separate processes
    (in this one for a single worker)."""
    if workers == 1:
        yield from ((key, function(*job)) for key, job in jobs.items())
        return
    with worker_pool(workers) as pool:
        futures = {pool.submit(function, *job): key for key, job in jobs.items()}
        for future in as_completed(futures):
            yield futures[future], future.result()


def reused_by(baseline: dict[str, Any], rank: int) -> tuple[str, ...]:
    """The methods a run at ``rank`` takes from a ``--baseline`` report: LoRA and full at the report's rank,
    full alone (it has no rank) at another; none without a report."""
    if not baseline:
        return ()
    return ("lora", "full") if baseline["rank"] == rank else ("full",)


def step_time_ab(budget: Budget, steps: int, args: argparse.Namespace) -> dict[str, Any]:
    """Median optimizer-step seconds of ROSA and LoRA (same targets, rank and head), timed
    alternately on one fixed batch so that load from other jobs hits both alike."""
    torch.manual_seed(args.seed)
    runs = {}
    for method in ("rosa", "lora"):
        model = load_sequence_classifier(args.model, 2)
        model = prepare_model(model, method, args.rank, seed=args.seed, modules_to_save=classifier_head(model),
                              singular_values=args.singular_values, selection=args.selection)
        model = model.to(default_device()).train()
        runs[method] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5))
    shape = (budget.batch_size, TIMING_TOKENS)
    batch = {"input_ids": torch.randint(1000, model.config.vocab_size, shape).to(default_device()),
             "labels": torch.zeros(shape[0], dtype=torch.long, device=default_device())}
    times: dict[str, list[float]] = {m: [] for m in runs}
    for _ in range(steps + 1):  # the first step of each method is a warmup, dropped
        for method, (model, optimizer) in runs.items():
            tick = time.perf_counter()
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times[method].append(time.perf_counter() - tick)
    median = {m: statistics.median(t[1:]) for m, t in times.items()}
    return {"batch_shape": list(shape), "steps": steps, "rosa_seconds": median["rosa"],
            "lora_seconds": median["lora"], "rosa_over_lora": median["rosa"] / median["lora"]}


# -- statistics ---------------------------------------------------------------------------------------
def seed_scores(result: dict[str, Any], method: str) -> list[float]:
    """A task's final dev scores of ``method`` over its seeds (just the chosen grid run before the repeats)."""
    return result.get("seeds", {}).get(method) or [result["chosen"][method]["final_score"]]


def seed_mean(result: dict[str, Any], method: str) -> float:
    return statistics.fmean(seed_scores(result, method))


def averages(tasks: dict[str, Any]) -> dict[str, float]:
    """Per method, the mean over tasks of its seed-mean dev score."""
    return {m: statistics.fmean(seed_mean(r, m) for r in tasks.values()) for m in METHODS}


def difference(a: list[float], b: list[float]) -> list[float]:
    return [x - y for x, y in zip(a, b, strict=True)]


def paired_difference(a: list[float], b: list[float]) -> dict[str, Any]:
    """Mean of ``a[i] - b[i]`` over seeds (x100) and its 95% Student-t interval (``None`` for one seed)."""
    diffs = [100 * d for d in difference(a, b)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"mean": mean, "ci95": None, "seeds": len(diffs)}
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"mean": mean, "ci95": [mean - half, mean + half], "seeds": len(diffs)}


def paired_comparisons(tasks: dict[str, Any], baseline_rosa: Optional[dict[str, list[float]]] = None,
                       baseline_lora: Optional[dict[str, list[float]]] = None) -> dict[str, dict[str, Any]]:
    """ROSA minus LoRA and ROSA minus full, per task and on the task average, paired by seed (a seed fixes every
    method's data subset, head init and data order). With ``baseline_rosa`` (task -> a ``--baseline`` report's
    ROSA seed scores) also ROSA minus that ROSA; with ``baseline_lora`` too (a baseline of another rank) LoRA
    minus that LoRA, and ``gap_change``: ROSA minus LoRA here minus ROSA minus LoRA there."""
    scores = {t: {m: seed_scores(r, m) for m in METHODS} for t, r in tasks.items()}  # task -> series -> [seeds]
    pairs = {"rosa_minus_lora": ("rosa", "lora"), "rosa_minus_full": ("rosa", "full")}  # key -> (minuend, subtrahend)
    for t, s in scores.items():
        n = len(s["rosa"])
        if baseline_rosa:
            s["baseline_rosa"] = baseline_rosa[t][:n]
        if baseline_lora:
            s["baseline_lora"] = baseline_lora[t][:n]
            s["gap"], s["baseline_gap"] = (difference(s[f"{p}rosa"], s[f"{p}lora"]) for p in ("", "baseline_"))
    if baseline_rosa:
        pairs["rosa_minus_baseline_rosa"] = ("rosa", "baseline_rosa")
    if baseline_lora:
        pairs |= {"lora_minus_baseline_lora": ("lora", "baseline_lora"), "gap_change": ("gap", "baseline_gap")}
    seeds = min(len(s["rosa"]) for s in scores.values())
    per_seed_average = {k: [statistics.fmean(s[k][i] for s in scores.values()) for i in range(seeds)]
                        for k in {k for pair in pairs.values() for k in pair}}
    return {name: {**{t: paired_difference(s[a], s[b]) for t, s in scores.items()},
                   "average": paired_difference(per_seed_average[a], per_seed_average[b])}
            for name, (a, b) in pairs.items()}


def target_checks(tasks: dict[str, Any], step_time: dict[str, Any]) -> dict[str, Any]:
    """The table's targets, on seed means: ROSA >= LoRA on 3 of 4 tasks (3/4 of those run) and on average;
    ROSA within 1 point of full fine-tuning on average; ROSA's median step time within 10% of LoRA's."""
    avg = averages(tasks)
    wins = [t for t, r in tasks.items() if seed_mean(r, "rosa") >= seed_mean(r, "lora")]
    return {
        "rosa_ge_lora_tasks": wins,
        "rosa_ge_lora_on_3_of_4_tasks": len(wins) >= 0.75 * len(tasks),
        "rosa_ge_lora_average": avg["rosa"] >= avg["lora"],
        "rosa_minus_full_average_points": 100 * (avg["rosa"] - avg["full"]),
        "rosa_within_1_point_of_full": 100 * (avg["full"] - avg["rosa"]) <= 1.0,
        "rosa_over_lora_step_time": step_time["rosa_over_lora"],
        "rosa_step_time_within_10pct_of_lora": step_time["rosa_over_lora"] <= 1.1,
    }


# -- the report ---------------------------------------------------------------------------------------
PAIRED_NOTE = ("Paired by seed (x100): the mean over seeds of the per-seed difference, with its 95% Student-t "
               "interval; an interval that contains 0 means the seeds cannot tell the two methods apart on that "
               "column.")


def interval(difference: dict[str, Any]) -> str:
    """``"+0.4 [-1.2, +2.0]"``: a paired difference and its 95% interval (just the difference for one seed)."""
    if difference["ci95"] is None:
        return f"{difference['mean']:+.1f}"
    low, high = difference["ci95"]
    return f"{difference['mean']:+.1f} [{low:+.1f}, {high:+.1f}]"


def paired_table(paired: dict[str, dict[str, Any]], names: list[str]) -> str:
    """The markdown table of :func:`paired_comparisons`: one row per difference, one column per task and the average."""
    row_names = {"gap_change": "(rosa - lora) - baseline (rosa - lora)"}
    rows = [{"difference": row_names.get(name) or name.replace("_minus_", " - ").replace("_", " "),
             **{t: interval(d) for t, d in diffs.items()}} for name, diffs in paired.items()]
    return format_table(rows, ["difference", *names, "average"])


def targets_line(targets: dict[str, Any]) -> str:
    """``"Targets: name = value, ..."`` for :func:`target_checks`' result."""
    return "Targets: " + ", ".join(f"{k} = {v:.3f}" if isinstance(v, float) else f"{k} = {v}"
                                   for k, v in targets.items())


def status_line(report: dict[str, Any]) -> str:
    return ("Status: **complete**." if report["complete"] else
            f"Status: **partial**, {len(report['tasks'])} of {len(report['task_list'])} tasks done.")


def markdown(report: dict[str, Any]) -> str:
    """The table as markdown: dev scores (x100) per method and task, averages, budgets and chosen LRs."""
    tasks, budget, machine = report["tasks"], report["budget"], report["machine"]
    names = list(tasks)
    rows, seed0_rows = [], []
    for m in METHODS:
        chosen = [tasks[t]["chosen"][m] for t in names]
        rows.append({"method": m, **{t: mean_and_spread(seed_scores(tasks[t], m)) for t in names},
                     "average": 100 * report["average"][m] if report["average"] else None,
                     "trainable params": chosen[0]["trainable_params"] if chosen else None,
                     "train time (s)": round(sum(c["wall_seconds"] for c in chosen)),
                     "ms/step": 1000 * sum(c["step_seconds_median"] for c in chosen) / max(len(chosen), 1)})
        seed0_rows.append({"method": m, **{t: 100 * c["final_score"] for t, c in zip(names, chosen)}})
    lr_rows = [{"method": m, **{t: f"{tasks[t]['chosen'][m]['lr']:g}" for t in names},
                "grid": grid_cell(budget["lr_grid"][m], {t: r.get("widened", {}).get(m, []) for t, r in tasks.items()})}
               for m in METHODS]
    sizes = [f"{t} {tasks[t]['data']['train_samples']}/{tasks[t]['data']['train_total']} train, "
             f"{tasks[t]['data']['eval_samples']}/{tasks[t]['data']['eval_total']} dev" for t in names]
    metric = {t: "/".join(get_task_spec(t).main_metrics) for t in names}
    lines = [
        f"# GLUE dev scores: ROSA vs LoRA vs full fine-tuning ({report['model']}, rank {report['rank']})",
        "",
        status_line(report),
        f"Run {run_dates(report)} on {machine['platform']}, {machine['cpu_count']} CPUs, "
        f"{machine['torch_threads']} torch threads, torch {machine['torch']}, CUDA: {machine['cuda'] or 'none'}; "
        f"total wall time {report['total_seconds'] / 60:.0f} min. Budget `{report['budget_name']}`.",
        "",
        format_table(rows, ["method", *names, "average", "trainable params", "train time (s)", "ms/step"], ".1f"),
        "",
        "Scores x100 on the dev set: " + ", ".join(f"{t} {metric[t]}" for t in names) + "; mean ± standard "
        f"deviation over {report.get('seeds', 1)} seed(s) at each method's chosen learning rate (each seed also "
        "draws its own train and dev subsets, the same for every method). The learning rate was picked from "
        f"the method's grid by the seed-{report['seed']} dev score (optimistic for every method alike). "
        "Targets use the seed means. Trainable parameters include the classifier head and pooler, trained "
        "fully by ROSA and LoRA. Train time: the chosen seed-0 runs, summed over tasks (dev evaluations "
        "included); ms/step: median optimizer step of each chosen run, averaged over tasks; runs happen "
        "at different times, so the alternating step-time comparison below is the fair one.",
        "",
        f"Same for every method: {seed_range(report['seed'], report.get('seeds', 1))}, "
        f"{budget['epochs']} epochs, batch size "
        f"{budget['batch_size']}, max length {budget['max_length']}, AdamW with linear warmup/decay, "
        f"ROSA resampling {resample_phrase(report)} {rewarmup_phrase(report)}, "
        f"LoRA alpha = rank on the same target layers; ROSA and LoRA also train the classifier head and "
        f"the pooler that feeds it.",
        "**Subsampled** (seeded random subsets, the same for every method; sizes of each seed): "
        + "; ".join(sizes) + "."
        if any(tasks[t]["data"]["subsampled"] for t in names) else "No subsampling: full train and dev sets.",
        f"{report.get('workers', 1)} task(s) trained at a time, each in its own process, on the machine's "
        f"{machine['cpu_count']} cores, so train times are comparable within a task, roughly across tasks.",
        *run_variant_notes(report),
        "",
        "Chosen learning rates, and the seed-0 scores that chose them:",
        "",
        format_table(lr_rows, ["method", *names, "grid"]),
        "",
        format_table(seed0_rows, ["method", *names], ".1f"),
    ]
    if report.get("paired"):
        lines += ["", PAIRED_NOTE, "", paired_table(report["paired"], names)]
    if report.get("step_time"):
        t, chosen = report["step_time"], [r["chosen"]["rosa"] for r in tasks.values()]
        count = sum(len(c["resample_steps"]) for c in chosen)
        lines += ["", f"Step time, ROSA vs LoRA timed alternately on one batch of {t['batch_shape'][0]}x"
                      f"{t['batch_shape'][1]} tokens ({t['steps']} steps each): ROSA {1000 * t['rosa_seconds']:.0f} ms, "
                      f"LoRA {1000 * t['lora_seconds']:.0f} ms (ratio {t['rosa_over_lora']:.3f}); "
                      + (f"each ROSA resample took {sum(c['resample_seconds'] for c in chosen) / count:.2f} s on "
                         "average." if count else "the chosen ROSA runs did not resample.")]
    if report["targets"]:
        lines += ["", targets_line(report["targets"])]
    return "\n".join(lines) + "\n"


def grid_cell(grid: list[float], added: dict[str, list[str]]) -> str:
    """A method's grid, then the LRs ``--widen`` added to it by task (task -> ``"%g"`` LRs):
    ``"0.001, 0.002; CoLA, RTE +0.004"``."""
    tasks_of: dict[str, list[str]] = {}
    for task, lrs in added.items():
        for lr in lrs:
            tasks_of.setdefault(lr, []).append(task)
    return ", ".join(f"{lr:g}" for lr in grid) + "".join(f"; {', '.join(t)} +{lr}" for lr, t in tasks_of.items())


def resample_phrase(report: dict[str, Any]) -> str:
    """How often ROSA resampled: ``"once per epoch"`` or every ``--resample-every`` steps."""
    every = report.get("rosa_resample_every")
    return "once per epoch" if every is None else f"every {every} optimizer steps"


def rewarmup_phrase(report: dict[str, Any]) -> str:
    """ROSA's LR re-warmup after each resample, as the run had it."""
    steps = rewarmup_steps(report["budget"]["rewarmup_steps"], report.get("rosa_rewarmup_steps"))
    return f"with a {steps}-step LR re-warmup after each resample" if steps else "with no LR re-warmup after resamples"


def run_variant_notes(report: dict[str, Any]) -> list[str]:
    """Sentences on a ROSA ablation, on the runs reused from ``--baseline``, on ``--widen`` and on a report cut
    to its first seeds."""
    notes = []
    placement, selection = (report.get(k, VARIANT_DEFAULTS[k]) for k in ("rosa_singular_values", "rosa_selection"))
    if placement != VARIANT_DEFAULTS["rosa_singular_values"]:
        notes.append(f"**ROSA ablation**: `RosaConfig.singular_values = '{placement}'`, all of the chosen singular "
                     f"values on the `{placement}` factor (the library's default, `split`, puts sqrt(s) on each).")
    if selection != VARIANT_DEFAULTS["rosa_selection"]:
        which = (f"{report['rank']} consecutive singular vectors of each layer, from a uniformly drawn start, "
                 "train (as the paper authors' reference code draws them)" if selection == "block" else
                 f"the {selection} {report['rank']} singular vectors of each layer train")
        notes.append(f"**ROSA ablation**: `RosaConfig.selection = '{selection}'`, {which}, at the start and after "
                     "every resample (the paper's `random` draws them uniformly).")
    if report.get("rosa_resample_every") is not None:
        steps = sorted({t["chosen"]["rosa"]["steps"] for t in report["tasks"].values()})
        never = bool(steps) and report["rosa_resample_every"] >= steps[-1]
        notes.append(f"**ROSA ablation**: resampling {resample_phrase(report)} instead of once per epoch (the chosen "
                     f"ROSA runs took {', '.join(map(str, steps))} steps"
                     + (", so they never resampled and merged their factors once, at the end)." if never else ")."))
    if report.get("rosa_rewarmup_steps") is not None:
        notes.append(f"**ROSA ablation**: {rewarmup_phrase(report)} instead of the budget's "
                     f"{report['budget']['rewarmup_steps']} steps (Adam's state for the new factors is still reset).")
    if report.get("baseline"):
        notes.append(baseline_note(report))
    if report.get("widen"):
        added = [f"{m} {t} {lr}" + (" (now chosen)" if lr == f"{r['chosen'][m]['lr']:g}" else "")
                 for m in METHODS for t, r in report["tasks"].items() for lr in r.get("widened", {}).get(m, [])]
        notes.append(
            f"**Grids widened** from `{report['widen']}` (run {report['widen_date']}): wherever a trained method's "
            f"seed-{report['seed']} choice there sat at an end of its grid, one LR past that end (as far past it as "
            f"the end is from its neighbour) was trained on seed {report['seed']} and the choice made again; seed "
            "repeats were rerun where it moved, every other run is reused from that report after each task's rerun "
            f"of its chosen ROSA run (largest score difference {largest_rerun_difference(report['tasks']):.0g}); the "
            f"total wall time is this run's. Added: {', '.join(added) or 'none'}.")
    cut = report.get("first_seeds_of")
    if cut:
        notes.append(f"**The first {report['seeds']} of the {cut['seeds']} seeds** of `{cut['report']}` (rendered by "
                     f"`--report-only --seeds {report['seeds']}`); nothing was trained for it, and the total wall time "
                     "is that whole run's.")
    return notes


def baseline_note(report: dict[str, Any]) -> str:
    """What a ``--baseline`` run reused: LoRA and full, or full alone when the baseline had another rank."""
    other_rank = report.get("baseline_rank", report["rank"]) != report["rank"]
    reused, their, own = (("Full fine-tuning was", "its", "ROSA's and LoRA's") if other_rank else
                          ("LoRA and full fine-tuning were", "their", "ROSA's alone"))
    rank = f", whose ROSA and LoRA had rank {report['baseline_rank']}" if other_rank else ""
    return (f"**{reused} not trained in this run**: {their} runs, chosen learning rates and seed scores are reused "
            f"from `{report['baseline']}` (run {report['baseline_date']}){rank}. A seed fixes every method's subsets, "
            f"head init and data order, so the pairs stay valid; the total wall time is {own}."
            + lent_rows(report["tasks"], other_rank, "that report", held_out=False))


def lent_rows(tasks: dict[str, Any], other_rank: bool, lender: str, held_out: bool) -> str:
    """The sentences after a note on lent runs: each task's rerun of one of ``lender``'s runs (none in reports made
    before lent runs were checked), then what the paired table's baseline rows are."""
    checks = [r.get("baseline_reproduced") for r in tasks.values()]
    rerun = ("" if not checks or None in checks else
             f" Each task first reran {lender}'s chosen {checks[0]['method']} run on seed {checks[0]['seed']} here and "
             f"got the same score (largest difference {largest_rerun_difference(tasks, 'baseline_reproduced'):.0g}).")
    which = "held-out " if held_out else ""
    rows = (f"`baseline rosa` and `baseline lora` in the paired table are {lender}'s"
            + (" held-out ROSA and LoRA" if held_out else "") + ", and `(rosa - lora) - baseline (rosa - lora)` is how "
            "much ROSA's difference from LoRA changed with the rank." if other_rank else
            f"`baseline rosa` in the paired table is {lender}'s {which}ROSA.")
    return f"{rerun} {rows}"


def run_dates(report: dict[str, Any]) -> str:
    """When the run started, and when it was resumed (``--resume``), if it was."""
    first, *resumed = report.get("run_dates") or [report["machine"]["date"]]
    return first + (f" (resumed {', '.join(resumed)})" if resumed else "")


def seed_range(first: int, count: int) -> str:
    """``"seed 0"`` or ``"seeds 0 to 2"``."""
    return f"seed {first}" if count == 1 else f"seeds {first} to {first + count - 1}"


def mean_and_spread(scores: list[float]) -> str:
    """``"mean ± std"`` of dev scores, x100 (the plain score for a single seed)."""
    if len(scores) == 1:
        return f"{100 * scores[0]:.1f}"
    return f"{100 * statistics.fmean(scores):.1f} ± {100 * statistics.stdev(scores):.1f}"


def write_report(report: dict[str, Any], out: Path) -> str:
    """Write ``glue.json`` and ``glue.md`` for the tasks finished so far; returns the markdown."""
    summarize(report, report.get("step_time"))
    return write_files(report, out / "glue", markdown)


def summarize(report: dict[str, Any], step_time: Optional[dict[str, Any]]) -> None:
    """Set ``report``'s averages, paired differences and (given ``step_time``) target checks from its tasks."""
    tasks = report["tasks"]
    report["average"] = averages(tasks) if tasks else {}
    report["paired"] = (paired_comparisons(tasks, report.get("baseline_rosa_seeds"), report.get("baseline_lora_seeds"))
                        if tasks else {})
    report["targets"] = target_checks(tasks, step_time) if tasks and step_time else {}


def write_files(report: dict[str, Any], stem: Path, render: Callable[[dict[str, Any]], str]) -> str:
    """Write ``report`` to ``STEM.json`` and its ``render``-ed markdown to ``STEM.md``; returns the markdown."""
    write_json(stem.with_suffix(".json"), report)
    text = render(report)
    stem.with_suffix(".md").write_text(text)
    return text


# -- the command --------------------------------------------------------------------------------------
def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "glue",
                        help="glue_data/ folder (default: ../shared/data/glue next to the repo)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="default: %(default)s")
    parser.add_argument("--budget", choices=BUDGETS, default="default",
                        help="run size: tiny (seconds; a smoke test), default, long (10 epochs)")
    parser.add_argument("--tiny", action="store_const", dest="budget", const="tiny", help="same as --budget tiny")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), help="subset of %(default)s")
    parser.add_argument("--model", default="minilm", help="default: %(default)s")
    parser.add_argument("--rank", type=int, default=8, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="the first seed, which chooses the LRs (default: 0)")
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"seeds per chosen LR (default: {DEFAULT_SEEDS}); with --report-only, report only the "
                             "first SEEDS of them")
    parser.add_argument("--workers", type=int, default=1,
                        help="tasks trained at once, each in its own process (at most the CPU cores, with "
                             "OMP_NUM_THREADS=1 each; default: 1)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the finished tasks of OUT/glue.json (same settings) and the runs saved in OUT/runs")
    parser.add_argument("--singular-values", choices=SINGULAR_VALUE_PLACEMENTS, default="split",
                        help="ROSA ablation: RosaConfig.singular_values (default: %(default)s)")
    parser.add_argument("--selection", choices=SELECTIONS, default="random",
                        help="ROSA ablation: RosaConfig.selection (default: %(default)s, the paper's)")
    parser.add_argument("--resample-every", type=int, default=None, metavar="STEPS",
                        help="ROSA ablation: optimizer steps between resamples (default: once per epoch)")
    parser.add_argument("--rewarmup-steps", type=int, default=None, metavar="STEPS",
                        help="ROSA ablation: LR re-warmup steps after each resample, 0 for none (default: the budget's)")
    parser.add_argument("--baseline", type=Path,
                        help="train ROSA alone (ROSA and LoRA at another --rank) and reuse the other methods' runs "
                             "from BASELINE/glue.json (same budget, model and seed, at least --seeds seeds)")
    parser.add_argument("--widen", type=Path, metavar="PREVIOUS",
                        help="PREVIOUS/glue.json (same settings) with one LR added past each grid end a trained "
                             "method chose, the choice made again and seeds rerun where it moved")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: rewrite OUT/glue.md and OUT/glue.json's derived fields from "
                             "OUT/glue.json, or from --from's")
    parser.add_argument("--from", dest="source", type=Path,
                        help="with --report-only: read SOURCE/glue.json, e.g. to report its first --seeds seeds")
    args = parser.parse_args(argv)
    if args.seeds is None and not args.report_only:
        args.seeds = DEFAULT_SEEDS
    return args


def settings_of(report: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """``keys`` of a report as JSON gives them back; a report older than a key gets its :data:`VARIANT_DEFAULTS` value."""
    return json.loads(json.dumps({k: report.get(k, VARIANT_DEFAULTS.get(k)) for k in keys}))


def read_report(directory: Path, option: str, report: dict[str, Any], keys: tuple[str, ...], fix: str,
                name: str = "glue.json") -> dict[str, Any]:
    """``directory/name`` for ``option``; ``ValueError`` if it is missing or its ``keys`` differ from ``report``'s."""
    path = directory / name
    if not path.is_file():
        raise ValueError(f"{option}: {path} does not exist; pass the --out folder of a finished run")
    earlier = json.loads(path.read_text())
    mine, theirs = settings_of(report, keys), settings_of(earlier, keys)
    if mine != theirs:
        raise ValueError(f"{option}: {path} was run with {theirs}, this run is {mine}; {fix}")
    return earlier


def load_baseline(directory: Path, report: dict[str, Any]) -> dict[str, Any]:
    """The ``--baseline`` report: this run's settings (but perhaps another rank), every task and enough seeds."""
    path = directory / "glue.json"
    keys = tuple(k for k in SHARED_SETTINGS if k != "rank")
    baseline = read_report(directory, "--baseline", report, keys,
                           "pass the same --budget, --model and --seed, or another baseline")
    tasks = baseline.get("tasks", {})
    missing = [t for t in report["task_list"] if t not in tasks]
    if missing:
        raise ValueError(f"--baseline: {path} has no results for {', '.join(missing)}; leave them out of --tasks")
    fewest = {t: min(len(seed_scores(tasks[t], m)) for m in METHODS) for t in report["task_list"]}
    short = {t: n for t, n in fewest.items() if n < report["seeds"]}
    if short:
        raise ValueError(f"--baseline: {path} has fewer than --seeds {report['seeds']} seeds: "
                         + ", ".join(f"{t} {n}" for t, n in short.items()) + "; lower --seeds")
    return baseline


def load_widen(directory: Path, report: dict[str, Any], out: Path) -> dict[str, Any]:
    """The finished ``--widen`` report: this run's settings and variant (but perhaps another ``--widen``), every
    task and enough seeds, kept apart from ``out``."""
    if directory.resolve() == out.resolve():
        raise ValueError(f"--widen: {directory} is also --out; write the widened report to another folder")
    keys = (*SHARED_SETTINGS, *(k for k in VARIANT_DEFAULTS if k != "widen"))
    previous = read_report(directory, "--widen", report, keys, "pass the options it was run with")
    path = directory / "glue.json"
    if not previous.get("complete") or any(t not in previous.get("tasks", {}) for t in report["task_list"]):
        raise ValueError(f"--widen: {path} is a partial run; finish it (--resume) first")
    if previous["seeds"] < report["seeds"]:
        raise ValueError(f"--widen: {path} has {previous['seeds']} seeds; pass --seeds {previous['seeds']} or fewer")
    return previous


def first_seeds(report: dict[str, Any], count: int, source: Path) -> dict[str, Any]:
    """``report`` (read from ``source``) cut to its first ``count`` seeds, the ``--baseline`` seeds too;
    ``ValueError`` if a task has fewer."""
    have = min(len(seed_scores(r, m)) for r in report["tasks"].values() for m in METHODS)
    if count > have:
        raise ValueError(f"--seeds {count}: {source / 'glue.json'} has {have} seeds of every method and task; "
                         f"pass --seeds {have} or fewer")
    tasks = {t: {**r, "seeds": {m: s[:count] for m, s in r.get("seeds", {}).items()}} for t, r in report["tasks"].items()}
    cut = {**report, "tasks": tasks, "seeds": count, "first_seeds_of": {"report": str(source), "seeds": have}}
    for key in ("baseline_rosa_seeds", "baseline_lora_seeds"):
        if key in report:
            cut[key] = {t: s[:count] for t, s in report[key].items()}
    return cut


def rewrite_report(out: Path, source: Optional[Path] = None, seeds: Optional[int] = None) -> dict[str, Any]:
    """``out/glue.md`` and ``out/glue.json`` rendered again from ``source/glue.json`` (default ``out``'s), or from
    its first ``seeds`` seeds."""
    source = source or out
    path = source / "glue.json"
    if not path.is_file():
        raise SystemExit(f"glue_table: --report-only needs {path}; run the benchmark with --out {source} first")
    report = json.loads(path.read_text())
    if seeds is not None:
        if source.resolve() == out.resolve():
            raise SystemExit(f"glue_table: --report-only --seeds {seeds} would drop seeds from {path}; write the "
                             f"cut report to another folder: --from {source} --out NEW_FOLDER")
        try:
            report = first_seeds(report, seeds, source)
        except ValueError as err:
            raise SystemExit(f"glue_table: {err}") from None
    out.mkdir(parents=True, exist_ok=True)
    print(write_report(report, out))
    return report


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the benchmark; returns the report written to ``glue.json``."""
    args = parse_args(argv)
    for option, least in (("workers", 1), ("seeds", 1), ("resample_every", 1), ("rewarmup_steps", 0)):
        if getattr(args, option) is not None and getattr(args, option) < least:
            raise SystemExit(f"glue_table: --{option.replace('_', '-')} must be at least {least}, "
                             f"got {getattr(args, option)}")
    if args.report_only and args.widen is not None:
        raise SystemExit("glue_table: --widen trains; it does not go with --report-only")
    if args.report_only:
        return rewrite_report(args.out, args.source, args.seeds)
    if args.source is not None:
        raise SystemExit("glue_table: --from only goes with --report-only (it names the report to rewrite)")
    task_list = [get_task_spec(t).name for t in args.tasks]
    name = args.budget
    report: dict[str, Any] = {
        "benchmark": "glue", "budget_name": name, "budget": asdict(BUDGETS[name]), "model": args.model,
        "rank": args.rank, "seed": args.seed, "task_list": task_list, "data_dir": str(args.data_dir),
        "workers": args.workers, "seeds": args.seeds, "rosa_singular_values": args.singular_values,
        "rosa_resample_every": args.resample_every, "rosa_rewarmup_steps": args.rewarmup_steps,
        "rosa_selection": args.selection, "baseline": args.baseline and str(args.baseline),
        "widen": args.widen and str(args.widen),
        "machine": machine_info(), "tasks": {}, "complete": False, "total_seconds": 0.0,
    }
    try:
        previous = (read_report(args.out, "--resume", report, (*SHARED_SETTINGS, *VARIANT_DEFAULTS),
                                "drop --resume or change --out")
                    if args.resume and (args.out / "glue.json").is_file() else {})
        baseline = load_baseline(args.baseline, report) if args.baseline else {}
        widen = load_widen(args.widen, report, args.out) if args.widen else {}
    except ValueError as err:
        raise SystemExit(f"glue_table: {err}") from None
    if previous:  # the first start and every resume, oldest first
        report["run_dates"] = [*previous.get("run_dates", [previous["machine"]["date"]]), report["machine"]["date"]]
    if baseline:
        report["baseline_date"], report["baseline_rank"] = baseline["machine"]["date"], baseline["rank"]
        trained = [m for m in ("rosa", "lora") if m not in reused_by(baseline, args.rank)]
        report |= {f"baseline_{m}_seeds": {t: seed_scores(baseline["tasks"][t], m)[:args.seeds] for t in task_list}
                   for m in trained}
    if widen:
        report["widen_date"] = widen["machine"]["date"]
    # Earlier task results stay in each write until a rerun replaces them: a crash while seeds are added loses no grid.
    report["tasks"] = {t: r for t, r in previous.get("tasks", {}).items() if t in task_list}
    start = time.perf_counter() - previous.get("total_seconds", 0.0)
    todo = {t: report["tasks"].get(t) for t in task_list
            if len(report["tasks"].get(t, {}).get("seeds", {}).get("rosa", [])) != args.seeds}
    record_tasks(run_tasks(todo, BUDGETS[name], args, baseline, widen.get("tasks", {})), report, start, args.out,
                 write_report)
    report["step_time"] = step_time_ab(BUDGETS[name], TIMING_STEPS[name], args)
    return finish(report, start, args.out, write_report)


if __name__ == "__main__":
    main()
