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
# roost bench's peers with pins of their own (roost/bench/peer_env.py): make test's quick bench
# runs these (and plain KServe, which needs no venv); `roost bench` installs the rest itself.
PEERS_VENV    ?= .venv-peers
TEST_PEERS    ?= mlserver pytriton
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

.PHONY: monitor-demo
monitor-demo: venv ## The monitoring loop locally: logging server -> receiver -> drift -> retrain -> challenger.
	@echo ">> roost demo --monitor (state in .roost/)"
	$(ROOST) demo --monitor $(DEMO_ARGS)

.PHONY: test
test: ## Install everything (make deps, in parallel), then run unit, integration and e2e tests.
	@$(MAKE) --no-print-directory -j3 --output-sync=target deps
	@echo ">> pytest (unit, integration, e2e, cluster, faults; kind and gpu tests skip themselves without Docker/CUDA)"
	$(VENV_PY) -m pytest -m "unit or integration or e2e or cluster or faults or kind or gpu" $(PYTEST_ARGS)

# checkov's venv, the Debian packages and the peers' venvs build while .venv does:
# make test runs this with -j3; each target's output is printed whole when it finishes.
.PHONY: deps
deps: venv checkov apt-deps peers ## Install what make test needs: .venv, .venv-checkov, .venv-peers, apt packages.

.PHONY: clean
clean: ## Stop local servers and remove .roost/ (MLflow store, runs, logs).
	@echo ">> stopping the embedded MLflow server (if any) and removing .roost/"
	-@[ -x $(ROOST) ] && $(ROOST) mlflow down >/dev/null 2>&1 || true
	rm -rf .roost

.PHONY: distclean
distclean: clean ## Also remove the virtual environments and caches.
	rm -rf $(VENV) $(CHECKOV_VENV) $(PEERS_VENV) .pytest_cache .mypy_cache .ruff_cache bench-out

##@ Development

.PHONY: venv
venv: $(STAMP) ## Create .venv and install roost with its dev dependencies.

# One recipe from venv creation to the last install: under make -j (make test) the venv holds
# its job slot throughout, so the other deps cannot take it between the two steps.
$(STAMP): pyproject.toml constraints.txt
	@[ -x $(VENV_PY) ] || { echo ">> creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
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

.PHONY: peers
peers: $(addprefix peer-,$(TEST_PEERS)) ## Build the bench peers' own venvs in .venv-peers (what make test's quick bench runs).

# One target per peer: under make -j (make test) the peers' venvs build side by side, and
# beside .venv (peer_env.py needs only the standard library; `roost bench` reuses them).
.PHONY: $(addprefix peer-,$(TEST_PEERS))
$(addprefix peer-,$(TEST_PEERS)): peer-%:
	$(PYTHON) roost/bench/peer_env.py --dir $(PEERS_VENV) --torch $(TORCH_VERSION) $*

.PHONY: apt-deps
apt-deps: ## Install Debian packages the tests use (nginx: canary proxy; PostgreSQL: cluster runner; chromium: MLflow UI check; prometheus: monitor rules).
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo ">> apt-get install nginx-light"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light >/dev/null; \
	  else \
	    echo "nginx is missing: run 'sudo apt-get install nginx-light' (Debian/Ubuntu)"; exit 1; \
	  fi; }
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo ">> apt-get install postgresql (MLflow's backend store in tests/cluster)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null; \
	  else \
	    echo "PostgreSQL is missing: run 'sudo apt-get install postgresql' (Debian/Ubuntu)"; exit 1; \
	  fi; }
	@command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo ">> apt-get install chromium"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  else \
	    echo "chromium is missing: run 'sudo apt-get install chromium' (Debian/Ubuntu)"; exit 1; \
	  fi; }
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo ">> apt-get install prometheus (promtool: the monitor's alert rule tests)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else \
	    echo "promtool is missing: run 'sudo apt-get install prometheus' (Debian/Ubuntu)"; exit 1; \
	  fi; }

.PHONY: lint
lint: venv ## ruff, mypy, yamllint, hadolint and shellcheck.
	@echo ">> ruff"
	$(VENV)/bin/ruff check roost tests
	$(VENV)/bin/ruff format --check roost tests
	@echo ">> mypy --strict"
	$(VENV)/bin/mypy roost
	@echo ">> yamllint"
	$(VENV)/bin/yamllint --strict .
	@echo ">> hadolint"
	$(VENV)/bin/hadolint --config .hadolint.yaml training/Dockerfile serving/Dockerfile mlflow/Dockerfile
	@echo ">> shellcheck"
	$(VENV)/bin/shellcheck manifests/*.sh manifests/*/*.sh

