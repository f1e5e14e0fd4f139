# Vectory developer tasks. `make run` starts the whole stack in one terminal.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
BENCH_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help venv run migrate test lint bench lock clean

help: ## List the targets
	@echo "Vectory make targets:"
	@grep -E '^[a-z][a-zA-Z_-]*:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "} {printf "  make %-8s %s\n", $$1, $$2}'

venv: $(STAMP) ## Create .venv and install the project with its dev extras
$(VENV): $(STAMP)

# Re-installs whenever pyproject.toml or the lock is newer than the stamp; the
# lock's constraints make every machine install the versions CI tested.

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -c requirements.lock -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP) ## Start Temporal, the sandbox, the worker and the API, and seed a demo
	$(BIN)/python -m workers.devstack

migrate: $(STAMP) ## Upgrade the database (VECTORY_DATABASE_URL, default .data SQLite) to the newest schema
	$(BIN)/alembic upgrade head

test: $(STAMP) ## Lint, then run the test suite (PYTEST_ARGS="-k e2e" to filter)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP) ## Benchmarks on their own stacks: latency vs the bare-Temporal floor, then broadcast pacing and comment bursts (BENCH_ARGS=--quick)
	$(BIN)/python -m bench.run $(BENCH_ARGS)
	$(BIN)/python -m bench.platform $(BENCH_ARGS)

lint: $(STAMP) ## ruff check
	$(BIN)/ruff check .

lock: ## Resolve pyproject.toml's dependencies afresh and pin them in requirements.lock (then review the diff)
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -e '.[dev]'
	{ echo "# Exact versions CI tested (Python 3.11, Linux). Regenerate deliberately with 'make lock'."; \
	  .lock-venv/bin/pip freeze --exclude-editable; } > requirements.lock
	rm -rf .lock-venv

clean: ## Delete local dev data (.data: SQLite, Temporal history, demo credentials)
	rm -rf .data
