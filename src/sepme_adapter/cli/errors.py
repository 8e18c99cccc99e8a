"""What the `sepme` command prints for an exception: one line that says what was wrong and what to do.

Exceptions are recognised by class name, so nothing here imports torch, huggingface_hub or httpx.
"""

from __future__ import annotations

import argparse
import re

# mistakes in the user's input or files: exit status 2, the message as the library wrote it
USER_ERRORS = ("SepMEError", "ValueError", "KeyError", "TypeError", "FileNotFoundError", "NotADirectoryError",
               "IsADirectoryError", "PermissionError", "UnicodeDecodeError")
# no network, or the Hub told to stay offline
OFFLINE_ERRORS = ("ConnectError", "ConnectTimeout", "ConnectionError", "TimeoutException", "ReadTimeout",
                  "OfflineModeIsEnabled", "LocalEntryNotFoundError", "MaxRetryError", "NameResolutionError")
MAX_LENGTH = 600


def class_names(error: BaseException) -> set[str]:
    """The exception's class names, and its causes' as `cause:NAME` (a ConnectError behind a Hub error)."""
    names = {cls.__name__ for cls in type(error).__mro__}
    seen, cause = {id(error)}, error.__cause__ or error.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        names |= {f"cause:{cls.__name__}" for cls in type(cause).__mro__}
        cause = cause.__cause__ or cause.__context__
    return names


def one_line(text: str, limit: int = MAX_LENGTH) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_error(error: BaseException, args: argparse.Namespace) -> tuple[str, int]:
    """`(message, exit status)`: 2 for a mistake in the input, 1 for anything else."""
    names = class_names(error)
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    if names & set(OFFLINE_ERRORS) or {f"cause:{n}" for n in OFFLINE_ERRORS} & names:
        if "OfflineModeIsEnabled" in names:
            return "the Hugging Face Hub is switched off here (HF_HUB_OFFLINE is set); unset it to reach the Hub", 1
        return (f"cannot reach the Hugging Face Hub ({type(error).__name__}: {one_line(text, 200)}); check the "
                f"network connection (or HF_ENDPOINT)", 1)
    if "HfHubHTTPError" in names or "RepositoryNotFoundError" in names:
        return f"the Hub refused the request: {one_line(text.splitlines()[0] if text else type(error).__name__)}", 1
    if "BaseModelMismatchError" in names and hasattr(args, "allow_base_mismatch"):
        text = text.replace("allow_base_mismatch=True", "--allow-base-mismatch")
        if "--allow-base-mismatch" not in text:
            text += " (pass --allow-base-mismatch to load it anyway)"
        return one_line(text), 2
    if "OutOfMemoryError" in names or "MemoryError" in names:
        return (f"out of memory ({one_line(text, 200)}); try a smaller --batch-size, --dtype float16, or "
                f"--device cpu", 1)
    if "NVIDIA driver" in text or "not compiled with CUDA" in text:
        return f"no usable CUDA GPU here ({one_line(text, 200)}); pass --device cpu", 2
    if names & set(USER_ERRORS):
        return one_line(text or type(error).__name__), 2
    return f"{type(error).__name__}: {one_line(text)}", 1
