"""``rosa bench``: ROSA vs PEFT LoRA vs full fine-tuning on the same model, side by side.

Measured in one process run, the methods alternating every repetition so machine drift hits all
alike: median train step time (forward + backward + AdamW step); peak training memory; exact bytes
of parameters, gradients and optimizer state; the time of one whole-model ``rosa.resample`` and its
fraction of one epoch of a stated dataset size; inference latency of the merged ROSA model vs the
original model vs LoRA unmerged and merged. Peak process RSS comes from one child process per method.

Peak training memory is the method's resident tensors (parameters, buffers, gradients, optimizer
state) at the start of a step plus the step's highest transient allocation on top of them: on CUDA
from ``torch.cuda.max_memory_allocated``, on CPU from the torch profiler's allocation records. So the
other methods' models, alive in the same process for the alternation, do not count.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import os
import resource
import statistics
import sys
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn

import rosa
from rosa.config import FACTOR_DTYPES, dtype_names
from rosa.subspace import SELECTIONS, SVD_METHODS

from .methods import METHODS, classifier_head, prepare_model
from .models import load_causal_lm, load_sequence_classifier
from .reporting import format_table, machine_info, progress, write_json, write_markdown

KINDS = ("cls", "lm")  # sequence classifier (2 labels), causal language model
KNOWN_KINDS = {"minilm": "cls", "smollm2": "lm"}

# Models built from a config with random weights: name -> (kind, transformers config class, kwargs).
RANDOM_MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "tiny-bert": ("cls", "BertConfig", dict(
        vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64)),
    "tiny-llama": ("lm", "LlamaConfig", dict(
        vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64)),
    "roberta-125m": ("cls", "RobertaConfig", dict(  # the shape of roberta-base (the paper's GLUE model)
        vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        max_position_embeddings=514, type_vocab_size=1, pad_token_id=1)),
    "gpt2-124m": ("lm", "GPT2Config", dict(  # the shape of gpt2 (the paper's E2E model; Conv1D layers)
        vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)),
    "llama-1b": ("lm", "LlamaConfig", dict(  # the shape of Llama-3.2-1B
        vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=8192, max_position_embeddings=2048, tie_word_embeddings=True)),
}

# The epoch a resample is compared with, per kind: (dataset, train examples).
EPOCHS = {
    "cls": ("GLUE RTE train", 2490),
    "lm": ("E2E train part of dev.csv (80% of MRs, split_by_mr seed 0)", 3745),
}
DEFAULT_BATCH = {"cls": 8, "lm": 4}
MIB = 2**20


@dataclass(frozen=True)
class Target:
    """A ratio the benchmark must meet: ``low <= value <= high`` for models of ``kinds``."""

    label: str
    key: str
    low: float
    high: float
    kinds: tuple[str, ...] = KINDS

    def bound(self) -> str:
        return f"<= {self.high:g}" if self.low == -math.inf else f"{self.low:g} .. {self.high:g}"


TARGETS = (
    Target("ROSA/LoRA train step time", "step_time_rosa_over_lora", -math.inf, 1.05),
    Target("ROSA/LoRA peak training memory (tensors)", "peak_rosa_over_lora", -math.inf, 1.05),
    Target("ROSA/LoRA peak process RSS", "rss_rosa_over_lora", -math.inf, 1.05),
    Target("ROSA/full peak training memory, AdamW (tensors)", "peak_rosa_over_full", -math.inf, 0.6, ("lm",)),
    Target("merged ROSA/original inference latency", "latency_merged_rosa_over_original", 0.97, 1.03),
    Target("one resample / one epoch (RTE-sized)", "resample_over_epoch", -math.inf, 0.02, ("cls",)),
    Target("one resample / one epoch (E2E-sized)", "resample_over_epoch", -math.inf, 0.01, ("lm",)),
)


@dataclass
class BenchSettings:
    """Every knob of the benchmark; models are ``NAME[:cls|lm]`` (alias, folder, hub id or random config)."""

    models: list[str] = field(default_factory=lambda: ["minilm", "smollm2"])
    batch_size: Optional[int] = None  # None: 8 for classifiers, 4 for causal LMs
    seq_len: int = 128
    rank: int = 8
    selection: str = "random"
    svd: str = "full"
    dtype: str = "float32"
    factor_dtype: Optional[str] = None
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    threads: Optional[int] = None
    steps: int = 10
    warmup: int = 2
    latency_reps: int = 10
    resample_reps: int = 3
    rss: bool = True
    rss_steps: int = 3
    epoch_examples: Optional[int] = None
    lr: float = 1e-4
    note: str = ""

    @classmethod
    def tiny(cls, **overrides: Any) -> "BenchSettings":
        """Seconds-long settings on tiny random models, so CI runs every code path."""
        return cls(**{
            "models": ["tiny-bert", "tiny-llama"], "batch_size": 2, "seq_len": 16, "steps": 2, "warmup": 1,
            "latency_reps": 2, "resample_reps": 1, "rss_steps": 1, **overrides,
        })


# -- models and batches -------------------------------------------------------------------------
def parse_model(spec: str) -> tuple[str, str]:
    """``NAME[:cls|lm]`` -> (name, kind); without a kind, known names and config architectures decide."""
    name, _, kind = spec.rpartition(":") if spec.endswith((":cls", ":lm")) else (spec, "", "")
    if kind:
        return name, kind
    if name in KNOWN_KINDS:
        return name, KNOWN_KINDS[name]
    if name in RANDOM_MODELS:
        return name, RANDOM_MODELS[name][0]
    from transformers import AutoConfig

    architectures = AutoConfig.from_pretrained(name).architectures or []
    return name, "lm" if any(a.endswith("ForCausalLM") for a in architectures) else "cls"


def load_model(name: str, kind: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The model to benchmark, on ``device`` in ``dtype``: random weights for ``RANDOM_MODELS``, else pretrained."""
    if name in RANDOM_MODELS:
        import transformers

        _, config_class, kwargs = RANDOM_MODELS[name]
        config = getattr(transformers, config_class)(**kwargs, num_labels=2)
        auto = transformers.AutoModelForCausalLM if kind == "lm" else transformers.AutoModelForSequenceClassification
        torch.manual_seed(0)
        with device:
            model = auto.from_config(config, dtype=dtype)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = 0
        return model
    model = load_causal_lm(name, dtype) if kind == "lm" else load_sequence_classifier(name, 2, dtype=dtype)
    return model.to(device)


