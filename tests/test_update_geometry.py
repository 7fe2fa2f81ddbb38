"""Update-geometry measurements against independent computations (numpy norms, scipy's principal angles)."""

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import rosa
from rosa.experiments.update_geometry import (
    consecutive_overlaps,
    energy_rank,
    factor_subspaces,
    layer_weights,
    numerical_rank,
    stable_rank,
    subspace_overlap,
    update_ranks,
)


def with_singular_values(rows: int, cols: int, values: list[float], seed: int) -> torch.Tensor:
    """A ``[rows, cols]`` matrix with exactly the singular values ``values`` (random singular vectors)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(values), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(values), generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ v.T


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(2, 16), cols=st.integers(2, 16), seed=st.integers(0, 10_000),
       fraction=st.sampled_from([0.5, 0.9, 0.99, 1.0]), data=st.data())
def test_energy_rank_counts_the_directions_holding_the_fraction(rows, cols, seed, fraction, data):
    values = sorted(data.draw(st.lists(st.floats(0.01, 10.0), min_size=1, max_size=min(rows, cols))), reverse=True)
    total, held, expected = sum(v * v for v in values), 0.0, 0
    while held < fraction * total * (1 - 1e-12):  # count singular values until their energy reaches the fraction
        held += values[expected] ** 2
        expected += 1
    assert energy_rank(with_singular_values(rows, cols, values, seed).float(), fraction) == expected


def test_energy_rank_of_zero_is_zero_and_a_bad_fraction_is_named():
    assert energy_rank(torch.zeros(4, 3)) == 0
    with pytest.raises(ValueError, match="fraction must be in"):
        energy_rank(torch.eye(3), 0.0)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_stable_rank_matches_numpy_norms(rows, cols, seed):
    a = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    expected = np.linalg.norm(a.numpy(), "fro") ** 2 / np.linalg.norm(a.numpy(), 2) ** 2
    assert stable_rank(a) == pytest.approx(expected, rel=1e-5)
    assert stable_rank(torch.zeros(rows, cols)) == 0.0


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(2, 16), cols=st.integers(2, 16), seed=st.integers(0, 10_000),
       rtol=st.sampled_from([1e-3, 0.1, 0.5]), data=st.data())
def test_numerical_rank_counts_the_singular_values_above_rtol_of_the_largest(rows, cols, seed, rtol, data):
    values = sorted(data.draw(st.lists(st.floats(1e-6, 10.0), min_size=1, max_size=min(rows, cols))), reverse=True)
    expected = sum(v > rtol * values[0] * (1 + 1e-9) for v in values)  # margins keep ties off the threshold
    if any(abs(v - rtol * values[0]) < 1e-6 * values[0] for v in values):
        return
    assert numerical_rank(with_singular_values(rows, cols, values, seed), rtol) == expected


def test_numerical_rank_ignores_float32_rounding_of_a_merged_low_rank_update():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 48, generator=g)
    update = 1e-2 * torch.randn(64, 3, generator=g) @ torch.randn(3, 48, generator=g)  # rank 3
    merged = (weight + update).float()  # rounded to float32, as a merged layer is
    assert torch.linalg.matrix_rank(merged.double() - weight.double()) > 3  # the rounding is full rank
    assert numerical_rank(merged.double() - weight.double()) == 3
    assert numerical_rank(torch.zeros(3, 2)) == 0
    with pytest.raises(ValueError, match="rtol must be in"):
        numerical_rank(torch.eye(3), 1.0)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 24), seed=st.integers(0, 10_000), dtype=st.sampled_from([torch.float32, torch.float64]),
       data=st.data())
def test_subspace_overlap_is_the_mean_squared_cosine_of_scipys_principal_angles(n, seed, dtype, data):
    r = data.draw(st.integers(1, n))
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, r, generator=g, dtype=dtype), torch.randn(n, r, generator=g, dtype=dtype)
    angles = scipy.linalg.subspace_angles(a.double().numpy(), b.double().numpy())
    assert subspace_overlap(a, b) == pytest.approx(float(np.mean(np.cos(angles) ** 2)), abs=1e-5)
    mixed = a @ (torch.eye(r, dtype=dtype) + 0.5 * torch.randn(r, r, generator=g, dtype=dtype) / r)  # another basis
    assert subspace_overlap(a, mixed) == pytest.approx(1.0, abs=1e-4)


def test_subspace_overlap_of_orthogonal_spaces_is_zero_and_shapes_must_match():
    eye = torch.eye(6)
    assert subspace_overlap(eye[:, :3], eye[:, 3:]) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="one shape"):
        subspace_overlap(eye[:, :3], eye[:, :2])


def two_layer_model(selection: str, rank: int = 3) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 8))
    return rosa.wrap(model, rosa.RosaConfig(rank=rank, target_modules=["0", "2"], selection=selection, seed=3))


def drawn_indices(weight: torch.Tensor, up: torch.Tensor) -> set[int]:
    """Which of ``weight``'s left singular vectors the columns of ``up`` are (each up to scale and sign)."""
    u = torch.linalg.svd(weight.double())[0]
    return {int(i) for i in (u.T @ (up / up.norm(dim=0))).abs().argmax(0)}


@pytest.mark.parametrize("selection", ["top", "random"])
def test_consecutive_overlaps_of_untrained_resamples_count_the_shared_singular_vectors(selection):
    model = two_layer_model(selection)
    weights = {name: layer.dense_weight().detach().clone() for name, layer in rosa.rosa_layers(model).items()}
    snapshots = [factor_subspaces(model)]
    for _ in range(3):
        rosa.resample(model)  # no training: the merged weight, and so its SVD, stays put
        snapshots.append(factor_subspaces(model))
    expected = []
    for before, after in zip(snapshots, snapshots[1:]):
        shared = [len(drawn_indices(weights[name], before[name][0]) & drawn_indices(weights[name], after[name][0]))
                  / before[name][0].shape[1] for name in weights]
        expected.append(sum(shared) / len(shared))  # the right side shares the same indices
    overlaps = consecutive_overlaps(snapshots)
    assert overlaps == pytest.approx(expected, abs=1e-6)
    if selection == "top":
        assert overlaps == pytest.approx([1.0] * 3, abs=1e-6)
    else:
        assert min(overlaps) < 1.0


def test_update_ranks_of_a_merged_rosa_model_stay_within_twice_the_rank_per_subspace():
    model = two_layer_model("random", rank=2)
    pretrained = {name: layer.dense_weight().detach().double().clone() for name, layer in rosa.rosa_layers(model).items()}
    with torch.no_grad():
        for layer in rosa.rosa_layers(model).values():
            layer.up.add_(0.1 * torch.randn_like(layer.up))
            layer.down.add_(0.1 * torch.randn_like(layer.down))
    merged = rosa.merge(model)
    ranks = update_ranks(pretrained, layer_weights(merged, pretrained), fraction=1.0 - 1e-9)
    assert 1 <= ranks["energy_rank_mean"] <= ranks["energy_rank_max"] <= 4  # (up + dU)(down + dD) - up down
    assert 1.0 <= ranks["stable_rank_mean"] <= 4.0
    assert 1 <= ranks["numerical_rank_mean"] <= ranks["numerical_rank_max"] <= 4
    assert ranks["numerical_rank_max"] == max(numerical_rank(layer_weights(merged, [n])[n] - w)
                                              for n, w in pretrained.items())
