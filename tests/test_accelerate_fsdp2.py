"""ROSA through accelerate's FSDP2 preparation (``fsdp2_prepare_model``, what ``accelerate launch`` with
an FSDP2 config applies to the model), in 2 gloo processes, against the same training in one process.

accelerate only turns its FSDP plugin on for accelerator launches, so these tests hand the plugin to a
CPU ``Accelerator`` and call the preparation function directly; the Trainer side of the launch
(``examples/accelerate_fsdp2.py``) needs GPUs.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("accelerate")
pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import rosa  # noqa: E402

from helpers import spawn_gloo, train_resampling  # noqa: E402

WORLD = 2
BATCH = 8  # global batch, BATCH // WORLD rows per rank
STEPS = 4
RESAMPLE_EVERY = 2

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def build(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    return rosa.wrap(LlamaForCausalLM(config), rosa.RosaConfig(rank=4, seed=0))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 64, (BATCH, 16), generator=torch.Generator().manual_seed(step))
    return ids, ids


def causal_lm_loss(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=labels).loss


def train(model: torch.nn.Module, rows: slice) -> torch.Tensor:
    """AdamW on the causal-LM loss of ``rows`` of each batch, resampling every RESAMPLE_EVERY steps."""
    return train_resampling(model, batch, rows, STEPS, RESAMPLE_EVERY, loss_fn=causal_lm_loss)


def accelerate_run(rank: int) -> dict:
    """Prepared by accelerate (with and without its rank-0 loading, where rank 1 starts from other
    weights), trained with resamples, then merged; the mean losses and the full merged state."""
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    accelerator = Accelerator()
    result = {}
    for rank0_loading in (False, True):
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
            reshard_after_forward=True, cpu_ram_efficient_loading=rank0_loading)
        model = fsdp2_prepare_model(accelerator, build(seed=rank if rank0_loading else 0))
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
