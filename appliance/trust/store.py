"""Encrypted datasets: ``datasets/<id>/`` holds one chunked-encryption message per file.

Each file's plaintext is UTF-8 JSON Lines, one canonical record per line. Its
context is ``"appliance-dataset/1" 0x00 <dataset id> 0x00 <file name>``, so a
file moved to another dataset, renamed to another split, or replayed from
another version fails the key-commitment check before anything is decrypted.
``manifest.json`` beside them holds only what is safe in the clear: the sha256
of each ciphertext and record counts. A dataset's data key lives in the keyring;
removing it crypto-shreds the dataset.

Records stream in both directions: writing encrypts as it goes, reading
decrypts one 16 KiB chunk at a time, so memory does not grow with the dataset.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import CheckFailed, InvalidInput, NotFound
from ..workspace import check_id, folder, staging
from . import chunked, manifest
from .keyring import Unlocked

FORMAT = "appliance-dataset/1"
SUFFIX = ".c2sp"


def context(dataset_id: str, name: str) -> bytes:
    return FORMAT.encode() + b"\x00" + dataset_id.encode() + b"\x00" + name.encode()


def dataset_dir(dataset_id: str) -> Path:
    return folder("datasets") / dataset_id


def is_encrypted(path: Path) -> bool:
    m = path / manifest.NAME
    return m.is_file() and manifest.read(path)["details"].get("format") == FORMAT


def write(vault: Unlocked, dataset_id: str, files: dict[str, Iterable[dict]], *, hardware: dict, **details) -> dict:
    """Encrypt ``files`` (name -> records) into a new dataset folder; all or nothing. ``hardware``: the machine
    that made it, for the manifest (``hardware.summary()``, from the caller)."""
    with create(vault, dataset_id, hardware=hardware) as ds:
        for name, records in files.items():
            for record in records:
                ds.add(name, record)
        ds.details.update(details)
    return ds.manifest


class DatasetWriter:
    """Records go in through ``add(name, record)``, encrypted as they arrive into one file per name; or a file
    already encrypted under this dataset's key through ``adopt`` (a dataset package's)."""

    def __init__(self, key: bytes, dataset_id: str, root: Path):
        self._key, self._id, self._root = key, dataset_id, root
        self._files: dict[str, tuple] = {}
        self.counts: dict[str, int] = {}
        self.details: dict = {}
        self.manifest: dict = {}

    def add(self, name: str, record: dict) -> None:
        if name not in self._files:
            f = open(self._root / f"{name}{SUFFIX}", "wb")
            enc = chunked.Encryptor(self._key, context(self._id, name))
            f.write(enc.header)
            self._files[name] = (f, enc)
            self.counts[name] = 0
        f, enc = self._files[name]
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
        f.write(enc.update(line.encode("utf-8")))
        self.counts[name] += 1

    def adopt(self, name: str, ciphertext: Path, records: int) -> None:
        shutil.copyfile(ciphertext, self._root / f"{name}{SUFFIX}")
        self.counts[name] = records

    def _close(self, ok: bool) -> None:
        for f, enc in self._files.values():
            if ok:
                f.write(enc.finalize())
            f.close()


@contextlib.contextmanager
def create(vault: Unlocked, dataset_id: str, *, hardware: dict, key: bytes | None = None) -> Iterator[DatasetWriter]:
    """A new encrypted dataset, published only if the block completes: no folder and no key otherwise. ``key``:
    the data key a dataset package brought (a new random one otherwise)."""
    check_id(dataset_id, "dataset name")
    final = dataset_dir(dataset_id)
    if final.exists():
        raise InvalidInput(f"a dataset named {dataset_id!r} already exists; choose another --name or remove it first.")
    key = vault.add_key(dataset_id, key)
    try:
        with staging(final) as tmp:
            writer = DatasetWriter(key, dataset_id, tmp)
            try:
                yield writer
            except BaseException:
                writer._close(ok=False)
                raise
            writer._close(ok=True)
            writer.manifest = manifest.write(tmp, "dataset", dataset_id, format=FORMAT, records=writer.counts,
                                             hardware=hardware, **writer.details)
    except BaseException:
        vault.destroy_key(dataset_id)  # nothing half-imported
        raise


def read(vault, dataset_id: str, name: str) -> Iterator[dict]:
    """Stream the records of one file, decrypting as it goes."""
    path = dataset_dir(dataset_id) / f"{name}{SUFFIX}"
    if not (dataset_dir(dataset_id) / manifest.NAME).is_file():
        raise NotFound(f"no dataset named {dataset_id!r}; `appliance data list` shows them.")
    if not path.is_file():
        raise NotFound(f"dataset {dataset_id!r} has no {name!r} file ({path}).")
    yield from records(vault.data_key(dataset_id), dataset_id, name, path)


def write_derived(vault, dataset_id: str, path: Path, name: str, records: Iterable[dict]) -> None:
    """Records derived from a dataset's text (a run's answers to its test prompts), encrypted with that dataset's
    key to ``path`` (atomically), bound by their context to the dataset and ``name``: crypto-shredding the
    dataset makes them unreadable too."""
    from ..workspace import atomic_writer

    enc = chunked.Encryptor(vault.data_key(dataset_id), context(dataset_id, name))
    with atomic_writer(path) as f:
        f.write(enc.header)
        for record in records:
            f.write(enc.update((json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")))
        f.write(enc.finalize())


def read_derived(vault, dataset_id: str, path: Path, name: str) -> Iterator[dict]:
    yield from records(vault.data_key(dataset_id), dataset_id, name, path)


def records(key: bytes, dataset_id: str, name: str, path: Path) -> Iterator[dict]:
    """The records of the file ``path``, encrypted under ``key`` with the context of ``dataset_id`` and ``name``,
    each chunk authenticated as it is decrypted (in memory); CheckFailed naming the file at the first that is not."""
    with open(path, "rb") as f:
        reader = chunked.DecryptingReader(key, f, context(dataset_id, name))
        try:
            yield from _lines(reader)
        except chunked.DecryptionError as e:
            raise CheckFailed(f"{path} does not authenticate ({e}); the file was damaged or replaced.") from None


def verify(vault: Unlocked) -> list[dict]:
    """Authenticate every file of every dataset; one entry per dataset with its problems (empty when sound)."""
    report = []
    ids = sorted(set(vault.data["keys"]) | {p.name for p in folder("datasets").iterdir() if is_encrypted(p)})
    for dataset_id in ids:
        problems: list[str] = []
        root = dataset_dir(dataset_id)
        if dataset_id not in vault.data["keys"]:
            problems.append("its key is not in the keyring (deleted?): the files cannot be decrypted")
        elif not (root / manifest.NAME).is_file():
            problems.append(f"the keyring holds a key but {root} has no manifest: the files are missing")
        else:
            m = manifest.read(root)
            for rel, digest in m["files"].items():
                path = root / rel
                if not path.is_file():
                    problems.append(f"{rel} is missing")
                    continue
                if manifest.sha256_file(path) != digest:
                    problems.append(f"{rel} does not match its sha256 in the manifest")
                if rel.endswith(SUFFIX):
                    name = rel[: -len(SUFFIX)]
                    try:
                        n = sum(1 for _ in read(vault, dataset_id, name))
                    except CheckFailed as e:
                        problems.append(str(e))
                        continue
                    if n != m["details"]["records"].get(name):
                        problems.append(f"{rel} holds {n} records, the manifest says {m['details']['records'].get(name)}")
        report.append({"dataset": dataset_id, "ok": not problems, "problems": problems})
    return report


def remove(vault: Unlocked, dataset_id: str) -> None:
    """Crypto-shred: destroy the wrapped key first (the data is unreadable from then on), then the files."""
    had_key = vault.destroy_key(dataset_id)
    root = dataset_dir(dataset_id)
    if not had_key and not root.exists():
        raise NotFound(f"no dataset named {dataset_id!r}; `appliance vault status` lists them.")
    shutil.rmtree(root, ignore_errors=True)
    from . import audit

    audit.record("dataset.delete", {"dataset": dataset_id}, {"key_destroyed": had_key})


def _lines(reader: chunked.DecryptingReader) -> Iterator[dict]:
    pending = b""
    while block := reader.read(1 << 16):
        pending += block
        *complete, pending = pending.split(b"\n")
        for line in complete:
            if line:
                yield json.loads(line)
    if pending:
        yield json.loads(pending)
