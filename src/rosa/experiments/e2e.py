"""``rosa e2e``: fine-tune a causal language model on the E2E NLG Challenge and score its generations.

ROSA, PEFT LoRA (same targets and rank) and full fine-tuning run side by side with the same seed,
data order, budget (optimizer steps, batch size, max length) and decoding. Each training example
is ``format_prompt(mr)`` followed by ``" " + ref`` and the end-of-sequence token; the loss covers
the target tokens only. Every held-out MR is generated once (greedy or beam search) and scored
against all of its references with :func:`compute_nlg_metrics`. For ROSA the held-out MRs are
generated twice, before and after merging, to check that the merged plain model generates the
same text (zero inference overhead).

Training saves a checkpoint of each method to ``OUT/checkpoints/METHOD`` every ``--checkpoint-every``
optimizer steps and at the end (model, optimizer, LR scheduler, ROSA's resample schedule, RNG states,
progress and the data order); ``--resume`` continues from there and reproduces the uninterrupted run.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, TypeVar

import torch
from torch import nn

import rosa
from rosa.subspace import SELECTIONS

from .e2e_data import E2EExample, MRGroup, format_prompt, group_by_mr, read_e2e_csv, split_by_mr
from .methods import METHODS, count_trainable, finalize_model, prepare_model
from .models import load_causal_lm, load_tokenizer
from .nlg_metrics import compute_nlg_metrics
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
    write_markdown,
)
from .training import add_methods_option, add_rewarmup_option, adamw, optimizer_step, warmup_then_decay

DEFAULT_LR = {"rosa": 1e-3, "lora": 1e-3, "full": 1e-4}
IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt and padding)
HUB_DATASET = "tuetschek/e2e_nlg"
SAMPLE_MRS = 10  # held-out MRs shown in samples.md

CHECKPOINT_EVERY = 50  # optimizer steps between checkpoints (one is always saved at the end)
# fields left out of a checkpoint's training settings: a resumed run may change them (lr enters per method)
NOT_TRAINING_SETTINGS = ("methods", "lr", "checkpoint_every", "max_eval_mrs", "num_beams", "max_new_tokens",
                         "gen_batch_size")

T = TypeVar("T")


@dataclass
class E2ESettings:
    """Every knob of one ``rosa e2e`` run. ``lr`` maps method -> learning rate."""

    model: str = "smollm2"
    data: Optional[str] = None
    train_file: Optional[str] = None
    eval_file: Optional[str] = None
    hub: bool = False
    eval_fraction: float = 0.2
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    rank: int = 8
    lr: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LR))
    epochs: int = 1
    max_steps: Optional[int] = None
    batch_size: int = 8
    max_length: int = 128
    resample_every: Optional[int] = None  # optimizer steps; None = once per epoch
    rewarmup_steps: int = 0  # after each ROSA resample, the LR ramps back up over this many steps
    seed: int = 0
    selection: str = "random"
    max_train_examples: Optional[int] = None
    max_eval_mrs: Optional[int] = None
    num_beams: int = 1
    max_new_tokens: int = 64
    gen_batch_size: int = 16
    checkpoint_every: int = CHECKPOINT_EVERY


@dataclass
class TrainProgress:
    """Where training stands after ``step`` optimizer steps; saved as a checkpoint's ``extra``.

    ``data_position`` is where the data order stands: the loader's generator state when the current
    epoch began and the batches of that epoch already trained on (see :func:`endless`).
    """

    settings: dict[str, Any]
    step: int = 0
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    resample_seconds: float = 0.0
    data_position: Optional[dict[str, Any]] = None


@dataclass
class E2EData:
    """Training pairs (and their encodings) and held-out MR groups after any subsampling, with sizes."""

    train: list[E2EExample]
    encoded: list[dict[str, list[int]]]
    eval: list[MRGroup]
    sizes: dict[str, Any]


# -- data ---------------------------------------------------------------------------------------
def read_groups(s: E2ESettings) -> tuple[list[MRGroup], list[MRGroup]]:
    """(train, eval) MR groups from ``--data`` (split by MR), ``--train-file/--eval-file`` or the hub."""
    if s.data is not None:
        return split_by_mr(group_by_mr(read_e2e_csv(s.data)), s.eval_fraction, s.seed)
    if s.train_file is not None:
        return group_by_mr(read_e2e_csv(s.train_file)), group_by_mr(read_e2e_csv(s.eval_file))
    if s.hub:
        return group_by_mr(load_e2e_hub("train")), group_by_mr(load_e2e_hub("test"))
    raise ValueError(
        "no E2E data given: pass --data path/to/dev.csv (one mr,ref CSV, split by MR into train and eval; "
        "e.g. ../shared/data/e2e/dev.csv), or --train-file and --eval-file, or --hub to download "
        f"the {HUB_DATASET} dataset"
    )


def load_e2e_hub(split: str) -> list[E2EExample]:
    """A split (``train``, ``validation`` or ``test``) of the E2E hub dataset; needs ``datasets`` and a network."""
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise RuntimeError("--hub needs the 'datasets' package (pip install datasets); or pass --data") from err
    try:
        dataset = load_dataset(HUB_DATASET, split=split)
    except Exception as err:  # network, cache or hub errors of any kind
        raise RuntimeError(f"could not load {HUB_DATASET} split {split!r} (is the network up?): {err}") from err
    return [E2EExample(mr=row["meaning_representation"], ref=row["human_reference"]) for row in dataset]


def seeded_subset(items: Sequence[T], limit: Optional[int], seed: int) -> list[T]:
    """A seeded random subset of ``limit`` items in their original order, or all items."""
    if limit is None or limit >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def build_data(s: E2ESettings, groups: tuple[list[MRGroup], list[MRGroup]], tokenizer) -> E2EData:
    """Flatten the train groups into (mr, ref) pairs, subsample both sides (seeded) and encode the pairs."""
    train_groups, eval_groups = groups
    pairs = [E2EExample(g.mr, ref) for g in train_groups for ref in g.refs]
    train = seeded_subset(pairs, s.max_train_examples, s.seed)
    encoded = [encode_example(tokenizer, example, s.max_length) for example in train]
    evaluation = seeded_subset(eval_groups, s.max_eval_mrs, s.seed)
    train_mrs = {g.mr for g in train_groups}
    sizes = {
        "train_examples": len(train), "train_examples_total": len(pairs), "train_mrs": len(train_mrs),
        "train_targets_truncated": sum(e["labels"][-1] != tokenizer.eos_token_id for e in encoded),
        "eval_mrs": len(evaluation), "eval_mrs_total": len(eval_groups),
        "eval_refs": sum(len(g.refs) for g in evaluation),
        "mrs_in_both": len(train_mrs & {g.mr for g in eval_groups}),
    }
    return E2EData(train, encoded, evaluation, sizes)


# -- tokenization -------------------------------------------------------------------------------
def encode_prompt(tokenizer, mr: str) -> list[int]:
    """Token ids of the prompt for ``mr`` (with the tokenizer's usual special tokens)."""
    return tokenizer(format_prompt(mr))["input_ids"]


def encode_example(tokenizer, example: E2EExample, max_length: int) -> dict[str, list[int]]:
    """``input_ids`` = prompt + " " + ref + eos, cut to ``max_length``; ``labels`` = -100 on the prompt."""
    prompt = encode_prompt(tokenizer, example.mr)
    if len(prompt) >= max_length:
        raise ValueError(
            f"the prompt of MR {example.mr!r} is {len(prompt)} tokens, so --max-length {max_length} "
            "leaves no room for the target; raise --max-length"
        )
    target = tokenizer(" " + example.ref, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt + target)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + target)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def collate_training(rows: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into a batch; padding gets attention 0 and label -100."""
    width = max(len(r["input_ids"]) for r in rows)

    def pad(values: list[int], fill: int) -> list[int]:
        return values + [fill] * (width - len(values))

    return {
        "input_ids": torch.tensor([pad(r["input_ids"], pad_token_id) for r in rows]),
        "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in rows]),
        "labels": torch.tensor([pad(r["labels"], IGNORE_INDEX) for r in rows]),
    }


def left_pad(prompts: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompt token ids into a generation batch (``input_ids``, ``attention_mask``)."""
    width = max(len(p) for p in prompts)
    return {
        "input_ids": torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prompts]),
        "attention_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]),
    }


def chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """Consecutive slices of ``items`` of at most ``size`` elements."""
    return [items[i : i + size] for i in range(0, len(items), size)]


# -- generation ---------------------------------------------------------------------------------
@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[list[int]], s: E2ESettings, desc: str) -> list[str]:
    """Decode a continuation of every prompt (greedy, or beam search with ``s.num_beams``), batched.

    Returns the raw decoded continuations (special tokens removed, not stripped).
    """
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=s.max_new_tokens, num_beams=s.num_beams, do_sample=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model.eval()
    texts: list[str] = []
    for batch in progress(chunks(prompts, s.gen_batch_size), desc=desc):
        inputs = {k: v.to(default_device()) for k, v in left_pad(list(batch), tokenizer.pad_token_id).items()}
        output = model.generate(**inputs, generation_config=config)
        texts += tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return texts


def clean_generation(text: str) -> str:
    """The description a raw continuation holds: its first line, stripped."""
    return text.strip().split("\n", 1)[0].strip()


@torch.no_grad()
def prompt_logits(model: nn.Module, prompts: list[list[int]], pad_token_id: int) -> torch.Tensor:
    """Next-token logits (float32) at every non-padding position of a left-padded prompt batch."""
    batch = {k: v.to(default_device()) for k, v in left_pad(prompts, pad_token_id).items()}
    return model.eval()(**batch).logits[batch["attention_mask"].bool()].float().cpu()


