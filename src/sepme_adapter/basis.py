"""The basis `S_p` of an eraser: the exact null space of the known prompts (paper Eq. 8), or a compact one.

For concept i, `A_i = [c_0; c_j for j != i]` stacks the blank prompt and every other known
prompt (each an `L x d_in` text-encoder output). Any increment `dW = beta * w @ S_p.T` with
`S_p` spanning the null space of `A_i` satisfies `A_i @ dW.T = 0`: the keys and values of
those prompts are untouched. The paper solves for `S_p` symbolically; an SVD in float64 gives
an orthonormal basis of the same space in milliseconds.

The exact null space shrinks by up to L dimensions per known prompt (SD v1: 77 of 768), so it is
gone after about ten one-prompt concepts. `compact_basis` relaxes Eq. 8 to a measured bound: it
keeps the directions the known prompts barely use, so that each known prompt's share of energy in
`S_p` is at most `max_leakage` (`||c S_p||_F <= max_leakage * ||c||_F` for every known `c`).
`choose_basis` uses the exact space while it has room and the compact one after that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import EmptyNullSpaceError


def stack_embeddings(embeddings: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack prompt embeddings (`L x d`, `1 x L x d` or `n x L x d` each) into one `rows x d` float64 matrix."""
    parts = [embeddings] if isinstance(embeddings, torch.Tensor) else list(embeddings)
    if not parts:
        raise ValueError("null_space_basis needs at least one embedding; got an empty list")
    rows = []
    for part in parts:
        if not isinstance(part, torch.Tensor) or part.ndim < 1:
            raise TypeError(f"embeddings must be tensors of shape (rows, d_in); got {type(part).__name__}")
        rows.append(part.detach().to(device="cpu", dtype=torch.float64).reshape(-1, part.shape[-1]))
    widths = {r.shape[-1] for r in rows}
    if len(widths) != 1:
        raise ValueError(f"all embeddings must have the same width; got widths {sorted(widths)}")
    return torch.cat(rows, dim=0)


def default_rtol(rows: int, width: int, dtype: torch.dtype = torch.float32) -> float:
    """Rank tolerance relative to the largest singular value: the round-off of the encoder (float32; float64
    for embeddings a float64 encoder computed)."""
    return max(rows, width) * torch.finfo(dtype).eps


def embeddings_dtype(embeddings: torch.Tensor | Sequence[torch.Tensor]) -> torch.dtype:
    """float64 when every embedding is float64 (a float64 encoder's rows), else float32: their round-off."""
    parts = [embeddings] if isinstance(embeddings, torch.Tensor) else list(embeddings)
    wide = parts and all(isinstance(p, torch.Tensor) and p.dtype == torch.float64 for p in parts)
    return torch.float64 if wide else torch.float32


