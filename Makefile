# Everything a fresh machine needs: `make demo` and `make test` create .venv and install first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-fast bench bench-quick lint clean chromium

$(STAMP): requirements.txt requirements-dev.txt requirements-nodeps.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	@$(MAKE) --no-print-directory chromium
	touch $(STAMP)

# The web UI's browser tests drive Debian's chromium (never a downloaded browser): installed here with apt
# when we run as root and it is missing; otherwise those tests skip and say how to get it.
chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium (apt) for the browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else echo "note: chromium is missing; the browser tests will skip (install it: sudo apt-get install chromium)"; fi

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m sdmaker demo

# One test process per core plus one (pytest-xdist; whole modules each, so a module's daemon fixture is started
# once): most tests wait on subprocesses and sockets, so they overlap. tests/conftest.py gives each process its
# share of the cores as torch threads. On 2 cores: 13 min, against 20-23 min with two processes of 2 threads.
# TEST_WORKERS=0 runs in one process. The 20 slowest tests are listed at the end, so a CI log says where the
# suite's time went (its goal is 15 min on 2 cores).
TEST_WORKERS ?= $(shell python3 -c "import os; print(len(os.sched_getaffinity(0)) + 1)" 2>/dev/null || echo 3)
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=20

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench-quick: $(STAMP)
	$(BIN)/python -m bench --quick

bench: $(STAMP)
	$(BIN)/python -m bench

lint: $(STAMP)
	$(BIN)/ruff check sdmaker tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info
