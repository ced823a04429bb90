"""`appliance serve` tried as an attacker would, against the real gateway and the real llama-server on loopback
(issue 26): one tenant probing another's prompt, oversized and slow requests, malformed bodies, undercounted
usage. Each attack has its negative control: the same probe shown to work where the guard is absent.
"""

from __future__ import annotations

import functools
import json
import random
import shutil
import socket
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import cli_json, run_cli
from tests.test_serve import Served

pytestmark = pytest.mark.llama

SECRET = ("Patient Margaret Thornbury, born 1961-04-12, tested HIV positive at the Leeds clinic on 2026-03-02; "
          "her consultant is Dr Okafor and the follow-up is in six weeks. ") * 6  # ~400 tokens: a reused cache
# saves milliseconds per probe even on the tiny model


@pytest.fixture(scope="module")
def home_with_keys(exported_workspace, tmp_path_factory):
    src, run_id = exported_workspace
    home = tmp_path_factory.mktemp("attacks") / "home"
    shutil.copytree(src, home, symlinks=True)
    made = {t: cli_json("serve", "keys", "create", "--tenant", t, home=home) for t in ("alice", "bob", "carol")}
    return home, run_id, made


@pytest.fixture(scope="module")
def limited(home_with_keys):
    """Two slots, small limits so each can be reached quickly."""
    home, run_id, made = home_with_keys
    server = Served(home, run_id, "--parallel", "2", "--ctx", "512", "--max-body", "65536", "--max-messages", "16",
                    "--max-tokens", "32", "--concurrent", "2", "--header-timeout", "2", "--body-timeout", "2")
    yield home, run_id, server, made
    server.stop()


def headers(made, tenant):
    return {"Authorization": f"Bearer {made[tenant]['key']}"}


def chat_body(run_id, text, **kw):
    return {"model": run_id, "messages": [{"role": "user", "content": text}], **kw}


# -- 1. tenant isolation -------------------------------------------------------------------------------------------

def _timed(post, body) -> tuple[float, dict]:
    start = time.perf_counter()
    r = post(body)
    elapsed = time.perf_counter() - start
    assert r.status_code == 200, r.text
    return elapsed, r.json()


def _leak(victim, attacker, run_id: str, rounds: int = 40) -> tuple[int, list[dict]]:
    """Paired probes: in each round the attacker times the secret and the secret's words shuffled (the same
    tokens in another order: the same work when nothing is cached), in a random order, and before each probe
    the victim sends the secret again. Returns in how many rounds the secret was answered faster (about half
    when nothing is shared; nearly all when its cache is reused), and every answer the attacker saw.

    A sign test, not a threshold on milliseconds: with nothing shared, 31 or more of 40 has probability 0.02%."""
    words = SECRET.split(" ")
    rng = random.Random(7)
    faster = 0
    seen = []
    body = functools.partial(chat_body, run_id, max_tokens=1, temperature=0)
    victim(body(SECRET))  # warm-up
    for _ in range(rounds):
        shuffled = words[:]
        rng.shuffle(shuffled)
        order = [("secret", SECRET), ("other", " ".join(shuffled))]
        rng.shuffle(order)
        took = {}
        for kind, text in order:
            victim(body(SECRET))
            took[kind], answer = _timed(attacker, body(text))
            seen.append(answer)
        faster += took["secret"] < took["other"]
    return faster, seen


SIGNIFICANT = 31  # of 40 rounds


