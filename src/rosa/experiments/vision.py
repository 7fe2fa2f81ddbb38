"""Transfer on real images: a small CNN pretrained on digits 0-4, adapted to digits 5-9.

Data: scikit-learn's bundled handwritten digits (1,797 real 8x8 grayscale images, no download).
Per seed: pretrain the CNN on digits 0-4, then adapt copies of the same pretrained network to
digits 5-9 with each method. Every method trains a freshly initialized 5-class head fully (the
same initial head for every method); on top of that, ``rosa`` adapts both Conv2d layers with ROSA
(resampled every few epochs), ``lora`` with PEFT LoRA on the same layers at the same rank, ``full``
trains every weight, and ``head`` trains only the head (a linear probe of the pretrained features).
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import rosa

from .methods import count_trainable, prepare_model
from .reporting import format_table, machine_info, new_figure, progress, save_figure, write_json, write_markdown
from .training import add_methods_option

METHODS = ("full", "lora", "rosa", "head")
ADAPTED_LAYERS = ["conv1", "conv2"]
SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)


@dataclass
class VisionSettings:
    """Every knob of the digits transfer experiment."""

    seeds: int = 5
    rank: int = 4
    pretrain_per_class: int = 120
    train_per_class: int = 20
    pretrain_epochs: int = 30
    epochs: int = 40
    batch_size: int = 32
    pretrain_lr: float = 3e-3
    lr: float = 3e-3
    resample_every: int = 5
    threads: int = 1
    methods: list[str] = field(default_factory=lambda: list(METHODS))

    @classmethod
    def quick(cls, **overrides) -> "VisionSettings":
        """Two seeds and few epochs: well under 30 s on 2 CPU cores."""
        return cls(**{"seeds": 2, "pretrain_epochs": 10, "epochs": 10, **overrides})


@dataclass
class Split:
    """Images ``[n, 1, 8, 8]`` in [0, 1] and labels ``[n]`` numbered 0.. in the order of the classes."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 bundled digit images ``[n, 1, 8, 8]`` scaled to [0, 1], and their digits ``[n]``."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values 0..16
    return images, torch.tensor(data.target)


def split_classes(
    images: torch.Tensor, digits: torch.Tensor, classes: tuple[int, ...], train_per_class: int, seed: int
) -> Split:
    """``train_per_class`` random images of each class for training, the rest of those classes for testing."""
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for digit in classes:
        members = (digits == digit).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        if len(members) <= train_per_class:
            raise ValueError(f"digit {digit} has {len(members)} images; train_per_class={train_per_class} leaves none to test")
        train.append(members[:train_per_class])
        test.append(members[train_per_class:])
    train, test = torch.cat(train), torch.cat(test)
    relabel = torch.full((10,), -1, dtype=torch.long)
    relabel[list(classes)] = torch.arange(len(classes))
    return Split(images[train], relabel[digits[train]], images[test], relabel[digits[test]])


