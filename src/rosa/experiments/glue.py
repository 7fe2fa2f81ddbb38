"""``rosa glue``: fine-tune a sequence classifier (or STS-B regressor) on a GLUE task.

ROSA, PEFT LoRA (same targets and rank) and full fine-tuning run side by side with the same
seed, data order, head initialisation, budget and max length; a plain PyTorch loop (AdamW,
linear warmup then decay, gradient clipping) keeps runs fast and deterministic.

After every epoch each method checkpoints to ``OUT/checkpoints/METHOD`` (model, optimizer, LR
scheduler, ROSA resample schedule, RNG and data-order state, results so far); ``--resume``
continues from there and reproduces the uninterrupted run.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

import rosa
from rosa.checkpoint import CheckpointError, checkpoint_extra, is_checkpoint
from rosa.subspace import SELECTIONS, SINGULAR_VALUE_PLACEMENTS

from .glue_data import GlueSplit, TaskSpec, compute_glue_metrics, get_task_spec, load_glue_hub, main_score, read_glue_split
from .methods import METHODS, classifier_head, count_trainable, finalize_model, prepare_model
from .models import load_sequence_classifier, load_tokenizer
from .reporting import (
    default_device,
    format_table,
    machine_info,
    new_figure,
    peak_memory_mb,
    progress,
    reset_peak_memory,
    save_figure,
    write_json,
)
from .training import add_methods_option, add_rewarmup_option, adamw, optimizer_step, warmup_then_decay

DEFAULT_LR = {"rosa": 1e-3, "lora": 1e-3, "full": 5e-5}
CHECKPOINTS = "checkpoints"  # OUT/checkpoints/METHOD
# GlueSettings fields a checkpoint must share with the run resuming it (the method's lr is added).
RESUME_SETTINGS = ("task", "model", "rank", "seed", "epochs", "batch_size", "max_length", "resample_every",
                   "rewarmup_steps", "selection", "singular_values", "max_train_samples", "max_eval_samples")
NO_DATA = ("no GLUE data given: pass --data-dir path/to/glue_data (the download_glue_data.py layout, "
           "e.g. ../shared/data/glue), or --hub to download the nyu-mll/glue dataset")


@dataclass
class GlueSettings:
    """Every knob of one ``rosa glue`` run. ``lr`` maps method -> learning rate."""

    task: str = "RTE"
    data_dir: Optional[str] = None
    hub: bool = False
    model: str = "minilm"
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    rank: int = 8
    lr: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LR))
    epochs: int = 3
    batch_size: int = 16
    max_length: int = 128
    resample_every: Optional[int] = None  # optimizer steps; None = once per epoch
    rewarmup_steps: int = 0  # after each ROSA resample, the LR ramps back up over this many steps
    seed: int = 0
    selection: str = "random"
    singular_values: str = "split"  # ROSA's: which factor carries the singular values (RosaConfig.singular_values)
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None


@dataclass
class GlueData:
    """Tokenized train and dev examples of one task, after any subsampling."""

    spec: TaskSpec
    train: list[dict[str, Any]]
    dev: list[dict[str, Any]]
    sizes: dict[str, Any]


@dataclass
class TrainState:
    """What one method's training has produced so far; a checkpoint stores it after every epoch."""

    epochs: list[dict[str, Any]] = field(default_factory=list)  # per-epoch train loss and dev metrics
    losses: list[float] = field(default_factory=list)  # per optimizer step
    step_times: list[float] = field(default_factory=list)
    resample_seconds: float = 0.0
    wall_seconds: float = 0.0


@dataclass
class MethodRun:
    """What training one method produced: the JSON-ready result and the merged, plain model."""

    result: dict[str, Any]
    model: nn.Module


# -- data ---------------------------------------------------------------------------------------
def read_split(s: GlueSettings, split: str) -> GlueSplit:
    """A split from ``s.data_dir`` (or the hub with ``s.hub``); errors say how to point at the data."""
    if s.data_dir is not None:
        return read_glue_split(s.data_dir, s.task, split)
    if s.hub:
        return load_glue_hub(s.task, split)
    raise ValueError(NO_DATA)


def subsample(split: GlueSplit, limit: Optional[int], seed: int) -> GlueSplit:
    """A seeded random subset of ``limit`` examples (in file order), or ``split`` itself."""
    if limit is None or limit >= len(split):
        return split
    keep = sorted(random.Random(seed).sample(range(len(split)), limit))
    return GlueSplit(
        texts_a=[split.texts_a[i] for i in keep],
        texts_b=None if split.texts_b is None else [split.texts_b[i] for i in keep],
        labels=[split.labels[i] for i in keep],
    )


