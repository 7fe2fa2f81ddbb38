import itertools
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import chi2

from rosa import subspace


@given(
    out=st.integers(1, 24), inp=st.integers(1, 24), data=st.data(),
    selection=st.sampled_from(["random", "block", "top", "bottom"]),
    singular_values=st.sampled_from(subspace.SINGULAR_VALUE_PLACEMENTS),
)
def test_factorize_reconstructs_weight(out, inp, data, selection, singular_values):
    rank = data.draw(st.integers(1, min(out, inp)))
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(out * 100 + inp))
    generator = subspace.layer_generator(0, "l", 0)
    up, down, residual = subspace.factorize(w, rank, selection, generator, singular_values=singular_values)
    assert up.shape == (out, rank) and down.shape == (rank, inp) and residual.shape == (out, inp)
    assert torch.allclose(residual + up @ down, w, atol=1e-5 * max(1.0, w.abs().max().item()))


def test_factors_split_singular_values_evenly_and_residual_is_the_rest():
    w = torch.randn(10, 7, dtype=torch.float64)
    s_ref = torch.linalg.svdvals(w)  # float64 reference
    idx = torch.tensor([1, 4, 5])
    up, down = subspace.split_factors(*subspace.svd(w), idx)
    residual = w.float() - up @ down
    # Each factor carries sqrt(s): column norms of up == row norms of down == sqrt(s_i).
    assert torch.allclose(up.norm(dim=0).double(), s_ref[idx].sqrt(), atol=1e-5)
    assert torch.allclose(down.norm(dim=1).double(), s_ref[idx].sqrt(), atol=1e-5)
    # The residual's nonzero singular values are exactly the unselected ones.
    rest = torch.tensor([i for i in range(7) if i not in idx.tolist()])
    assert torch.allclose(torch.linalg.svdvals(residual.double())[: len(rest)], s_ref[rest], atol=1e-5)


@pytest.mark.parametrize("singular_values, up_power", [("split", 0.5), ("down", 0.0), ("up", 1.0)])
def test_singular_values_go_where_asked_and_the_product_is_the_same(singular_values, up_power):
    w = torch.randn(9, 12, dtype=torch.float64)
    u_ref, s_ref, vh_ref = torch.linalg.svd(w, full_matrices=False)  # float64 reference
    idx = torch.tensor([0, 3, 7])
    up, down = subspace.split_factors(*subspace.svd(w), idx, singular_values)
    # up's column norms are s**up_power, down's row norms s**(1 - up_power): [R] each.
    assert torch.allclose(up.norm(dim=0).double(), s_ref[idx] ** up_power, atol=1e-5)
    assert torch.allclose(down.norm(dim=1).double(), s_ref[idx] ** (1 - up_power), atol=1e-5)
    product = (u_ref[:, idx] * s_ref[idx]) @ vh_ref[idx]  # [out, in], sign-independent
    assert torch.allclose((up @ down).double(), product, atol=1e-5)


def test_unknown_singular_value_placement_is_rejected():
    with pytest.raises(ValueError, match="singular_values must be one of split, down, up, got 'both'"):
        subspace.split_factors(*subspace.svd(torch.randn(4, 4)), torch.tensor([0]), "both")


def test_top_and_bottom_pick_extreme_singular_values():
    s = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    g = torch.Generator()
    assert subspace.select_indices(5, 2, "top", g).tolist() == [0, 1]
    assert subspace.select_indices(5, 2, "bottom", g).tolist() == [3, 4]
    assert s[subspace.select_indices(5, 2, "top", g)].min() >= s.max() - 1


def test_select_rejects_bad_rank_and_strategy():
    g = torch.Generator()
    with pytest.raises(ValueError, match="rank"):
        subspace.select_indices(4, 5, "random", g)
    with pytest.raises(ValueError, match="selection"):
        subspace.select_indices(4, 2, "middle", g)


