# Two commands do all the set-up on a fresh machine:
#   make search   # creates .venv, installs fastdarts into it, runs a real search on the embedded digits data
#   make test     # installs the same way and runs the test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' 2>/dev/null)
# The digits search of `make search`: see README for what it runs and how long it takes.
SEARCH_ARGS ?= --data digits --layers 5 --init-channels 8 --epochs 10 --batch-size 64 --seed 0

.PHONY: install search test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch and the build tools come first: the extension is built against the torch in the venv
# (--no-build-isolation), never against a second copy downloaded into an isolated build environment.
$(VENV)/.deps: | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel ninja
	$(BIN)/python -m pip install -q 'torch>=2.11' torchvision
	touch $@

$(VENV)/.installed: $(VENV)/.deps $(SOURCES)
	$(BIN)/python -m pip install -q --no-build-isolation -e '.[test]'
	touch $@

install: $(VENV)/.installed

search: install
	rm -rf runs/digits
	$(BIN)/fastdarts search $(SEARCH_ARGS) --out runs/digits

lint: install
	$(BIN)/ruff check fastdarts tests benchmarks

# one test process per core (pytest-xdist), each on one thread
test: lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -ra -n auto

bench: install
	$(BIN)/python -m pytest benchmarks -q

clean:
	rm -rf build fastdarts/_C*.so fastdarts/_build_info.json $(VENV)/.installed