def test_one_tenant_cannot_read_another_tenants_prompt(home_with_keys):
    """Tenant B probes whether A's prompt is in a shared cache: by a counter in the answer, or by the time it
    takes. Through the gateway B learns nothing (no counter; the same time for A's prompt as for another);
    straight against llama-server with its default prompt cache (the negative control) the same probe reads it."""
    home, run_id, made = home_with_keys
    server = Served(home, run_id, "--parallel", "1", "--ctx", "512")
    try:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            def as_(tenant):
                return lambda body: c.post("/chat/completions", headers=headers(made, tenant), json=body)

            faster, seen = _leak(as_("alice"), as_("bob"), run_id)
            # Streams too: no chunk carries timings or cache counts.
            with c.stream("POST", "/chat/completions", headers=headers(made, "bob"),
                          json=chat_body(run_id, SECRET, max_tokens=2, stream=True,
                                         stream_options={"include_usage": True})) as r:
                chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    finally:
        server.stop()
    for answer in seen + chunks:
        assert set(answer) <= {"id", "object", "created", "model", "choices", "usage"}, answer
        if answer.get("usage"):
            assert set(answer["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert faster < SIGNIFICANT, f"A's prompt was answered faster in {faster} of 40 rounds: the cache is shared"

    # The negative control: llama-server itself, as the gateway used to pass requests to it.
    from appliance.serve.engine import Engine

    engine = Engine(next((home / "runs" / run_id / "gguf").glob("model-*.gguf")), parallel=1, ctx=512)
    engine.start()
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(engine.socket)), base_url="http://engine",
                          timeout=120) as raw:
            def post(body):
                return raw.post("/v1/chat/completions", json=body)

            leaked, answers = _leak(post, post, run_id)
    finally:
        engine.stop()
    assert max(a["usage"]["prompt_tokens_details"]["cached_tokens"] for a in answers) > 50
    assert leaked >= SIGNIFICANT, f"the probe did not see the shared cache ({leaked} of 40 rounds)"


# -- 2. limits -----------------------------------------------------------------------------------------------------

def _raw(url: str, payload: bytes, source: str = "127.0.0.1", timeout: float = 10.0) -> bytes:
    host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(timeout)
    s.connect((host, int(port)))
    s.sendall(payload)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except TimeoutError:
        pass
    s.close()
    return out


