"""Artifact manifests: what a folder holds and where it came from, signed.

``manifest.json`` (format in docs/provenance-format.md) lists the sha256 of
every file of the artifact (all files of its folder but itself, or the files
named when it is written), the ids of the artifacts it was made from and the
sha256 of their manifests (so a parent cannot be swapped afterwards), the
appliance version, a hardware summary and the kind's own details; it is signed
with the appliance's Ed25519 key (``trust.signing``). ``trust.provenance``
checks a manifest and walks its lineage.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import CheckFailed, InvalidInput
from ..workspace import home, read_json, write_json
from . import keys, signing

NAME = "manifest.json"
DOMAIN = "appliance-manifest/1"
FORMAT = "appliance-manifest/1"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def files_in(root: Path, skip: str = NAME) -> list[str]:
    """Relative paths of the files under ``root`` (sorted, posix), leaving out those named ``skip``."""
    return [p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_file() and p.name != skip]


def file_hashes(root: Path, names: list[str] | None = None) -> dict[str, str]:
    names = files_in(root) if names is None else [n for n in names if (root / n).is_file() and Path(n).name != NAME]
    return {n: sha256_file(root / n) for n in names}


# Which folder a parent of each role lives in. Sub-artifacts of a run are named "<run>/<part>".
_ROLE_FOLDERS = {"dataset": "datasets", "base_model": "models", "model": "models", "run": "runs", "sft_run": "runs",
                 "adapter": "runs", "merged": "runs", "gguf": "runs", "adapter_gguf": "runs", "bundle": "bundles"}


def locate(role: str, artifact_id: str) -> Path | None:
    """The workspace folder of a parent artifact, or None if it is not an id of this workspace."""
    sub = _ROLE_FOLDERS.get(role.split(".")[0])  # "dataset.2": the second dataset of a mix
    if sub is None or not artifact_id or artifact_id.startswith("/") or ".." in artifact_id.split("/"):
        return None
    path = home() / sub / artifact_id
    return path if path.is_dir() else None


def write(root: Path, kind: str, artifact_id: str, parents: dict[str, str] | None = None,
          files: list[str] | None = None, *, hardware: dict, **details: Any) -> dict:
    """Write and sign ``root/manifest.json``; unlocks the vault first if this process cannot sign yet.
    ``hardware``: what made the artifact (``hardware.summary()``, passed in by the stage that made it)."""
    keys.ensure_signer()
    parents = parents or {}
    bound = {}
    for role, pid in parents.items():
        where = locate(role, pid)
        if where is not None and (where / NAME).is_file():
            bound[role] = sha256_file(where / NAME)
    manifest = {
        "format": FORMAT,
        "kind": kind,
        "id": artifact_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "appliance_version": __version__,
        "hardware": hardware,
        "parents": parents,
        "parent_manifests": bound,
        "files": file_hashes(root, files),
        "details": details,
    }
    manifest["signature"] = signing.sign(DOMAIN, manifest)
    write_json(root / NAME, manifest)
    return manifest


def read(root: Path) -> dict:
    path = root / NAME
    if not path.is_file():
        raise InvalidInput(f"{root} has no {NAME}; it is not an appliance artifact.")
    try:
        return read_json(path)
    except ValueError:
        raise CheckFailed(f"{path} is not valid JSON; the manifest was damaged or edited.") from None


def verify(root: Path, public_raw: bytes | None = None) -> dict:
    """Check the signature and recompute every hash; raise CheckFailed naming the first problem."""
    manifest = read(root)
    path = root / NAME
    public_raw = public_raw or signing.workspace_public()
    if public_raw is None:
        raise CheckFailed(f"cannot check the signature of {path}: no trusted public key here; pass --pubkey with the "
                          "appliance's signing-key.pub.")
    check_signature(manifest, public_raw, path)
    for rel, digest in manifest["files"].items():
        file = root / rel
        if not file.is_file():
            raise CheckFailed(f"{file} is listed in {path} but missing; the artifact is incomplete.")
        if sha256_file(file) != digest:
            raise CheckFailed(f"{file} does not match its sha256 in {path}; the file was changed or damaged.")
    if manifest.get("kind") in WHOLE_FOLDER_KINDS:
        extra = sorted(set(files_in(root)) - set(manifest["files"]))
        if extra:
            raise CheckFailed(f"{root / extra[0]} is not listed in {path}; a file was added to the artifact.")
    return manifest


def check_signature(manifest: object, public_raw: bytes, path: Path) -> None:
    """Raise CheckFailed unless ``manifest`` (as read from ``path``) carries a valid signature by ``public_raw``."""
    if not isinstance(manifest, dict) or "signature" not in manifest:
        raise CheckFailed(f"{path} is not signed; it was not written by a current appliance or its signature was removed.")
    body = {k: v for k, v in manifest.items() if k != "signature"}
    signing.check(DOMAIN, body, manifest["signature"], public_raw, str(path))


# Kinds whose manifest covers every file of their folder (a run's folder also holds live files: events, checkpoints).
WHOLE_FOLDER_KINDS = ("dataset", "model", "adapter", "full-model", "merged-model", "gguf", "adapter-gguf", "bundle")
