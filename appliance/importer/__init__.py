"""Dataset import: a user's file -> validated, cleaned, split, encrypted dataset in the vault.

Two streaming passes over the source file, a third only when needed (memory grows with the number of
records' hashes and their entries in the LSH index, never with their text):

1. read, normalize and validate every record (each rejection names the file, line and field); exact
   duplicates (sha256 of the canonical record); examples under ``min_tokens``; the answer given to each
   prompt; near-duplicates among the records accepted so far, by MinHash LSH over word 3-grams at Jaccard
   >= ``near_dup`` (one-permutation signatures, minhash.py, in datasketch's MinHashLSH), keeping the first
   of each cluster;
2. drop every record whose prompt got different answers; only if there are any, read the file again to
   redo the near-duplicate search without them (one of them may have been kept as a cluster's first);
3. split the survivors deterministically (a seeded hash decides: train / validation / test, 80/10/10 by
   default) and check for leakage: two more passes index the held-out records' MinHash signatures by split
   at the ``leakage`` threshold (lower than the near-duplicate one) and look every record up in the other
   splits' indexes; a held-out record similar to a record of an earlier split moves there (test ->
   validation -> train), so an example and its near-copy are on one side only (the report names both lines);
4. encrypt the records into the vault with the report.

If anything fails before the dataset is published, nothing is left: no folder,
no key. The report (counts per reason, up to three examples of each) is printed
and stored encrypted with the dataset, since its examples quote the data.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from collections import Counter, defaultdict
from pathlib import Path

from .. import hardware
from ..errors import InvalidInput
from ..events import Emit, Event, ignore
from ..trust.manifest import sha256_file
from . import formats, minhash, readers

STAGE = "import"
DETECT_SAMPLE = 50
_TOKEN = re.compile(r"\w+|[^\w\s]")


def count_tokens(text: str) -> int:
    """A tokenizer-free token count (words and punctuation), so importing needs no model."""
    return len(_TOKEN.findall(text))


DEFAULT_SPLIT = (0.8, 0.1, 0.1)  # train, validation, test: the guides' "test set separation 10-20%"
HELD_OUT = ("validation", "test")


def parse_split(text: str) -> tuple[float, float, float]:
    """``80/10/10`` (percent) or ``0.8/0.1/0.1``: train / validation / test shares summing to 100% (or 1)."""
    parts = text.replace(",", "/").split("/")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3 or any(v < 0 for v in values):
        raise InvalidInput(f"--split {text!r} is not three shares; write train/validation/test, e.g. 80/10/10.")
    total = sum(values)
    if not (abs(total - 100) < 1e-6 or abs(total - 1) < 1e-6):
        raise InvalidInput(f"--split {text!r} adds up to {total:g}; the three shares must add up to 100 (or 1).")
    train, validation, test = (v / total for v in values)
    return train, validation, test


def import_dataset(vault, path: str | Path, name: str, fmt: str = "auto", near_dup: float = 0.9,
                   min_tokens: int = 10, split: tuple[float, float, float] | None = None, seed: int = 0,
                   salvage: bool = False, leakage: float = 0.8, val_ratio: float | None = None,
                   emit: Emit = ignore) -> dict:
    """``split``: train/validation/test shares (default 80/10/10); ``val_ratio`` is the older two-way form
    (train/validation, no test split). ``leakage``: the Jaccard similarity at which a held-out record counts as
    a near-copy of a training record (1.0 turns the check off)."""
    from ..trust import store
    from ..workspace import check_id

    path = Path(path).expanduser()
    check_id(name, "dataset name")
    if store.dataset_dir(name).exists():
        raise InvalidInput(f"a dataset named {name!r} already exists; choose another --name or remove it first.")
    if not (0.5 <= near_dup <= 0.98 or near_dup == 1.0):
        raise InvalidInput(f"--near-dup {near_dup} is out of range; use a Jaccard similarity between 0.5 and 0.98, "
                           "or 1.0 to keep near-duplicates (exact duplicates are always removed).")
    if split is not None and val_ratio is not None:
        raise InvalidInput("--split and --val-ratio both say how to split; give only --split.")
    if val_ratio is not None:
        if not 0.0 <= val_ratio < 1.0:
            raise InvalidInput(f"--val-ratio {val_ratio} is out of range; use a fraction in [0, 1).")
        split = (1.0 - val_ratio, val_ratio, 0.0)
    split = tuple(split or DEFAULT_SPLIT)
    if len(split) != 3 or min(split) < 0 or abs(sum(split) - 1) > 1e-6 or split[0] <= 0:
        raise InvalidInput(f"split {split} is not three shares adding up to 1 with some training data; "
                           "use e.g. --split 80/10/10.")
    if not (0.5 <= leakage <= 0.98 or leakage == 1.0):
        raise InvalidInput(f"--leakage {leakage} is out of range; use a Jaccard similarity between 0.5 and 0.98, "
                           "or 1.0 to skip the check.")
    kind = readers.kind_of(path)
    fmt = _format(path, fmt, salvage)
    emit(Event("stage", STAGE, f"{path.name}: {kind.upper()} records in {fmt} format"))

    clock = _Clock()
    rejected: dict[int, tuple[str, str, str]] = {}  # index -> (reason, field, detail)
    where: dict[int, str] = {}
    salvage_info = readers.Salvage()

    # Pass 1: validate, exact duplicates, short examples, answers per prompt; near-duplicates among the records
    # accepted so far (final unless some prompt turns out to have conflicting answers, see pass 2).
    seen: set[bytes] = set()
    answers: dict[bytes, bytes] = {}  # prompt digest -> the first answer's digest
    conflicting: set[bytes] = set()
    accepted: list[tuple[int, bytes, bytes]] = []  # (index, prompt digest, record digest)
    near = _NearDuplicates(near_dup, clock)
    total = 0
    for i, item in enumerate(clock.timed("parse", readers.read(path, salvage, salvage_info))):
        total += 1
        started = time.perf_counter()
        if isinstance(item, readers.BadRecord):
            rejected[i], where[i] = ("invalid", "", item.reason), item.where
            continue
        record = formats.normalize(fmt, item.value)
        if isinstance(record, formats.Rejection):
            rejected[i], where[i] = (record.reason, record.field, record.detail), item.where
            continue
        digest = _digest(record)
        if digest in seen:
            rejected[i], where[i] = ("exact_duplicate", "", "identical to an earlier record"), item.where
            continue
        seen.add(digest)
        prompt, answer = formats.prompt_and_answer(record)
        text = formats.all_text(record)
        if not _has_tokens(text, min_tokens):
            rejected[i], where[i] = ("too_short", "", f"fewer than {min_tokens} tokens"), item.where
            continue
        prompt_digest = _prompt_digest(prompt)
        answer_digest = hashlib.sha256(answer.encode()).digest()
        if answers.setdefault(prompt_digest, answer_digest) != answer_digest:
            conflicting.add(prompt_digest)
        accepted.append((i, prompt_digest, digest))
        clock.add("validate", time.perf_counter() - started)
        near.add(i, item.where, text)
        if total % 10000 == 0:
            emit(Event("progress", STAGE, "", {"pass": 1, "records": total}))
    near.flush()
    del seen, answers

    # Pass 2: drop every record whose prompt got different answers. Pass 1's near-duplicate search saw those
    # records too (one of them may have been kept as the first of a cluster), so when there are any, the search
    # runs again over the file without them; without conflicts (the usual case) this pass reads nothing.
    survivors: list[tuple[int, bytes]] = []
    for i, prompt_digest, digest in accepted:
        if prompt_digest in conflicting:
            rejected[i], where[i] = ("conflicting_answers", "", "another record gives this prompt a different answer"), None
        else:
            survivors.append((i, digest))
    del accepted
    if conflicting:
        near = _NearDuplicates(near_dup, clock)
        for i, item in enumerate(clock.timed("parse", readers.read(path, salvage))):
            if i in rejected:
                if where[i] is None:  # a conflicting record: where it is, for the report
                    where[i] = item.where
                continue
            near.add(i, item.where, formats.all_text(formats.normalize(fmt, item.value)))
        near.flush()
    for i, (at, detail) in near.duplicates.items():
        rejected[i], where[i] = ("near_duplicate", "", detail), at
    survivors = [s for s in survivors if s[0] not in near.duplicates]
    del near
    if not survivors:
        raise InvalidInput(f"no record of {path} survived validation and cleaning "
                           f"({_summary(rejected)}); nothing was imported.")
    heldout = _split(survivors, split, seed)
    del survivors

    # Pass 3: held-out records similar to training records move to train (only when anything is held out).
    leaks: list[dict] = []
    if heldout and leakage < 1.0:
        leaks = _leaks(path, fmt, salvage, rejected, heldout, leakage, clock)
        for leak in leaks:
            i = leak.pop("index")
            if leak["to"] == "train":
                del heldout[i]
            else:
                heldout[i] = leak["to"]
    counts = Counter(heldout.values())
    imported = {"train": total - len(rejected) - len(heldout), **{s: counts.get(s, 0) for s in HELD_OUT}}

    # Pass 4: encrypt into the vault, all or nothing.
    report = _report(path, kind, fmt, total, rejected, imported,
                     salvage_info if salvage_info.cut_at_byte is not None else None,
                     near_dup=near_dup, min_tokens=min_tokens, split=[round(x, 6) for x in split], seed=seed,
                     leakage=leakage)
    report["leakage"] = {"threshold": leakage, "moved": len(leaks), "pairs": leaks[:LEAKS_LISTED]}
    examples = _examples(path, fmt, salvage, rejected, where)
    with store.create(vault, name, hardware=hardware.summary()) as ds:
        for i, record, _ in _accepted(path, fmt, salvage, rejected, clock):
            started = time.perf_counter()
            ds.add(heldout.get(i, "train"), record)
            clock.add("encrypt", time.perf_counter() - started)
        ds.add("report", {**report, "examples": examples})
        ds.details.update(source=path.name, source_sha256=sha256_file(path), record_format=fmt,
                          records_kind="preference" if formats.is_preference(fmt) else "conversation")
    report["seconds"] = clock.seconds  # stored with the dataset before this line, so only returned
    from ..trust import audit

    audit.record("dataset.import", {"dataset": name},
                 {"source": path.name, "source_sha256": ds.details["source_sha256"], "format": fmt,
                  "records_read": total, "imported": report["imported"],
                  "rejected": sum(report["rejected"].values())})
    emit(Event("finished", STAGE, f"imported {sum(imported.values())} of {total} records", report))
    return {**report, "examples": examples, "dataset": name}


def _format(path: Path, fmt: str, salvage: bool) -> str:
    if fmt != "auto":
        if fmt not in formats.FORMATS:
            raise InvalidInput(f"unknown format {fmt!r}; use auto or one of {', '.join(formats.FORMATS)}.")
        return fmt
    sample = []
    for item in readers.read(path, salvage=True):  # detection only looks; the real passes enforce the rules
        if isinstance(item, readers.Raw):
            sample.append(item.value)
        if len(sample) >= DETECT_SAMPLE:
            break
    detected = formats.detect(sample)
    if detected is None:
        keys = sorted({k for v in sample if isinstance(v, dict) for k in v})[:12]
        raise InvalidInput(f"{path}: cannot tell the format from the fields {keys}; pass --format with one of "
                           f"{', '.join(formats.FORMATS)}.")
    return detected


def _accepted(path: Path, fmt: str, salvage: bool, rejected: dict, clock: "_Clock"):
    for i, item in enumerate(clock.timed("parse", readers.read(path, salvage))):
        if i in rejected or isinstance(item, readers.BadRecord):
            continue
        yield i, formats.normalize(fmt, item.value), item


class _Clock:
    """Seconds spent per phase (parse counts every pass over the file), for the report and the benchmark."""

    def __init__(self):
        self.seconds: dict[str, float] = {"parse": 0.0, "validate": 0.0, "near_duplicates": 0.0, "leakage": 0.0,
                                          "encrypt": 0.0}

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds

    def timed(self, phase: str, iterator):
        it = iter(iterator)
        while True:
            started = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                self.add(phase, time.perf_counter() - started)
                return
            self.add(phase, time.perf_counter() - started)
            yield item


class _NearDuplicates:
    """Near-duplicate search in file order: MinHash signatures (minhash.py, a batch of records at a time) in a
    datasketch MinHashLSH index; a record similar to one kept before it is a near-duplicate, else it is kept."""

    BATCH_RECORDS, BATCH_CHARS = 256, 1 << 19

    def __init__(self, threshold: float, clock: "_Clock"):
        from datasketch import MinHashLSH

        # 128 permutations support thresholds up to 0.98 (LSH needs at least two bands); 1.0 turns the check off.
        # Band keys are stored as Python hashes of the band's bytes (the index lives in this process only):
        # 1.7 KB of index a kept record instead of 2.2 KB with the bytes themselves as keys.
        self.lsh = MinHashLSH(threshold=threshold, num_perm=minhash.NUM_PERM, hashfunc=hash) if threshold < 1.0 else None
        self.clock = clock
        self.pending: list[tuple[int, str]] = []
        self.texts: list[str] = []
        self.chars = 0
        self.kept_where: dict[int, str] = {}
        self.duplicates: dict[int, tuple[str, str]] = {}  # index -> (where, detail)

    def add(self, i: int, where: str, text: str) -> None:
        if self.lsh is None:
            return
        self.pending.append((i, where))
        self.texts.append(text)
        self.chars += len(text)
        if len(self.texts) >= self.BATCH_RECORDS or self.chars >= self.BATCH_CHARS:
            self.flush()

    def flush(self) -> None:
        if not self.texts:
            return
        from datasketch import LeanMinHash

        started = time.perf_counter()
        signatures = minhash.signatures(self.texts)
        for (i, where), hashvalues in zip(self.pending, signatures):
            # The scheme label only guards against mixing schemes in one index; this one only sees ours.
            mh = LeanMinHash(seed=1, hashvalues=hashvalues, scheme="affine32")
            similar = self.lsh.query(mh)
            if similar:
                self.duplicates[i] = (where, f"similar to the record at {self.kept_where[min(similar)]}")
            else:
                self.lsh.insert(i, mh, check_duplication=False)
                self.kept_where[i] = where
        self.pending, self.texts, self.chars = [], [], 0
        self.clock.add("near_duplicates", time.perf_counter() - started)


def _has_tokens(text: str, n: int) -> bool:
    """``count_tokens(text) >= n``, without tokenizing more than the first n tokens of a long text."""
    return sum(1 for _ in itertools.islice(_TOKEN.finditer(text), n)) >= n


def _prompt_digest(prompt: list[dict]) -> bytes:
    """Groups records by prompt within one import (normalize builds every turn with the same key order)."""
    return hashlib.sha256(json.dumps(prompt, ensure_ascii=False).encode()).digest()


def _digest(obj) -> bytes:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).digest()


def _split(survivors: list[tuple[int, bytes]], split: tuple[float, float, float], seed: int) -> dict[int, str]:
    """The held-out records, index -> "validation" or "test": the records whose seeded hash ranks lowest are
    validation, the next ones test (same file + seed -> same split; a dataset imported with validation only
    before keeps the same validation records). At least one record stays in train."""
    n = len(survivors)
    sizes = [0 if n < 2 or share == 0 else max(1, round(n * share)) for share in split[1:]]
    while sum(sizes) >= n and max(sizes) > 0:  # tiny files: keep one training record
        sizes[sizes.index(max(sizes))] -= 1
    key = seed.to_bytes(8, "big", signed=True)
    ranked = sorted(survivors, key=lambda s: hashlib.sha256(key + s[1]).digest())
    out = {i: "validation" for i, _ in ranked[:sizes[0]]}
    out.update({i: "test" for i, _ in ranked[sizes[0]:sum(sizes)]})
    return out


LEAKS_LISTED = 1000  # pairs named in the report (all of them are moved)


def _leaks(path, fmt, salvage, rejected, heldout: dict[int, str], threshold: float, clock: "_Clock") -> list[dict]:
    """Records with a near-copy (Jaccard >= threshold) in an earlier split (train, then validation, then test).
    Of each pair the record of the later split moves to the earlier one (a test record like a training record
    trains; one like a validation record validates): an example and its near-copy end up on one side. One round:
    a record that moves is not looked up again from its new side.

    Two passes, so that only the held-out records (a fifth by default) are indexed: the first signs the held-out
    records into one LSH index per split, each looked up in the other split's index as it comes (a pair is found
    whichever comes first); the second signs the training records and looks each up in both. The LSH bands favour
    recall (datasketch's default weighs missed pairs and false candidates alike, and finds only ~40% of the pairs
    right at the threshold; these weights find ~87%), and every candidate is confirmed by the signatures'
    estimated Jaccard similarity. Returns {index, where, split, to, similar_to}, in file order."""
    import numpy as np
    from datasketch import LeanMinHash, MinHashLSH

    order = ("train", *HELD_OUT)
    sides = {s: MinHashLSH(threshold=threshold, num_perm=minhash.NUM_PERM, weights=(0.1, 0.9), hashfunc=hash)
             for s in HELD_OUT}
    signatures: dict[int, np.ndarray] = {}  # held-out records only
    where: dict[int, str] = {}
    moves: dict[int, tuple[str, int]] = {}  # index -> (the split it moves to, the record it is like)

    def move(i: int, to: str, like: int) -> None:
        if i not in moves or order.index(to) < order.index(moves[i][0]):
            moves[i] = (to, like)

    def sign(batch: list[tuple[int, str, str]], held: bool) -> None:
        started = time.perf_counter()
        for (i, at, _), hashvalues in zip(batch, minhash.signatures([text for _, _, text in batch])):
            mh = LeanMinHash(seed=1, hashvalues=hashvalues, scheme="affine32")
            side = heldout.get(i, "train")
            for other in HELD_OUT:
                if other == side:
                    continue
                for j in sides[other].query(mh):
                    if np.mean(signatures[j] == hashvalues) < threshold:
                        continue
                    if order.index(other) < order.index(side):
                        move(i, other, j)
                    else:
                        move(j, side, i)
                        where.setdefault(i, at)
            if held:
                where[i], signatures[i] = at, hashvalues
                sides[side].insert(i, mh, check_duplication=False)
        batch.clear()
        clock.add("leakage", time.perf_counter() - started)

    for held in (True, False):
        batch: list[tuple[int, str, str]] = []
        for i, record, item in _accepted(path, fmt, salvage, rejected, clock):
            if (i in heldout) == held:
                batch.append((i, item.where, formats.all_text(record)))
                if len(batch) >= _NearDuplicates.BATCH_RECORDS:
                    sign(batch, held)
        sign(batch, held)
    return [{"index": i, "where": where[i], "split": heldout[i], "to": to, "similar_to": where[like]}
            for i, (to, like) in sorted(moves.items())]


def _summary(rejected: dict) -> str:
    counts = Counter(r[0] for r in rejected.values())
    return ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in counts.most_common()) or "no records"


def _report(path, kind, fmt, total, rejected, imported, salvage_info, **settings) -> dict:
    counts = Counter(r[0] for r in rejected.values())
    report = {"file": str(path), "kind": kind, "format": fmt, "records_read": total, "imported": imported,
              "rejected": {reason: counts.get(reason, 0) for reason in formats.REASONS},
              "settings": settings}
    if salvage_info is not None:
        report["salvaged"] = {"kept": salvage_info.kept, "cut_at_byte": salvage_info.cut_at_byte,
                              "cut_at_line": salvage_info.cut_at_line}
    return report


def _examples(path, fmt, salvage, rejected, where) -> dict:
    """Up to three rejected records per reason, with where and why (and a short preview of the record)."""
    wanted: dict[str, list[int]] = defaultdict(list)
    for i in sorted(rejected):
        reason = rejected[i][0]
        if len(wanted[reason]) < 3:
            wanted[reason].append(i)
    pick = {i for ids in wanted.values() for i in ids}
    previews: dict[int, str] = {}
    if pick:
        for i, item in enumerate(readers.read(path, salvage)):
            if i in pick:
                raw = item.value if isinstance(item, readers.Raw) else None
                previews[i] = json.dumps(raw, ensure_ascii=False)[:160] if raw is not None else ""
            if len(previews) == len(pick):
                break
    return {reason: [{"where": where[i], "field": rejected[i][1], "detail": rejected[i][2],
                      "preview": previews.get(i, "")} for i in ids] for reason, ids in wanted.items()}
