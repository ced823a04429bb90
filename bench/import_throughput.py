"""Vault import and encryption throughput, ours vs plain baselines, from one run.

1. `appliance data import` of a generated JSONL dataset (default 100 MB of varied alpaca-style records):
   MB/s and records/s end to end, and the time per phase (parse: all passes over the file; validate;
   near-duplicate search; encryption). Baseline: only reading the file and `json.loads` of every line.
   Peak RSS of the process by the end of the import (the generator and the baseline stream, so this is the
   import's peak: its memory grows with the records' hashes and the LSH index, never with their text).
2. Near-duplicate search alone at 10k and 100k records (MinHash LSH should scale linearly).
3. Encryption and decryption of 256 MB with our chunked (Cobblestone-256) code vs one-shot AES-256-GCM
   from the same library (the floor any chunked scheme pays on top of).

    .venv/bin/python bench/import_throughput.py [--mb 100]     (--mb 1024 for the 1 GB run: a few minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import tempfile
import time
from pathlib import Path

from _common import machine

WORDS = ("the quarterly revenue report shows growth across regions while costs fell and margins improved "
         "customers asked about delivery times warranty coverage pricing tiers and support hours in detail "
         "engineers reviewed the incident timeline root cause mitigation and follow up actions for the service").split()


def generate(path: Path, mb: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    n = 0
    with open(path, "w") as f:
        while f.tell() < mb * 2**20:
            instruction = " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 120))) + f" (case {n})"
            output = " ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 200)))
            f.write(json.dumps({"instruction": instruction, "input": "", "output": output}) + "\n")
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=100)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="appliance-bench-vault-"))
    os.environ["APPLIANCE_HOME"] = str(home)
    from appliance.importer import import_dataset
    from appliance.trust import chunked, keyring

    vault = keyring.init("bench passphrase", kdf="argon2id")
    src = home / "source.jsonl"
    records = generate(src, args.mb)
    size = src.stat().st_size / 2**20
    print(f"vault import and encryption, {machine()}")

    t = time.perf_counter()
    with open(src, "rb") as f:
        for line in f:
            json.loads(line)
    baseline = time.perf_counter() - t
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    report = import_dataset(vault, src, "bench")
    ours = time.perf_counter() - t
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # generating and the baseline stream
    print(f"\n1. import of {size:.0f} MB, {records} records ({size * 2**20 / records / 1024:.1f} KiB each)")
    print(f"{'':34}{'MB/s':>8}{'records/s':>12}{'seconds':>10}")
    print(f"{'appliance data import':34}{size / ours:>8.1f}{records / ours:>12.0f}{ours:>10.1f}")
    print(f"{'baseline: read + json.loads':34}{size / baseline:>8.1f}{records / baseline:>12.0f}{baseline:>10.1f}")
    print("   time per phase: " + ", ".join(f"{k} {v:.1f} s" for k, v in report["seconds"].items()))
    print(f"   peak RSS of this process by the end of the import: {rss_peak:.0f} MB "
          f"({rss_before:.0f} MB before it: the interpreter and libraries)")

    print("\n2. near-duplicate search alone (batched one-permutation MinHash into datasketch's MinHashLSH, "
          "128 values, threshold 0.9)")
    from appliance.importer import _Clock, _NearDuplicates

    rng = random.Random(1)
    texts = [" ".join(rng.choice(WORDS) for _ in range(150)) + f" {i}" for i in range(100_000)]
    _NearDuplicates(0.9, _Clock()).flush()  # imports datasketch (and scipy) outside the timings
    for n in (10_000, 100_000):
        near = _NearDuplicates(0.9, _Clock())
        t = time.perf_counter()
        for i, text in enumerate(texts[:n]):
            near.add(i, f"text:{i}", text)
        near.flush()
        dt = time.perf_counter() - t
        print(f"   {n:>7} records: {dt:6.1f} s ({dt / n * 1e6:.0f} µs per record, "
              f"{len(near.duplicates)} near-duplicates)")

    del near, texts
    import gc

    gc.collect()  # the 100k sketches above would otherwise make every garbage collection below slow
    print("\n3. 256 MB in memory")
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    data = os.urandom(256 * 2**20)
    key = os.urandom(32)
    t = time.perf_counter()
    ct = chunked.encrypt(key, data, b"bench")
    enc = time.perf_counter() - t
    t = time.perf_counter()
    assert chunked.decrypt(key, ct, b"bench") == data
    dec = time.perf_counter() - t
    aead = AESGCM(key)
    t = time.perf_counter()
    one = aead.encrypt(b"\0" * 12, data, None)
    raw_enc = time.perf_counter() - t
    t = time.perf_counter()
    aead.decrypt(b"\0" * 12, one, None)
    raw_dec = time.perf_counter() - t
    print(f"{'':34}{'encrypt MB/s':>14}{'decrypt MB/s':>14}")
    print(f"{'chunked (Cobblestone-256)':34}{256 / enc:>14.0f}{256 / dec:>14.0f}")
    print(f"{'baseline: one-shot AES-256-GCM':34}{256 / raw_enc:>14.0f}{256 / raw_dec:>14.0f}")


if __name__ == "__main__":
    main()
