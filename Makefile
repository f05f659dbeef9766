# latentray: `make demo` (the embedded default, end to end) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q
CONFIG ?= jobs/configs/demo.yaml

.PHONY: demo test venv family-envs browser experiments clean-outputs

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

# headless Chromium for the report test: Debian's package, installed where this can (root with
# apt); elsewhere that one test is skipped with the reason
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "no chromium: the report's browser test will be skipped"

test: $(VENV)/.test family-envs browser
	$(BIN)/python -m pytest

# every experiment of jobs/configs/experiments/ alone, each into outputs/experiments/NAME
# (the demo runs them all together)
experiments: $(VENV)/.models
	for config in jobs/configs/experiments/*.yaml; do $(BIN)/latentray run $$config || exit 1; done

clean-outputs:
	rm -rf outputs
