# sd-distill: `make run` (tiny profile, end to end) and `make test` each set up everything they need.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help setup run test dvc-yaml clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)  ## create .venv with the pinned dependencies

run: setup  ## run the whole DAG on the profile in params.yaml (tiny by default) with dvc repro
	@test -d .git || (git init -q && echo "initialised a git repository (DVC needs one)")
	@test -d .dvc || dvc init -q
	sd-distill repro

test: setup  ## run the test suite
	$(BIN)/python -m pytest -q

dvc-yaml: setup  ## regenerate dvc.yaml from the stage registry
	sd-distill dvc

clean:  ## remove outputs, checkpoints and the local MLflow store (keeps .venv)
	rm -rf data/prepared models reports checkpoints mlflow.db mlartifacts
