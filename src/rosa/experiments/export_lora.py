"""``rosa export-lora``: write a fine-tuned Hugging Face model as a PEFT LoRA adapter over its base.

``--tuned`` is either a merged model folder (``save_pretrained`` output, e.g. ``rosa glue --save``)
or a ROSA checkpoint folder written by ``rosa.save_checkpoint`` for a Hugging Face model; the latter
is rebuilt from ``--base``: wrapped with the saved ``RosaConfig``, loaded, merged. Parameters that
``--base`` lacks (a freshly initialized task head) are saved whole, so the adapter works on any
copy of the base loaded the same way.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import rosa

from ..checkpoint import checkpoint_metadata, is_checkpoint, load_checkpoint
from ..integrations.export import export_lora
from .models import resolve_model_source
from .reporting import format_table, write_json

REPORT_FILE = "export_report.json"


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


def relative_error(text: str) -> float:
    """An argparse type: a relative error in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a relative error in [0, 1), e.g. 0.01")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``rosa export-lora``."""
    parser.add_argument("--base", required=True, metavar="ORIGINAL", help="the original model: a folder, hub id, or alias (minilm, smollm2)")
    parser.add_argument("--tuned", required=True, metavar="MERGED_OR_CHECKPOINT", help="a merged model folder (save_pretrained) or a ROSA checkpoint folder")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="adapter folder to write")
    limit = parser.add_mutually_exclusive_group()
    limit.add_argument("--rank", type=positive_int, metavar="K",
                       help="cap every layer's LoRA rank at K (exact if K >= the delta's rank; default: exact)")
    limit.add_argument("--tolerance", type=relative_error, metavar="EPS",
                       help="smallest rank per layer with relative Frobenius error <= EPS, in [0, 1) (default: exact)")
    parser.add_argument("--target-modules", nargs="+", metavar="NAME",
                        help="only these changed layers become LoRA (names or suffixes; default: every changed layer LoRA can express)")
    parser.add_argument("--modules-to-save", nargs="+", metavar="NAME",
                        help="also save these modules whole (names or suffixes; default: none beyond those LoRA cannot express)")
    parser.add_argument("--allow-full-rank", action="store_true",
                        help="export even when most layers changed at near full rank (a wrong --base, or full "
                             "fine-tuning), which makes the adapter about as large as the model")


def model_class(name: str) -> Any:
    """A transformers model class by name (only transformers' own classes are rebuilt)."""
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(
            f"{name!r} is not a transformers model class; the CLI rebuilds Hugging Face models only. For other "
            "models use the Python API: build the model, rosa.wrap, rosa.load_checkpoint, rosa.merge, then "
            "rosa.integrations.export_lora(base, tuned, out_dir)"
        )
    return cls


def _tuned_class_and_config(tuned: str) -> tuple[Any, Any]:
    if is_checkpoint(tuned):
        meta = checkpoint_metadata(tuned)
        cls = model_class(meta["model_class"].rpartition(".")[2])
        if meta["hf_config"] is None:
            raise ValueError(f"checkpoint {tuned!r} holds no Hugging Face config; use the Python API instead")
        return cls, cls.config_class.from_dict(meta["hf_config"])
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tuned)
    if not config.architectures:
        raise ValueError(f"{tuned!r}/config.json names no architecture; save the tuned model with save_pretrained")
    return model_class(config.architectures[0]), config


def load_models(base: str, tuned: str) -> tuple[Any, Any, list[str]]:
    """The base and (merged) tuned models, and the modules the base checkpoint lacked."""
    cls, config = _tuned_class_and_config(tuned)
    source = resolve_model_source(base)
    base_model, info = cls.from_pretrained(source, config=config, output_loading_info=True)
    if is_checkpoint(tuned):
        tuned_model = cls.from_pretrained(source, config=config)
        rosa.wrap(tuned_model, checkpoint_metadata(tuned)["config"])
        load_checkpoint(tuned, tuned_model, restore_rng=False)
        rosa.merge(tuned_model)
    else:
        tuned_model = cls.from_pretrained(tuned)
    fresh = sorted({key.rpartition(".")[0] for key in info["missing_keys"]})
    return base_model.eval(), tuned_model.eval(), fresh


def main(args: argparse.Namespace) -> dict:
    """Export, print a per-layer table, and write the report JSON beside the adapter.

    Models that cannot be loaded or exported exit with a message naming the problem.
    """
    try:
        base_model, tuned_model, fresh = load_models(args.base, args.tuned)
        report = export_lora(
            base_model,
            tuned_model,
            args.out,
            rank=args.rank,
            tolerance=args.tolerance,
            target_modules=args.target_modules,
            modules_to_save=(args.modules_to_save or []) + fresh or None,
            base_model_name_or_path=resolve_model_source(args.base),
            allow_full_rank=args.allow_full_rank,
        )
    except (ValueError, OSError) as err:  # models that do not fit together, unreadable folders, checkpoints
        raise SystemExit(f"rosa export-lora: {err}") from None
    write_json(Path(args.out) / REPORT_FILE, report)
    rows = [{"layer": name, **info} for name, info in report["layers"].items()]
    print(format_table(rows, ["layer", "kind", "rank", "delta_rank", "relative_error"]))
    for name, reason in report["modules_to_save"].items():
        print(f"saved whole: {name} ({reason})")
    adapter, base = report["adapter_parameters"], report["base_parameters"]
    print(f"adapter written to {args.out} (r={report['r']}, max relative error {report['max_relative_error']:.3g}): "
          f"{adapter:,} values, {adapter / max(base, 1):.1%} of the base model's {base:,} parameters")
    return report
