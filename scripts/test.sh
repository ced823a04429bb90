#!/usr/bin/env bash
# One command: set everything up, then run the whole test suite (unit, integration on a tiny model,
# end-to-end on the embedded default model).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Headless Chromium, for the test that opens eval.html with no network: Debian's package (root only; the test
# says it skipped where this could not install it).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
    || echo "warning: could not install chromium; the eval.html browser test will skip" >&2
fi
exec .venv/bin/python -m pytest "$@"