def tokenize(split: GlueSplit, tokenizer, max_length: int) -> list[dict[str, Any]]:
    """One dict per example: unpadded ``input_ids`` (and friends) plus ``labels``."""
    encoded = tokenizer(split.texts_a, split.texts_b, truncation=True, max_length=max_length)
    keys = list(encoded.keys())
    return [{**{k: encoded[k][i] for k in keys}, "labels": split.labels[i]} for i in range(len(split))]


def read_data(s: GlueSettings) -> tuple[GlueSplit, GlueSplit, dict[str, Any]]:
    """The train and dev splits of ``s.task``, read and subsampled (seeded), with their sizes."""
    train_full, dev_full = read_split(s, "train"), read_split(s, "dev")
    train = subsample(train_full, s.max_train_samples, s.seed)
    dev = subsample(dev_full, s.max_eval_samples, s.seed)
    sizes = {"train_samples": len(train), "train_total": len(train_full),
             "eval_samples": len(dev), "eval_total": len(dev_full),
             "subsampled": len(train) < len(train_full) or len(dev) < len(dev_full)}
    return train, dev, sizes


def load_data(s: GlueSettings, tokenizer, splits: Optional[tuple[GlueSplit, GlueSplit, dict[str, Any]]] = None) -> GlueData:
    """The tokenized train and dev examples of ``s.task``; ``splits`` from :func:`read_data`, else read now."""
    train, dev, sizes = read_data(s) if splits is None else splits
    return GlueData(get_task_spec(s.task), tokenize(train, tokenizer, s.max_length),
                    tokenize(dev, tokenizer, s.max_length), sizes)


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Batches of indices of similar-length examples, so dynamic padding wastes little compute.

    Training (a ``generator`` given): each epoch shuffles, sorts windows of ``WINDOW_BATCHES``
    batches by length, cuts batches and shuffles their order. Evaluation: sorted by length.
    """

    WINDOW_BATCHES = 50

    def __init__(self, lengths: list[int], batch_size: int, generator: Optional[torch.Generator] = None) -> None:
        self.lengths, self.batch_size, self.generator = lengths, batch_size, generator

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        by_length = self.lengths.__getitem__
        if self.generator is None:
            order = sorted(range(len(self.lengths)), key=by_length)
        else:
            order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
            window = self.WINDOW_BATCHES * self.batch_size
            order = [i for w in range(0, len(order), window) for i in sorted(order[w:w + window], key=by_length)]
        chunks = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.generator is not None:
            chunks = [chunks[i] for i in torch.randperm(len(chunks), generator=self.generator).tolist()]
        return iter(chunks)


def batches(examples: list[dict[str, Any]], tokenizer, batch_size: int, regression: bool,
            generator: Optional[torch.Generator] = None) -> torch.utils.data.DataLoader:
    """Dynamically padded, length-grouped batches; shuffled when a ``generator`` is given."""
    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        labels = torch.tensor([r["labels"] for r in rows], dtype=torch.float32 if regression else torch.long)
        padded = tokenizer.pad([{k: v for k, v in r.items() if k != "labels"} for r in rows], return_tensors="pt")
        return {**padded, "labels": labels}

    sampler = LengthGroupedBatches([len(e["input_ids"]) for e in examples], batch_size, generator)
    return torch.utils.data.DataLoader(examples, batch_sampler=sampler, collate_fn=collate)


# -- checkpoints --------------------------------------------------------------------------------
def checkpoint_dir(out_dir: str | Path, method: str) -> Path:
    """Where ``rosa glue`` checkpoints ``method``: ``OUT/checkpoints/METHOD``."""
    return Path(out_dir) / CHECKPOINTS / method


def resume_settings(s: GlueSettings, lr: float) -> dict[str, Any]:
    """The settings a checkpoint must match to be resumed by a run with ``s`` and ``lr``."""
    return {**{name: getattr(s, name) for name in RESUME_SETTINGS}, "lr": lr}


def check_resumable(directory: Path, expected: dict[str, Any]) -> None:
    """Raise ``CheckpointError`` naming every setting in which the checkpoint differs from ``expected``."""
    saved = checkpoint_extra(directory).get("settings", {})
    differences = [f"{name} {saved.get(name)!r} (checkpoint) vs {value!r} (now)"
                   for name, value in expected.items() if saved.get(name) != value]
    if differences:
        raise CheckpointError(f"cannot resume from {str(directory)!r}: it was saved with other settings: "
                              + ", ".join(differences) + "; rerun with its options, or without --resume to start over")


def save_training(directory: Path, settings: dict[str, Any], state: TrainState, generator: torch.Generator,
                  model: nn.Module, optimizer, scheduler, schedule) -> None:
    """Checkpoint training after an epoch: model, optimizer, schedules, RNG and data order, results so far."""
    extra = {"settings": settings, "state": asdict(state), "data_generator": generator.get_state()}
    rosa.save_checkpoint(directory, model, optimizer, scheduler, schedule, extra=extra)


def load_training(directory: Path, settings: dict[str, Any], generator: torch.Generator,
                  model: nn.Module, optimizer, scheduler, schedule) -> TrainState:
    """Restore a :func:`save_training` checkpoint (settings checked first); returns the training state it holds."""
    check_resumable(directory, settings)
    extra = rosa.load_checkpoint(directory, model, optimizer, scheduler, schedule)
    generator.set_state(extra["data_generator"])
    return TrainState(**extra["state"])


# -- training -----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, loader, spec: TaskSpec) -> dict[str, float]:
    """The task's GLUE metrics on ``loader``, plus ``score`` (the task's main score)."""
    model.eval()
    predictions, labels = [], []
    for batch in loader:
        batch = {k: v.to(default_device()) for k, v in batch.items()}
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        predictions += logits.squeeze(-1).tolist() if spec.is_regression else logits.argmax(-1).tolist()
        labels += batch["labels"].tolist()
    metrics = compute_glue_metrics(spec.name, predictions, labels)
    return {**metrics, "score": main_score(spec.name, metrics)}


def train_method(method: str, lr: float, s: GlueSettings, data: GlueData, tokenizer,
                 save_dir: Optional[Path] = None, checkpoints: Optional[Path] = None,
                 resume: bool = False, observe: Optional[Callable[[nn.Module, int], None]] = None) -> MethodRun:
    """Train one method on ``data``; dev metrics after every epoch; returns the result and merged model.

    With ``checkpoints``, a checkpoint is written there after every epoch; with ``resume`` too, an
    existing one is loaded and only the epochs it lacks are trained. ``observe(model, epoch)`` sees the
    model being trained before the first epoch (0) and after each epoch trained here (after ROSA's
    resample at its end, if any).
    """
    spec = data.spec
    torch.manual_seed(s.seed)  # same head init, LoRA init, dropout and data order for every method
    since_reset = reset_peak_memory()
    model = load_sequence_classifier(s.model, spec.num_labels)
    model = prepare_model(model, method, s.rank, selection=s.selection, seed=s.seed,
                          modules_to_save=classifier_head(model), singular_values=s.singular_values).to(default_device())
    trainable = count_trainable(model)
    generator = torch.Generator().manual_seed(s.seed)
    train_loader = batches(data.train, tokenizer, s.batch_size, spec.is_regression, generator)
    dev_loader = batches(data.dev, tokenizer, 2 * s.batch_size, spec.is_regression)
    total_steps = s.epochs * len(train_loader)
    optimizer = adamw(model, lr)
    schedule = rosa.ResampleSchedule(every_steps=s.resample_every or len(train_loader)) if method == "rosa" else None
    scheduler = warmup_then_decay(optimizer, total_steps, schedule, s.rewarmup_steps)

    settings = resume_settings(s, lr)
    state = TrainState()
    if resume and checkpoints is not None and is_checkpoint(checkpoints):
        state = load_training(checkpoints, settings, generator, model, optimizer, scheduler, schedule)
    if observe is not None and not state.epochs:
        observe(model, 0)
    for epoch in range(len(state.epochs) + 1, s.epochs + 1):
        start = time.perf_counter()
        model.train()
        epoch_losses = []
        for batch in progress(train_loader, desc=f"{spec.name} {method} epoch {epoch}/{s.epochs}"):
            step = optimizer_step(model, batch, optimizer, scheduler, schedule,
                                  resample=len(state.step_times) + 1 < total_steps)
            state.step_times.append(step.seconds)
            state.resample_seconds += step.resample_seconds
            epoch_losses.append(step.loss)
        state.losses += epoch_losses
        state.epochs.append({"epoch": epoch, "train_loss": sum(epoch_losses) / len(epoch_losses),
                             "dev": evaluate(model, dev_loader, spec)})
        state.wall_seconds += time.perf_counter() - start
        if checkpoints is not None:
            save_training(checkpoints, settings, state, generator, model, optimizer, scheduler, schedule)
        if observe is not None:
            observe(model, epoch)

    model = finalize_model(model, method).eval()
    if save_dir is not None:
        model.save_pretrained(save_dir)
        tokenizer.save_pretrained(save_dir)
    result = {
        "lr": lr,
        "trainable_params": trainable,
        "epochs": state.epochs,
        "final_dev": state.epochs[-1]["dev"],
        "final_score": state.epochs[-1]["dev"]["score"],
        "train_loss_curve": state.losses,
        "resample_steps": [] if schedule is None else list(schedule.resample_points),
        "steps": total_steps,
        "wall_seconds": state.wall_seconds,
        "step_seconds_median": sorted(state.step_times)[len(state.step_times) // 2],
        "resample_seconds": state.resample_seconds,
        "peak_memory": peak_memory_mb(since_reset),  # of this process only, when resumed
        "saved_to": None if save_dir is None else str(save_dir),
    }
    return MethodRun(result, model)


def run(s: GlueSettings, data: GlueData, tokenizer, out_dir: str | Path, save: bool = False,
        resume: bool = False, keep_checkpoints: bool = False) -> dict[str, Any]:
    """Train every method of ``s`` on ``data``; write ``result.json`` and ``glue.png`` into ``out_dir``.

    Each method checkpoints into ``OUT/checkpoints/METHOD`` after every epoch; ``resume`` continues
    from those (all are checked against ``s`` before any training). The checkpoints are deleted once
    the run has succeeded unless ``keep_checkpoints``.
    """
    out_dir = Path(out_dir)
    checkpoints = {m: checkpoint_dir(out_dir, m) for m in s.methods}
    if resume:
        for m, directory in checkpoints.items():
            if is_checkpoint(directory):
                check_resumable(directory, resume_settings(s, s.lr[m]))
    methods = {
        m: train_method(m, s.lr[m], s, data, tokenizer, out_dir / f"model-{m}" if save else None,
                        checkpoints[m], resume).result
        for m in s.methods
    }
    result = {
        "experiment": "glue",
        "task": data.spec.name,
        "settings": asdict(s),
        "data": data.sizes,
        "methods": methods,
        "machine": machine_info(),
    }
    write_json(out_dir / "result.json", result)
    plot(result, out_dir / "glue.png")
    if not keep_checkpoints:
        for directory in checkpoints.values():
            shutil.rmtree(directory, ignore_errors=True)
        with contextlib.suppress(OSError):  # only if no other method's checkpoint is left
            (out_dir / CHECKPOINTS).rmdir()
    return result


# -- reporting ----------------------------------------------------------------------------------
def summary_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One table row per method: dev metrics of the last epoch, budget and time."""
    rows = []
    for name, r in result["methods"].items():
        rows.append({"method": name, "lr": r["lr"], "trainable params": r["trainable_params"], **r["final_dev"],
                     "resamples": len(r["resample_steps"]), "seconds": r["wall_seconds"],
                     "ms/step": 1000 * r["step_seconds_median"]})
    return rows


