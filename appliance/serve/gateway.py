"""The gateway in front of llama-server: the OpenAI-compatible routes, keys, tenants, adapters and token counts.

Routes: ``POST /v1/chat/completions`` (streaming too), ``POST /v1/completions``, ``GET /v1/models`` and
``GET /health`` (the only route without a key: it says "ok" or "loading" and nothing else). Anything else is 404.

Per request: the bearer key is hashed and looked up among the active keys (``keys.json`` is re-read when it
changes, so a revoked key stops working at once); no valid key -> 401. The key's tenant sees only its own model
names: another name -> 404 (whether it exists for someone else is not said). The request's own ``lora`` field is
dropped and replaced by the tenant's adapter at scale 1 and every other adapter at 0, so a tenant's key never
reaches another tenant's adapter. Streams are asked for their usage so tokens can be counted; a client that did
not ask for usage does not receive that extra chunk.

Counts (requests, prompt and completion tokens, errors, refused keys) are kept per tenant; never text.
"""

from __future__ import annotations

import contextlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from . import keys as keystore


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
    """Per-tenant counts since start, and since the last report to the audit log."""

    total: dict[str, Counts] = field(default_factory=dict)
    pending: dict[str, Counts] = field(default_factory=dict)
    denied: int = 0
    pending_denied: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, tenant: str, prompt: int = 0, completion: int = 0, error: bool = False) -> None:
        one = Counts(1, prompt, completion, int(error))
        with self.lock:
            self.total.setdefault(tenant, Counts()).add(one)
            self.pending.setdefault(tenant, Counts()).add(one)

    def deny(self) -> None:
        with self.lock:
            self.denied += 1
            self.pending_denied += 1

    def take_pending(self) -> tuple[dict[str, Counts], int]:
        with self.lock:
            pending, denied = self.pending, self.pending_denied
            self.pending, self.pending_denied = {}, 0
        return pending, denied

    def snapshot(self) -> dict:
        with self.lock:
            return {"tenants": {t: vars(c).copy() for t, c in sorted(self.total.items())}, "denied": self.denied}


class Keys:
    """The active keys, re-read whenever keys.json changes."""

    def __init__(self):
        self._path = keystore._path()  # once: per request only a stat, no folder creation or path resolution
        self._stamp = None
        self._table: dict[str, str] = {}
        self._lock = threading.Lock()

    def tenant(self, key: str) -> str | None:
        try:
            st = self._path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                self._table = keystore.active() if stamp else {}
                self._stamp = stamp
            return self._table.get(keystore.digest(key))


def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status)


def build(socket: Path, routes: dict[str, list[Route]] | list[Route], adapters: int, usage: Usage,
          ready=lambda: True, failure=lambda: None):
    """The Starlette application.

    ``routes``: tenant -> the model names it may ask for, or one list for every tenant with a key.
    ``adapters``: how many adapters the engine loaded (each request sets all their scales).
    ``ready()``: whether the engine answers; ``failure()``: why it stopped, if it did.
    """
    import httpx
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route as Path_

    # A fresh connection per request: connecting to a Unix socket costs microseconds, and a kept-alive one that
    # llama-server's HTTP library closes (after its idle timeout or request count) just as a request is sent
    # would fail that request.
    transport = httpx.AsyncHTTPTransport(uds=str(socket), retries=2,
                                         limits=httpx.Limits(max_connections=None, max_keepalive_connections=0))
    client = httpx.AsyncClient(transport=transport, base_url="http://engine",
                               timeout=httpx.Timeout(connect=10.0, read=None, write=60.0, pool=None))
    table = Keys()

    def visible(tenant: str) -> list[Route]:
        return routes if isinstance(routes, list) else routes.get(tenant, [])

    def authenticate(request) -> str | None:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        return table.tenant(key.strip())

    def unauthorized():
        usage.deny()
        return error(401, "Incorrect or missing API key; send `Authorization: Bearer <key>` with a key from "
                          "`appliance serve keys create --tenant NAME`.", code="invalid_api_key")

    def engine_down():
        why = failure() or "it does not answer"
        return error(503, f"the model server is not available: {why}.", kind="server_error", code="engine_unavailable")

    async def health(request):
        if failure():
            return JSONResponse({"status": "error"}, status_code=503)
        up = ready()
        return JSONResponse({"status": "ok" if up else "loading"}, status_code=200 if up else 503)

    async def models(request):
        tenant = authenticate(request)
        if tenant is None:
            return unauthorized()
        data = [{"id": r.name, "object": "model", "created": 0, "owned_by": "appliance"} for r in visible(tenant)]
        return JSONResponse({"object": "list", "data": data})

    async def generate(request):
        tenant = authenticate(request)
        if tenant is None:
            return unauthorized()
        try:
            body = json.loads(await request.body())
        except ValueError:
            return error(400, "The request body is not valid JSON.")
        if not isinstance(body, dict):
            return error(400, "The request body must be a JSON object.")
        name = body.get("model")
        route = next((r for r in visible(tenant) if r.name == name), None)
        if route is None:
            usage.count(tenant, error=True)
            return error(404, f"The model {name!r} does not exist or you do not have access to it.",
                         code="model_not_found")
        body.pop("lora", None)
        if adapters:
            body["lora"] = [{"id": i, "scale": 1.0 if i == route.adapter else 0.0} for i in range(adapters)]
        stream = bool(body.get("stream"))
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if stream:
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        path = request.url.path
        try:
            upstream = await client.send(client.build_request("POST", path, json=body), stream=True)
        except httpx.HTTPError:
            usage.count(tenant, error=True)
            return engine_down()
        if upstream.status_code != 200 or not stream:
            raw = await upstream.aread()
            await upstream.aclose()
            prompt = completion = 0
            if upstream.status_code == 200:
                try:
                    counted = json.loads(raw).get("usage") or {}
                    prompt, completion = int(counted.get("prompt_tokens", 0)), int(counted.get("completion_tokens", 0))
                except (ValueError, AttributeError, TypeError):
                    pass
            usage.count(tenant, prompt, completion, error=upstream.status_code != 200)
            return Response(raw, status_code=upstream.status_code,
                            media_type=upstream.headers.get("content-type", "application/json"))

        async def events():
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
                    elif data is not None and '"usage"' in data:  # only the last chunk: the others pass as they are
                        try:
                            chunk = json.loads(data)
                        except ValueError:
                            chunk = None
                        if isinstance(chunk, dict) and chunk.get("usage"):
                            u = chunk["usage"]
                            prompt, completion = int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0))
                            if not wants_usage and not chunk.get("choices"):
                                continue  # the usage chunk the gateway asked for, not the client
                            if not wants_usage:
                                chunk.pop("usage", None)
                                text = "data: " + json.dumps(chunk, ensure_ascii=False)
                    yield text + "\n\n"
            except httpx.HTTPError:
                yield "data: " + json.dumps({"error": {"message": "the model server stopped during the answer",
                                                       "type": "server_error"}}) + "\n\n"
            finally:
                await upstream.aclose()
                usage.count(tenant, prompt, completion, error=not ok)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def not_found(request, exc=None):
        return error(404, f"There is no route {request.method} {request.url.path} here; this server offers "
                          "/v1/chat/completions, /v1/completions, /v1/models and /health.")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await client.aclose()

    return Starlette(routes=[Path_("/health", health), Path_("/v1/health", health), Path_("/v1/models", models),
                             Path_("/v1/chat/completions", generate, methods=["POST"]),
                             Path_("/v1/completions", generate, methods=["POST"])],
                     exception_handlers={404: not_found, 405: not_found}, lifespan=lifespan)
