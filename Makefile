# Two commands on a fresh machine: `make demo` (main job on the built-in demo world) and `make test`.
PY := .venv/bin/python

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	# torch first and explicitly: a bare `torch` requirement would pull a multi-GB download
	.venv/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
	.venv/bin/pip install --quiet -e ".[dev]"
	touch $@

.PHONY: demo test lint zoo
demo: .venv/.installed
	.venv/bin/sepme demo

test: .venv/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile  # two workers (one per core), each test file on one of them

lint: .venv/.installed
	.venv/bin/ruff check src tests examples benchmarks

zoo: .venv/.installed  # build (or reuse) every world of benchmarks/worlds.ZOO; fails if a quality gate fails
	$(PY) -m benchmarks.worlds zoo --jobs 2
