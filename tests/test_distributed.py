"""ROSA under torch.distributed: 2-process gloo DDP on loopback vs 1 process, rank agreement, refused wrappers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

import rosa
from rosa.distributed import check_rank_agreement, layer_digest
from rosa.wrappers import check_wrappers

from helpers import spawn_gloo, train_resampling

WORLD = 2
BATCH = 8  # global batch: BATCH // WORLD rows per rank
STEPS = 6
RESAMPLE_EVERY = 2

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def build() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    return rosa.wrap(model, rosa.RosaConfig(rank=2, seed=1, target_modules=["0", "2"]))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(BATCH, 8, generator=g), torch.randn(BATCH, 4, generator=g)


def train(model: nn.Module, rows: slice, after_resample=lambda model: None) -> torch.Tensor:
    """Train STEPS steps on ``rows`` of each global batch, resampling every RESAMPLE_EVERY; the losses."""
    return train_resampling(model, batch, rows, STEPS, RESAMPLE_EVERY, lambda model, optimizer: after_resample(model))


def merged_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights with the factors folded in (independent of SVD sign choices)."""
    return rosa.merge(copy.deepcopy(model)).state_dict()


def expect_error(kind: type, action) -> str:
    try:
        action()
    except kind as err:
        return str(err)
    return "no error"


def ddp_run(rank: int) -> dict:
    """Rank ``rank``'s half of the DDP run, its agreement checks and the refused-wrapper messages."""
    model = nn.parallel.DistributedDataParallel(build())
    checks = []
    per = BATCH // WORLD
    losses = train(model, slice(rank * per, (rank + 1) * per), lambda m: checks.append(check_rank_agreement(m)))
    dist.all_reduce(losses)
    result = {"losses": losses / WORLD, "merged": merged_weights(model.module), "checks": torch.tensor(checks)}

    if rank == 1:
        layer = rosa.rosa_layers(model)["module.2"]
        with torch.no_grad():  # one ulp in one entry
            layer.up[0, 0] = torch.nextafter(layer.up[0, 0], torch.tensor(float("inf")))
    result["perturbed"] = expect_error(RuntimeError, lambda: check_rank_agreement(model))

    torch.manual_seed(0)  # same weights on both ranks; only RosaConfig.seed differs
    other_seed = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    config = rosa.RosaConfig(rank=2, seed=rank, target_modules=["0", "2"])
    result["seed"] = expect_error(RuntimeError, lambda: rosa.wrap(other_seed, config))
    result["seed_unwrapped"] = not rosa.rosa_layers(other_seed)
    behind = build()
    if rank == 1:
        rosa.resample(behind, check_ranks=False)  # one rank alone: no collective, so no hang
    result["count"] = expect_error(RuntimeError, lambda: rosa.resample(behind))
    result["count_unchanged"] = [layer.resample_count for layer in rosa.rosa_layers(behind).values()]

    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    config = rosa.RosaConfig(rank=1, target_modules=["0"])
    result["fsdp2_wrap"] = expect_error(ValueError, lambda: rosa.wrap(fully_shard(nn.Sequential(nn.Linear(4, 4))),
                                                                       config))
    fsdp1 = FullyShardedDataParallel(build(), device_id=torch.device("cpu"), use_orig_params=True)
    result["fsdp1"] = expect_error(NotImplementedError, lambda: rosa.resample(fsdp1))
    plain = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 4)))
    result["wrap_ddp"] = expect_error(ValueError, lambda: rosa.wrap(plain, config))
    return result


@pytest.fixture(scope="module")
def ddp_result(tmp_path_factory) -> dict:
    return spawn_gloo(ddp_run, WORLD, tmp_path_factory.mktemp("ddp"))


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(ddp_result):
    model = build()
    losses = train(model, slice(0, BATCH))
    torch.testing.assert_close(ddp_result["losses"], losses, rtol=1e-5, atol=1e-6)
    reference = merged_weights(model)
    assert ddp_result["merged"].keys() == reference.keys()
    for name, weight in reference.items():
        torch.testing.assert_close(ddp_result["merged"][name], weight, rtol=1e-5, atol=1e-6, msg=name)


def test_ranks_agree_bitwise_after_every_resample(ddp_result):
    assert ddp_result["checks"].tolist() == [2] * (STEPS // RESAMPLE_EVERY)


def test_a_perturbed_rank_is_named(ddp_result):
    assert "ROSA layer 'module.2' differs between rank 0 and rank(s) [1]" in ddp_result["perturbed"]


def test_a_rank_with_another_seed_is_caught_at_wrap(ddp_result):
    assert "rosa.wrap: rank(s) [1] differ from rank 0 in their RosaConfig or set of target layers" in ddp_result["seed"]
    assert ddp_result["seed_unwrapped"]


def test_resample_catches_ranks_with_different_resample_counts(ddp_result):
    expected = "rosa.resample: rank(s) [1] differ from rank 0 in their ROSA layer settings or resample counts"
    assert expected in ddp_result["count"]
    assert ddp_result["count_unchanged"] == [0, 0]  # rank 0's layers: the refused resample changed nothing


def test_fsdp1_and_wrapping_sharded_or_ddp_models_are_refused(ddp_result):
    assert "already sharded by FSDP2" in ddp_result["fsdp2_wrap"]
    assert "FullyShardedDataParallel (FSDP)" in ddp_result["fsdp1"] and "fully_shard" in ddp_result["fsdp1"]
    assert "wrap the plain model first, then build DDP" in ddp_result["wrap_ddp"]


def test_deepspeed_zero3_parameters_are_refused():
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model[0].base.weight.ds_id = 0  # what DeepSpeed ZeRO-3 attaches to partitioned parameters
    with pytest.raises(NotImplementedError, match="DeepSpeed ZeRO-3.*master copy"):
        rosa.resample(model)
    with pytest.raises(NotImplementedError, match="rosa.merge: .*DeepSpeed ZeRO-3"):
        rosa.merge(model)
    assert rosa.rosa_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    check_wrappers(build(), "resample")  # a plain model passes


def test_agreement_check_is_a_no_op_without_a_process_group():
    assert not dist.is_initialized()
    assert check_rank_agreement(build()) == 2


def test_digest_sees_one_ulp_and_the_resample_count():
    layer = rosa.rosa_layers(build())["0"]
    digest = layer_digest("0", layer)
    with torch.no_grad():
        layer.down[1, 2] = torch.nextafter(layer.down[1, 2], torch.tensor(0.0))
    assert layer_digest("0", layer)[:4] != digest[:4]
    layer.resample_count += 1
    assert layer_digest("0", layer)[4] == digest[4] + 1