def make_batch(model: nn.Module, kind: str, batch: int, seq: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random token ids ``[batch, seq]`` with labels (the ids themselves for a causal LM, 0/1 for a classifier)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (batch, seq), generator=g)
    labels = ids.clone() if kind == "lm" else torch.randint(0, 2, (batch,), generator=g)
    batch_ = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in batch_.items()}


def prepare(model: nn.Module, method: str, s: BenchSettings) -> tuple[nn.Module, torch.optim.Optimizer]:
    """``model`` ready for ``method`` (the same targets and rank for ROSA and LoRA) and its AdamW optimizer."""
    head = classifier_head(model) or None
    if method == "rosa":
        config = rosa.RosaConfig(
            rank=s.rank, selection=s.selection, modules_to_save=head, factor_dtype=s.factor_dtype, svd=s.svd
        )
        model = rosa.wrap(model, config)
    else:
        model = prepare_model(model, method, s.rank, selection=s.selection, modules_to_save=head)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s.lr)
    return model, optimizer


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> None:
    """Forward, backward and optimizer step; the gradients stay until the next step starts."""
    optimizer.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    optimizer.step()


# -- measuring ------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of ``fn()``, synchronizing CUDA around it."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class AllocationTrace:
    """Bytes the CPU allocator handed out while a function ran: net (still live after) and peak."""

    net: int
    peak: int


def allocation_trace(fn: Callable[[], Any]) -> AllocationTrace:
    """Net and peak of CPU tensor allocations during ``fn()``, from the torch profiler's time-ordered records."""
    from torch._C._profiler import _EventType

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = []  # (time, bytes, address), the tree walked in call order
    nodes = list(reversed(prof.profiler.kineto_results.experimental_event_tree()))
    while nodes:
        node = nodes.pop()
        nodes.extend(reversed(node.children))
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            records.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.ptr))
    records.sort(key=lambda record: record[0])  # stable: ties keep call order
    return AllocationTrace(net=sum(size for _, size, _ in records), peak=peak_bytes([r[1:] for r in records]))


