"""Two machines as two network namespaces joined by a veth pair (as root): the declared cluster, the egress guard
allowing exactly the declared peers, and a run across both that matches one process at the doubled batch.

Nothing here leaves the machine: the namespaces have no route but their veth link, and the addresses
(10.77.0.1, 10.77.0.2) exist only inside them."""

import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from conftest import APPLIANCE, PASSPHRASE, cli_json, run_cli
from test_ddp import REL_TOLERANCE, _curve, _recipe

NODE0, NODE1, STRANGER = "10.77.0.1", "10.77.0.2", "10.77.0.3"


def _can_make_namespaces() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    name = f"apptest-{uuid.uuid4().hex[:6]}"
    ok = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ok


pytestmark = pytest.mark.skipif(not _can_make_namespaces(), reason="needs root and `ip netns` (network namespaces)")


@pytest.fixture
def two_machines():
    """Namespaces A and B, joined by a veth pair: A has 10.77.0.1, B has 10.77.0.2; loopback up in each."""
    tag = uuid.uuid4().hex[:6]
    a, b = f"appA-{tag}", f"appB-{tag}"
    cmds = [["ip", "netns", "add", a], ["ip", "netns", "add", b],
            ["ip", "link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}"],
            ["ip", "link", "set", f"va{tag}", "netns", a], ["ip", "link", "set", f"vb{tag}", "netns", b],
            ["ip", "-n", a, "addr", "add", f"{NODE0}/24", "dev", f"va{tag}"],
            ["ip", "-n", b, "addr", "add", f"{NODE1}/24", "dev", f"vb{tag}"],
            ["ip", "-n", a, "link", "set", f"va{tag}", "up"], ["ip", "-n", b, "link", "set", f"vb{tag}", "up"],
            ["ip", "-n", a, "link", "set", "lo", "up"], ["ip", "-n", b, "link", "set", "lo", "up"]]
    try:
        for c in cmds:
            subprocess.run(c, check=True, capture_output=True)
        yield (a, f"va{tag}"), (b, f"vb{tag}")
    finally:
        subprocess.run(["ip", "netns", "del", a], capture_output=True)
        subprocess.run(["ip", "netns", "del", b], capture_output=True)


