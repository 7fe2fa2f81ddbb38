"""The paper's theory experiment: a linear model whose target needs a higher-rank update than R.

A frozen linear map ``W0`` (``in -> out``) must learn targets ``Y = X (W0 + dW)^T + noise`` where
``dW`` has rank ``true_rank`` > R. Full fine-tuning reaches the noise floor; LoRA at rank R cannot
(its update has rank <= R); ROSA at rank R gets there by resampling, its accumulated update
growing in rank by up to R per resample.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import rosa

from .reporting import format_table, machine_info, new_figure, progress, save_figure, write_json, write_markdown
from .training import add_methods_option

METHODS = ("full", "lora", "rosa", "rosa-top", "rosa-bottom")


@dataclass
class SyntheticSettings:
    """Every knob of the synthetic experiment (defaults follow the paper's setup)."""

    in_features: int = 512
    out_features: int = 32
    true_rank: int = 24
    n_train: int = 5000
    n_val: int = 1000
    noise: float = 0.1
    rank: int = 8
    epochs: int = 200
    batch_size: int = 250
    lr: float = 2e-3
    weight_decay: float = 0.0
    resample_every: int = 6
    seed: int = 0
    rank_tolerance: float = 1e-3
    methods: list[str] = field(default_factory=lambda: list(METHODS))

    @classmethod
    def quick(cls, **overrides) -> "SyntheticSettings":
        """A setting that runs in well under a minute on 2 CPU cores."""
        return cls(**{"epochs": 120, **overrides})


@dataclass
class Problem:
    """Data and the starting weight ``W0`` of one synthetic problem."""

    w0: torch.Tensor  # [out, in]
    x_train: torch.Tensor  # [n_train, in]
    y_train: torch.Tensor  # [n_train, out]
    x_val: torch.Tensor  # [n_val, in]
    y_val: torch.Tensor  # [n_val, out]


def make_problem(s: SyntheticSettings) -> Problem:
    """Random ``W0``, a random rank-``true_rank`` update, Gaussian inputs and noisy targets."""
    g = torch.Generator().manual_seed(s.seed)
    w0 = torch.randn(s.out_features, s.in_features, generator=g) / math.sqrt(s.in_features)
    a = torch.randn(s.out_features, s.true_rank, generator=g) / math.sqrt(s.true_rank)
    b = torch.randn(s.true_rank, s.in_features, generator=g) / math.sqrt(s.in_features)
    w_star = w0 + a @ b  # [out, in], the update a @ b has rank true_rank
    x = torch.randn(s.n_train + s.n_val, s.in_features, generator=g)
    y = x @ w_star.T + s.noise * torch.randn(s.n_train + s.n_val, s.out_features, generator=g)
    return Problem(w0, x[: s.n_train], y[: s.n_train], x[s.n_train :], y[s.n_train :])


def base_model(w0: torch.Tensor) -> nn.Sequential:
    """A one-layer model holding ``W0`` (no bias)."""
    linear = nn.Linear(w0.shape[1], w0.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(w0)
    return nn.Sequential(linear)


def effective_weight(model: nn.Module, in_features: int) -> torch.Tensor:
    """The model's current ``[out, in]`` map, read off its response to the identity."""
    with torch.no_grad():
        return model(torch.eye(in_features)).T


def update_rank(delta: torch.Tensor, tolerance: float) -> int:
    """Numerical rank of ``delta``: singular values above ``tolerance`` times the largest."""
    s = torch.linalg.svdvals(delta.double())
    return int((s > tolerance * s[0]).sum()) if s[0] > 0 else 0


def build(method: str, problem: Problem, s: SyntheticSettings):
    """The model and its optimizer for ``method``, plus a per-epoch hook (ROSA's resample schedule)."""
    model = base_model(problem.w0)
    on_epoch_end: Callable[[nn.Module, torch.optim.Optimizer], bool] = lambda m, o: False
    if method == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as err:
            raise RuntimeError("the LoRA baseline needs Hugging Face PEFT: pip install 'rosa-peft[hf]'") from err
        model = get_peft_model(model, LoraConfig(r=s.rank, lora_alpha=s.rank, target_modules=["0"]))
    elif method.startswith("rosa"):
        selection = method.partition("-")[2] or "random"
        rosa.wrap(model, rosa.RosaConfig(rank=s.rank, target_modules=["0"], selection=selection, seed=s.seed))
        schedule = rosa.ResampleSchedule(every_epochs=s.resample_every)
        on_epoch_end = schedule.epoch_end
    elif method != "full":
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    return model, optimizer, on_epoch_end


def train_method(method: str, problem: Problem, s: SyntheticSettings) -> dict:
    """Train one method; returns per-epoch validation MSE, update rank and resample epochs."""
    torch.manual_seed(s.seed)
    model, optimizer, on_epoch_end = build(method, problem, s)
    loss_fn = nn.MSELoss()
    val_mse, ranks, resamples = [], [], []
    start = time.perf_counter()
    for epoch in progress(range(1, s.epochs + 1), desc=method, total=s.epochs):
        order = torch.randperm(s.n_train)
        for i in range(0, s.n_train, s.batch_size):
            idx = order[i : i + s.batch_size]
            loss = loss_fn(model(problem.x_train[idx]), problem.y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            val_mse.append(loss_fn(model(problem.x_val), problem.y_val).item())
        ranks.append(update_rank(effective_weight(model, s.in_features) - problem.w0, s.rank_tolerance))
        if on_epoch_end(model, optimizer):
            resamples.append(epoch)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "val_mse": val_mse,
        "final_val_mse": val_mse[-1],
        "update_rank": ranks,
        "final_update_rank": ranks[-1],
        "resample_epochs": resamples,
        "trainable_params": trainable,
        "seconds": time.perf_counter() - start,
    }


def run(s: SyntheticSettings, out_dir: str | Path) -> dict:
    """Run every method in ``s.methods``, write ``result.json`` and ``synthetic.png``; return the result."""
    out_dir = Path(out_dir)
    problem = make_problem(s)
    methods = {m: train_method(m, problem, s) for m in s.methods}
    noise_floor = s.noise**2
    result = {
        "experiment": "synthetic",
        "settings": asdict(s),
        "noise_floor_mse": noise_floor,
        "methods": methods,
        "machine": machine_info(),
    }
    write_json(out_dir / "result.json", result)
    plot(result, out_dir / "synthetic.png")
    return result


def summary_rows(result: dict) -> list[dict]:
    """One table row per method, with the final MSE relative to full fine-tuning's."""
    methods = result["methods"]
    full = methods.get("full", {}).get("final_val_mse")
    return [
        {
            "method": name,
            "trainable params": r["trainable_params"],
            "final val MSE": r["final_val_mse"],
            "x full FT": r["final_val_mse"] / full if full else None,
            "update rank": r["final_update_rank"],
            "resamples": len(r["resample_epochs"]),
            "seconds": r["seconds"],
        }
        for name, r in methods.items()
    ]


TABLE_COLUMNS = ["method", "trainable params", "final val MSE", "x full FT", "update rank", "resamples", "seconds"]


def plot(result: dict, path: Path) -> Path:
    """Validation MSE (log scale) and update rank per epoch, with ROSA's resample points marked."""
    fig, (ax_loss, ax_rank) = new_figure(2)
    for name, r in result["methods"].items():
        epochs = range(1, len(r["val_mse"]) + 1)
        (line,) = ax_loss.plot(epochs, r["val_mse"], label=name)
        ax_rank.plot(epochs, r["update_rank"], label=name, color=line.get_color())
        marks = [e for e in r["resample_epochs"] if e <= len(r["val_mse"])]
        ax_loss.plot(marks, [r["val_mse"][e - 1] for e in marks], "o", ms=3, color=line.get_color())
    ax_loss.axhline(result["noise_floor_mse"], ls="--", c="gray", lw=1, label="noise floor")
    ax_loss.set(yscale="log", xlabel="epoch", ylabel="validation MSE", title="Validation loss (dots: resamples)")
    ax_rank.set(xlabel="epoch", ylabel="rank of W - W0", title="Rank of the accumulated update")
    ax_loss.legend()
    ax_rank.legend()
    return save_figure(fig, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options of ``rosa synthetic``."""
    d = SyntheticSettings()
    parser.add_argument("--quick", action="store_true", help="fewer epochs; under a minute on 2 CPU cores")
    parser.add_argument("--out", default="runs/synthetic", help="output folder (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=d.rank, help="LoRA/ROSA rank R (default: %(default)s)")
    parser.add_argument("--true-rank", type=int, default=d.true_rank, help="rank of the target update (default: %(default)s)")
    parser.add_argument("--in-features", type=int, default=d.in_features, help="input width of the layer (default: %(default)s)")
    parser.add_argument("--out-features", type=int, default=d.out_features, help="output width of the layer (default: %(default)s)")
    parser.add_argument("--n-train", type=int, default=d.n_train, help="training examples (default: %(default)s)")
    parser.add_argument("--n-val", type=int, default=d.n_val, help="validation examples (default: %(default)s)")
    parser.add_argument("--noise", type=float, default=d.noise, help="target noise std (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=None, help=f"default {d.epochs} ({SyntheticSettings.quick().epochs} with --quick)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=d.lr, help="learning rate, all methods (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default: %(default)s)")
    parser.add_argument("--resample-every", type=int, default=d.resample_every, help="epochs between ROSA resamples (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed, help="random seed (default: %(default)s)")
    add_methods_option(parser, METHODS, METHODS)


def settings_from_args(args: argparse.Namespace) -> SyntheticSettings:
    """Build settings from parsed command-line arguments."""
    values = dict(
        in_features=args.in_features, out_features=args.out_features, true_rank=args.true_rank,
        n_train=args.n_train, n_val=args.n_val, noise=args.noise, rank=args.rank,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        resample_every=args.resample_every, seed=args.seed, methods=list(args.methods),
    )
    if args.epochs is not None:
        values["epochs"] = args.epochs
    return SyntheticSettings.quick(**values) if args.quick else SyntheticSettings(**values)


def main(args: argparse.Namespace) -> dict:
    """Entry point of ``rosa synthetic``."""
    s = settings_from_args(args)
    for name, value in (("rank", s.rank), ("true-rank", s.true_rank), ("epochs", s.epochs),
                        ("batch-size", s.batch_size), ("n-train", s.n_train), ("n-val", s.n_val)):
        if value < 1:
            raise SystemExit(f"rosa synthetic: --{name} must be >= 1, got {value}")
    result = run(s, args.out)
    table = format_table(summary_rows(result), TABLE_COLUMNS)
    floor = f"Noise floor (target noise variance): {result['noise_floor_mse']:.4g}."
    write_markdown(Path(args.out) / "summary.md", "rosa synthetic", f"{table}\n\n{floor}", result["machine"])
    print(table)
    print(floor)
    print(f"wrote result.json, summary.md and synthetic.png to {args.out}")
    return result
