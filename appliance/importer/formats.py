"""Record formats and their normalization to the one canonical shape.

Canonical shapes (docs/vault-format.md):

* conversations: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
  ending with an assistant turn;
* preference pairs: ``{"prompt": [messages...], "chosen": str, "rejected": str}``.

Accepted inputs, detected from the keys of the first records:

=========== =====================================================================
chat        ``{"messages": [{"role", "content"}, ...]}`` (OpenAI style)
sharegpt    ``{"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}``
alpaca      ``{"instruction", "input"?, "output", "system"?}``
completion  ``{"prompt", "completion"}``
dpo         ``{"prompt", "chosen", "rejected"}`` (prompt: text or messages)
=========== =====================================================================

``normalize`` never raises for a bad record: it returns a Rejection naming the
field, so an import can report every rejected record and go on.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

FORMATS = ("chat", "sharegpt", "alpaca", "completion", "dpo")
ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


@dataclass
class Rejection:
    reason: str  # a key of REASONS
    field: str
    detail: str


REASONS = {
    "invalid": "malformed record (missing field, wrong type, not JSON)",
    "empty_turn": "a turn with no text",
    "unknown_role": "a role other than system, user or assistant",
    "exact_duplicate": "an exact duplicate of an earlier record",
    "near_duplicate": "a near-duplicate of an earlier record",
    "too_short": "fewer tokens than the minimum",
    "conflicting_answers": "the same prompt with different answers",
}


def detect(values: list) -> str | None:
    """The format most of the first records look like, or None."""
    votes = Counter(_looks_like(v) for v in values if isinstance(v, dict))
    votes.pop(None, None)
    return votes.most_common(1)[0][0] if votes else None


def _looks_like(v: dict) -> str | None:
    keys = set(v)
    if "messages" in keys:
        return "chat"
    if "conversations" in keys:
        return "sharegpt"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "dpo"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "completion"
    return None


def is_preference(fmt: str) -> bool:
    return fmt == "dpo"


def normalize(fmt: str, value: object) -> dict | Rejection:
    if not isinstance(value, dict):
        return Rejection("invalid", "", f"a record must be an object, not {type(value).__name__}")
    try:
        return _NORMALIZERS[fmt](value)
    except _Reject as r:
        return r.rejection


class _Reject(Exception):
    def __init__(self, reason: str, field: str, detail: str):
        self.rejection = Rejection(reason, field, detail)


def _text(value: dict, field: str, optional: bool = False) -> str:
    if field not in value or value[field] is None:
        if optional:
            return ""
        raise _Reject("invalid", field, f"field {field!r} is missing")
    text = value[field]
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str):
        raise _Reject("invalid", field, f"field {field!r} must be text, not {type(text).__name__}")
    return text


def _turns(messages: object, field: str, role_key: str, text_key: str, roles: dict | None = None) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise _Reject("invalid", field, f"field {field!r} must be a non-empty list of turns")
    out = []
    for i, turn in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise _Reject("invalid", where, "a turn must be an object")
        role = turn.get(role_key)
        role = roles.get(role, role) if roles and isinstance(role, str) else role
        if role not in ROLES:
            raise _Reject("unknown_role", f"{where}.{role_key}", f"role {turn.get(role_key)!r} is not system, user or assistant")
        content = turn.get(text_key)
        if not isinstance(content, str):
            raise _Reject("invalid", f"{where}.{text_key}", f"{text_key} must be text")
        if not content.strip():
            raise _Reject("empty_turn", f"{where}.{text_key}", "the turn has no text")
        out.append({"role": role, "content": content})
    return out


def _conversation(messages: list[dict], field: str) -> dict:
    if messages[-1]["role"] != "assistant":
        raise _Reject("invalid", field, "the last turn must be the assistant's answer")
    if not any(m["role"] == "user" for m in messages):
        raise _Reject("invalid", field, "there is no user turn")
    return {"messages": messages}


def _chat(v: dict) -> dict:
    return _conversation(_turns(v.get("messages"), "messages", "role", "content"), "messages")


def _sharegpt(v: dict) -> dict:
    return _conversation(_turns(v.get("conversations"), "conversations", "from", "value", _SHAREGPT_ROLES),
                         "conversations")


def _nonempty(text: str, field: str) -> str:
    if not text.strip():
        raise _Reject("empty_turn", field, f"field {field!r} has no text")
    return text


def _alpaca(v: dict) -> dict:
    instruction = _nonempty(_text(v, "instruction"), "instruction")
    extra = _text(v, "input", optional=True).strip()
    output = _nonempty(_text(v, "output"), "output")
    system = _text(v, "system", optional=True).strip()
    user = f"{instruction}\n\n{extra}" if extra else instruction
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return {"messages": messages}


def _completion(v: dict) -> dict:
    return {"messages": [{"role": "user", "content": _nonempty(_text(v, "prompt"), "prompt")},
                         {"role": "assistant", "content": _nonempty(_text(v, "completion"), "completion")}]}


def _dpo(v: dict) -> dict:
    prompt = v.get("prompt")
    if isinstance(prompt, list):
        turns = _turns(prompt, "prompt", "role", "content")
    else:
        turns = [{"role": "user", "content": _nonempty(_text(v, "prompt"), "prompt")}]
    chosen = _nonempty(_text(v, "chosen"), "chosen")
    rejected = _nonempty(_text(v, "rejected"), "rejected")
    if chosen == rejected:
        raise _Reject("invalid", "rejected", "the chosen and rejected answers are identical")
    return {"prompt": turns, "chosen": chosen, "rejected": rejected}


_NORMALIZERS = {"chat": _chat, "sharegpt": _sharegpt, "alpaca": _alpaca, "completion": _completion, "dpo": _dpo}


def prompt_and_answer(record: dict) -> tuple[list[dict], str]:
    """(the prompt turns, the answer) of a canonical record, for duplicate and conflict checks."""
    if "messages" in record:
        return record["messages"][:-1], record["messages"][-1]["content"]
    return record["prompt"], record["chosen"] + "\x00" + record["rejected"]


def all_text(record: dict) -> str:
    prompt, answer = prompt_and_answer(record)
    return "\n".join([*(m["content"] for m in prompt), answer])
