import os
import threading
import time

import pytest

from appliance import events as ev
from appliance.trust import manifest
from appliance.errors import CheckFailed, InvalidInput
from appliance.workspace import check_id, staging, write_atomic


def test_events_round_trip_and_torn_last_line_is_ignored(tmp_path):
    path = tmp_path / "events.jsonl"
    log = ev.EventLog(path)
    log(ev.Event("stage", "train", "starting"))
    log(ev.Event("progress", "train", data={"step": 1, "loss": 0.5}))
    with open(path, "ab") as f:
        f.write(b'{"type": "progress", "sta')  # a writer killed mid-line
    got = ev.read(path)
    assert [e.type for e in got] == ["stage", "progress"]
    assert got[1].data == {"step": 1, "loss": 0.5}


def test_follow_yields_appended_events_until_final(tmp_path):
    path = tmp_path / "events.jsonl"
    log = ev.EventLog(path)

    def writer():
        for i in range(3):
            time.sleep(0.05)
            log(ev.Event("progress", "train", data={"step": i}))
        log(ev.Event("finished", "train", "done"))

    threading.Thread(target=writer).start()
    seen = list(ev.follow(path, alive=lambda: True, poll=0.01))
    assert [e.type for e in seen] == ["progress"] * 3 + ["finished"]


def test_follow_stops_when_the_writer_dies_without_a_final_event(tmp_path):
    path = tmp_path / "events.jsonl"
    ev.EventLog(path)(ev.Event("progress", "train", data={"step": 1}))
    assert [e.data["step"] for e in ev.follow(path, alive=lambda: False, poll=0.01)] == [1]


def test_staging_leaves_nothing_under_the_final_name_on_failure(tmp_path):
    final = tmp_path / "artifact"
    with pytest.raises(RuntimeError):
        with staging(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 10)
            raise RuntimeError("crash mid-write")
    assert not final.exists()
    assert os.listdir(tmp_path) == []


def test_staging_publishes_complete_folder(tmp_path):
    final = tmp_path / "artifact"
    with staging(final) as tmp:
        (tmp / "a.txt").write_text("a")
    assert (final / "a.txt").read_text() == "a"


def test_write_atomic_replaces_whole_file(tmp_path):
    p = tmp_path / "f.json"
    write_atomic(p, "one")
    write_atomic(p, "two")
    assert p.read_text() == "two" and os.listdir(tmp_path) == ["f.json"]


def test_manifest_detects_changed_and_missing_files(vault_home, tmp_path):
    (tmp_path / "w.bin").write_bytes(b"weights")
    (tmp_path / "c.json").write_text("{}")
    manifest.write(tmp_path, "model", "m", hardware={})
    manifest.verify(tmp_path)
    (tmp_path / "w.bin").write_bytes(b"weightz")
    with pytest.raises(CheckFailed, match="does not match"):
        manifest.verify(tmp_path)
    (tmp_path / "w.bin").unlink()
    with pytest.raises(CheckFailed, match="missing"):
        manifest.verify(tmp_path)


@pytest.mark.parametrize("bad", ["", "../x", "A B", "x/y", ".hidden"])
def test_ids_are_checked(bad):
    with pytest.raises(InvalidInput):
        check_id(bad, "model name")


def test_staging_replace_keeps_the_old_artifact_when_the_redo_fails(tmp_path):
    final = tmp_path / "merged"
    with staging(final) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(RuntimeError):
        with staging(final, replace=True) as tmp:
            (tmp / "v").write_text("2")
            raise RuntimeError("the redo crashed")
    assert (final / "v").read_text() == "1"
    with staging(final, replace=True) as tmp:
        (tmp / "v").write_text("3")
    assert (final / "v").read_text() == "3" and os.listdir(tmp_path) == ["merged"]


def test_following_starts_at_the_latest_attempt(tmp_path):
    path = tmp_path / "events.jsonl"
    log = ev.EventLog(path)
    log(ev.Event("stage", "train", data={"resume": False}))
    log(ev.Event("failed", "train", "first attempt died"))
    log(ev.Event("stage", "train", data={"resume": True}))
    log(ev.Event("progress", "train", data={"step": 5}))
    log(ev.Event("finished", "train"))
    start = ev.last_offset(path, lambda e: e.type == "stage" and "resume" in e.data)
    got = list(ev.follow(path, alive=lambda: True, poll=0.01, start=start))
    assert [e.type for e in got] == ["stage", "progress", "finished"]
