#!/usr/bin/env bash
# Prepare one TPU VM host: a venv in the repo (.venv), the project requirements, then JAX for TPU
# (last, so libtpu matches the installed jax). `tpu/launch.sh setup` runs this on every host.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup.sh: $PYTHON is $("$PYTHON" --version 2>&1); jax>=0.10 needs Python >= 3.11." >&2
  echo "Install one (e.g. 'sudo apt-get install -y python3.11 python3.11-venv') and rerun with PYTHON=python3.11." >&2
  exit 1
fi

"$PYTHON" -m venv "$VENV"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
python -m pip install -q -U pip
python -m pip install -q -r requirements.txt
python -m pip install -q -U "jax[tpu]"
python -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__)'
