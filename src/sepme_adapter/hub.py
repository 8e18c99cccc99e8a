"""Sharing erasers: push to the Hugging Face Hub with a model card, and export as standard LoRA.

An exported eraser is a plain diffusers LoRA (`formats.lora_from_eraser`: `lora_A = S_p^T`,
`lora_B = beta * w`, scale 1), so diffusers loads it with `pipe.load_lora_weights(file,
adapter_name=...)`, sums several with `pipe.set_adapters([...])` and switches them off with
`pipe.disable_lora()`; `load_sepme` reads the exports too. Dense erasers (G-CiRs and the
baselines) export as exact full-rank LoRAs; they carry no separation guarantee. Rank-r erasers
export as the rank-r LoRA they are (`lora_A = A S_p^T`). `format="kohya"` writes the same factors
under the `lora_unet_...` names (`lora_down` / `lora_up` / `alpha`) that ComfyUI and Automatic1111 load.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .eraser import Eraser
from .errors import EraserFileError
from .files import eraser_filename
from .formats import LORA_FORMATS, SEPME_LORA_KEY, atomic_save_safetensors, serialized_size
from .mmdit import TRANSFORMER_FAMILY, layer_family

LORA_FOLDER = "lora"  # where push_to_hub puts the plain-diffusers exports inside a repo
LIBRARY_NAME = "sepme-adapter"
TAGS = ["sepme", "concept-erasure", "diffusers", "lora", "text-to-image"]

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo, ModelCard

ErasersOrPaths = Eraser | str | os.PathLike | Iterable[Eraser | str | os.PathLike]


# ------------------------------------------------------------------ sizes
def file_size(eraser: Eraser) -> int:
    """The size in bytes of the eraser's own `.safetensors` file (`Eraser.save`)."""
    return serialized_size(eraser.state_dict(), eraser.header())


# ------------------------------------------------------------------ gathering erasers
def _gather(erasers_or_paths: ErasersOrPaths) -> list[tuple[str, Eraser, Path | None]]:
    """`(file name, eraser, source path or None)` for each eraser; refuses duplicate names."""
    if isinstance(erasers_or_paths, (Eraser, str, os.PathLike)):
        erasers_or_paths = [erasers_or_paths]
    entries = []
    for item in erasers_or_paths:
        if isinstance(item, Eraser):
            item.validate()
            entries.append((eraser_filename(item.name), item, None))
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


