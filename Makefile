# Two commands on a fresh machine: `make serve` and `make test`. Both create .venv when missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTHON ?= python3

.PHONY: setup serve test lint browser conformance e2e bench bench-workers profile emulate clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/kimi-pool serve

emulate: $(STAMP)
	$(VENV)/bin/kimi-pool emulate moonshot

lint: $(STAMP)
	$(VENV)/bin/ruff check app tests bench
	$(VENV)/bin/mypy

# The dashboard's test drives headless Chromium through chromedriver (Debian's packages).
browser:
	@(command -v chromium && command -v chromedriver) >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)

test: lint browser
	$(VENV)/bin/pytest -q -m "not e2e"

# The slow end-to-end tests: real Claude Code and Codex CLIs (installed from npm into .cache/e2e on first run).
e2e: $(STAMP)
	$(VENV)/bin/pytest -q -m e2e

# Fuzz the OpenAI chat and models operations against OpenAI's OpenAPI description (seeded; part of `make test` too).
conformance: $(STAMP)
	$(VENV)/bin/pytest -q -m conformance

# The benchmark needs wrk (Debian's package) and, for LiteLLM, a second virtualenv it creates itself.
bench: $(STAMP)
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) bench/run.py
	$(PY) bench/report.py
	$(PY) -m bench.latency

# What a second worker process buys (nothing pinned; several minutes).
bench-workers: $(STAMP)
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) -m bench.workers

profile: $(STAMP)
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) -m bench.profile

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
