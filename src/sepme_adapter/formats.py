"""Files on disk: safetensors reading / atomic writing, and the standard-LoRA layout of an eraser.

Pure state-dict <-> state-dict functions; nothing here knows the `Eraser` class.

An eraser's state dict is `basis` (`S_p`, d_in x m; absent for dense increments) plus
`<layer path>.w` per modified layer, with its header (metadata strings, `beta` among them).
A SepME increment (paper Eq. 10) `dW = beta * w @ S_p^T` is exactly a LoRA whose down-projection
is fixed: `lora_A = S_p^T` (m x d_in) and `lora_B = beta * w` (d_out x m), scale 1
(`lora_alpha = r`). `beta` sits in `lora_B` rather than in `lora_A` so no factor is ~1e-5 small:
fp16 keeps both factors at full precision. The eraser's header travels in the export under the
safetensors metadata key `sepme_eraser`, so `load_sepme` reads exports too. Dense increments
export as exact full-rank LoRAs (one factor the identity, `beta * w` the other).
"""

from __future__ import annotations

import json
import os
import tempfile
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
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100 * 1024 * 1024
FILE_MODE = 0o644  # like any file a user saves (mkstemp would leave 0600)

SEPME_LORA_KEY = "sepme_eraser"  # safetensors metadata key holding the eraser's header (JSON)
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' key: LoraConfig arguments (JSON)
LORA_LAYOUT = "sepme-lora-v1"  # separable: A = S_p^T, B = beta * w; dense: A @ B = beta * w
UNET_PREFIX = "unet."
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")

StateDict = dict[str, torch.Tensor]
Header = dict[str, str]


# ------------------------------------------------------------------ safetensors IO
def atomic_save_safetensors(tensors: StateDict, path: Path, metadata: Header) -> None:
    """Write a safetensors file so that an interrupted save leaves any previous file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, temp, metadata=metadata)
        os.chmod(temp, FILE_MODE & ~_umask())
        with open(temp, "rb") as stream:
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def read_safetensors(path: str | os.PathLike) -> tuple[StateDict, Header]:
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


# ------------------------------------------------------------------ LoRA layout
def layer_weights(tensors: StateDict) -> dict[str, torch.Tensor]:
    """`<layer path>` -> `w` from an eraser state dict (every key but the basis)."""
    return {key[: -len(WEIGHT_SUFFIX)]: t for key, t in tensors.items() if key != BASIS_KEY}


def lora_factors(w: torch.Tensor, beta: float, basis: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(lora_A, lora_B)` of one layer with `lora_B @ lora_A == beta * w @ S_p^T` (Eq. 10)."""
    w = w.detach().cpu()
    scaled = (beta * w.float()).to(w.dtype)  # beta * w exactly as the run-time processor computes it
    if basis is not None:
        return basis.detach().cpu().T.clone(memory_format=torch.contiguous_format), scaled.contiguous()
    d_out, d_in = w.shape
    if d_out <= d_in:  # rank d_out: B = I, A = beta * w
        return scaled.contiguous(), torch.eye(d_out, dtype=w.dtype)
    return torch.eye(d_in, dtype=w.dtype), scaled.contiguous()


def lora_from_eraser(tensors: StateDict, header: Header) -> tuple[StateDict, Header]:
    """An eraser state dict as a diffusers PEFT-format LoRA: `unet.<layer>.lora_A.weight` / `.lora_B.weight`.

    With `lora_alpha == r` per layer (recorded in `lora_adapter_metadata`) the LoRA adds exactly `dW`.
    """
    beta, basis = float(header["beta"]), tensors.get(BASIS_KEY)
    lora: StateDict = {}
    ranks: dict[str, int] = {}
    for layer_path, w in sorted(layer_weights(tensors).items()):
        lora_a, lora_b = lora_factors(w, beta, basis)
        lora[f"{UNET_PREFIX}{layer_path}.lora_A.weight"] = lora_a
        lora[f"{UNET_PREFIX}{layer_path}.lora_B.weight"] = lora_b
        ranks[layer_path] = int(lora_a.shape[0])
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {f"^{path}": r for path, r in ranks.items() if r != rank}
    config = {"r": rank, "lora_alpha": rank, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
              "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none"}
    lora_header = {
        "format": "pt",
        LORA_ADAPTER_METADATA_KEY: json.dumps({f"{UNET_PREFIX}{k}": v for k, v in config.items()}, sort_keys=True),
        SEPME_LORA_KEY: json.dumps({**header, "lora_layout": LORA_LAYOUT}),
    }
    return lora, lora_header