def peak_bytes(records: list[tuple[int, int]]) -> int:
    """The highest running total of time-ordered ``(bytes, address)`` allocator records (frees negative).

    A free can be recorded after the allocator has already handed its address out again (seen with
    gloo collectives, whose buffers are released on another thread): an allocation at a live address
    counts as the free of the block there, and the late record of that free is skipped.
    """
    live: dict[int, int] = {}  # address -> bytes of the block allocated there
    freed_early: Counter = Counter()  # addresses whose free is still to be recorded
    total = peak = 0
    for size, address in records:
        if size > 0:
            if address in live:
                total -= live.pop(address)
                freed_early[address] += 1
            live[address] = size
        elif freed_early[address]:
            freed_early[address] -= 1
            continue
        else:
            live.pop(address, None)
        total += size
        peak = max(peak, total)
    return peak


def transient_peak(fn: Callable[[], Any], device: torch.device) -> int:
    """Highest tensor memory during ``fn()`` above what was allocated when it started, in bytes."""
    if device.type != "cuda":
        return allocation_trace(fn).peak
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


def storage_bytes(tensors: Iterable[Optional[torch.Tensor]]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and tied weights count once)."""
    storages = {}
    for tensor in tensors:
        if tensor is not None:
            storage = tensor.untyped_storage()
            storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]


def byte_counts(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Exact bytes of parameters (all and trainable), buffers, gradients and optimizer state."""
    params = list(model.parameters())
    return {
        "parameters": storage_bytes(params),
        "trainable": storage_bytes(p for p in params if p.requires_grad),
        "buffers": storage_bytes(model.buffers()),
        "gradients": storage_bytes(p.grad for p in params),
        "optimizer_state": storage_bytes(optimizer_tensors(optimizer)),
    }


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the method keeps between steps: parameters, buffers, gradients, optimizer state."""
    params = list(model.parameters())
    grads = [p.grad for p in params]
    return storage_bytes(itertools.chain(params, model.buffers(), grads, optimizer_tensors(optimizer)))


def rotated(items: list[str], shift: int) -> list[str]:
    shift %= len(items)
    return items[shift:] + items[:shift]


def alternating_times(
    fns: dict[str, Callable[[], Any]], reps: int, warmup: int, device: torch.device, desc: str
) -> dict[str, list[float]]:
    """Per name, the wall times of ``reps`` calls after ``warmup``; each repetition calls every function, in rotating order."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in progress(range(warmup + reps), desc=desc):
        for name in rotated(list(fns), rep):
            seconds = timed(fns[name], device)
            if rep >= warmup:
                times[name].append(seconds)
    return times


# -- peak RSS, one child process per method ------------------------------------------------------
def rss_worker(name: str, kind: str, method: str, s: BenchSettings) -> dict[str, int]:
    """In a fresh process: load, prepare and train ``s.rss_steps`` steps; the process peak RSS after loading and after training."""
    apply_threads(s)
    device = torch.device("cpu")
    model = load_model(name, kind, getattr(torch, s.dtype), device)
    batch = make_batch(model, kind, batch_size(s, kind), s.seq_len, device)
    loaded = peak_rss_bytes()
    model, optimizer = prepare(model, method, s)
    for _ in range(s.rss_steps):
        train_step(model, optimizer, batch)
    return {"after_load": loaded, "peak": peak_rss_bytes()}


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    On Linux, ``VmHWM`` of its own address space: ``ru_maxrss`` survives fork + exec, so a spawned
    child would report its parent's peak when that is higher. Elsewhere ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB elsewhere


def child_rss(name: str, kind: str, s: BenchSettings) -> dict[str, dict[str, int]]:
    """Peak RSS per method, each measured in its own fresh spawned process (the methods run concurrently)."""
    with ExitStack() as stack:
        pools = {m: stack.enter_context(ProcessPoolExecutor(1, mp_context=get_context("spawn"))) for m in METHODS}
        futures = {m: pool.submit(rss_worker, name, kind, m, s) for m, pool in pools.items()}
        return {m: future.result() for m, future in futures.items()}


# -- one model -----------------------------------------------------------------------------------
def batch_size(s: BenchSettings, kind: str) -> int:
    return s.batch_size or DEFAULT_BATCH[kind]


def apply_threads(s: BenchSettings) -> None:
    if s.threads:
        torch.set_num_threads(s.threads)


