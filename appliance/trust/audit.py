"""The audit log: an append-only, hash-chained record of everything the appliance did.

``<workspace>/audit/log.jsonl`` holds one entry per line (format in
docs/audit-format.md)::

    {"seq": 7, "time": "2026-11-22T10:00:00.123456Z", "user": "alice", "pid": 4242,
     "event": "dataset.import", "subjects": {"dataset": "claims"}, "details": {...},
     "prev": "<hash of entry 6>", "hash": "<sha256 of this entry without 'hash'>"}

``audit/checkpoints.jsonl`` holds Ed25519-signed checkpoints: ``{seq, hash,
time}`` of the chain's head, signed with the appliance's key (see
``trust.signing``), written after every entry appended by a process that
holds the key. An edit, deletion or reordering breaks the chain; a truncation
or a rewritten chain no longer matches a signed checkpoint.

Entries carry ids, counts, names of models and files, never dataset text.
Appends from several processes (the CLI, a training child) are serialized by
an exclusive lock; each entry is one ``write`` of a whole line followed by
fsync, so a crash mid-append leaves at most a torn last line, which ``verify``
reports and the next append cuts off (recording that it did).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

from ..errors import CheckFailed, InvalidInput
from ..workspace import home
from . import signing

GENESIS = "0" * 64
CHECKPOINT_DOMAIN = "appliance-audit-checkpoint/1"
FIELDS = ("seq", "time", "user", "pid", "event", "subjects", "details", "prev", "hash")
EVENTS = (
    "vault.init", "vault.unlock", "vault.unlock_failed", "vault.rekey",
    "dataset.import", "dataset.show", "dataset.export", "dataset.delete", "dataset.package",
    "model.import", "plan",
    "train.start", "train.stop", "train.resume", "train.finish", "train.fail", "train.oom_recovery",
    "merge", "export", "export.adapter", "bundle", "eval", "eval.review",
    "ask", "chat",
    "serve.start", "serve.stop", "serve.usage", "serve.denied", "serve.key.create", "serve.key.revoke",
    "serve.listen.allow", "serve.listen.remove", "serve.requests", "serve.limits", "serve.tls.create",
    "cluster.allow", "cluster.revoke", "cluster.secret",
    "network.blocked",
    "audit.verify", "audit.repaired",
)


def folder() -> Path:
    return home() / "audit"


def log_path() -> Path:
    return folder() / "log.jsonl"


def checkpoints_path() -> Path:
    return folder() / "checkpoints.jsonl"


def record(event: str, subjects: dict | None = None, details: dict | None = None) -> dict:
    """Append one entry (and a signed checkpoint when this process holds the key); return the entry."""
    if event not in EVENTS:
        raise ValueError(f"unknown audit event {event!r}")  # a programming error, not a user's
    with _locked():
        last = _repair_and_tail()
        entry = _append(last, event, subjects or {}, details or {})
        if signing.available():
            _checkpoint(entry)
    return entry


def entries(since: str | None = None, event: str | None = None) -> list[dict]:
    """The log's whole entries, oldest first, filtered by time (``since``) and event (name or prefix)."""
    start = parse_since(since) if since else None
    out = []
    for _, raw in _lines(log_path()):
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(entry, dict):
            continue
        if event and not (entry.get("event") == event or str(entry.get("event", "")).startswith(event + ".")):
            continue
        if start and str(entry.get("time", "")) < start:
            continue
        out.append(entry)
    return out


def verify(public_raw: bytes | None = None) -> dict:
    """Check the whole chain and every checkpoint; raise CheckFailed naming the first bad entry.

    ``public_raw`` is the trusted public key (a pinned copy); without it the keyring's public key is used.
    Either outcome is itself recorded.
    """
    try:
        result = _verify(public_raw)
    except CheckFailed as e:
        record("audit.verify", details={"result": "failed", "problem": str(e)[:300]})
        raise
    record("audit.verify", details={"entries": result["entries"], "signed_through": result["signed_through"],
                                    "result": "ok"})
    return result