.PHONY: fmt
fmt: venv ## Format the code with ruff.
	$(VENV)/bin/ruff format roost tests
	$(VENV)/bin/ruff check --fix roost tests

.PHONY: typecheck
typecheck: venv ## mypy --strict on roost/.
	$(VENV)/bin/mypy roost

##@ Cluster

# ---- cluster knobs (pinned to what KServe v0.20.0 is tested with) -------------------------
KIND_VERSION             ?= v0.30.0
KIND_CLUSTER             ?= roost
# Empty: the node image kind $(KIND_VERSION) defaults to.
KIND_NODE_IMAGE          ?=
CERT_MANAGER_VERSION     ?= v1.17.0
KNATIVE_OPERATOR_VERSION ?= v1.21.1
KNATIVE_SERVING_VERSION  ?= 1.21.1
KSERVE_VERSION           ?= v0.20.0
EKSCTL_VERSION           ?= 0.215.0
HELM_VERSION             ?= v3.16.3
CONTAINER_TOOL           ?= docker
NAMESPACE                ?= roost
RELEASE                  ?= roost
IMG_REGISTRY             ?=
IMG_TAG                  ?= dev
VALUES                   ?= charts/roost/values-kind.yaml
EKS_CONFIG               ?= manifests/eks/cluster.yaml
AWS_REGION               ?= us-east-1
BUCKET                   ?=
DEMO_EPOCHS              ?= 3
IMG_PREFIX := $(if $(IMG_REGISTRY),$(IMG_REGISTRY)/,)
IMAGES     := training serving mlflow
STACK_ENV  := CERT_MANAGER_VERSION=$(CERT_MANAGER_VERSION) KNATIVE_OPERATOR_VERSION=$(KNATIVE_OPERATOR_VERSION) \
              KNATIVE_SERVING_VERSION=$(KNATIVE_SERVING_VERSION) KSERVE_VERSION=$(KSERVE_VERSION)

# $(call require,TOOL,where to get it): fail with one readable line when TOOL is missing.
define require
@command -v $(1) >/dev/null 2>&1 || { echo "$(1) not found: install $(2)"; exit 1; }
endef