def export_lora(erasers_or_paths: ErasersOrPaths, output: str | os.PathLike, format: str = "diffusers") -> list[Path]:
    """Write each eraser as a standard LoRA `.safetensors` file (atomic, like `Eraser.save`); `output` is a
    folder, or a file for one eraser. The layouts are `Eraser.to_lora`'s.

    `format`: `"diffusers"` (PEFT keys, `pipe.load_lora_weights`) or `"kohya"` (ComfyUI, Automatic1111;
    diffusers loads these too). Both add exactly `dW`.

    Example:
        >>> export_lora(["vangogh.safetensors", "picasso.safetensors"], "lora")
        [PosixPath('lora/vangogh.safetensors'), PosixPath('lora/picasso.safetensors')]
        >>> pipe.load_lora_weights("lora/vangogh.safetensors", adapter_name="vangogh")  # plain diffusers
        >>> export_lora("picasso.safetensors", "ComfyUI/models/loras/picasso.safetensors", format="kohya")
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
    if format not in LORA_FORMATS:
        raise ValueError(f"unknown LoRA format {format!r}; choose one of {', '.join(LORA_FORMATS)}")
    for (_, eraser, _), target in zip(entries, targets):
        tensors, header = eraser.to_lora(format)
        atomic_save_safetensors(tensors, target, header)
    return targets


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


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.2f} MB" if size >= 10_000 else f"{size / 1e3:.1f} kB"


def _table(mapping: dict[str, Any], heading: str) -> list[str]:
    if not isinstance(mapping, dict) or not mapping:
        return []
    rows = [f"| {_cell(key)} | {_cell(value)} |" for key, value in _flatten(mapping).items()]
    return [f"| {heading} | value |", "|---|---|", *rows, ""]


def base_pipeline_class(erasers: Sequence[Eraser]) -> str:
    """The diffusers pipeline class of the erasers' base model for the card's snippets: the one recorded at
    training (`metadata["pipeline"]`) when it is an SDXL, FLUX or SD3 one, `StableDiffusionXLPipeline` for SDXL's
    2048-wide text, `DiffusionPipeline` for a transformer eraser that recorded none, else `StableDiffusionPipeline`."""
    for eraser in erasers:
        recorded = str(eraser.metadata.get("pipeline") or "")
        for family in ("Flux", "StableDiffusion3"):
            if recorded.startswith(family):
                return f"{family}Pipeline"
        if layer_family(eraser.weights) == TRANSFORMER_FAMILY:
            return "DiffusionPipeline"  # a FLUX or SD3 eraser that did not record which
        if recorded.startswith("StableDiffusionXL") or (eraser.separable and eraser.text_width == 2048):
            return "StableDiffusionXLPipeline"
    return "StableDiffusionPipeline"


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
    pipeline_class = base_pipeline_class([e for _, e in entries])
    recorded = sorted({str(e.metadata.get("base_model") or "unknown") for _, e in entries})
    base_note = [] if len(bases) == 1 else [f"# BASE_MODEL: the model the erasers were trained on ({', '.join(recorded)})"]
    names = [e.name for _, e in entries]
    transformer = any(layer_family(e.weights) == TRANSFORMER_FAMILY for _, e in entries)
    where = ("the transformer's `context_embedder` (the layer its text tokens enter) and its pooled-text layer"
             if transformer else "the cross-attention `to_k` / `to_v` layers")
    kept, kept_one = (("context rows (what every joint block reads)", "context row") if transformer
                      else ("keys and values", "cross-attention key or value"))
    first_file = entries[0][0]
    lines = [
        f"# SepME erasers: {', '.join(names)}", "",
        "Separable, reversible concept erasers made with "
        "sepme-adapter, an implementation of SepME "
        "(*Separable Multi-Concept Erasure from Diffusion Models*). Each file is one concept's weight "
        f"increment `dW = beta * w @ S_p^T` on {where}; any subset can "
        "be erased or restored at run time. `S_p` spans the null space of the blank prompt's, the known "
        f"concepts' and the protected prompts' text embeddings, so those keep their exact {kept} "
        "(exact basis) or move by at most the eraser's leakage certificate (compact basis: the largest "
        f"relative change of any {kept_one} over those prompts, measured after training).",
        "", "## Concepts", "",
        "| concept | file | prompts | known concepts (kept exact) | protected prompts | kind | basis | rank | "
        "file size | leakage certificate | beta | ‖dθ‖ₚ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for file_name, e in entries:
        basis = e.metadata.get("basis") or {}
        certificate = "not measured" if e.certificate is None else f"{e.certificate:.2e}"
        lines.append(f"| {_cell(e.name)} | `{file_name}` | {_cell('; '.join(e.prompts))} | "
                     f"{_cell(', '.join(e.known) or '-')} | {_cell(', '.join(e.protected) or '-')} | "
                     f"{'separable' if e.separable else 'dense'} | {_cell(basis.get('kind', '-'))} | "
                     f"{e.rank or 'full'} | {_megabytes(file_size(e))} | {certificate} | {e.beta:g} | "
                     f"{e.dtheta_p():.4g} |")
    lines.append("")
    for file_name, e in entries:
        certificate = "not measured" if e.certificate is None else f"{e.certificate:.2e}"
        collateral = e.metadata.get("collateral") or {}
        collateral_line = ("- collateral certificate: not measured" if collateral.get("max") is None else
                           f"- collateral certificate (relative key / value change of {collateral.get('prompts')} held-out "
                           f"unlisted prompts): median {collateral['median']:.2e}, max {collateral['max']:.2e}")
        lines += [f"### {e.name}", "", f"- file: `{file_name}`",
                  f"- rank {e.rank or 'full'}, file size {_megabytes(file_size(e))}, leakage certificate {certificate}",
                  collateral_line,
                  *(f"- prompt: {p!r}" for p in e.prompts),
                  f"- base model: {e.metadata.get('base_model') or 'unknown'}"]
        lines += [f"- known concept {k!r}: {'; '.join(map(repr, ps))}" for k, ps in e.known.items()]
        lines += [f"- protected prompt: {p!r}" for p in e.protected]
        lines.append("")
        lines += _table(e.metadata.get("training"), "training setting")
        lines += _table(e.metadata.get("stats"), "measured statistic")
    erase = json.dumps(names[:2])
    lines += [
        "## Usage with sepme-adapter", "",
        "```python",
        f"from diffusers import {pipeline_class}",
        "import sepme_adapter", "", *base_note,
        f"pipe = sepme_adapter.attach({pipeline_class}.from_pretrained({base!r}))",
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
            f"`{LORA_FOLDER}/` holds the same erasers as standard LoRA files: `lora_A = S_p^T` (rank r: "
            "`A S_p^T`), `lora_B = beta * w`, scale 1, so the LoRA adds exactly the SepME increment."
            + ("" if transformer else " For ComfyUI / Automatic1111, convert with `sepme export-lora --format kohya`."),
            "",
            "```python",
            f"from diffusers import {pipeline_class}", "", *base_note,
            f"pipe = {pipeline_class}.from_pretrained({base!r})",
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
                (exported,) = export_lora(eraser, Path(folder) / LORA_FOLDER / file_name)
                operations.append(CommitOperationAdd(path_in_repo=f"{LORA_FOLDER}/{file_name}",
                                                     path_or_fileobj=exported.read_bytes()))
    lora_files = {f[len(LORA_FOLDER) + 1:] for f in repo_files if f.startswith(f"{LORA_FOLDER}/")}
    if include_lora:
        lora_files |= new_files
    card = model_card(card_entries, repo_id, lora_files)
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode()))
    message = commit_message or f"Upload SepME erasers: {', '.join(e.name for _, e, _ in entries)}"
    return api.create_commit(repo_id, operations, commit_message=message, revision=revision)


__all__ = ["LORA_FORMATS", "SEPME_LORA_KEY", "export_lora", "file_size", "model_card",
           "push_to_hub"]
