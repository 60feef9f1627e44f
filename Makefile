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

# The whole suite, then the bit-exact / golden-number tests again under AVX2-only kernels, as another
# CPU would pick them (a test that holds only on this CPU's kernels must fail here, not on a user's machine).
test: $(VENV)/.installed
	$(BIN)/python -m pytest -q
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(BIN)/python -m pytest -q -m determinism -p no:cacheprovider

clean-venv:
	rm -rf $(VENV)
