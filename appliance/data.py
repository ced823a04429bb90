"""Reading a dataset's splits as canonical chat conversations.

``load_split`` is the one door through which training, evaluation and export
read dataset text. A dataset is a folder: an encrypted vault dataset
(``datasets/<id>/`` with ``train.c2sp``...; decrypted in memory with the
dataset's key) or, for a user's own scratch data, a folder of plain
``train.jsonl`` and ``validation.jsonl``.

The key comes from the process's vault (``trust.keys``): unlocked once on
first use, or, in a training child, handed over by its parent.

Canonical record: ``{"messages": [{"role": ..., "content": ...}, ...]}`` with
roles system/user/assistant, ending with an assistant turn.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import InvalidInput, NotFound
from .trust.keys import vault

ROLES = ("system", "user", "assistant")
SPLITS = ("train", "validation")


def show(name: str, split: str, n: int) -> list[dict]:
    """Decrypt the first ``n`` records of a split (or the import report, split "report") for a person to read."""
    import itertools

    from .trust import audit, store

    records = list(itertools.islice(store.read(vault(), name, split), max(n, 0)))
    audit.record("dataset.show", {"dataset": name}, {"split": split, "records": len(records)})
    return records


def export_plain(name: str, splits: list[str], out: Path) -> int:
    """Write a dataset's records as plaintext JSONL to ``out``, a new file the user named; return the count."""
    from .trust import audit, store
    from .workspace import atomic_writer

    out = Path(out).expanduser()
    if out.exists():
        raise InvalidInput(f"{out} already exists; name a new file for the plaintext export.")
    key = vault()
    n = 0
    with atomic_writer(out) as f:
        for split in splits:
            for record in store.read(key, name, split):
                f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
                n += 1
    audit.record("dataset.export", {"dataset": name}, {"splits": splits, "records": n, "out": str(out.resolve())})
    return n


def is_encrypted(dataset: Path) -> bool:
    from .trust import store

    return store.is_encrypted(dataset)


def data_keys(dataset: Path) -> dict[str, bytes]:
    """The keys a child process needs to read ``dataset`` (none for a plain folder)."""
    return {dataset.name: vault().data_key(dataset.name)} if is_encrypted(dataset) else {}


def load_split(dataset: Path, split: str) -> list[dict]:
    if split not in SPLITS:
        raise InvalidInput(f"unknown split {split!r}; use one of {', '.join(SPLITS)}.")
    if is_encrypted(dataset):
        from .trust import store

        records = [_check(r, f"dataset {dataset.name}, {split} record {i}")
                   for i, r in enumerate(store.read(vault(), dataset.name, split))]
        if not records:
            raise InvalidInput(f"dataset {dataset.name} has no {split} records; re-import it with a --val-ratio above 0.")
        if "messages" not in records[0]:
            raise InvalidInput(f"dataset {dataset.name} holds preference pairs; supervised fine-tuning needs conversations.")
        return records
    path = dataset / f"{split}.jsonl"
    if not path.is_file():
        raise NotFound(f"dataset split {path} does not exist; a dataset folder needs train.jsonl and validation.jsonl.")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidInput(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); fix or remove that line.") from None
            records.append(_check(raw, f"{path}:{lineno}"))
    if not records:
        raise InvalidInput(f"{path} holds no records; a split needs at least one conversation.")
    return records


def _check(raw: object, where: str) -> dict:
    if not isinstance(raw, dict) or not isinstance(raw.get("messages"), list) or not raw["messages"]:
        raise InvalidInput(f"{where}: field 'messages' must be a non-empty list of {{role, content}} turns.")
    messages = []
    for i, turn in enumerate(raw["messages"]):
        if not isinstance(turn, dict):
            raise InvalidInput(f"{where}: messages[{i}] must be an object with 'role' and 'content'.")
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise InvalidInput(f"{where}: messages[{i}].role is {role!r}; use one of {', '.join(ROLES)}.")
        if not isinstance(content, str) or not content.strip():
            raise InvalidInput(f"{where}: messages[{i}].content must be non-empty text.")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise InvalidInput(f"{where}: the last turn must be the assistant's answer to train on.")
    return {"messages": messages}