def table_columns(result: dict[str, Any]) -> list[str]:
    """Columns of :func:`summary_rows` for this task's metrics."""
    metrics = list(get_task_spec(result["task"]).metrics)
    return ["method", "lr", "trainable params", *metrics, "score", "resamples", "seconds", "ms/step"]


def plot(result: dict[str, Any], path: Path) -> Path:
    """Mean train loss and dev score per epoch, one line per method."""
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_score) = new_figure(2)
    for name, r in result["methods"].items():
        epochs = [e["epoch"] for e in r["epochs"]]
        ax_loss.plot(epochs, [e["train_loss"] for e in r["epochs"]], "o-", label=name)
        ax_score.plot(epochs, [e["dev"]["score"] for e in r["epochs"]], "o-", label=name)
    task = result["task"]
    for ax in (ax_loss, ax_score):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.set(xlabel="epoch", ylabel="mean train loss", title=f"{task}: train loss")
    ax_score.set(xlabel="epoch", ylabel="dev score", title=f"{task}: dev {'/'.join(get_task_spec(task).main_metrics)}")
    ax_loss.legend()
    ax_score.legend()
    return save_figure(fig, path)


# -- command line -------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options of ``rosa glue``."""
    d = GlueSettings()
    parser.add_argument("--task", required=True, help="GLUE task: CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI or RTE")
    parser.add_argument("--data-dir", help="glue_data/ folder (download_glue_data.py layout), e.g. ../shared/data/glue "
                        "(default: none; give it or --hub)")
    parser.add_argument("--hub", action="store_true", help="load the task from the nyu-mll/glue hub dataset (network)")
    parser.add_argument("--model", default=d.model, help="local folder, hub id, or 'minilm' (default: %(default)s)")
    add_methods_option(parser, METHODS, d.methods)
    parser.add_argument("--rank", type=int, default=d.rank, help="ROSA/LoRA rank (default: %(default)s)")
    parser.add_argument("--lr", type=float, help="learning rate for every method (default: "
                        + ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items()) + ")")
    parser.add_argument("--epochs", type=int, default=d.epochs, help="training epochs per method (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per optimizer step (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=d.max_length, help="tokens per example after truncation (default: %(default)s)")
    parser.add_argument("--resample-every", type=int, help="optimizer steps between ROSA resamples (default: once per epoch)")
    add_rewarmup_option(parser)
    parser.add_argument("--seed", type=int, default=d.seed, help="random seed for data order, init and subsets (default: %(default)s)")
    parser.add_argument("--selection", choices=SELECTIONS, default=d.selection,
                        help="which singular vectors ROSA trains (default: %(default)s)")
    parser.add_argument("--singular-values", choices=SINGULAR_VALUE_PLACEMENTS, default=d.singular_values,
                        help="which ROSA factor carries the singular values: split (sqrt on each), down or up; "
                             "see RosaConfig.singular_values (default: %(default)s)")
    parser.add_argument("--max-train-samples", type=int, help="train on a seeded random subset of this size (default: the whole train split)")
    parser.add_argument("--max-eval-samples", type=int, help="evaluate on a seeded random subset of this size (default: the whole dev split)")
    parser.add_argument("--out", help="output folder (default: runs/glue/TASK)")
    parser.add_argument("--save", action="store_true", help="save each merged model (save_pretrained) to OUT/model-METHOD")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the per-epoch checkpoints in OUT/checkpoints/METHOD (same options "
                             "required; finished methods are not retrained); without it they are overwritten")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep OUT/checkpoints after a successful run "
                             "(default: deleted once result.json is written)")


