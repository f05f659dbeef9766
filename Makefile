# latentray: `make demo` (the embedded default, end to end) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q
CONFIG ?= jobs/configs/demo.yaml

.PHONY: demo test venv mace-env clean-outputs

# torch is installed first, pinned: 2.13.0 is the CPU build these machines hold. On a GPU
# machine install your CUDA build of torch 2.13.0 into .venv first; the pin accepts it.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.models: $(BIN)/python pyproject.toml
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[models]"
	@touch $@

$(VENV)/.test: $(VENV)/.models
	$(PIP) install -e ".[models,metatomic,orb,test]"
	@touch $@

# MACE pins e3nn 0.4.4, SevenNet needs e3nn >= 0.5: MACE's actors run in their own
# environment (a config's `environments: {mace: {python: .venv-mace/bin/python}}`), with the
# same Ray as the driver's.
MACE_VENV := .venv-mace
$(MACE_VENV)/.ready: $(VENV)/.models pyproject.toml
	$(PYTHON) -m venv $(MACE_VENV)
	$(MACE_VENV)/bin/python -m pip --disable-pip-version-check -q install torch==2.13.0
	$(MACE_VENV)/bin/python -m pip --disable-pip-version-check -q install -e ".[mace]" \
		"ray[default]==$$($(BIN)/python -c 'import ray; print(ray.__version__)')"
	@touch $@

mace-env: $(MACE_VENV)/.ready

venv: $(VENV)/.models

demo: $(VENV)/.models
	$(BIN)/latentray run $(CONFIG)

test: $(VENV)/.test $(MACE_VENV)/.ready
	$(BIN)/python -m pytest

clean-outputs:
	rm -rf outputs
