"""The ``rosa`` command line: one subcommand per experiment runner."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# subcommand -> (module under rosa.experiments, one-line help)
SUBCOMMANDS = {
    "synthetic": ("synthetic", "the paper's linear theory experiment: full FT vs LoRA vs ROSA"),
    "glue": ("glue", "fine-tune on a GLUE task: ROSA vs PEFT LoRA vs full fine-tuning"),
    "e2e": ("e2e", "fine-tune a causal LM on E2E NLG and score its generations: ROSA vs PEFT LoRA vs full"),
    "vision": ("vision", "transfer on real images: a small CNN adapted from digits 0-4 to 5-9"),
    "export-lora": ("export_lora", "write a fine-tuned model as a Hugging Face PEFT LoRA adapter over its base"),
    "bench": ("bench", "train step time, memory, resample and inference latency: ROSA vs PEFT LoRA vs full"),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand's options."""
    parser = argparse.ArgumentParser(prog="rosa", description="ROSA: Random Subspace Adaptation experiments")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        runner = importlib.import_module(f"rosa.experiments.{module}")
        sp = sub.add_parser(name, help=help_text, description=help_text)
        runner.add_arguments(sp)
        sp.set_defaults(runner=runner)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``rosa COMMAND [options]``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    args.runner.main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