@contextmanager
def threads_of(s: BenchSettings) -> Iterator[None]:
    """``s.threads`` torch CPU threads inside the block; the previous number after it."""
    before = torch.get_num_threads()
    apply_threads(s)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bench_model(name: str, kind: str, s: BenchSettings) -> dict[str, Any]:
    """Every measurement for one model; the methods' models live side by side for the alternation."""
    device = torch.device(s.device)
    original = load_model(name, kind, getattr(torch, s.dtype), device).eval()
    batch = make_batch(original, kind, batch_size(s, kind), s.seq_len, device)
    runs = {method: prepare(copy.deepcopy(original), method, s) for method in METHODS}

    step_times = alternating_times(
        {m: (lambda run=run: train_step(*run, batch)) for m, run in runs.items()}, s.steps, s.warmup, device,
        f"{name}: train",
    )
    counts = {m: byte_counts(*runs[m]) for m in METHODS}
    peaks = {m: resident_bytes(*run) + transient_peak(lambda run=run: train_step(*run, batch), device)
             for m, run in runs.items()}
    resample = bench_resample(*runs["rosa"], s, device)
    del runs["full"]  # frees the largest state before the inference copies

    rosa_model, lora_model = runs["rosa"][0], runs["lora"][0]
    inference = {
        "original": original,
        "original_copy": copy.deepcopy(original),  # a control: the spread between identical models is noise
        "merged_rosa": rosa.merge(rosa_model).eval(),
        "lora_unmerged": lora_model.eval(),
        "lora_merged": copy.deepcopy(lora_model).merge_and_unload().eval(),
    }
    latency = alternating_times(
        {k: (lambda m=m: forward(m, batch)) for k, m in inference.items()}, s.latency_reps, 1, device, f"{name}: latency"
    )
    result = {
        "kind": kind,
        "batch_size": batch_size(s, kind),
        "seq_len": s.seq_len,
        "step_time_s": {m: statistics.median(t) for m, t in step_times.items()},
        "step_time_min_s": {m: min(t) for m, t in step_times.items()},
        "step_times_s": step_times,
        "peak_training_bytes": peaks,
        "bytes_after_step": counts,
        "resample": resample,
        "latency_s": {k: statistics.median(t) for k, t in latency.items()},
        "latency_min_s": {k: min(t) for k, t in latency.items()},
        "latency_times_s": latency,
    }
    del runs, inference, original, rosa_model, lora_model
    if s.rss and device.type == "cpu":
        result["peak_rss_bytes"] = child_rss(name, kind, s)
    result["epoch"] = epoch(result, s)
    result["ratios"] = ratios(result)
    return result


@torch.inference_mode()
def forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    model(**{k: v for k, v in batch.items() if k != "labels"})


def bench_resample(
    model: nn.Module, optimizer: torch.optim.Optimizer, s: BenchSettings, device: torch.device
) -> dict[str, Any]:
    """Median seconds of one whole-model ``rosa.resample`` (batched SVDs), alternating with the same resample
    done layer by layer."""
    layers = list(rosa.rosa_layers(model).values())
    fns = {"batched": lambda: rosa.resample(model, optimizer), "per_layer": lambda: [la.resample() for la in layers]}
    times = alternating_times(fns, s.resample_reps, 0, device, "resample")
    return {"seconds": statistics.median(times["batched"]), "per_layer_seconds": statistics.median(times["per_layer"]),
            "times_s": times, "layers": len(layers)}


def epoch(result: dict[str, Any], s: BenchSettings) -> dict[str, Any]:
    """One epoch of the stated dataset at the benchmark's batch size, timed by ROSA's median step."""
    dataset, examples = EPOCHS[result["kind"]]
    if s.epoch_examples:
        dataset, examples = "as given by --epoch-examples", s.epoch_examples
    steps = math.ceil(examples / result["batch_size"])
    seconds = steps * result["step_time_s"]["rosa"]
    return {"dataset": dataset, "examples": examples, "steps": steps, "seconds": seconds,
            "resample_fraction": result["resample"]["seconds"] / seconds}


