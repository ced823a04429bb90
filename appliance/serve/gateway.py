"""The gateway in front of llama-server: the OpenAI-compatible routes, keys, tenants, limits and token counts.

Routes: ``POST /v1/chat/completions`` (streaming too), ``POST /v1/completions``, ``GET /v1/models`` and
``GET /health`` (the only route without a key: it says "ok" or "loading" and nothing else). Anything else is 404.

Per request, in this order: the bearer key is hashed and looked up among the active keys (``keys.json`` is
re-read when it changes, so a revoked key stops working at once; no valid key -> 401); the body is read within
its size and time limits (413, 408); it is validated against the allow-list of ``requests.py`` (400 naming the
field); the model name must be one of the tenant's (another -> 404, without saying whether it exists for someone
else); the tenant's ``max_tokens`` ceiling and concurrency apply (400, 429); the prompt must fit the context
(400). Then the request goes to llama-server rebuilt from its validated fields, with what no client may set:

- **the slot, chosen here** (:class:`Slots`). A llama-server slot keeps its last prompt's KV cache, and a
  request reusing it is answered faster and reports ``cache_n``: that is how tenant B read tenant A's prompt a
  token at a time. So the gateway assigns every request a slot itself (``id_slot``) and turns the prompt cache
  on (``cache_prompt``) only when that slot's last request came from the same tenant; otherwise the prompt is
  computed from scratch, so neither a counter nor the time to the first token depends on another tenant's
  prompt. A tenant returning to its own slot keeps its cache (a chat's growing history is not recomputed).
  bench/serve_isolation.py measures what the isolation costs;
- **the adapters**: the tenant's at scale 1, every other at 0, so a key never reaches another tenant's adapter.

What comes back is rebuilt too: only the OpenAI fields, never ``timings``, ``cached_tokens``, slot ids or the
engine's build; the model is named as the tenant called it. Engine errors become one sentence of ours: no
engine output or path reaches a client.

Counts per tenant (requests, prompt and completion tokens, errors) and, per request, tenant, key id, client
address, route, status and tokens (never text) are kept for the audit log (``Usage``); refused requests count
too. Streams are asked for their usage so tokens can be counted; a client that did not ask for it does not
receive that extra chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import keys as keystore
from .limits import Limits, TenantLimits
from .requests import ChatRequest, CompletionRequest, Refusal, forwarded, parse, requested_tokens, text_bytes


@dataclass
class Route:
    """One model name a tenant may ask for, and the adapter it runs through (None: the model as loaded)."""

    name: str
    adapter: int | None = None


@dataclass
class Counts:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0

    def add(self, other: "Counts") -> None:
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.errors += other.errors


@dataclass
class Usage:
    """Per-tenant counts since start and since the last report, and each request since the last flush."""

    total: dict[str, Counts] = field(default_factory=dict)
    pending: dict[str, Counts] = field(default_factory=dict)
    denied: int = 0
    pending_denied: int = 0
    log: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, tenant: str, prompt: int = 0, completion: int = 0, error: bool = False, *, key: str | None = None,
              client: str | None = None, route: str = "", status: int = 200) -> None:
        one = Counts(1, prompt, completion, int(error))
        with self.lock:
            self.total.setdefault(tenant, Counts()).add(one)
            self.pending.setdefault(tenant, Counts()).add(one)
            self.log.append(_entry(tenant, key, client, route, status, prompt, completion))

    def deny(self, client: str | None = None, route: str = "") -> None:
        with self.lock:
            self.denied += 1
            self.pending_denied += 1
            self.log.append(_entry(None, None, client, route, 401, 0, 0))

    def take_pending(self) -> tuple[dict[str, Counts], int]:
        with self.lock:
            pending, denied = self.pending, self.pending_denied
            self.pending, self.pending_denied = {}, 0
        return pending, denied

    def take_log(self) -> list[dict]:
        with self.lock:
            log, self.log = self.log, []
        return log

    def snapshot(self) -> dict:
        with self.lock:
            return {"tenants": {t: vars(c).copy() for t, c in sorted(self.total.items())}, "denied": self.denied}


def _entry(tenant, key, client, route, status, prompt, completion) -> dict:
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "tenant": tenant, "key": key,
            "client": client, "route": route, "status": status, "prompt_tokens": prompt,
            "completion_tokens": completion}


class Keys:
    """The active keys, re-read whenever keys.json changes: key hash -> (tenant, key id)."""

    def __init__(self):
        self._path = keystore._path()  # once: per request only a stat, no folder creation or path resolution
        self._stamp = None
        self._table: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()

    def lookup(self, key: str) -> tuple[str, str] | None:
        try:
            st = self._path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                self._table = keystore.active_ids() if stamp else {}
                self._stamp = stamp
            return self._table.get(keystore.digest(key))


class Slots:
    """Which llama-server slot each request runs in, and whose KV cache that slot holds.

    A request takes a free slot, preferring one whose last request came from its own tenant (its cache is
    reusable: ``reuse`` True), else the least recently used (``reuse`` False: the prompt is computed anew).
    Requests beyond the slots wait here, in order, instead of in llama-server's queue where the gateway could
    not see which slot they would land in.
    """

    def __init__(self, n: int):
        self.owner: list[str | None] = [None] * n
        self.busy = [False] * n
        self.last = [0.0] * n
        self._cond: asyncio.Condition | None = None

    @property
    def cond(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    async def take(self, tenant: str) -> tuple[int, bool]:
        async with self.cond:
            await self.cond.wait_for(lambda: not all(self.busy))
            free = [i for i, b in enumerate(self.busy) if not b]
            own = [i for i in free if self.owner[i] == tenant]
            i = max(own, key=self.last.__getitem__) if own else min(free, key=self.last.__getitem__)
            reuse = self.owner[i] == tenant
            self.busy[i], self.owner[i] = True, tenant
            return i, reuse

    async def give(self, i: int) -> None:
        async with self.cond:
            self.busy[i], self.last[i] = False, time.monotonic()
            self.cond.notify_all()


def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status)


_TOP = ("id", "object", "created", "model", "choices", "usage")
_CHOICE = ("index", "message", "delta", "text", "finish_reason", "logprobs")
_MESSAGE = ("role", "content", "reasoning_content", "tool_calls", "refusal")


def clean(payload: dict, name: str) -> dict:
    """An engine answer (or stream chunk) reduced to OpenAI's fields: no timings, cache counts or slot ids."""
    out = {k: payload[k] for k in _TOP if k in payload}
    out["model"] = name
    choices = []
    for c in out.get("choices") or []:
        if isinstance(c, dict):
            c = {k: c[k] for k in _CHOICE if k in c}
            for part in ("message", "delta"):
                if isinstance(c.get(part), dict):
                    c[part] = {k: c[part][k] for k in _MESSAGE if k in c[part]}
            choices.append(c)
    if "choices" in out:
        out["choices"] = choices
    if isinstance(out.get("usage"), dict):
        u = out["usage"]
        out["usage"] = {k: int(u.get(k) or 0) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    return out


_PATHISH = re.compile(r"(/[^\s'\"]+)+")


def engine_refusal(raw: bytes) -> str:
    """llama-server's reason for a 4xx, without anything that looks like a path."""
    try:
        message = str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return "the model server refused this request."
    return _PATHISH.sub("<path>", message)[:300]


# A chat template adds a few tokens per message and a few overall (role markers, generation prompt); these
# bounds are generous for every template shipped with the models this appliance imports.
TEMPLATE_TOKENS_PER_MESSAGE = 32
TEMPLATE_TOKENS = 256


def build(socket: Path, routes: dict[str, list[Route]] | list[Route], adapters: int, usage: Usage,
          ready=lambda: True, failure=lambda: None, *, parallel: int = 4, ctx: int = 2048,
          limits: Limits | None = None):
    """The Starlette application.

    ``routes``: tenant -> the model names it may ask for, or one list for every tenant with a key.
    ``adapters``: how many adapters the engine loaded (each request sets all their scales).
    ``parallel``, ``ctx``: the engine's slots and each slot's context in tokens.
    ``ready()``: whether the engine answers; ``failure()``: why it stopped, if it did (never shown to clients).
    """
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route as Path_

    limits = limits or Limits()
    per_tenant = TenantLimits(limits)
    # A fresh connection per request: connecting to a Unix socket costs microseconds, and a kept-alive one that
    # llama-server's HTTP library closes (after its idle timeout or request count) just as a request is sent
    # would fail that request.
    transport = httpx.AsyncHTTPTransport(uds=str(socket), retries=2,
                                         limits=httpx.Limits(max_connections=None, max_keepalive_connections=0))
    client = httpx.AsyncClient(transport=transport, base_url="http://engine",
                               timeout=httpx.Timeout(connect=10.0, read=None, write=60.0, pool=None))
    table = Keys()
    slots = Slots(parallel)
    running: dict[str, int] = {}

    def visible(tenant: str) -> list[Route]:
        return routes if isinstance(routes, list) else routes.get(tenant, [])

    def authenticate(request) -> tuple[str, str] | None:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        return table.lookup(key.strip())

    def address(request) -> str | None:
        return request.client.host if request.client else None

    def unauthorized(request):
        usage.deny(address(request), request.url.path)
        return error(401, "Incorrect or missing API key; send `Authorization: Bearer <key>` with a key from "
                          "`appliance serve keys create --tenant NAME`.", code="invalid_api_key")

    async def health(request):
        if failure():
            return JSONResponse({"status": "error"}, status_code=503)
        up = ready()
        return JSONResponse({"status": "ok" if up else "loading"}, status_code=200 if up else 503)

    async def models(request):
        who = authenticate(request)
        if who is None:
            return unauthorized(request)
        data = [{"id": r.name, "object": "model", "created": 0, "owned_by": "appliance"} for r in visible(who[0])]
        return JSONResponse({"object": "list", "data": data})

    async def read_body(request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise Refusal(400, "The Content-Length header is not a number.")
            if int(declared) > limits.max_body_bytes:
                raise Refusal(413, f"The request body is {int(declared)} bytes; this server accepts at most "
                                   f"{limits.max_body_bytes} bytes per request.", code="body_too_large")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(limits.body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limits.max_body_bytes:
                        raise Refusal(413, f"The request body is over {limits.max_body_bytes} bytes, the most this "
                                           "server accepts per request.", code="body_too_large")
                    chunks.append(chunk)
        except TimeoutError:
            raise Refusal(408, f"The request body did not arrive within {limits.body_timeout_s:g} s.",
                          code="body_timeout") from None
        return b"".join(chunks)

    async def prompt_length(req, slot_ctx: int, wanted: int) -> int | None:
        """The prompt's tokens when it might not fit (else None: it surely does), from the engine's own
        template and tokenizer."""
        n_messages = len(req.messages) if isinstance(req, ChatRequest) else 1
        bound = text_bytes(req) + TEMPLATE_TOKENS_PER_MESSAGE * n_messages + TEMPLATE_TOKENS
        if bound + wanted <= slot_ctx and not (isinstance(req, ChatRequest) and req.tools):
            return None
        if isinstance(req, ChatRequest):
            templated = await client.post("/apply-template", json=forwarded(req))
            templated.raise_for_status()
            texts = [templated.json()["prompt"]]
        else:
            texts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        longest = 0
        for text in texts:
            tokens = await client.post("/tokenize", json={"content": text, "add_special": True,
                                                          "parse_special": isinstance(req, ChatRequest)})
            tokens.raise_for_status()
            longest = max(longest, len(tokens.json()["tokens"]))
        return longest

    async def generate(request):
        path, peer = request.url.path, address(request)
        who = authenticate(request)
        if who is None:
            return unauthorized(request)
        tenant, key_id = who
        prompt, completion = 0, 0

        def done(code: int, p: int = 0, c: int = 0) -> None:
            usage.count(tenant, p, c, error=code != 200, key=key_id, client=peer, route=path, status=code)

        try:
            req = parse(await read_body(request), path, limits.max_messages)
            route = next((r for r in visible(tenant) if r.name == req.model), None)
            if route is None:
                raise Refusal(404, f"The model {req.model!r} does not exist or you do not have access to it.",
                              code="model_not_found")
            mine = per_tenant.of(tenant)
            wanted = requested_tokens(req)
            if wanted is not None and wanted > mine.max_tokens:
                raise Refusal(400, f"max_tokens {wanted} is more than this server allows tenant {tenant} "
                                   f"({mine.max_tokens}); ask for at most that.", code="max_tokens_too_large")
            if isinstance(req, CompletionRequest) and req.stream and not isinstance(req.prompt, str):
                raise Refusal(400, "A streamed completion takes one prompt; send the prompts of a list one by one.")
            if running.get(tenant, 0) >= mine.concurrent:
                raise Refusal(429, f"Tenant {tenant} already has {mine.concurrent} requests in progress, its limit; "
                                   "wait for one to finish.", code="too_many_requests")
        except ClientDisconnect:
            done(499)
            return error(400, "The client went away before the request arrived.")
        except Refusal as r:
            done(r.status)
            return error(r.status, r.message, code=r.code)

        running[tenant] = running.get(tenant, 0) + 1
        slot: int | None = None
        handed_to_stream = False
        try:
            try:
                length = await prompt_length(req, ctx, wanted or 1)
            except httpx.HTTPError:
                done(503)
                return unavailable()
            if length is not None and length + (wanted or 1) > ctx:
                message = (f"The prompt is {length} tokens and {wanted} more were asked for; this server's context is "
                           f"{ctx} tokens per request: shorten the prompt or ask for fewer tokens." if wanted else
                           f"The prompt is {length} tokens; this server's context is {ctx} tokens per request: "
                           "shorten it.")
                done(400)
                return error(400, message, code="context_length_exceeded")
            body = forwarded(req)
            body["max_tokens"] = wanted or mine.max_tokens
            if adapters:
                body["lora"] = [{"id": i, "scale": 1.0 if i == route.adapter else 0.0} for i in range(adapters)]
            slot, reuse = await slots.take(tenant)
            body["id_slot"], body["cache_prompt"] = slot, reuse
            if req.stream:
                wants_usage = bool(req.stream_options and req.stream_options.include_usage)
                body["stream_options"] = {"include_usage": True}
                try:
                    upstream = await client.send(client.build_request("POST", path, json=body), stream=True)
                except httpx.HTTPError:
                    done(503)
                    return unavailable()
                if upstream.status_code != 200:
                    raw = await upstream.aread()
                    await upstream.aclose()
                    return answer_error(upstream.status_code, raw, done)
                handed_to_stream = True
                return StreamingResponse(events(upstream, route.name, wants_usage, done, tenant, slot),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            listed = isinstance(req, CompletionRequest) and isinstance(req.prompt, list)
            prompts = req.prompt if listed else [None]
            merged: dict | None = None
            for i, one in enumerate(prompts):
                # llama-server answers a list of prompts in one response but counts the usage of the first only:
                # each prompt is sent on its own, on this slot, and the counts added.
                if one is not None:
                    body["prompt"] = one
                try:
                    upstream = await client.post(path, json=body)
                except httpx.HTTPError:
                    done(503, prompt, completion)
                    return unavailable()
                if upstream.status_code != 200:
                    return answer_error(upstream.status_code, upstream.content, done, prompt, completion)
                try:
                    payload = clean(upstream.json(), route.name)
                except (ValueError, AttributeError):
                    done(502, prompt, completion)
                    return error(502, "The model server sent an answer that is not JSON.", kind="server_error")
                prompt += payload.get("usage", {}).get("prompt_tokens", 0)
                completion += payload.get("usage", {}).get("completion_tokens", 0)
                body["cache_prompt"] = True  # the slot is this tenant's now
                if merged is None:
                    merged = payload
                else:
                    merged["choices"] += [{**c, "index": i} for c in payload.get("choices", [])]
            assert merged is not None
            merged["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion,
                               "total_tokens": prompt + completion}
            done(200, prompt, completion)
            return JSONResponse(merged)
        finally:
            if not handed_to_stream:
                running[tenant] -= 1
                if slot is not None:
                    await slots.give(slot)

    def unavailable():
        return error(503, "The model server is not available.", kind="server_error", code="engine_unavailable")

    def answer_error(code: int, raw: bytes, done, prompt: int = 0, completion: int = 0):
        if 400 <= code < 500:
            done(400, prompt, completion)
            return error(400, f"The model server refused this request: {engine_refusal(raw)}")
        done(502, prompt, completion)
        return error(502, f"The model server failed on this request (status {code}); the operator can see why "
                          "in `appliance serve status` and the audit log.", kind="server_error", code="engine_error")

    async def events(upstream, name: str, wants_usage: bool, done, tenant: str, slot: int):
        prompt = completion = 0
        ok = False
        try:
            event: list[str] = []
            async for line in upstream.aiter_lines():
                if line:
                    event.append(line)
                    continue
                if not event:
                    continue
                text, event = "\n".join(event), []
                data = text[6:] if text.startswith("data: ") else None
                if data == "[DONE]":
                    ok = True
                    yield text + "\n\n"
                    continue
                if data is None:
                    continue  # comments and pings of the engine: nothing a client needs
                try:
                    chunk = json.loads(data)
                except ValueError:
                    continue
                if not isinstance(chunk, dict):
                    continue
                if "error" in chunk:
                    yield "data: " + json.dumps({"error": {"message": "the model server could not finish the answer",
                                                           "type": "server_error"}}) + "\n\n"
                    continue
                if isinstance(chunk.get("usage"), dict):
                    u = chunk["usage"]
                    prompt, completion = int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)
                chunk = clean(chunk, name)
                if not wants_usage:
                    if not chunk.get("choices"):
                        continue  # the usage chunk the gateway asked for, not the client
                    chunk.pop("usage", None)
                yield "data: " + json.dumps(chunk, ensure_ascii=False) + "\n\n"
        except httpx.HTTPError:
            yield "data: " + json.dumps({"error": {"message": "the model server stopped during the answer",
                                                   "type": "server_error"}}) + "\n\n"
        finally:
            await upstream.aclose()
            running[tenant] -= 1
            await slots.give(slot)
            done(200 if ok else 502, prompt, completion)

    async def not_found(request, exc=None):
        return error(404, f"There is no route {request.method} {request.url.path} here; this server offers "
                          "/v1/chat/completions, /v1/completions, /v1/models and /health.")

    async def crashed(request, exc):
        # The last net under every route: a request this code did not foresee is still one sentence, never a
        # traceback or an engine's words.
        return error(500, "The server could not handle this request.", kind="server_error")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await client.aclose()

    return Starlette(routes=[Path_("/health", health), Path_("/v1/health", health), Path_("/v1/models", models),
                             Path_("/v1/chat/completions", generate, methods=["POST"]),
                             Path_("/v1/completions", generate, methods=["POST"])],
                     exception_handlers={404: not_found, 405: not_found, Exception: crashed}, lifespan=lifespan)