def is_sepme_lora(header: Header) -> bool:
    """True for the metadata of a file written by `save_lora` / `sepme export-lora`."""
    return SEPME_LORA_KEY in header and header.get("format") != FORMAT_NAME


def eraser_from_lora(tensors: StateDict, header: Header, source: str = "eraser") -> tuple[StateDict, Header]:
    """The inverse of `lora_from_eraser`: basis `S_p = lora_A^T`, `w = lora_B / beta` (dense: `B @ A / beta`)."""

    def fail(problem: str) -> EraserFileError:
        return EraserFileError(f"{source}: {problem}")

    try:
        sepme = json.loads(header[SEPME_LORA_KEY])
    except (KeyError, ValueError, TypeError):
        raise fail(f"the metadata {SEPME_LORA_KEY!r} is missing or not JSON; re-export the eraser") from None
    if not isinstance(sepme, dict) or not all(isinstance(v, str) for v in sepme.values()):
        raise fail(f"the metadata {SEPME_LORA_KEY!r} must be a JSON object of strings")
    layout = sepme.pop("lora_layout", None)
    if layout != LORA_LAYOUT:
        raise fail(f"unknown SepME LoRA layout {layout!r} (this sepme-adapter reads {LORA_LAYOUT!r}); "
                   f"upgrade sepme-adapter")
    try:
        beta = float(sepme["beta"])
    except (KeyError, ValueError):
        raise fail("the SepME metadata has no valid 'beta'") from None
    if not beta > 0:
        raise fail(f"beta must be positive, got {beta}")
    factors = _lora_pairs(tensors, fail)
    state: StateDict = {}
    separable = sepme.get("kind") == "separable"
    first_a = next(iter(factors.values()))["lora_A"]
    for path, pair in factors.items():
        lora_a, lora_b = pair["lora_A"], pair["lora_B"]
        if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_b.shape[1] != lora_a.shape[0]:
            raise fail(f"{path}: lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)} do not chain")
        if separable:
            if not torch.equal(lora_a, first_a):
                raise fail(f"{path}: lora_A differs from the other layers', but a separable eraser shares one "
                           f"basis S_p; the file was edited or is not a SepME export")
            w = lora_b.double() / beta
        else:
            w = (lora_b.double() @ lora_a.double()) / beta
        state[f"{path}{WEIGHT_SUFFIX}"] = w.to(lora_b.dtype).contiguous()
    if separable:
        state[BASIS_KEY] = first_a.T.contiguous()
    return state, sepme


def _lora_pairs(tensors: StateDict, fail: Any) -> dict[str, dict[str, torch.Tensor]]:
    """`<layer path>` -> `{"lora_A": ..., "lora_B": ...}`; refuses stray or unpaired tensors."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in LORA_SUFFIXES if key.endswith(s)), None)
        if not key.startswith(UNET_PREFIX) or suffix is None:
            raise fail(f"unexpected tensor {key!r} in a SepME LoRA export (expected "
                       f"'unet.<layer>.lora_A.weight' / '.lora_B.weight')")
        factors.setdefault(key[len(UNET_PREFIX): -len(suffix)], {})[suffix[1:7]] = tensor
    if not factors:
        raise fail("the LoRA export holds no tensors")
    incomplete = sorted(path for path, pair in factors.items() if len(pair) != 2)
    if incomplete:
        raise fail(f"layers {incomplete} lack lora_A or lora_B; the file is damaged, re-export it")
    return factors