def ratios(result: dict[str, Any]) -> dict[str, float]:
    step, peak, latency = result["step_time_s"], result["peak_training_bytes"], result["latency_s"]
    out = {
        "step_time_rosa_over_lora": step["rosa"] / step["lora"],
        "step_time_rosa_over_full": step["rosa"] / step["full"],
        "peak_rosa_over_lora": peak["rosa"] / peak["lora"],
        "peak_rosa_over_full": peak["rosa"] / peak["full"],
        "latency_merged_rosa_over_original": latency["merged_rosa"] / latency["original"],
        "latency_lora_unmerged_over_original": latency["lora_unmerged"] / latency["original"],
        "latency_lora_merged_over_original": latency["lora_merged"] / latency["original"],
        "latency_original_copy_over_original": latency["original_copy"] / latency["original"],
        "resample_over_epoch": result["epoch"]["resample_fraction"],
        # by the fastest repetition: external load only ever slows a run down
        "step_time_rosa_over_lora_min": result["step_time_min_s"]["rosa"] / result["step_time_min_s"]["lora"],
        "latency_merged_rosa_over_original_min": result["latency_min_s"]["merged_rosa"] / result["latency_min_s"]["original"],
    }
    if "peak_rss_bytes" in result:
        rss = {m: r["peak"] for m, r in result["peak_rss_bytes"].items()}
        out |= {"rss_rosa_over_lora": rss["rosa"] / rss["lora"], "rss_rosa_over_full": rss["rosa"] / rss["full"]}
    return out


