# modalmesh: `make demo` runs the stack on the tiny preset and asks it one question;
# `make test` runs the test suite. Both set up .venv first (once; again when the pins change).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test test-unit test-integration compose-test bench lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py requirements/cpu.txt $(wildcard protos/modalmesh/v1/*.proto)
	@scripts/ensure-system-deps
	@scripts/ensure-browser
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c requirements/cpu.txt -e '.[dev]'
	@scripts/prebuild-deepspeed-op $(BIN)/python
	@touch $@

demo: install
	$(BIN)/modalmesh demo

test: install
	$(BIN)/python -m pytest -q

test-unit: install
	$(BIN)/python -m pytest -q -m "not integration"

test-integration: install
	$(BIN)/python -m pytest -q -m integration

# `docker compose up` for real: the production compose files built and run on the CPU stack
# (tests/compose; Docker Engine, Compose v2 and debootstrap installed when missing).
compose-test: install
	@scripts/ensure-docker
	$(BIN)/python -m pytest -q -s -m compose tests/compose

# Every benchmark against the seed-style baseline in one run; BENCH_ARGS="--quick --only transport".
BENCH_OUT  ?= bench-results.json
BENCH_ARGS ?=
bench: install
	$(BIN)/python -m bench --out $(BENCH_OUT) $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check services gateway modalmesh tests presets bench
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix services gateway modalmesh tests presets bench
	$(BIN)/ruff format services gateway modalmesh tests presets bench

clean:
	rm -rf $(VENV) build *.egg-info modalmesh/v1 .pytest_cache .mypy_cache .ruff_cache
