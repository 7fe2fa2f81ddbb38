"""Supervised fine-tuning of SmolLM2-135M-Instruct with ROSA under TRL's SFTTrainer, on chat-formatted E2E data.

    python examples/trl_sft.py e2e/dev.csv --max-steps 60 --out runs/trl-sft
    torchrun --standalone --nproc_per_node 2 examples/trl_sft.py DATA.csv     # DDP, SVDs split across ranks

Each E2E row (meaning representation, reference) becomes a two-turn conversation: the user asks for a
description of the restaurant's slots, the assistant answers with the reference. SFTTrainer applies the
model's chat template and trains on the assistant turn only; ``RosaCallback`` resamples the subspace
every ``--resample-every`` steps. The merged model is saved with ``save_pretrained`` and loads without rosa.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

import rosa
from rosa.experiments.e2e_data import format_prompt, read_e2e_csv
from rosa.experiments.models import load_causal_lm, load_tokenizer
from rosa.integrations import RosaCallback


def chat_dataset(path: str, limit: int | None) -> Dataset:
    """The E2E CSV at ``path`` as conversations (``messages``: a user turn and the assistant's reference)."""
    examples = read_e2e_csv(path)[:limit]
    return Dataset.from_list([
        {"messages": [{"role": "user", "content": format_prompt(e.mr)}, {"role": "assistant", "content": e.ref}]}
        for e in examples
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="an E2E CSV file (header mr,ref), e.g. the E2E dev set's dev.csv")
    parser.add_argument("--model", default="smollm2", help="'smollm2' (the bundled SmolLM2-135M-Instruct) or a folder")
    parser.add_argument("--limit", type=int, help="use only the first N rows")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--resample-every", type=int, default=20)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--out", default="runs/trl-sft", help="output folder: trainer state, merged model, losses.json")
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model)
    rosa.wrap(model, rosa.RosaConfig(rank=args.rank, seed=0))  # the model's preset targets (attention + MLP)
    rosa.print_trainable_parameters(model)
    callback = RosaCallback(every_steps=args.resample_every, rewarmup_steps=2)
    config = SFTConfig(
        output_dir=args.out, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
        max_length=128, seed=0, activation_checkpointing=args.activation_checkpointing,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),  # bf16 autocast on GPUs only
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=chat_dataset(args.data, args.limit),
                         processing_class=tokenizer, callbacks=[callback])
    trainer.train()
    if trainer.is_world_process_zero():
        out = Path(args.out)
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        (out / "losses.json").write_text(json.dumps({"losses": losses, "resample_steps": callback.resample_steps}))
        merged = rosa.merge(trainer.model)
        merged.save_pretrained(out / "merged")
        tokenizer.save_pretrained(out / "merged")
        print(f"first loss {losses[0]:.3f}, last {losses[-1]:.3f}; resampled at steps {callback.resample_steps}; "
              f"merged model in {out / 'merged'}")


if __name__ == "__main__":
    main()
