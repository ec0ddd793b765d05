# Two entry points for a fresh clone: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup demo test test-fast bench-train clean

$(VENV)/.installed: pyproject.toml constraints/cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints/cpu.txt torch
	$(PIP) install -q -c constraints/cpu.txt -e '.[dev]'
	$(PY) -m loraplex.protos
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m loraplex.cli demo

test: setup
	$(PY) -m pytest -q -rs

test-fast: setup
	$(PY) -m pytest -q -rs -m "not slow"

bench-train: setup
	$(PY) benchmarks/train_bench.py

clean:
	rm -rf $(VENV) runs
