"""Batched factorization equals per-layer factorization; the randomized SVD's error is bounded."""

import copy

import pytest
import torch
from torch import nn

import rosa
from rosa import model as rosa_model
from rosa import subspace


def reference_factorize(w: torch.Tensor, rank: int, selection: str, generator: torch.Generator):
    """The per-layer algorithm written out plainly (no batching, no sign convention): up, down, residual, indices."""
    u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
    idx = subspace.select_indices(s.shape[0], rank, selection, generator)
    up, down = u[:, idx] * s[idx].sqrt(), s[idx].sqrt()[:, None] * vh[idx]
    return up, down, w.float() - up @ down, idx


def weights(count: int, out: int, inp: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(out, inp, generator=g) for _ in range(count)]


@pytest.mark.parametrize("selection", ["random", "block", "top", "bottom"])
@pytest.mark.parametrize("shape", [(12, 7), (7, 12)])
def test_factorize_group_equals_the_per_layer_algorithm(selection, shape):
    ws = weights(5, *shape)
    gens = [subspace.layer_generator(0, f"layer{i}", 3) for i in range(5)]
    ups, downs, residuals = subspace.factorize_group(ws, 3, selection, gens)
    for i, w in enumerate(ws):
        up_ref, down_ref, res_ref, idx = reference_factorize(w, 3, selection, subspace.layer_generator(0, f"layer{i}", 3))
        s = torch.linalg.svdvals(w)
        # same index set: up's column norms are sqrt of exactly the selected singular values
        assert torch.allclose(ups[i].norm(dim=0) ** 2, s[idx], rtol=1e-4)
        assert torch.allclose(ups[i] @ downs[i], up_ref @ down_ref, atol=1e-5)  # sign-invariant
        assert torch.allclose(residuals[i], res_ref, atol=1e-5)
        # factors themselves agree with the unbatched call (canonical signs make them unique)
        up1, down1, res1 = subspace.factorize(w, 3, selection, subspace.layer_generator(0, f"layer{i}", 3))
        assert torch.allclose(ups[i], up1, atol=1e-5) and torch.allclose(downs[i], down1, atol=1e-5)
        assert torch.allclose(residuals[i], res1, atol=1e-5)


def test_canonical_signs_make_the_largest_entry_of_each_left_vector_positive():
    w = torch.stack(weights(3, 9, 6))
    u, s, vh = subspace.svd(w)
    pivot = u.abs().argmax(dim=-2, keepdim=True)
    assert (u.gather(-2, pivot) > 0).all()
    assert torch.allclose(u @ torch.diag_embed(s) @ vh, w, atol=1e-5)
    # -W has the same canonical U, and Vh flips
    u2, _, vh2 = subspace.svd(-w)
    assert torch.allclose(u2, u, atol=1e-5) and torch.allclose(vh2, -vh, atol=1e-5)


class Mixed(nn.Module):
    """Layers of three shapes; two groups hold several layers of one shape. Wide enough (>= 48) that
    ``svd="randomized"`` with ``top`` at rank 2 really runs the randomized SVD."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.ModuleList(nn.Linear(64, 64) for _ in range(3))
        self.b = nn.ModuleList(nn.Linear(64, 48) for _ in range(2))
        self.c = nn.Linear(48, 96)


def per_layer_copy(model: nn.Module) -> nn.Module:
    """A copy of a wrapped model whose layers are re-factorized one at a time (the unbatched path)."""
    other = copy.deepcopy(model)
    for layer in rosa.rosa_layers(other).values():
        layer.fold()
        layer.factorize()
    return other


def assert_same_layers(a: nn.Module, b: nn.Module) -> None:
    for (name, la), lb in zip(rosa.rosa_layers(a).items(), rosa.rosa_layers(b).values()):
        assert torch.allclose(la.up, lb.up, atol=1e-5), name
        assert torch.allclose(la.down, lb.down, atol=1e-5), name
        assert torch.allclose(la.base.weight, lb.base.weight, atol=1e-5), name
        assert la.resample_count == lb.resample_count


@pytest.mark.parametrize("svd, singular_values", [("full", "split"), ("randomized", "split"), ("full", "down")])
@pytest.mark.parametrize("selection", ["random", "top"])
def test_wrap_and_resample_batched_equal_per_layer(selection, svd, singular_values, monkeypatch):
    torch.manual_seed(0)
    config = rosa.RosaConfig(rank=2, target_modules=r".*", selection=selection, svd=svd, singular_values=singular_values)
    model = rosa.wrap(Mixed(), config)
    assert_same_layers(model, per_layer_copy(model))
    monkeypatch.setattr(rosa_model, "GROUP_BYTES", 64 * 64 * 4 * 2)  # groups split into chunks of 2
    reference = copy.deepcopy(model)
    for layer in rosa.rosa_layers(reference).values():
        layer.resample()
    rosa.resample(model)
    assert_same_layers(model, reference)


def test_groups_split_by_shape_and_chunk_size(monkeypatch):
    model = rosa.wrap(Mixed(), rosa.RosaConfig(rank=2, target_modules=r".*"))
    layers = rosa.rosa_layers(model).values()
    assert sorted(len(c) for c in rosa_model._factorize_chunks(layers)) == [1, 2, 3]
    monkeypatch.setattr(rosa_model, "GROUP_BYTES", 64 * 64 * 4 * 2)
    assert sorted(len(c) for c in rosa_model._factorize_chunks(layers)) == [1, 1, 2, 2]


def test_split_resampling_cuts_every_group_into_a_share_per_rank():
    """With 2 ranks, each group of equal shapes is cut in two, so round robin gives each rank half of
    every group's SVDs (not one rank all the large matrices and the other all the small ones)."""
    model = rosa.wrap(Mixed(), rosa.RosaConfig(rank=2, target_modules=r".*"))
    layers = rosa.rosa_layers(model).values()
    chunks = rosa_model._factorize_chunks(layers, parts=2)
    assert sorted(len(c) for c in chunks) == [1, 1, 1, 1, 2]
    assert sorted(len(c) for c in rosa_model._factorize_chunks(layers, parts=5)) == [1] * 6


