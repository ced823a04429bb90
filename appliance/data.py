"""Reading a dataset's splits as canonical chat conversations.

``load_split`` is the one door through which training, evaluation and export
read dataset text. Today it reads a folder of plain JSONL files (the demo's);
the encrypted vault replaces its body, and nothing else changes.

Canonical record: ``{"messages": [{"role": ..., "content": ...}, ...]}`` with
roles system/user/assistant, ending with an assistant turn.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import InvalidInput, NotFound

ROLES = ("system", "user", "assistant")
SPLITS = ("train", "validation")


def load_split(dataset: Path, split: str) -> list[dict]:
    if split not in SPLITS:
        raise InvalidInput(f"unknown split {split!r}; use one of {', '.join(SPLITS)}.")
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