class SmallCNN(nn.Module):
    """conv 1->16 3x3, conv 16->32 3x3 (ReLU each), 4x4 max-pool, linear head on the 32x2x2 features.

    The pooled features are compact (128 values), so a new task needs more than a new head.
    """

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Linear(32 * 2 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))  # [B, 16, 8, 8]
        h = F.max_pool2d(F.relu(self.conv2(h)), 4)  # [B, 32, 2, 2]
        return self.head(h.flatten(1))  # [B, classes]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` classified as ``y`` (model in eval mode)."""
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def train(
    model: nn.Module, split: Split, epochs: int, lr: float, batch_size: int, seed: int, desc: str,
    schedule: rosa.ResampleSchedule | None = None,
) -> list[float]:
    """Adam on the trainable parameters; returns test accuracy before training and after each epoch."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    curve = [accuracy(model, split.x_test, split.y_test)]
    for _ in progress(range(epochs), desc=desc, total=epochs):
        model.train()
        order = torch.randperm(len(split.y_train), generator=generator)
        for batch in order.split(batch_size):
            loss = F.cross_entropy(model(split.x_train[batch]), split.y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if schedule is not None:
            schedule.epoch_end(model, optimizer)
        curve.append(accuracy(model, split.x_test, split.y_test))
    return curve


def adapt(method: str, pretrained: SmallCNN, split: Split, s: VisionSettings, seed: int) -> dict:
    """Adapt a copy of ``pretrained`` (with a fresh head) to the target split; returns its learning curve."""
    model = copy.deepcopy(pretrained)
    torch.manual_seed(10_000 + seed)  # the same new head for every method of this seed
    model.head = nn.Linear(model.head.in_features, len(TARGET_CLASSES))
    schedule = None
    if method == "head":
        model.requires_grad_(False)
        model.head.requires_grad_(True)
    else:
        model = prepare_model(model, method, s.rank, target_modules=ADAPTED_LAYERS, seed=seed, modules_to_save=["head"])
        if method == "rosa":
            schedule = rosa.ResampleSchedule(every_epochs=s.resample_every)
    start = time.perf_counter()
    curve = train(model, split, s.epochs, s.lr, s.batch_size, seed, f"seed {seed} {method}", schedule)
    return {"curve": curve, "trainable_params": count_trainable(model), "seconds": time.perf_counter() - start}


def run_seed(images: torch.Tensor, digits: torch.Tensor, s: VisionSettings, seed: int) -> dict:
    """Pretrain on digits 0-4, then adapt to 5-9 with every method, for one seed."""
    source = split_classes(images, digits, SOURCE_CLASSES, s.pretrain_per_class, seed)
    target = split_classes(images, digits, TARGET_CLASSES, s.train_per_class, seed)
    torch.manual_seed(seed)
    pretrained = SmallCNN(len(SOURCE_CLASSES))
    pretrain_curve = train(pretrained, source, s.pretrain_epochs, s.pretrain_lr, s.batch_size, seed, f"seed {seed} pretrain")
    methods = {m: adapt(m, pretrained, target, s, seed) for m in s.methods}
    return {"pretrain_accuracy": pretrain_curve[-1], "target_train": len(target.y_train),
            "target_test": len(target.y_test), "methods": methods}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(values) > 1 else 0.0)


def summarize(seeds: list[dict], methods: list[str]) -> dict:
    """Per method: final accuracy per seed, its mean and std, and the mean/std learning curve."""
    summary = {}
    for m in methods:
        runs = [seed["methods"][m] for seed in seeds]
        curves = torch.tensor([r["curve"] for r in runs], dtype=torch.float64)  # [seeds, epochs + 1]
        finals = [r["curve"][-1] for r in runs]
        mean, std = mean_std(finals)
        summary[m] = {
            "accuracy_mean": mean,
            "accuracy_std": std,
            "accuracy_per_seed": finals,
            "curve_mean": curves.mean(0).tolist(),
            "curve_std": (curves.std(0) if len(runs) > 1 else torch.zeros(curves.shape[1])).tolist(),
            "trainable_params": runs[0]["trainable_params"],
            "seconds_per_seed": sum(r["seconds"] for r in runs) / len(runs),
        }
    return summary


def run(s: VisionSettings, out_dir: str | Path) -> dict:
    """Run every seed, write ``result.json`` and ``vision.png`` to ``out_dir``; return the result.

    Torch uses ``s.threads`` threads meanwhile: the network is so small that one thread is fastest,
    and far faster than several on a busy machine.
    """
    images, digits = load_digits()
    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        seeds = [run_seed(images, digits, s, seed) for seed in range(s.seeds)]
        machine = machine_info()
    finally:
        torch.set_num_threads(threads)
    pretrain_mean, pretrain_std = mean_std([r["pretrain_accuracy"] for r in seeds])
    result = {
        "experiment": "vision",
        "settings": asdict(s),
        "data": {"images": len(digits), "source_classes": SOURCE_CLASSES, "target_classes": TARGET_CLASSES,
                 "target_train": seeds[0]["target_train"], "target_test": seeds[0]["target_test"]},
        "pretrain_accuracy_mean": pretrain_mean,
        "pretrain_accuracy_std": pretrain_std,
        "methods": summarize(seeds, s.methods),
        "seeds": seeds,
        "machine": machine,
    }
    out_dir = Path(out_dir)
    write_json(out_dir / "result.json", result)
    plot(result, out_dir / "vision.png")
    return result


def summary_rows(result: dict) -> list[dict]:
    """One table row per method."""
    return [
        {
            "method": name,
            "trainable params": r["trainable_params"],
            "test accuracy": f"{r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f}",
            "worst seed": min(r["accuracy_per_seed"]),
            "seconds / seed": r["seconds_per_seed"],
        }
        for name, r in result["methods"].items()
    ]


TABLE_COLUMNS = ["method", "trainable params", "test accuracy", "worst seed", "seconds / seed"]


def plot(result: dict, path: Path) -> Path:
    """Test accuracy per adaptation epoch, mean over seeds with a ±1 std band, per method; ROSA's resamples dotted."""
    fig, (ax,) = new_figure(1, width=6.5)
    for name, r in result["methods"].items():
        mean, std = torch.tensor(r["curve_mean"]), torch.tensor(r["curve_std"])
        epochs = range(len(mean))
        (line,) = ax.plot(epochs, mean, label=f"{name} ({r['trainable_params']:,} params)")
        ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    s = result["settings"]
    if "rosa" in result["methods"]:
        for epoch in range(s["resample_every"], s["epochs"] + 1, s["resample_every"]):
            ax.axvline(epoch, ls=":", c="gray", lw=0.8, label="ROSA resample" if epoch == s["resample_every"] else None)
    seeds = s["seeds"]
    ax.set(xlabel="epoch", ylabel="test accuracy (digits 5-9)", ylim=(0, 1),
           title=f"Digits 0-4 -> 5-9 transfer, mean ± std over {seeds} seeds")
    ax.legend(loc="lower right")
    return save_figure(fig, path)