.PHONY: kind-up
kind-up: ## Create the kind cluster, install cert-manager + Knative + KServe, build and load the images, install the chart.
	$(call require,$(CONTAINER_TOOL),Docker (https://docs.docker.com/engine/install/))
	$(call require,kind,kind $(KIND_VERSION) (https://kind.sigs.k8s.io/docs/user/quick-start/))
	$(call require,kubectl,kubectl (https://kubernetes.io/docs/tasks/tools/))
	$(call require,helm,Helm $(HELM_VERSION) or newer (https://helm.sh/docs/intro/install/))
	@$(CONTAINER_TOOL) info >/dev/null 2>&1 || { echo "$(CONTAINER_TOOL) is installed but its daemon does not answer: start it"; exit 1; }
	@kind version | grep -q "$(KIND_VERSION) " || echo "warning: roost is tested with kind $(KIND_VERSION), this is '$$(kind version)'"
	@echo ">> kind cluster $(KIND_CLUSTER) (manifests/kind/cluster.yaml: 1 control plane, 1 worker, Kourier on localhost:8080)"
	@if kind get clusters 2>/dev/null | grep -qx "$(KIND_CLUSTER)"; then \
	  echo "   already exists: reusing it"; \
	else \
	  kind create cluster --name $(KIND_CLUSTER) --config manifests/kind/cluster.yaml $(if $(KIND_NODE_IMAGE),--image $(KIND_NODE_IMAGE)) --wait 5m; \
	fi
	kubectl config use-context kind-$(KIND_CLUSTER)
	@echo ">> cert-manager $(CERT_MANAGER_VERSION), Knative Serving $(KNATIVE_SERVING_VERSION) + Kourier, KServe $(KSERVE_VERSION)"
	$(STACK_ENV) manifests/install-stack.sh kind
	$(MAKE) --no-print-directory images load-images
	$(MAKE) --no-print-directory deploy VALUES=charts/roost/values-kind.yaml

.PHONY: kind-demo
kind-demo: venv ## On the kind cluster: train Job -> register -> deploy -> predict through Kourier (REST and gRPC).
	$(call require,kubectl,kubectl (https://kubernetes.io/docs/tasks/tools/))
	$(call require,helm,Helm $(HELM_VERSION) or newer (https://helm.sh/docs/intro/install/))
	@echo ">> demo on kind-$(KIND_CLUSTER), namespace $(NAMESPACE): manifests/kind/demo.sh"
	kubectl config use-context kind-$(KIND_CLUSTER)
	ROOST=$(ROOST) NAMESPACE=$(NAMESPACE) RELEASE=$(RELEASE) EPOCHS=$(DEMO_EPOCHS) manifests/kind/demo.sh

.PHONY: kind-down
kind-down: ## Delete the kind cluster (and everything in it).
	$(call require,kind,kind $(KIND_VERSION) (https://kind.sigs.k8s.io/docs/user/quick-start/))
	@echo ">> deleting kind cluster $(KIND_CLUSTER)"
	kind delete cluster --name $(KIND_CLUSTER)

.PHONY: eks-up
eks-up: venv ## Create the EKS cluster (eksctl), the S3 bucket (roost aws bootstrap), install cert-manager + Knative + KServe.
	$(call require,eksctl,eksctl $(EKSCTL_VERSION)+ (https://eksctl.io/installation/))
	$(call require,kubectl,kubectl (https://kubernetes.io/docs/tasks/tools/))
	$(call require,helm,Helm $(HELM_VERSION) or newer (https://helm.sh/docs/intro/install/))
	@test -n "$(BUCKET)" || { echo "set BUCKET=<globally unique bucket name> (e.g. roost-artifacts-<account id>)"; exit 1; }
	@echo ">> EKS cluster from $(EKS_CONFIG) (system + GPU node groups, OIDC, IRSA roles)"
	eksctl create cluster -f $(EKS_CONFIG)
	@echo ">> artifact bucket s3://$(BUCKET) in $(AWS_REGION)"
	$(ROOST) aws bootstrap --bucket $(BUCKET) --region $(AWS_REGION)
	@echo ">> cert-manager $(CERT_MANAGER_VERSION), Knative Serving $(KNATIVE_SERVING_VERSION) + Kourier (NLB), KServe $(KSERVE_VERSION)"
	$(STACK_ENV) manifests/install-stack.sh eks

.PHONY: eks-down
eks-down: ## Uninstall the chart and delete the EKS cluster (the S3 bucket stays).
	$(call require,eksctl,eksctl $(EKSCTL_VERSION)+ (https://eksctl.io/installation/))
	$(call require,helm,Helm $(HELM_VERSION) or newer (https://helm.sh/docs/intro/install/))
	@echo ">> uninstalling $(RELEASE), deleting the cluster of $(EKS_CONFIG); s3://$(BUCKET) is kept"
	-helm uninstall $(RELEASE) -n $(NAMESPACE) --wait
	eksctl delete cluster -f $(EKS_CONFIG) --wait

##@ Deploy

.PHONY: images
images: ## Build the training, serving and mlflow images (tag IMG_TAG, registry IMG_REGISTRY).
	$(call require,$(CONTAINER_TOOL),Docker (https://docs.docker.com/engine/install/))
	@for image in $(IMAGES); do \
	  echo ">> $(CONTAINER_TOOL) build -f $$image/Dockerfile -t $(IMG_PREFIX)roost-$$image:$(IMG_TAG) ."; \
	  $(CONTAINER_TOOL) build -f $$image/Dockerfile -t $(IMG_PREFIX)roost-$$image:$(IMG_TAG) . || exit 1; \
	done

.PHONY: load-images
load-images: ## Load the images into the kind cluster's nodes.
	$(call require,kind,kind $(KIND_VERSION) (https://kind.sigs.k8s.io/docs/user/quick-start/))
	@for image in $(IMAGES); do \
	  echo ">> kind load docker-image roost-$$image:$(IMG_TAG) --name $(KIND_CLUSTER)"; \
	  kind load docker-image $(IMG_PREFIX)roost-$$image:$(IMG_TAG) --name $(KIND_CLUSTER) || exit 1; \
	done

.PHONY: push-images
push-images: ## Push the images to IMG_REGISTRY (e.g. <account>.dkr.ecr.<region>.amazonaws.com).
	$(call require,$(CONTAINER_TOOL),Docker (https://docs.docker.com/engine/install/))
	@test -n "$(IMG_REGISTRY)" || { echo "set IMG_REGISTRY=<registry> (and log in: aws ecr get-login-password | docker login ...)"; exit 1; }
	@for image in $(IMAGES); do \
	  echo ">> $(CONTAINER_TOOL) push $(IMG_PREFIX)roost-$$image:$(IMG_TAG)"; \
	  $(CONTAINER_TOOL) push $(IMG_PREFIX)roost-$$image:$(IMG_TAG) || exit 1; \
	done

.PHONY: helm-lint
helm-lint: ## helm lint --strict the chart with its default, kind, eks and ci/ values.
	$(call require,helm,Helm $(HELM_VERSION) or newer (https://helm.sh/docs/intro/install/))
	@for values in charts/roost/values.yaml charts/roost/values-kind.yaml charts/roost/values-eks.yaml charts/roost/ci/*-values.yaml; do \
	  echo ">> helm lint --strict charts/roost -f $$values"; \
	  helm lint --strict charts/roost -f $$values >/dev/null || { helm lint --strict charts/roost -f $$values; exit 1; }; \
	done

.PHONY: deploy
deploy: ## Install or upgrade the chart (VALUES=charts/roost/values-kind.yaml; NAMESPACE, RELEASE).
	$(call require,helm,Helm $(HELM_VERSION) or newer (https://helm.sh/docs/intro/install/))
	@echo ">> helm upgrade --install $(RELEASE) charts/roost -n $(NAMESPACE) -f $(VALUES)"
	helm upgrade --install $(RELEASE) charts/roost --namespace $(NAMESPACE) --create-namespace \
	  -f $(VALUES) --set images.tag=$(IMG_TAG) $(if $(IMG_REGISTRY),--set images.registry=$(IMG_REGISTRY)) \
	  $(if $(BUCKET),--set s3.bucket=$(BUCKET)) --wait --timeout 15m

.PHONY: eks-deploy
eks-deploy: ## Build and push the images, then install the chart on EKS with values-eks.yaml.
	@test -n "$(IMG_REGISTRY)" || { echo "set IMG_REGISTRY=<account>.dkr.ecr.$(AWS_REGION).amazonaws.com"; exit 1; }
	@test -n "$(BUCKET)" || { echo "set BUCKET=<the bucket of eks-up>"; exit 1; }
	$(MAKE) --no-print-directory images push-images
	$(MAKE) --no-print-directory deploy VALUES=charts/roost/values-eks.yaml

.PHONY: helm-test
helm-test: ## Run the chart's test (the model's v2 ready endpoint through Knative).
	$(call require,helm,Helm $(HELM_VERSION) or newer (https://helm.sh/docs/intro/install/))
	@echo ">> helm test $(RELEASE) -n $(NAMESPACE)"
	helm test $(RELEASE) --namespace $(NAMESPACE) --logs

.PHONY: undeploy
undeploy: ## Uninstall the chart (the InferenceServices roost deploy created stay: kubectl delete isvc --all).
	$(call require,helm,Helm $(HELM_VERSION) or newer (https://helm.sh/docs/intro/install/))
	@echo ">> helm uninstall $(RELEASE) -n $(NAMESPACE)"
	helm uninstall $(RELEASE) --namespace $(NAMESPACE) --wait

##@ Test

.PHONY: test-unit
test-unit: venv ## Unit tests only (fast, no servers).
	$(VENV_PY) -m pytest -m unit $(PYTEST_ARGS)

.PHONY: test-integration
test-integration: venv checkov apt-deps peers ## Integration tests (real MLflow and model servers on loopback).
	$(VENV_PY) -m pytest -m integration $(PYTEST_ARGS)

.PHONY: test-e2e
test-e2e: venv apt-deps ## End-to-end tests (demo, rollouts).
	$(VENV_PY) -m pytest -m e2e $(PYTEST_ARGS)

.PHONY: bench
bench: venv ## Benchmark roost vs TorchServe vs the raw model on @champion (writes bench-out/; run make demo first).
	$(ROOST) mlflow up
	$(ROOST) bench --out bench-out $(BENCH_ARGS)
