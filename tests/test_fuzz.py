"""Property-based tests: whatever the input, the importer and the decryptor end in a clean error or a correct result."""

import io
import itertools
import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from appliance.errors import ApplianceError
from appliance.importer import import_dataset
from appliance.trust import chunked, keyring, store

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_names = (f"fuzz{i}" for i in itertools.count())

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(
        st.sampled_from(["messages", "role", "content", "instruction", "input", "output", "prompt", "completion",
                         "chosen", "rejected", "conversations", "from", "value", "system", "x"]) | st.text(max_size=8),
        children, max_size=6),
    max_leaves=25)


@pytest.fixture
def vault(home):
    return keyring.init("correct horse", kdf="argon2id")


def _import(vault, path, **kw):
    try:
        report = import_dataset(vault, path, next(_names), **kw)
    except ApplianceError:
        return None
    assert report["records_read"] >= sum(report["imported"].values())
    return report


@FUZZ
@given(st.lists(json_values, min_size=1, max_size=12))
def test_importer_on_random_json_shapes(vault, tmp_path, values):
    path = tmp_path / "random.jsonl"
    path.write_text("".join(json.dumps(v) + "\n" for v in values))
    _import(vault, path)
    arr = tmp_path / "random.json"
    arr.write_text(json.dumps(values))
    _import(vault, arr)


@FUZZ
@given(st.binary(max_size=2000), st.sampled_from([".jsonl", ".json", ".csv"]))
def test_importer_on_random_bytes(vault, tmp_path, data, suffix):
    path = tmp_path / f"random{suffix}"
    path.write_bytes(data)
    _import(vault, path)
    _import(vault, path, salvage=True)


RECORDS = [{"instruction": f"please explain the topic number {i} in a few careful words", "output": f"ok {i}"}
           for i in range(12)]
VALID = json.dumps(RECORDS, indent=1)


def imported(report) -> int:
    return sum(report["imported"].values())


@FUZZ
@given(st.lists(json_values, max_size=12), st.randoms(use_true_random=False))
def test_importer_keeps_every_valid_record_among_random_ones(vault, tmp_path, junk, rnd):
    """Whatever surrounds them, the valid records are imported: a clean error is not enough (an importer that
    rejected everything would pass the tests above)."""
    lines = [json.dumps(r) for r in RECORDS] + [json.dumps(v) for v in junk]
    rnd.shuffle(lines)
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = _import(vault, path, fmt="alpaca")
    assert report is not None, "valid records among random ones were refused"
    assert report["records_read"] == len(lines)
    assert imported(report) >= len(RECORDS)  # (a random value may happen to be a valid record too)
    assert imported(report) + sum(report["rejected"].values()) == len(lines)


@FUZZ
@given(st.integers(min_value=1, max_value=len(VALID)))
def test_importer_on_random_truncations(vault, tmp_path, cut):
    path = tmp_path / "cut.json"
    path.write_text(VALID[:cut])
    plain = _import(vault, path)
    salvaged = _import(vault, path, salvage=True)
    whole = cut > VALID.rindex("]")
    assert (plain is not None) == whole  # only the complete array imports without --salvage, and it does
    if whole:
        assert imported(plain) == len(RECORDS)
    complete = VALID[:cut].count("}")  # the records that end before the cut
    if complete:
        assert salvaged is not None and imported(salvaged) == complete, (cut, complete)
    else:
        assert salvaged is None


KEY = bytes(range(32))
MESSAGE = bytes(i % 251 for i in range(40000))  # three chunks
CIPHERTEXT = chunked.encrypt(KEY, MESSAGE, b"ctx")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "delete"]),
                          st.integers(min_value=0, max_value=len(CIPHERTEXT) - 1),
                          st.integers(min_value=1, max_value=255)), min_size=1, max_size=4))
def test_decryptor_on_random_mutations(mutations):
    data = bytearray(CIPHERTEXT)
    for kind, at, value in mutations:
        at %= max(len(data), 1)
        if kind == "flip" and data:
            data[at] ^= value
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = bytes([value])
        elif kind == "delete" and data:
            del data[at]
    try:
        assert chunked.decrypt(KEY, bytes(data), b"ctx") == MESSAGE and bytes(data) == CIPHERTEXT
    except chunked.DecryptionError:
        pass
    reader = chunked.DecryptingReader(KEY, io.BytesIO(bytes(data)), b"ctx")
    out = bytearray()
    try:
        while block := reader.read(7000):
            out += block
    except chunked.DecryptionError:
        assert MESSAGE.startswith(bytes(out))  # only authenticated prefixes are ever handed out
    else:
        assert bytes(out) == MESSAGE


def test_store_read_of_a_mutated_file_is_a_clean_error(vault):
    from appliance.errors import CheckFailed

    store.write(vault, "d", {"train": [{"messages": [{"role": "user", "content": "q" * 100},
                                                     {"role": "assistant", "content": "a"}]}] * 300}, hardware={})
    path = store.dataset_dir("d") / "train.c2sp"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CheckFailed):
        list(store.read(vault, "d", "train"))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=3 * chunked.CHUNK_SIZE), max_size=8))
def test_streaming_encryption_in_any_pieces_equals_one_shot(sizes):
    data = bytes(i % 253 for i in range(sum(sizes)))
    enc = chunked.Encryptor(KEY, b"ctx", salt=bytes(24))
    out, at = [enc.header], 0
    for n in sizes:
        out.append(enc.update(data[at:at + n]))
        at += n
    out.append(enc.finalize())
    assert b"".join(out) == chunked.encrypt(KEY, data, b"ctx", salt=bytes(24))
    assert chunked.decrypt(KEY, b"".join(out), b"ctx") == data
