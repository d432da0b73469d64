# tm: `make test` (what CI runs) and the inner-loop targets. See README.md.
SHELL := /bin/bash
VENV ?= .venv
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv lint unit test run
.DEFAULT_GOAL := test

# The virtual environment, exactly as uv.lock pins it (runtime and dev), with tm itself installed
# editable. uv comes from stack/uv.sh (its version and wheel hashes in stack/uv.txt); it never
# downloads a Python: the venv is made from the machine's python3. `lock-check` runs first,
# every time: a lock that no longer matches pyproject.toml stops here with one line.
UV = .stack/uv/bin/uv
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(abspath $(VENV))
.PHONY: lock lock-check
venv: lock-check $(VENV)/.installed
$(UV): stack/uv.txt stack/uv.sh
	bash stack/uv.sh >/dev/null
lock-check: $(UV)
	@$(UV) lock --check --python python3 --quiet 2>/dev/null \
	    || { echo "uv.lock does not match pyproject.toml: run 'make lock' (and commit uv.lock)" >&2; exit 1; }
$(VENV)/.installed: pyproject.toml uv.lock $(UV)
	$(UV) sync --locked --extra dev --python python3 --quiet
	touch $@

# The one way versions change: re-resolve every dependency to the newest that pyproject.toml's
# ranges allow and write uv.lock. Then `make test`, and commit the lock on its own.
lock: $(UV)
	$(UV) lock --upgrade --python python3

lint: venv
	$(VENV)/bin/ruff check tm tests bench loadtests stack harness
	$(VENV)/bin/ruff format --check tm tests bench loadtests stack harness
	$(VENV)/bin/mypy

# Quick inner loop: no network, no services.
unit: venv
	$(VENV)/bin/pytest -m "not integration and not e2e" tests/unit

# The whole suite against the real local stack. pytest exits 5 when it collects nothing,
# which make treats as the failure it is.
test: venv stack-up tools lint
	$(VENV)/bin/pytest
# The task-event tests need Redis, the secured tests (tests/secure) the secured services beside
# the open ones: the stack starts both only when asked (stack/stack.sh, stack/secure.py).
test: export STACK_REDIS := 1
test: export STACK_SECURE := 1

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

# Load (loadtests/README.md): locust's gateway, crawler and API users for LOAD_SECONDS against
# the tm of `make run` (started, and stopped at the end, when none answers on APP_PORT), at
# LOAD_RATE tasks a second; prints per stage the rate, p50/p95/p99 and failures, and where
# locust's CSV and HTML report are. `load-ui`: locust's web UI on 127.0.0.1:8089, same users.
.PHONY: load load-ui
LOAD_SECONDS ?= 60
LOAD_RATE ?= 100
load: venv stack-up
	$(VENV)/bin/python -m loadtests --seconds $(LOAD_SECONDS) --rate $(LOAD_RATE)
load-ui: venv stack-up
	$(VENV)/bin/python -m loadtests --ui --rate $(LOAD_RATE)

# Soak with leak detection (bench/soak.py): SOAK_MINUTES of production-shaped traffic at half
# the maximum rate (measured first on the same fresh stack), tm sampled every 10 s; markdown
# report, PNG plot and samples in the folder it prints; exit 1 on a series growing 5 % or more.
.PHONY: soak
SOAK_MINUTES ?= 10
soak: venv stack-up
	$(VENV)/bin/python -m bench.soak --minutes $(SOAK_MINUTES)

# Chaos with an exact oracle (tests/chaos): a seeded schedule of faults against tm on a private
# PostgreSQL and broker, in both delivery modes; `make test` runs every fault once (about 4
# minutes a mode), this runs CHAOS_MINUTES of them. CHAOS_SEED=<seed> replays a schedule,
# CHAOS_DELIVERY=<mode> runs one mode.
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

# The container image localhost/tm:latest (Containerfile; docs/development.md "Container
# image"): podman, runc and debootstrap installed when missing, a Debian base debootstrapped
# once, uv.lock's wheels fetched on the host, then an offline `podman build` (first time on a
# machine: 4-5 minutes; with the base made: about 80 s; nothing changed: 1 s). tests/container/ runs it the
# way the StatefulSet does; `test` builds it first so that its output shows here.
.PHONY: image
image: lock-check
	bash stack/image.sh
test: image

# The checks of k8s/ (tests/k8s/; README "Deploy on Kubernetes"): kustomize, `go install`ed from
# the Go module proxy into .stack/kustomize/ (first time on a machine: about 30 s; another
# clone: 2 s; then nothing), the CRD schemas of KEDA and prometheus-operator from their Go
# modules, and what `podman kube play` needs here (catatonit; a containers.conf). After `image`,
# which installs podman.
.PHONY: k8s k8s-rules
k8s: image
	bash stack/k8s.sh >/dev/null
	bash stack/k8s.sh kube-play >/dev/null
test: k8s

# k8s/components/monitoring/prometheusrule.yaml from k8s/prometheus/tm-alerts.yaml (run after
# editing the rules; tests/k8s fails while the two differ).
k8s-rules:
	bash k8s/prometheus/prometheusrule.sh
