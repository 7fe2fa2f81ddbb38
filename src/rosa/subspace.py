"""The ROSA subspace math: SVD, seeded index selection and factor construction.

Pure tensor functions. A weight ``W`` is always in ``[out, in]`` layout here; all math is float32.
"""

from __future__ import annotations

import hashlib
from functools import partial
from typing import Callable, Sequence

import torch


def layer_generator(seed: int, name: str, resample_count: int) -> torch.Generator:
    """A CPU generator determined only by ``(seed, name, resample_count)``.

    Uses a cryptographic hash rather than Python's ``hash`` so every process (and every run)
    derives the same stream with no communication.
    """
    digest = hashlib.sha256(f"{seed}\x00{name}\x00{resample_count}".encode()).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return generator


# How the trainable singular vectors are chosen (see :func:`select_indices`).
SELECTIONS = ("random", "block", "top", "bottom")


def select_indices(num_singular: int, rank: int, selection: str, generator: torch.Generator) -> torch.Tensor:
    """Indices ``I`` (sorted, ``[rank]``) of the singular vectors that become trainable.

    Singular values are assumed in descending order (as ``torch.linalg.svd`` returns them).
    ``random`` is a uniform subset without replacement; ``block`` is ``rank`` consecutive indices
    starting at a uniformly drawn position (each of the ``num_singular - rank + 1`` runs equally
    likely); ``top``/``bottom`` take the largest/smallest.
    """
    if not 1 <= rank <= num_singular:
        raise ValueError(f"rank must be in [1, {num_singular}], got {rank}")
    if selection == "random":
        return torch.randperm(num_singular, generator=generator)[:rank].sort().values
    if selection == "block":
        start = int(torch.randint(num_singular - rank + 1, (1,), generator=generator))
        return torch.arange(start, start + rank)
    if selection == "top":
        return torch.arange(rank)
    if selection == "bottom":
        return torch.arange(num_singular - rank, num_singular)
    raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")


# Randomized SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4): a Gaussian sketch OVERSAMPLING columns
# wider than the triplets needed, refined by POWER_ITERATIONS subspace iterations. It computes only
# leading triplets, so only ``top`` selection can use it, and it pays off only while the rank is at
# most RANDOMIZED_MAX_FRACTION of min(out, in). ``random`` (uniform over all singular vectors: a
# draw of R indices almost surely reaches the trailing ones) and ``bottom`` use the exact SVD.
OVERSAMPLING = 10
POWER_ITERATIONS = 4
RANDOMIZED_MAX_FRACTION = 0.25
SVD_METHODS = ("full", "randomized")  # see :func:`runs_randomized`
# float32 SVDs of a 2048x2048 weight measured ~4e-6 off (LAPACK) and up to ~1e-4 (cuSOLVER's gesvd) in
# orthogonality and reconstruction; a fast CUDA driver's result further off is redone (checked_svd).
SVD_TOLERANCE = 1e-4
SvdFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def canonical_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip singular pairs in place so the largest-magnitude entry of each column of ``U`` is positive.

    A pair ``(u_i, v_i)`` is defined only up to a joint sign, which LAPACK, cuSOLVER, batched and
    unbatched calls may choose differently; after this, every path yields the same factors.
    ``u [..., out, k]``, ``vh [..., k, in]``.
    """
    pivot = u.abs().argmax(dim=-2, keepdim=True)  # [..., 1, k]
    signs = u.gather(-2, pivot).sign()  # [..., 1, k], +-1
    return u.mul_(signs), vh.mul_(signs.mT)


def svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin float32 SVD of ``weight [..., out, in]``: ``U [..., out, k]``, ``s [..., k]``, ``Vh [..., k, in]``.

    k = min(out, in); signs are canonical (:func:`canonical_signs`).
    """
    u, s, vh = thin_svd(weight.float())
    u, vh = canonical_signs(u, vh)
    return u, s, vh


