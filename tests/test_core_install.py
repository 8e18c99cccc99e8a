"""The core install (no extras) loads, toggles, fuses, verifies and saves erasers.

A fresh Python process hides the optional packages (lpips, torchvision, matplotlib, accelerate, peft) from
every import finder, as if they were not installed, then runs the core workflow on a tiny pipeline. The same
script checks a real core-only install: `python tests/test_core_install.py` in a venv made with
`pip install .` (no extras).
"""

import os
import subprocess
import sys
from pathlib import Path

OPTIONAL = ("lpips", "torchvision", "matplotlib", "accelerate", "peft")

HIDE = f"""
import sys
OPTIONAL = {OPTIONAL!r}

class Hide:  # wraps each finder: the optional packages are not found, exactly as when not installed
    def __init__(self, inner):
        self.inner = inner
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in OPTIONAL:
            return None
        return self.inner.find_spec(name, path, target)
    def __getattr__(self, attribute):
        return getattr(self.inner, attribute)

sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]
"""

CORE_WORKFLOW = """
import sys, tempfile, warnings
from pathlib import Path
import torch
import sepme_adapter
from sepme_adapter.testing import tiny_pipeline
from sepme_adapter.testing.conformance import random_eraser
from sepme_adapter.verify import verify_eraser

pipe = sepme_adapter.attach(tiny_pipeline())
eraser = random_eraser(pipe, "vangogh")
folder = Path(tempfile.mkdtemp())
eraser.save(folder / "vangogh.safetensors")

def run():
    return pipe("a painting by van gogh", num_inference_steps=2, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images

original = run()
pipe.load_sepme(folder / "vangogh.safetensors")
erased = run()
assert not torch.equal(erased, original), "the eraser changed nothing"
pipe.set_erased([])
assert torch.equal(run(), original), "set_erased([]) is not the original model"
pipe.set_erased(["vangogh"])
pipe.fuse_sepme()
assert torch.allclose(run(), erased, atol=1e-4), "fused differs from hooked"
pipe.unfuse_sepme()
assert verify_eraser(pipe, eraser)["ok"]
pipe.unload_sepme()
assert torch.equal(run(), original)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {optional!r})
assert not loaded, f"optional packages imported: {{loaded}}"
try:
    from sepme_adapter.evaluation.metrics import LPIPSMetric
    LPIPSMetric()
except ImportError as error:
    assert "sepme-adapter[eval]" in str(error), error
    print("LPIPS without [eval]:", error)
else:
    assert "lpips" not in {optional!r}, "LPIPS worked without lpips"
print("CORE OK")
""".format(optional=set(OPTIONAL))


def test_the_core_workflow_runs_without_the_optional_packages():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    result = subprocess.run([sys.executable, "-c", HIDE + CORE_WORKFLOW], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CORE OK" in result.stdout
    assert "sepme-adapter[eval]" in result.stdout


if __name__ == "__main__":  # in a core-only venv: the packages are really absent, nothing to hide
    exec(CORE_WORKFLOW)
