#!/usr/bin/env bash
# The isolated side: verify an offline install bundle, install it into a fresh virtual environment
# with pip's network off, and run `appliance doctor`.
#
#   airgap/install.sh BUNDLE_DIR [--venv DIR] [--pubkey FILE | --fingerprint HEX] [--python PY]
#
# Needs only a Python 3 with the standard library (the interpreter the bundle was built for, or
# another given with --python / $PYTHON). See install_bundle.py and verify_bundle.py.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec "${PYTHON:-python3}" "$here/install_bundle.py" "$@"
