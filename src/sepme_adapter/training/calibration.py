"""Step sizes that need no tuning per model: each layer's Adam learning rate from the model's own scale.

Adam moves every entry of `w` by about `lr` per step, so one step changes concept i's keys / values at
layer l by about `beta * lr_l * sqrt(d_out * m) * ||c_i S_p||_F` (Eq. 10 with `w`'s entries moving
together), relative to `||c_i W_l^T||_F`. Setting that ratio to `eta` gives

    lr_l = eta * ||c_i W_l^T||_F / (beta * sqrt(d_out * m) * ||c_i S_p||_F)

with `c_i` all of the concept's prompt embeddings. The paper's fixed `lr = 1e-2` with `beta = 1e-4` is
this rule's lr_l on SD v1.4 only by luck of scale; on the demo world the rule gives lr_l 3.5e-4 to 2e-3
at beta 1 (3.5 to 20 in the paper's units, which is why 1e-2 learned nothing there). A rank-r layer
(`w = B A`) uses `S_p A^T` and r for `S_p` and m; a dense G-CiRs increment (no basis) uses
`lr_l = eta * rms(W_l)`. SDXL's pooled increment is not trained (`training/pooled.py` solves it) and gets no group.
"""

from __future__ import annotations

from typing import Any

import torch

from ..eraser import Eraser
from ..errors import TrainingError
from ..mmdit import POOLED_LAYERS
from ..unet import layer_weight
from .config import TrainConfig

MIN_REACH = 1e-6  # ||c S_p|| / ||c|| below this: the concept has nothing left in its basis


def layer_learning_rate(weight: torch.Tensor, eraser: Eraser, layer: str, embeddings: torch.Tensor,
                        config: TrainConfig) -> float:
    """`lr_l` of one layer by the rule above (module docstring)."""
    weight = weight.detach().double().cpu()
    if not eraser.separable:
        return config.eta * float(weight.pow(2).mean().sqrt())
    text = embeddings.detach().double().cpu().reshape(-1, embeddings.shape[-1])
    directions = eraser.basis.detach().double().cpu() if eraser.basis is not None else None
    if layer in eraser.down:  # rank r: the directions the layer's B acts on are S_p A^T
        down = eraser.down[layer].detach().double().cpu()
        directions = down.T if directions is None else directions @ down.T
    reach = float((text @ directions).norm())
    if reach < MIN_REACH * float(text.norm()):
        raise TrainingError(f"concept {eraser.name!r}: its prompts lie in the span of the prompts its basis "
                            f"excludes, so no separable increment can act on them; drop known / protected "
                            f"prompts that paraphrase it, or raise max_leakage")
    d_out, columns = weight.shape[0], directions.shape[1]
    return config.eta * float((text @ weight.T).norm()) / (config.beta * (d_out * columns) ** 0.5 * reach)


def parameter_groups(unet: Any, eraser: Eraser, embeddings: torch.Tensor, config: TrainConfig
                     ) -> list[dict[str, Any]]:
    """Adam parameter groups, one per trained layer (`w` or `B`, and `A` for rank r), with that layer's lr.

    A fixed `config.lr` (dense: `config.gcirs_lr`) gives every layer the same rate, as in the paper.
    """
    fixed = config.lr if eraser.separable else config.gcirs_lr
    groups = []
    for layer, w in eraser.weights.items():
        if layer in POOLED_LAYERS:
            continue  # solved in closed form (training/pooled.py), fixed
        params = [w, eraser.down[layer]] if layer in eraser.down else [w]
        lr = fixed if fixed is not None else layer_learning_rate(
            layer_weight(unet, layer), eraser, layer, embeddings, config)
        groups.append({"params": params, "lr": lr})
    return groups