def merge_and_compare(model: nn.Module, tokenizer, prompts: list[list[int]], s: E2ESettings
                      ) -> tuple[nn.Module, list[str], dict[str, Any]]:
    """Merge a ROSA model, generating before and after: (merged model, its raw generations, comparison).

    The comparison records whether every generated string is byte-identical and the largest
    absolute logit difference on the first generation batch of prompts.
    """
    before = generate(model, tokenizer, prompts, s, desc="rosa generate (unmerged)")
    probe = prompts[: s.gen_batch_size]
    logits_before = prompt_logits(model, probe, tokenizer.pad_token_id)
    merged = finalize_model(model, "rosa")
    logits_after = prompt_logits(merged, probe, tokenizer.pad_token_id)
    after = generate(merged, tokenizer, prompts, s, desc="rosa generate (merged)")
    comparison = {
        "identical": before == after,
        "generations_compared": len(after),
        "generations_different": sum(a != b for a, b in zip(before, after)),
        "max_abs_logit_diff": (logits_before - logits_after).abs().max().item(),
        "logit_positions_compared": logits_after.shape[0],
    }
    return merged, after, comparison


# -- training -----------------------------------------------------------------------------------
def training_loader(data: E2EData, tokenizer, s: E2ESettings) -> torch.utils.data.DataLoader:
    """Shuffled (seeded), right-padded training batches."""
    return torch.utils.data.DataLoader(
        data.encoded, batch_size=s.batch_size, shuffle=True, generator=torch.Generator().manual_seed(s.seed),
        collate_fn=lambda rows: collate_training(rows, tokenizer.pad_token_id),
    )


