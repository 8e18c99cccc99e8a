"""Files on disk: safetensors reading / atomic writing, and the standard-LoRA layout of an eraser.

Pure state-dict <-> state-dict functions; nothing here knows the `Eraser` class.

An eraser's state dict is `basis` (`S_p`, d_in x m; absent for dense increments) plus
`<layer path>.w` per modified layer, with its header (metadata strings, `beta` among them).
A rank-r eraser stores no basis: per layer `<layer path>.down` (`A S_p^T`, r x d_in, rows in the
null space) and `<layer path>.w` (`B`, d_out x r), so `dW = beta * B @ (A S_p^T)`.
A SepME increment (paper Eq. 10) `dW = beta * w @ S_p^T` is exactly a LoRA whose down-projection
is fixed: `lora_A = S_p^T` (m x d_in) and `lora_B = beta * w` (d_out x m), scale 1
(`lora_alpha = r`). `beta` sits in `lora_B` rather than in `lora_A` so no factor is ~1e-5 small:
fp16 keeps both factors at full precision. The eraser's header travels in the export under the
safetensors metadata key `sepme_eraser`, so `load_sepme` reads exports too. Dense increments
export as exact full-rank LoRAs (one factor the identity, `beta * w` the other); rank-r erasers as
the LoRA they are (`lora_A = A S_p^T`, `lora_B = beta * B`).

The kohya / `lora_unet_...` layout that ComfyUI and Automatic1111 load (`kohya_from_lora`) names each
layer `lora_unet_<diffusers module path, dots as underscores>` with `.lora_down.weight` (= lora_A),
`.lora_up.weight` (= lora_B) and `.alpha` (= r, so the scale `alpha / r` is 1).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save, save_file

from .errors import EraserFileError
from .mmdit import POOLED_LAYERS, TRANSFORMER_FAMILY, layer_family

FORMAT_NAME = "sepme-eraser"
FORMAT_VERSION = "1"
RANK_FORMAT_VERSION = "2"  # rank-r erasers (`.down` tensors, no basis); full-rank files stay version 1
READABLE_VERSIONS = (FORMAT_VERSION, RANK_FORMAT_VERSION)
BASIS_KEY = "basis"
POOLED_BASIS_KEY = "pooled_basis"  # SDXL's pooled increment on add_embedding.linear_1 (S_pool, its own basis)
WEIGHT_SUFFIX = ".w"
DOWN_SUFFIX = ".down"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100 * 1024 * 1024
FILE_MODE = 0o644  # like any file a user saves (mkstemp would leave 0600)

SEPME_LORA_KEY = "sepme_eraser"  # safetensors metadata key holding the eraser's header (JSON)
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' key: LoraConfig arguments (JSON)
LORA_LAYOUT = "sepme-lora-v1"  # separable: A = S_p^T (rank r: A S_p^T), B = beta * w; dense: A @ B = beta * w
KOHYA_LAYOUT = "sepme-kohya-v1"  # the same factors under kohya key names
UNET_PREFIX = "unet."
TRANSFORMER_PREFIX = "transformer."  # FLUX / SD3: diffusers' Flux / SD3 LoRA loaders read `transformer.<layer>`
LORA_PREFIXES = (UNET_PREFIX, TRANSFORMER_PREFIX)
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
KOHYA_PREFIX = "lora_unet_"
KOHYA_SUFFIXES = {".lora_down.weight": "lora_A", ".lora_up.weight": "lora_B"}
KOHYA_ALPHA = ".alpha"

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
def serialized_size(tensors: StateDict, header: Header) -> int:
    """The size in bytes of the safetensors file these tensors and header make (what `save` writes)."""
    return len(save(tensors, metadata=header))


def layer_weights(tensors: StateDict) -> dict[str, torch.Tensor]:
    """`<layer path>` -> `w` from an eraser state dict (`B` of a rank-r eraser)."""
    return {key[: -len(WEIGHT_SUFFIX)]: t for key, t in tensors.items() if key.endswith(WEIGHT_SUFFIX)}


def layer_downs(tensors: StateDict) -> dict[str, torch.Tensor]:
    """`<layer path>` -> the down-projection `A S_p^T` (r x d_in) of a rank-r eraser state dict (empty: full rank)."""
    return {key[: -len(DOWN_SUFFIX)]: t for key, t in tensors.items() if key.endswith(DOWN_SUFFIX)}


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
    beta, basis, downs = float(header["beta"]), tensors.get(BASIS_KEY), layer_downs(tensors)
    prefix = lora_prefix(layer_weights(tensors))
    lora: StateDict = {}
    ranks: dict[str, int] = {}
    for layer_path, w in sorted(layer_weights(tensors).items()):
        if layer_path in downs:  # rank r: already a LoRA, `A S_p^T` and `beta * B`
            lora_a = downs[layer_path].detach().cpu().contiguous()
            lora_b = (beta * w.detach().cpu().float()).to(w.dtype).contiguous()
        else:
            own = tensors.get(POOLED_BASIS_KEY) if layer_path in POOLED_LAYERS else basis
            lora_a, lora_b = lora_factors(w, beta, own)
        lora[f"{prefix}{layer_path}.lora_A.weight"] = lora_a
        lora[f"{prefix}{layer_path}.lora_B.weight"] = lora_b
        ranks[layer_path] = int(lora_a.shape[0])
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {f"^{path}": r for path, r in ranks.items() if r != rank}
    config = {"r": rank, "lora_alpha": rank, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
              "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none"}
    lora_header = {
        "format": "pt",
        LORA_ADAPTER_METADATA_KEY: json.dumps({f"{prefix}{k}": v for k, v in config.items()}, sort_keys=True),
        SEPME_LORA_KEY: json.dumps({**header, "lora_layout": LORA_LAYOUT}),
    }
    return lora, lora_header


def lora_prefix(layer_paths: Any) -> str:
    """The key prefix of a LoRA export: `transformer.` for a FLUX / SD3 eraser's layers, else `unet.`."""
    return TRANSFORMER_PREFIX if layer_family(layer_paths) == TRANSFORMER_FAMILY else UNET_PREFIX


