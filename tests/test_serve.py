"""`appliance serve`: the official OpenAI client against the real gateway and the real llama-server, on loopback.

One server (the exported tiny run, 2 slots) is started through the real CLI for the module; the tests talk to it
with the `openai` package as an application would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import APPLIANCE, cli_json, run_cli

# What llama.cpp computes: scripts/test.sh runs these once more on its baseline x64 kernels (issue 33).
pytestmark = pytest.mark.llama

import openai  # noqa: E402  (pinned in the test extra: a missing one is an error, not a skip)


class Served:
    """A running `appliance serve` child: its first JSON line says where it listens."""

    def __init__(self, home: Path, *args: str, env: dict | None = None, netns: bool = False,
                 inside: str | None = None):
        cmd = [*APPLIANCE, "serve", *args, "--port", "0", "--json"]
        if netns:
            cmd = ["unshare", "-n", *cmd]
        if inside:  # a named network namespace
            cmd = ["ip", "netns", "exec", inside, *cmd]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "APPLIANCE_HOME": str(home), **(env or {})})
        self.out: list[str] = []
        self.ready: dict | None = None
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 180
        while self.ready is None:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}: {self.proc.stderr.read()}")
            assert time.monotonic() < deadline, "serve did not become ready"
            time.sleep(0.1)
        self.url = self.ready["url"]

    def _read(self) -> None:
        buf = ""
        for line in self.proc.stdout:
            self.out.append(line)
            buf += line
            if self.ready is None and line.startswith("}"):
                self.ready = json.loads(buf)
                buf = ""

    def stop(self, sig: int = signal.SIGINT) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return self.proc.returncode, self.proc.stderr.read()


@pytest.fixture(scope="module")
def served(exported_workspace, tmp_path_factory):
    """The exported run served with two keys of two tenants; yields (home, run id, server, keys)."""
    import shutil

    src, run_id = exported_workspace
    home = tmp_path_factory.mktemp("serve") / "home"
    shutil.copytree(src, home, symlinks=True)
    made = {t: cli_json("serve", "keys", "create", "--tenant", t, home=home)["key"] for t in ("acme", "globex")}
    server = Served(home, run_id, "--parallel", "2", "--ctx", "512")
    yield home, run_id, server, made
    server.stop()


def client(server: Served, key: str):
    return openai.OpenAI(base_url=server.url, api_key=key, max_retries=0, timeout=120)


def test_the_openai_client_chats_streams_and_lists_models(served):
    home, run_id, server, made = served
    c = client(server, made["acme"])
    assert [m.id for m in c.models.list().data] == [run_id]

    reply = c.chat.completions.create(model=run_id, messages=[{"role": "user", "content": "Say hello."}],
                                      max_tokens=8, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens >= 1 and reply.usage.prompt_tokens > 3

    pieces = []
    for chunk in c.chat.completions.create(model=run_id, messages=[{"role": "user", "content": "Say hello."}],
                                           max_tokens=8, temperature=0, stream=True):
        assert chunk.usage is None  # the gateway asks llama-server for usage; a client that did not, gets none
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) == reply.choices[0].message.content  # greedy: the same answer, streamed

    chunks = list(c.chat.completions.create(model=run_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1

    done = c.completions.create(model=run_id, prompt="The capital of", max_tokens=4, temperature=0)
    assert done.choices[0].text is not None and done.usage.completion_tokens >= 1


def test_a_wrong_key_gets_401_and_an_unknown_model_404(served):
    home, run_id, server, made = served
    with pytest.raises(openai.AuthenticationError) as e:
        client(server, "apk-acme-not-a-key").models.list()
    assert e.value.status_code == 401
    with pytest.raises(openai.NotFoundError) as e:
        client(server, made["acme"]).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 404 and "gpt-4o" in str(e.value)
    import httpx

    bare = httpx.post(server.url + "/chat/completions", json={"model": run_id, "messages": []})  # no key at all
    assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url.removesuffix("/v1") + "/health").json() == {"status": "ok"}  # the one open route
    assert httpx.get(server.url + "/slots", headers={"Authorization": f"Bearer {made['acme']}"}).status_code == 404


def test_a_revoked_key_stops_working_at_once(served):
    home, run_id, server, _ = served
    key = cli_json("serve", "keys", "create", "--tenant", "initech", home=home)
    assert [m.id for m in client(server, key["key"]).models.list().data] == [run_id]
    run_cli("serve", "keys", "revoke", key["id"], home=home)
    with pytest.raises(openai.AuthenticationError):
        client(server, key["key"]).models.list()


def test_requests_answered_together_are_not_cut_short(served):
    """Two streams at once on two slots: they overlap (each one's first token arrives before the other's last)
    and both finish with their full length (llama-cpp-python's server would interrupt the first when the second
    arrives)."""
    home, run_id, server, made = served
    results: dict[str, tuple[str | None, int, float, float]] = {}
    barrier = threading.Barrier(2)

    def one(tenant: str) -> None:
        reason, n, first, last = None, 0, None, None
        barrier.wait()
        for chunk in client(server, made[tenant]).chat.completions.create(
                model=run_id, messages=[{"role": "user", "content": f"Tell {tenant} a story."}], max_tokens=300,
                temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.monotonic()
                last = time.monotonic()
            if chunk.choices and chunk.choices[0].finish_reason:
                reason = chunk.choices[0].finish_reason
            if chunk.usage:
                n = chunk.usage.completion_tokens
        results[tenant] = (reason, n, first, last)

    threads = [threading.Thread(target=one, args=(t,)) for t in ("acme", "globex")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    (ra, na, fa, la), (rb, nb, fb, lb) = results["acme"], results["globex"]
    assert (ra, na) == ("length", 300) and (rb, nb) == ("length", 300)
    assert fa < lb and fb < la, "the two answers did not overlap: they were served one after the other"


def test_keys_are_printed_once_and_kept_only_as_hashes(home):
    made = cli_json("serve", "keys", "create", "--tenant", "acme", home=home)
    assert made["key"].startswith("apk-acme-") and len(made["key"]) > 40
    stored = (home / "serve" / "keys.json").read_text()
    assert made["key"] not in stored and made["key"].split("-", 2)[2] not in stored
    assert oct((home / "serve" / "keys.json").stat().st_mode & 0o777) == "0o600"
    listed = cli_json("serve", "keys", "list", home=home)["keys"]
    assert listed == [{"id": made["id"], "tenant": "acme", "created": made["created"], "revoked": None}]
    assert made["key"] not in json.dumps(listed)
    bad = run_cli("serve", "keys", "create", "--tenant", "Bad Name", home=home, check=False)
    assert bad.returncode == 2 and "tenant 'Bad Name' is not a valid name" in bad.stderr and "Traceback" not in bad.stderr
    gone = run_cli("serve", "keys", "revoke", "nobody", home=home, check=False)
    assert gone.returncode == 2 and "no active key" in gone.stderr
    run_cli("serve", "keys", "revoke", "acme", home=home)
    assert cli_json("serve", "keys", "list", home=home)["keys"][0]["revoked"]
    from appliance.trust import audit

    events = [(e["event"], e["details"].get("tenant")) for e in audit.entries() if e["event"].startswith("serve.")]
    assert events == [("serve.key.create", "acme"), ("serve.key.revoke", "acme")]
    assert made["key"] not in (home / "audit" / "log.jsonl").read_text()


def test_serve_refuses_without_keys_and_names_what_to_do(exported_home):
    home, run_id = exported_home
    proc = run_cli("serve", run_id, "--port", "0", home=home, check=False)
    assert proc.returncode == 2 and "serve keys create --tenant" in proc.stderr
    proc = run_cli("serve", "no-such-run", "--port", "0", home=home, check=False)
    assert proc.returncode == 2 and "neither a .gguf file, a run id nor a model id" in proc.stderr
    cli_json("serve", "keys", "create", "--tenant", "acme", home=home)
    proc = run_cli("serve", run_id, "--port", "0", "--adapter", "acme", home=home, check=False)
    assert proc.returncode == 2 and "TENANT=RUN" in proc.stderr


def test_usage_per_tenant_goes_to_the_audit_log_without_text(exported_home):
    home, run_id = exported_home
    key = cli_json("serve", "keys", "create", "--tenant", "acme", home=home)["key"]
    server = Served(home, run_id, "--parallel", "1", "--ctx", "256")
    try:
        c = client(server, key)
        for _ in range(2):
            c.chat.completions.create(model=run_id, messages=[{"role": "user", "content": "CANARY-7f3a9 hello"}],
                                      max_tokens=3, temperature=0)
        with pytest.raises(openai.AuthenticationError):
            client(server, "wrong").models.list()
        status = cli_json("serve", "status", home=home)["servers"]
        assert [s["url"] for s in status] == [server.url] and status[0]["engine"] == "llama-server"
        doctor = cli_json("doctor", home=home)
        listening = doctor["sections"]["air-gap"]["listeners"]
        assert any(f"(serve {run_id} (pid {server.proc.pid}))" in v for v in listening["value"]), listening
    finally:
        rc, err = server.stop(signal.SIGTERM)  # as a service manager stops it: the counts are still reported
    assert rc == 0, err
    from appliance.trust import audit

    entries = [e for e in audit.entries() if e["event"].startswith("serve.")
               and e["event"] not in ("serve.key.create", "serve.requests")]
    assert [e["event"] for e in entries] == ["serve.start", "serve.usage", "serve.denied", "serve.stop"]
    start, usage, denied, stop = (e["details"] for e in entries)
    each = [r for e in audit.entries(event="serve.requests") for r in e["details"]["requests"]]
    assert [(r["tenant"], r["status"], r["completion_tokens"]) for r in each] == [
        ("acme", 200, 3), ("acme", 200, 3), (None, 401, 0)]
    assert start["host"] == "127.0.0.1" and start["loopback"] is True and start["model"] == run_id
    assert usage["tenant"] == "acme" and usage["requests"] == 2 and usage["completion_tokens"] == 6
    assert usage["prompt_tokens"] > 6 and denied["requests"] == 1 and stop["requests"] == 2
    assert "CANARY-7f3a9" not in (home / "audit" / "log.jsonl").read_text()
    assert not list((home / "serve" / "running").glob("*.json"))


def test_a_crash_of_the_engine_is_reported_and_never_hangs_the_cli(exported_home):
    home, run_id = exported_home
    cli_json("serve", "keys", "create", "--tenant", "acme", home=home)
    server = Served(home, run_id, "--parallel", "1", "--ctx", "256")
    os.kill(server.ready["engine_pid"], signal.SIGKILL)
    server.proc.wait(timeout=60)
    err = server.proc.stderr.read()
    assert server.proc.returncode == 4, err
    assert "the server stopped because llama-server killed by SIGKILL" in err and "Traceback" not in err
    from appliance.trust import audit

    assert audit.entries(event="serve.stop")[-1]["details"]["reason"] == "engine failed"


def test_a_non_loopback_address_needs_the_operators_declaration(exported_home):
    home, run_id = exported_home
    cli_json("serve", "keys", "create", "--tenant", "acme", home=home)
    proc = run_cli("serve", run_id, "--host", "0.0.0.0", "--port", "0", home=home, check=False)
    assert proc.returncode == 2 and "--host 0.0.0.0 is the wildcard address" in proc.stderr
    proc = run_cli("serve", run_id, "--host", "example.org", "--port", "0", home=home, check=False)
    assert proc.returncode == 2 and "not a numeric IP address" in proc.stderr
    for wrong, why in (("0.0.0.0", "wildcard"), ("::", "wildcard"), ("224.0.0.1", "multicast"),
                       ("ff02::1", "multicast"), ("255.255.255.255", "broadcast")):
        proc = run_cli("serve", "allow", wrong, home=home, check=False)
        assert proc.returncode == 2 and why in proc.stderr and "Traceback" not in proc.stderr, (wrong, proc.stderr)
    assert cli_json("serve", "allow", home=home) == {"listen": []}

    # The guard itself: without the declaration a bind to the unspecified address is refused and recorded.
    code = ("import socket, appliance\n"
            "s = socket.socket()\n"
            "try:\n    s.bind(('0.0.0.0', 0))\nexcept PermissionError as e:\n    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "APPLIANCE_HOME": str(home)}).stdout
    assert "refused: appliance egress guard: refused to listen on 0.0.0.0:0" in out


def test_the_engine_renders_the_ggufs_own_template_as_ask_does(exported_home):
    """llama-server (--jinja) renders a conversation exactly as `appliance ask` does (llama-cpp-python with the
    GGUF's template), and stops at the GGUF's end-of-generation token."""
    import httpx

    from appliance import infer
    from appliance.serve.engine import Engine

    home, run_id = exported_home
    gguf = infer.resolve(run_id)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo, 世界?"},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Again."}]
    engine = Engine(gguf, parallel=1, ctx=256)
    engine.start()
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(engine.socket)), base_url="http://engine") as c:
            served = c.post("/apply-template", json={"messages": messages}).json()["prompt"]
            assert c.get("/slots").status_code != 200  # --no-slots: no endpoint shows prompts in flight
    finally:
        engine.stop()
    with infer.load(gguf) as llm:
        assert served == infer.render(llm, messages, add_generation_prompt=True)
    assert not engine.socket.parent.exists()  # the private socket folder is gone with it
