"""Sharing erasers: push to the Hugging Face Hub with a model card, and export as standard LoRA.

A SepME increment (paper Eq. 10) `dW = beta * w @ S_p^T` is exactly a LoRA whose
down-projection is fixed: `lora_A = S_p^T` (m x d_in) and `lora_B = beta * w` (d_out x m),
scale 1 (`lora_alpha = r`). Plain diffusers therefore loads an exported eraser with
`pipe.load_lora_weights(file, adapter_name=...)`, sums several with `pipe.set_adapters([...])`
and switches them off with `pipe.disable_lora()`. `beta` sits in `lora_B` rather than in
`lora_A` so no factor is ~1e-5 small: fp16 keeps both factors at full precision.
The eraser's own header (concept, known prompts, fingerprint, training statistics) travels in
the export under the safetensors metadata key `sepme_eraser`, so `load_sepme` reads exports too.

Dense erasers (`basis=None`: G-CiRs and the baselines) export as exact full-rank LoRAs
(`r = min(d_out, d_in)`, one factor the identity, `beta * w` the other); they are as large as
the dense file and carry no separation guarantee.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .eraser import FORMAT_NAME, Eraser, atomic_save_safetensors
from .errors import EraserFileError

SEPME_LORA_KEY = "sepme_eraser"  # safetensors metadata key holding the eraser's header (JSON)
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' key: LoraConfig arguments (JSON)
LORA_LAYOUT = "sepme-lora-v1"  # separable: A = S_p^T, B = beta * w; dense: A @ B = beta * w
UNET_PREFIX = "unet."
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
LORA_FOLDER = "lora"  # where push_to_hub puts the plain-diffusers exports inside a repo
LIBRARY_NAME = "sepme-adapter"
TAGS = ["sepme", "concept-erasure", "diffusers", "lora", "text-to-image"]

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo, ModelCard

ErasersOrPaths = Eraser | str | os.PathLike | Iterable[Eraser | str | os.PathLike]


# ------------------------------------------------------------------ LoRA export / import
def _lora_factors(eraser: Eraser, layer_path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`(lora_A, lora_B)` of one layer with `lora_B @ lora_A == eraser.delta(layer_path)`."""
    w = eraser.weights[layer_path].detach().cpu()
    scaled = (eraser.beta * w.float()).to(w.dtype)  # beta * w exactly as the run-time processor computes it
    if eraser.basis is not None:
        return eraser.basis.detach().cpu().T.clone(memory_format=torch.contiguous_format), scaled.contiguous()
    d_out, d_in = w.shape
    if d_out <= d_in:  # rank d_out: B = I, A = beta * w
        return scaled.contiguous(), torch.eye(d_out, dtype=w.dtype)
    return torch.eye(d_in, dtype=w.dtype), scaled.contiguous()


def eraser_to_lora(eraser: Eraser) -> dict[str, torch.Tensor]:
    """The eraser as a diffusers PEFT-format LoRA state dict: `unet.<layer>.lora_A.weight` / `.lora_B.weight`.

    Every layer's `lora_B @ lora_A` is the eraser's increment `beta * w @ S_p^T` (Eq. 10), so with
    `lora_alpha == r` (diffusers' default for files without alphas) the LoRA adds exactly `dW`.
    """
    eraser.validate()
    tensors = {}
    for layer_path in sorted(eraser.weights):
        lora_a, lora_b = _lora_factors(eraser, layer_path)
        tensors[f"{UNET_PREFIX}{layer_path}.lora_A.weight"] = lora_a
        tensors[f"{UNET_PREFIX}{layer_path}.lora_B.weight"] = lora_b
    return tensors


def lora_adapter_config(eraser: Eraser) -> dict[str, Any]:
    """`LoraConfig` arguments diffusers reads from `lora_adapter_metadata`: rank = alpha per layer (scale 1)."""
    ranks = {path: _lora_rank(eraser, path) for path in sorted(eraser.weights)}
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {f"^{path}": r for path, r in ranks.items() if r != rank}
    return {
        "r": rank, "lora_alpha": rank, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted(eraser.weights), "lora_dropout": 0.0, "bias": "none",
    }


