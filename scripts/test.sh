#!/usr/bin/env bash
# One command: set everything up, then run the whole test suite (unit, integration on a tiny model,
# end-to-end on the embedded default model).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
