"""One concept's increment: `dW_i = beta * w_i @ S_p.T` per modified layer (paper Eq. 9-10).

An `Eraser` holds the basis `S_p` (shared by every layer: all `attn2` layers read the same
text embeddings), one trainable `w` per modified linear layer (`to_k` / `to_v` of every
`attn2`), `beta`, and what the basis excludes (`known` concepts, `protected` prompts).
Files are safetensors: tensors `basis` and `<module path>.w`, metadata as JSON strings.
Dense erasers (`basis=None`: G-CiRs and the baselines) store full `d_out x d_in` matrices.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import EraserFileError

FORMAT_NAME = "sepme-eraser"
FORMAT_VERSION = "1"
BASIS_KEY = "basis"
WEIGHT_SUFFIX = ".w"
# Layers an increment may touch. Separable erasers: to_k / to_v of cross-attention only,
# the only weights that see text alone (METHOD.md). Dense erasers may also touch to_q / to_out.0.
SEPARABLE_LAYERS = ("attn2.to_k", "attn2.to_v")
DENSE_LAYERS = (*SEPARABLE_LAYERS, "attn2.to_q", "attn2.to_out.0")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass
class Eraser:
    """One erased concept: `delta(layer) = beta * weights[layer] @ basis.T` (Eq. 10).

    Args:
        name: the concept's name (the default adapter name when loaded).
        prompt: the prompt the increment was trained to erase.
        basis: `S_p`, `d_in x m` with orthonormal columns, or `None` for a dense increment.
        weights: `"<attn2 module path>.to_k"` / `".to_v"` -> `w` (`d_out x m`; dense: `d_out x d_in`).
        beta: the fixed scale of Eq. 10 (paper default 1e-4).
        known: names -> prompts of the concepts whose embeddings the basis excludes.
        protected: extra prompts the basis excludes (kept exact), e.g. watermark triggers.
        metadata: free-form JSON-able dict: `base_model`, `fingerprint`, `training`, `stats`.

    Example:
        >>> eraser = Eraser.load("vangogh.safetensors")
        >>> eraser.delta("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k").shape
        torch.Size([320, 768])
    """

    name: str
    prompt: str
    basis: torch.Tensor | None
    weights: dict[str, torch.Tensor]
    beta: float = 1e-4
    known: dict[str, str] = field(default_factory=dict)
    protected: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------- the math
    @property
    def separable(self) -> bool:
        """True for weight-decoupled increments (a basis excludes the known prompts)."""
        return self.basis is not None

    @property
    def text_width(self) -> int:
        """`d_in` of `to_k` / `to_v`: the text encoder's width."""
        if self.basis is not None:
            return int(self.basis.shape[0])
        return int(next(w.shape[1] for p, w in self.weights.items() if p.endswith(SEPARABLE_LAYERS)))

    def delta(self, layer_path: str) -> torch.Tensor:
        """The increment of one layer in `nn.Linear.weight` layout: `beta * w @ S_p.T` (Eq. 10)."""
        if layer_path not in self.weights:
            raise KeyError(f"eraser {self.name!r} has no increment for {layer_path!r}; it has {sorted(self.weights)}")
        w = self.weights[layer_path].detach().float()
        if self.basis is None:
            return self.beta * w
        return self.beta * (w @ self.basis.detach().float().T)

    def dtheta_p(self) -> float:
        """`||dtheta||_p = ||dtheta||_1 / M`, M = number of modified layers (paper Eq. 4)."""
        total = sum(float(self.delta(path).abs().sum()) for path in self.weights)
        return total / max(len(self.weights), 1)

    def is_separable_from(self, other: Eraser) -> bool:
        """Guaranteed separable: both bases exclude each other's exact prompt (DESIGN.md)."""
        return (
            self.separable
            and other.separable
            and self.known.get(other.name) == other.prompt
            and other.known.get(self.name) == self.prompt
        )

    def excludes_prompt(self, prompt: str) -> bool:
        """True when this eraser's basis excludes `prompt`, so its keys and values stay exact."""
        return self.separable and (prompt == "" or prompt in self.known.values() or prompt in self.protected)

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
        if not isinstance(self.known, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.known.items()
        ):
            fail("known must map concept names (str) to prompts (str)")
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
        allowed = SEPARABLE_LAYERS if self.basis is not None else DENSE_LAYERS
        for path, w in self.weights.items():
            if not isinstance(path, str) or not path.endswith(allowed):
                fail(f"layer {path!r} is not one of the layers a {'separable' if self.separable else 'dense'} "
                     f"eraser may change (names ending in {', '.join(allowed)})")
            self._check_tensor(w, path, fail)
            if w.ndim != 2:
                fail(f"{path}: w must be 2-D, got shape {tuple(w.shape)}")
            if self.basis is not None and w.shape[1] != self.basis.shape[1]:
                fail(f"{path}: w has {w.shape[1]} columns but the basis has {self.basis.shape[1]} (m must match)")

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
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "prompt": self.prompt,
            "kind": "separable" if self.separable else "dense",
            "beta": repr(self.beta),
            "known": json.dumps(self.known),
            "protected": json.dumps(self.protected),
            "text_width": str(self.text_width),
            "base_model": str(self.metadata.get("base_model", "")),
            "dtheta_p": repr(self.dtheta_p()),
            "metadata": json.dumps(self.metadata, default=str),
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors as stored in the file: `basis` and `<layer path>.w`."""
        tensors = {f"{path}{WEIGHT_SUFFIX}": w.detach().cpu().contiguous() for path, w in self.weights.items()}
        if self.basis is not None:
            tensors[BASIS_KEY] = self.basis.detach().cpu().contiguous()
        return tensors

    def to_lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The increment as a standard diffusers LoRA: `unet.<layer>.lora_A.weight = S_p^T`, `.lora_B.weight =
        beta * w` (scale 1), for `pipe.load_lora_weights(state_dict, adapter_name=...)`; see `hub.save_lora`."""
        from .hub import eraser_to_lora

        return eraser_to_lora(self)

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

        if header.get("format") != FORMAT_NAME:
            from .hub import SEPME_LORA_KEY, eraser_from_lora

            if SEPME_LORA_KEY in header:  # a standard-LoRA export of an eraser (hub.save_lora)
                return eraser_from_lora(tensors, header, source)
            hint = (" It looks like a plain LoRA file, not one exported by sepme-adapter: load it with "
                    "pipe.load_lora_weights." if any("lora" in k for k in tensors) else "")
            raise fail(f"not a SepME eraser (metadata 'format' is {header.get('format')!r}, "
                       f"expected {FORMAT_NAME!r}).{hint}")
        if header.get("format_version") != FORMAT_VERSION:
            raise fail(f"unknown format version {header.get('format_version')!r}; this sepme-adapter reads "
                       f"version {FORMAT_VERSION}. Upgrade sepme-adapter to read newer files.")
        for key in ("name", "prompt", "kind", "beta", "known", "protected", "metadata"):
            if key not in header:
                raise fail(f"metadata field {key!r} is missing")
        try:
            beta = float(header["beta"])
            known = json.loads(header["known"])
            protected = json.loads(header["protected"])
            metadata = json.loads(header["metadata"])
        except (ValueError, TypeError) as error:
            raise fail(f"malformed metadata ({error})") from None
        if not isinstance(metadata, dict):
            raise fail("metadata field 'metadata' must be a JSON object")
        if not isinstance(known, dict) or not isinstance(protected, list):
            raise fail("metadata 'known' must be a JSON object and 'protected' a JSON list")
        basis = tensors.get(BASIS_KEY)
        if header["kind"] == "separable" and basis is None:
            raise fail("a separable eraser must store its basis tensor 'basis'")
        if header["kind"] not in ("separable", "dense"):
            raise fail(f"unknown eraser kind {header['kind']!r}")
        weights = {}
        for key, tensor in tensors.items():
            if key == BASIS_KEY:
                continue
            if not key.endswith(WEIGHT_SUFFIX):
                raise fail(f"unexpected tensor {key!r} (expected 'basis' and '<layer path>.w')")
            weights[key[: -len(WEIGHT_SUFFIX)]] = tensor
        eraser = cls.__new__(cls)
        eraser.name, eraser.prompt = header["name"], header["prompt"]
        eraser.basis, eraser.weights, eraser.beta = basis, weights, beta
        eraser.known, eraser.protected, eraser.metadata = known, protected, metadata
        eraser.validate(source)
        if "text_width" in header and header["text_width"] != str(eraser.text_width):
            raise fail(f"metadata text_width {header['text_width']} does not match the tensors ({eraser.text_width})")
        return eraser


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file so that an interrupted save leaves any previous file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, temp, metadata=metadata)
        with open(temp, "rb") as stream:
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors and header of a safetensors file; never unpickle. Errors name the file."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise EraserFileError(f"{path}: refusing a pickle-based file ({path.suffix}); sepme-adapter reads "
                              f"only .safetensors files, which cannot run code when loaded")
    if not path.is_file():
        raise FileNotFoundError(f"eraser file {str(path)!r} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as stream:
        prefix = stream.read(8)
    if size < 8 or len(prefix) < 8:
        raise EraserFileError(f"{path}: file is empty or truncated ({size} bytes); re-download or re-save it")
    header_bytes = int.from_bytes(prefix, "little")
    if header_bytes > MAX_HEADER_BYTES or header_bytes > size - 8:
        raise EraserFileError(f"{path}: the safetensors header claims {header_bytes} bytes but the file has "
                              f"{size}; the file is truncated or not a safetensors file")
    try:
        with safe_open(str(path), framework="pt") as reader:
            header = dict(reader.metadata() or {})
            tensors = {key: reader.get_tensor(key) for key in reader.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise EraserFileError(f"{path}: not a readable safetensors file ({error}); re-download or re-save it") from None
    return tensors, header


