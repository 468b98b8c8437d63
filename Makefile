# Two commands for a new user on a fresh Debian machine:
#   make demo   set up and run the whole pipeline on the simulated market (dashboard on localhost)
#               (arguments of `massive-pipeline demo`: make demo ARGS="--port 8100")
#   make test   set up and run the tests
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Pinned versions with hashes of every dependency (make lock regenerates them from pyproject.toml)
LOCK := requirements.lock
DEV_LOCK := requirements-dev.lock
ARGS ?=

.PHONY: setup redis test-tools demo test lint lock bench clean

$(STAMP): pyproject.toml $(DEV_LOCK)
	@command -v $(PY) >/dev/null || PY=python3; $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --require-hashes -r $(DEV_LOCK)
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

# Re-resolve the locks after changing dependencies in pyproject.toml (needs PyPI).
lock: $(VENV)/bin/python
	$(BIN)/pip install -q uv
	$(BIN)/uv pip compile -q pyproject.toml --generate-hashes --python-version 3.11 \
	  --python-platform linux -o $(LOCK)
	$(BIN)/uv pip compile -q pyproject.toml --extra dev --generate-hashes --python-version 3.11 \
	  --python-platform linux -c $(LOCK) -o $(DEV_LOCK)

$(VENV)/bin/python:
	@command -v $(PY) >/dev/null || PY=python3; $(PY) -m venv $(VENV) || python3 -m venv $(VENV)

# apt packages, one apt-get call each (one package that has no candidate must not keep the
# others out), installed only when their command is missing:
#   redis-server (everything); test tools: chromium (browser test), prometheus (promtool +
#   scrape test), kubectl (kustomize rendering of deploy/k8s; Debian 12 has no candidate).
# A test whose tool is missing skips and says so.
define apt_install
	@SUDO=$$( [ $$(id -u) -eq 0 ] || echo sudo ); updated=""; \
	for pc in $(1); do pkg=$${pc%%:*}; cmd=$${pc##*:}; \
	  command -v $$cmd >/dev/null && continue; \
	  [ -n "$$updated" ] || { $$SUDO apt-get update -q >/dev/null; updated=1; }; \
	  echo "installing (apt): $$pkg"; \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$pkg >/dev/null \
	    || $(2); \
	done
endef

redis:
	$(call apt_install,redis-server:redis-server,exit 1)

test-tools:
	$(call apt_install,chromium:chromium prometheus:promtool kubectl:kubectl,echo "warning: \
	apt has no $$pkg here: the tests that need $$cmd will skip (install $$cmd to run them)")

setup: $(STAMP) redis

lint: setup
	$(BIN)/ruff check streams processors schemas simulator tests bench
	$(BIN)/mypy

test: setup test-tools lint
	$(BIN)/pytest -q

demo: setup
	$(BIN)/massive-pipeline demo $(ARGS)

bench: setup
	$(BIN)/python bench/consumer_throughput.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
