# tm: `make test` (what CI runs) and the inner-loop targets. See README.md.
SHELL := /bin/bash
VENV ?= .venv
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv lint unit test run
.DEFAULT_GOAL := test

# The virtual environment, rebuilt when pyproject.toml changes.
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

lint: venv
	$(VENV)/bin/ruff check tm tests bench
	$(VENV)/bin/ruff format --check tm tests bench
	$(VENV)/bin/mypy --strict tm

# Quick inner loop: no network, no services.
unit: venv
	$(VENV)/bin/pytest -m "not integration and not e2e" tests/unit

# The whole suite against the real local stack. pytest exits 5 when it collects nothing,
# which make treats as the failure it is.
test: venv stack-up tools lint
	$(VENV)/bin/pytest

# The main job on the local stack: services up, schema migrated, topics present, then the
# supervisor and its workers in the foreground (Ctrl-C drains and stops).
run: venv stack-up
	$(VENV)/bin/tm db migrate
	$(VENV)/bin/tm topics create
	exec $(VENV)/bin/tm run

# The stack's readiness probe imports confluent-kafka from the venv.
stack-up: venv

# ---- local dev stack (PostgreSQL + Kafka): stack/stack.sh ----
# PYTHON is used for the Kafka readiness probe (confluent-kafka); stack.sh
# falls back to a JVM probe when it cannot import confluent_kafka.
STACK_PYTHON ?= $(or $(wildcard $(or $(VENV),.venv)/bin/python),python3)
.PHONY: stack-up stack-down stack-status
stack-up:
	PYTHON=$(STACK_PYTHON) bash stack/stack.sh up
stack-down:
	PYTHON=$(STACK_PYTHON) bash stack/stack.sh down
stack-status:
	PYTHON=$(STACK_PYTHON) bash stack/stack.sh status

# Tools the tests run besides the services: prometheus and promtool (Debian's package).
.PHONY: tools
tools:
	bash stack/tools.sh

# Performance (DESIGN §8, bench/README.md): the end-to-end benchmark with its defaults (fresh
# database and topics on the local stack, about 3 minutes), then the micro-benchmarks.
.PHONY: bench
bench: venv stack-up
	$(VENV)/bin/python -m bench.e2e
	$(VENV)/bin/pytest bench/test_micro.py --benchmark-only -q -p no:cacheprovider

# Chaos with an exact oracle (tests/chaos): a seeded schedule of faults against tm on a private
# PostgreSQL and broker; `make test` runs every fault once (about 3 minutes), this runs
# CHAOS_MINUTES of them. CHAOS_SEED=<seed> replays a schedule.
.PHONY: chaos
CHAOS_MINUTES ?= 10
chaos: venv stack-up
	CHAOS_MINUTES=$(CHAOS_MINUTES) $(VENV)/bin/pytest tests/chaos -s -p no:cacheprovider

# The OpenTelemetry Collector the trace tests export to (tests/e2e/test_tracing.py), built once
# with the Collector Builder from the Go module proxy into .stack/otelcol/ (first time: about
# 3 minutes and 150 MB of modules; then nothing). The tests build it on demand too; `test`
# builds it first so that its output shows here rather than inside a quiet pytest fixture.
.PHONY: otelcol
otelcol:
	bash stack/otelcol/build.sh
test: otelcol
