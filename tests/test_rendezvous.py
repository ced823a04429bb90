"""The nodes' agreement (issue 26), on loopback: every entry sealed with the cluster secret, node 0's challenge
against replays, and each way nodes can disagree refused in one sentence. Each guard with its bad case: a node
with another secret, a forged entry, a replayed one, a host reading the store; another recipe, other data,
other --processes, an undeclared member."""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading

import pytest

from appliance import cluster
from appliance.cluster import Topology
from appliance.errors import StageFailed
from appliance.train import launcher

MINE = {"address": "127.0.0.1", "recipe": "r" * 64, "data": "d" * 64, "processes": 1, "micro": 2, "accum": 2,
        "resume": False, "checkpoints": []}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nodes(secrets: list[bytes], before_node1=None, mine=MINE):
    """Node 0 and node 1 in two threads on one loopback store; ``before_node1(store)`` plays an attacker with a
    connection of its own. Returns each node's outcome: its list of entries, or the sentence it stopped with."""
    import torch.distributed as dist

    port = _port()
    rdzv = f"127.0.0.1:{port}"
    server = dist.TCPStore("127.0.0.1", port, None, True, datetime.timedelta(seconds=20), wait_for_workers=False)
    out: dict[int, object] = {}

    def node(rank: int) -> None:
        store = server if rank == 0 else dist.TCPStore("127.0.0.1", port, None, False, datetime.timedelta(seconds=20))
        try:
            out[rank] = launcher.exchange(store, Topology(1, 2, rank, rdzv), secrets[rank], mine, "127.0.0.1")
        except StageFailed as e:
            out[rank] = str(e)

    first = threading.Thread(target=node, args=(0,))
    first.start()
    if before_node1:
        attacker = dist.TCPStore("127.0.0.1", port, None, False, datetime.timedelta(seconds=20))
        attacker.wait(["appliance/agree/challenge"])
        before_node1(attacker)
    threads = [first]
    if not (before_node1 and getattr(before_node1, "replaces_node1", False)):
        threads.append(threading.Thread(target=node, args=(1,)))
        threads[-1].start()
    for t in threads:
        t.join(timeout=60)
    return out


@pytest.fixture(autouse=True)
def short_timeout(monkeypatch):
    monkeypatch.setattr(launcher, "RENDEZVOUS_TIMEOUT_S", 5)


def test_nodes_with_the_same_secret_agree_and_the_store_holds_only_ciphertext():
    secret = os.urandom(32)
    seen = {}

    def reader(store):  # a host that reaches the store but holds no secret, reading what node 0 said
        store.wait(["appliance/agree/0"])
        seen["entry"] = store.get("appliance/agree/0")
        seen["challenge"] = store.get("appliance/agree/challenge")

    out = _nodes([secret, secret], before_node1=reader)
    assert [n["data"] for n in out[0]] == [MINE["data"]] * 2 and out[1] == out[0]
    for raw in seen.values():
        assert MINE["data"].encode() not in raw and b"recipe" not in raw  # sealed: no digest, no field name


def test_a_node_with_another_secret_is_refused_by_both():
    out = _nodes([os.urandom(32), os.urandom(32)])
    assert "did not prove the cluster secret" in out[1]  # node 0's challenge does not open there
    assert "not every node joined" in out[0]  # and node 1 never said anything node 0 could open


def test_a_forged_entry_is_refused():
    def forge(store):
        store.set("appliance/agree/1", json.dumps({**MINE, "address": "127.0.0.1"}))  # plaintext, as before

    forge.replaces_node1 = True
    out = _nodes([os.urandom(32)] * 2, before_node1=forge)
    assert out[0].startswith("node 1's entry did not prove the cluster secret: refused"), out[0]


def test_an_entry_replayed_from_an_earlier_round_is_refused():
    secret = os.urandom(32)

    def replay(store):  # sealed with the right secret, for node 1, but carrying another round's challenge
        store.set("appliance/agree/1", cluster.seal(secret, "node/1", {**MINE, "challenge": "00" * 16}))

    replay.replaces_node1 = True
    out = _nodes([secret, secret], before_node1=replay)
    assert out[0].startswith("node 1's entry did not prove the cluster secret"), out[0]


def test_no_secret_is_one_sentence():
    with pytest.raises(StageFailed, match="needs the cluster secret"):
        launcher.exchange(None, Topology(1, 2, 0, "127.0.0.1:29400"), None, MINE, "127.0.0.1")


@pytest.mark.parametrize("field, value, words", [
    ("recipe", "x" * 64, "node 1 trains another recipe"),
    ("data", "y" * 64, "node 1 has other training data"),
    ("processes", 2, "node 1 runs 2 processes, this node 1"),
    ("resume", True, "node 1 resumes and this node does not"),
    ("address", "10.99.0.7", "node 1 joined from 10.99.0.7, which is not a declared peer"),
    ("micro", 1, "the nodes disagree on the effective batch"),
])
def test_each_disagreement_stops_the_run(home, field, value, words):
    other = {**MINE, field: value}
    with pytest.raises(StageFailed, match=words):
        launcher.decide([MINE, other], MINE, False, (2, 2))


def test_agreeing_nodes_take_the_smallest_micro_batch_and_the_newest_common_checkpoint(home):
    a = {**MINE, "resume": True, "checkpoints": [2, 4, 6]}
    b = {**MINE, "resume": True, "micro": 1, "accum": 4, "checkpoints": [2, 4]}
    assert launcher.decide([a, b], a, True, (2, 2)) == {"micro_batch_size": 1, "gradient_accumulation_steps": 4,
                                                         "checkpoint": "checkpoint-4", "nodes": ["127.0.0.1"] * 2}


def test_the_cluster_secret_is_kept_in_the_vault_and_shown_only_once(vault_home, tmp_path):
    from conftest import cli_json, run_cli

    made = cli_json("cluster", "secret", "create", "--file", str(tmp_path / "secret"), home=vault_home)
    assert made["secret"].startswith("acs1-") and oct((tmp_path / "secret").stat().st_mode & 0o777) == "0o600"
    assert made["secret"] not in (vault_home / "keyring.json").read_text()  # wrapped under the vault's key
    shown = cli_json("cluster", "secret", "show", home=vault_home)
    assert shown == {"fingerprint": made["fingerprint"]} and made["secret"] not in json.dumps(shown)
    bad = run_cli("cluster", "secret", "import", "--file", str(tmp_path / "nope"), home=vault_home, check=False)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    (tmp_path / "garbled").write_text("acs1-abc")
    bad = run_cli("cluster", "secret", "import", "--file", str(tmp_path / "garbled"), home=vault_home, check=False)
    assert bad.returncode == 2 and "damaged" in bad.stderr and "Traceback" not in bad.stderr
    from appliance.trust import audit

    log = (vault_home / "audit" / "log.jsonl").read_text()
    assert made["secret"] not in log and made["secret"][5:] not in log
    assert [e["details"]["action"] for e in audit.entries(event="cluster.secret")] == ["create"]


def test_training_across_machines_without_the_secret_is_one_sentence(tiny_home, tmp_path, demo_dataset):
    from conftest import run_cli, write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", demo_dataset, max_steps=2)
    proc = run_cli("train", str(recipe), "--nnodes", "2", "--node-rank", "0", "--rdzv", "127.0.0.1:29499",
                   home=tiny_home, check=False)
    assert proc.returncode == 2 and "needs the cluster secret in this vault" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    runs = tiny_home / "runs"
    assert not runs.exists() or not any(runs.iterdir())  # refused before anything was made
