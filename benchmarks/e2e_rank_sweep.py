"""E2E rank sweep: ROSA vs PEFT LoRA at ranks 1, 4 and 16 with seeds, full fine-tuning as the reference.

The question: on E2E generation, where full fine-tuning of SmolLM2-135M-Instruct is clearly ahead
of rank-8 LoRA, does ROSA keep its quality as the rank shrinks while LoRA loses it? ROSA's merged
update is a sum of one update per subspace, so its rank is not capped at R; LoRA's is.

The protocol, fixed before the run and reported whatever it shows:

- Model, data, prompt, training recipe and metrics as ``benchmarks/e2e_table.py``: SmolLM2-135M-
  Instruct; the shared E2E dev set split by meaning representation (MR) with seed 0 into 438
  training MRs and 109 test MRs (e2e_table's split; it scores 60 of them, this sweep all 109 with
  all 927 references); AdamW without weight decay, linear warmup then decay, clipping at 1, loss
  on the target tokens, greedy decoding of at most 48 new tokens, the first line kept; BLEU, NIST,
  METEOR, ROUGE-L and CIDEr (``rosa.experiments.nlg_metrics``).
- Learning rates are chosen on a validation split: 10% of the training MRs (44 MRs, seeded) are
  held out from training. Every run trains on the other 394 MRs' (mr, ref) pairs.
- Methods: ROSA and LoRA (PEFT, alpha = rank) at ranks 1, 4 and 16 on the same target layers
  (ROSA's default targets: the attention projections q, k, v, o of all 30 layers), and full
  fine-tuning.
- Budget, the same for every run: 60 optimizer steps of batch 8 (480 of the 3,374 training pairs),
  max length 96 tokens. ROSA resamples every 20 steps: three subspaces, no LR re-warmup (the
  ``rosa e2e`` recipe).
- LR grid on seed 0: 1e-3 and 3e-3 for each adapter and rank, 1e-4 and 3e-4 for full fine-tuning.
  Each (method, rank) takes the LR with the higher BLEU on the 44 validation MRs (the smaller LR on
  a tie); that seed-0 run is its seed 0, and the chosen LR runs on seeds 1 and 2 (a new data order,
  LoRA initialisation and ROSA subspace draw; the split stays). 14 grid runs + 14 = 28 runs.
- Every run is scored on all 109 test MRs. Reported per method and rank: the five metrics' mean
  and standard deviation over the 3 seeds; ROSA minus LoRA per rank, paired by seed, with a 95%
  Student-t interval (2 degrees of freedom: wide; an interval containing 0 means three seeds
  cannot tell); trainable parameters; the update's rank per adapted layer, averaged over layers:
  numerical rank (singular values of W - W0 above 1e-3 of the largest, in float64; the float32
  merge leaves a floor near 1e-5), 90%-energy rank and stable rank. LoRA's update has rank at most
  R; each ROSA subspace adds one of rank at most 2R (both factors train), so at most 6R. A plot of test BLEU and ROUGE-L
  against rank (log scale), full fine-tuning as a horizontal line.

Budget arithmetic (measured on this project's 2-core CPU machine, shared, one torch thread): an
optimizer step of batch 8 at ~550 tokens took 5.5-14 s (ROSA, LoRA; full fine-tuning 8.5-13 s);
greedy generation 0.9 s per MR alone (batch 12, 48 new tokens; e2e_table measured 1.7 s next to
another job). Per run on SmolLM2 under load: under 15 s for the update ranks (120 float64 SVDs), ~5 s
to load, ~7 s per ROSA resample at rank 16, ~3 s per adapter checkpoint and ~18 s per full
fine-tuning checkpoint (1.6 GB with Adam's state; three per run). At pessimistic rates, 12 s per
adapter step, 15 s per full step, 1.7 s per generated MR and a minute of loading, ranks, resamples
and checkpoints per run on average: training 24 x 60 x 12 s + 4 x 60 x 15 s = 348 min;
generation 28 x 109 x 1.7 s + 14 x 44 x 1.7 s (validation, seed 0 only) = 104 min; overhead 28 min;
480 worker-minutes, about 4 hours with two workers (about 2.5 hours at the faster rates). So the
steps stay at 60, the fewest the protocol allows, and every test MR is scored.

Outputs in ``--out`` (default ``benchmarks/results/e2e-rank-sweep``): ``per-run/KEY.json`` for each
finished run (settings, loss curve, scores, update ranks, test generations), and
``e2e-rank-sweep.json``, ``.md`` and ``.png``, rewritten after every run. A run in progress keeps a
checkpoint in ``in-progress/KEY`` at every resample; ``--resume`` skips the finished runs and
continues the others from their checkpoints. Progress: one line per run started and finished, with
"run k of N" and an ETA, and (unless ``ROSA_NO_PROGRESS=1``) each run's step and generation bars.

    OMP_NUM_THREADS=1 python benchmarks/e2e_rank_sweep.py --workers 2            # ~4 h on 2 busy cores
    OMP_NUM_THREADS=1 python benchmarks/e2e_rank_sweep.py --workers 2 --resume   # after a crash
    python benchmarks/e2e_rank_sweep.py --report-only                            # markdown and plot from the JSON
    python benchmarks/e2e_rank_sweep.py --tiny --out /tmp/e2e-sweep-smoke        # seconds, random model
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from scipy import stats

import rosa
from rosa.experiments import e2e
from rosa.experiments.e2e_data import MRGroup, group_by_mr, read_e2e_csv, split_by_mr
from rosa.experiments.methods import count_trainable, finalize_model, prepare_model
from rosa.experiments.models import load_causal_lm, load_tokenizer
from rosa.experiments.nlg_metrics import compute_nlg_metrics
from rosa.experiments.reporting import format_table, machine_info, new_figure, save_figure, write_json
from rosa.experiments.update_geometry import NUMERICAL_RTOL, layer_weights, update_ranks
from rosa.experiments.workers import worker_pool

REPO = Path(__file__).resolve().parents[1]
STEM = "e2e-rank-sweep"  # OUT/STEM.json, .md, .png
FINISHED = "per-run"  # OUT/per-run/KEY.json: every finished run
WORK = "in-progress"  # OUT/in-progress/KEY: checkpoints of runs in progress; the tiny model
MODEL_NAMES = {"smollm2": "SmolLM2-135M-Instruct", None: "a tiny random Llama"}
TEST_FRACTION = 0.2  # of the dev set's MRs, scored (e2e_table's split)
VALIDATION_FRACTION = 0.1  # of the other MRs, held out from training to choose the LR
SPLIT_SEED = 0  # the same split for every run and seed
LR_GRID = {"rosa": (1e-3, 3e-3), "lora": (1e-3, 3e-3), "full": (1e-4, 3e-4)}
CHOICE_METRIC = "bleu"  # on the validation MRs, seed 0
METRICS = {"bleu": ("BLEU", ".1f"), "nist": ("NIST", ".2f"), "meteor": ("METEOR", ".1f"),
           "rouge_l": ("ROUGE-L", ".1f"), "cider": ("CIDEr", ".2f")}  # key -> (column, format)


@dataclass(frozen=True)
class Budget:
    """What every run gets (``model=None``: a tiny random Llama over the data's words), and the sweep's
    ranks and seeds. ``train_pairs``, ``test_mrs``, ``validation_mrs``: seeded subsets; None takes all."""

    model: Optional[str]
    ranks: tuple[int, ...]
    seeds: int
    steps: int
    batch_size: int
    max_length: int
    resample_every: int
    max_new_tokens: int
    gen_batch_size: int
    train_pairs: Optional[int]
    test_mrs: Optional[int]
    validation_mrs: Optional[int]


BUDGETS = {
    "tiny": Budget(model=None, ranks=(1, 2, 4), seeds=2, steps=6, batch_size=4, max_length=96, resample_every=2,
                   max_new_tokens=6, gen_batch_size=4, train_pairs=64, test_mrs=4, validation_mrs=4),
    "default": Budget(model="smollm2", ranks=(1, 4, 16), seeds=3, steps=60, batch_size=8, max_length=96,
                      resample_every=20, max_new_tokens=48, gen_batch_size=12, train_pairs=None, test_mrs=None,
                      validation_mrs=None),
}
SWEEP_FIELDS = ("ranks", "seeds")  # budget fields that shape the sweep, not one run


@dataclass(frozen=True)
class RunSpec:
    """One training run. ``rank`` is None for full fine-tuning."""

    method: str
    rank: Optional[int]
    lr: float
    seed: int

    @property
    def key(self) -> str:
        rank = "" if self.rank is None else f"-r{self.rank}"
        return f"{self.method}{rank}-lr{self.lr:g}-seed{self.seed}"


# -- data and one run ------------------------------------------------------------------------------
def split(data: Path, budget: Budget) -> dict[str, list[MRGroup]]:
    """The MR groups to train on, to choose the LR on and to score, the same for every run."""
    rest, test = split_by_mr(group_by_mr(read_e2e_csv(data)), TEST_FRACTION, SPLIT_SEED)
    train, validation = split_by_mr(rest, VALIDATION_FRACTION, SPLIT_SEED)
    return {"train": train, "validation": e2e.seeded_subset(validation, budget.validation_mrs, SPLIT_SEED),
            "test": e2e.seeded_subset(test, budget.test_mrs, SPLIT_SEED)}


def run_settings(spec: RunSpec, budget: Budget, model: str, data: Path) -> e2e.E2ESettings:
    """The ``rosa e2e`` settings of one run (checkpointing at every resample)."""
    return e2e.E2ESettings(
        model=model, data=str(data), eval_fraction=TEST_FRACTION, methods=[spec.method], rank=spec.rank,
        lr={spec.method: spec.lr}, max_steps=budget.steps, batch_size=budget.batch_size,
        max_length=budget.max_length, resample_every=budget.resample_every, seed=spec.seed,
        max_train_examples=budget.train_pairs, max_new_tokens=budget.max_new_tokens,
        gen_batch_size=budget.gen_batch_size, checkpoint_every=budget.resample_every)


def fingerprint(spec: RunSpec, budget: Budget, model: str, data: Path) -> dict[str, Any]:
    """What fixes a run's result; a saved run is reused only by a sweep with the same fingerprint."""
    per_run = {k: v for k, v in asdict(budget).items() if k not in SWEEP_FIELDS}
    return json.loads(json.dumps({"spec": asdict(spec), "budget": per_run, "model": model, "data": str(data)}))


def run_file(out: Path, spec: RunSpec) -> Path:
    return out / FINISHED / f"{spec.key}.json"


def run_one(spec: RunSpec, budget: Budget, model: str, data: Path, out: Path, resume: bool) -> dict[str, Any]:
    """Train one run (continuing its checkpoint with ``resume``), merge it, measure its update's rank and
    score it (seed 0 on the validation and test MRs, other seeds on the test MRs); saves and returns it."""
    start = time.perf_counter()
    groups, tokenizer = split(data, budget), load_tokenizer(model)
    s = run_settings(spec, budget, model, data)
    prepared = e2e.build_data(s, (groups["train"], groups["test"]), tokenizer)
    checkpoints, settings = out / WORK / spec.key, e2e.training_settings(s, spec.method, prepared)
    e2e.check_resumable(checkpoints, settings, resume)
    torch.manual_seed(spec.seed)  # LoRA's initialisation
    base = load_causal_lm(model)
    targets = [name for name, _ in rosa.targets.find_targets(base, rosa.RosaConfig(rank=1))]  # the default targets
    pretrained = layer_weights(base, targets)
    trained = prepare_model(base, spec.method, spec.rank, seed=spec.seed)
    trainable = count_trainable(trained)
    result = e2e.train(trained, spec.method, spec.lr, e2e.training_loader(prepared, tokenizer, s), s, checkpoints,
                       settings, desc=spec.key)
    merged = finalize_model(trained, spec.method)
    result |= {"trainable_params": trainable, "update_rank": update_ranks(pretrained, layer_weights(merged, targets)),
               "scores": {}, "generations": {}}
    for part in ("validation", "test") if spec.seed == 0 else ("test",):
        prompts = [e2e.encode_prompt(tokenizer, g.mr) for g in groups[part]]
        texts = [e2e.clean_generation(t) for t in e2e.generate(merged, tokenizer, prompts, s, f"{spec.key} {part}")]
        result["scores"][part] = compute_nlg_metrics(texts, [g.refs for g in groups[part]])
        result["generations"][part] = texts
    result |= {"wall_seconds": time.perf_counter() - start, "machine": machine_info()}
    write_json(run_file(out, spec), {"settings": fingerprint(spec, budget, model, data), "result": result})
    shutil.rmtree(checkpoints, ignore_errors=True)
    return result


def saved_run(out: Path, spec: RunSpec, settings: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The saved result of ``spec`` if it was made with ``settings``, else None (it is then trained)."""
    try:
        saved = json.loads(run_file(out, spec).read_text())
    except (OSError, ValueError):
        return None
    return saved["result"] if saved.get("settings") == settings else None


# -- the sweep ------------------------------------------------------------------------------------
def adapter_groups(ranks: tuple[int, ...]) -> list[tuple[str, Optional[int]]]:
    """Every (method, rank) the sweep trains: ROSA and LoRA at each rank, then full fine-tuning."""
    return [(m, r) for r in ranks for m in ("rosa", "lora")] + [("full", None)]


def grid_runs(ranks: tuple[int, ...]) -> list[RunSpec]:
    return [RunSpec(m, r, lr, 0) for m, r in adapter_groups(ranks) for lr in LR_GRID[m]]


def chosen_lr(runs: dict[str, dict[str, Any]], method: str, rank: Optional[int]) -> Optional[float]:
    """The grid LR whose seed-0 run has the best validation BLEU (the first on a tie); None until all ran."""
    scores = [runs.get(RunSpec(method, rank, lr, 0).key) for lr in LR_GRID[method]]
    if any(r is None for r in scores):
        return None
    best = max(range(len(scores)), key=lambda i: (scores[i]["result"]["scores"]["validation"][CHOICE_METRIC], -i))
    return LR_GRID[method][best]


def seed_runs(runs: dict[str, dict[str, Any]], method: str, rank: Optional[int], seeds: int) -> list[RunSpec]:
    """The chosen LR's runs on seeds 1 to ``seeds`` - 1 (none before the grid is done)."""
    lr = chosen_lr(runs, method, rank)
    return [] if lr is None else [RunSpec(method, rank, lr, seed) for seed in range(1, seeds)]


def execute(first: list[RunSpec], job: Callable[[RunSpec], tuple], reuse: Callable[[RunSpec], Optional[dict]],
            done: Callable[[RunSpec, dict, bool], list[RunSpec]], workers: int) -> None:
    """Run ``first`` and the follow-ups ``done(spec, result, reused)`` returns (ahead of the rest), each as
    ``run_one(*job(spec))`` unless ``reuse(spec)`` has its result, ``workers`` at a time in spawned processes."""
    pending = deque(first)

    def settle(spec: RunSpec, result: dict, reused: bool) -> None:
        pending.extendleft(reversed(done(spec, result, reused)))

    if workers == 1:
        while pending:
            spec = pending.popleft()
            saved = reuse(spec)
            settle(spec, saved or run_one(*job(spec)), saved is not None)
        return
    with worker_pool(workers) as pool:
        running: dict[Any, RunSpec] = {}
        while pending or running:
            while pending and len(running) < workers:
                spec = pending.popleft()
                saved = reuse(spec)
                if saved is not None:
                    settle(spec, saved, True)
                else:
                    running[pool.submit(run_one, *job(spec))] = spec
            if running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    settle(running.pop(future), future.result(), False)


def sweep(report: dict[str, Any], budget: Budget, model: str, args: argparse.Namespace) -> None:
    """Run every run of the protocol into ``report["runs"]``, writing the report after each."""
    runs, ranks, total = report["runs"], tuple(report["ranks"]), report["planned_runs"]
    start, trained = time.perf_counter(), []

    def job(spec: RunSpec) -> tuple:
        print(f"[{STEM}] started {spec.key}", flush=True)
        return spec, budget, model, args.data, args.out, args.resume

    def reuse(spec: RunSpec) -> Optional[dict]:
        return saved_run(args.out, spec, fingerprint(spec, budget, model, args.data)) if args.resume else None

    def done(spec: RunSpec, result: dict, reused: bool) -> list[RunSpec]:
        runs[spec.key] = {"spec": asdict(spec), "result": {k: v for k, v in result.items() if k != "generations"}}
        if not reused:
            trained.append(spec.key)
        elapsed = time.perf_counter() - start
        eta = elapsed / len(trained) * (total - len(runs)) if trained else math.nan
        scores = ", ".join(f"{part} BLEU {m['bleu']:.1f}" for part, m in result["scores"].items())
        print(f"[{STEM}] run {len(runs)} of {total} {'reused' if reused else 'done'}: {spec.key} ({scores}; "
              f"{result['wall_seconds'] / 60:.1f} min); ETA {eta / 3600:.1f} h", flush=True)
        report["total_seconds"] = report.get("seconds_before", 0.0) + elapsed
        write_report(report, args.out)
        return seed_runs(runs, spec.method, spec.rank, budget.seeds) if spec.seed == 0 else []

    execute(grid_runs(ranks), job, reuse, done, args.workers)


# -- summary ----------------------------------------------------------------------------------------
def label(method: str, rank: Optional[int]) -> str:
    return method if rank is None else f"{method} r{rank}"


def mean_interval(values: list[float]) -> dict[str, Any]:
    """Mean, standard deviation and 95% Student-t interval of ``values`` (no spread for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "std": None, "ci95": None, "n": len(values)}
    std = statistics.stdev(values)
    half = stats.t.ppf(0.975, len(values) - 1) * std / math.sqrt(len(values))
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "n": len(values)}


def group_runs(runs: dict[str, dict[str, Any]], method: str, rank: Optional[int]) -> dict[int, dict[str, Any]]:
    """Seed -> result of the chosen LR's runs of (method, rank)."""
    lr = chosen_lr(runs, method, rank)
    found = [r for r in runs.values() if r["spec"]["method"] == method and r["spec"]["rank"] == rank
             and lr is not None and r["spec"]["lr"] == lr]
    return {r["spec"]["seed"]: r["result"] for r in sorted(found, key=lambda r: r["spec"]["seed"])}


def summarize(runs: dict[str, dict[str, Any]], ranks: tuple[int, ...]) -> dict[str, Any]:
    """Per (method, rank): chosen LR, test metrics over seeds, parameters and update ranks; per rank:
    ROSA minus LoRA paired by seed."""
    methods = {}
    for method, rank in adapter_groups(ranks):
        chosen = group_runs(runs, method, rank)
        if not chosen:
            continue
        results = list(chosen.values())
        methods[label(method, rank)] = {
            "method": method, "rank": rank, "lr": chosen_lr(runs, method, rank), "seeds": list(chosen),
            "metrics": {k: mean_interval([r["scores"]["test"][k] for r in results]) for k in METRICS},
            "trainable_params": results[0]["trainable_params"],
            "update_rank": {k: statistics.fmean(r["update_rank"][k] for r in results)
                            for k in results[0]["update_rank"]},
        }
    paired = {}
    for rank in ranks:
        a, b = group_runs(runs, "rosa", rank), group_runs(runs, "lora", rank)
        seeds = sorted(a.keys() & b.keys())
        if seeds:
            paired[str(rank)] = {k: mean_interval([a[s]["scores"]["test"][k] - b[s]["scores"]["test"][k]
                                                   for s in seeds]) for k in METRICS}
    return {"methods": methods, "rosa_minus_lora": paired}


# -- report -----------------------------------------------------------------------------------------
def spread(summary: dict[str, Any], fmt: str) -> str:
    """``"mean ± std"`` (the plain value for one seed)."""
    if summary["std"] is None:
        return format(summary["mean"], fmt)
    return f"{summary['mean']:{fmt}} ± {summary['std']:{fmt}}"


def interval(summary: dict[str, Any], fmt: str) -> str:
    """``"+1.2 [-0.3, +2.7]"`` (the plain difference for one seed)."""
    if summary["ci95"] is None:
        return format(summary["mean"], "+" + fmt)
    low, high = summary["ci95"]
    return f"{summary['mean']:+{fmt}} [{low:+{fmt}}, {high:+{fmt}}]"


def score_table(summary: dict[str, Any]) -> str:
    rows = [{"method": name, "LR": f"{m['lr']:g}", "seeds": len(m["seeds"]),
             **{col: spread(m["metrics"][k], fmt) for k, (col, fmt) in METRICS.items()},
             "trainable params": m["trainable_params"],
             "update rank": f"{m['update_rank']['numerical_rank_mean']:.1f}",
             "90% energy rank": f"{m['update_rank']['energy_rank_mean']:.1f}",
             "stable rank": f"{m['update_rank']['stable_rank_mean']:.2f}"} for name, m in summary["methods"].items()]
    columns = ["method", "LR", "seeds", *(col for col, _ in METRICS.values()), "trainable params", "update rank",
               "90% energy rank", "stable rank"]
    return format_table(rows, columns)


def paired_table(summary: dict[str, Any]) -> str:
    rows = [{"rank": rank, "seeds": next(iter(d.values()))["n"],
             **{col: interval(d[k], fmt) for k, (col, fmt) in METRICS.items()}}
            for rank, d in summary["rosa_minus_lora"].items()]
    return format_table(rows, ["rank", "seeds", *(col for col, _ in METRICS.values())])


def grid_table(runs: dict[str, dict[str, Any]], ranks: tuple[int, ...]) -> str:
    rows = []
    for method, rank in adapter_groups(ranks):
        chosen = chosen_lr(runs, method, rank)
        for lr in LR_GRID[method]:
            run = runs.get(RunSpec(method, rank, lr, 0).key)
            if run is not None:
                scores = run["result"]["scores"]
                rows.append({"method": label(method, rank), "LR": f"{lr:g}",
                             "validation BLEU": f"{scores['validation']['bleu']:.1f}",
                             "test BLEU": f"{scores['test']['bleu']:.1f}", "chosen": "yes" if lr == chosen else ""})
    return format_table(rows, ["method", "LR", "validation BLEU", "test BLEU", "chosen"])


def later_seeds(seeds: int) -> str:
    """The seeds after seed 0, in words."""
    return {1: "no other seed", 2: "seed 1"}.get(seeds, f"seeds 1 to {seeds - 1}")


def markdown(report: dict[str, Any]) -> str:
    """The report: protocol in brief, test scores, paired differences, the LR grid and the plot."""
    budget, sizes, machine, summary = report["budget"], report["data"], report["machine"], report["summary"]
    ranks = tuple(report["ranks"])
    finished = len(report["runs"])
    status = ("" if finished == report["planned_runs"]
              else f" **Incomplete: {finished} of {report['planned_runs']} runs finished.**")
    dates = sorted(r["result"]["machine"]["date"] for r in report["runs"].values())
    lines = [
        f"# E2E rank sweep: ROSA vs LoRA at ranks {', '.join(map(str, ranks))} "
        f"({MODEL_NAMES.get(budget['model'], budget['model'])})",
        "",
        f"Runs {dates[0] if dates else '-'} to {dates[-1] if dates else '-'} on {machine['platform']}, "
        f"{machine['cpu_count']} CPUs, {report['workers']} workers of {machine['torch_threads']} torch thread(s), "
        f"torch {machine['torch']}, transformers {machine.get('transformers')}, peft {machine.get('peft')}, "
        f"CUDA: {machine['cuda'] or 'none'}; wall time {report.get('total_seconds', 0.0) / 60:.0f} min. "
        f"Budget `{report['budget_name']}`.{status}"
        + (" Smoke test on a random model: the numbers mean nothing." if budget["model"] is None else ""),
        "",
        f"Every run: {budget['steps']} optimizer steps of batch {budget['batch_size']}, max length "
        f"{budget['max_length']}, ROSA resampling every {budget['resample_every']} steps "
        f"({math.ceil(budget['steps'] / budget['resample_every'])} subspaces), greedy decoding of at most "
        f"{budget['max_new_tokens']} new tokens. Data: `{Path(report['data_file']).name}` split by MR: "
        f"{sizes['train_mrs']} training MRs ({sizes['train_pairs']} (mr, ref) pairs"
        + (f", a seeded {budget['train_pairs']} of them per run" if budget["train_pairs"] else "")
        + f"), {sizes['validation_mrs']} "
        f"validation MRs (LR choice, seed 0), {sizes['test_mrs']} test MRs with {sizes['test_refs']} references "
        f"(every score below); MRs shared by two parts: {sizes['mrs_shared']}. LR grids: "
        + "; ".join(f"{m} {', '.join(f'{lr:g}' for lr in grid)}" for m, grid in LR_GRID.items())
        + f"; chosen by validation BLEU on seed 0, then run on {later_seeds(report['seeds'])}.",
        "",
        "## Test scores (mean ± standard deviation over seeds)",
        "",
        score_table(summary),
        "",
        "BLEU, METEOR and ROUGE-L are percentages, NIST and CIDEr raw (`rosa.experiments.nlg_metrics`; METEOR "
        "without WordNet synonyms). Update rank: per adapted layer, the number of singular values of W - W0 "
        f"above {NUMERICAL_RTOL:g} of the largest, averaged over the layers and seeds; 90% energy rank: the "
        "fewest directions holding 90% of ||W - W0||_F^2; stable rank ||W - W0||_F^2 / ||W - W0||_2^2.",
        "",
        "## ROSA - LoRA, paired by seed",
        "",
        paired_table(summary) if summary["rosa_minus_lora"] else "(no rank has both methods yet)",
        "",
        "The mean over seeds of ROSA's score minus LoRA's at the same rank and seed, in each metric's units, with "
        "its 95% Student-t interval; an interval that contains 0 means the seeds cannot tell the two apart.",
        "",
        "## Learning-rate choice (seed 0)",
        "",
        grid_table(report["runs"], ranks),
        "",
        f"![BLEU and ROUGE-L against rank]({STEM}.png)",
        "",
        f"Each run's settings, loss curve, scores, update ranks and test generations: `{FINISHED}/`.",
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> Path:
    """Test BLEU and ROUGE-L against rank (log scale; mean ± std over seeds), full fine-tuning as a line."""
    fig, axes = new_figure(2)
    methods = report["summary"]["methods"]
    for ax, key in zip(axes, ("bleu", "rouge_l")):
        for method in ("rosa", "lora"):
            points = [m for m in methods.values() if m["method"] == method]
            if points:
                ax.errorbar([m["rank"] for m in points], [m["metrics"][key]["mean"] for m in points],
                            yerr=[m["metrics"][key]["std"] or 0.0 for m in points], marker="o", capsize=3,
                            label=method)
        full = methods.get("full")
        if full is not None:
            mean, std = full["metrics"][key]["mean"], full["metrics"][key]["std"] or 0.0
            ax.axhline(mean, color="black", linestyle="--", label="full fine-tuning")
            ax.axhspan(mean - std, mean + std, color="black", alpha=0.1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(report["ranks"], [str(r) for r in report["ranks"]])
        ax.set(xlabel="rank", ylabel=f"test {METRICS[key][0]}", title=f"E2E test {METRICS[key][0]} (mean ± std)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    return save_figure(fig, path)


def write_report(report: dict[str, Any], out: Path) -> str:
    """Summarize ``report``'s runs and write STEM.json, .md and .png; returns the markdown."""
    report["summary"] = summarize(report["runs"], tuple(report["ranks"]))
    write_json(out / f"{STEM}.json", report)
    text = markdown(report)
    (out / f"{STEM}.md").write_text(text)
    plot(report, out / f"{STEM}.png")
    return text


def data_sizes(groups: dict[str, list[MRGroup]]) -> dict[str, int]:
    mrs = {part: {g.mr for g in parts} for part, parts in groups.items()}
    return {"train_mrs": len(groups["train"]), "train_pairs": sum(len(g.refs) for g in groups["train"]),
            "validation_mrs": len(groups["validation"]), "test_mrs": len(groups["test"]),
            "test_refs": sum(len(g.refs) for g in groups["test"]),
            "mrs_shared": len(mrs["train"] & mrs["validation"]) + len((mrs["train"] | mrs["validation"]) & mrs["test"])}


# -- command line -----------------------------------------------------------------------------------
def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "e2e" / "dev.csv",
                        help="E2E CSV split by MR (default: ../shared/data/e2e/dev.csv next to the repo)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / STEM)
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke budget on a tiny random model (CI)")
    parser.add_argument("--ranks", type=positive, nargs="+", help="adapter ranks (default: the budget's, 1 4 16)")
    parser.add_argument("--seeds", type=positive, help="seeds per (method, rank), seed 0 choosing the LR "
                        "(default: the budget's, 3)")
    parser.add_argument("--workers", type=positive, default=1, help="runs in parallel processes (default: 1)")
    parser.add_argument("--resume", action="store_true", help=f"reuse the finished runs in OUT/{FINISHED} and "
                        f"continue the interrupted ones from their checkpoints in OUT/{WORK}")
    parser.add_argument("--report-only", action="store_true",
                        help=f"rewrite {STEM}.md and .png from OUT/{STEM}.json; trains nothing")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run (or with ``--report-only`` re-render) the sweep; returns the report written to STEM.json."""
    args = parse_args(argv)
    if args.report_only:
        if not (args.out / f"{STEM}.json").is_file():
            raise SystemExit(f"{STEM}: no {STEM}.json in {args.out} to report; pass the sweep's --out")
        report = json.loads((args.out / f"{STEM}.json").read_text())
        print(write_report(report, args.out))
        return report
    name = "tiny" if args.tiny else "default"
    budget = BUDGETS[name]
    budget = Budget(**{**asdict(budget), "ranks": tuple(args.ranks or budget.ranks),
                       "seeds": args.seeds or budget.seeds})
    if not args.data.is_file():
        raise SystemExit(f"{STEM}: {args.data} not found; pass --data path/to/e2e/dev.csv")
    args.data = args.data.resolve()  # runs are matched by their settings, the data file's path among them
    if (args.out / FINISHED).exists() and not args.resume:
        raise SystemExit(f"{STEM}: {args.out} holds runs of an earlier sweep; pass --resume to continue it, "
                         "or choose another --out")
    saved_report = args.out / f"{STEM}.json"
    previous = json.loads(saved_report.read_text()) if args.resume and saved_report.is_file() else {}
    model = budget.model or str(e2e.write_tiny_e2e_model(args.out / WORK / "tiny-llama", args.data))
    groups = adapter_groups(budget.ranks)
    report = {
        "benchmark": STEM, "budget_name": name, "budget": asdict(budget), "ranks": list(budget.ranks),
        "seeds": budget.seeds, "workers": args.workers, "data_file": str(args.data),
        "data": data_sizes(split(args.data, budget)), "lr_grid": LR_GRID, "choice": f"validation {CHOICE_METRIC}",
        "planned_runs": len(grid_runs(budget.ranks)) + len(groups) * (budget.seeds - 1),
        "seconds_before": previous.get("total_seconds", 0.0), "machine": machine_info(), "runs": {},
    }
    sweep(report, budget, model, args)
    shutil.rmtree(args.out / WORK, ignore_errors=True)
    text = write_report(report, args.out)
    print(text)
    return report


if __name__ == "__main__":
    main()