def decaying_matrix(out: int, inp: int, decay: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``W = U diag(s) V^T`` with a power-law spectrum ``s_i = i^-decay`` (like pretrained weights)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(out, inp, generator=g)).Q
    v = torch.linalg.qr(torch.randn(inp, inp, generator=g)).Q
    s = torch.arange(1, inp + 1, dtype=torch.float32) ** -decay
    return (u * s) @ v.T, s


def subspace_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Sine of the largest principal angle between the column spaces of ``a`` and ``b``."""
    qa, qb = torch.linalg.qr(a.double()).Q, torch.linalg.qr(b.double()).Q
    return torch.linalg.matrix_norm(qa @ qa.T - qb @ qb.T, ord=2).item()


def test_randomized_top_triplets_error_is_bounded():
    w, s = decaying_matrix(400, 300, decay=0.5)
    gen = lambda: subspace.layer_generator(0, "w", 0)  # noqa: E731
    up, down, residual = subspace.factorize(w, 8, "top", gen(), "randomized")
    up_exact, _, _ = subspace.factorize(w, 8, "top", gen(), "full")
    approx = up.norm(dim=0) ** 2  # the selected singular values
    # measured: 5.7e-4 relative error of the singular values, 0.05 subspace distance
    assert ((approx - s[:8]).abs() / s[:8]).max() < 5e-3
    assert subspace_distance(up, up_exact) < 0.15
    # whatever the approximation, the residual is exact: the layer's function is preserved
    assert torch.allclose(residual + up @ down, w, atol=1e-5)


def test_randomized_mode_uses_the_exact_svd_when_the_selection_needs_trailing_vectors():
    assert subspace.runs_randomized("randomized", "top", 8, (576, 192))
    assert not subspace.runs_randomized("randomized", "top", 40, (576, 192))  # rank too large to pay off
    assert not any(subspace.runs_randomized("randomized", sel, 8, (576, 192)) for sel in ("random", "block", "bottom"))
    w = weights(1, 64, 48)[0]
    for selection in ("bottom", "random", "block"):  # need trailing singular vectors
        approx = subspace.factorize(w, 4, selection, subspace.layer_generator(1, "w", 0), "randomized")
        exact = subspace.factorize(w, 4, selection, subspace.layer_generator(1, "w", 0), "full")
        for a, b in zip(approx, exact):
            assert torch.allclose(a, b, atol=1e-5)


def test_randomized_result_does_not_depend_on_batching():
    w, _ = decaying_matrix(80, 64, decay=1.0)
    ws = [w, 2 * w, w.flip(0)]
    gens = lambda: [subspace.layer_generator(0, f"l{i}", 0) for i in range(3)]  # noqa: E731
    ups, downs, _ = subspace.factorize_group(ws, 2, "top", gens(), "randomized")
    for i, wi in enumerate(ws):
        up, down, _ = subspace.factorize(wi, 2, "top", gens()[i], "randomized")
        assert torch.allclose(ups[i], up, atol=1e-5) and torch.allclose(downs[i], down, atol=1e-5)


def test_unknown_svd_method_is_rejected():
    with pytest.raises(ValueError, match="svd"):
        subspace.factorize(torch.randn(4, 4), 2, "top", subspace.layer_generator(0, "w", 0), "exact")
    with pytest.raises(ValueError, match=r"RosaConfig.svd='lowrank'.*full, randomized"):
        rosa.RosaConfig(svd="lowrank")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batched_factorize_on_cuda_matches_cpu():
    ws = weights(4, 32, 24)
    gens = lambda: [subspace.layer_generator(0, f"l{i}", 0) for i in range(4)]  # noqa: E731
    cpu = subspace.factorize_group(ws, 4, "random", gens())
    gpu = subspace.factorize_group([w.cuda() for w in ws], 4, "random", gens())
    for a, b in zip(cpu, gpu):
        assert b.device.type == "cuda"
        assert torch.allclose(a, b.cpu(), atol=1e-4)
