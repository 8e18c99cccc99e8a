"""The scripts in examples/ run: each in its quick mode, in a fresh process.

push_and_pull.py against a Hub server is tested in test_hub.py (a local fake Hub); here it meets no Hub at all
and must end in one line that says so, not a traceback.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import make_eraser

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}


def run(script, *args, cwd, env=ENV, timeout=600):
    return subprocess.run([sys.executable, str(REPO / "examples" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_erase_and_restore_runs_quickly_on_the_demo_world(tmp_path):
    done = run("erase_and_restore.py", "--quick", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wrote erased.png" in done.stdout
    assert {p.name for p in tmp_path.iterdir()} >= {"erased.png", "orvan.safetensors", "pimsa.safetensors"}


@pytest.mark.slow
def test_build_demo_world_runs_quickly(tmp_path):
    smoke = ("--vae-steps 2 --unet-steps 2 --unet-warmup 1 --classifier-steps 2 --eval-seeds 1 --eval-extra-seeds 0 "
             "--vae-batch 4 --unet-batch 4 --classifier-batch 4").split()
    done = run("build_demo_world.py", "--quick", "--out", str(tmp_path / "assets"), *smoke, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "assets" / "pipeline" / "model_index.json").is_file()


def test_push_and_pull_without_a_hub_ends_in_one_line(pipe, tmp_path):
    eraser = make_eraser(pipe, "vangogh").save(tmp_path / "vangogh.safetensors")
    env = {**ENV, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
           "HF_TOKEN": "hf_fake_token", "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    env.pop("SEPME_DEBUG", None)
    done = run("push_and_pull.py", str(eraser), "--repo", "org/erasers", "--model", str(tmp_path), cwd=tmp_path,
               env=env, timeout=300)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("push_and_pull.py: error: cannot reach the Hugging Face Hub"), done.stderr[-2000:]