def endless(loader: torch.utils.data.DataLoader, position: Optional[dict[str, Any]] = None
            ) -> Iterator[tuple[Any, dict[str, Any]]]:
    """The loader's batches epoch after epoch (reshuffled each epoch), each with the data position after it.

    A position is ``{"epoch_rng": loader.generator's state when the epoch began, "batches": batches of
    the epoch done}``; passing one continues with the batch after it, as the uninterrupted loop would.
    """
    skip = 0
    if position is not None:
        loader.generator.set_state(position["epoch_rng"])
        skip = position["batches"]
    while True:
        epoch_rng = loader.generator.get_state()
        for done, batch in enumerate(itertools.islice(loader, skip, None), skip + 1):
            yield batch, {"epoch_rng": epoch_rng, "batches": done}
        skip = 0


def total_steps(s: E2ESettings, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: ``epochs`` passes, capped at ``max_steps``."""
    steps = s.epochs * steps_per_epoch
    return steps if s.max_steps is None else min(steps, s.max_steps)


def train(model: nn.Module, method: str, lr: float, loader: torch.utils.data.DataLoader, s: E2ESettings,
          checkpoint_dir: Path, settings: dict[str, Any], desc: Optional[str] = None) -> dict[str, Any]:
    """Train ``model`` in place (:mod:`.training`'s recipe); ROSA resamples on schedule, then re-warms up the LR.

    Continues from the checkpoint in ``checkpoint_dir`` if there is one (``settings`` must match
    :func:`check_resumable`), and saves one there every ``s.checkpoint_every`` steps and at the end.
    Returns the per-step loss curve, resample steps, tokens and timing. ``desc`` names the progress bar.
    """
    steps = total_steps(s, len(loader))
    optimizer = adamw(model, lr)
    schedule = rosa.ResampleSchedule(every_steps=s.resample_every or len(loader)) if method == "rosa" else None
    scheduler = warmup_then_decay(optimizer, steps, schedule, s.rewarmup_steps)
    state = (TrainProgress(**rosa.load_checkpoint(checkpoint_dir, model, optimizer, scheduler, schedule))
             if rosa.checkpoint.is_checkpoint(checkpoint_dir) else TrainProgress(settings))
    start = time.perf_counter() - state.seconds
    model.train()
    batches = itertools.islice(endless(loader, state.data_position), steps - state.step)
    for step, (batch, position) in enumerate(progress(batches, desc or f"e2e {method} train", steps - state.step),
                                             state.step + 1):
        # a resample after the last step would be wasted
        report = optimizer_step(model, batch, optimizer, scheduler, schedule, resample=step < steps)
        state.losses.append(report.loss)
        state.tokens += int(batch["attention_mask"].sum())
        state.resample_seconds += report.resample_seconds
        if step % s.checkpoint_every == 0 or step == steps:
            state.step, state.data_position, state.seconds = step, position, time.perf_counter() - start
            rosa.save_checkpoint(checkpoint_dir, model, optimizer, scheduler, schedule, extra=asdict(state))
    seconds = time.perf_counter() - start
    return {
        "lr": lr, "steps": steps, "train_loss_curve": state.losses,
        "resample_steps": [] if schedule is None else list(schedule.resample_points),
        "train_tokens": state.tokens, "train_seconds": seconds, "train_tokens_per_second": state.tokens / seconds,
        "resample_seconds": state.resample_seconds,
    }


# -- checkpoints --------------------------------------------------------------------------------
def checkpoint_dir(out_dir: Path, method: str) -> Path:
    """Where ``method``'s training checkpoint lives."""
    return out_dir / "checkpoints" / method


def training_settings(s: E2ESettings, method: str, data: E2EData) -> dict[str, Any]:
    """What fixes ``method``'s training: its settings, learning rate and a hash of the encoded training data."""
    settings = {k: v for k, v in asdict(s).items() if k not in NOT_TRAINING_SETTINGS}
    encoded = json.dumps(data.encoded, separators=(",", ":")).encode()
    return {**settings, "method": method, "lr": s.lr[method], "train_data_sha256": hashlib.sha256(encoded).hexdigest()}


def saved_settings(directory: Path) -> Optional[dict[str, Any]]:
    """The training settings stored with the checkpoint in ``directory``, or None when there is none."""
    try:
        return rosa.checkpoint.checkpoint_extra(directory).get("settings")
    except FileNotFoundError:
        return None


def check_resumable(directory: Path, settings: dict[str, Any], resume: bool) -> None:
    """Raise ``CheckpointError`` if a checkpoint in ``directory`` cannot be continued with ``settings``.

    Without ``resume`` any checkpoint is refused (a fresh run would overwrite it); with it, one whose
    training settings differ, naming each difference.
    """
    saved = saved_settings(directory)
    if saved is None:
        return
    if not resume:
        raise rosa.checkpoint.CheckpointError(
            f"{directory} holds a training checkpoint; pass --resume to continue it, or delete it to start over")
    differences = [f"{key}: {saved.get(key)!r} in the checkpoint, {settings.get(key)!r} now"
                   for key in sorted(saved.keys() | settings.keys()) if saved.get(key) != settings.get(key)]
    if differences:
        raise rosa.checkpoint.CheckpointError(
            f"cannot resume from {directory}: it was trained with other settings:\n  "
            + "\n  ".join(differences) + "\nrerun with the same settings, or delete the checkpoint to start over")


def run_method(method: str, s: E2ESettings, data: E2EData, tokenizer, out_dir: Path, save_dir: Optional[Path] = None
               ) -> dict[str, Any]:
    """Train one method (resuming its checkpoint in ``out_dir`` if any), merge it, generate for every
    held-out MR and score; returns the JSON-ready result."""
    torch.manual_seed(s.seed)  # same LoRA init, dropout and data order for every method
    memory_window = reset_peak_memory()
    start = time.perf_counter()
    model = prepare_model(load_causal_lm(s.model), method, s.rank, selection=s.selection, seed=s.seed)
    model = model.to(default_device())
    trainable = count_trainable(model)
    result = train(model, method, s.lr[method], training_loader(data, tokenizer, s), s,
                   checkpoint_dir(out_dir, method), training_settings(s, method, data))
    prompts = [encode_prompt(tokenizer, g.mr) for g in data.eval]
    tick = time.perf_counter()
    if method == "rosa":
        model, raw, result["merge_check"] = merge_and_compare(model, tokenizer, prompts, s)
    else:
        model = finalize_model(model, method)
        raw = generate(model, tokenizer, prompts, s, desc=f"{method} generate")
    result["generate_seconds"] = time.perf_counter() - tick
    generations = [clean_generation(text) for text in raw]
    if save_dir is not None:
        model.save_pretrained(save_dir)
        tokenizer.save_pretrained(save_dir)
    return {
        **result,
        "trainable_params": trainable,
        "metrics": compute_nlg_metrics(generations, [g.refs for g in data.eval]),
        "generations": generations,
        "peak_memory": peak_memory_mb(since_reset=memory_window),
        "wall_seconds": time.perf_counter() - start,
        "saved_to": None if save_dir is None else str(save_dir),
    }


def run(s: E2ESettings, data: E2EData, tokenizer, out_dir: str | Path, save: bool = False, resume: bool = False,
        keep_checkpoints: bool = False) -> dict[str, Any]:
    """Run every method of ``s``; write result.json, summary.md, samples.md and loss.png to ``out_dir``.

    With ``resume`` each method continues from its checkpoint (if any); all checkpoints are checked
    before any training starts. They are deleted once every output is written, unless ``keep_checkpoints``.
    """
    out_dir = Path(out_dir)
    for m in s.methods:
        check_resumable(checkpoint_dir(out_dir, m), training_settings(s, m, data), resume)
    methods = {m: run_method(m, s, data, tokenizer, out_dir, out_dir / f"model-{m}" if save else None)
               for m in s.methods}
    result = {
        "experiment": "e2e",
        "settings": asdict(s),
        "data": data.sizes,
        "eval_mrs": [g.mr for g in data.eval],
        "methods": methods,
        "machine": machine_info(),
    }
    write_json(out_dir / "result.json", result)
    write_markdown(out_dir / "summary.md", "rosa e2e", format_table(summary_rows(result), TABLE_COLUMNS),
                   result["machine"])
    write_samples(out_dir / "samples.md", result, data.eval)
    plot(result, out_dir / "loss.png")
    if not keep_checkpoints:
        for m in s.methods:
            shutil.rmtree(checkpoint_dir(out_dir, m), ignore_errors=True)
    return result


# -- smoke-test model ---------------------------------------------------------------------------
def write_tiny_model(folder: str | Path, texts: Sequence[str], architecture: str = "llama", seed: int = 0) -> Path:
    """Save a tiny randomly initialised causal LM and a word-level tokenizer over ``texts`` to ``folder``.

    For smoke runs of ``rosa e2e`` in seconds (tests, ``benchmarks/e2e_table.py --tiny``).
    ``architecture`` is ``llama`` or ``gpt2``; ``seed`` seeds torch's global generator.
    """
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if architecture not in ("llama", "gpt2"):
        raise ValueError(f"unknown tiny architecture {architecture!r}; choose llama or gpt2")
    words = sorted({word for text in texts for word, _ in Whitespace().pre_tokenize_str(text)})
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", *words])}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(seed)
    if architecture == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                           bos_token_id=1, eos_token_id=2))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def write_tiny_e2e_model(folder: str | Path, data: str | Path) -> Path:
    """:func:`write_tiny_model` (Llama) whose vocabulary covers the prompts and references of E2E CSV ``data``."""
    return write_tiny_model(folder, [format_prompt(e.mr) + " " + e.ref for e in read_e2e_csv(data)], "llama")


