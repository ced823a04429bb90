"""Provenance: check an artifact's signed manifest and walk its lineage back through the workspace.

A GGUF names the merged model it was converted from, which names the adapter
and the base model, the adapter names its run, and the run names its dataset
and base model. Each manifest also records the sha256 of its parents'
manifests, so a parent replaced after the fact (even by a validly signed one)
breaks the chain. ``verify`` checks every link it can find here and says where
the lineage leaves the workspace (an edge box has only the bundle).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckFailed, InvalidInput
from . import manifest, signing


def artifact_root(path: Path) -> Path:
    """The artifact folder for PATH: the folder itself, or the folder of a file inside it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InvalidInput(f"{path} does not exist; name an artifact folder (or a file in one) to verify.")
    root = path if path.is_dir() else path.parent
    if not (root / manifest.NAME).is_file():
        raise InvalidInput(f"{root} holds no {manifest.NAME}; it is not an appliance artifact.")
    return root


def verify(path: Path, public_raw: bytes | None = None) -> dict:
    """Verify the artifact at ``path`` and every ancestor found here.

    Returns {"ok", "artifact", "lineage": [{role, id, path, kind, status, problem}]}; ``status`` is "ok", "bad"
    or "absent" (not in this workspace: the lineage stops there, which is not a failure).
    """
    root = artifact_root(path)
    public_raw = public_raw or signing.workspace_public()
    if public_raw is None:
        raise InvalidInput("no trusted public key: this machine has no vault; pass --pubkey with the appliance's "
                           "signing-key.pub (a bundle carries one).")
    lineage: list[dict] = []
    top = _check(root, public_raw)
    if Path(path).is_file() and top["status"] == "ok":
        rel = Path(path).resolve().relative_to(root.resolve()).as_posix()
        if rel != manifest.NAME and rel not in top["manifest"]["files"]:
            top.update(status="bad", problem=f"{path} is not listed in {root / manifest.NAME}.")
    lineage.append({"role": "artifact", **_public(top)})
    seen = {root.resolve()}
    queue = [top]
    while queue:
        node = queue.pop(0)
        if node["status"] != "ok":
            continue
        m = node["manifest"]
        for role, pid in sorted(m.get("parents", {}).items()):
            where = manifest.locate(role, pid)
            if where is None or not (where / manifest.NAME).is_file():
                lineage.append({"role": role, "id": pid, "path": None, "kind": None, "status": "absent",
                                "problem": f"{role} {pid} is not in this workspace; the lineage stops here."})
                continue
            if where.resolve() in seen:
                continue
            seen.add(where.resolve())
            child = _check(where, public_raw)
            recorded = m.get("parent_manifests", {}).get(role)
            if child["status"] == "ok" and recorded and manifest.sha256_file(where / manifest.NAME) != recorded:
                child.update(status="bad", problem=f"the manifest of {role} {pid} changed after {m['kind']} {m['id']} "
                                                   "was made from it; the parent was replaced.")
            lineage.append({"role": role, **_public(child)})
            queue.append(child)
    ok = all(item["status"] != "bad" for item in lineage)
    return {"ok": ok, "artifact": str(root), "key": signing.fingerprint(public_raw), "lineage": lineage}


def _check(root: Path, public_raw: bytes) -> dict:
    try:
        m = manifest.verify(root, public_raw)
        return {"path": str(root), "manifest": m, "id": m.get("id"), "kind": m.get("kind"), "status": "ok",
                "problem": None}
    except (CheckFailed, InvalidInput) as e:
        raw = {}
        try:
            raw = manifest.read(root)
        except Exception:
            pass
        return {"path": str(root), "manifest": raw, "id": raw.get("id") if isinstance(raw, dict) else None,
                "kind": raw.get("kind") if isinstance(raw, dict) else None, "status": "bad", "problem": str(e)}


def _public(node: dict) -> dict:
    return {k: node[k] for k in ("id", "kind", "path", "status", "problem")}
