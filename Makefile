# Entry points. Every target does its own setup, so each works on a fresh machine.
VENV ?= $(HOME)/.cache/temper/venv-py311
PY := $(VENV)/bin/python
export TEMPER_VENV := $(VENV)
# Caches outside the clone keep warm CI runs fast; nothing depends on them existing.
export MYPY_CACHE_DIR ?= $(HOME)/.cache/temper/mypy

.PHONY: all setup host tools venv olah images crds lint typecheck unit test examples demo clean-cluster

all: test

tools:
	bash hack/build-tools.sh

venv:
	bash hack/setup-venv.sh

# olah, the Hub-compatible mirror the hub tests serve models from, in a venv of its own.
olah:
	bash hack/setup-olah.sh

# Host packages for daemonless builds and the exec node's runtime (buildah, podman, runc, ...).
host:
	bash hack/setup-host.sh

# temper-operator and temper-trainer into the podman storage under ~/.cache/temper; an
# unchanged tree never rebuilds (hack/build-images.sh hashes Dockerfile, context and base).
images: host
	bash hack/build-images.sh

# The Go builds are CPU-bound and the Python side mostly waits on downloads and disk, so a cold
# setup runs them side by side; warm, every step is a cache check.
setup:
	@$(MAKE) --no-print-directory tools & tools=$$!; \
	$(MAKE) --no-print-directory venv olah images || { kill $$tools; exit 1; }; \
	wait $$tools

crds: venv
	$(PY) -m temper.api.crdgen

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: venv
	$(PY) -m mypy

unit: venv
	$(PY) -m pytest -m unit -q

# The test command: lint, types, then every test (unit, cluster, e2e) against the
# hermetic control plane. Cluster tests fail, never skip, if the cluster cannot start.
# All but the every-example e2e (`make examples`), which alone would push warm CI past 15 min.
test: setup
	$(MAKE) --no-print-directory lint typecheck
	$(PY) -m pytest -q -n 2 --durations=30 -m "not examples"

# Every file in examples/ through the Helm-installed operator, all at once (~6 min alone).
examples: setup
	$(PY) -m pytest -q -s tests/e2e/test_examples.py

# The main job: hermetic cluster + loopback S3 + `helm install` of the operator image + the
# quickstart pipeline, its trainer pods in the trainer image.
# DEMO_ARGS=--keep leaves everything running; DEMO_ARGS=--down stops it.
demo: setup
	$(PY) -m temper_dev.demo $(DEMO_ARGS)

clean-cluster: venv
	$(PY) -m temper_dev.cluster down
