# Two entry points: `make up` (the service with embedded defaults) and `make test`.
# Both create .venv and install the project into it on first use, so a fresh machine
# needs only Python 3.11+.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: up test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	touch $(STAMP)

up: $(STAMP)
	$(VENV)/bin/python -m serve_app.main

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

bench: $(STAMP)
	$(VENV)/bin/python -m bench.run_all

clean:
	rm -rf $(VENV) .metergate