def report(since: str | None = None, until: str | None = None, fmt: str = "md") -> str:
    """A human-readable account of a period: verification, activity by event and user, data access, the timeline."""
    if fmt not in ("md", "html"):
        raise InvalidInput(f"unknown report format {fmt!r}; use md or html.")
    try:
        check = _verify(None)
        verdict = (f"intact: {check['entries']} entries, signed through entry {check['signed_through']}"
                   + (f", {check['unsigned_tail']} after the last signed checkpoint" if check["unsigned_tail"] else ""))
    except CheckFailed as e:
        verdict = f"FAILED: {e}"
    end = parse_since(until) if until else None
    chosen = [e for e in entries(since) if end is None or str(e.get("time", "")) < end]
    by_event: dict[str, int] = {}
    by_user: dict[str, int] = {}
    for e in chosen:
        by_event[e["event"]] = by_event.get(e["event"], 0) + 1
        by_user[e["user"]] = by_user.get(e["user"], 0) + 1
    access = [e for e in chosen if e["event"] in ("dataset.show", "dataset.export", "dataset.delete", "dataset.import",
                                                  "dataset.package")]
    blocked = [e for e in chosen if e["event"] == "network.blocked"]
    failed = [e for e in chosen if e["event"] == "vault.unlock_failed"]
    period = f"{since or 'the beginning'} to {until or 'now'}"

    def line(e: dict) -> list[str]:
        subjects = ", ".join(f"{k}={v}" for k, v in e.get("subjects", {}).items())
        details = ", ".join(f"{k}={v}" for k, v in e.get("details", {}).items())
        return [str(e["seq"]), e["time"], e["user"], e["event"], subjects, details[:120]]

    sections = [
        ("Integrity", [["audit log", verdict]], ["", ""]),
        ("Activity by event", [[k, str(v)] for k, v in sorted(by_event.items())], ["event", "count"]),
        ("Activity by user", [[k, str(v)] for k, v in sorted(by_user.items())], ["user", "entries"]),
        ("Dataset access", [line(e) for e in access], ["seq", "time", "user", "event", "subjects", "details"]),
        ("Blocked network attempts", [line(e) for e in blocked], ["seq", "time", "user", "event", "subjects", "details"]),
        ("Failed unlocks", [line(e) for e in failed], ["seq", "time", "user", "event", "subjects", "details"]),
        ("Timeline", [line(e) for e in chosen], ["seq", "time", "user", "event", "subjects", "details"]),
    ]
    title = f"Appliance audit report: {period}"
    return _html(title, sections, len(chosen)) if fmt == "html" else _markdown(title, sections, len(chosen))


def write_report(out: Path, since: str | None = None, until: str | None = None, fmt: str = "md") -> Path:
    """The report written to ``out``, a new file (never over an existing one), whole or not at all."""
    from ..workspace import atomic_writer

    out = Path(out).expanduser()
    if out.exists():
        raise InvalidInput(f"{out} already exists; name a new file for the report.")
    if not out.parent.is_dir():
        raise InvalidInput(f"the folder {out.parent} does not exist; name a file in an existing folder for the report.")
    text = report(since=since, until=until, fmt=fmt)
    with atomic_writer(out) as f:  # a temporary name, renamed once written whole
        f.write(text.encode("utf-8"))
    return out