def test_an_oversized_body_is_refused_before_it_is_read(limited):
    home, run_id, server, made = limited
    auth = headers(made, "alice")["Authorization"]
    start = time.monotonic()
    reply = _raw(server.url, (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
                              "Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n").encode())
    assert reply.startswith(b"HTTP/1.1 413") and b"at most 65536 bytes" in reply
    assert time.monotonic() - start < 5  # answered without waiting for the 50 MB that never came
    big = json.dumps(chat_body(run_id, "x" * 70_000)).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (big[:30_000], big[30_000:])) + b"0\r\n\r\n"
    reply = _raw(server.url, (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
                              "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode() + chunks)
    assert reply.startswith(b"HTTP/1.1 413") and b"over 65536 bytes" in reply  # no Content-Length: counted as it came


def test_messages_max_tokens_and_context_are_bounded(limited):
    home, run_id, server, made = limited
    url = server.url + "/chat/completions"
    many = {"model": run_id, "messages": [{"role": "user", "content": "hi"}] * 17}
    r = httpx.post(url, headers=headers(made, "alice"), json=many)
    assert r.status_code == 400 and "at most 16" in r.json()["error"]["message"]
    r = httpx.post(url, headers=headers(made, "alice"), json=chat_body(run_id, "hi", max_tokens=10**9))
    assert r.status_code == 400 and "allows tenant alice (32)" in r.json()["error"]["message"]
    long = " ".join(f"word{i}" for i in range(900))
    r = httpx.post(url, headers=headers(made, "alice"), json=chat_body(run_id, long, max_tokens=4))
    assert r.status_code == 400 and "context is 512 tokens" in r.json()["error"]["message"]
    # Without max_tokens an answer stops at the tenant's limit, not at the end of the context.
    r = httpx.post(url, headers=headers(made, "alice"), json=chat_body(run_id, "Tell a story.", temperature=0))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 32
    # A tenant's own limit, set while the server runs, applies at once.
    run_cli("serve", "limits", "carol", "--max-tokens", "48", home=home)
    r = httpx.post(url, headers=headers(made, "carol"), json=chat_body(run_id, "hi", max_tokens=40))
    assert r.status_code == 200
    r = httpx.post(url, headers=headers(made, "carol"), json=chat_body(run_id, "hi", max_tokens=49))
    assert r.status_code == 400 and "(48)" in r.json()["error"]["message"]


def test_a_tenant_beyond_its_concurrency_gets_429(limited):
    home, run_id, server, made = limited
    run_cli("serve", "limits", "bob", "--concurrent", "1", "--max-tokens", "400", home=home)
    try:
        url = server.url + "/chat/completions"
        with httpx.Client(timeout=60) as c, c.stream("POST", url, headers=headers(made, "bob"),
                                                     json=chat_body(run_id, "Count.", max_tokens=400, temperature=0,
                                                                    stream=True)) as first:
            lines = first.iter_lines()
            next(lines)  # the first request is in progress (400 tokens: a second or so)
            second = httpx.post(url, headers=headers(made, "bob"), json=chat_body(run_id, "hi", max_tokens=2))
            other = httpx.post(url, headers=headers(made, "alice"), json=chat_body(run_id, "hi", max_tokens=2))
            rest = list(lines)
        assert rest[-2:] == ["data: [DONE]", ""] or rest[-1] == "data: [DONE]"
        assert second.status_code == 429 and "Tenant bob already has 1 requests" in second.json()["error"]["message"]
        assert other.status_code == 200  # another tenant is not held back by bob's limit
        assert httpx.post(url, headers=headers(made, "bob"), json=chat_body(run_id, "hi", max_tokens=2)).status_code == 200
    finally:
        run_cli("serve", "limits", "bob", "--reset", home=home)


def test_a_body_that_never_arrives_gets_408(limited):
    home, run_id, server, made = limited
    auth = headers(made, "alice")["Authorization"]
    start = time.monotonic()
    reply = _raw(server.url, (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
                              "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\"").encode())
    assert reply.startswith(b"HTTP/1.1 408") and b"within 2 s" in reply
    assert time.monotonic() - start < 8


def test_slowloris_connections_are_dropped_and_normal_clients_still_served(limited):
    """200 connections from one address sending their headers a byte at a time: beyond 32 they are closed at
    once, the rest when their headers are late; meanwhile a client from another address is answered."""
    home, run_id, server, made = limited
    host, port = server.url.split("//")[1].split("/")[0].rsplit(":", 1)
    held = []
    for _ in range(200):
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        s.settimeout(5)
        s.connect((host, int(port)))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHo")
        held.append(s)

    def closed(s) -> bool:
        try:
            s.settimeout(0.05)
            return s.recv(1) == b""
        except TimeoutError:
            return False
        except OSError:
            return True

    time.sleep(0.3)
    assert sum(closed(s) for s in held) >= 200 - 32  # the per-address cap
    start = time.monotonic()
    r = httpx.post(server.url + "/chat/completions", headers=headers(made, "alice"),
                   json=chat_body(run_id, "hi", max_tokens=2), timeout=30)
    assert r.status_code == 200 and time.monotonic() - start < 10
    time.sleep(2.5)  # past the header deadline
    assert all(closed(s) for s in held)
    for s in held:
        s.close()


# -- 3. malformed requests -----------------------------------------------------------------------------------------

KNOWN = ["model", "messages", "max_tokens", "temperature", "top_p", "stream", "stream_options", "stop", "seed", "n",
         "response_format", "logprobs", "top_logprobs", "tools", "presence_penalty", "id_slot", "cache_prompt", "lora"]
ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() |
                        st.text(max_size=8), lambda inner: st.lists(inner, max_size=3) |
                        st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


def _check_answer(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text)
    if r.status_code >= 400:
        message = r.json()["error"]["message"]
        assert "/" not in message.replace("/v1/", "").replace("a/b", ""), message  # no paths, no engine lines
        assert "Traceback" not in message


def test_malformed_requests_are_4xx_never_500(limited):
    home, run_id, server, made = limited
    c = httpx.Client(base_url=server.url, headers={**headers(made, "alice"), "Content-Type": "application/json"},
                     timeout=60)
    fixed = [b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "stream_options": 5}',
             b'{"model": "%s", "messages": [{"role": "user", "content": "\\ud800"}]}',
             b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
             b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1e400}',
             b'{"model": "%s", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
             b"[" * 100_00 + b"]" * 100_00, b"", b"null", b'"text"', b"{\"model\": 5}"]
    for raw in fixed:
        body = raw.replace(b"%s", run_id.encode()) if b"%s" in raw else raw
        r = c.post("/chat/completions", content=body)
        assert 400 <= r.status_code < 500, (body[:80], r.status_code, r.text)
        _check_answer(r)

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.dictionaries(st.sampled_from(KNOWN), ANY_JSON, max_size=5), st.sampled_from(["/chat/completions",
                                                                                             "/completions"]))
    def fuzz(fields, path):
        body = {"model": run_id, "max_tokens": 2, **fields}
        try:
            content = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
        except (ValueError, TypeError):
            return
        _check_answer(c.post(path, content=content))

    fuzz()
    c.close()


