"""One concept's increment: `dW_i = beta * w_i @ S_p.T` per modified layer (paper Eq. 9-10).

An `Eraser` holds the basis `S_p` (shared by every layer: all `attn2` layers read the same
text embeddings), one trainable `w` per modified linear layer (`to_k` / `to_v` of every
`attn2`), `beta`, and what the basis excludes (`known` concepts, `protected` prompts).
Files are safetensors: tensors `basis` and `<module path>.w`, metadata as JSON strings.
Dense erasers (`basis=None`: G-CiRs and the baselines) store full `d_out x d_in` matrices.

A rank-r eraser factors `w = B @ A` per layer (`B` d_out x r, `A` r x m): `dW = beta * B @ (A S_p^T)`,
an ordinary LoRA whose down-projection `A S_p^T` has its rows in the null space, so it keeps the
exactness of the full `w`. Its file holds `<module path>.down` (`A S_p^T`, r x d_in) and `.w` (`B`)
per layer, and no basis: a few hundred kB at SD v1.5 shape instead of ~35 MB.

SDXL erasers may also carry the pooled increment: `dW = beta * w S_pool^T` on `add_embedding.linear_1`,
the layer the pooled text embedding enters, with its own basis `S_pool` (tensor `pooled_basis`): the
null space of the excluded prompts' pooled embeddings, as wide as the layer's input with zero rows on
the time-id part, so only the pooled-text columns change.

FLUX and SD3 erasers (`mmdit.py`) change `context_embedder` (the layer the per-token text enters; `w` is
`d_model x m` on the same kind of basis `S_p`, the null space of the excluded prompts' encoder rows) and may carry
the pooled increment on `time_text_embed.text_embedder.linear_1` (its input is the pooled embedding alone).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import EraserFileError
from .formats import (
    BASIS_KEY,
    DOWN_SUFFIX,
    FORMAT_NAME,
    FORMAT_VERSION,
    LORA_FORMATS,
    POOLED_BASIS_KEY,
    RANK_FORMAT_VERSION,
    READABLE_VERSIONS,
    WEIGHT_SUFFIX,
    atomic_save_safetensors,
    eraser_from_lora,
    is_sepme_lora,
    kohya_from_lora,
    layer_downs,
    layer_weights,
    lora_from_eraser,
    read_safetensors,
)
from .mmdit import CONTEXT_LAYER, MMDIT_POOLED_LAYER, POOLED_LAYERS, TEXT_LAYERS
from .unet import DENSE_LAYERS


@dataclass
class Eraser:
    """One erased concept: `delta(layer) = beta * weights[layer] @ basis.T` (Eq. 10); rank r:
    `beta * weights[layer] @ down_projection(layer)`.

    Args:
        name: the concept's name (the default adapter name when loaded).
        prompt: the concept's main prompt (the first of `prompts`).
        basis: `S_p`, `d_in x m` with orthonormal columns, or `None` for a dense increment.
        weights: `"<attn2 module path>.to_k"` / `".to_v"` -> `w` (`d_out x m`; dense: `d_out x d_in`).
        beta: the fixed scale of Eq. 10 (default 1, as `TrainConfig.beta`; the paper's preset: 1e-4).
        known: names -> prompts (a list each; a string is one prompt) of the concepts the basis excludes.
        protected: extra prompts the basis excludes (kept exact), e.g. watermark triggers.
        metadata: free-form JSON-able dict: `base_model`, `fingerprint`, `training`, `stats`, `basis`
            (kind, dimensions, energy bound) and `certificate` (the measured leakage, see `certificate.py`).
        prompts: every prompt of the concept the increment was trained to erase (default `[prompt]`).
        down: rank-r erasers only: per layer the LoRA down-projection, `A` (r x m, basis coordinates) with
            a `basis`, or `A S_p^T` (r x d_in, as stored in files) with `basis=None`; `weights[layer]` is
            then `B` (d_out x r). Empty (the default): full rank.
        pooled_basis: SDXL, FLUX, SD3: `S_pool` (`d_in(add_embedding.linear_1) x m_pool`, orthonormal columns, zero
            rows on the time-id part) of the pooled increment `weights["add_embedding.linear_1"]`; None: none.

    Example:
        >>> eraser = Eraser.load("vangogh.safetensors")
        >>> eraser.delta("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k").shape
        torch.Size([320, 768])
    """

    name: str
    prompt: str
    basis: torch.Tensor | None
    weights: dict[str, torch.Tensor]
    beta: float = 1.0  # = TrainConfig.beta (a test checks)
    known: dict[str, list[str]] = field(default_factory=dict)
    protected: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)
    down: dict[str, torch.Tensor] = field(default_factory=dict)
    pooled_basis: torch.Tensor | None = None
    source: InitVar[str] = "eraser"  # names the file in validation errors; not stored

    def __post_init__(self, source: str) -> None:
        self.validate(source)

    # ----------------------------------------------------------------- the math
    @property
    def separable(self) -> bool:
        """True for weight-decoupled increments (a basis, or rank-r down-projections in it, excludes the
        known prompts)."""
        return self.basis is not None or bool(self.down)

    @property
    def rank(self) -> int | None:
        """r of a rank-r eraser (the largest over its layers); None for full-rank and dense erasers."""
        return max(int(a.shape[0]) for a in self.down.values()) if self.down else None

    @property
    def text_width(self) -> int:
        """`d_in` of `to_k` / `to_v`: the text encoder's width."""
        if self.basis is not None:
            return int(self.basis.shape[0])
        if self.down:
            return int(next(a for p, a in self.down.items() if p not in POOLED_LAYERS).shape[1])
        return int(next(w.shape[1] for p, w in self.weights.items() if p.endswith(TEXT_LAYERS)))

    @property
    def has_pooled(self) -> bool:
        """Whether the eraser carries the pooled increment (SDXL's `add_embedding.linear_1`; FLUX / SD3:
        `time_text_embed.text_embedder.linear_1`)."""
        return self.pooled_layer is not None

    @property
    def pooled_layer(self) -> str | None:
        """The path of the pooled increment's layer, or None."""
        return next((p for p in POOLED_LAYERS if p in self.weights), None)

    def basis_for(self, layer_path: str) -> torch.Tensor | None:
        """The basis a layer's increment lives in: `S_pool` for the pooled layer, else `S_p`."""
        return self.pooled_basis if layer_path in POOLED_LAYERS else self.basis

    def down_projection(self, layer_path: str) -> torch.Tensor:
        """A rank-r layer's LoRA down-projection `A S_p^T` (r x d_in; rows in the null space), detached,
        in the dtype of `A`."""
        down, basis = self.down[layer_path].detach(), self.basis_for(layer_path)
        if basis is None:
            return down
        return (down.double() @ basis.detach().double().T).to(down.dtype)

    def delta(self, layer_path: str) -> torch.Tensor:
        """The increment of one layer in `nn.Linear.weight` layout: `beta * w @ S_p.T` (Eq. 10); rank r:
        `beta * B @ (A S_p^T)`."""
        if layer_path not in self.weights:
            raise KeyError(f"eraser {self.name!r} has no increment for {layer_path!r}; it has {sorted(self.weights)}")
        w = self.weights[layer_path].detach()
        w = w.to(torch.promote_types(w.dtype, torch.float32))  # float32, or float64 for a float64 eraser
        if self.down:
            return self.beta * (w @ self.down_projection(layer_path).to(w.dtype))
        basis = self.basis_for(layer_path)
        if basis is None:
            return self.beta * w
        return self.beta * (w @ basis.detach().to(w.dtype).T)

    def dtheta_p(self) -> float:
        """`||dtheta||_p = ||dtheta||_1 / M`, M = number of modified layers (paper Eq. 4)."""
        total = sum(float(self.delta(path).abs().sum()) for path in self.weights)
        return total / max(len(self.weights), 1)

    def is_separable_from(self, other: Eraser) -> bool:
        """Guaranteed separable: both bases exclude all of each other's prompts."""
        return (
            self.separable
            and other.separable
            and all(self.excludes_prompt(p) for p in other.prompts)
            and all(other.excludes_prompt(p) for p in self.prompts)
        )

    @property
    def excluded_prompts(self) -> list[str]:
        """The prompts the basis excludes: blank, every known concept's prompts, the protected prompts."""
        return list(dict.fromkeys(["", *(p for ps in self.known.values() for p in ps), *self.protected]))

    def excludes_prompt(self, prompt: str) -> bool:
        """True when this eraser's basis excludes `prompt`: its keys and values stay exact (exact basis) or
        change by at most the leakage certificate (compact basis)."""
        return self.separable and prompt in self.excluded_prompts

    @property
    def certificate(self) -> float | None:
        """The measured leakage: the largest relative K/V change over the excluded prompts (None: not measured)."""
        record = self.metadata.get("certificate")
        return float(record["max_leakage"]) if isinstance(record, dict) and "max_leakage" in record else None

    # ------------------------------------------------------------- validation
    def validate(self, source: str = "eraser") -> None:
        """Check types, shapes and values; raise `EraserFileError` naming `source` and the problem."""

        def fail(problem: str) -> None:
            raise EraserFileError(f"{source}: {problem}")

        if not isinstance(self.name, str) or not self.name.strip():
            fail(f"the concept name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.prompt, str):
            fail(f"the prompt must be a string, got {type(self.prompt).__name__}")
        if not isinstance(self.beta, (int, float)) or not math.isfinite(self.beta) or self.beta <= 0:
            fail(f"beta must be a positive finite number, got {self.beta!r}")
        self.beta = float(self.beta)
        if not isinstance(self.known, dict) or not all(isinstance(k, str) for k in self.known):
            fail("known must map concept names (str) to prompts (a str or a list of str)")
        self.known = {k: [v] if isinstance(v, str) else v for k, v in self.known.items()}
        if not all(isinstance(v, list) and v and all(isinstance(p, str) for p in v) for v in self.known.values()):
            fail("known must map concept names (str) to prompts (a str or a non-empty list of str)")
        if isinstance(self.prompts, (str, bytes)) or not all(isinstance(p, str) for p in self.prompts):
            fail("prompts must be a list of prompt strings")
        self.prompts = list(dict.fromkeys([self.prompt, *self.prompts]))
        if isinstance(self.protected, (str, bytes)) or not all(isinstance(p, str) for p in self.protected):
            fail("protected must be a list of prompt strings")
        self.protected = list(self.protected)
        if not isinstance(self.metadata, dict):
            fail("metadata must be a dict")
        if self.basis is not None:
            self._check_tensor(self.basis, "basis", fail)
            if self.basis.ndim != 2 or self.basis.shape[1] < 1 or self.basis.shape[1] > self.basis.shape[0]:
                fail(f"basis must be d_in x m with 1 <= m <= d_in, got shape {tuple(self.basis.shape)}")
        if not isinstance(self.weights, dict) or not self.weights:
            fail("weights is empty: an eraser needs at least one layer increment")
        allowed = TEXT_LAYERS if self.separable else DENSE_LAYERS
        self._validate_pooled(fail)
        for path, w in self.weights.items():
            if path in POOLED_LAYERS:
                self._check_tensor(w, path, fail)
                continue  # checked by _validate_pooled
            if not isinstance(path, str) or not path.endswith(allowed):
                fail(f"layer {path!r} is not one of the layers a {'separable' if self.separable else 'dense'} "
                     f"eraser may change (names ending in {', '.join(allowed)})")
            self._check_tensor(w, path, fail)
            if w.ndim != 2:
                fail(f"{path}: w must be 2-D, got shape {tuple(w.shape)}")
            if self.down:
                continue  # checked with the down-projections below
            if self.basis is not None and w.shape[1] != self.basis.shape[1]:
                fail(f"{path}: w has {w.shape[1]} columns but the basis has {self.basis.shape[1]} (m must match)")
        transformer = [p for p in self.weights if p in (CONTEXT_LAYER, MMDIT_POOLED_LAYER)]
        if transformer and len(transformer) != len(self.weights):
            fail(f"the layers mix a transformer's ({', '.join(transformer)}) with a UNet's; an eraser is for one "
                 f"model family")
        if self.down:
            self._validate_down(fail)

    def _validate_pooled(self, fail) -> None:
        """The pooled increment: separable only, with its own basis (full rank) or down-projection (rank r)."""
        if not self.has_pooled:
            if self.pooled_basis is not None:
                fail(f"a pooled basis without a pooled increment ({' or '.join(POOLED_LAYERS)}.w)")
            return
        if sum(p in self.weights for p in POOLED_LAYERS) > 1:
            fail(f"more than one pooled increment ({', '.join(p for p in POOLED_LAYERS if p in self.weights)})")
        layer = self.pooled_layer
        w = self.weights[layer]
        if w.ndim != 2:
            fail(f"{layer}: w must be 2-D, got shape {tuple(w.shape)}")
        if not self.separable:
            fail(f"{layer}: only separable erasers carry a pooled increment")
        if self.pooled_basis is None and layer not in self.down:
            fail(f"{layer}: the pooled increment needs its basis 'pooled_basis' (or, rank r, a "
                 f"'{layer}.down')")
        if self.pooled_basis is not None:
            basis = self.pooled_basis
            self._check_tensor(basis, POOLED_BASIS_KEY, fail)
            if basis.ndim != 2 or not 1 <= basis.shape[1] <= basis.shape[0]:
                fail(f"pooled_basis must be d_in x m with 1 <= m <= d_in, got shape {tuple(basis.shape)}")
            if layer not in self.down and w.shape[1] != basis.shape[1]:
                fail(f"{layer}: w has {w.shape[1]} columns but pooled_basis has {basis.shape[1]}")

    def _validate_down(self, fail) -> None:
        """Rank r: one `A` per layer, chaining with `B`, in basis coordinates (with a basis) or d_in wide."""
        if not isinstance(self.down, dict) or set(self.down) != set(self.weights):
            fail(f"a rank-r eraser needs one down-projection per layer; layers without one: "
                 f"{sorted(set(self.weights) - set(self.down))}, without w: {sorted(set(self.down) - set(self.weights))}")
        width = int(self.basis.shape[1]) if self.basis is not None else None
        for path, down in self.down.items():
            self._check_tensor(down, f"{path}{DOWN_SUFFIX}", fail)
            if down.ndim != 2 or down.shape[0] < 1:
                fail(f"{path}: the down-projection must be r x {'m' if width else 'd_in'}, got {tuple(down.shape)}")
            if path in POOLED_LAYERS:  # its own basis and width
                if self.pooled_basis is not None and down.shape[1] != self.pooled_basis.shape[1]:
                    fail(f"{path}: the down-projection has {down.shape[1]} columns, pooled_basis "
                         f"{self.pooled_basis.shape[1]}")
            elif width is None:
                width = int(down.shape[1])
            if path not in POOLED_LAYERS and down.shape[1] != width:
                fail(f"{path}: the down-projection has {down.shape[1]} columns, expected {width} "
                     f"({'the basis dimension m' if self.basis is not None else 'the text width, as every layer'})")
            if self.weights[path].shape[1] != down.shape[0]:
                fail(f"{path}: w has {self.weights[path].shape[1]} columns but the down-projection has rank "
                     f"{down.shape[0]} (r must match)")

    @staticmethod
    def _check_tensor(t: Any, what: str, fail) -> None:
        if not isinstance(t, torch.Tensor):
            fail(f"{what} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            fail(f"{what} must be a floating-point tensor, got {t.dtype}")
        if not bool(torch.isfinite(t.detach()).all()):
            fail(f"{what} contains NaN or inf values")

    # -------------------------------------------------------------- file I/O
    def header(self) -> dict[str, str]:
        """The safetensors metadata (JSON strings) written with the tensors."""
        return {
            "format": FORMAT_NAME,
            "format_version": RANK_FORMAT_VERSION if self.down else FORMAT_VERSION,
            "name": self.name,
            "prompt": self.prompt,
            "kind": "separable" if self.separable else "dense",
            "beta": repr(self.beta),
            "prompts": json.dumps(self.prompts),
            "known": json.dumps(self.known),
            "protected": json.dumps(self.protected),
            "text_width": str(self.text_width),
            **({"rank": str(self.rank)} if self.down else {}),
            "base_model": str(self.metadata.get("base_model", "")),
            "dtheta_p": repr(self.dtheta_p()),
            "metadata": json.dumps(self.metadata, default=str),
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors as stored in the file: `basis` and `<layer path>.w`; rank r: `<layer path>.down`
        (`A S_p^T`) and `.w` (`B`), no basis."""
        tensors = {f"{path}{WEIGHT_SUFFIX}": w.detach().cpu().contiguous() for path, w in self.weights.items()}
        if self.down:
            tensors.update({f"{path}{DOWN_SUFFIX}": self.down_projection(path).cpu().contiguous()
                            for path in self.down})
        elif self.basis is not None:
            tensors[BASIS_KEY] = self.basis.detach().cpu().contiguous()
            if self.pooled_basis is not None:
                tensors[POOLED_BASIS_KEY] = self.pooled_basis.detach().cpu().contiguous()
        return tensors

    def to_lora(self, format: str = "diffusers") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The increment as a standard LoRA (scale 1, adds exactly `dW`): tensors and safetensors header.

        `format="diffusers"`: PEFT keys, `unet.<layer>.lora_A.weight = S_p^T` (rank r: `A S_p^T`) and
        `.lora_B.weight = beta * w`, for `pipe.load_lora_weights(tensors, adapter_name=...)`; `"kohya"`:
        `lora_unet_<layer>.lora_down.weight` / `.lora_up.weight` / `.alpha`, for ComfyUI and Automatic1111.
        `hub.export_lora` writes the files (the one export path; `sepme export-lora` and `push_to_hub` use it).
        """
        if format not in LORA_FORMATS:
            raise ValueError(f"unknown LoRA format {format!r}; choose one of {', '.join(LORA_FORMATS)}")
        self.validate()
        tensors, header = lora_from_eraser(self.state_dict(), self.header())
        return kohya_from_lora(tensors, header) if format == "kohya" else (tensors, header)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the eraser atomically (temp file in the same folder, then rename)."""
        self.validate()
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"eraser files are .safetensors; got {str(path)!r}")
        atomic_save_safetensors(self.state_dict(), path, self.header())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Eraser:
        """Read an eraser file, refusing anything malformed with an `EraserFileError` naming the file."""
        tensors, header = read_safetensors(path)
        return cls.from_state_dict(tensors, header, source=str(path))

    @classmethod
    def from_state_dict(
        cls, tensors: dict[str, torch.Tensor], header: dict[str, str], source: str = "eraser"
    ) -> Eraser:
        """Build an eraser from stored tensors and header (the inverse of `state_dict` / `header`)."""

        def fail(problem: str) -> EraserFileError:
            return EraserFileError(f"{source}: {problem}")

        if is_sepme_lora(header):  # a standard-LoRA export of an eraser (hub.export_lora)
            tensors, header = eraser_from_lora(tensors, header, source)
        if header.get("format") != FORMAT_NAME:
            hint = (" It looks like a plain LoRA file, not one exported by sepme-adapter: load it with "
                    "pipe.load_lora_weights." if any("lora" in k for k in tensors) else "")
            raise fail(f"not a SepME eraser (metadata 'format' is {header.get('format')!r}, "
                       f"expected {FORMAT_NAME!r}).{hint}")
        if header.get("format_version") not in READABLE_VERSIONS:
            raise fail(f"unknown format version {header.get('format_version')!r}; this sepme-adapter reads "
                       f"versions {', '.join(READABLE_VERSIONS)}. Upgrade sepme-adapter to read newer files.")
        for key in ("name", "prompt", "kind", "beta", "known", "protected", "metadata"):
            if key not in header:
                raise fail(f"metadata field {key!r} is missing")
        try:
            beta = float(header["beta"])
            known = json.loads(header["known"])
            protected = json.loads(header["protected"])
            metadata = json.loads(header["metadata"])
            prompts = json.loads(header.get("prompts", "[]"))
        except (ValueError, TypeError) as error:
            raise fail(f"malformed metadata ({error})") from None
        if not isinstance(metadata, dict):
            raise fail("metadata field 'metadata' must be a JSON object")
        if not isinstance(known, dict) or not isinstance(protected, list):
            raise fail("metadata 'known' must be a JSON object and 'protected' a JSON list")
        basis, downs = tensors.get(BASIS_KEY), layer_downs(tensors)
        if header["kind"] == "separable" and basis is None and not downs:
            raise fail("a separable eraser must store its basis tensor 'basis' (or, rank r, '<layer path>.down')")
        if downs and (basis is not None or header["kind"] != "separable"):
            raise fail("a rank-r eraser stores '<layer path>.down' and '.w' only (no basis) and is separable")
        if header["kind"] not in ("separable", "dense"):
            raise fail(f"unknown eraser kind {header['kind']!r}")
        unexpected = [key for key in tensors
                      if key not in (BASIS_KEY, POOLED_BASIS_KEY) and not key.endswith((WEIGHT_SUFFIX, DOWN_SUFFIX))]
        if unexpected:
            raise fail(f"unexpected tensor {unexpected[0]!r} (expected 'basis' and '<layer path>.w')")
        eraser = cls(name=header["name"], prompt=header["prompt"], basis=basis, weights=layer_weights(tensors),
                     beta=beta, known=known, protected=protected, metadata=metadata, prompts=prompts,
                     down=downs, pooled_basis=tensors.get(POOLED_BASIS_KEY), source=source)
        if "rank" in header and header["rank"] != str(eraser.rank):
            raise fail(f"metadata rank {header['rank']} does not match the tensors ({eraser.rank})")
        if "text_width" in header and header["text_width"] != str(eraser.text_width):
            raise fail(f"metadata text_width {header['text_width']} does not match the tensors ({eraser.text_width})")
        return eraser
