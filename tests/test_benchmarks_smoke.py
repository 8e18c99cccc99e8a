"""Every script in benchmarks/ runs in its `--smoke` mode (tiny sizes, seconds) and prints its RESULT line.

The scripts are found, not listed, so a new one is covered. A script that is tested elsewhere says so with
the line `# smoke: tested elsewhere` (world_zoo.py: its `--quick` run has its own test). The runs go two at
a time (the suite's machine has two cores), each in a fresh process, one thread each.
"""

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OPT_OUT = "# smoke: tested elsewhere"
SCRIPTS = sorted(p.name for p in (REPO / "benchmarks").glob("*.py")
                 if p.name != "__init__.py" and OPT_OUT not in p.read_text())
RESULT = re.compile(r"^RESULT \S+=\S+", re.MULTILINE)


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Every script's `--smoke` run: (return code, stdout, stderr) by name, two processes at a time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}
    folder = tmp_path_factory.mktemp("smoke")

    def run(name):
        done = subprocess.run([sys.executable, str(REPO / "benchmarks" / name), "--smoke"], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=600)
        return name, (done.returncode, done.stdout, done.stderr)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, SCRIPTS))


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_the_benchmark_runs_in_smoke_mode_and_prints_its_result(script, smoke_runs):
    code, out, err = smoke_runs[script]
    assert code == 0, f"{script} --smoke exited {code}:\n{err[-3000:]}"
    assert RESULT.search(out), f"{script} --smoke printed no RESULT line:\n{out[-2000:]}"


def test_every_benchmark_has_a_smoke_mode_or_says_where_it_is_tested():
    for path in (REPO / "benchmarks").glob("*.py"):
        text = path.read_text()
        if path.name != "__init__.py":
            assert '"--smoke"' in text or OPT_OUT in text, f"{path.name}: no --smoke mode"
