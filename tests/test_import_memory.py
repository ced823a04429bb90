"""`appliance data import` keeps memory bounded by the number of records, never by their text.

Two real imports (the CLI in a fresh process, measured by a parent that reports its child's peak RSS) of
generated files of 20 and 60 MB with ~12 KiB records. What an import keeps per record until its end: the
record's sha256 (exact duplicates) and its prompt's and answer's (conflicts), its index in a few lists and
dicts, and, for a record kept, its place ("file:line") and its entries in the MinHash LSH index (5 band keys
and the bucket sets of datasketch's MinHashLSH: ~1.7 KiB). Measured ~2.7 KiB a record in all; the bound
below allows 4 KiB a record plus 16 MiB for the allocator and buffers, which is well under the text: an
import that kept each record's text (12 KiB as UTF-8, more as Python objects) would grow by more than the
40 MB between the two files, and fails both checks.
"""

import json
import os
import random
import subprocess
import sys

from conftest import APPLIANCE

PER_RECORD = 4 * 1024
SLACK = 16 * 2**20
WORDS = ("the quarterly revenue report shows growth across regions while costs fell and margins improved "
         "customers asked about delivery times warranty coverage pricing tiers and support hours in detail").split()


def _generate(path, mb: int) -> int:
    rng = random.Random(mb)
    n = 0
    with open(path, "w") as f:
        while f.tell() < mb * 2**20:
            instruction = " ".join(rng.choice(WORDS) for _ in range(rng.randint(300, 700))) + f" (case {n})"
            output = " ".join(rng.choice(WORDS) for _ in range(rng.randint(600, 1200)))
            f.write(json.dumps({"instruction": instruction, "input": "", "output": output}) + "\n")
            n += 1
    return n


def _peak_rss_of_import(src, name, env) -> int:
    """Peak RSS in bytes of `appliance data import` run in a fresh child of a fresh parent."""
    probe = ("import resource, subprocess, sys\n"
             "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
             "assert p.returncode == 0, p.stdout + p.stderr\n"
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    out = subprocess.run([sys.executable, "-c", probe, *APPLIANCE, "data", "import", str(src), "--name", name],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1]) * 1024  # ru_maxrss is in KiB on Linux


def test_peak_memory_grows_with_records_not_with_their_text(home, tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("correct horse\n")
    env = {**os.environ, "APPLIANCE_HOME": str(home), "APPLIANCE_PASSPHRASE_FILE": str(pw)}
    # PBKDF2, not the default scrypt: scrypt's 128 MiB at unlock would be the peak of both imports and hide them.
    subprocess.run([*APPLIANCE, "vault", "init", "--kdf", "pbkdf2-sha256"], env=env, check=True,
                   capture_output=True, input="")
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    n_small, n_large = _generate(small, 20), _generate(large, 60)
    peak_small = _peak_rss_of_import(small, "small", env)
    peak_large = _peak_rss_of_import(large, "large", env)
    growth = peak_large - peak_small
    more_bytes = large.stat().st_size - small.stat().st_size
    bound = (n_large - n_small) * PER_RECORD + SLACK
    print(f"peak RSS {peak_small / 2**20:.0f} MB -> {peak_large / 2**20:.0f} MB for {n_small} -> {n_large} records")
    assert growth <= bound, f"peak RSS grew {growth / 2**20:.1f} MB, bound {bound / 2**20:.1f} MB"
    assert growth < more_bytes / 2, f"peak RSS grew {growth / 2**20:.1f} MB for {more_bytes / 2**20:.0f} MB more input"
