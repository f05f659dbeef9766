#!/usr/bin/env bash
# Refresh locks/*.txt: build each environment afresh from pyproject.toml's ranges (the newest
# releases that satisfy them; torch 2.13.0 first, as the Makefile does), then freeze it.
# `make lock` runs this; review the diff, run `make test`, commit locks/.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/latentray-lock.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
pip_in() { "$WORK/$1/bin/python" -m pip --disable-pip-version-check -q "${@:2}"; }

freeze() {  # environment, its name in the project, the extras, the lock's name
  {
    echo "# The exact environment of $2: latentray[$3] on Python 3.11, torch 2.13.0"
    echo "# (CPU build here; a CUDA build of 2.13.0 satisfies the pin). Installed with --no-deps;"
    echo "# refreshed by \`make lock\` (see README: Environments). Do not edit by hand."
    "$WORK/$1/bin/python" -m pip freeze --exclude-editable | sed 's/^torch==2.13.0+cpu$/torch==2.13.0/'
  } > "locks/$4.txt"
}

DRIVER_EXTRAS=models,metatomic,orb,uma,test
"$PYTHON" -m venv "$WORK/driver"
pip_in driver install torch==2.13.0
pip_in driver install -e ".[$DRIVER_EXTRAS]"
freeze driver .venv "$DRIVER_EXTRAS" driver
RAY=$("$WORK/driver/bin/python" -c 'import ray; print(ray.__version__)')

# the family environments (see the Makefile for why each is separate), with the driver's Ray
for family in mace mattersim diep; do
  "$PYTHON" -m venv "$WORK/$family"
  pip_in "$family" install torch==2.13.0
  pip_in "$family" install -e ".[$family]" "ray[default]==$RAY"
  # mattersim's metadata asks for torchvision and torchaudio, which it never imports and
  # whose PyPI builds do not load beside this torch
  pip_in "$family" uninstall -y torchvision torchaudio
  freeze "$family" ".venv-$family" "$family" "$family"
done
# hienet: torch-scatter is a source archive whose build imports torch: built against this
# environment's torch (no build isolation) into .wheels/, as the Makefile builds it
"$PYTHON" -m venv "$WORK/hienet"
pip_in hienet install torch==2.13.0 wheel  # wheel: bdist_wheel for the venv's setuptools
pip_in hienet wheel --no-build-isolation --no-deps torch-scatter -w .wheels
pip_in hienet install --find-links .wheels -e ".[hienet]" "ray[default]==$RAY"
freeze hienet .venv-hienet hienet hienet
echo "locks/ refreshed from pyproject.toml: review 'git diff locks/'"
