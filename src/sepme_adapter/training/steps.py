"""One optimisation step of each algorithm, on a batch of live concepts.

The step is far cheaper than the paper's (two model copies, 2 frozen + 2 trainable passes per
concept): one UNet serves as frozen model (erasers inactive) and edited model (erasers active);
text embeddings are computed once; frozen passes run without a graph; and all concepts share one
batched UNet call, the processor applying a different increment per row.

The model is reached only through a denoiser call (`denoise.py`: `call(x_t, t, text, pooled)` and its noise
schedule `call.schedule`), so the same steps train UNet erasers on noise predictions and FLUX / SD3 erasers on
velocities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..runtime import ErasureRuntime
from .config import TrainConfig
from .harness import noisy_latents
from .objective import balance_weights, correlation_loss, l1_norm_per_layer, relative_correlation, target_loss
from .track import ConceptTrack


@dataclass
class Batch:
    """One iteration's `x_t`, `t`, `c_i` and `c_0` rows for the live concepts, and the frozen model's view."""

    x_t: torch.Tensor
    timesteps: torch.Tensor
    concept_text: torch.Tensor
    blank_text: torch.Tensor
    eps_blank: torch.Tensor  # eps(theta, x_t, c_0) (FLUX / SD3: the velocity v(theta, x_t, c_0))
    original: torch.Tensor  # D(c_i, theta) = eps(theta, x_t, c_i) - eps(theta, x_t, c_0)
    # the pooled text of the concept and blank rows (SDXL, FLUX, SD3; None for SD v1 / v2)
    concept_pooled: torch.Tensor | None = None
    blank_pooled: torch.Tensor | None = None

    def pooled(self, rows: slice | None = None, blank: bool = True) -> torch.Tensor | None:
        """The pooled rows of the concept rows (`rows`), followed by the blank rows if `blank`; None without."""
        if self.concept_pooled is None:
            return None
        pooled = self.concept_pooled if rows is None else self.concept_pooled[rows]
        return torch.cat([pooled, self.blank_pooled]) if blank else pooled


@dataclass
class StepResult:
    """What a step computed: the tracks whose optimisers step, and the numbers their histories record."""

    owners: list[ConceptTrack]
    losses: list[float]  # L_cor of each live concept
    recorded: list[float]  # per owner: the loss its history records (and the paper's stop sees)
    regularisers: list[float]  # per owner: ||w||_1 / M
    objective: float
    relatives: list[float]  # per owner: rho, the relative correlation (the default stop sees it)


def _concept_and_blank(call, x_t: torch.Tensor, timesteps: torch.Tensor, concept_text: torch.Tensor,
                       blank_text: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
    """`eps(., x_t, c_i)` and `eps(., x_t, c_0)` in one denoiser call (concept rows first; `pooled`: the pooled
    text of those rows, or None)."""
    return call(torch.cat([x_t, x_t]), torch.cat([timesteps, timesteps]), torch.cat([concept_text, blank_text]),
                pooled)


def text_row(track: ConceptTrack, index: int, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The text a sample is paired with: its prompt's embedding, or with probability `context_share` the concept's
    name said in a random context (`retain.py`), so the increment learns the name wherever it is said; and that
    text's anchor (`--objective anchor`: the same prompt with the name cut out), or None."""
    anchors = track.anchors if config.objective == "anchor" else None
    if track.contexts is None or not config.context_share:
        return track.embedding[index], None if anchors is None else anchors[index]
    if float(torch.rand((), generator=track.generator)) >= config.context_share:
        return track.embedding[index], None if anchors is None else anchors[index]
    pick = int(torch.randint(len(track.contexts), (1,), generator=track.generator))
    return track.contexts[pick], None if anchors is None else track.context_anchors[pick]


def sample_batch(call, runtime: ErasureRuntime, live: Sequence[ConceptTrack], blank: torch.Tensor,
                 config: TrainConfig, blank_pooled: torch.Tensor | None = None) -> Batch:
    """Draw `x_t` for each live concept and run the frozen model (same denoiser, no eraser active, no graph).

    `blank_pooled` (`1 x d_pool`): the blank row's pooled text (each track's `pooled` gives its rows'); None for
    SD v1 / v2."""
    device, dtype = call.model.device, call.model.dtype
    samples = [noisy_latents(t.latents, t.generator, call.schedule, config.ddim_steps, device) for t in live]
    x_t = torch.cat([s[0] for s in samples])
    timesteps = torch.tensor([s[1] for s in samples], device=device)
    # each reference image pairs with the embedding of the prompt it was made from
    rows = [text_row(t, s[2], config) for t, s in zip(live, samples)]
    concept_text = torch.stack([r[0] for r in rows]).to(device=device, dtype=dtype)
    # the "blank" of D(c, .): the blank prompt, or each row's anchor (--objective anchor; decoupled steps only)
    blank_text = blank.expand(len(live), -1, -1) if any(r[1] is None for r in rows) else \
        torch.stack([r[1] for r in rows]).to(device=device, dtype=dtype)
    pooled = None
    if blank_pooled is not None:
        pooled = torch.stack([t.pooled[s[2]] for t, s in zip(live, samples)]).to(device=device, dtype=dtype)
        blank_pooled = blank_pooled.to(device=device, dtype=dtype).expand(len(live), -1)
    batch = Batch(x_t, timesteps, concept_text, blank_text, x_t, x_t, pooled, blank_pooled)
    with torch.no_grad(), runtime.per_row([None] * (2 * len(live))):
        eps_concept, eps_blank = _concept_and_blank(call, x_t, timesteps, concept_text, blank_text,
                                                    batch.pooled()).chunk(2)
    batch.eps_blank, batch.original = eps_blank, eps_concept - eps_blank
    return batch


