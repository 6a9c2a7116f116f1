# make run   -> set up a virtual environment and start everything (uns up)
# make test  -> set up the virtual environment and run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The one list of packages: every directory under libs/ and services/ with a pyproject.toml.
# Install, type-check and lint derive from it; a new package needs no edit outside its folder.
PACKAGES := $(wildcard libs/*/pyproject.toml services/*/pyproject.toml)
PACKAGE_DIRS := $(PACKAGES:/pyproject.toml=)
# The importable package(s) inside each, for mypy; MYPYPATH maps them to their names.
SOURCES := $(patsubst %/__init__.py,%,$(wildcard $(PACKAGE_DIRS:=/*/__init__.py)))
empty :=
MYPYPATH := $(subst $(empty) $(empty),:,$(PACKAGE_DIRS))

.PHONY: install run test test-fast lint typecheck schema check clean model eval bench

$(STAMP): requirements-dev.txt $(PACKAGES)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt $(PACKAGE_DIRS:%=-e %)
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/uns up

# Two workers by default: most tests wait on real brokers and servers, so two share two
# cores well (29 min in one process, 17 min on two with the machine loaded). Tests of one
# clustered engine stay on one worker (xdist_group), so each engine starts once.
TEST_JOBS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadgroup

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration and not system"

lint: $(STAMP)
	$(BIN)/ruff check libs services tests
	$(BIN)/ruff format --check libs services tests
	$(BIN)/lint-imports --no-logo --no-cache

typecheck: $(STAMP)
	MYPYPATH=$(MYPYPATH) $(BIN)/mypy $(SOURCES)

# The example plant's default models, rebuilt from simulated healthy running: same
# seed and data -> the same model.onnx sha256 as the shipped, signed ones (checked);
# a model with no shipped version is signed and promoted when keys/models.key is present.
model: $(STAMP)
	$(BIN)/python -m uns_eval.default_models

# The pipeline's code on real data (UNS_DATASETS, e.g. ../shared/data) and the simulator.
eval: $(STAMP)
	$(BIN)/python -m uns_eval.evaluation

# The benchmarks (uns bench): every scenario, medians of 3 runs, the table the README carries.
# Run it when nothing else heavy runs on the machine (check uptime).
bench: $(STAMP)
	$(BIN)/uns bench --json var/bench.json

schema: $(STAMP)
	$(BIN)/uns schema export

check: lint typecheck test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
