"""Artifact manifests: what a folder holds and where it came from.

``manifest.json`` lists the sha256 of every file in the artifact's folder
(except itself), the ids of the artifacts it was made from, and the appliance
version. ``verify`` recomputes the hashes. Signatures arrive with the audit
issue; the layout leaves room for them.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from . import __version__
from .errors import CheckFailed
from .workspace import read_json, write_json

NAME = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != NAME
    }


def write(root: Path, kind: str, artifact_id: str, parents: dict[str, str] | None = None, **details: Any) -> dict:
    manifest = {
        "kind": kind,
        "id": artifact_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "appliance_version": __version__,
        "parents": parents or {},
        "files": file_hashes(root),
        "details": details,
    }
    write_json(root / NAME, manifest)
    return manifest


def read(root: Path) -> dict:
    return read_json(root / NAME)


def verify(root: Path) -> dict:
    """Recompute every hash; raise CheckFailed naming the first mismatch."""
    manifest = read(root)
    actual = file_hashes(root)
    for rel, digest in manifest["files"].items():
        if rel not in actual:
            raise CheckFailed(f"{root / rel} is listed in {root / NAME} but missing; the artifact is incomplete.")
        if actual[rel] != digest:
            raise CheckFailed(f"{root / rel} does not match its sha256 in {root / NAME}; the file was changed or damaged.")
    return manifest
