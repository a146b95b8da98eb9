# Two entry points (see README): `make demo` runs the main job, `make test` the test suite.
# Both set up .venv first: torch 2.13.0 (CPU build) before anything else, then the package.
PY := .venv/bin/python

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq torch==2.13.0
	PYTHONWARNINGS=ignore $(PY) -m pip install -qq -e ".[test]"
	touch $@

# Debian's chromium for the browser test (skipped, with a note, where apt-get is not available).
.PHONY: chromium
chromium:
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo) && $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
	  echo "note: no chromium and no apt-get: the browser test will be skipped"

.PHONY: demo test
demo: .venv/.installed
	$(PY) -m interp.trace --layer-sweep
	$(PY) -m interp.cache

test: .venv/.installed chromium
	$(PY) -m pytest
