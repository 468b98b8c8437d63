# Two commands for a new user on a fresh Debian machine:
#   make demo   set up and run the whole pipeline on the simulated market (dashboard on localhost)
#   make test   set up and run the tests
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup redis demo test lint bench clean

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || PY=python3; $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

redis:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (apt)"; \
	  SUDO=$$( [ $$(id -u) -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q redis-server; }

setup: $(STAMP) redis

lint: setup
	$(BIN)/ruff check streams processors schemas simulator tests bench
	$(BIN)/mypy

test: setup lint
	$(BIN)/pytest -q

demo: setup
	$(BIN)/massive-pipeline demo

bench: setup
	$(BIN)/python bench/consumer_throughput.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
