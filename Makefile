# Two entry points: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PROMPT ?= Once upon a time, in a small village by the sea,
export HF_HUB_OFFLINE := 1

.PHONY: demo test lint format venv dev clean

$(VENV)/.stamp-demo:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[demo]"
	touch $@

$(VENV)/.stamp-dev: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	touch $@

demo: $(VENV)/.stamp-demo
	$(VENV)/bin/ollm run "$(PROMPT)" --max-new-tokens 48 --raw --temperature 0.8 --top-p 0.95 --seed 0

lint: $(VENV)/.stamp-dev
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/ruff format --check src tests scripts

format: $(VENV)/.stamp-dev
	$(VENV)/bin/ruff format src tests scripts
	$(VENV)/bin/ruff check --fix src tests scripts

test: lint
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