# -- reporting ----------------------------------------------------------------------------------
TABLE_COLUMNS = ["method", "BLEU", "NIST", "METEOR", "ROUGE-L", "CIDEr", "trainable params",
                 "train tokens/s", "peak memory (MiB)", "seconds"]


def summary_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One table row per method: the five metrics, budget, throughput, memory and wall time."""
    rows = []
    for name, r in result["methods"].items():
        m = r["metrics"]
        rows.append({"method": name, "BLEU": m["bleu"], "NIST": m["nist"], "METEOR": m["meteor"],
                     "ROUGE-L": m["rouge_l"], "CIDEr": m["cider"], "trainable params": r["trainable_params"],
                     "train tokens/s": r["train_tokens_per_second"], "peak memory (MiB)": r["peak_memory"]["mb"],
                     "seconds": r["wall_seconds"]})
    return rows


def merge_check_line(result: dict[str, Any]) -> Optional[str]:
    """One sentence on ROSA's merged-vs-unmerged generations, or None when ROSA did not run."""
    check = result["methods"].get("rosa", {}).get("merge_check")
    if check is None:
        return None
    verdict = "byte-identical" if check["identical"] else f"different in {check['generations_different']}"
    return (f"ROSA merged vs unmerged: {verdict} of {check['generations_compared']} generations; "
            f"max |logit difference| {check['max_abs_logit_diff']:.3g} over "
            f"{check['logit_positions_compared']} prompt positions.")


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def write_samples(path: Path, result: dict[str, Any], groups: list[MRGroup], limit: int = SAMPLE_MRS) -> Path:
    """``samples.md``: for the first held-out MRs, each method's generation above the human references."""
    sections = []
    for i, group in enumerate(groups[:limit]):
        rows = [f"| {name} | {_cell(r['generations'][i])} |" for name, r in result["methods"].items()]
        rows += [f"| reference {j} | {_cell(ref)} |" for j, ref in enumerate(group.refs, 1)]
        sections.append(f"## {i + 1}. `{group.mr}`\n\n| source | text |\n|---|---|\n" + "\n".join(rows))
    body = (f"Generations for the first {min(limit, len(groups))} of {len(groups)} held-out MRs "
            f"({'greedy' if result['settings']['num_beams'] == 1 else 'beam search'} decoding), "
            "each above all of its human references.\n\n" + "\n\n".join(sections))
    return write_markdown(path, "rosa e2e: sample generations", body, result["machine"])


