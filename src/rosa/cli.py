"""The ``rosa`` command line: one subcommand per experiment runner."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from . import __version__

EXTRA = "experiments"  # the optional dependencies (pyproject.toml) that every subcommand's runner needs
# subcommand -> (module under rosa.experiments, one-line help)
SUBCOMMANDS = {
    "synthetic": ("synthetic", "the paper's linear theory experiment: full FT vs LoRA vs ROSA"),
    "glue": ("glue", "fine-tune on a GLUE task: ROSA vs PEFT LoRA vs full fine-tuning"),
    "e2e": ("e2e", "fine-tune a causal LM on E2E NLG and score its generations: ROSA vs PEFT LoRA vs full"),
    "vision": ("vision", "transfer on real images: a small CNN adapted from digits 0-4 to 5-9"),
    "export-lora": ("export_lora", "write a fine-tuned model as a Hugging Face PEFT LoRA adapter over its base"),
    "bench": ("bench", "train step time, memory, resample and inference latency: ROSA vs PEFT LoRA vs full"),
}


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The argument parser; only ``command``'s runner is imported (the others are listed by name)."""
    parser = argparse.ArgumentParser(prog="rosa", description="ROSA: Random Subspace Adaptation experiments")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            runner = importlib.import_module(f"rosa.experiments.{module}")
            runner.add_arguments(sp)
            sp.set_defaults(runner=runner)
    return parser


def missing_module_message(command: Optional[str], err: ModuleNotFoundError) -> str:
    """One line for a subcommand that could not import a module: which one, and what installs it."""
    if err.name is None:  # raised with its own message, e.g. a bundled model's package is missing
        return f"rosa {command}: {err}"
    return (
        f"rosa {command}: the {err.name.partition('.')[0]!r} module is not installed; the experiment "
        f"commands need the {EXTRA!r} extra: pip install 'rosa-peft[{EXTRA}]'"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``rosa COMMAND [options]``; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        args = build_parser(command).parse_args(argv)
        args.runner.main(args)
    except ModuleNotFoundError as err:  # an optional dependency of the runner is missing
        raise SystemExit(missing_module_message(command, err)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
