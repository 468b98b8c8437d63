# Two commands for a new user on a fresh Debian machine:
#   make demo   set up and run the whole pipeline on the simulated market (dashboard on localhost)
#   make test   set up and run the tests
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup redis test-tools demo test lint bench clean

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || PY=python3; $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# apt packages, installed only when their command is missing:
#   redis-server (everything), chromium (browser test), prometheus (promtool + scrape test),
#   kubectl (kustomize rendering of deploy/k8s)
APT_PKGS_RUN := redis-server:redis-server
APT_PKGS_TEST := chromium:chromium prometheus:promtool kubectl:kubectl
define apt_install
	@missing=""; for pc in $(1); do pkg=$${pc%%:*}; cmd=$${pc##*:}; \
	  command -v $$cmd >/dev/null || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then echo "installing (apt):$$missing"; \
	  SUDO=$$( [ $$(id -u) -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive \
	    $$SUDO apt-get install -y -q $$missing $(2); fi
endef

redis:
	$(call apt_install,$(APT_PKGS_RUN))

# Test tools are best effort: a test needing one that could not be installed skips and says so.
test-tools:
	$(call apt_install,$(APT_PKGS_TEST),|| echo "warning: could not install all test tools")

setup: $(STAMP) redis

lint: setup
	$(BIN)/ruff check streams processors schemas simulator tests bench
	$(BIN)/mypy

test: setup test-tools lint
	$(BIN)/pytest -q

demo: setup
	$(BIN)/massive-pipeline demo

bench: setup
	$(BIN)/python bench/consumer_throughput.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
