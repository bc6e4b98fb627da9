# Quick start: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup browser test test-all demo clean

setup: $(STAMP) browser

# the report test looks at the page in a real headless browser: Debian's chromium
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		($(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU wheel that lies on this disk; must come before anything that pulls torch
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m 'not gpu'

demo: setup
	$(VENV)/bin/lavi-label demo

clean:
	rm -rf $(VENV) build *.egg-info demo-out
