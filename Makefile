# phabmesh: everything a contributor or operator runs. `make help` lists the targets.
# Each target installs what it needs (the virtualenv, the control-plane build) by itself.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-12)
NAMESPACE ?= phabmesh-system
# kubectl: yours if installed, otherwise the one built with the local control plane.
KUBECTL ?= $(shell command -v kubectl 2>/dev/null || echo "$(BIN)/python -m phabmesh.dev.devcluster kubectl-path")
PYTEST_ARGS ?=
# Simulated pods' start/stop delays for `make dev-cluster`: none, realistic, or
# start=MS,complete=MS,stop=MS,jitter=MS.
DELAYS ?= none
PY_SOURCES := operator tests $(wildcard bench)
# Third-party Conduit clients for the e2e tests (tests/clients/): a virtualenv of their own
# for the Python ones, npm's lockfile for the Node one, Debian's arcanist for arc.
CLIENTS := tests/clients
CLIENTS_VENV := .venv-clients
CLIENTS_NODE := build/clients/node
CLIENTS_DEBS := arcanist php-cli php-curl
# The real node's packages (`make node-packages`; `make dev-cluster NODES=real`): its runtime,
# network tools, and what its images are built from; gcc and libc6-dev compile its pause image.
NODE_DEBS := containerd runc containernetworking-plugins conntrack ethtool iptables busybox-static mmdebstrap podman
NODE_BUILD_DEBS := gcc libc6-dev
# NODES=real: `make dev-cluster` also runs a real node beside the KWOK ones.
NODES ?=
CLIENTS_STAMP := build/clients/.installed-$(shell cat $(CLIENTS)/python/requirements.txt $(CLIENTS)/python/constraints.txt $(CLIENTS)/node/package.json $(CLIENTS)/node/package-lock.json | sha256sum | cut -c1-12)

.DEFAULT_GOAL := help

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,dev]'
	@rm -f $(VENV)/.installed-* && touch $@

.PHONY: venv
venv: $(STAMP) ## Create the virtualenv with phabmesh and its test tools

.PHONY: controlplane
controlplane: $(STAMP) ## Build the local Kubernetes control plane (once; cached)
	$(BIN)/python -m phabmesh.dev.devcluster build

.PHONY: monitoring-tools
monitoring-tools: $(STAMP) ## Build promtool and fetch prometheus-operator's CRDs for the monitoring tests (once; cached)
	$(BIN)/python -m phabmesh.dev.devcluster monitoring-tools

.PHONY: helm
helm: $(STAMP) ## Build Helm for the chart's tests (once; cached like the control plane)
	$(BIN)/python -m phabmesh.dev.devcluster helm-path

.PHONY: cluster-dns
cluster-dns: $(STAMP) ## Build CoreDNS and its image archive for a real node's cluster DNS (once; cached)
	$(BIN)/python -m phabmesh.dev.clusterdns image

$(CLIENTS_STAMP): $(CLIENTS)/python/requirements.txt $(CLIENTS)/python/constraints.txt $(CLIENTS)/node/package.json $(CLIENTS)/node/package-lock.json
	@test -x $(CLIENTS_VENV)/bin/python || $(PYTHON) -m venv $(CLIENTS_VENV)
	$(CLIENTS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CLIENTS_VENV)/bin/python -m pip install --quiet -c $(CLIENTS)/python/constraints.txt -r $(CLIENTS)/python/requirements.txt
	rm -rf $(CLIENTS_NODE) && mkdir -p $(CLIENTS_NODE)
	cp $(CLIENTS)/node/package.json $(CLIENTS)/node/package-lock.json $(CLIENTS_NODE)/
	npm ci --prefix $(CLIENTS_NODE) --no-audit --no-fund --loglevel=error
	@rm -f build/clients/.installed-* && touch $@

.PHONY: clients
clients: $(CLIENTS_STAMP) ## Install the Conduit clients the e2e tests run (arc, phabricator, phabfive, canduit)
	@if ! command -v arcanist >/dev/null || ! php -r 'exit(function_exists("curl_init") ? 0 : 1);' 2>/dev/null; then \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "make clients: arc is missing; as root: apt-get install $(CLIENTS_DEBS)" >&2; exit 1; \
	  fi; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y --no-install-recommends $(CLIENTS_DEBS) \
	    || { apt-get update && apt-get install -y --no-install-recommends $(CLIENTS_DEBS); }; \
	fi

.PHONY: node-packages
node-packages: ## Install the real node's packages (containerd, runc, CNI plugins, iptables, ...) with apt-get
	@missing=$$(dpkg-query -W -f='$${db:Status-Abbrev} $${Package}\n' $(NODE_DEBS) $(NODE_BUILD_DEBS) 2>/dev/null \
	  | awk '$$1 == "ii" {print $$2}' | sort | comm -13 - <(echo $(NODE_DEBS) $(NODE_BUILD_DEBS) | tr ' ' '\n' | sort) | xargs); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "make node-packages: missing $$missing; as root: apt-get install $(NODE_DEBS) $(NODE_BUILD_DEBS)" >&2; exit 1; \
	  fi; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y --no-install-recommends $$missing \
	    || { apt-get update && apt-get install -y --no-install-recommends $$missing; }; \
	fi

