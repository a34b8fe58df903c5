# Quickstart targets: `make serve` and `make test` bootstrap .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test lint check browser bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/cosigner serve

# The dashboard tests drive a real browser: Debian's headless Chromium (never `playwright
# install`). chromium-headless-shell's binary is /usr/lib/chromium/chromium-headless-shell,
# chromium's /usr/lib/chromium/chromium; tests/support/browser.py looks there (or at
# $COSIGNER_TEST_CHROMIUM).
CHROMIUM_PATHS := $(COSIGNER_TEST_CHROMIUM) /usr/lib/chromium/chromium-headless-shell /usr/lib/chromium/chromium
browser:
	@for p in $(CHROMIUM_PATHS); do test -x "$$p" && exit 0; done; \
	  echo "installing Debian's chromium-headless-shell for the browser tests"; \
	  apt-get update -qq && export DEBIAN_FRONTEND=noninteractive \
	  && (apt-get install -y -qq chromium-headless-shell || apt-get install -y -qq chromium)

# Cosigner vs a bare aiohttp proxy vs nginx, side by side (bench/run.py; installs nginx
# and wrk with apt-get when missing). BENCH_ARGS=--quick for a smoke run.
bench: $(STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check gateway tests bench
	$(BIN)/ruff format --check gateway tests bench
	$(BIN)/mypy

test: $(STAMP) browser lint
	$(BIN)/python -m pytest -n 2 --dist loadgroup tests

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
