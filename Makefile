# latentray: `make demo` (the embedded default, end to end) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q
CONFIG ?= jobs/configs/demo.yaml

.PHONY: demo test venv family-envs browser experiments clean-outputs lock

# Every environment installs exactly its lock (locks/*.txt, `pip freeze` of an environment
# built from pyproject.toml's ranges; `make lock` refreshes them): the driver's .venv from
# locks/driver.txt, each family environment from locks/FAMILY.txt. torch is pinned to 2.13.0
# (the CPU build these machines hold); on a GPU machine install your CUDA build of torch
# 2.13.0 into .venv first: the pin accepts it and pip keeps it.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.ready: $(BIN)/python locks/driver.txt pyproject.toml
	$(PIP) install --no-deps -r locks/driver.txt
	$(PIP) install --no-deps -e .
	@touch $@

# Families whose dependencies conflict with the driver's run in environments of their own,
# .venv-FAMILY, with the same Ray as the driver (a config's
# `environments: {FAMILY: {python: .venv-FAMILY/bin/python}}`):
# - mace: mace-torch pins e3nn 0.4.4, SevenNet needs e3nn >= 0.5;
# - mattersim: its metadata requires torchvision and torchaudio, which it never imports and
#   whose PyPI builds do not load beside this torch (torchmetrics imports torchvision when it
#   is present, and fails), so its lock leaves them out (hence --no-deps);
# - diep: it requires lightning and torchmetrics (for its training code), which the driver's
#   lock does not hold; kept apart so that the driver's lock does not change.
FAMILY_ENVS := mace mattersim diep
.venv-%/.ready: locks/%.txt pyproject.toml
	$(PYTHON) -m venv .venv-$*
	.venv-$*/bin/python -m pip --disable-pip-version-check -q install --no-deps -r locks/$*.txt
	.venv-$*/bin/python -m pip --disable-pip-version-check -q install --no-deps -e .
	@touch $@

# Refresh the locks from pyproject.toml's ranges (locks/refresh.sh); review, test, commit.
lock:
	bash locks/refresh.sh

family-envs: $(FAMILY_ENVS:%=.venv-%/.ready)

venv: $(VENV)/.ready

demo: $(VENV)/.ready .venv-diep/.ready
	$(BIN)/latentray run $(CONFIG)

# headless Chromium for the report test: Debian's package, installed where this can (root with
# apt); elsewhere that one test is skipped with the reason, except on CI (CI=true), where a
# failed install fails `make test`
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| { [ -n "$$CI" ] && echo "chromium could not be installed on CI" && exit 1; } \
		|| echo "no chromium: the report's browser test will be skipped"

test: $(VENV)/.ready family-envs browser
	$(BIN)/python -m pytest

# every experiment of jobs/configs/experiments/ alone, each into outputs/experiments/NAME
# (the demo runs them all together)
experiments: $(VENV)/.ready
	for config in jobs/configs/experiments/*.yaml; do $(BIN)/latentray run $$config || exit 1; done

clean-outputs:
	rm -rf outputs
