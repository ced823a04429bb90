"""MinHash signatures of word 3-gram sets, for many records at once, by one-permutation hashing.

Why not datasketch's ``MinHash.update``: a classic MinHash applies 128 affine permutations to every shingle
(~200 shingles x 128 permutations of 64-bit arithmetic: 63 µs a record, most of an import's time, and
batching records in numpy does not make that arithmetic any cheaper). One-permutation hashing (Li, Owen and
Zhang 2012) hashes every shingle once, puts it into one of the bins by some bits of its hash and keeps the
smallest of the other bits per bin; a bin left empty borrows the value of a non-empty bin chosen by a fixed
pseudo-random sequence ("optimal densification", Shrivastava 2017), which keeps Pr[coordinate equal] = the
Jaccard similarity for every coordinate, the property MinHash LSH relies on. We run 4 such rounds of 32 bins
(4 hashes a shingle instead of 128) and interleave their coordinates, so each LSH band draws on all rounds:
short texts (few shingles, so few distinct minima in one round) then get more independent coordinates than
one round of 128 bins would give them. Everything is vectorised in numpy over a batch of records
(~14 µs a record for 1.5 KiB records instead of 63 µs). The LSH index itself stays datasketch's MinHashLSH.

Words are what ``str.split()`` gives on the lower-cased text; each word is hashed with a 64-bit polynomial
hash of its UTF-8 bytes (computed from prefix sums over the batch's bytes), and a 3-gram's hash mixes its
three words' hashes. Texts of fewer than three words use their words as shingles. All hashes are
deterministic (no ``hash()``), so the same file gives the same near-duplicates in every run.
"""

from __future__ import annotations

import numpy as np

NUM_PERM = 128
ROUNDS = 4
BINS = NUM_PERM // ROUNDS  # per round; a power of two
EMPTY = np.uint32(0xFFFFFFFF)
SEGMENT = 1 << 20  # bytes hashed at once (prefix sums of that many uint64s)
DENSIFY_ATTEMPTS = 64

