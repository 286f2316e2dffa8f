# The README's two set-up commands: `make demo` and `make test`. Both work on a fresh machine:
# they create .venv, install the package, and `make test` installs the servers the tests need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test lint typecheck unit services screenshots bench bench-smoke bench-quota bench-gateway bench-streams-paced bench-analytics bench-workers clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/meterline demo

# Debian's PostgreSQL and Redis servers (the test session starts throwaway instances on loopback), and
# Chromium for the dashboard's browser tests.
services:
	scripts/ensure-services.sh

lint: install
	$(BIN)/ruff check src tests bench

typecheck: install
	$(BIN)/mypy

# The slowest tests are named at the end: the suite is to stay well under 20 minutes. Two processes, a
# test file each at a time (each starts its own PostgreSQL, Redis and Redis Cluster): most tests wait on
# the servers they start, so two share the two vCPUs (docs/benchmarks.md: 20:45 alone, 12:46 together).
test: install services lint typecheck
	METERLINE_REQUIRE_POSTGRES=1 $(BIN)/pytest -q -n 2 --dist loadfile --durations=25

# The README's dashboard screenshots, taken by the browser tests from the demo's data.
screenshots: install services
	METERLINE_SCREENSHOTS=docs/screenshots $(BIN)/pytest -q tests/browser/test_screenshots.py

bench: install services
	$(BIN)/python bench/events_ingest.py
	$(BIN)/python bench/quota_store.py

# Benchmark guard (≤ 4 minutes): ingestion ratio (SQLite, 100k events), gateway throughput share and CPU
# per request/stream, quota engine decisions/s, 2 workers ÷ 1 (SQLite, with wrk), Redis µs per lone
# decision, in one table compared with bench/baseline.json (WORSE when more than 15 % worse). Reports
# only, never fails. `make bench-smoke SMOKE_ARGS=--update-baseline` rewrites the baseline.
bench-smoke: install services
	scripts/ensure-services.sh wrk
	$(BIN)/python bench/smoke.py $(SMOKE_ARGS)

# Quota counter stores (memory, Redis): reserve+settle decisions/s and Redis round trips per decision,
# then what tallying a refusal adds to a 429.
bench-quota: install services
	$(BIN)/python bench/quota_store.py
	$(BIN)/python bench/refusal_tally.py

# Gateway added latency over calling the fake upstream directly, side by side with LiteLLM's proxy
# (SPEC §10). LiteLLM lives in its own venv (newer releases need a certifi the package index lacks).
LITELLM_VENV := bench/.venv-litellm

$(LITELLM_VENV)/.installed:
	$(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/pip install -q 'litellm[proxy]==1.80.0'
	touch $@

bench-gateway: install $(LITELLM_VENV)/.installed
	$(BIN)/python bench/gateway.py

# Requests/s with 1 and 2 `serve --workers`, on SQLite and on PostgreSQL + Redis (docs/benchmarks.md).
bench-workers: install services
	$(BIN)/python bench/workers.py

# 200 concurrent streams paced like real model output (64 pieces, 25 ms apart), direct vs Meterline:
# added time-to-first-byte and added last byte, p50/p99 (SPEC §10: p99 <= 5 ms and <= 10 ms).
bench-streams-paced: install
	$(BIN)/python bench/gateway.py --targets direct,meterline --requests 200 --rounds 1 --warmup 50 \
		--streams 200 --stream-chunk-delay-ms 25 --max-tokens 64 --stream-seconds 20 --stream-rounds 2 \
		--throughput-seconds 3 --output bench/results/gateway-paced.json

# Analytics (history, time series, breakdowns, summary) on 100k / 1M / 10M-row ledgers, SQLite and
# PostgreSQL, beside a plain GROUP BY. Generated databases are cached in $(ANALYTICS_SCRATCH).
ANALYTICS_SCRATCH ?= /var/tmp/meterline-bench-analytics

bench-analytics: install services
	$(BIN)/python bench/analytics.py --scratch $(ANALYTICS_SCRATCH)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
