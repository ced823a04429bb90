#!/usr/bin/env bash
# One command: set everything up, then run the whole pipeline on the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/appliance demo "$@"
