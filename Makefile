# capi: the only entry points. `make run` and `make test` are all a fresh clone needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf
STAMP := $(VENV)/.installed
PROTO_FILES := $(wildcard protos/capi/v1/*.proto)

export CAPI_TEST_DATABASE_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/test

.PHONY: run migrate test test-fast lint fmt proto proto-check buf-lint buf-breaking install bench soak eval-llm clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[server,dev]'
	@touch $(STAMP)

install: $(STAMP)

# Local default: the embedded SQLite file, no encryption keys (dev only, said in the log).
run: $(STAMP)
	CAPI_INSECURE_DEV=$${CAPI_INSECURE_DEV:-true} $(BIN)/capi-server migrate
	CAPI_INSECURE_DEV=$${CAPI_INSECURE_DEV:-true} exec $(BIN)/capi-server serve

migrate: $(STAMP)
	CAPI_INSECURE_DEV=$${CAPI_INSECURE_DEV:-true} $(BIN)/capi-server migrate

test: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider

lint: $(STAMP) $(BUF)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy server clients tests
	cd protos && ../$(BUF) lint

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

$(BUF):
	npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@$(BUF_VERSION)

buf-lint: $(BUF)
	cd protos && ../$(BUF) lint

buf-breaking: $(BUF)
	cd protos && ../$(BUF) breaking --against '../.git#branch=main,subdir=protos'

# Regenerates the committed Python stubs and their mypy stubs.
proto: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -I protos \
		--python_out=protos --grpc_python_out=protos \
		--mypy_out=protos --mypy_grpc_out=protos \
		$(PROTO_FILES)
	$(MAKE) proto-ts

# Regenerates the committed TypeScript client (clients/typescript/src/gen) for agent-service
# and chatbot-service with buf and local protoc-gen-es, both pinned in
# clients/typescript/package-lock.json (npm registry only, no remote plugins). npm ci runs
# when node_modules is missing or older than the lock file.
.PHONY: proto-ts
proto-ts:
	cd clients/typescript && \
		if [ ! node_modules/.package-lock.json -nt package-lock.json ]; then \
			npm ci --silent --no-audit --no-fund; \
		fi && \
		npm run --silent generate

bench: $(STAMP)
	$(BIN)/python -m bench.run

soak: $(STAMP)
	CAPI_SOAK=1 $(BIN)/pytest -q -p no:cacheprovider -m soak tests

eval-llm: $(STAMP)
	$(BIN)/python -m tests.llm_eval.run

clean:
	rm -rf $(VENV) .tools .mypy_cache .ruff_cache .pytest_cache capi.db
