# batchgate — everything runs from a local virtualenv that `make install` builds.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The TypeScript client: npm installs its package-lock into node_modules (which npm stamps itself).
TS := clients/typescript
TS_STAMP := $(TS)/node_modules/.package-lock.json

NODE_TESTS := tests/node
NODE_STAMP := $(NODE_TESTS)/node_modules/.package-lock.json

.PHONY: install typescript gen check-gen lint format test test-fast demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py server/batchgate_server/core/_jsonl_native.c clients/python/pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e clients/python -e ".[dev]"
	touch $(STAMP)

$(TS_STAMP): $(TS)/package.json $(TS)/package-lock.json
	npm ci --prefix $(TS) --no-audit --no-fund

typescript: $(TS_STAMP)
	npm run --prefix $(TS) build

gen: install $(TS_STAMP)
	$(PY) scripts/gen_proto.py

check-gen: install $(TS_STAMP)
	$(PY) scripts/gen_proto.py --check

lint: install
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code

format: install
	$(BIN)/buf format -w

# The openai npm package for tests/integration/test_http_node.py, as package-lock.json pins it.
$(NODE_STAMP): $(NODE_TESTS)/package.json $(NODE_TESTS)/package-lock.json
	cd $(NODE_TESTS) && npm ci --no-audit --no-fund

# Every test on the default stores (SQLite, local disk), then the integration suite again with its
# in-process servers on PostgreSQL and S3 (tests/backends.py; the subprocess crash tests, marked slow,
# start their own servers on local stores and are not run twice).
test: install check-gen lint typescript $(NODE_STAMP)
	$(BIN)/pytest -q
	BATCHGATE_TEST_BACKEND=postgres+s3 $(BIN)/pytest -q -m "not slow" tests/integration

test-fast: install
	$(BIN)/pytest -q -m "not slow"

demo: install
	$(PY) examples/demo.py

bench: install
	$(PY) bench/validate_speed.py
	$(PY) bench/validation_handover.py
	$(PY) bench/upload.py
	$(PY) bench/reads.py
	$(PY) bench/upload_stores.py --moto
	$(PY) bench/blob_clients.py
	$(PY) bench/executor.py
	$(PY) bench/shards.py
	$(PY) bench/shard_split.py
	$(PY) bench/watch.py
	$(PY) bench/cost.py
	$(PY) bench/passthrough.py
	$(PY) bench/provider_hop.py
	$(PY) bench/http_api.py
	$(PY) bench/client_overhead.py
	$(PY) bench/postgres_driver.py
	$(PY) bench/quotas.py
	$(PY) bench/soak.py
	$(PY) bench/replicas.py sqlite postgres+s3

clean:
	rm -rf $(VENV) .demo-data .pytest_cache $(TS)/node_modules $(TS)/dist $(NODE_TESTS)/node_modules