def _lora_rank(eraser: Eraser, layer_path: str) -> int:
    if eraser.basis is not None:
        return int(eraser.basis.shape[1])
    return int(min(eraser.weights[layer_path].shape))


def lora_header(eraser: Eraser) -> dict[str, str]:
    """Safetensors metadata of an export: diffusers' LoRA config plus the eraser's own header."""
    config = {f"{UNET_PREFIX}{key}": value for key, value in lora_adapter_config(eraser).items()}
    return {
        "format": "pt",
        LORA_ADAPTER_METADATA_KEY: json.dumps(config, sort_keys=True),
        SEPME_LORA_KEY: json.dumps({**eraser.header(), "lora_layout": LORA_LAYOUT}),
    }


def save_lora(eraser: Eraser, path: str | os.PathLike) -> Path:
    """Write the eraser as one standard LoRA `.safetensors` file (atomic, like `Eraser.save`).

    Example:
        >>> save_lora(Eraser.load("picasso.safetensors"), "lora/picasso.safetensors")
        >>> pipe.load_lora_weights("lora/picasso.safetensors", adapter_name="picasso")  # plain diffusers
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA exports are .safetensors files; got {str(path)!r}")
    atomic_save_safetensors(eraser_to_lora(eraser), path, lora_header(eraser))
    return path


def is_sepme_lora(header: dict[str, str]) -> bool:
    """True for the metadata of a file written by `save_lora` / `sepme export-lora`."""
    return SEPME_LORA_KEY in header and header.get("format") != FORMAT_NAME


def eraser_from_lora(tensors: dict[str, torch.Tensor], header: dict[str, str], source: str = "eraser") -> Eraser:
    """Rebuild the eraser from an export: basis `S_p = lora_A^T`, `w = lora_B / beta` (dense: `B @ A / beta`)."""

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
    state: dict[str, torch.Tensor] = {}
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
        state[f"{path}.w"] = w.to(lora_b.dtype).contiguous()
    if separable:
        state["basis"] = first_a.T.contiguous()
    return Eraser.from_state_dict(state, sepme, source=source)


# ------------------------------------------------------------------ gathering erasers
def _safe_stem(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return stem or "eraser"


def _gather(erasers_or_paths: ErasersOrPaths) -> list[tuple[str, Eraser, Path | None]]:
    """`(file name, eraser, source path or None)` for each eraser; refuses duplicate names."""
    if isinstance(erasers_or_paths, (Eraser, str, os.PathLike)):
        erasers_or_paths = [erasers_or_paths]
    entries = []
    for item in erasers_or_paths:
        if isinstance(item, Eraser):
            item.validate()
            entries.append((f"{_safe_stem(item.name)}.safetensors", item, None))
        else:
            path = Path(item)
            if path.is_dir():
                raise ValueError(f"{str(path)!r} is a folder; pass the eraser files in it (e.g. {path}/*.safetensors)")
            entries.append((path.name, Eraser.load(path), path))
    if not entries:
        raise ValueError("no erasers given; pass Eraser objects or .safetensors eraser files")
    for what, values in (("file name", [e[0] for e in entries]), ("concept name", [e[1].name for e in entries])):
        duplicates = sorted({v for v in values if values.count(v) > 1})
        if duplicates:
            raise ValueError(f"two erasers share the {what} {duplicates}; rename one (Eraser.name / the file)")
    return entries


def export_lora(erasers_or_paths: ErasersOrPaths, output: str | os.PathLike) -> list[Path]:
    """Write each eraser as a standard diffusers LoRA file; `output` is a folder, or a file for one eraser.

    Example:
        >>> export_lora(["vangogh.safetensors", "picasso.safetensors"], "lora")
        [PosixPath('lora/vangogh.safetensors'), PosixPath('lora/picasso.safetensors')]
    """
    entries = _gather(erasers_or_paths)
    output = Path(output)
    if output.suffix == ".safetensors":
        if len(entries) != 1:
            raise ValueError(f"-o {str(output)!r} names one file but {len(entries)} erasers were given; "
                             f"pass a folder instead")
        targets = [output]
    else:
        targets = [output / file_name for file_name, _, _ in entries]
    for (_, _, source), target in zip(entries, targets):
        if source is not None and target.exists() and target.resolve() == source.resolve():
            raise ValueError(f"exporting {str(source)!r} to {str(target)!r} would overwrite the eraser itself; "
                             f"choose another output folder")
    return [save_lora(eraser, target) for (_, eraser, _), target in zip(entries, targets)]


# ------------------------------------------------------------------ model card
def _hub_model_id(name: Any) -> str | None:
    """`name` if it looks like a Hub model id (`org/name`), not a local path or a bare label."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(name, str) or name.count("/") != 1 or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text.replace("|", "\\|").replace("\n", " ") or " "


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys (`config.lr`), so each gets its own table row."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _table(mapping: dict[str, Any], heading: str) -> list[str]:
    if not isinstance(mapping, dict) or not mapping:
        return []
    rows = [f"| {_cell(key)} | {_cell(value)} |" for key, value in _flatten(mapping).items()]
    return [f"| {heading} | value |", "|---|---|", *rows, ""]


