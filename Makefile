# Two commands matter: `make book` builds the site, `make test` checks everything.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOCK := requirements.lock
STAMP := $(VENV)/.installed-$(shell cat $(LOCK) pyproject.toml 2>/dev/null | cksum | cut -d' ' -f1)
JOBS ?= 2

# The tests and the book run on eight CPU devices (tests/conftest.py and each
# notebook's first cell also say so; this covers anything they start).
unit notebooks book browser: export XLA_FLAGS := --xla_force_host_platform_device_count=8
unit notebooks book browser: export JAX_PLATFORMS := cpu

.PHONY: install test lint unit notebooks book browser bench lab lock clean

$(STAMP): $(LOCK) pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(LOCK) -e ".[test,book]"
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

test: install lint unit notebooks book browser

# Ruff reads book/ruff.toml for the chapters: 72 columns, so that no line of a
# notebook scrolls sideways in the built book (tests/test_browser.py checks it).
lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

unit: install
	$(PY) -m pytest -n $(JOBS) -m "not browser" tests

notebooks: install
	$(PY) -m pytest -n $(JOBS) --nbmake --nbmake-timeout=300 book

# MathJax comes from npm (package-lock.json), so the site renders math offline.
book: install
	test node_modules/.package-lock.json -nt package-lock.json || npm ci --no-audit --no-fund
	$(VENV)/bin/jupyter-book build . -W -n --keep-going

browser: install
	$(PY) -m pytest -m browser tests

bench: install
	$(PY) benchmarks/attention.py
	$(PY) benchmarks/model.py
	$(PY) benchmarks/decode.py

lab: install
	$(PY) -m pip install --quiet -c $(LOCK) -e ".[lab]"
	$(PY) -m jupyter lab book/

# Re-resolve the newest versions and rewrite the lock file (needs the network).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet -e ".[test,book,lab]"
	.lock-venv/bin/pip freeze --exclude-editable > $(LOCK)
	rm -rf .lock-venv

clean:
	rm -rf _build .pytest_cache .ruff_cache