LORA_FORMATS = ("diffusers", "kohya")  # PEFT `unet.<layer>.lora_A.weight`; kohya `lora_unet_<layer>.lora_down.weight`


def kohya_name(layer_path: str) -> str:
    """The kohya / ComfyUI / Automatic1111 name of a UNet layer: `lora_unet_` + its diffusers path, dots as `_`."""
    return KOHYA_PREFIX + layer_path.replace(".", "_")


def kohya_from_lora(lora: StateDict, lora_header: Header) -> tuple[StateDict, Header]:
    """A `lora_from_eraser` export in the kohya layout: `lora_unet_<layer>.lora_down.weight` (= lora_A),
    `.lora_up.weight` (= lora_B) and `.alpha` = r (a 0-d tensor: scale `alpha / r` = 1, as in ComfyUI,
    Automatic1111 and diffusers' kohya conversion). Only those keys, so no loader warns of a stray one.
    The eraser's header rides along (`sepme_eraser`, with the layer paths) so `load_sepme` reads it back."""
    pairs = _lora_pairs(lora, lambda problem: EraserFileError(f"LoRA export: {problem}"))
    if layer_family(pairs) == TRANSFORMER_FAMILY:
        raise ValueError("the kohya layout is for UNet (SD v1 / v2 / XL) erasers; a FLUX / SD3 eraser exports in the "
                         "diffusers layout (format='diffusers'), which FluxPipeline / StableDiffusion3Pipeline"
                         ".load_lora_weights read")
    kohya: StateDict = {}
    for layer_path, pair in sorted(pairs.items()):
        name = kohya_name(layer_path)
        kohya[f"{name}.lora_down.weight"] = pair["lora_A"].contiguous()
        kohya[f"{name}.lora_up.weight"] = pair["lora_B"].contiguous()
        kohya[f"{name}{KOHYA_ALPHA}"] = torch.tensor(float(pair["lora_A"].shape[0]), dtype=pair["lora_A"].dtype)
    sepme = json.loads(lora_header[SEPME_LORA_KEY])
    ranks = sorted({int(pair["lora_A"].shape[0]) for pair in pairs.values()})
    header = {
        "format": "pt",
        "ss_network_module": "networks.lora",  # what kohya's sd-scripts writes; UIs show these
        "ss_network_dim": str(ranks[-1]),
        "ss_network_alpha": str(ranks[-1]),
        SEPME_LORA_KEY: json.dumps({**sepme, "lora_layout": KOHYA_LAYOUT, "layers": json.dumps(sorted(pairs))}),
    }
    return kohya, header


