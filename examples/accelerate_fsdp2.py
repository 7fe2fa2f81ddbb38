"""ROSA under FSDP2 through accelerate and the Hugging Face Trainer, with RosaCallback resampling.

    accelerate launch --config_file examples/accelerate_fsdp2.yaml examples/accelerate_fsdp2.py --data e2e/dev.csv --out runs/fsdp2
    accelerate launch --config_file examples/accelerate_fsdp2.yaml examples/accelerate_fsdp2.py --tiny --out OUT

The model is wrapped with rosa.wrap before the Trainer exists; accelerate then applies ``fully_shard`` to
each decoder layer and the root. Each resample gathers a layer's residual and factors, refactorizes them
(each group's SVD on one rank, broadcast to the others) and writes every rank's shard back in place.
At the end ``trainer.save_model`` writes the merged plain model to OUT/model when the config's
``fsdp_state_dict_type`` is ``FULL_STATE_DICT`` (with ``SHARDED_STATE_DICT`` it writes no weights); then
the factors are merged and rank 0 saves the full, plain state dict (both load without rosa).
``--tiny`` trains a randomly initialized 2-layer Llama on random tokens, in seconds; the default is the
bundled SmolLM2-135M-Instruct on E2E references. accelerate applies FSDP only on accelerators (GPUs);
the script stops with a message when FSDP is not active.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from datasets import Dataset
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import rosa
from rosa.integrations import RosaCallback


def tiny_model_and_data(rows: int) -> tuple[LlamaForCausalLM, Dataset]:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    ids = torch.randint(1, 64, (rows, 16), generator=torch.Generator().manual_seed(1))
    return LlamaForCausalLM(config), Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def smollm2_and_e2e(data: str, rows: int) -> tuple[torch.nn.Module, Dataset]:
    from rosa.experiments.e2e_data import format_prompt, read_e2e_csv
    from rosa.experiments.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    texts = [f"{format_prompt(e.mr)} {e.ref}{tokenizer.eos_token}" for e in read_e2e_csv(data)[:rows]]
    ids = [tokenizer(t, truncation=True, max_length=96)["input_ids"] for t in texts]
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    return load_causal_lm("smollm2"), Dataset.from_dict({
        "input_ids": [x + [pad] * (width - len(x)) for x in ids],
        "labels": [x + [-100] * (width - len(x)) for x in ids],
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a random 2-layer Llama on random tokens")
    parser.add_argument("--data", help="an E2E CSV file (header mr,ref); needed unless --tiny")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4, help="rows per process and step")
    parser.add_argument("--resample-every", type=int, default=2)
    parser.add_argument("--out", default="runs/fsdp2")
    args = parser.parse_args()
    if not args.tiny and not args.data:
        parser.error("pass --data path/to/e2e/dev.csv, or --tiny")

    model, data = tiny_model_and_data(args.rows) if args.tiny else smollm2_and_e2e(args.data, args.rows)
    rosa.wrap(model, rosa.RosaConfig(rank=4, seed=0))  # before the Trainer shards it
    callback = RosaCallback(every_steps=args.resample_every)
    training = TrainingArguments(output_dir=args.out, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
                                 learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], seed=0,
                                 disable_tqdm=True)
    trainer = Trainer(model=model, args=training, train_dataset=data.with_format("torch"), callbacks=[callback])
    if not trainer.is_fsdp_enabled:
        raise SystemExit("accelerate did not enable FSDP: launch with --config_file examples/accelerate_fsdp2.yaml "
                         "on GPUs (accelerate 1.16 applies its FSDP plugin only on accelerators, not to CPU "
                         "processes; on CPU, apply fully_shard yourself under torchrun)")
    trainer.train()
    trainer.save_model(f"{args.out}/model")  # the merged plain model when fsdp_state_dict_type is FULL_STATE_DICT

    sharded = type(rosa.rosa_layers(trainer.model).popitem()[1].up).__name__
    rosa.merge(trainer.model)  # collective under FSDP2: every rank folds its shards
    state = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer.is_world_process_zero():
        out = Path(args.out)
        torch.save(state, out / "merged_state_dict.pt")
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        report = {"losses": losses, "resample_steps": callback.resample_steps, "factor_type": sharded,
                  "world_size": trainer.args.world_size}
        (out / "result.json").write_text(json.dumps(report))
        print(json.dumps(report))


if __name__ == "__main__":
    main()
