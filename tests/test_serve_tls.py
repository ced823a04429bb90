"""Serving beyond loopback (issue 26): only on an address of one of this machine's interfaces, declared by the
operator, and with TLS unless the operator accepts clear text with --insecure (audited).

The "network" is a namespace made here with one interface (10.78.0.1, a veth link to an empty namespace): nothing in it can reach another
machine, and the client runs inside it too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest

from tests.conftest import cli_json
from tests.test_serve import Served

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="needs root and `ip netns` (network namespaces)")

ADDRESS = "10.78.0.1"

CLIENT = r"""
import json, ssl, sys, httpx
url, key, pinned, other = sys.argv[1:5]
out = {}
auth = {"Authorization": f"Bearer {key}"}
out["pinned"] = httpx.get(url + "/models", headers=auth, verify=pinned).status_code
for name, verify in (("system_trust", True), ("another_cert", other)):
    try:
        httpx.get(url + "/models", headers=auth, verify=verify)
        out[name] = "accepted"
    except httpx.ConnectError as e:
        out[name] = "refused" if "CERTIFICATE_VERIFY_FAILED" in str(e) else f"error: {e}"
try:
    httpx.get(url.replace("https://", "http://") + "/models", headers=auth)
    out["plain_http"] = "accepted"
except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError):
    out["plain_http"] = "refused"
print(json.dumps(out))
"""


@pytest.fixture
def namespace():
    """A namespace whose one interface (10.78.0.1) is a veth link to a second, empty namespace."""
    tag = uuid.uuid4().hex[:6]
    name, peer = f"apptls-{tag}", f"apptlsp-{tag}"
    cmds = [["ip", "netns", "add", name], ["ip", "netns", "add", peer], ["ip", "-n", name, "link", "set", "lo", "up"],
            ["ip", "link", "add", f"ta{tag}", "type", "veth", "peer", "name", f"tb{tag}"],
            ["ip", "link", "set", f"ta{tag}", "netns", name], ["ip", "link", "set", f"tb{tag}", "netns", peer],
            ["ip", "-n", name, "addr", "add", f"{ADDRESS}/24", "dev", f"ta{tag}"],
            ["ip", "-n", name, "link", "set", f"ta{tag}", "up"]]
    try:
        for c in cmds:
            subprocess.run(c, check=True, capture_output=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "netns", "del", peer], capture_output=True)


def _in(ns: str, home, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["ip", "netns", "exec", ns, *args], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "APPLIANCE_HOME": str(home)})
    if check and p.returncode:
        raise AssertionError(f"{args} exited {p.returncode}: {p.stderr}")
    return p


def test_beyond_loopback_only_a_local_interface_and_only_with_tls(exported_home, namespace, tmp_path):
    home, run_id = exported_home
    key = cli_json("serve", "keys", "create", "--tenant", "acme", home=home)["key"]
    cli = [sys.executable, "-m", "appliance.cli"]

    elsewhere = _in(namespace, home, *cli, "serve", "allow", "10.78.0.9", check=False)  # on the link, not ours
    assert elsewhere.returncode == 2 and "not an address of this machine's interfaces" in elsewhere.stderr
    _in(namespace, home, *cli, "serve", "allow", ADDRESS)

    clear = _in(namespace, home, *cli, "serve", run_id, "--host", ADDRESS, "--port", "0", check=False)
    assert clear.returncode == 2 and "--tls-cert/--tls-key" in clear.stderr and "--insecure" in clear.stderr

    made = json.loads(_in(namespace, home, *cli, "serve", "cert", "--host", ADDRESS, "--json").stdout)
    assert oct(os.stat(made["key"]).st_mode & 0o777) == "0o600" and len(made["sha256"].split(":")) == 32
    other = json.loads(_in(namespace, home, *cli, "serve", "cert", "--host", ADDRESS, "--out", str(tmp_path),
                           "--json").stdout)

    server = Served(home, run_id, "--host", ADDRESS, "--tls-cert", made["cert"], "--tls-key", made["key"],
                    "--parallel", "1", "--ctx", "256", inside=namespace)
    try:
        assert server.url.startswith(f"https://{ADDRESS}:") and server.ready["tls"] == made["sha256"]
        seen = json.loads(_in(namespace, home, sys.executable, "-c", CLIENT, server.url, key, made["cert"],
                              other["cert"]).stdout)
    finally:
        rc, err = server.stop()
    assert rc == 0, err
    assert seen == {"pinned": 200, "system_trust": "refused", "another_cert": "refused", "plain_http": "refused"}

    # Clear text only when the operator says so, and then the audit log says it too.
    server = Served(home, run_id, "--host", ADDRESS, "--insecure", "--parallel", "1", "--ctx", "256",
                    inside=namespace)
    server.stop()
    from appliance.trust import audit

    starts = [e["details"] for e in audit.entries(event="serve.start")]
    assert [(s["tls"], s["insecure"]) for s in starts] == [(made["sha256"], False), (None, True)]
    assert audit.entries(event="serve.tls.create")[0]["details"]["sha256"] == made["sha256"]
