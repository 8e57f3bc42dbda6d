# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make demo   creates .venv, installs muxgate, runs `muxgate demo`
#   make test   creates .venv, installs muxgate with its test extra and the
#               Debian tools the tests use (chromium, promtool), runs the suite
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint system-deps clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the local CPU build satisfies the project's torch range, so
	# nothing gigabyte-sized is downloaded afterwards.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/muxgate demo $(ARGS)

system-deps:
	@if ! command -v chromium >/dev/null || ! command -v promtool >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium prometheus >/dev/null; \
	fi

test: $(STAMP) system-deps
	$(PY) -m pytest $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check gateway replicas backends tests bench examples
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build *.egg-info