def plot(result: dict[str, Any], path: Path) -> Path:
    """Training loss per step (moving average over ~5% of the steps), ROSA's resample steps marked."""
    fig, (ax,) = new_figure(1, width=7.0)
    for name, r in result["methods"].items():
        curve = moving_average(r["train_loss_curve"], max(1, len(r["train_loss_curve"]) // 20))
        (line,) = ax.plot(range(1, len(curve) + 1), curve, label=name)
        marks = [step for step in r["resample_steps"] if step <= len(curve)]
        ax.plot(marks, [curve[step - 1] for step in marks], "o", ms=4, color=line.get_color())
    ax.set(xlabel="optimizer step", ylabel="train loss (target tokens, moving average)",
           title="E2E training loss (dots: ROSA resamples)")
    ax.legend()
    return save_figure(fig, path)


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Mean of each value and up to ``window - 1`` values before it."""
    sums = [0.0]
    for value in values:
        sums.append(sums[-1] + value)
    return [(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(window, i + 1) for i in range(len(values))]


# -- command line -------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options of ``rosa e2e``."""
    d = E2ESettings()
    parser.add_argument("--model", default=d.model, help="local folder, hub id, or 'smollm2' (default: %(default)s)")
    parser.add_argument("--data", help="one E2E CSV (mr,ref) split by MR into train and eval, "
                        "e.g. ../shared/data/e2e/dev.csv (default: none; give it, --train-file and --eval-file, or --hub)")
    parser.add_argument("--eval-fraction", type=float, default=d.eval_fraction,
                        help="share of the MRs of --data held out for evaluation (default: %(default)s)")
    parser.add_argument("--train-file", help="E2E CSV to train on (with --eval-file; instead of --data; default: none)")
    parser.add_argument("--eval-file", help="E2E CSV to evaluate on (with --train-file; default: none)")
    parser.add_argument("--hub", action="store_true",
                        help=f"train on {HUB_DATASET} train, evaluate on its test split (network)")
    add_methods_option(parser, METHODS, d.methods)
    parser.add_argument("--rank", type=int, default=d.rank, help="ROSA/LoRA rank (default: %(default)s)")
    parser.add_argument("--lr", type=float, help="learning rate for every method (default: "
                        + ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items()) + ")")
    parser.add_argument("--epochs", type=int, default=d.epochs,
                        help="passes over the training pairs (default: %(default)s)")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (a budget cap; default: no cap)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="training pairs per optimizer step (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=d.max_length,
                        help="tokens per training example, prompt + target (default: %(default)s)")
    parser.add_argument("--resample-every", type=int,
                        help="optimizer steps between ROSA resamples (default: once per epoch)")
    add_rewarmup_option(parser)
    parser.add_argument("--seed", type=int, default=d.seed, help="random seed for the split, data order and init (default: %(default)s)")
    parser.add_argument("--selection", choices=SELECTIONS, default=d.selection,
                        help="which singular vectors ROSA trains (default: %(default)s)")
    parser.add_argument("--max-train-examples", type=int,
                        help="train on a seeded random subset of this many (mr, ref) pairs (default: all)")
    parser.add_argument("--max-eval-mrs", type=int, help="evaluate on a seeded random subset of this many held-out MRs (default: all)")
    parser.add_argument("--num-beams", type=int, default=d.num_beams, help="1 = greedy decoding (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="generated tokens per prompt at most (default: %(default)s)")
    parser.add_argument("--gen-batch-size", type=int, default=d.gen_batch_size, help="prompts per generation batch (default: %(default)s)")
    parser.add_argument("--out", default="runs/e2e", help="output folder (default: %(default)s)")
    parser.add_argument("--save", action="store_true",
                        help="save each merged model (save_pretrained) to OUT/model-METHOD")
    parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                        help="optimizer steps between training checkpoints in OUT/checkpoints/METHOD; one is "
                        "also saved when training ends (default: %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="continue each method from its checkpoint in OUT/checkpoints (exactly as if never "
                        "interrupted; a finished one goes straight to generation); refused if the training "
                        "settings differ. Without --resume an existing checkpoint is an error")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep OUT/checkpoints after a successful run (by default deleted once all "
                        "outputs are written)")


POSITIVE_OPTIONS = ("rank", "epochs", "max_steps", "batch_size", "max_length", "resample_every", "max_train_examples",
                    "max_eval_mrs", "num_beams", "max_new_tokens", "gen_batch_size", "checkpoint_every")


def settings_from_args(args: argparse.Namespace) -> E2ESettings:
    """Validated settings from parsed arguments; raises ``ValueError`` naming a bad option."""
    for name in POSITIVE_OPTIONS:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.lr is not None and not (args.lr > 0 and math.isfinite(args.lr)):
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    check_data_options(args)
    return E2ESettings(
        model=args.model, data=args.data, train_file=args.train_file, eval_file=args.eval_file, hub=args.hub,
        eval_fraction=args.eval_fraction, methods=list(dict.fromkeys(args.methods)), rank=args.rank,
        lr={m: args.lr if args.lr is not None else DEFAULT_LR[m] for m in METHODS}, epochs=args.epochs,
        max_steps=args.max_steps, batch_size=args.batch_size, max_length=args.max_length,
        resample_every=args.resample_every, rewarmup_steps=args.rewarmup_steps, seed=args.seed, selection=args.selection,
        max_train_examples=args.max_train_examples, max_eval_mrs=args.max_eval_mrs, num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens, gen_batch_size=args.gen_batch_size, checkpoint_every=args.checkpoint_every,
    )


def check_data_options(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` unless at most one data source is given, and split files come in pairs."""
    if (args.train_file is None) != (args.eval_file is None):
        raise ValueError("--train-file and --eval-file go together; give both, or use --data FILE")
    sources = [flag for flag, given in (("--data", args.data), ("--train-file", args.train_file), ("--hub", args.hub))
               if given]
    if len(sources) > 1:
        raise ValueError(f"give one data source, not {' and '.join(sources)}")
    if not 0.0 < args.eval_fraction < 1.0:
        raise ValueError(f"--eval-fraction must be between 0 and 1 (exclusive), got {args.eval_fraction}")


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Entry point of ``rosa e2e``; bad options, data or models exit with a message naming the problem."""
    try:
        s = settings_from_args(args)
        groups = read_groups(s)
        tokenizer = load_tokenizer(s.model)
        data = build_data(s, groups, tokenizer)
    except (ValueError, OSError, ImportError, RuntimeError) as err:  # options, data files, model, hub
        raise SystemExit(f"rosa e2e: {err}") from None
    if not data.train or not data.eval:
        raise SystemExit(f"rosa e2e: need training pairs and held-out MRs, got {data.sizes}")
    try:
        result = run(s, data, tokenizer, args.out, save=args.save, resume=args.resume,
                     keep_checkpoints=args.keep_checkpoints)
    except rosa.checkpoint.CheckpointError as err:  # a checkpoint that cannot be continued
        raise SystemExit(f"rosa e2e: {err}") from None
    print(format_table(summary_rows(result), TABLE_COLUMNS))
    sizes = result["data"]
    print(f"train {sizes['train_examples']} (mr, ref) pairs from {sizes['train_mrs']} MRs; "
          f"eval {sizes['eval_mrs']} held-out MRs with {sizes['eval_refs']} references")
    line = merge_check_line(result)
    if line:
        print(line)
    print(f"wrote result.json, summary.md, samples.md and loss.png to {args.out}")
    return result