# phabmesh's image as an OCI archive, without Docker or a registry (phabmesh.dev.image):
# Debian bookworm from mmdebstrap through this machine's apt mirror, plus this checkout's wheel
# and the dependencies constraints.txt pins. Import it with `podman load -i` or
# `ctr -n k8s.io images import`; it is named as the chart and manifests/ deploy it.
IMAGE_DEBS := mmdebstrap

.PHONY: image
image: $(STAMP) ## Build the image archive build/image/phabmesh-VERSION.oci.tar (mmdebstrap; cached)
	@if ! command -v mmdebstrap >/dev/null; then \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "make image: mmdebstrap is missing; as root: apt-get install $(IMAGE_DEBS)" >&2; exit 1; \
	  fi; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y --no-install-recommends $(IMAGE_DEBS) \
	    || { apt-get update && apt-get install -y --no-install-recommends $(IMAGE_DEBS); }; \
	fi
	$(BIN)/python -m phabmesh.dev.image build

.PHONY: fmt
fmt: $(STAMP) ## Format and auto-fix the code
	$(BIN)/ruff format $(PY_SOURCES)
	$(BIN)/ruff check --fix $(PY_SOURCES)

.PHONY: lint
lint: $(STAMP) ## ruff (lint + format check), mypy --strict and the import layers (import-linter)
	$(BIN)/ruff check $(PY_SOURCES)
	$(BIN)/ruff format --check $(PY_SOURCES)
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache --no-logo
	$(BIN)/hadolint Dockerfile

.PHONY: package
package: $(STAMP) ## Build the wheel and install it alone in a clean virtualenv (what the image does)
	rm -rf build/package && mkdir -p build/package
	$(BIN)/python -m pip wheel --quiet --no-deps --wheel-dir build/package .
	$(PYTHON) -m venv build/package/venv
	build/package/venv/bin/python -m pip install --quiet -c constraints.txt build/package/phabmesh-*.whl
	build/package/venv/bin/phabmesh --version
	@if build/package/venv/bin/python -c 'import phabmesh.dev' 2>/dev/null; then \
	  echo "make package: the development kits (phabmesh.dev) must not be in the wheel" >&2; exit 1; fi
	@build/package/venv/bin/phabmesh dev-cluster 2>&1 | grep -q 'checkout' \
	  || { echo "make package: phabmesh dev-cluster must say it needs a checkout" >&2; exit 1; }
	build/package/venv/bin/python -c "import operator, phabmesh.cli; assert hasattr(operator, 'itemgetter')"

.PHONY: manifests
manifests: $(STAMP) ## Verify CRDs and typed models agree (fails on drift)
	$(BIN)/python -m phabmesh.dev.schemacheck crds/

.PHONY: test
test: controlplane clients monitoring-tools helm node-packages ## Run all tests (unit, integration against a real API server, e2e)
	$(BIN)/pytest $(PYTEST_ARGS)

.PHONY: test-unit
test-unit: $(STAMP) ## Run only the fast, pure unit tests
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

.PHONY: test-e2e
test-e2e: controlplane clients ## Run the end-to-end flows
	$(BIN)/pytest tests/e2e $(PYTEST_ARGS)

.PHONY: run
run: controlplane ## Run phabmesh (current kubeconfig, or a local control plane if none)
	$(BIN)/phabmesh run

.PHONY: dev-cluster
dev-cluster: controlplane $(if $(filter real,$(NODES)),node-packages) ## Start a local control plane in the foreground (Ctrl-C stops it; NODES=real adds a real node)
	$(BIN)/phabmesh dev-cluster --delays '$(DELAYS)' $(if $(filter real,$(NODES)),--real-node)

.PHONY: dev-conduit
dev-conduit: $(STAMP) ## Run the Conduit test server for Phabricator on 127.0.0.1:8081, bot ci-bot's token in Secret phabmesh-system/ci-bot-token
	$(BIN)/phabmesh dev-conduit

.PHONY: install
install: $(STAMP) ## Install the CRDs into the current cluster
	$(KUBECTL) apply --server-side -f crds/
	@# Established before anything uses them (manifests/peering.yaml is a ClusterKopfPeering).
	$(KUBECTL) wait --for=condition=Established --timeout=60s -f crds/

