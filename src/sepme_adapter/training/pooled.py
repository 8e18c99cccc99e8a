"""SDXL's pooled increment, solved in closed form rather than trained.

The pooled embedding `p` reaches the UNet through `add_embedding.linear_1` (input `[p, embedded time ids]`). The
increment has the separable form of Eq. 10, `dW = beta * w S_pool^T`, with `S_pool` the null space of the excluded
prompts' pooled embeddings (`basis.pooled_basis`), so they keep their exact output. Within that form, `w` is chosen so
that each of the concept's prompts gets the pooled-path output of the unconditional branch `a` (zeros under SDXL's
`force_zeros_for_empty_prompt`, else the blank prompt's pooled embedding):

    (p_i + 0) W^T + beta * (p_i S_pool) w^T = a W^T   for every concept prompt p_i,

the minimum-norm solution `w^T = pinv(P S_pool) (a - P) W^T / beta` (one row per prompt; exact while the concept has
no more prompts than `S_pool` has columns). It is zero while the `attn2` increments train and set when they are done,
so their training and its stop (the relative correlation `rho`, Eq. 4) are those of `attn2`-only erasers. Measured on the SDXL demo world's stress-test build, whose pooled path
alone draws the objects: training `w` with the correlation loss instead (Eq. 2, with the `attn2` increments) let the
erasers stop earlier and erased worse (exact / held-out ACC 0.63 / 0.87 against 0.20 / 0.73 for `attn2` increments
alone; a smaller step size only approached the `attn2`-only figures); the solved `w`, set after training, gives
0.10 / 0.47 (`benchmarks/pooled_path.py`, README "SDXL and SD 2.x").
"""

from __future__ import annotations

import torch


def pooled_increment(weight: torch.Tensor, basis: torch.Tensor, concept: torch.Tensor, anchor: torch.Tensor,
                     beta: float, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`w` (d_out x m) of the pooled increment for a concept with pooled embeddings `concept` (k x d_pool), or for a
    rank-r eraser `(B, A)` with `w = B A` (`B` d_out x r, `A` r x m orthonormal rows; exact when r >= k).

    `weight`: `add_embedding.linear_1`'s weight (d_out x d_in); `basis`: `S_pool` (d_in x m, zero on the time-id
    rows); `anchor`: the unconditional branch's pooled embedding (1 x d_pool)."""
    weight, basis = weight.detach().double().cpu(), basis.detach().double().cpu()
    width = weight.shape[1]
    rows = torch.zeros(len(concept), width, dtype=torch.float64)
    rows[:, : concept.shape[-1]] = concept.detach().double().cpu()
    target = torch.zeros(1, width, dtype=torch.float64)
    target[:, : anchor.shape[-1]] = anchor.detach().double().cpu()
    wanted = (target - rows) @ weight.T  # k x d_out: what the pooled path's output must move by
    w = (torch.linalg.pinv(rows @ basis) @ wanted).T / beta  # d_out x m
    if rank is None:
        return w.float(), None
    left, singular, right = torch.linalg.svd(w, full_matrices=False)
    r = min(rank, right.shape[0])
    return (left[:, :r] * singular[:r]).float(), right[:r].contiguous().float()
