"""ROSA under accelerate's FSDP2, in 2 gloo processes, against the same training in one process: the
model preparation (``fsdp2_prepare_model``) called directly, and ``examples/accelerate_fsdp2.py`` (the
Trainer with RosaCallback) under ``accelerate launch --config_file examples/accelerate_fsdp2.yaml``.

accelerate 1.16 turns its FSDP plugin on only for accelerator launches: the first tests hand the plugin
to a CPU ``Accelerator``; the launch goes through ``accelerate_fsdp2_on_cpu.py``, which keeps the plugin
on for CPU processes and changes nothing else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("accelerate")
pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import rosa  # noqa: E402

from helpers import REPO, free_port, spawn_gloo, train_resampling  # noqa: E402

WORLD = 2
BATCH = 8  # global batch, BATCH // WORLD rows per rank
STEPS = 4
RESAMPLE_EVERY = 2

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def tiny_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)


def build(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return rosa.wrap(LlamaForCausalLM(tiny_config()), rosa.RosaConfig(rank=4, seed=0))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 64, (BATCH, 16), generator=torch.Generator().manual_seed(step))
    return ids, ids


def causal_lm_loss(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=labels).loss


def train(model: torch.nn.Module, rows: slice) -> torch.Tensor:
    """AdamW on the causal-LM loss of ``rows`` of each batch, resampling every RESAMPLE_EVERY steps."""
    return train_resampling(model, batch, rows, STEPS, RESAMPLE_EVERY, loss_fn=causal_lm_loss)


def prepare(rank: int, model: torch.nn.Module, **plugin) -> torch.nn.Module:
    """``model`` prepared by accelerate's FSDP2 code (``fully_shard`` per decoder layer, then the root), with
    the ``Accelerator`` of this process (made on the first call) given an FSDP2 plugin of ``plugin`` settings."""
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    accelerator = Accelerator(cpu=True, mixed_precision=plugin.get("mixed_precision_policy", "no"))
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        reshard_after_forward=True, **plugin)
    return fsdp2_prepare_model(accelerator, model)


def accelerate_run(rank: int) -> dict:
    """Prepared by accelerate (with and without its rank-0 loading, where rank 1 starts from other
    weights), trained with resamples, then merged; the mean losses and the full merged state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    result = {}
    for rank0_loading in (False, True):
        model = prepare(rank, build(seed=rank if rank0_loading else 0), cpu_ram_efficient_loading=rank0_loading)
        per = BATCH // WORLD
        losses = train(model, slice(rank * per, (rank + 1) * per))
        dist.all_reduce(losses)
        rosa.merge(model)
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        result[rank0_loading] = {"losses": losses / WORLD, "state": state,
                                 "sharded": type(model.model.layers[0].self_attn.q_proj.weight).__name__}
    return result


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict:
    return spawn_gloo(accelerate_run, WORLD, tmp_path_factory.mktemp("accelerate"))


@pytest.mark.parametrize("rank0_loading", [False, True], ids=["each-rank-loads", "rank0-loads"])
def test_accelerate_fsdp2_run_with_resamples_matches_one_process(prepared, rank0_loading):
    result = prepared[rank0_loading]
    assert result["sharded"] == "DTensor"
    model = build()
    torch.testing.assert_close(result["losses"], train(model, slice(0, BATCH)), rtol=1e-5, atol=1e-6)
    reference = rosa.merge(model).state_dict()
    assert result["state"].keys() == reference.keys()
    for name, weight in reference.items():
        torch.testing.assert_close(result["state"][name], weight, rtol=1e-5, atol=1e-5, msg=name)


def launch_example(processes: int, batch_size: int, out: Path, config: Path = REPO / "examples" / "accelerate_fsdp2.yaml") -> dict:
    """``examples/accelerate_fsdp2.py --tiny`` under ``accelerate launch`` with an FSDP2 ``config``, on CPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true",
           "PYTHONPATH": str(REPO / "src")}
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(config),
               "--num_processes", str(processes),
               "--main_process_port", str(free_port()), str(Path(__file__).parent / "accelerate_fsdp2_on_cpu.py"),
               "--tiny", "--max-steps", "4", "--resample-every", "2", "--batch-size", str(batch_size),
               "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {**json.loads((out / "result.json").read_text()), "state": torch.load(out / "merged_state_dict.pt")}


def test_accelerate_launch_fsdp2_trainer_with_callback_matches_one_process(tmp_path):
    two = launch_example(2, 2, tmp_path / "two")
    one = launch_example(1, 4, tmp_path / "one")  # the same global batches
    assert (two["world_size"], one["world_size"]) == (2, 1)
    assert two["factor_type"] == "DTensor" and two["resample_steps"] == one["resample_steps"] == [2]
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-5)
    for name, weight in one["state"].items():
        torch.testing.assert_close(two["state"][name], weight, rtol=1e-5, atol=1e-5, msg=name)
    plain = LlamaForCausalLM(tiny_config())  # the example's --tiny model
    plain.load_state_dict(two["state"])  # strict: the merged model is a plain Llama


def bf16_run(rank: int) -> dict:
    """A bfloat16 model under accelerate's bf16 mixed precision (which upcasts the trainable factors to
    float32), trained with resamples; its merge against the merged state dict computed before it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from rosa.distributed import check_rank_agreement

    torch.manual_seed(0)
    model = prepare(rank, rosa.wrap(LlamaForCausalLM(tiny_config()).to(torch.bfloat16), rosa.RosaConfig(rank=4, seed=0)),
                    mixed_precision_policy="bf16")
    layer = model.model.layers[0].self_attn.q_proj
    per = BATCH // WORLD
    losses = train(model, slice(rank * per, (rank + 1) * per))
    full = StateDictOptions(full_state_dict=True)
    expected = rosa.merged_state_dict(model, get_model_state_dict(model, options=full))
    result = {"dtypes": (layer.up.dtype, layer.base.weight.dtype), "finite": bool(losses.isfinite().all()),
              "agree": check_rank_agreement(model), "expected": expected}
    rosa.merge(model)
    result["merged"] = get_model_state_dict(model, options=full)
    return result


def test_accelerate_fsdp2_bf16_mixed_precision_trains_resamples_and_merges(tmp_path):
    result = spawn_gloo(bf16_run, WORLD, tmp_path)
    assert result["dtypes"] == (torch.float32, torch.bfloat16)  # accelerate's upcast of the trainable factors
    assert result["finite"] and result["agree"] == len(rosa.rosa_layers(build()))
    merged, expected = result["merged"], result["expected"]
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) and merged[k].dtype == torch.bfloat16 for k in merged)
    LlamaForCausalLM(tiny_config()).load_state_dict(merged)  # strict: a plain Llama


def test_trainer_save_model_under_fsdp2_full_state_dict_writes_the_merged_plain_model(tmp_path):
    """The Trainer gathers the full state dict on every rank, then only rank 0 calls save_pretrained: the
    merge must need no collective there (one used to leave the ranks' collectives mismatched)."""
    config = tmp_path / "full.yaml"
    yaml = (REPO / "examples" / "accelerate_fsdp2.yaml").read_text()
    config.write_text(yaml.replace("fsdp_state_dict_type: SHARDED_STATE_DICT", "fsdp_state_dict_type: FULL_STATE_DICT"))
    result = launch_example(2, 2, tmp_path / "out", config)
    saved = LlamaForCausalLM.from_pretrained(tmp_path / "out" / "model").state_dict()  # plain transformers
    assert saved.keys() == result["state"].keys()
    for name, weight in result["state"].items():  # what rosa.merge gave after save_model
        assert torch.equal(saved[name], weight), name
