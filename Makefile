# Two entry points: `make up` (the service with embedded defaults) and `make test`.
# Both create .venv and install the project into it on first use, so a fresh machine
# needs only Python 3.11+.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: up test bench mutation soak-model docs docs-build clean

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

# The differential test for as long as asked (MINUTES, default 10), its seeds printed.
soak-model: $(STAMP)
	$(VENV)/bin/python -m bench.model --minutes $(or $(MINUTES),10)

# Mutation testing of the pure money core: how much of it the fast tests pin down.
mutation: $(STAMP)
	$(VENV)/bin/python -m pip install -q 'mutmut>=3.3,<4'
	rm -rf mutants
	METERGATE_DIFF_EXAMPLES=30 METERGATE_DIFF_DERANDOMIZE=1 $(VENV)/bin/mutmut run --max-children 2
	$(VENV)/bin/python -m bench.mutation_score

# The docs site (mkdocs.yml): served on 127.0.0.1:8001 while you edit, or built into build/site with
# --strict (a dead link or anchor, or a page missing from the nav, fails the build).
docs: $(STAMP)
	$(VENV)/bin/mkdocs serve

docs-build: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

# Keeps .metergate: it holds the embedded database and the tokens gateways and the CLI use.
clean:
	rm -rf $(VENV) build/site
	@if [ -d .metergate ]; then \
		echo "kept .metergate (the embedded database and the service, admin and org-token secrets);"; \
		echo "to delete it too, for good: rm -rf .metergate"; \
	fi