def report(result: dict) -> str:
    """The markdown body of the summary: setup, the result table and how to reproduce it."""
    s, data = result["settings"], result["data"]
    setup = (
        f"Small CNN (conv 1->16, conv 16->32, 4x4 max-pool, linear head on 128 features) pretrained on digits 0-4 of scikit-learn's digits "
        f"({s['pretrain_per_class']} images per class; held-out accuracy {result['pretrain_accuracy_mean']:.4f} "
        f"± {result['pretrain_accuracy_std']:.4f}), then adapted to digits 5-9 with {data['target_train']} training "
        f"and {data['target_test']} test images, over {s['seeds']} seeds (each seed: its own split, pretraining "
        f"and head initialization, shared by all methods). {s['epochs']} epochs of Adam (lr {s['lr']}, batch "
        f"{s['batch_size']}); `rosa` and `lora` adapt {' and '.join(ADAPTED_LAYERS)} at rank {s['rank']}, ROSA "
        f"resamples every {s['resample_every']} epochs; every method trains the new head fully."
    )
    table = format_table(summary_rows(result), TABLE_COLUMNS)
    return (f"{setup}\n\nTest accuracy after the last epoch, mean ± std over seeds:\n\n{table}\n\n"
            f"Reproduce: `{command_line(s)} --out DIR`.")


def command_line(settings: dict) -> str:
    """The ``rosa vision`` command for ``settings``: every option that differs from its default."""
    parts = ["rosa vision"]
    for name, default in asdict(VisionSettings()).items():
        value = settings[name]
        if value != default:
            shown = " ".join(value) if isinstance(value, list) else value
            parts.append(f"--{name.replace('_', '-')} {shown}")
    return " ".join(parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options of ``rosa vision``."""
    d, q = VisionSettings(), VisionSettings.quick()
    parser.add_argument("--quick", action="store_true", help=f"{q.seeds} seeds, {q.epochs} epochs; under 30 s on 2 CPU cores")
    parser.add_argument("--out", default="runs/vision", help="output folder (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=None, help=f"number of seeds (default {d.seeds}, {q.seeds} with --quick)")
    parser.add_argument("--epochs", type=int, default=None, help=f"adaptation epochs (default {d.epochs}, {q.epochs} with --quick)")
    parser.add_argument("--pretrain-epochs", type=int, default=None,
                        help=f"default {d.pretrain_epochs} ({q.pretrain_epochs} with --quick)")
    parser.add_argument("--rank", type=int, default=d.rank, help="LoRA/ROSA rank R (default: %(default)s)")
    parser.add_argument("--pretrain-per-class", type=int, default=d.pretrain_per_class,
                        help="pretraining images per source digit (default: %(default)s)")
    parser.add_argument("--train-per-class", type=int, default=d.train_per_class, help="target training images per digit (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step (default: %(default)s)")
    parser.add_argument("--pretrain-lr", type=float, default=d.pretrain_lr, help="pretraining learning rate (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=d.lr, help="adaptation learning rate, all methods (default: %(default)s)")
    parser.add_argument("--resample-every", type=int, default=d.resample_every, help="epochs between ROSA resamples (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=d.threads, help="torch threads (default: %(default)s, fastest here)")
    add_methods_option(parser, METHODS, METHODS)


def settings_from_args(args: argparse.Namespace) -> VisionSettings:
    """Build settings from parsed command-line arguments."""
    values = dict(
        rank=args.rank, pretrain_per_class=args.pretrain_per_class, train_per_class=args.train_per_class,
        batch_size=args.batch_size, pretrain_lr=args.pretrain_lr, lr=args.lr,
        resample_every=args.resample_every, threads=args.threads, methods=list(args.methods),
    )
    for name in ("seeds", "epochs", "pretrain_epochs"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    return VisionSettings.quick(**values) if args.quick else VisionSettings(**values)


def main(args: argparse.Namespace) -> dict:
    """Entry point of ``rosa vision``."""
    s = settings_from_args(args)
    for name in ("seeds", "epochs", "pretrain_epochs", "rank", "pretrain_per_class", "train_per_class",
                 "batch_size", "resample_every", "threads"):
        if getattr(s, name) < 1:
            raise SystemExit(f"rosa vision: --{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
    result = run(s, args.out)
    body = report(result)
    write_markdown(Path(args.out) / "summary.md", "rosa vision: digits 0-4 -> 5-9 transfer", body, result["machine"])
    print(body)
    print(f"wrote result.json, summary.md and vision.png to {args.out}")
    return result
