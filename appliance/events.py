"""Typed progress events, written as JSON lines, read back by anyone.

A stage knows nothing of who listens: it calls an ``Emit`` with events. The
child process of a long stage appends them to ``events.jsonl`` in its run
folder; the CLI and the TUI follow that file. One line is one event::

    {"t": 1763793120.5, "type": "progress", "stage": "train", "step": 3, ...}

Types: ``stage`` (a stage started), ``progress`` (counts and rates),
``metric`` (a named value), ``warning``, ``finished``, ``failed``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

TYPES = ("stage", "progress", "metric", "warning", "finished", "failed")


@dataclass
class Event:
    type: str
    stage: str
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    t: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False, default=_jsonable)

    @classmethod
    def from_json(cls, line: str) -> "Event":
        raw = json.loads(line)
        return cls(type=raw["type"], stage=raw["stage"], message=raw.get("message", ""),
                   data=raw.get("data", {}), t=raw.get("t", 0.0))


Emit = Callable[[Event], None]


def ignore(_: Event) -> None:
    """An Emit for callers that do not care about progress."""


class EventLog:
    """Appends events to a JSONL file; each line is written whole with one write()."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, event: Event) -> None:
        line = (event.to_json() + "\n").encode("utf-8")
        # O_APPEND makes each write land at the end, whole, even with two writers.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            if event.type in ("finished", "failed"):
                os.fsync(fd)
        finally:
            os.close(fd)


def read(path: Path) -> list[Event]:
    """All complete events in a file (a torn last line is ignored)."""
    events, _ = _read_from(path, 0)
    return events


def follow(path: Path, alive: Callable[[], bool], poll: float = 0.25, start: int = 0) -> Iterator[Event]:
    """Yield events from byte ``start`` as they are appended, until a final event or until ``alive()`` turns false."""
    offset = start
    while True:
        events, offset = _read_from(path, offset)
        for event in events:
            yield event
            if event.type in ("finished", "failed"):
                return
        if not alive():
            # One last read: the writer may have finished between our read and the check.
            events, offset = _read_from(path, offset)
            yield from events
            return
        time.sleep(poll)


def last_offset(path: Path, predicate: Callable[[Event], bool]) -> int:
    """The byte offset of the last event matching ``predicate`` (0 if none): where to start following."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return 0
    found = position = 0
    for line in raw.splitlines(keepends=True):
        if line.endswith(b"\n") and line.strip() and predicate(Event.from_json(line.decode("utf-8"))):
            found = position
        position += len(line)
    return found


def _read_from(path: Path, offset: int) -> tuple[list[Event], int]:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:
        return [], offset
    events = []
    consumed = 0
    for line in chunk.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        consumed += len(line)
        if line.strip():
            events.append(Event.from_json(line.decode("utf-8")))
    return events, offset + consumed


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
