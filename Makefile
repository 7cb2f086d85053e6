# The two commands a new machine needs: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: bootstrap run test lint proto bench unit

bootstrap:
	bash deploy/bootstrap.sh

run: bootstrap
	$(VENV)/bin/chainfs up --data $${CHAINFS_DATA:-/tmp/chainfs-run} --sample-data

lint: bootstrap
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy chainfs
	$(VENV)/bin/lint-imports --no-cache

# pytest exits 5 when it collected no test; that is a failure here.
test: bootstrap lint
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

unit: bootstrap
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

proto: bootstrap
	$(PY) -m chainfs.proto.build

# The suite; it prints where it wrote its report (e.g. BENCH_ARGS="--quick --out DIR").
bench: bootstrap
	$(VENV)/bin/chainfs bench $(BENCH_ARGS)
