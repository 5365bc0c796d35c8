# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv from
# requirements.txt on first use and apt-get the system packages (espeak-ng) when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export PYTHONPATH := $(CURDIR)

.PHONY: demo test test-slow lint sysdeps venv bench chaos

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.installed

sysdeps:
	@command -v espeak-ng >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq espeak-ng >/dev/null; }

demo: venv sysdeps
	JAX_PLATFORMS=cpu $(PY) -m mirage_jax.demo

test: venv sysdeps
	$(VENV)/bin/ruff check .
	JAX_PLATFORMS=cpu $(PY) -m pytest -q

test-slow: venv sysdeps
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -m slow

lint: venv
	$(VENV)/bin/ruff check .

bench: venv sysdeps
	JAX_PLATFORMS=cpu $(PY) -m bench

# chaos drill: N iterations of SIGTERM / SIGKILL at seeded random moments of a 2-process job, restarted each
# time; checks bitwise-equal final params, exit 0 on SIGTERM, no step lost, no orphans (tools/chaos.py)
N ?= 20
SEED ?= 0
chaos: venv sysdeps
	JAX_PLATFORMS=cpu $(PY) -m tools.chaos --iterations=$(N) --seed=$(SEED)
