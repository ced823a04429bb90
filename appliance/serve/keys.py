"""API keys for `appliance serve`: one or more per tenant, shown once, kept only as a hash.

A key is ``apk-<tenant>-<43 random url-safe characters>`` (256 bits from ``secrets``). The workspace keeps
``serve/keys.json``: per key an id, its tenant, when it was made, whether it is revoked, and the SHA-256 of the
key. A key this random needs no slow password hash: no dictionary reaches it, and a fast hash lets the gateway
check every request in microseconds. Creation and revocation are audited (``serve.key.create``,
``serve.key.revoke``, with the key's id and tenant, never the key).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from pathlib import Path

from ..errors import InvalidInput, NotFound

_TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


def serve_dir() -> Path:
    """The workspace's ``serve/`` folder (keys, network policy, running servers), created on first use."""
    from ..workspace import home

    folder = home() / "serve"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _path() -> Path:
    return serve_dir() / "keys.json"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def check_tenant(name: str) -> str:
    if not _TENANT_RE.match(name or ""):
        raise InvalidInput(f"tenant {name!r} is not a valid name; use lower-case letters, digits, '_' and '-' "
                           "(at most 40, starting with a letter or digit).")
    return name


def _load() -> list[dict]:
    from ..workspace import read_json

    path = _path()
    if not path.is_file():
        return []
    try:
        data = read_json(path)
    except ValueError as e:
        raise InvalidInput(f"{path} is not valid JSON ({e}); restore it from a backup or remove it and create "
                           "the keys again.") from None
    return list(data.get("keys", []))


def _save(keys: list[dict]) -> None:
    from ..workspace import write_json

    write_json(_path(), {"format": 1, "keys": keys})
    _path().chmod(0o600)


def create(tenant: str) -> dict:
    """A new key for ``tenant``: the returned dict holds the key itself, which is never stored nor shown again."""
    from ..trust import audit

    check_tenant(tenant)
    key = f"apk-{tenant}-{secrets.token_urlsafe(32)}"
    entry = {"id": f"key-{secrets.token_hex(4)}", "tenant": tenant, "sha256": digest(key),
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "revoked": None}
    _save(_load() + [entry])
    audit.record("serve.key.create", subjects={"key": entry["id"]}, details={"tenant": tenant})
    return {**public(entry), "key": key}


def public(entry: dict) -> dict:
    return {k: entry[k] for k in ("id", "tenant", "created", "revoked")}


def listing() -> list[dict]:
    return [public(e) for e in _load()]


def revoke(which: str) -> list[dict]:
    """Revoke one key (by its id) or every key of a tenant (by the tenant's name); returns what was revoked."""
    from ..trust import audit

    keys = _load()
    hit = [e for e in keys if not e.get("revoked") and which in (e["id"], e["tenant"])]
    if not hit:
        raise NotFound(f"no active key has the id or tenant {which!r}; `appliance serve keys list` shows them.")
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for e in hit:
        e["revoked"] = now
    _save(keys)
    for e in hit:
        audit.record("serve.key.revoke", subjects={"key": e["id"]}, details={"tenant": e["tenant"]})
    return [public(e) for e in hit]


def active() -> dict[str, str]:
    """The active keys' hashes -> their tenant: what a server checks requests against."""
    return {e["sha256"]: e["tenant"] for e in _load() if not e.get("revoked")}


def active_ids() -> dict[str, tuple[str, str]]:
    """The active keys' hashes -> (tenant, key id): what a server checks requests against and records."""
    return {e["sha256"]: (e["tenant"], e["id"]) for e in _load() if not e.get("revoked")}


def tenants() -> list[str]:
    return sorted(set(active().values()))
