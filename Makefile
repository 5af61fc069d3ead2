# longctx: `make test` and `make demo` work on a fresh machine with only python3 installed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt requirements-assets.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-assets.txt
	touch $(STAMP)

# Two pytest workers (pytest-xdist), one per core of a 2-core machine; each test file runs whole on one worker, so
# a module's shared fixture (the demo pipeline, the 4-process CP run) is built once. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25 tests

demo: $(STAMP)
	bash recipes/tiny_demo.sh

bench: $(STAMP)
	$(PY) bench/bench_prepare.py

clean:
	rm -rf $(VENV) .cache runs .pytest_cache
