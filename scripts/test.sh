#!/usr/bin/env bash
# One command: set everything up, then run the whole test suite (unit, integration on a tiny model,
# end-to-end on the embedded default model).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Headless Chromium, for the test that opens eval.html with no network: Debian's package. Required: where it
# cannot be installed, that test fails (it never skips).
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
      || echo "error: could not install chromium; the eval.html browser test will fail" >&2
  else
    echo "error: chromium is missing and this is not a root Debian machine; install it, or the eval.html test fails" >&2
  fi
fi
started=$(date +%s)
.venv/bin/python -m pytest --durations=25 "$@"
echo "test command: the suite took $(( $(date +%s) - started )) s" >&2
# The whole suite (no arguments): the tests that run llama.cpp once more on its baseline x64 kernels (the slowest and
# oldest), so a test whose verdict depends on the CPU's kernels fails here too (issue 33).
if [ $# -eq 0 ] && [ "${APPLIANCE_TEST_X64:-1}" != 0 ]; then
  APPLIANCE_LLAMA_CPU=x64 .venv/bin/python -m pytest -m "llama and not e2e" --durations=10 -p no:cacheprovider
  echo "test command: $(( $(date +%s) - started )) s in all" >&2
fi
