"""E2E NLG table: ROSA vs PEFT LoRA vs full fine-tuning of SmolLM2-135M-Instruct, rank 8.

The data is the E2E dev set (the official train set is not available offline), split by meaning
representation: no MR is both trained on and evaluated. Every method gets the same seed, data
order, optimizer steps, batch size, max length and greedy decoding; learning rates are the
``rosa e2e`` defaults (not tuned on the held-out MRs). Writes ``e2e.json``, ``e2e.md`` (the README
table), ``e2e.samples.md`` (generations next to the references) and ``e2e.loss.png`` into
``--out`` (default ``benchmarks/results``). The run in progress lives in ``OUT/e2e-run`` with a
checkpoint of each method at every resample; after a crash ``--resume`` continues it from there.

Budgets: ``--tiny`` runs in seconds on a tiny random Llama (CI smoke test; the numbers mean
nothing). The default was sized by timing SmolLM2 on this project's 2-core CPU machine shared
with three other jobs, one torch thread: ~11-14 s per optimizer step of batch 8 at ~80 tokens
(ROSA or LoRA; full fine-tuning somewhat more), ~10 s to load and factorize the model, ~1.7 s per
held-out MR for greedy generation of up to 48 tokens (ROSA generates twice: unmerged and merged).
60 steps x 3 methods + 60 MRs x 4 generations comes to about 45 minutes at that load; the run in
``benchmarks/results/e2e.md`` took 33 minutes next to a two-worker GLUE run (~9-13 s per step,
~9-13 min per method).
With 2 threads on the busy machine steps were 2-10x slower (thread oversubscription): use
``OMP_NUM_THREADS=1`` on a shared machine, the default threads on an idle one.

    OMP_NUM_THREADS=1 python benchmarks/e2e_table.py         # default budget, 30-45 min on 2 busy CPU cores
    python benchmarks/e2e_table.py --tiny --out /tmp/e2e-smoke
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from rosa.cli import main as rosa_main
from rosa.experiments import e2e
from rosa.experiments.reporting import format_table, write_json

REPO = Path(__file__).resolve().parents[1]
MODEL_NAMES = {"smollm2": "SmolLM2-135M-Instruct", None: "a tiny random Llama"}
WORK = "e2e-run"  # OUT/e2e-run: the run in progress (checkpoints at every resample); deleted when it finishes


@dataclass(frozen=True)
class Budget:
    """What every method gets. ``model=None`` builds a tiny random Llama over the data's words."""

    model: Optional[str]
    steps: int
    batch_size: int
    max_length: int
    resample_every: int
    eval_mrs: int
    max_new_tokens: int
    gen_batch_size: int
    eval_fraction: float = 0.2
    rank: int = 8


BUDGETS = {
    "tiny": Budget(model=None, steps=4, batch_size=4, max_length=96, resample_every=2, eval_mrs=4,
                   max_new_tokens=6, gen_batch_size=4),
    "default": Budget(model="smollm2", steps=60, batch_size=8, max_length=96, resample_every=20, eval_mrs=60,
                      max_new_tokens=48, gen_batch_size=12),
}


def rosa_e2e_argv(budget: Budget, model: str, data: Path, seed: int, out: Path) -> list[str]:
    """The ``rosa e2e`` command line that runs ``budget``, checkpointing at every resample."""
    return ["e2e", "--model", model, "--data", str(data), "--eval-fraction", str(budget.eval_fraction),
            "--rank", str(budget.rank), "--max-steps", str(budget.steps), "--batch-size", str(budget.batch_size),
            "--max-length", str(budget.max_length), "--resample-every", str(budget.resample_every),
            "--max-eval-mrs", str(budget.eval_mrs), "--max-new-tokens", str(budget.max_new_tokens),
            "--gen-batch-size", str(budget.gen_batch_size), "--seed", str(seed), "--out", str(out),
            "--checkpoint-every", str(budget.resample_every)]


def target_checks(result: dict[str, Any]) -> dict[str, bool]:
    """The checks this table reports: ROSA >= LoRA on BLEU and ROUGE-L; merged ROSA generations byte-identical."""
    rosa, lora = result["methods"]["rosa"], result["methods"]["lora"]
    return {
        "rosa_ge_lora_bleu": rosa["metrics"]["bleu"] >= lora["metrics"]["bleu"],
        "rosa_ge_lora_rouge_l": rosa["metrics"]["rouge_l"] >= lora["metrics"]["rouge_l"],
        "rosa_merged_generations_identical": rosa["merge_check"]["identical"],
    }


def decoding(num_beams: int) -> str:
    """How the generations were decoded, in words."""
    return "greedy" if num_beams == 1 else f"beam search with {num_beams} beams"


