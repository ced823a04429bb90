#!/usr/bin/env bash
# The connected side: build the offline install bundle in one command.
#
#   packaging/build-bundle.sh --target cpu|cuda --out DIR [--signing-key FILE]
#
# Wheelhouse of every dependency (CPU or CUDA torch), requirements.txt with hashes, CycloneDX SBOM,
# SHA256SUMS and its Ed25519 signature; prints the signing key's fingerprint. See build_bundle.py.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec "${PYTHON:-python3}" "$here/build_bundle.py" "$@"