# What `make uninstall` deletes: phabmesh's ClusterKopfPeering and phabmesh's own CRDs (and
# with them every bot, binding and lease). Not kopf's CRD (crds/clusterkopfpeerings.yaml):
# every kopf-based operator in the cluster shares it. `make uninstall-args` prints these
# arguments (tests/integration/test_uninstall.py deletes them with --dry-run=server).
KOPF_CRD := crds/clusterkopfpeerings.yaml
UNINSTALL_PEERING := -f manifests/peering.yaml
UNINSTALL_CRDS := $(addprefix -f ,$(filter-out $(KOPF_CRD),$(sort $(wildcard crds/*.yaml))))

# A CRD is deleted only once its objects are; a bot keeps kopf's finalizer until the operator
# removes it. When the operator is gone first, nothing would: `make uninstall` waits
# UNINSTALL_WAIT for the deletion, then names the objects still held and removes their
# finalizers if you say so (asked on a terminal; YES=1 says yes, e.g. in scripts).
UNINSTALL_WAIT ?= 60s
YES ?=
comma := ,
PHABMESH_KINDS := phabricatorbots.phabmesh.io,phabricatorbindings.phabmesh.io,phabricatorcredentials.phabmesh.io
HELD := {range .items[?(@.metadata.finalizers)]}{.kind} {.metadata.name} {.metadata.namespace}{"\n"}{end}
PHABMESH_CRDS := $(subst $(comma), ,$(PHABMESH_KINDS))
# Why the API server has not finished a CRD's deletion (its Terminating condition).
TERMINATING := {.metadata.name}: {.status.conditions[?(@.type=="Terminating")].reason} {.status.conditions[?(@.type=="Terminating")].message}{"\n"}

.PHONY: uninstall
uninstall: $(STAMP) ## Remove phabmesh's CRDs (every bot, binding and lease) and its peering object; kopf's CRD stays
	@# Without kopf's CRD there is no peering object, and kubectl could not even name one.
	@if $(KUBECTL) get crd clusterkopfpeerings.kopf.dev >/dev/null 2>&1; then \
	  echo "$(KUBECTL) delete --ignore-not-found $(UNINSTALL_PEERING)"; \
	  $(KUBECTL) delete --ignore-not-found $(UNINSTALL_PEERING); \
	fi
	$(KUBECTL) delete --ignore-not-found --wait=false $(UNINSTALL_CRDS)
	@if $(KUBECTL) wait --for=delete --timeout=$(UNINSTALL_WAIT) $(UNINSTALL_CRDS) >/dev/null 2>&1; then exit 0; fi; \
	held=$$(for kind in $(subst $(comma), ,$(PHABMESH_KINDS)); do \
	  $(KUBECTL) get $$kind -A -o jsonpath='$(HELD)' 2>/dev/null; done); \
	if [ -z "$$held" ]; then \
	  echo "make uninstall: phabmesh's CRDs are still being deleted after $(UNINSTALL_WAIT); see: $(KUBECTL) get crd $(PHABMESH_CRDS)" >&2; \
	  for crd in $(PHABMESH_CRDS); do \
	    $(KUBECTL) get crd $$crd --ignore-not-found -o jsonpath='$(TERMINATING)' 2>/dev/null | sed 's/^/  /' >&2; \
	  done; \
	  exit 1; \
	fi; \
	echo "make uninstall: these objects still carry a finalizer after $(UNINSTALL_WAIT), so their CRDs cannot go:" >&2; \
	echo "$$held" | sed 's/^/  /' >&2; \
	echo "Only a running phabmesh operator removes kopf's finalizer (is it running? $(KUBECTL) -n $(NAMESPACE) get deploy phabmesh-operator)." >&2; \
	answer="$(YES)"; \
	if [ -z "$$answer" ] && [ -t 0 ]; then read -r -p "Remove their finalizers now, so that the deletion completes? [y/N] " answer; fi; \
	case "$$answer" in \
	  y|Y|yes|1) ;; \
	  *) echo "Nothing changed. Start the operator again, or run: make uninstall YES=1 (or, per object: $(KUBECTL) patch KIND NAME [-n NAMESPACE] --type=merge -p '{\"metadata\":{\"finalizers\":null}}')" >&2; exit 1;; \
	esac; \
	echo "$$held" | while read -r kind name ns; do \
	  [ -n "$$kind" ] || continue; \
	  $(KUBECTL) patch "$$(echo $$kind | tr A-Z a-z).phabmesh.io" "$$name" $${ns:+-n "$$ns"} --type=merge -p '{"metadata":{"finalizers":null}}'; \
	done; \
	$(KUBECTL) wait --for=delete --timeout=$(UNINSTALL_WAIT) $(UNINSTALL_CRDS)

.PHONY: uninstall-args
uninstall-args: ## Print what `make uninstall` passes to `kubectl delete`
	@echo $(UNINSTALL_PEERING) $(UNINSTALL_CRDS)

.PHONY: deploy
deploy: install ## Deploy the operator and gateway into the current cluster
	$(KUBECTL) apply -k manifests/

.PHONY: undeploy
undeploy: $(STAMP) ## Remove the operator and gateway from the current cluster
	$(KUBECTL) delete --ignore-not-found -k manifests/

.PHONY: bench
bench: controlplane ## Run the benchmarks and print percentiles and ratios
	$(BIN)/python -m bench

.PHONY: clean
clean: ## Remove the virtualenvs, the clients and caches (the control-plane build cache stays)
	rm -rf $(VENV) $(CLIENTS_VENV) build/clients .mypy_cache .ruff_cache .pytest_cache .hypothesis