def _in(ns: str, *args: str, home, check=True, env=None):
    full = {**os.environ, "APPLIANCE_HOME": str(home), **(env or {})}
    p = subprocess.run(["ip", "netns", "exec", ns, *args], capture_output=True, text=True, env=full, timeout=900)
    if check and p.returncode:
        raise AssertionError(f"{args} in {ns} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


GUARD_PROBE = r"""
import json, socket, sys
import appliance
from appliance import cluster
from appliance.trust import egress
cluster.enable()
out = {}
for host, port in ((sys.argv[1], int(sys.argv[2])), (sys.argv[1], int(sys.argv[2]) + 1), (sys.argv[3], 9)):
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect((host, port))
        out[f"{host}:{port}"] = "connected"
    except egress.EgressBlocked:
        out[f"{host}:{port}"] = "guard"
    except OSError as e:
        out[f"{host}:{port}"] = "system"  # the guard let it through; nothing listens there
    finally:
        s.close()
print(json.dumps(out))
"""


def test_the_guard_allows_exactly_the_declared_peers(two_machines, home):
    (a, _), _ = two_machines
    run_cli("cluster", "allow", f"{NODE1}:29400", home=home)
    probe = _in(a, sys.executable, "-c", GUARD_PROBE, NODE1, "29400", STRANGER, home=home)
    seen = json.loads(probe.stdout)
    # the declared peer at its declared port: let through (refused by the kernel: nothing listens); another port of
    # the same peer, and an undeclared address: refused by the guard, and recorded
    assert seen == {f"{NODE1}:29400": "system", f"{NODE1}:29401": "guard", f"{STRANGER}:9": "guard"}, seen
    from appliance.trust import audit

    blocked = [(e["details"]["address"], e["details"]["port"]) for e in audit.entries(event="network.blocked")]
    assert (NODE1, 29401) in blocked and (STRANGER, 9) in blocked
    assert [e["details"]["peers"] for e in audit.entries(event="cluster.allow")] == [[f"{NODE1}:29400"]]
    # without the declaration, the same process may not reach the peer at all
    run_cli("cluster", "revoke", NODE1, home=home)
    again = json.loads(_in(a, sys.executable, "-c", GUARD_PROBE, NODE1, "29400", STRANGER, home=home).stdout)
    assert set(again.values()) == {"guard"}, again
    run_cli("cluster", "allow", f"{NODE1}:29400", home=home)
    doctor = json.loads(run_cli("doctor", "--json", home=home, check=False).stdout)
    assert doctor["sections"]["air-gap"]["cluster_peers"]["value"] == [f"{NODE1}:29400"]
    link = doctor["sections"]["air-gap"]["cluster_link"]
    assert link["status"] == "warn" and "WireGuard" in link["detail"]  # the gradients' path is named


def _workspace(path, tiny_model_dir, secret_file):
    run_cli("vault", "init", "--kdf", "pbkdf2-sha256", home=path, input=PASSPHRASE + "\n" + PASSPHRASE + "\n")
    run_cli("models", "import", str(tiny_model_dir), "--name", "tiny", home=path)
    run_cli("cluster", "allow", f"{NODE0}:29400", NODE1, home=path)
    if secret_file.exists():  # the other machines take the secret the first one made
        run_cli("cluster", "secret", "import", "--file", str(secret_file), home=path)
    else:
        run_cli("cluster", "secret", "create", "--file", str(secret_file), home=path)
    return path


def test_two_machines_over_a_veth_pair_train_together(two_machines, home, tmp_path, demo_dataset, tiny_model_dir,
                                                     monkeypatch):
    (a, va), (b, vb) = two_machines
    secret = tmp_path / "cluster-secret"
    homes = [_workspace(tmp_path / "machine-a", tiny_model_dir, secret),
             _workspace(tmp_path / "machine-b", tiny_model_dir, secret)]
    common = {"max_steps": 4, "save_steps": 2, "eval_steps": 100}
    single = cli_json("train", str(_recipe(tmp_path / "one.yaml", demo_dataset, micro_batch_size=4, **common)),
                      home=homes[0])
    recipe = _recipe(tmp_path / "nodes.yaml", demo_dataset, micro_batch_size=2, **common)
    ids = []
    for rank, (ns, h) in enumerate(zip((a, b), homes)):
        out = _in(ns, *APPLIANCE, "train", str(recipe), "--nnodes", "2", "--node-rank", str(rank), "--rdzv",
                  f"{NODE0}:29400", "--detach", "--json", home=h)
        ids.append(json.loads(out.stdout)["run"])
    deadline, done = time.time() + 600, [None, None]
    while time.time() < deadline and not all(done):
        for i, (h, r) in enumerate(zip(homes, ids)):
            st = cli_json("runs", "show", r, home=h)
            if st["state"] in ("finished", "failed", "interrupted"):
                done[i] = st
        time.sleep(0.5)
    assert [d and d["state"] for d in done] == ["finished", "finished"], done
    one = _curve(homes[0], single["id"])
    for h, r, iface in zip(homes, ids, (va, vb)):
        curve = _curve(h, r)
        assert sorted(curve) == sorted(one) == [1, 2, 3, 4]
        for step, (x, _) in one.items():
            assert abs(curve[step][0] - x) <= REL_TOLERANCE * abs(x), (step, x, curve[step][0])
        from appliance import events

        start = next(e for e in events.read(h / "runs" / r / "events.jsonl") if e.type == "stage" and "nodes" in e.data)
        assert f"gloo on {iface}" in start.message, start.message  # the collectives were tied to the veth
    # nothing was refused: everything the runs did was with declared peers (a refusal would be in the log)
    from appliance.trust import audit

    for h in homes:
        monkeypatch.setenv("APPLIANCE_HOME", str(h))
        assert audit.entries(event="network.blocked") == []
        assert [e["details"].get("nodes") for e in audit.entries(event="train.finish")][-1] == 2


# -- a third machine, not a member -------------------------------------------------------------------------------

STRANGER_LINK = "10.77.1.3"

NODE0_EXCHANGE = r"""
import os, sys
import appliance
from appliance import cluster
from appliance.cluster import Topology
from appliance.train import launcher
launcher.RENDEZVOUS_TIMEOUT_S = 60
cluster.enable(sys.argv[1])
topology = Topology(1, 2, 0, f"{sys.argv[1]}:29400")
store = launcher._store(topology, sys.argv[1], 29400)
mine = {"address": sys.argv[1], "data": "d" * 64}
try:
    launcher.exchange(store, topology, bytes.fromhex(sys.argv[2]), mine, sys.argv[1])
    print("agreed")
except Exception as e:
    print("refused:", e)
"""

STRANGER = r"""
import datetime, json, sys, time
import torch.distributed as dist
store = None
for _ in range(100):  # until node 0 listens
    try:
        store = dist.TCPStore(sys.argv[1], 29400, None, False, datetime.timedelta(seconds=5))
        break
    except Exception:
        time.sleep(0.2)
store.wait(["appliance/agree/0"])
said = store.get("appliance/agree/0")
store.set("appliance/agree/1", json.dumps({"address": sys.argv[2], "data": "d" * 64}))  # no secret to seal it
print(json.dumps({"read_digest": b"d" * 64 in said}))
time.sleep(3)  # stay connected while node 0 looks at who is
"""


@pytest.fixture
def stranger(two_machines):
    """A third namespace joined to machine A by a veth link of its own (A: 10.77.1.1, C: 10.77.1.3), with a route
    to A's cluster address: it reaches node 0's rendezvous but is no member."""
    (a, _), _ = two_machines
    tag = uuid.uuid4().hex[:6]
    c = f"appC-{tag}"
    cmds = [["ip", "netns", "add", c], ["ip", "link", "add", f"xa{tag}", "type", "veth", "peer", "name", f"xc{tag}"],
            ["ip", "link", "set", f"xa{tag}", "netns", a], ["ip", "link", "set", f"xc{tag}", "netns", c],
            ["ip", "-n", a, "addr", "add", "10.77.1.1/24", "dev", f"xa{tag}"],
            ["ip", "-n", c, "addr", "add", f"{STRANGER_LINK}/24", "dev", f"xc{tag}"],
            ["ip", "-n", a, "link", "set", f"xa{tag}", "up"], ["ip", "-n", c, "link", "set", f"xc{tag}", "up"],
            ["ip", "-n", c, "link", "set", "lo", "up"],
            ["ip", "-n", c, "route", "add", "10.77.0.0/24", "dev", f"xc{tag}"]]
    try:
        for cmd in cmds:
            subprocess.run(cmd, check=True, capture_output=True)
        yield c
    finally:
        subprocess.run(["ip", "netns", "del", c], capture_output=True)


def test_a_third_machine_at_the_rendezvous_is_refused_by_its_address(two_machines, stranger, vault_home, tmp_path):
    """The stranger reaches node 0's store: it reads only ciphertext, and its entry (it has no secret) stops the
    run with a sentence naming its real address: first as an undeclared host, then, declared, as one that did
    not prove the secret."""
    (a, _), _ = two_machines
    home = vault_home
    run_cli("cluster", "allow", f"{NODE0}:29400", NODE1, home=home)
    secret = os.urandom(32).hex()
    outcomes = []
    for declared in (False, True):
        if declared:
            run_cli("cluster", "allow", STRANGER_LINK, home=home)
        node0 = subprocess.Popen(["ip", "netns", "exec", a, sys.executable, "-c", NODE0_EXCHANGE, NODE0, secret],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "APPLIANCE_HOME": str(home)})
        intruder = _in(stranger, sys.executable, "-c", STRANGER, NODE0, NODE1, home=tmp_path / "nobody")
        out, err = node0.communicate(timeout=120)
        outcomes.append((out.strip(), json.loads(intruder.stdout)))
    (first, seen1), (second, seen2) = outcomes
    assert seen1 == seen2 == {"read_digest": False}  # what node 0 said is sealed
    assert first == (f"refused: the rendezvous has a connection from {STRANGER_LINK}, which is not a declared member "
                     "of this cluster: refused. If it is one, `appliance cluster allow` it here."), first
    assert second.startswith(f"refused: node 1's entry (connected from {STRANGER_LINK}) did not prove the cluster "
                             "secret: refused."), second