def model_card(
    entries: Sequence[tuple[str, Eraser]], repo_id: str, lora_files: Collection[str] | None = None
) -> ModelCard:
    """A `huggingface_hub.ModelCard` for the erasers `(file name, eraser)` of a repo.

    `lora_files`: the file names that have a `lora/` export (default: all of them).
    """
    from huggingface_hub import ModelCard, ModelCardData

    bases = sorted({b for _, e in entries if (b := _hub_model_id(e.metadata.get("base_model")))})
    data = ModelCardData(
        base_model=(bases[0] if len(bases) == 1 else bases) or None,
        base_model_relation="adapter" if bases else None,
        library_name=LIBRARY_NAME, tags=list(TAGS), pipeline_tag="text-to-image",
    )
    base = bases[0] if len(bases) == 1 else "BASE_MODEL"
    recorded = sorted({str(e.metadata.get("base_model") or "unknown") for _, e in entries})
    base_note = [] if len(bases) == 1 else [f"# BASE_MODEL: the model the erasers were trained on ({', '.join(recorded)})"]
    names = [e.name for _, e in entries]
    first_file = entries[0][0]
    lines = [
        f"# SepME erasers: {', '.join(names)}", "",
        "Separable, reversible concept erasers made with "
        "sepme-adapter, an implementation of SepME "
        "(*Separable Multi-Concept Erasure from Diffusion Models*). Each file is one concept's weight "
        "increment `dW = beta * w @ S_p^T` on the cross-attention `to_k` / `to_v` layers; any subset can "
        "be erased or restored at run time. `S_p` spans the null space of the blank prompt's, the known "
        "concepts' and the protected prompts' text embeddings, so those keep their exact keys and values.",
        "", "## Concepts", "",
        "| concept | file | prompt | known concepts (kept exact) | protected prompts | kind | beta | ‖dθ‖ₚ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for file_name, e in entries:
        lines.append(f"| {_cell(e.name)} | `{file_name}` | {_cell(e.prompt)} | {_cell(', '.join(e.known) or '-')} | "
                     f"{_cell(', '.join(e.protected) or '-')} | {'separable' if e.separable else 'dense'} | "
                     f"{e.beta:g} | {e.dtheta_p():.4g} |")
    lines.append("")
    for file_name, e in entries:
        lines += [f"### {e.name}", "", f"- file: `{file_name}`", f"- prompt: {e.prompt!r}",
                  f"- base model: {e.metadata.get('base_model') or 'unknown'}"]
        lines += [f"- known concept {k!r}: {p!r}" for k, p in e.known.items()]
        lines += [f"- protected prompt: {p!r}" for p in e.protected]
        lines.append("")
        lines += _table(e.metadata.get("training"), "training setting")
        lines += _table(e.metadata.get("stats"), "measured statistic")
    erase = json.dumps(names[:2])
    lines += [
        "## Usage with sepme-adapter", "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        "import sepme_adapter", "", *base_note,
        f"pipe = sepme_adapter.attach(StableDiffusionPipeline.from_pretrained({base!r}))",
        f"pipe.load_sepme({repo_id!r})  # every eraser in this repo",
        f"# or one of them: pipe.load_sepme({repo_id!r}, weight_name={first_file!r})",
        f"pipe.set_erased({erase})  # exactly these erased, the rest restored",
        "pipe.set_erased([])  # the original model, bit for bit",
        "```", "",
        "`load_sepme` checks each eraser against the pipeline's base model and warns when an erased "
        "combination lacks the separation guarantee (two erasers not trained knowing each other).", "",
    ]
    exported = [(f, e) for f, e in entries if lora_files is None or f in lora_files]
    if exported:
        adapter_lines = [f"pipe.load_lora_weights({repo_id!r}, subfolder={LORA_FOLDER!r}, weight_name={f!r}, "
                         f"adapter_name={e.name!r})" for f, e in exported]
        erase = json.dumps([e.name for _, e in exported[:2]])
        lines += [
            "## Usage with plain diffusers (no sepme-adapter)", "",
            f"`{LORA_FOLDER}/` holds the same erasers as standard LoRA files: `lora_A = S_p^T`, "
            "`lora_B = beta * w`, scale 1, so the LoRA adds exactly the SepME increment.", "",
            "```python",
            "from diffusers import StableDiffusionPipeline", "", *base_note,
            f"pipe = StableDiffusionPipeline.from_pretrained({base!r})",
            *adapter_lines,
            f"pipe.set_adapters({erase})  # weights 1.0: the increments add up, as with set_erased",
            "pipe.disable_lora()  # the original model",
            "```", "",
            "Keep adapter weights at 1.0: `set_adapters(..., adapter_weights=...)` or "
            "`cross_attention_kwargs={\"scale\": ...}` rescale the erasure itself. This route skips the "
            "base-model check.", "",
        ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


# ------------------------------------------------------------------ push
def push_to_hub(
    erasers_or_paths: ErasersOrPaths,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    *,
    include_lora: bool = True,
    revision: str | None = None,
) -> CommitInfo:
    """Upload erasers, their plain-diffusers LoRA exports and a model card to a Hub repo, in one commit.

    Creates the repo if needed. Eraser files keep their names (in-memory erasers become
    `<name>.safetensors`); exports go to `lora/`. The `README.md` model card describes every
    eraser in the repo after the commit, including ones pushed earlier.

    Args:
        erasers_or_paths: `Eraser` objects and/or eraser `.safetensors` paths.
        repo_id: `"user/repo"`.
        private: create the repo private (an existing repo keeps its visibility).
        token: a Hub token (default: `HF_TOKEN` or the one saved by `hf auth login`).
        commit_message: default "Upload SepME erasers: <names>".
        include_lora: also upload the `lora/` exports (plain diffusers `load_lora_weights`).
        revision: the branch to commit to (default `main`).

    Returns:
        The `huggingface_hub.CommitInfo` (`.oid`, `.commit_url`).

    Example:
        >>> sepme_adapter.push_to_hub(["vangogh.safetensors", "picasso.safetensors"], "someone/sd15-erasers")
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    entries = _gather(erasers_or_paths)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    new_files = {file_name for file_name, _, _ in entries}
    card_entries = [(file_name, eraser) for file_name, eraser, _ in entries]
    repo_files = api.list_repo_files(repo_id, revision=revision)
    for file_name in repo_files:
        if "/" in file_name or not file_name.endswith(".safetensors") or file_name in new_files:
            continue
        try:
            existing = Eraser.load(api.hf_hub_download(repo_id, file_name, revision=revision))
        except EraserFileError:
            continue  # not an eraser: leave it alone
        clash = next((f for f, e in card_entries if e.name == existing.name), None)
        if clash is not None:
            raise ValueError(f"{repo_id} already holds an eraser for {existing.name!r} in {file_name!r}; push "
                             f"{clash!r} under that file name to replace it, or rename the concept")
        card_entries.append((file_name, existing))
    card_entries.sort(key=lambda entry: entry[0])

    operations = []
    with tempfile.TemporaryDirectory(prefix="sepme-push-") as folder:
        for file_name, eraser, source in entries:
            if source is None:
                source = eraser.save(Path(folder) / file_name)
            operations.append(CommitOperationAdd(path_in_repo=file_name, path_or_fileobj=source.read_bytes()))
            if include_lora:
                exported = save_lora(eraser, Path(folder) / LORA_FOLDER / file_name)
                operations.append(CommitOperationAdd(path_in_repo=f"{LORA_FOLDER}/{file_name}",
                                                     path_or_fileobj=exported.read_bytes()))
    lora_files = {f[len(LORA_FOLDER) + 1:] for f in repo_files if f.startswith(f"{LORA_FOLDER}/")}
    if include_lora:
        lora_files |= new_files
    card = model_card(card_entries, repo_id, lora_files)
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode()))
    message = commit_message or f"Upload SepME erasers: {', '.join(e.name for _, e, _ in entries)}"
    return api.create_commit(repo_id, operations, commit_message=message, revision=revision)


# ------------------------------------------------------------------ command line
def _run_push(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        info = push_to_hub(args.files, args.repo_id, private=args.private, token=args.token,
                           commit_message=args.message, include_lora=not args.no_lora)
    except HfHubHTTPError as error:
        print(f"sepme push: error: the Hub refused the upload: {error}", file=sys.stderr)
        return 1
    print(f"pushed {len(args.files)} eraser(s) to {args.repo_id}: {info.commit_url}")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    for path in export_lora(args.files, args.output):
        print(path)
    return 0


def register_cli(subparsers: Any) -> None:
    """Add `sepme push` and `sepme export-lora`."""
    push = subparsers.add_parser(
        "push", help="upload eraser files, LoRA exports and a model card to a Hugging Face Hub repo",
        description="Upload eraser files to a Hub repo (created if needed) in one commit, with plain-diffusers "
                    "LoRA exports under lora/ and a generated README.md model card.",
    )
    push.add_argument("files", nargs="+", metavar="FILE", help="eraser .safetensors files")
    push.add_argument("repo_id", metavar="REPO_ID", help="the Hub repo, e.g. someone/sd15-erasers")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or `hf auth login`)")
    push.add_argument("-m", "--message", default=None, help="commit message")
    push.add_argument("--no-lora", action="store_true", help="do not upload the lora/ exports")
    push.set_defaults(func=_run_push)

    export = subparsers.add_parser(
        "export-lora", help="write erasers as standard diffusers LoRA files (pipe.load_lora_weights)",
        description="Write each eraser as a standard diffusers/PEFT LoRA file: lora_A = S_p^T, "
                    "lora_B = beta * w, scale 1. load_sepme reads these files too.",
    )
    export.add_argument("files", nargs="+", metavar="FILE", help="eraser .safetensors files")
    export.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="output folder (one file per eraser, same names), or a .safetensors file for one eraser")
    export.set_defaults(func=_run_export)


__all__ = ["eraser_from_lora", "eraser_to_lora", "export_lora", "model_card", "push_to_hub", "save_lora"]
