"""Where eraser files come from and what they are called.

`resolve_eraser_files` turns a local file, a folder or a Hub repo id into eraser paths;
`eraser_filename` is the one rule every writer uses to name a concept's file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import Any


def eraser_filename(name: str) -> str:
    """The file name of a concept's eraser: `"Van Gogh"` -> `"van-gogh.safetensors"`."""
    return (re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip("-.").lower() or "eraser") + ".safetensors"


def check_relative_name(name: str, what: str) -> None:
    """Refuse names that would leave the folder or repository (`../`, absolute paths)."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise ValueError(f"{what} {name!r} must be a relative path inside the folder or repository")


def resolve_eraser_files(
    source: str | os.PathLike,
    weight_name: str | None = None,
    subfolder: str | None = None,
    **hub_kwargs: Any,
) -> list[Path]:
    """Eraser files for a local file, a folder, or a Hub repo id (through `huggingface_hub`).

    A folder or repo without `weight_name` gives every `.safetensors` file in it (a repo: at its top
    level or `subfolder`, so the `lora/` exports `push_to_hub` adds are not loaded twice).
    Hub downloads honour `HF_HUB_OFFLINE`, the local cache, `revision`, `cache_dir`, `token`.
    """
    for value, what in ((weight_name, "weight_name"), (subfolder, "subfolder")):
        if value is not None:
            check_relative_name(value, what)
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        if weight_name is not None:
            return [folder / weight_name]
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors eraser files in folder {str(folder)!r}")
        return files
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    source = str(source)
    try:
        if source.endswith(".safetensors"):
            raise HFValidationError(source)
        validate_repo_id(source)
    except HFValidationError:
        raise FileNotFoundError(f"eraser file or folder {source!r} does not exist (and is not a Hub repo id)") from None

    if weight_name is not None:
        return [Path(hf_hub_download(source, weight_name, subfolder=subfolder, **hub_kwargs))]
    # one level only (fnmatch's `*` crosses `/`): push_to_hub keeps LoRA copies of the erasers in lora/
    pattern, nested = (f"{subfolder}/*.safetensors", f"{subfolder}/*/*") if subfolder else ("*.safetensors", "*/*")
    folder = Path(snapshot_download(source, allow_patterns=[pattern], ignore_patterns=[nested], **hub_kwargs))
    try:
        return resolve_eraser_files(folder, subfolder=subfolder)
    except FileNotFoundError:
        where = f"{source}/{subfolder}" if subfolder else source
        raise FileNotFoundError(f"Hub repo {where!r} (revision {hub_kwargs.get('revision') or 'main'!r}) has no "
                                f".safetensors eraser files; pass weight_name=... or check the repo") from None
