# roost — every target prints what it does; `make` alone lists them.
SHELL = /usr/bin/env bash -o pipefail
.SHELLFLAGS = -ec
.DEFAULT_GOAL := help

# ---- knobs (override on the command line: make test PYTHON=python3.12) -------------------
PYTHON        ?= python3
VENV          ?= .venv
CHECKOV_VENV  ?= .venv-checkov
TORCH_VERSION ?= 2.13.0
# Extra index for torch on machines without the local CPU wheel, e.g.
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX   ?=
CHECKOV_VERSION ?= 3.3.30
PYTEST_ARGS   ?=
DEMO_ARGS     ?=
BENCH_ARGS    ?=

VENV_PY  := $(VENV)/bin/python
ROOST    := $(VENV)/bin/roost
STAMP    := $(VENV)/.installed
CHECKOV  := $(CHECKOV_VENV)/bin/checkov
LOCAL_TORCH_WHEEL := $(firstword $(wildcard /opt/wheels/torch-$(TORCH_VERSION)+cpu-*.whl))

export ROOST_CHECKOV ?= $(abspath $(CHECKOV))
export ROOST_SCHEMA_DIR ?= $(abspath ../shared/schemas)

##@ General

.PHONY: help
help: ## Show this help.
	@awk 'BEGIN {FS = ":.*##"; printf "\nUsage:\n  make \033[36m<target>\033[0m\n"} /^[a-zA-Z_0-9-]+:.*?##/ { printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2 } /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) } ' $(MAKEFILE_LIST)

.PHONY: demo
demo: venv ## Run the whole loop locally: MLflow, train, gate, canary, serve, predict.
	@echo ">> roost demo (state in .roost/; MLflow UI URL printed at the end)"
	$(ROOST) demo $(DEMO_ARGS)

.PHONY: test
test: venv checkov apt-deps ## Install everything, then run unit, integration and e2e tests.
	@echo ">> pytest (unit, integration, e2e; kind and gpu tests skip themselves without Docker/CUDA)"
	$(VENV_PY) -m pytest -m "unit or integration or e2e or kind or gpu" $(PYTEST_ARGS)

.PHONY: clean
clean: ## Stop local servers and remove .roost/ (MLflow store, runs, logs).
	@echo ">> stopping the embedded MLflow server (if any) and removing .roost/"
	-@[ -x $(ROOST) ] && $(ROOST) mlflow down >/dev/null 2>&1 || true
	rm -rf .roost

.PHONY: distclean
distclean: clean ## Also remove the virtual environments and caches.
	rm -rf $(VENV) $(CHECKOV_VENV) .pytest_cache .mypy_cache .ruff_cache bench-out

##@ Development

.PHONY: venv
venv: $(STAMP) ## Create .venv and install roost with its dev dependencies.

$(VENV_PY):
	@echo ">> creating $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(VENV_PY)
	@echo ">> installing torch $(TORCH_VERSION) (CPU) and roost[dev] into $(VENV)"
	@if [ -n "$(LOCAL_TORCH_WHEEL)" ]; then \
	  $(VENV_PY) -m pip install -q "$(LOCAL_TORCH_WHEEL)"; \
	else \
	  $(VENV_PY) -m pip install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)); \
	fi
	$(VENV_PY) -m pip install -q -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

.PHONY: checkov
checkov: $(CHECKOV) ## Install checkov in its own venv (its pins clash with MLflow's).

$(CHECKOV):
	@echo ">> installing checkov $(CHECKOV_VERSION) into $(CHECKOV_VENV)"
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q "checkov==$(CHECKOV_VERSION)"

.PHONY: apt-deps
apt-deps: ## Install Debian packages the tests use (nginx for the local canary proxy).
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo ">> apt-get install nginx-light"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light >/dev/null; \
	  else \
	    echo "nginx is missing: run 'sudo apt-get install nginx-light' (Debian/Ubuntu)"; exit 1; \
	  fi; }

.PHONY: lint
lint: venv ## ruff, yamllint and hadolint.
	@echo ">> ruff"
	$(VENV)/bin/ruff check roost tests
	$(VENV)/bin/ruff format --check roost tests

.PHONY: fmt
fmt: venv ## Format the code with ruff.
	$(VENV)/bin/ruff format roost tests
	$(VENV)/bin/ruff check --fix roost tests

.PHONY: typecheck
typecheck: venv ## mypy --strict on roost/.
	$(VENV)/bin/mypy roost

##@ Test

.PHONY: test-unit
test-unit: venv ## Unit tests only (fast, no servers).
	$(VENV_PY) -m pytest -m unit $(PYTEST_ARGS)

.PHONY: test-integration
test-integration: venv checkov apt-deps ## Integration tests (real MLflow and model servers on loopback).
	$(VENV_PY) -m pytest -m integration $(PYTEST_ARGS)

.PHONY: test-e2e
test-e2e: venv apt-deps ## End-to-end tests (demo, rollouts).
	$(VENV_PY) -m pytest -m e2e $(PYTEST_ARGS)

.PHONY: bench
bench: venv ## Benchmark roost vs TorchServe vs the raw model (writes bench-out/).
	$(ROOST) bench --out bench-out $(BENCH_ARGS)
