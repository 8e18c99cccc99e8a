"""Optional dependencies: the core install loads, toggles, fuses, verifies and pushes erasers; training,
evaluation, the demo and the web app need extras (`pip install "sepme-adapter[train]"`, `[eval]`, `[demo]`,
`[app]`).

Modules import an optional package only where a feature uses it, through `require`, so a missing one is
one clear `ImportError` naming the extra to install, never a failure at `import sepme_adapter`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# which extra provides each optional top-level module
EXTRA_OF = {
    "accelerate": "train",
    "peft": "train",
    "matplotlib": "train",  # the training report's loss curves (also in [eval])
    "lpips": "eval",
    "torchvision": "eval",
    "gradio": "app",  # `sepme app`, `sepme_adapter.app.build_app`
}


def require(module: str, feature: str) -> ModuleType:
    """Import `module` (a name in `EXTRA_OF`, or a submodule of one) for `feature`, or raise an ImportError
    that names the extra providing it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        top = module.split(".")[0]
        if error.name is not None and error.name.split(".")[0] != top:
            raise  # the package is installed but one of its own imports failed: its message says more
        extra = EXTRA_OF.get(top, "dev")
        raise ImportError(f"{feature} needs the optional package {top!r}: pip install \"sepme-adapter[{extra}]\"",
                          name=top) from error