def markdown(report: dict[str, Any]) -> str:
    """The README section: the table, the budget, what the metrics are and whether the targets hold."""
    result, budget, machine = report["result"], report["budget"], report["machine"]
    settings, sizes = result["settings"], result["data"]
    lrs = ", ".join(f"{m} {settings['lr'][m]:g}" for m in settings["methods"])
    targets = report["targets"]
    yes = {True: "met", False: "**not met**"}
    lines = [
        f"# E2E NLG: ROSA vs LoRA vs full fine-tuning ({MODEL_NAMES.get(budget['model'], budget['model'])}, "
        f"rank {budget['rank']})",
        "",
        f"Run {machine['date']} on {machine['platform']}, {machine['cpu_count']} CPUs, "
        f"{machine['torch_threads']} torch threads, torch {machine['torch']}, CUDA: {machine['cuda'] or 'none'}; "
        f"total wall time {report['total_seconds'] / 60:.0f} min"
        + (" (resumed after an interruption: the time since the resume)" if report.get("resumed") else "")
        + f". Budget `{report['budget_name']}`."
        + (" Smoke test on a random model: the numbers mean nothing." if budget["model"] is None else ""),
        "",
        format_table(e2e.summary_rows(result), e2e.TABLE_COLUMNS, ".4g"),
        "",
        f"Same for every method: seed {settings['seed']}, {budget['steps']} optimizer steps of batch "
        f"{budget['batch_size']} ({budget['steps'] * budget['batch_size']} of {sizes['train_examples']} "
        f"(mr, ref) training pairs), max length {budget['max_length']} tokens (prompt + target; "
        f"{sizes['train_targets_truncated']} targets cut), AdamW with linear warmup then decay, learning rates "
        f"{lrs} (the `rosa e2e` defaults, not tuned), ROSA resampling every {budget['resample_every']} steps, "
        "LoRA (PEFT, alpha = rank) on exactly ROSA's target layers.",
        f"Data: `{Path(settings['data']).name}` split by MR ({sizes['train_mrs']} train MRs, "
        f"{sizes['eval_mrs_total']} held out, MRs in both: {sizes['mrs_in_both']}); scored on {sizes['eval_mrs']} "
        f"held-out MRs against all {sizes['eval_refs']} of their references.",
        f"Decoding: {decoding(settings['num_beams'])}, "
        f"at most {budget['max_new_tokens']} new tokens, the first line of the continuation.",
        "",
        "BLEU, METEOR and ROUGE-L are percentages, NIST and CIDEr raw (see `rosa.experiments.nlg_metrics`); "
        "METEOR has no WordNet synonyms, so it is not comparable with published E2E METEOR. Train tokens/s: "
        "non-padding tokens (prompt and target) per second of training, resampling included. Peak memory: "
        f"{next(iter(result['methods'].values()))['peak_memory']['kind']}, per method (training and generation). "
        "Seconds: load, training and generation of one method. The machine's cores were shared with other "
        "jobs, so times are noisy.",
        "",
        e2e.merge_check_line(result),
        "",
        "Targets: ROSA >= LoRA on BLEU: " + yes[targets["rosa_ge_lora_bleu"]]
        + "; ROSA >= LoRA on ROUGE-L: " + yes[targets["rosa_ge_lora_rouge_l"]]
        + "; merged ROSA generations byte-identical to unmerged: " + yes[targets["rosa_merged_generations_identical"]]
        + ".",
        "",
        "Sample generations next to their references: [e2e.samples.md](e2e.samples.md). Training loss:",
        "",
        "![E2E training loss](e2e.loss.png)",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "e2e" / "dev.csv",
                        help="E2E CSV split by MR (default: ../shared/data/e2e/dev.csv next to the repo)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke budget on a tiny random model (CI)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true",
                        help=f"continue the interrupted run in OUT/{WORK}: finished methods are not trained "
                             "again, an unfinished one continues from its last checkpoint")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the benchmark; returns the report written to ``e2e.json``."""
    args = parse_args(argv)
    name = "tiny" if args.tiny else "default"
    budget = BUDGETS[name]
    if not args.data.is_file():
        raise SystemExit(f"e2e_table: {args.data} not found; pass --data path/to/e2e/dev.csv")
    work = args.out / WORK
    if work.exists() and not args.resume:
        raise SystemExit(f"e2e_table: {work} holds an interrupted run; pass --resume to continue it, "
                         "or delete it to start over")
    resumed = args.resume and work.exists()
    start = time.perf_counter()
    model = budget.model or str(e2e.write_tiny_e2e_model(work / "tiny-llama", args.data))  # seeded: the same model again
    run_dir = work / "run"
    rosa_main([*rosa_e2e_argv(budget, model, args.data, args.seed, run_dir), *(["--resume"] if resumed else [])])
    result = json.loads((run_dir / "result.json").read_text())
    shutil.copyfile(run_dir / "samples.md", args.out / "e2e.samples.md")
    shutil.copyfile(run_dir / "loss.png", args.out / "e2e.loss.png")
    report = {
        "benchmark": "e2e", "budget_name": name, "budget": asdict(budget), "machine": result["machine"],
        "total_seconds": time.perf_counter() - start, "resumed": resumed, "targets": target_checks(result),
        "result": result,
    }
    write_json(args.out / "e2e.json", report)
    (args.out / "e2e.md").write_text(markdown(report))
    shutil.rmtree(work)
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
