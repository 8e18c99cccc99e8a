"""`sepme verify`: check that erasers really act, and act only where they should (paper Eq. 7).

For each eraser and each modified layer it reports the leakage of the blank, known and protected
prompts (`||c @ dW^T|| / ||c_i @ dW^T||`, should be ~0: Eq. 7's exact conditions) and the increment
norm, and the relative change of the concept's own keys / values, which must reach `MIN_EFFECT`
(0.1% of their size) or the eraser fails as inert. With `--fused-model`, it also checks that a saved
model equals base + the increments.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .certificate import collateral_certificate, leakage_certificate
from .eraser import Eraser
from .mmdit import POOLED_LAYERS, denoiser
from .text import encode_prompts
from .unet import base_linear

LEAK_TOLERANCE = 1e-4  # relative to the increment's effect on the concept's own prompt
# Below this relative change of the concept's keys / values an eraser "does nothing": half-precision
# inference alone rounds keys and values by up to 2^-11 ~ 4.9e-4 relative, so a smaller increment cannot
# be told apart from round-off. Measured on the demo world: erasers that erase (ACC 0.90-1.00 -> 0.00)
# change their concept's keys / values by 0.13-0.16, erasers trained with the paper's SD settings
# (beta 1e-4, lambda 3e-5), which leave the tiny model's concepts intact, by 1.0e-6.
MIN_EFFECT = 1e-3


def verify_eraser(pipe: Any, eraser: Eraser, min_effect: float = MIN_EFFECT,
                  max_leakage: float | None = None, max_collateral: float | None = None) -> dict[str, Any]:
    """Per-layer leakage and effect of one eraser on the pipeline's base weights.

    The effect is judged relative to the model's own scale: `concept_change` is
    `sqrt(sum_l ||c dW_l^T||^2 / sum_l ||c W_l^T||^2)` over every text-reading layer `l`
    (`to_k` / `to_v`) and the concept's prompts `c`, counting only the token rows that differ from
    the blank prompt's (the start token's row is the same for every prompt and no increment may
    change it). An eraser with `concept_change < min_effect` fails: it does nothing measurable.
    `max_collateral`: also fail when the collateral certificate re-measured now (the largest relative key / value
    change of the held-out unlisted prompts stored in the file) is above it.
    """
    concept_prompts = list(eraser.prompts or [eraser.prompt])
    prompts = {"blank": [""], "known": [p for ps in eraser.known.values() for p in ps],
               "protected": list(eraser.protected)}
    texts = encode_prompts(pipe, [*concept_prompts, *(p for group in prompts.values() for p in group)]).double()
    concepts, rest = texts[: len(concept_prompts)], texts[len(concept_prompts):]
    groups, start = {}, 0
    for group, items in prompts.items():
        groups[group] = rest[start : start + len(items)]
        start += len(items)
    blank = groups["blank"][0]
    # the concept's token rows that differ from the blank prompt's (text width d_in per row)
    differing = (concepts - blank).norm(dim=-1) > 1e-6 * blank.norm(dim=-1).clamp_min(1e-30)
    concept = concepts[differing]
    layers, worst_leak = {}, 0.0
    change_sq, original_sq = 0.0, 0.0
    for layer in eraser.weights:
        delta = eraser.delta(layer).double()
        weight = base_linear(denoiser(pipe).get_submodule(layer)).weight.detach().double().cpu()
        if layer in POOLED_LAYERS or delta.shape[1] != concept.shape[-1]:  # not per-token text (to_q, pooled)
            layers[layer] = {"increment_norm": float(delta.norm())}
            continue
        effect = float((concept @ delta.T).norm())
        original = float((concept @ weight.T).norm())
        change_sq, original_sq = change_sq + effect**2, original_sq + original**2
        entry = {"increment_norm": float(delta.norm()), "concept_change": effect / max(original, 1e-30)}
        for group, rows in groups.items():
            if len(rows):
                leak = max(float((r @ delta.T).norm()) for r in rows) / max(effect, 1e-30)
                entry[f"{group}_leak"] = leak
                if eraser.separable:
                    worst_leak = max(worst_leak, leak)
        layers[layer] = entry
    concept_change = (change_sq / original_sq) ** 0.5 if original_sq > 0 else 0.0
    problems = []
    if concept_change < min_effect:
        problems.append(f"the increment changes its concept's keys and values by {concept_change:.1e} of their "
                        f"size (< {min_effect:.0e}, below half-precision round-off): the eraser does nothing")
    compact = (eraser.metadata.get("basis") or {}).get("kind") == "compact"
    if eraser.separable and not compact and worst_leak > LEAK_TOLERANCE:
        problems.append(f"blank / known / protected prompts leak {worst_leak:.2e} > {LEAK_TOLERANCE:.0e}")
    certificate = leakage_certificate(pipe, eraser)["max_leakage"] if eraser.separable else None
    problems += certificate_problems(eraser, certificate, max_leakage)
    collateral = collateral_certificate(pipe, eraser) if eraser.separable else {"max": None, "median": None}
    if max_collateral is not None:
        if collateral["max"] is None:
            problems.append("the file has no held-out prompts to measure collateral on (trained before the "
                            "collateral certificate existed); retrain it to check --max-collateral")
        elif collateral["max"] > max_collateral:
            problems.append(f"collateral {collateral['max']:.2e} > --max-collateral {max_collateral:g}: unlisted prompts "
                            f"(worst {collateral['worst_prompt']!r}) move that much; retrain with a lower "
                            f"max_collateral or fewer basis dimensions")
    return {"name": eraser.name, "separable": eraser.separable, "worst_leak": worst_leak,
            "certificate": certificate, "stored_certificate": eraser.certificate,
            "collateral_max": collateral["max"], "collateral_median": collateral["median"],
            "concept_change": concept_change, "min_effect": min_effect,
            "largest_concept_change": max((e.get("concept_change", 0.0) for e in layers.values()), default=0.0),
            "ok": not problems, "problems": problems, "layers": layers}


def certificate_problems(eraser: Eraser, measured: float | None, max_leakage: float | None) -> list[str]:
    """The leakage certificate re-measured on this base model: it must hold what the file claims (within
    1 % or 1e-6) and stay under the user's `max_leakage`."""
    if measured is None:
        return []
    problems = []
    claimed = eraser.certificate
    if claimed is not None and measured > max(1.01 * claimed, claimed + 1e-6):
        problems.append(f"the leakage certificate does not hold on this model: measured {measured:.2e}, "
                        f"the file claims {claimed:.2e}")
    if max_leakage is not None and measured > max_leakage:
        problems.append(f"leakage certificate {measured:.2e} > --max-leakage {max_leakage:.0e}: known, protected "
                        f"or blank prompts change by more than allowed")
    return problems


def verify_fused(base: Any, fused: Any, erasers: Sequence[Eraser], rtol: float = 1e-3) -> dict[str, Any]:
    """Does a saved model equal base + sum of the increments (to_k / to_v / dense layers)?"""
    worst, layers = 0.0, {}
    for layer in sorted({layer for e in erasers for layer in e.weights}):
        expected = base_linear(denoiser(base).get_submodule(layer)).weight.detach().double().cpu()
        for eraser in erasers:
            if layer in eraser.weights:
                expected = expected + eraser.delta(layer).double()
        actual = base_linear(denoiser(fused).get_submodule(layer)).weight.detach().double().cpu()
        change = (expected - base_linear(denoiser(base).get_submodule(layer)).weight.detach().double().cpu()).norm()
        error = float((actual - expected).norm() / max(float(change), 1e-30))
        layers[layer] = error
        worst = max(worst, error)
    return {"worst_relative_error": worst, "ok": worst <= rtol, "layers": layers}
