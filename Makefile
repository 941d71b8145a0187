# Two entry points: `make demo` (install, then build the embedded demo) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3

.PHONY: install install-dev demo test clean

# The demo installs what a user installs; the tests add the dev tools (pytest, trl, mkdocs).
install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

COMPILE := $(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true

# torch is pinned first: on CPU machines 2.13.0 is a local CPU wheel, and an unpinned torch
# pulled in by another package would fetch a multi-GB CUDA build.
# The packages are byte-compiled afterwards on every core (pip compiles on one, most of a fresh
# install); as with pip, a file written for a newer Python (torch ships one) stays uncompiled.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --no-compile torch==2.13.0
	$(BIN)/pip install -q --no-compile -e .
	$(COMPILE)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q --no-compile -e ".[dev]"
	$(COMPILE)
	touch $@

demo: install
	$(BIN)/dataselect build --recipe recipes/demo.yaml

# The docs build strictly (a broken link or a missing page fails), then the tests, one worker per
# core with one thread each (workers that each spread over every core slow each other down), the
# tests that read the session's demo build on one worker, so it is built once.
test: install-dev
	$(BIN)/mkdocs build --strict -d $$(mktemp -d)
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -n auto --dist loadgroup

clean:
	rm -rf runs out
