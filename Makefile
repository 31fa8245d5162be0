# certpulse: `make demo` runs the main job end to end; `make test` runs the whole suite.
# Both create the virtualenv (.venv) on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo test pytest lint bench clean system-packages

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python demo/demo.py

# Lint and type checks first (fast), then the suite on SQLite and PostgreSQL, two workers.
test: lint pytest

pytest: $(STAMP) system-packages
	$(BIN)/pytest -n 2 --dist loadscope -q --durations=15

# Debian packages the tests run as real processes (faketime, nginx, haproxy, wrk); installed when missing.
system-packages:
	scripts/system-packages

lint: $(STAMP)
	$(BIN)/ruff check src tests demo benchmarks
	$(BIN)/mypy

# The benchmarks of issue 6 (see benchmarks/RESULTS.md); minutes, not seconds. wrk and cfssl
# (Debian packages) are installed when missing. Not part of `make test`: that runs a smoke run of each.
BENCHMARKS := benchmarks/issuance.py benchmarks/storm.py benchmarks/scale.py benchmarks/ocsp.py benchmarks/acme.py

bench: $(STAMP) system-packages
	scripts/bench-packages
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	@for f in $(BENCHMARKS); do [ -f "$$f" ] || { echo "make bench: $$f is missing" >&2; exit 1; }; done
	$(BIN)/python benchmarks/issuance.py
	$(BIN)/python benchmarks/storm.py
	$(BIN)/python benchmarks/scale.py
	$(BIN)/python benchmarks/ocsp.py
	$(BIN)/python benchmarks/acme.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
