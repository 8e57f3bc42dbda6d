# Two commands do all the set-up on a fresh machine with Python >= 3.11:
#   make demo   creates .venv, installs muxgate (no test tools), runs `muxgate demo`
#   make test   also installs the test extra and the Debian tools the tests
#               use (chromium, promtool), then runs the suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The first of these that runs and is >= 3.11 (pyenv shims of versions that
# are not installed fail the check); PYTHON=... overrides.
ifeq ($(origin PYTHON),undefined)
PYTHON := $(shell for p in python3.13 python3.12 python3.11 python3; do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 && { echo $$p; break; }; \
	done)
endif
# Separate stamps: the demo needs the package only; tests and lint add the extra.
BASE   := $(VENV)/.installed-base
TESTS  := $(VENV)/.installed-test

.PHONY: demo test lint system-deps clean

$(BASE): pyproject.toml
	@test -n "$(PYTHON)" || { echo "make: no Python >= 3.11 found; set PYTHON=/path/to/python3.11+" >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
# torch first: this pinned CPU build satisfies the project's torch range, so
# nothing gigabyte-sized is downloaded afterwards.
	$(PY) -m pip install -q torch==2.13.0
# A regular install for the demo; the test stamp makes it editable (an
# editable install of this layout makes setuptools print a notice).
	$(PY) -m pip install -q .
	touch $@

$(TESTS): $(BASE)
	$(PY) -m pip install -q -e '.[test,ray]'
	touch $@

demo: $(BASE)
	$(VENV)/bin/muxgate demo $(ARGS)

# Where apt-get cannot install them (macOS, another distribution, not root),
# the tests that need chromium or promtool are skipped and say so.
system-deps:
	@if ! command -v chromium >/dev/null || ! command -v promtool >/dev/null; then \
	    if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium prometheus >/dev/null; \
	    else \
	        echo "make: chromium or promtool is missing and apt-get cannot install it here (it needs Debian and root): the status-page and alert-rule tests will be skipped; install chromium and promtool (Prometheus) to run them" >&2; \
	    fi; \
	fi

test: $(TESTS) system-deps
	$(PY) -m pytest $(ARGS)

lint: $(TESTS)
	$(VENV)/bin/ruff check gateway replicas backends tests bench examples
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-logo

clean:
	rm -rf $(VENV) build *.egg-info
