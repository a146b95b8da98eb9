# Two entry points (see README): `make demo` runs the main job, `make test` the test suite.
# Both set up .venv first: torch 2.13.0 (CPU build) before anything else, then the package.
PY := .venv/bin/python

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

.PHONY: demo test
demo: .venv/.installed
	$(PY) -m interp.trace --layer-sweep
	$(PY) -m interp.cache

test: .venv/.installed
	$(PY) -m pytest