@pytest.mark.parametrize("selection, cells", [
    ("random", [tuple(c) for c in itertools.combinations(range(6), 2)]),  # all C(6, 2) = 15 subsets
    ("block", [(start, start + 1) for start in range(5)]),  # the 5 runs of 2 consecutive indices
])
def test_random_selections_are_uniform_over_their_index_sets(selection, cells):
    """Chi-square test: each allowed index set drawn equally often over many (name, count) keys."""
    n, k, draws = 6, 2, 6000
    counts: dict[tuple, int] = {}
    for i in range(draws):
        idx = subspace.select_indices(n, k, selection, subspace.layer_generator(7, f"layer{i % 50}", i // 50))
        counts[tuple(idx.tolist())] = counts.get(tuple(idx.tolist()), 0) + 1
    assert sorted(counts) == cells
    expected = draws / len(cells)
    stat = sum((c - expected) ** 2 / expected for c in counts.values())
    assert stat < chi2.ppf(0.999, len(cells) - 1), (stat, counts)


def test_selection_differs_between_resamples_and_layers_and_seeds():
    def draw(seed, name, count):
        return subspace.select_indices(64, 8, "random", subspace.layer_generator(seed, name, count)).tolist()

    base = draw(0, "encoder.q", 0)
    assert draw(0, "encoder.q", 0) == base
    assert draw(0, "encoder.q", 1) != base
    assert draw(0, "encoder.k", 0) != base
    assert draw(1, "encoder.q", 0) != base


def test_selection_is_identical_in_another_process():
    code = (
        "from rosa import subspace;"
        "print(subspace.select_indices(100, 10, 'random', subspace.layer_generator(3, 'a.b', 2)).tolist())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    mine = subspace.select_indices(100, 10, "random", subspace.layer_generator(3, "a.b", 2)).tolist()
    assert other == str(mine)


def test_factorize_of_half_precision_weight_runs_in_float32():
    w = torch.randn(16, 8).to(torch.bfloat16)
    up, down, residual = subspace.factorize(w, 4, "random", subspace.layer_generator(0, "x", 0))
    assert up.dtype == down.dtype == residual.dtype == torch.float32


@given(out=st.integers(1, 24), inp=st.integers(1, 24), batch=st.integers(1, 3))
def test_svd_error_is_small_for_a_correct_svd_and_flags_a_broken_one(out, inp, batch):
    w = torch.randn(batch, out, inp)
    u, s, vh = subspace.thin_svd(w)  # on the CPU: torch.linalg.svd of each matrix alone
    expected = [torch.stack(parts) for parts in zip(*(torch.linalg.svd(m, full_matrices=False) for m in w))]
    assert torch.equal(u, expected[0]) and torch.equal(s, expected[1]) and torch.equal(vh, expected[2])
    assert (subspace.svd_error(w, u, s, vh) <= 1e-5).all()
    broken_u = u.clone()
    broken_u[0, :, 0] *= 1.01  # no longer unit length, and U diag(s) Vh no longer W
    errors = subspace.svd_error(w, broken_u, s, vh)
    assert errors[0] >= 0.02  # |u0|^2 - 1 = 1.01^2 - 1
    assert (errors[1:] <= 1e-5).all()
    broken_u[0, 0, 0] = float("nan")
    assert not subspace.svd_error(w, broken_u, s, vh)[0] <= subspace.SVD_TOLERANCE  # NaN fails the check


def test_checked_svd_redoes_exactly_the_matrices_the_fast_method_fails_on():
    """The CUDA path's logic, on the CPU: a fast SVD that raises on zero matrices and breaks matrix 2."""
    w = torch.randn(2, 3, 6, 4)
    w[0, 1] = 0  # the fast method raises on a batch holding this one
    exact_calls = []

    def fast(batch):
        if (torch.linalg.matrix_norm(batch) == 0).any():
            raise torch.linalg.LinAlgError("failed to converge")
        u, s, vh = torch.linalg.svd(batch, full_matrices=False)
        if batch.shape[0] > 1:
            u[2] *= 1.5  # a silent failure on matrix 2
        return u, s, vh

    def exact(batch):
        exact_calls.append(batch.shape[0])
        return torch.linalg.svd(batch, full_matrices=False)

    u, s, vh = subspace.checked_svd(w, fast, exact)
    assert u.shape == (2, 3, 6, 4) and s.shape == (2, 3, 4) and vh.shape == (2, 3, 4, 4)
    assert exact_calls == [1]  # only the zero matrix: one by one, matrix 2 is not broken
    assert (subspace.svd_error(w.reshape(-1, 6, 4), u.reshape(-1, 6, 4), s.reshape(-1, 4), vh.reshape(-1, 4, 4))
            <= 1e-5).all()

    exact_calls.clear()
    w[0, 1] = torch.randn(6, 4)
    u, s, vh = subspace.checked_svd(w, fast, exact)
    assert exact_calls == [1]  # matrix 2, caught by the accuracy check
    expected = torch.linalg.svd(w, full_matrices=False)
    assert torch.allclose(u, expected.U) and torch.allclose(s, expected.S) and torch.allclose(vh, expected.Vh)