def dense_step(call, runtime: ErasureRuntime, shared: ConceptTrack, batch: Batch, config: TrainConfig) -> StepResult:
    """Alg. 1 (G-CiRs): one dense increment for every live concept, `sum_i eta_i L_cor_i + lambda ||dW||_1 / M`
    (Eq. 2-3). A dense increment changes the blank prompt's prediction too, so both edited passes learn."""
    with runtime.per_row([shared.concept.name] * (2 * len(batch.x_t))):
        edited = _concept_and_blank(call, batch.x_t, batch.timesteps, batch.concept_text, batch.blank_text,
                                    batch.pooled())
    edited_concept, edited_blank = edited.chunk(2)
    losses = correlation_loss(batch.original, edited_concept - edited_blank)
    rho = float(relative_correlation(batch.original, edited_concept - edited_blank).mean())
    values = [float(v) for v in losses.detach()]
    eta = balance_weights(values)
    regulariser = l1_norm_per_layer(shared.parameters)
    objective = sum(e * loss for e, loss in zip(eta, losses)) + config.lam * regulariser
    shared.optimizer.zero_grad(set_to_none=True)
    objective.backward()
    combined = sum(e * v for e, v in zip(eta, values))
    return StepResult([shared], values, [combined], [float(regulariser.detach())], float(objective.detach()), [rho])


def _decoupled_pass(call, runtime: ErasureRuntime, part: Sequence[ConceptTrack], rows: slice, batch: Batch,
                    config: TrainConfig) -> tuple[list[float], list[float], float, list[float]]:
    """One graph pass for some concepts: backpropagate `L_cor_i + lambda ||w_i||_1 / M` of each (Eq. 2, 11)."""
    with runtime.per_row([t.concept.name for t in part]):
        edited = call(batch.x_t[rows], batch.timesteps[rows], batch.concept_text[rows],
                      batch.pooled(rows, blank=False))
    direction = edited - batch.eps_blank[rows]  # D(c_i, theta + dW_i)
    losses = correlation_loss(batch.original[rows], direction)
    relatives = [float(r) for r in relative_correlation(batch.original[rows], direction)]
    regularisers = [l1_norm_per_layer(t.parameters) for t in part]
    trained = losses
    if config.objective in ("target", "anchor"):
        trained = target_loss(batch.original[rows], direction, config.negative_guidance)
    elif config.containment > 0:  # the correlation on the scale of rho, so the containment weight is unit-free
        trained = losses / batch.original[rows].flatten(1).pow(2).mean(1).detach().clamp_min(1e-30)
    objective = sum(trained[i] + config.lam * regularisers[i] for i in range(len(part)))
    if config.containment > 0:
        objective = objective + config.containment * sum(
            t.retain_energy.penalty(t.eraser) for t in part if t.retain_energy is not None)
    objective.backward()  # disjoint parameters: per-pass gradients are the full ones
    return ([float(v) for v in losses.detach()], [float(r.detach()) for r in regularisers], float(objective.detach()),
            relatives)


def decoupled_step(call, runtime: ErasureRuntime, live: list[ConceptTrack], batch: Batch,
                   config: TrainConfig) -> StepResult:
    """Alg. 2 (SepME): each concept its own objective `L_cor_i + lambda ||w_i||_1 / M` (Eq. 2, 11).

    With weight decoupling `eps(theta + dW_i, x_t, c_0) == eps(theta, x_t, c_0)` exactly, so the frozen
    blank pass is reused; graph passes take `concepts_per_pass` concepts at a time (0: all).
    """
    for track in live:
        track.optimizer.zero_grad(set_to_none=True)
    values, regularisers, objective, relatives = [], [], 0.0, []
    chunk = config.concepts_per_pass or len(live)
    for first in range(0, len(live), chunk):
        part_values, part_regularisers, part_objective, part_relatives = _decoupled_pass(
            call, runtime, live[first : first + chunk], slice(first, first + chunk), batch, config)
        values, regularisers = values + part_values, regularisers + part_regularisers
        objective, relatives = objective + part_objective, relatives + part_relatives
    return StepResult(live, values, values, regularisers, objective, relatives)