_U = np.uint64
_P = 0x100000001B3  # odd, so invertible modulo 2**64
_P_INV = pow(_P, -1, 1 << 64)
_WS = np.zeros(256, dtype=bool)
_WS[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True  # what str.split() treats as whitespace among ASCII
_WS_BYTES = bytes(np.flatnonzero(_WS).tolist())
_SEEDS = [_U(s) for s in (0x243F6A8885A308D3, 0x13198A2E03707344, 0xA4093822299F31D0, 0x082EFA98EC4E6C89)]


def _fmix(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer (good avalanche), elementwise; modifies and returns ``h``."""
    h ^= h >> _U(33)
    h *= _U(0xFF51AFD7ED558CCD)
    h ^= h >> _U(33)
    h *= _U(0xC4CEB9FE1A85EC53)
    h ^= h >> _U(33)
    return h


def _powers(base: int, n: int) -> np.ndarray:
    a = np.full(n, base, dtype=_U)
    a[0] = 1
    return np.cumprod(a, dtype=_U)  # wraps modulo 2**64, as wanted


_PW = _powers(_P, SEGMENT + 1)
_PW_INV = _powers(_P_INV, SEGMENT + 1)


def _densify_table() -> np.ndarray:
    """table[a, r, b]: the bin an empty bin b of round r looks at on attempt a (fixed, deterministic)."""
    idx = np.arange(DENSIFY_ATTEMPTS * ROUNDS * BINS, dtype=_U) + _U(0x9E3779B97F4A7C15)
    return (_fmix(idx) % _U(BINS)).astype(np.int64).reshape(DENSIFY_ATTEMPTS, ROUNDS, BINS)


_DENSIFY = _densify_table()


def _segment_words(seg: np.ndarray, base: int) -> tuple[np.ndarray, np.ndarray]:
    """(hash, start offset) of the words of one segment (whole words only), offsets counted from ``base``."""
    n = len(seg)
    edges = np.diff(_WS[seg].view(np.int8), prepend=np.int8(1), append=np.int8(1))
    starts = np.flatnonzero(edges == -1)
    ends = np.flatnonzero(edges == 1)
    prefix = np.zeros(n + 1, dtype=_U)
    np.cumsum(seg * _PW[:n], out=prefix[1:])
    h = (prefix[ends] - prefix[starts]) * _PW_INV[starts] + (ends - starts).astype(_U)
    return _fmix(h), starts + base


def _long_word(data: bytes, start: int, end: int) -> int:
    """The polynomial hash of one word longer than a segment (same value _segment_words would give)."""
    total, shift = 0, 1
    for at in range(start, end, SEGMENT):
        chunk = np.frombuffer(data, dtype=np.uint8, count=min(SEGMENT, end - at), offset=at)
        total = (total + shift * int((chunk * _PW[:len(chunk)]).sum(dtype=_U))) % (1 << 64)
        shift = shift * pow(_P, len(chunk), 1 << 64) % (1 << 64)
    return int(_fmix(np.array([(total + end - start) % (1 << 64)], dtype=_U))[0])


def word_hashes(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(hash, start offset) of every whitespace-separated word of ``data``, a segment at a time."""
    hashes, starts = [], []
    pos, n = 0, len(data)
    while pos < n:
        end = min(n, pos + SEGMENT)
        if end < n and not _WS[data[end]]:
            cut = max(data.rfind(bytes([b]), pos, end) for b in _WS_BYTES)
            if cut <= pos:  # no whitespace in a whole segment: one word longer than it
                stop = min((i for i in (data.find(bytes([b]), end) for b in _WS_BYTES) if i >= 0), default=n)
                word_start = pos + int(np.flatnonzero(~_WS[np.frombuffer(data, np.uint8, end - pos, pos)])[0])
                hashes.append(np.array([_long_word(data, word_start, stop)], dtype=_U))
                starts.append(np.array([word_start], dtype=np.int64))
                pos = stop
                continue
            end = cut
        h, s = _segment_words(np.frombuffer(data, dtype=np.uint8, count=end - pos, offset=pos), pos)
        hashes.append(h)
        starts.append(s)
        pos = end
    if not hashes:
        return np.zeros(0, dtype=_U), np.zeros(0, dtype=np.int64)
    return np.concatenate(hashes), np.concatenate(starts)


def signatures(texts: list[str]) -> np.ndarray:
    """The (len(texts), 128) uint32 MinHash signatures of the word 3-gram sets of ``texts``."""
    n = len(texts)
    joined = "\n".join(texts)
    if joined.isascii():
        data = joined.lower().encode("ascii")
        lengths = np.fromiter(map(len, texts), dtype=np.int64, count=n)
    else:  # lower() may change lengths and non-ASCII whitespace separates words too: let str.split() decide
        parts = [" ".join(t.lower().split()).encode() for t in texts]
        data = b"\n".join(parts)
        lengths = np.fromiter(map(len, parts), dtype=np.int64, count=n)
    del joined
    record_start = np.zeros(n, dtype=np.int64)
    np.cumsum(lengths[:-1] + 1, out=record_start[1:])
    wh, ws = word_hashes(data)
    del data
    counts = np.diff(np.searchsorted(ws, record_start), append=len(ws))
    rec = np.repeat(np.arange(n), counts)
    same = rec[:-2] == rec[2:]  # a 3-gram never spans two records
    shingles = ((wh[:-2] * _U(0x9E3779B97F4A7C15)) ^ (wh[1:-1] * _U(0xC2B2AE3D27D4EB4F))
                ^ (wh[2:] * _U(0x165667B19E3779F9)))[same]
    owner = rec[:-2][same]
    if (counts < 3).any():  # fewer than three words: the words themselves; no word at all: one fixed shingle
        few = counts[rec] < 3
        none = np.flatnonzero(counts == 0)
        shingles = np.concatenate((shingles, wh[few], np.zeros(len(none), dtype=_U)))
        owner = np.concatenate((owner, rec[few], none))
    sig = np.full(n * ROUNDS * BINS, EMPTY, dtype=np.uint32)
    for r, seed in enumerate(_SEEDS):
        h = _fmix(shingles ^ seed)
        cell = owner * (ROUNDS * BINS) + r * BINS + (h & _U(BINS - 1)).astype(np.int64)
        np.minimum.at(sig, cell, (h >> _U(32)).astype(np.uint32))
    sig = _densify(sig.reshape(n, ROUNDS, BINS))
    return np.ascontiguousarray(sig.transpose(0, 2, 1)).reshape(n, NUM_PERM)  # coordinate = bin * ROUNDS + round


def _densify(sig: np.ndarray) -> np.ndarray:
    """Fill empty bins: optimal densification, then (for the rare bin still empty) the next non-empty bin."""
    empty = sig == EMPTY
    if not empty.any():
        return sig
    out = sig.copy()
    rows, rounds, bins = np.nonzero(empty)
    for attempt in range(DENSIFY_ATTEMPTS):
        value = sig[rows, rounds, _DENSIFY[attempt, rounds, bins]]
        got = value != EMPTY
        out[rows[got], rounds[got], bins[got]] = value[got]
        keep = ~got
        rows, rounds, bins = rows[keep], rounds[keep], bins[keep]
        if not len(rows):
            return out
    for step in range(1, BINS):  # every round of every record has at least one non-empty bin
        value = sig[rows, rounds, (bins + step) % BINS]
        got = value != EMPTY
        out[rows[got], rounds[got], bins[got]] = value[got]
        keep = ~got
        rows, rounds, bins = rows[keep], rounds[keep], bins[keep]
        if not len(rows):
            break
    return out