def settings_from_args(args: argparse.Namespace) -> GlueSettings:
    """Validated settings from parsed arguments; raises ``ValueError`` naming a bad option."""
    spec = get_task_spec(args.task)
    for name in ("rank", "epochs", "batch_size", "max_length", "resample_every", "max_train_samples", "max_eval_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.data_dir is None and not args.hub:
        raise ValueError(NO_DATA)
    if args.lr is not None and not (args.lr > 0 and math.isfinite(args.lr)):
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    lr = {m: args.lr if args.lr is not None else DEFAULT_LR[m] for m in METHODS}
    return GlueSettings(
        task=spec.name, data_dir=args.data_dir, hub=args.hub, model=args.model, methods=list(dict.fromkeys(args.methods)),
        rank=args.rank, lr=lr, epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length,
        resample_every=args.resample_every, rewarmup_steps=args.rewarmup_steps, seed=args.seed, selection=args.selection,
        singular_values=args.singular_values, max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
    )


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Entry point of ``rosa glue``; bad options or data exit with a message naming the problem."""
    try:
        s = settings_from_args(args)
        splits = read_data(s)  # before the model: a data error needs no model to report
        tokenizer = load_tokenizer(s.model)
        data = load_data(s, tokenizer, splits)
    except (ValueError, OSError, ImportError, RuntimeError) as err:  # options, data files, model, hub
        raise SystemExit(f"rosa glue: {err}") from None
    out = Path(args.out) if args.out else Path("runs/glue") / s.task
    try:
        result = run(s, data, tokenizer, out, save=args.save, resume=args.resume,
                     keep_checkpoints=args.keep_checkpoints)
    except CheckpointError as err:  # --resume from another run's checkpoint, or a damaged one
        raise SystemExit(f"rosa glue: {err}") from None
    print(format_table(summary_rows(result), table_columns(result)))
    sizes = result["data"]
    print(f"train {sizes['train_samples']}/{sizes['train_total']} examples, dev {sizes['eval_samples']}/{sizes['eval_total']}")
    print(f"wrote {out / 'result.json'} and {out / 'glue.png'}")
    return result