def thin_svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(w, full_matrices=False)``, with a checked fast driver on CUDA.

    On CUDA, cuSOLVER's ``gesvda``: on an H200 it factorized 2048x2048 float32 matrices 7x faster
    than torch's default (``gesvdj``) and to 4e-8 where ``gesvdj`` left errors of 1e-3; a resample of
    a Llama-3.2-1B-shaped model fell from 7.8 s to 0.63 s (benchmarks/results/svd_gpu.md). ``gesvda``
    loses accuracy on ill-conditioned matrices and raises on rank-deficient ones, so
    :func:`checked_svd` redoes those with ``gesvd`` (QR based: slow, accurate).
    """
    if not w.is_cuda:
        return separate_svds(w)
    return checked_svd(w, partial(torch.linalg.svd, full_matrices=False, driver="gesvda"),
                       partial(torch.linalg.svd, full_matrices=False, driver="gesvd"))


def separate_svds(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(w, full_matrices=False)`` of ``w [..., out, in]``, one LAPACK call per matrix.

    The CPU path. On 2 quiet cores, one batched call and separate calls over MiniLM's 24 attention
    matrices (384 x 384) both took ~0.4 s, but with another process busy on the cores the batched call
    took 12-13 s against 2.1-2.3 s for the separate ones. Each matrix's result does not depend on the batch.
    """
    if w[..., 0, 0].numel() == 1:  # one matrix: no batch to split
        return torch.linalg.svd(w, full_matrices=False)
    batch = w.reshape(-1, *w.shape[-2:])  # [B, out, in]
    (count, rows, cols), k = batch.shape, min(w.shape[-2:])
    u, s, vh = batch.new_empty(count, rows, k), batch.new_empty(count, k), batch.new_empty(count, k, cols)
    for index, matrix in enumerate(batch):
        torch.linalg.svd(matrix, full_matrices=False, out=(u[index], s[index], vh[index]))
    return u.reshape(*w.shape[:-1], k), s.reshape(*w.shape[:-2], k), vh.reshape(*w.shape[:-2], k, cols)


