# Two entry points for a fresh clone: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup setup-dev demo test test-fast bench-train bench-serve clean

# llama.cpp (through llama-cpp-python) builds from source: portable flags, AMX off.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_INT8=OFF

$(VENV)/.installed: pyproject.toml constraints/cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints/cpu.txt torch
	$(PIP) install -q -c constraints/cpu.txt -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	# no wheel cache: pip's cache key ignores CMAKE_ARGS, and a native build would be reused
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q --no-cache-dir -c constraints/cpu.txt 'llama-cpp-python>=0.3.16'
	$(PIP) install -q -c constraints/cpu.txt -e '.[dev]'
	$(PY) -m loraplex.protos
	touch $@

setup: $(VENV)/.installed

setup-dev: $(VENV)/.installed-dev

demo: setup
	$(PY) -m loraplex.cli demo

test: setup-dev
	$(PY) -m pytest -q -rs

test-fast: setup-dev
	$(PY) -m pytest -q -rs -m "not slow"

bench-train: setup
	$(PY) benchmarks/train_bench.py

bench-serve: setup-dev
	$(PY) benchmarks/serve_bench.py

clean:
	rm -rf $(VENV) runs