def lora_from_kohya(kohya: StateDict, layers: list[str], fail: Any) -> StateDict:
    """The inverse of `kohya_from_lora` (PEFT key names), given the layer paths; refuses stray keys and alpha != r."""
    paths = {kohya_name(path): path for path in layers}
    lora: StateDict = {}
    for key, tensor in kohya.items():
        suffix = next((s for s in (*KOHYA_SUFFIXES, KOHYA_ALPHA) if key.endswith(s)), None)
        base = key[: -len(suffix)] if suffix else key
        if base not in paths:
            raise fail(f"unexpected tensor {key!r} in a SepME kohya export (expected "
                       f"'lora_unet_<layer>.lora_down.weight' / '.lora_up.weight' / '.alpha')")
        if suffix == KOHYA_ALPHA:
            down = kohya.get(f"{base}.lora_down.weight")
            if down is None or float(tensor) != float(down.shape[0]):
                raise fail(f"{key}: alpha {float(tensor)} is not the rank; the export adds exactly dW only "
                           f"with alpha == r (re-export the eraser)")
            continue
        lora[f"{UNET_PREFIX}{paths[base]}.{KOHYA_SUFFIXES[suffix]}.weight"] = tensor
    return lora


def is_sepme_lora(header: Header) -> bool:
    """True for the metadata of a file written by `export_lora` / `sepme export-lora`."""
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
    if layout == KOHYA_LAYOUT:
        try:
            layers = json.loads(sepme.pop("layers"))
        except (KeyError, ValueError, TypeError):
            raise fail("the kohya export's SepME metadata has no layer list; re-export the eraser") from None
        tensors = lora_from_kohya(tensors, layers, fail)
    elif layout != LORA_LAYOUT:
        raise fail(f"unknown SepME LoRA layout {layout!r} (this sepme-adapter reads {LORA_LAYOUT!r} and "
                   f"{KOHYA_LAYOUT!r}); upgrade sepme-adapter")
    try:
        beta = float(sepme["beta"])
    except (KeyError, ValueError):
        raise fail("the SepME metadata has no valid 'beta'") from None
    if not beta > 0:
        raise fail(f"beta must be positive, got {beta}")
    factors = _lora_pairs(tensors, fail)
    state: StateDict = {}
    if sepme.get("rank"):  # rank r: lora_A is the layer's down-projection A S_p^T, lora_B = beta * B
        for path, pair in factors.items():
            lora_a, lora_b = pair["lora_A"], pair["lora_B"]
            state[f"{path}{DOWN_SUFFIX}"] = lora_a.contiguous()
            state[f"{path}{WEIGHT_SUFFIX}"] = (lora_b.double() / beta).to(lora_b.dtype).contiguous()
        return state, sepme
    separable = sepme.get("kind") == "separable"
    first_a = next(pair for path, pair in factors.items() if path not in POOLED_LAYERS)["lora_A"]
    for path, pair in factors.items():
        lora_a, lora_b = pair["lora_A"], pair["lora_B"]
        if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_b.shape[1] != lora_a.shape[0]:
            raise fail(f"{path}: lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)} do not chain")
        if separable and path in POOLED_LAYERS:  # the pooled increment has its own basis
            state[POOLED_BASIS_KEY] = lora_a.T.contiguous()
            w = lora_b.double() / beta
        elif separable:
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
    prefixes = set()
    for key, tensor in tensors.items():
        suffix = next((s for s in LORA_SUFFIXES if key.endswith(s)), None)
        prefix = next((p for p in LORA_PREFIXES if key.startswith(p)), None)
        if prefix is None or suffix is None:
            raise fail(f"unexpected tensor {key!r} in a SepME LoRA export (expected "
                       f"'unet.<layer>.lora_A.weight' / '.lora_B.weight', or 'transformer.<layer>...' for FLUX / SD3)")
        prefixes.add(prefix)
        factors.setdefault(key[len(prefix): -len(suffix)], {})[suffix[1:7]] = tensor
    if len(prefixes) > 1 or (prefixes and prefixes != {lora_prefix(factors)}):
        raise fail(f"the LoRA export's key prefixes {sorted(prefixes)} do not match its layers (a UNet's layers go "
                   f"under 'unet.', a transformer's under 'transformer.'); re-export the eraser")
    if not factors:
        raise fail("the LoRA export holds no tensors")
    incomplete = sorted(path for path, pair in factors.items() if len(pair) != 2)
    if incomplete:
        raise fail(f"layers {incomplete} lack lora_A or lora_B; the file is damaged, re-export it")
    return factors
