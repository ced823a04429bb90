"""What a client may ask the gateway: an allow-list of OpenAI fields, each with its type and bounds.

The gateway forwards only what these models accept, rebuilt from the validated values: never a field of
llama-server's own (``id_slot``, ``cache_prompt``, ``lora``, ``n_probs``, ``return_progress``,
``timings_per_token``, ...), so no tenant can choose a slot, reuse a cache or change the adapter. A field this
server does not accept is refused by name (as OpenAI refuses an unknown parameter) rather than silently dropped,
so a client learns at once that it was not applied.

Every way a body can be wrong ends in a :class:`Refusal` (a 4xx with one sentence naming the field): not JSON,
not UTF-8, nested too deep, ``NaN``/``Infinity`` (which Python's json accepts and JSON does not), a lone surrogate
(``"\\ud800"``, valid JSON that no UTF-8 encoder can write), wrong types, values out of range.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class Refusal(Exception):
    """A request this gateway refuses: the HTTP status and one sentence for the client."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=False)


Text = Annotated[str, Field(max_length=4_000_000)]
Prob = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Annotated[str, Field(max_length=64)] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: Annotated[str, Field(max_length=128)] | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class _Sampling(_Strict):
    model: Annotated[str, Field(min_length=1, max_length=256)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Prob | None = None
    top_k: Annotated[int, Field(ge=0, le=1000)] | None = None
    min_p: Prob | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    stop: Annotated[str, Field(max_length=256)] | Annotated[list[Annotated[str, Field(max_length=256)]],
                                                            Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # llama.cpp's own: harmless now that max_tokens is bounded per tenant (benchmarks use it for fixed lengths)
    ignore_eos: bool | None = None
    n: Literal[1] = 1  # one answer per request: n > 1 would take slots the gateway did not assign (see gateway.py)
    user: Annotated[str, Field(max_length=256)] | None = None  # accepted, as OpenAI's clients send it; not forwarded


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=64)] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_Sampling):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=16)]
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None


ROUTES = {"/v1/chat/completions": ChatRequest, "/v1/completions": CompletionRequest}


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse(raw: bytes, path: str, max_messages: int) -> ChatRequest | CompletionRequest:
    """The validated request, or a Refusal saying in one sentence what is wrong and where."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise Refusal(400, "The request body is not UTF-8 text; send JSON encoded as UTF-8.") from None
    except RecursionError:
        raise Refusal(400, "The request body is nested too deeply to be a chat or completion request.") from None
    except ValueError as e:
        raise Refusal(400, f"The request body is not valid JSON ({e}).") from None
    if not isinstance(body, dict):
        raise Refusal(400, "The request body must be a JSON object.")
    try:  # a lone surrogate is valid JSON but can never be encoded as UTF-8 for the model
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise Refusal(400, "The request contains text that is not valid Unicode (a lone surrogate such as "
                           "\\ud800); send well-formed UTF-8 text.") from None
    messages = body.get("messages")
    if isinstance(messages, list) and len(messages) > max_messages:
        raise Refusal(400, f"'messages' has {len(messages)} entries; this server accepts at most {max_messages} per "
                           "request.", code="too_many_messages")
    try:
        return ROUTES[path].model_validate(body)
    except ValidationError as e:
        raise Refusal(400, _sentence(e)) from None


def _sentence(e: ValidationError) -> str:
    first = e.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first["loc"] if not (isinstance(p, str) and p[:1].isupper()))
    if first["type"] == "extra_forbidden":
        return (f"The field '{where}' is not accepted by this server; remove it (the fields of OpenAI's API that this "
                "server supports are listed in the README).")
    if first["type"] == "missing":
        return f"The field '{where}' is required."
    value = first.get("input")
    shown = repr(value) if isinstance(value, (int, float, bool, type(None))) or (
        isinstance(value, str) and len(value) <= 40) else type(value).__name__
    if isinstance(value, float) and not math.isfinite(value):
        shown = repr(value)
    return f"The field '{where}' is invalid: {first['msg'].rstrip('.').lower()} (got {shown})."


def forwarded(req: ChatRequest | CompletionRequest) -> dict:
    """The body sent to llama-server: the validated fields the client set (``user`` and ``n`` aside)."""
    body = req.model_dump(exclude_none=True, exclude_unset=True, exclude={"user", "n"})
    if isinstance(req, ChatRequest) and "max_completion_tokens" in body:
        body["max_tokens"] = body.pop("max_completion_tokens")
    return body


def requested_tokens(req: ChatRequest | CompletionRequest) -> int | None:
    if isinstance(req, ChatRequest) and req.max_completion_tokens is not None:
        return req.max_completion_tokens
    return req.max_tokens


def text_bytes(req: ChatRequest | CompletionRequest) -> int:
    """UTF-8 bytes of the text the client sent: no tokenizer makes more tokens than bytes of text, which bounds
    the prompt's length without tokenizing it (see gateway: ``prompt_bound``)."""
    if isinstance(req, CompletionRequest):
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        return max(len(p.encode("utf-8")) for p in prompts)
    total = 0
    for m in req.messages:
        parts = m.content if isinstance(m.content, list) else [m.content or ""]
        total += sum(len((p.text if isinstance(p, TextPart) else p).encode("utf-8")) for p in parts)
        if m.tool_calls:
            total += len(json.dumps(m.tool_calls).encode("utf-8"))
    if isinstance(req, ChatRequest) and req.tools:
        total += len(json.dumps(req.tools).encode("utf-8"))
    return total