def checked_svd(w: torch.Tensor, fast: SvdFn, exact: SvdFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``w [..., out, in]`` by ``fast``; every matrix that ``fast`` raises ``LinAlgError`` on,
    or factorizes with an :func:`svd_error` above ``SVD_TOLERANCE`` (or NaN), is redone by ``exact``."""
    batch = w.reshape(-1, *w.shape[-2:])  # [B, out, in]
    try:
        u, s, vh = fast(batch)  # [B, out, k], [B, k], [B, k, in]
    except torch.linalg.LinAlgError:  # one matrix failed the whole batch: factorize them one by one
        u, s, vh = (torch.cat(parts) for parts in zip(*(_fast_or_exact(m[None], fast, exact) for m in batch)))
    bad = ~(svd_error(batch, u, s, vh) <= SVD_TOLERANCE)  # [B]
    if bad.any():
        u[bad], s[bad], vh[bad] = exact(batch[bad])
    k = s.shape[-1]
    return u.reshape(*w.shape[:-1], k), s.reshape(*w.shape[:-2], k), vh.reshape(*w.shape[:-2], k, w.shape[-1])


def _fast_or_exact(w: torch.Tensor, fast: SvdFn, exact: SvdFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        return fast(w)
    except torch.linalg.LinAlgError:
        return exact(w)


def svd_error(w: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """Per matrix ``[B]``: the largest of ``max|U^T U - I|``, ``max|Vh Vh^T - I|`` and ``||U diag(s) Vh - W|| / ||W||``."""
    eye = torch.eye(s.shape[-1], dtype=w.dtype, device=w.device)  # [k, k]
    orthogonality_u = (u.mT @ u - eye).abs().amax(dim=(-2, -1))  # [B]
    orthogonality_v = (vh @ vh.mT - eye).abs().amax(dim=(-2, -1))  # [B]
    residual = torch.linalg.matrix_norm((u * s[..., None, :]) @ vh - w)  # [B]
    relative = residual / torch.linalg.matrix_norm(w).clamp_min(torch.finfo(w.dtype).tiny)  # [B]
    return torch.maximum(torch.maximum(orthogonality_u, orthogonality_v), relative)


def orthonormal_basis(x: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis ``Q [..., m, l]`` of the column space of ``x [..., m, l]``."""
    return torch.linalg.qr(x).Q


def randomized_svd(
    weight: torch.Tensor, k: int, generators: Sequence[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Approximate leading ``k`` triplets of ``weight [G, out, in]``: ``U [G, out, k]``, ``s [G, k]``, ``Vh [G, k, in]``.

    float32. Matrix ``g``'s sketch is drawn from ``generators[g]``, so it gets the same result in a
    batch or alone. Signs are canonical.
    """
    w = weight.float()  # [G, out, in]
    width = min(k + OVERSAMPLING, *w.shape[-2:])  # l
    omega = torch.stack([torch.randn(w.shape[-1], width, generator=g) for g in generators]).to(w.device)  # [G, in, l]
    q = orthonormal_basis(w @ omega)  # [G, out, l]: approximately spans the leading column space
    for _ in range(POWER_ITERATIONS):
        q = orthonormal_basis(w @ orthonormal_basis(w.mT @ q))  # [G, out, l]
    u_small, s, vh = thin_svd(q.mT @ w)  # [G, l, l], [G, l], [G, l, in]
    u, vh = canonical_signs((q @ u_small)[..., :k], vh[..., :k, :])  # [G, out, k], [G, k, in]
    return u, s[..., :k], vh


def runs_randomized(method: str, selection: str, rank: int, shape: Sequence[int]) -> bool:
    """Whether ``method`` runs the randomized SVD for this selection, rank and ``[out, in]`` shape (else the exact one).

    Depends on nothing drawn, so a layer takes the same path alone or in any batch.
    """
    if method not in SVD_METHODS:
        raise ValueError(f"svd must be one of {', '.join(SVD_METHODS)}, got {method!r}")
    pays_off = rank + OVERSAMPLING <= RANDOMIZED_MAX_FRACTION * min(shape)
    return method == "randomized" and selection == "top" and pays_off


SINGULAR_VALUE_PLACEMENTS = ("split", "down", "up")  # which factor carries s (see :func:`split_factors`)


def split_factors(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, indices: torch.Tensor, singular_values: str = "split"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Trainable factors of the chosen triplets, batched over leading dims: ``up @ down = U[:, I] diag(s[I]) Vh[I]``.

    ``singular_values`` says which factor carries ``s[I]``:
    split: up = U[:, I] * sqrt(s[I])   [..., out, R],   down = sqrt(s[I])[:, None] * Vh[I]   [..., R, in]
    down:  up = U[:, I],                                down = s[I][:, None] * Vh[I]
    up:    up = U[:, I] * s[I],                         down = Vh[I]
    """
    if singular_values not in SINGULAR_VALUE_PLACEMENTS:
        raise ValueError(f"singular_values must be one of {', '.join(SINGULAR_VALUE_PLACEMENTS)}, got {singular_values!r}")
    indices = indices.to(s.device)  # [..., R]
    chosen = torch.take_along_dim(s, indices, dim=-1)  # [..., R]
    root, one = chosen.sqrt(), torch.ones_like(chosen)
    up_scale, down_scale = {"split": (root, root), "down": (one, chosen), "up": (chosen, one)}[singular_values]
    up = torch.take_along_dim(u, indices[..., None, :], dim=-1) * up_scale[..., None, :]  # [..., out, R]
    down = down_scale[..., :, None] * torch.take_along_dim(vh, indices[..., :, None], dim=-2)  # [..., R, in]
    return up, down


def factorize_group(
    weights: Sequence[torch.Tensor] | torch.Tensor,
    rank: int,
    selection: str,
    generators: Sequence[torch.Generator],
    method: str = "full",
    singular_values: str = "split",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Factorize G same-shape weights ``[out, in]`` at once: ``up [G, out, R]``, ``down [G, R, in]``, ``residual [G, out, in]``.

    float32, on the weights' device. ``weights`` is a list of weights, or a float32 stack
    ``[G, out, in]`` that becomes the residual (overwritten). Weight ``g`` draws its index set from
    ``generators[g]`` exactly as :func:`factorize` does, so the result equals factorizing each weight
    alone; ``singular_values`` places ``s`` on the factors as in :func:`split_factors`. Besides the
    outputs, the only large temporaries are the SVD's ``U`` and ``Vh``; the residual reuses the
    float32 stack of the weights.
    """
    if isinstance(weights, torch.Tensor):
        stack = weights
    else:
        stack = torch.empty(len(weights), *weights[0].shape, dtype=torch.float32, device=weights[0].device)
        for row, weight in zip(stack, weights):
            row.copy_(weight)
    shape = stack.shape[-2:]  # [out, in]
    indices = torch.stack([select_indices(min(shape), rank, selection, g) for g in generators])  # [G, R]
    if runs_randomized(method, selection, rank, shape):
        u, s, vh = randomized_svd(stack, rank, generators)  # the leading R triplets, approximately
    else:
        u, s, vh = svd(stack)
    up, down = split_factors(u, s, vh, indices, singular_values)  # [G, out, R], [G, R, in]
    del u, s, vh
    residual = stack.baddbmm_(up, down, alpha=-1)  # W - up @ down, in place: [G, out, in]
    return up, down, residual


def factorize(
    weight: torch.Tensor,
    rank: int,
    selection: str,
    generator: torch.Generator,
    method: str = "full",
    singular_values: str = "split",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``weight`` ``[out, in]`` into ``(up [out, R], down [R, in], residual [out, in])``, float32.

    ``residual + up @ down == weight`` up to float32 rounding, whatever ``method`` and ``singular_values``.
    """
    up, down, residual = factorize_group([weight], rank, selection, [generator], method, singular_values)
    return up[0], down[0], residual[0]


def merged_weight(residual: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``residual + up @ down`` computed in float32: ``[out, in]``."""
    return residual.float() + up.float() @ down.float()
