# batchgate — everything runs from a local virtualenv that `make install` builds.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install gen check-gen lint format test test-fast demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml clients/python/pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e clients/python -e ".[dev]"
	touch $(STAMP)

gen: install
	$(PY) scripts/gen_proto.py

check-gen: install
	$(PY) scripts/gen_proto.py --check

lint: install
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code

format: install
	$(BIN)/buf format -w

test: install check-gen lint
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

demo: install
	$(PY) examples/demo.py

bench: install
	$(PY) bench/validate_speed.py
	$(PY) bench/upload.py
	$(PY) bench/executor.py
	$(PY) bench/watch.py
	$(PY) bench/cost.py
	$(PY) bench/passthrough.py
	$(PY) bench/client_overhead.py

clean:
	rm -rf $(VENV) .demo-data .pytest_cache
