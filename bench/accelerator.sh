#!/usr/bin/env bash
# The accelerator half of `make bench`, as one command for a machine that already has JAX with its GPU
# plugin (and flax, optax, orbax, numpy, matplotlib) but cannot install packages: the lab's other
# pure-Python needs travel as wheels in .whl/ (`make device-wheels` fetches them on a machine that can).
# Runs the matmul peak, the three default models (lab vs the minimal JAX step) and 1..256 vmapped
# singh_fewshot runs with XLA's memory for each; writes bench/results.json (and copies it to $OUT when set).
#   bash bench/accelerator.sh [SECONDS] [--runs 1,16,64,256]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lab-site .whl/*.whl
  export PYTHONPATH=/tmp/lab-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
SECONDS_EACH=${1:-2}
shift || true
"$PY" bench/run.py "$SECONDS_EACH" peak models vmapped "$@"
if [ -n "${OUT:-}" ]; then cp bench/results.json "$OUT/"; fi
