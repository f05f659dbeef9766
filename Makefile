# latentray: `make demo` (the embedded default, end to end) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q
CONFIG ?= jobs/configs/demo.yaml

.PHONY: demo test venv family-envs clean-outputs

# torch is installed first, pinned: 2.13.0 is the CPU build these machines hold. On a GPU
# machine install your CUDA build of torch 2.13.0 into .venv first; the pin accepts it.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.models: $(BIN)/python pyproject.toml
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[models]"
	@touch $@

$(VENV)/.test: $(VENV)/.models
	$(PIP) install -e ".[models,metatomic,orb,uma,test]"
	@touch $@

# Families whose dependencies conflict with the driver's run in environments of their own,
# .venv-FAMILY, with the same Ray as the driver (a config's
# `environments: {FAMILY: {python: .venv-FAMILY/bin/python}}`):
# - mace: mace-torch pins e3nn 0.4.4, SevenNet needs e3nn >= 0.5;
# - mattersim: its metadata requires torchvision and torchaudio, which it never imports and
#   whose PyPI builds do not load beside this torch (torchmetrics imports torchvision when it
#   is present, and fails), so they are removed again.
FAMILY_ENVS := mace mattersim
RAY_VERSION = $$($(BIN)/python -c 'import ray; print(ray.__version__)')
.venv-%/.ready: $(VENV)/.models pyproject.toml
	$(PYTHON) -m venv .venv-$*
	.venv-$*/bin/python -m pip --disable-pip-version-check -q install torch==2.13.0
	.venv-$*/bin/python -m pip --disable-pip-version-check -q install -e ".[$*]" \
		"ray[default]==$(RAY_VERSION)"
	.venv-$*/bin/python -m pip --disable-pip-version-check -q uninstall -y torchvision torchaudio
	@touch $@

family-envs: $(FAMILY_ENVS:%=.venv-%/.ready)

venv: $(VENV)/.models

demo: $(VENV)/.models
	$(BIN)/latentray run $(CONFIG)

test: $(VENV)/.test family-envs
	$(BIN)/python -m pytest

clean-outputs:
	rm -rf outputs
