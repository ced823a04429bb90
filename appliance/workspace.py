"""The workspace: one folder, ``APPLIANCE_HOME``, that holds everything.

Layout (see docs/workspace.md)::

    models/<id>/     imported base models
    datasets/<id>/   datasets
    runs/<id>/       training runs and everything derived from them
    bundles/<id>/    edge bundles
    audit/           the audit log

Every artifact is written under a temporary name in the same folder and renamed
into place only when complete, so a final name never holds half an artifact.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from .errors import InvalidInput

KINDS = ("models", "datasets", "runs", "bundles", "audit")
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,79}$")


def default_home() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(xdg) / "appliance"


def home() -> Path:
    """The workspace root, created on first use."""
    root = Path(os.environ.get("APPLIANCE_HOME") or default_home()).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def folder(kind: str) -> Path:
    assert kind in KINDS, kind
    path = home() / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def slug(text: str) -> str:
    """A lower-case id made of letters, digits, '.', '_' and '-'."""
    s = re.sub(r"[^a-z0-9._-]+", "-", text.strip().lower()).strip("-._")
    return s[:80] or "unnamed"


def check_id(value: str, what: str) -> str:
    if not _ID_RE.match(value):
        raise InvalidInput(
            f"{what} {value!r} is not a valid id; use lower-case letters, digits, '.', '_' and '-' (at most 80)."
        )
    return value


@contextlib.contextmanager
def staging(final: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a fresh folder beside ``final``; rename it to ``final`` on success.

    On any exception the staging folder is removed, so nothing half-written
    ever appears under the final name. With ``replace``, an existing ``final``
    is swapped out only once the new folder is complete, so a failed redo
    keeps the previous artifact.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if replace and final.exists():
            old = final.with_name(f".old-{final.name}-{secrets.token_hex(4)}")
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """A binary file that appears under ``path`` only once written whole (temporary name, fsync, rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        fault_point(f"before_replace:{path.name}")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        fault_point(f"after_replace:{path.name}")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def keyring_file() -> Path:
    """The vault's keyring: wrapped data keys, KDF parameters, the wrapped signing key and its public half."""
    return home() / "keyring.json"


def fault_point(name: str) -> None:
    """Test-only: ``APPLIANCE_FAULT=kill_at:<name>`` kills this process with SIGKILL here, a crash at a chosen
    point rather than after a guessed delay (e.g. ``kill_at:before_replace:keyring.json``)."""
    if os.environ.get("APPLIANCE_FAULT") == f"kill_at:{name}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a file so that readers see either the old or the new content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def new_id(prefix: str) -> str:
    import time

    return f"{slug(prefix)}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(Path(dirpath))
