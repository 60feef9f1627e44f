# Two set-up commands: `make demo` and `make test`. Each creates .venv if missing and installs into it.
PYTHON ?= python3
VENV ?= .venv
# torch/torchvision builds to install; override for other machines, e.g. TORCH_SPEC="torch torchvision".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
DEMO_ARGS ?=

.PHONY: demo test install clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[test,log]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/vcdm demo $(DEMO_ARGS)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