def null_space_basis(
    embeddings: torch.Tensor | Sequence[torch.Tensor], rtol: float | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Orthonormal basis `S_p` (`d_in x m`, float32) of the null space of the stacked embeddings (Eq. 8).

    Singular values below `rtol * sigma_max` count as zero (default: `max(rows, d_in) * eps_float32`,
    the round-off of float32 text encoders; `eps_float64` when every embedding is float64). Raise `EmptyNullSpaceError` when nothing is left. `dtype`: of the
    result (float64 for checks in float64 pipelines, where the float32 basis's own round-off would decide).

    Example:
        >>> basis = null_space_basis([blank_embedding, picasso_embedding])  # (768, 614) on SD v1
    """
    matrix = stack_embeddings(embeddings)
    rows, width = matrix.shape
    _, singular, vh = torch.linalg.svd(matrix, full_matrices=True)
    tol = (default_rtol(rows, width, embeddings_dtype(embeddings)) if rtol is None else float(rtol)) * (
        float(singular[0]) if singular.numel() else 0.0
    )
    rank = int((singular > tol).sum())
    if rank >= width:
        raise EmptyNullSpaceError(
            f"the {rows} x {width} stacked prompt embeddings have rank {rank}: their null space is empty, "
            f"so no increment can leave all of them untouched. Use fewer known or protected prompts "
            f"(each prompt adds up to its token count of rows), or a larger rtol."
        )
    return vh[rank:].T.contiguous().to(dtype)


def pooled_basis(pooled: Sequence[torch.Tensor], width: int, rtol: float | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`S_pool` of SDXL's pooled increment (`width x m`, float32): the exact null space (Eq. 8) of the excluded
    prompts' pooled embeddings (one row per prompt, `d_pool` wide), with zero rows for the rest of
    `add_embedding.linear_1`'s input (`width` = `d_pool` + the embedded time ids), so the increment changes
    the pooled-text columns only. Raise `EmptyNullSpaceError` when nothing is left."""
    basis = null_space_basis([p.reshape(-1, p.shape[-1]) for p in pooled if p.numel()], rtol=rtol, dtype=dtype)
    padded = torch.zeros(width, basis.shape[1], dtype=dtype)
    padded[: basis.shape[0]] = basis
    return padded


MIN_EXACT_FRACTION = 1 / 8  # `choose_basis` keeps the exact null space while it has >= d_in / 8 dimensions
AUTO_LEVELS = (1e-3, 3e-3, 1e-2)  # compact bounds `choose_basis` tries, tightest first
DEFAULT_MAX_LEAKAGE = AUTO_LEVELS[0]


def per_prompt_rows(embeddings: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each prompt's `L x d` rows in float64 (a `n x L x d` tensor is n prompts; `L x d` is one)."""
    parts = [embeddings] if isinstance(embeddings, torch.Tensor) else list(embeddings)
    prompts = []
    for part in parts:
        rows = stack_embeddings(part)
        if isinstance(part, torch.Tensor) and part.ndim == 3:
            prompts += list(rows.reshape(part.shape[0], -1, rows.shape[-1]))
        else:
            prompts.append(rows)
    return prompts


def compact_basis(embeddings: torch.Tensor | Sequence[torch.Tensor], max_leakage: float = DEFAULT_MAX_LEAKAGE
                  ) -> tuple[torch.Tensor, float]:
    """The largest basis in which every known prompt keeps at most `max_leakage` of its norm (relaxed Eq. 8).

    Each prompt's rows are scaled to unit Frobenius norm and stacked into `M = U diag(s) V^T`; `S_p` is the
    trailing columns of `V` (the directions the prompts use least), as many as keep
    `max_c ||c S_p||_F / ||c||_F <= max_leakage` over the prompts. Returns the basis and that maximum,
    computed directly (so a guaranteed bound; 0 within round-off for the exact null space, always included).

    Example:
        >>> basis, bound = compact_basis(known_embeddings, max_leakage=1e-3)  # bound <= 1e-3
    """
    if not math.isfinite(max_leakage) or max_leakage < 0:
        raise ValueError(f"max_leakage must be a finite number >= 0, got {max_leakage!r}")
    prompts = per_prompt_rows(embeddings)
    matrix = torch.cat([p / p.norm().clamp_min(1e-300) for p in prompts])
    width = matrix.shape[1]
    _, _, vh = torch.linalg.svd(matrix, full_matrices=True)
    # energy[p, j]: prompt p's share of its (unit) norm along direction j; tails summed from the end
    energy = torch.stack([((p / p.norm().clamp_min(1e-300)) @ vh.T).pow(2).sum(0) for p in prompts])
    tails = torch.flip(torch.cumsum(torch.flip(energy, [1]), 1), [1]).max(0).values
    start = int((tails > max_leakage**2).nonzero().max()) + 1 if bool((tails > max_leakage**2).any()) else 0
    if start >= width:
        raise EmptyNullSpaceError(
            f"no direction of the {width}-wide text space keeps the {len(prompts)} known prompts below "
            f"max_leakage={max_leakage:g}; raise max_leakage or use fewer known / protected prompts")
    return vh[start:].T.contiguous().to(torch.float32), float(tails[start].sqrt())


@dataclass(frozen=True)
class BasisChoice:
    """The basis an eraser uses and why: `exact` (Eq. 8) or `compact` with its guaranteed `bound`."""

    basis: torch.Tensor
    kind: str
    bound: float
    contrasts: tuple[float, ...] = ()  # contrastive basis: concept / retain energy of each kept direction

    def describe(self) -> dict[str, object]:
        described = {"kind": self.kind, "dimensions": int(self.basis.shape[1]), "energy_bound": self.bound}
        return described | ({"contrasts": list(self.contrasts)} if self.contrasts else {})


def reach(concept: torch.Tensor | Sequence[torch.Tensor], basis: torch.Tensor) -> float:
    """`||c S_p||_F / ||c||_F` over the concept's prompts: how much of them the increment can act on."""
    rows = stack_embeddings(concept)
    return float((rows @ basis.double()).norm() / rows.norm().clamp_min(1e-300))


def choose_basis(embeddings: torch.Tensor | Sequence[torch.Tensor], max_leakage: float | None = None,
                 rtol: float | None = None, concept: torch.Tensor | Sequence[torch.Tensor] | None = None
                 ) -> BasisChoice:
    """The exact null space (Eq. 8) while it has room, else the compact basis.

    `max_leakage=None`: exact if it keeps at least `d_in * MIN_EXACT_FRACTION` dimensions, else the compact
    basis at the tightest of `AUTO_LEVELS` that leaves the `concept`'s prompts at least half the reach they
    have at the loosest level (so a crowded text space does not leave the eraser nothing to act on).
    `max_leakage=0`: exact only (raises `EmptyNullSpaceError` when none is left). `max_leakage > 0`:
    compact at that bound.
    """
    if max_leakage is None or max_leakage == 0:
        try:
            exact = null_space_basis(embeddings, rtol=rtol)
        except EmptyNullSpaceError:
            if max_leakage == 0:
                raise
            exact = None
        width = stack_embeddings(embeddings).shape[1]
        if max_leakage == 0 or (exact is not None and exact.shape[1] >= width * MIN_EXACT_FRACTION):
            return BasisChoice(exact, "exact", 0.0)
        return _automatic_compact(embeddings, concept)
    basis, bound = compact_basis(embeddings, max_leakage)
    return BasisChoice(basis, "compact", bound)


def _automatic_compact(embeddings: torch.Tensor | Sequence[torch.Tensor],
                       concept: torch.Tensor | Sequence[torch.Tensor] | None) -> BasisChoice:
    candidates = []
    for level in AUTO_LEVELS if concept is not None else AUTO_LEVELS[:1]:
        try:
            candidates.append(compact_basis(embeddings, level))
        except EmptyNullSpaceError:
            continue
    if not candidates:
        raise EmptyNullSpaceError(f"no compact basis up to max_leakage={AUTO_LEVELS[-1]:g} exists for these "
                                  f"prompts; pass a larger max_leakage or use fewer known / protected prompts")
    if concept is not None:
        enough = 0.5 * reach(concept, candidates[-1][0])
        candidates = [c for c in candidates if reach(concept, c[0]) >= enough] or candidates[-1:]
    basis, bound = candidates[0]
    return BasisChoice(basis, "compact", bound)


def energy_gram(prompts: Sequence[torch.Tensor], basis: torch.Tensor) -> torch.Tensor:
    """`mean_c (c S)^T (c S) / ||c||_F^2` over the prompts (each `L x d`): their average energy per direction of
    `basis` (`m x m`, float64), every prompt weighted alike whatever its norm."""
    basis = basis.double()
    gram = torch.zeros(basis.shape[1], basis.shape[1], dtype=torch.float64)
    for rows in prompts:
        rows = stack_embeddings(rows)
        projected = rows @ basis / rows.norm().clamp_min(1e-300)
        gram += projected.T @ projected
    return gram / max(len(prompts), 1)


CONTRAST_RIDGE = 1e-3  # retain energy floor, relative to its mean per direction (directions nobody uses)


def contrastive_basis(exact: torch.Tensor, concept: Sequence[torch.Tensor], retain: Sequence[torch.Tensor],
                      dimensions: int, contexts: Sequence[torch.Tensor] = (), after: Sequence[torch.Tensor] = (),
                      after_weight: float = 0.0) -> tuple[torch.Tensor, list[float]]:
    """The `dimensions` directions inside the exact null space `exact` (Eq. 8, `d x m`) that the concept's prompts
    use most relative to the retain prompts: the top generalised eigenvectors of `S0^T C_c^T C_c S0` against
    `S0^T C_r^T C_r S0` (each prompt at unit norm), orthonormalised. An increment on this basis stays exact on
    the excluded prompts (it lies inside `exact`) and reaches the retain distribution as little as it can for
    what it reaches of the concept. `contexts` (the name said in other prompts) weigh as much as the concept's
    own prompts, so the directions follow the name wherever it is said. `after` (the rows after the name in those
    contexts, which carry the name mixed with the words that follow it) join the avoided energy with weight
    `after_weight`, so the directions keep to the name's own row and spare the words said after it. Returns the
    basis (`d x dimensions`, float32) and the contrasts (concept energy / retain energy) of the kept directions,
    largest first."""
    m = exact.shape[1]
    if dimensions >= m or not retain:
        return exact.to(torch.float32), []
    exact = exact.double()
    wanted = energy_gram(concept, exact)
    if contexts:
        wanted = (wanted + energy_gram(contexts, exact)) / 2
    avoided = energy_gram(retain, exact)
    if after and after_weight > 0:
        avoided = avoided + after_weight * energy_gram(after, exact)
    avoided += CONTRAST_RIDGE * torch.trace(avoided) / m * torch.eye(m, dtype=torch.float64)
    lower = torch.linalg.cholesky(avoided)
    whiten = torch.linalg.solve_triangular(lower, torch.eye(m, dtype=torch.float64), upper=False)
    values, vectors = torch.linalg.eigh(whiten @ wanted @ whiten.T)
    directions = whiten.T @ vectors[:, -dimensions:].flip(1)
    q, _ = torch.linalg.qr(exact @ directions)
    return q.to(torch.float32).contiguous(), [float(v) for v in values.flip(0)[:dimensions]]
