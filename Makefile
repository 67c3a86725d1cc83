# The two set-up commands: `make run` and `make test`. Each installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint system-deps bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

system-deps:
	bash scripts/install-system-deps.sh

run: $(STAMP)
	$(VENV)/bin/ferrymail run

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

test: $(STAMP) system-deps lint
	$(VENV)/bin/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: $(STAMP) system-deps
	$(PY) bench/inbound.py
	$(PY) bench/outbound.py

clean:
	rm -rf $(VENV) var