# -- 4. accounting -------------------------------------------------------------------------------------------------

def test_every_answer_and_every_request_is_counted(exported_home):
    home, run_id = exported_home
    made = cli_json("serve", "keys", "create", "--tenant", "acme", home=home)
    server = Served(home, run_id, "--parallel", "2", "--ctx", "256")
    try:
        auth = {"Authorization": f"Bearer {made['key']}"}
        r = httpx.post(server.url + "/completions", headers=auth, timeout=120,
                       json={"model": run_id, "prompt": [f"Item {i}:" for i in range(8)], "max_tokens": 3,
                             "temperature": 0})
        assert r.status_code == 200 and len(r.json()["choices"]) == 8
        assert [c["index"] for c in r.json()["choices"]] == list(range(8))
        assert r.json()["usage"]["completion_tokens"] == 24  # every answer's tokens, not the first one's
        bad = httpx.post(server.url + "/chat/completions", headers=auth, json={"model": run_id, "messages": 5})
        assert bad.status_code == 400
        assert httpx.get(server.url + "/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    finally:
        rc, err = server.stop()
    assert rc == 0, err
    from appliance.trust import audit

    logged = [r for e in audit.entries(event="serve.requests") for r in e["details"]["requests"]]
    assert [(r["tenant"], r["key"], r["status"], r["completion_tokens"]) for r in logged] == [
        ("acme", made["id"], 200, 24), ("acme", made["id"], 400, 0), (None, None, 401, 0)]
    assert all(r["client"] == "127.0.0.1" for r in logged)
    usage = audit.entries(event="serve.usage")[-1]["details"]
    assert usage["requests"] == 2 and usage["errors"] == 1 and usage["completion_tokens"] == 24


def test_a_dead_engine_is_a_503_without_its_words_or_paths(home, tmp_path):
    """The gateway in front of an engine that is gone: the client gets one sentence of ours, never llama-server's
    last lines (which name files) nor the socket's path."""
    from starlette.testclient import TestClient

    from appliance.serve import keys
    from appliance.serve.gateway import Route, Usage, build

    made = keys.create("acme")
    usage = Usage()
    app = build(tmp_path / "gone.sock", [Route("m")], 0, usage, ready=lambda: False,
                failure=lambda: "llama-server exited with status 1; its last lines: cannot open /srv/secret/model.gguf")
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", headers={"Authorization": f"Bearer {made['key']}"},
                   json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        health = c.get("/health")
    assert r.status_code == 503 and r.json()["error"]["message"] == "The model server is not available."
    assert "/srv" not in r.text and "gone.sock" not in r.text and "llama-server" not in r.text
    assert health.status_code == 503 and health.json() == {"status": "error"}
    assert usage.snapshot()["tenants"]["acme"]["errors"] == 1