def evaluate_targets(models: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target that applies to a measured model, with its value and whether it is met."""
    rows = []
    for name, result in models.items():
        for target in TARGETS:
            value = result["ratios"].get(target.key)
            if result["kind"] in target.kinds and value is not None:
                met = target.low <= value <= target.high
                rows.append({"target": target.label, "model": name, "measured": value,
                             "bound": target.bound(), "met": "met" if met else "NOT met"})
    return rows


# -- the run and its report ----------------------------------------------------------------------
def run(s: BenchSettings) -> dict[str, Any]:
    """Benchmark every model of ``s``; returns the JSON-ready result."""
    models = {}
    with threads_of(s):
        machine = machine_info() | {"load_average_start": os.getloadavg()}
        for spec in s.models:
            name, kind = parse_model(spec)
            models[name] = bench_model(name, kind, s)
    machine["load_average_end"] = os.getloadavg()
    return {"settings": asdict(s), "machine": machine, "models": models, "targets": evaluate_targets(models)}


def mib(value: Optional[int]) -> Optional[float]:
    return None if value is None else value / MIB


def model_table(name: str, r: dict[str, Any]) -> str:
    """Per-method measurements of one model as markdown."""
    rows = [{"metric": "train step, median s", **r["step_time_s"]}, {"metric": "train step, min s", **r["step_time_min_s"]},
            {"metric": "peak training memory, MiB (tensors)", **{m: mib(b) for m, b in r["peak_training_bytes"].items()}}]
    if "peak_rss_bytes" in r:
        rows.append({"metric": "peak process RSS, MiB", **{m: mib(v["peak"]) for m, v in r["peak_rss_bytes"].items()}})
    for key in ("parameters", "trainable", "gradients", "optimizer_state"):
        rows.append({"metric": f"{key.replace('_', ' ')}, MiB", **{m: mib(c[key]) for m, c in r["bytes_after_step"].items()}})
    latency = [{"metric": "inference latency, median s", **r["latency_s"]},
               {"metric": "inference latency, min s", **r["latency_min_s"]}]
    rs, ep = r["resample"], r["epoch"]
    return "\n\n".join([
        f"### {name} ({r['kind']}, batch {r['batch_size']} x {r['seq_len']} tokens)",
        format_table(rows, ["metric", *METHODS]),
        format_table(latency, ["metric", *r["latency_s"]]),
        f"One whole-model resample ({rs['layers']} layers, batched SVDs): median {rs['seconds']:.3g} s "
        f"(layer by layer: {rs['per_layer_seconds']:.3g} s). One epoch of {ep['dataset']} "
        f"({ep['examples']:,} examples = {ep['steps']} steps at ROSA's median step) = {ep['seconds']:.4g} s, "
        f"so a resample costs {100 * ep['resample_fraction']:.3g}% of an epoch.",
    ])


def render_markdown(result: dict[str, Any]) -> str:
    """The report body: settings, the targets table and one section per model."""
    s, machine = result["settings"], result["machine"]
    load = f"load average {machine['load_average_start'][0]:.1f} at start, {machine['load_average_end'][0]:.1f} at end"
    header = (
        f"Device {s['device']}, base dtype {s['dtype']}, factor dtype {s['factor_dtype'] or 'as base'}, rank {s['rank']} "
        f"({s['selection']}, svd={s['svd']}), AdamW; {s['steps']} timed steps after {s['warmup']} warmup, "
        f"methods alternating each repetition; {load}, torch threads {machine['torch_threads']}."
    )
    if s["note"]:
        header += f"\n\n{s['note']}"
    sections = [model_table(name, r) for name, r in result["models"].items()]
    targets = format_table(result["targets"], ["target", "model", "measured", "bound", "met"], floatfmt=".3f")
    floor = "; ".join(f"{name} {r['ratios']['latency_original_copy_over_original']:.3f}"
                      for name, r in result["models"].items())
    noise = f"Latency noise floor (an identical copy of the original model / the original, same run): {floor}."
    return "\n\n".join([header, "## Targets", targets, noise, "## Measurements", *sections])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options of ``rosa bench``."""
    d = BenchSettings()
    parser.add_argument("--models", nargs="+", help="NAME[:cls|lm]: 'minilm', 'smollm2', a folder, a hub id, or a random "
                        f"config ({', '.join(RANDOM_MODELS)}) (default: {' '.join(d.models)})")
    parser.add_argument("--tiny", action="store_true", help="tiny random BERT and Llama, 1-2 steps: a smoke test for CI")
    parser.add_argument("--batch-size", type=int, help="default: 8 for classifiers, 4 for causal LMs")
    parser.add_argument("--seq-len", type=int, help=f"tokens per example (default: {d.seq_len})")
    parser.add_argument("--rank", type=int, help=f"ROSA/LoRA rank (default: {d.rank})")
    parser.add_argument("--selection", choices=SELECTIONS, help=f"which singular vectors ROSA trains (default: {d.selection})")
    parser.add_argument("--svd", choices=SVD_METHODS, help=(
        "ROSA's SVD: 'full' (exact, default) or 'randomized' (leading triplets by a randomized range finder: faster "
        "on large layers, approximate; only selection 'top' uses it, 'random'/'bottom' need the exact SVD)"))
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="base weight dtype (default: float32)")
    parser.add_argument("--factor-dtype", choices=dtype_names(FACTOR_DTYPES), help="ROSA factor dtype (default: the base weight dtype)")
    parser.add_argument("--device", help=f"default: {d.device}")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--steps", type=int, help=f"timed train steps per method (default: {d.steps})")
    parser.add_argument("--warmup", type=int, help=f"untimed steps first (default: {d.warmup})")
    parser.add_argument("--latency-reps", type=int, help=f"timed inference repetitions (default: {d.latency_reps})")
    parser.add_argument("--resample-reps", type=int, help=f"timed resamples per method (default: {d.resample_reps})")
    parser.add_argument("--no-rss", dest="rss", action="store_false", default=None, help="skip the per-method child processes")
    parser.add_argument("--rss-steps", type=int, help=f"train steps in each peak-RSS child process (default: {d.rss_steps})")
    parser.add_argument("--epoch-examples", type=int, help="train examples per epoch (default: RTE 2,490 / E2E 3,745)")
    parser.add_argument("--note", help="a line for the report, e.g. that the machine was shared (default: none)")
    parser.add_argument("--out", default="runs/bench", help="output folder (default: %(default)s)")
    parser.add_argument("--name", default="perf", help="output file stem: NAME.json, NAME.md (default: %(default)s)")


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """Settings from parsed arguments (``--tiny`` first, then every option given); raises ``ValueError`` on bad values."""
    given = {f.name: getattr(args, f.name) for f in fields(BenchSettings) if getattr(args, f.name, None) is not None}
    s = BenchSettings.tiny(**given) if args.tiny else BenchSettings(**given)
    for key in ("seq_len", "rank", "steps", "latency_reps", "resample_reps", "rss_steps"):
        if getattr(s, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(s, key)}")
    for key in ("batch_size", "threads", "epoch_examples"):
        if getattr(s, key) is not None and getattr(s, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(s, key)}")
    if s.warmup < 1:
        raise ValueError(f"--warmup must be >= 1 (the first step allocates optimizer state), got {s.warmup}")
    return s


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``rosa bench``: print the report and write OUT/NAME.json and OUT/NAME.md."""
    s = settings_from_args(args)
    result = run(s)
    body = render_markdown(result)
    out = Path(args.out)
    write_json(out / f"{args.name}.json", result)
    write_markdown(out / f"{args.name}.md", "rosa bench: ROSA vs LoRA vs full fine-tuning", body, result["machine"])
    print(body)
    print(f"\nwrote {out / (args.name + '.json')} and {out / (args.name + '.md')}")
    return result