def parse_since(text: str) -> str:
    """An ISO time (``2026-11-22``, ``2026-11-22T10:00``) or a span back from now (``30m``, ``12h``, ``7d``) as an
    ISO UTC string comparable with entries' times."""
    m = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if m:
        span = timedelta(**{{"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m[2]]: int(m[1])})
        return _iso(datetime.now(timezone.utc) - span)
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"cannot read the time {text!r}; use an ISO date like 2026-11-22 or 2026-11-22T10:00, "
                           "or a span like 30m, 12h, 7d.") from None
    return _iso(t if t.tzinfo else t.replace(tzinfo=timezone.utc))


# ---------------------------------------------------------------------------------------------------------------

def entry_hash(entry: dict) -> str:
    return hashlib.sha256(signing.canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (KeyError, ImportError):
        return str(os.getuid())


@contextmanager
def _locked():
    folder().mkdir(parents=True, exist_ok=True)
    fd = os.open(folder() / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _repair_and_tail() -> dict | None:
    """The last whole entry; a torn last line (a crash mid-append) is cut off and the cut recorded."""
    for path in (log_path(), checkpoints_path()):
        torn = _torn_bytes(path)
        if torn:
            with open(path, "rb+") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(size - torn)
                discarded = f.read()
                f.truncate(size - torn)
                f.flush()
                os.fsync(f.fileno())
            if path == log_path():
                last = _last_entry()
                _append(last, "audit.repaired", {}, {"file": path.name, "discarded_bytes": torn,
                                                     "discarded_sha256": hashlib.sha256(discarded).hexdigest()})
    return _last_entry()


def _torn_bytes(path: Path) -> int:
    """How many bytes after the last newline (0 if the file ends with one or is absent)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            pos = size
            while pos > 0:
                step = min(4096, pos)
                f.seek(pos - step)
                chunk = f.read(step)
                nl = chunk.rfind(b"\n")
                if nl >= 0:
                    return size - (pos - step + nl + 1)
                pos -= step
            return size
    except FileNotFoundError:
        return 0


def _last_entry() -> dict | None:
    """The last whole entry; if that line is damaged, a stand-in that keeps appends going (verify will name it)."""
    raw = _last_line(log_path())
    if raw is None:
        return None
    try:
        last = json.loads(raw)
        if isinstance(last, dict) and isinstance(last.get("seq"), int) and isinstance(last.get("hash"), str):
            return last
    except ValueError:
        pass
    return {"seq": sum(1 for _ in _lines(log_path())), "hash": hashlib.sha256(raw).hexdigest()}


def _last_line(path: Path) -> bytes | None:
    """The last whole line of ``path``, read from the end so that appends stay O(1); None if there is none."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None
    with f:
        pos, buf = f.seek(0, os.SEEK_END), b""
        while pos > 0 and buf.count(b"\n") <= 1:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step) + buf
        lines = buf.split(b"\n")[:-1]  # drop what follows the last newline (empty, or a torn line)
        if pos > 0:
            lines = lines[1:]  # the first piece may be a partial line
        return lines[-1] if lines else None


def _append(last: dict | None, event: str, subjects: dict, details: dict) -> dict:
    entry = {"seq": (last["seq"] + 1) if last else 1, "time": _iso(datetime.now(timezone.utc)), "user": _user(),
             "pid": os.getpid(), "event": event, "subjects": subjects, "details": details,
             "prev": last["hash"] if last else GENESIS}
    entry["hash"] = entry_hash(entry)
    _write_line(log_path(), signing.canonical(entry) + b"\n")
    return entry


def _checkpoint(entry: dict) -> None:
    payload = {"seq": entry["seq"], "hash": entry["hash"], "time": _iso(datetime.now(timezone.utc))}
    _write_line(checkpoints_path(), signing.canonical({**payload, **signing.sign(CHECKPOINT_DOMAIN, payload)}) + b"\n")


def _write_line(path: Path, line: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)  # one write of the whole line: readers never see half an entry but on a crash
        os.fsync(fd)
    finally:
        os.close(fd)


def _lines(path: Path):
    """(line number, raw bytes) of each whole line; a torn last line is not yielded."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        for lineno, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                return
            yield lineno, raw[:-1]


def _check_torn_tail(path: Path) -> int:
    """A torn last line is what a crash mid-append leaves: a prefix of a canonical JSON line (printable ASCII,
    or zeros a file system may show after a power loss). Anything else after the last newline was altered."""
    torn = _torn_bytes(path)
    if torn:
        with open(path, "rb") as f:
            f.seek(-torn, os.SEEK_END)
            tail = f.read()
        if any(not (0x20 <= b <= 0x7E or b == 0) for b in tail):
            raise CheckFailed(f"{path}: the bytes after its last whole line are not a torn append; the file was altered.")
    return torn


def _verify(public_raw: bytes | None) -> dict:
    log = log_path()
    _check_torn_tail(log)
    _check_torn_tail(checkpoints_path())
    chain: list[str] = []  # hash of entry seq i+1 at index i
    expected_prev = GENESIS
    raw_seqs: list[object] = []
    parsed: list[tuple[int, dict | None]] = []
    for lineno, raw in _lines(log):
        try:
            entry = json.loads(raw)
        except ValueError:
            entry = None
        parsed.append((lineno, entry if isinstance(entry, dict) else None))
        raw_seqs.append(entry.get("seq") if isinstance(entry, dict) else None)
    for lineno, entry in parsed:
        want = len(chain) + 1
        if entry is None or set(entry) != set(FIELDS):
            raise CheckFailed(f"{log}:{lineno}: entry {want} is not a valid audit entry; the log was edited or damaged there.")
        seq = entry["seq"]
        if seq != want:
            if want in raw_seqs[lineno:]:
                raise CheckFailed(f"{log}:{lineno}: entry {seq} stands where entry {want} belongs; "
                                  "entries were reordered.")
            if isinstance(seq, int) and seq > want:
                raise CheckFailed(f"{log}:{lineno}: entry {want} is missing (the next line holds entry {seq}); "
                                  "entries were deleted.")
            raise CheckFailed(f"{log}:{lineno}: entry {seq} appears again where entry {want} belongs; "
                              "entries were duplicated or reordered.")
        if entry_hash(entry) != entry["hash"]:
            raise CheckFailed(f"{log}:{lineno}: entry {seq} ({entry['event']}) was edited: its content no longer "
                              "matches its hash.")
        if entry["prev"] != expected_prev:
            raise CheckFailed(f"{log}:{lineno - 1}: entry {seq - 1} was edited or replaced: entry {seq} chains to a "
                              "different hash.")
        chain.append(entry["hash"])
        expected_prev = entry["hash"]

    checkpoints = list(_lines(checkpoints_path()))
    if checkpoints and public_raw is None:
        public_raw = signing.workspace_public()
        if public_raw is None:
            raise CheckFailed("the log has signed checkpoints but there is no keyring to read the public key from; "
                              "pass --pubkey with the appliance's exported signing-key.pub.")
    signed_through = 0
    for lineno, raw in checkpoints:
        where = f"{checkpoints_path()}:{lineno}"
        try:
            cp = json.loads(raw)
            payload = {"seq": cp["seq"], "hash": cp["hash"], "time": cp["time"]}
        except (ValueError, KeyError, TypeError):
            raise CheckFailed(f"{where}: the checkpoint is not valid; the checkpoints file was edited or damaged.") from None
        signing.check(CHECKPOINT_DOMAIN, payload, cp, public_raw, f"the checkpoint at {where} (entry {cp['seq']})")
        seq = payload["seq"]
        if not isinstance(seq, int) or seq < 1:
            raise CheckFailed(f"{where}: the checkpoint names no valid entry.")
        if seq > len(chain):
            raise CheckFailed(f"{log} was truncated: it ends at entry {len(chain)} but entry {seq} was signed "
                              f"({where}).")
        if chain[seq - 1] != payload["hash"]:
            low = signed_through + 1
            raise CheckFailed(f"{log}: entries {low}..{seq} were rewritten: entry {seq} no longer matches the signed "
                              f"checkpoint at {where}.")
        signed_through = max(signed_through, seq)
    return {"log": str(log), "entries": len(chain), "head": chain[-1] if chain else GENESIS,
            "checkpoints": len(checkpoints), "signed_through": signed_through,
            "unsigned_tail": len(chain) - signed_through, "torn_tail_bytes": _torn_bytes(log),
            "key": signing.fingerprint(public_raw) if public_raw else None}


def _markdown(title: str, sections, count: int) -> str:
    out = [f"# {title}", "", f"{count} entries in the period.", ""]
    for name, rows, header in sections:
        out += [f"## {name}", ""]
        if not rows:
            out += ["(none)", ""]
            continue
        if any(header):
            out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        else:
            out += ["| | |", "|---|---|"]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        out.append("")
    return "\n".join(out)


def _html(title: str, sections, count: int) -> str:
    from html import escape

    out = ["<!doctype html>", f"<html><head><meta charset='utf-8'><title>{escape(title)}</title>",
           "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
           "td,th{border:1px solid #999;padding:2px 6px;text-align:left;font-size:90%}</style></head><body>",
           f"<h1>{escape(title)}</h1>", f"<p>{count} entries in the period.</p>"]
    for name, rows, header in sections:
        out.append(f"<h2>{escape(name)}</h2>")
        if not rows:
            out.append("<p>(none)</p>")
            continue
        out.append("<table>")
        if any(header):
            out.append("<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>")
        out += ["<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows]
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)
