"""Reading a dataset's splits as canonical chat conversations.

``load_split`` is the one door through which training, evaluation and export
read dataset text. A dataset is a folder: an encrypted vault dataset
(``datasets/<id>/`` with ``train.c2sp``...; decrypted in memory with the
dataset's key) or, for a user's own scratch data, a folder of plain
``train.jsonl``, ``validation.jsonl`` and optionally ``test.jsonl``.

Three splits: train, validation (early stopping, checkpoint choice, merge and
export checks) and test (only the final evaluation). A dataset without a test
split (imported before there was one, or a folder without ``test.jsonl``) has
its validation split serve as test, and the evaluation report says so.

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
SPLITS = ("train", "validation", "test")


def show(name: str, split: str, n: int) -> list[dict]:
    """Decrypt the first ``n`` records of a split (or the import report, split "report") for a person to read."""
    import itertools

    from .trust import audit, store

    records = list(itertools.islice(store.read(vault(), name, split), max(n, 0)))
    audit.record("dataset.show", {"dataset": name}, {"split": split, "records": len(records)})
    return records


def export_plain(name: str, splits: list[str] | None, out: Path) -> int:
    """Write a dataset's records (of ``splits``, or all it has) as plaintext JSONL to ``out``, a new file the
    user named; return the count."""
    from .trust import audit, manifest, store
    from .workspace import atomic_writer

    out = Path(out).expanduser()
    if out.exists():
        raise InvalidInput(f"{out} already exists; name a new file for the plaintext export.")
    key = vault()
    if splits is None:
        records = manifest.read(store.dataset_dir(name))["details"].get("records", {})
        splits = [s for s in SPLITS if records.get(s)]
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


def mixed_train(mix: list[tuple[Path, float]], seed: int) -> tuple[list[dict], list[dict]]:
    """The training examples of a mix, and how many came from each dataset.

    The first dataset (the domain data) is used once, whole; each other one adds ``weight`` of the total, drawn
    without replacement (whole passes first when it has fewer records than its share), seeded. datasets'
    ``interleave_datasets`` stops at the first or at the last exhausted dataset, which either cuts the domain data
    short or repeats it many times over when the general set is large."""
    import random

    first, w0 = mix[0]
    out = load_split(first, "train")
    counts = [{"dataset": first.name, "weight": round(w0, 6), "examples": len(out)}]
    total = round(len(out) / w0)
    rng = random.Random(seed)
    for path, weight in mix[1:]:
        records = load_split(path, "train")
        whole, rest = divmod(round(total * weight), len(records))
        picked = records * whole + rng.sample(records, rest)
        counts.append({"dataset": path.name, "weight": round(weight, 6), "examples": len(picked)})
        out += picked
    if len(mix) > 1:
        rng.shuffle(out)
    return out, counts


def stats(dataset: Path) -> dict[str, dict[str, int]]:
    """Per split, {records, bytes} without decrypting anything (no passphrase needed): what the plan's checks and
    duration estimate use. An encrypted dataset's counts are in its signed manifest, and its ciphertext is the
    plaintext's size to within 0.1% (a 16-byte tag per 16 KiB chunk); a plain folder's lines are counted."""
    from .trust import manifest, store

    out = {}
    if is_encrypted(dataset):
        records = manifest.read(dataset)["details"].get("records", {})
        for split in SPLITS:
            path = dataset / f"{split}{store.SUFFIX}"
            out[split] = {"records": int(records.get(split, 0)), "bytes": path.stat().st_size if path.is_file() else 0}
        return out
    for split in SPLITS:
        path = dataset / f"{split}.jsonl"
        n = 0
        if path.is_file():
            with open(path, "rb") as f:
                n = sum(1 for line in f if line.strip())
        out[split] = {"records": n, "bytes": path.stat().st_size if path.is_file() else 0}
    return out


def test_split(dataset: Path) -> str:
    """The split the final evaluation reads: "test", or "validation" where the dataset has no test records (its
    manifest's count, or a non-empty test.jsonl: nothing else is read)."""
    from .trust import manifest

    if is_encrypted(dataset):
        has = manifest.read(dataset)["details"].get("records", {}).get("test", 0) > 0
    else:
        path = dataset / "test.jsonl"
        has = False
        if path.is_file():
            with open(path, "rb") as f:
                has = any(line.strip() for line in f)
    return "test" if has else "validation"


def load_split(dataset: Path, split: str) -> list[dict]:
    records = _read(dataset, split)
    if is_encrypted(dataset) and "messages" not in records[0][1]:
        raise InvalidInput(f"dataset {dataset.name} holds preference pairs; supervised fine-tuning needs "
                           "conversations: train on it with method: dpo, or name a conversation dataset.")
    return [_check(raw, where) for where, raw in records]


def _read(dataset: Path, split: str) -> list[tuple[str, object]]:
    """(where, raw record) of every record of a split: decrypted from the vault, or parsed from a folder's JSONL."""
    if split not in SPLITS:
        raise InvalidInput(f"unknown split {split!r}; use one of {', '.join(SPLITS)}.")
    if is_encrypted(dataset):
        from .trust import store

        records = [(f"dataset {dataset.name}, {split} record {i}", r)
                   for i, r in enumerate(store.read(vault(), dataset.name, split))]
        if not records:
            raise InvalidInput(f"dataset {dataset.name} has no {split} records; re-import it with a --split that "
                               f"gives {split} a share, e.g. 80/10/10.")
        return records
    path = dataset / f"{split}.jsonl"
    if not path.is_file():
        raise NotFound(f"dataset split {path} does not exist; a dataset folder needs train.jsonl and validation.jsonl "
                       "(test.jsonl is optional).")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise InvalidInput(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); fix or remove that line.") from None
    if not records:
        raise InvalidInput(f"{path} holds no records; a split needs at least one conversation.")
    return records


def heldout(recipe, n: int | None = None, split: str = "validation") -> list[list[dict]]:
    """The run's held-out conversations (a split of the first dataset, validation unless told): a preference pair
    counts as its prompt answered with the chosen answer. What merge checks and export proves parity on
    (validation), and what eval answers (test)."""
    if recipe.method == "dpo":
        pairs = load_pairs(recipe.dataset_path(), split)[:n]
        return [[*p["prompt"], {"role": "assistant", "content": p["chosen"]}] for p in pairs]
    return [r["messages"] for r in load_split(recipe.dataset_path(), split)[:n]]


def load_pairs(dataset: Path, split: str) -> list[dict]:
    """Preference pairs, ``{"prompt": [turns...], "chosen": text, "rejected": text}``, for DPO: from a vault
    dataset imported with ``--format dpo``, or a folder's JSONL (prompt as text or turns)."""
    return [_pair(raw, where) for where, raw in _read(dataset, split)]


def _pair(raw: object, where: str) -> dict:
    if not isinstance(raw, dict) or not {"prompt", "chosen", "rejected"} <= set(raw):
        raise InvalidInput(f"{where}: a preference pair needs 'prompt', 'chosen' and 'rejected'; DPO trains on pairs "
                           "(import them with --format dpo), or use method: sft for conversations.")
    prompt = raw["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    turns = _check({"messages": [*prompt, {"role": "assistant", "content": "-"}]}, where)["messages"][:-1]
    if turns[-1]["role"] != "user":
        raise InvalidInput(f"{where}: the prompt's last turn must be the user's, which chosen and rejected answer.")
    for key in ("chosen", "rejected"):
        if not isinstance(raw[key], str) or not raw[key].strip():
            raise InvalidInput(f"{where}: field '{key}' must be non-empty text.")
    return {"prompt": turns, "chosen": raw["chosen"], "rejected": raw["rejected"]}


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
