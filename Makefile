# latentray: `make demo` (the embedded default, end to end) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q
CONFIG ?= jobs/configs/demo.yaml

.PHONY: demo test venv clean-outputs

# torch is installed first, pinned: 2.13.0 is the CPU build these machines hold. On a GPU
# machine install your CUDA build of torch 2.13.0 into .venv first; the pin accepts it.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.models: $(BIN)/python pyproject.toml
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[models]"
	@touch $@

$(VENV)/.test: $(VENV)/.models
	$(PIP) install -e ".[models,test]"
	@touch $@

venv: $(VENV)/.models

demo: $(VENV)/.models
	$(BIN)/latentray run $(CONFIG)

test: $(VENV)/.test
	$(BIN)/python -m pytest

clean-outputs:
	rm -rf outputs
