"""The APIs metered besides chat completions: each one a dialect of the one path.

- ``POST /v1/responses``: OpenAI's Responses API. The request is passed
  through. With ``previous_response_id`` or ``conversation`` the upstream adds
  earlier turns that this request does not show: the prompt is then bounded
  by the model's ``context_window`` (what the provider can read at most), and
  a model without one refuses such calls, so the hold still bounds the
  charge; typed SSE events are relayed as they arrive, the terminal
  ``response.completed`` (or ``response.incomplete``) is held back until the
  call is settled and then sent with the cost in ``response.usage``.
- ``POST /v1/messages``: Anthropic's Messages API, relayed to upstreams of
  kind ``anthropic``. Usage comes from ``message_start`` (input, cache read,
  cache write) and ``message_delta`` (output, cumulative); the
  ``message_delta`` is held back and sent with the cost, then
  ``message_stop``. Errors are Anthropic's shape. ``POST
  /v1/messages/count_tokens`` is passed through, unmetered.
- ``POST /v1/embeddings``: priced per input token; no output side.

Each route is authenticated, throttled, reserved, settled and exported by
``proxy.routes.serve_metered``, exactly as chat completions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import orjson
from aiohttp import web

from creditgate.auth import authenticate
from creditgate.config import Model
from creditgate.errors import ModelNotFound, ValidationError
from creditgate.proxy import validation as v
from creditgate.proxy.dialect import (
    DONE,
    ERROR,
    HOLD,
    PASS,
    Dialect,
    EventAction,
    MeteredRequest,
    TypedDialect,
    TypedRelay,
    typed_event,
)
from creditgate.proxy.ports import CHAT
from creditgate.proxy.pricing import PER_MESSAGE_OVERHEAD, TokenCounts
from creditgate.proxy.relay import Relay, StreamEnd
from creditgate.proxy.routes import check_api, serve_metered
from creditgate.webkit.envelope import (
    ERROR_SHAPE,
    anthropic_error,
    read_json_object,
)
from creditgate.webkit.openapi import (
    BOOL,
    CREDITS,
    INT,
    MICROS,
    STR,
    Endpoint,
    Schema,
    arr,
    nullable,
    obj,
)

# Content parts whose tokens do not follow their bytes: an image costs at most
# its model's max_image_tokens, whatever its base64 text weighs.
_IMAGE_TYPES = ("input_image", "image", "image_url")
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's own limit on one embeddings request
# Anthropic adds a system prompt of its own when a request offers tools
# (346 tokens for current models, per its tool-use pricing notes): bounded here
# with room to spare, so the hold still covers a request with one tiny tool.
ANTHROPIC_TOOL_PROMPT_TOKENS = 1024
COUNT_TOKENS_TIMEOUT = 30.0  # seconds a count_tokens pass-through may take


@dataclass(frozen=True, slots=True)
class ApiRequest:
    """A parsed request of the Responses, Messages or embeddings API."""

    model: Model
    upstream_body: dict[str, Any]
    stream: bool
    prompt_tokens_estimate: int  # the prompt bound the hold reserves
    max_output_tokens: int  # sent upstream (0: the API generates no tokens)
    # The bound of the prompt this request carries, when the upstream adds
    # stored turns to it (prompt_tokens_estimate is then the context window).
    sent_prompt_tokens: int | None = None
    hold_note: str | None = None  # why the hold is larger, for a 402's message

    @property
    def worst_case_output_tokens(self) -> int:
        return self.max_output_tokens

    @property
    def required_prompt_tokens(self) -> int:
        if self.sent_prompt_tokens is None:
            return self.prompt_tokens_estimate
        return self.sent_prompt_tokens

    @property
    def worst_case_tokens(self) -> int:
        return self.required_prompt_tokens + self.max_output_tokens


def prompt_bound(value: Any, image_tokens: int) -> int:
    """An upper bound of the tokens of a request field: one per UTF-8 byte of
    its text (a byte-level tokenizer makes no more), ``image_tokens`` per
    image part, the JSON bytes of anything else."""
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, list):
        return sum(prompt_bound(item, image_tokens) for item in value)
    if isinstance(value, dict):
        if value.get("type") in _IMAGE_TYPES:
            return image_tokens
        return sum(len(k.encode()) + prompt_bound(item, image_tokens) for k, item in value.items())
    return len(orjson.dumps(value))


def _model(
    p: v.Problems, body: dict[str, Any], models: Mapping[str, Model], default: str | None
) -> tuple[str | None, Model | None]:
    name = body.get("model")
    if name is None:
        name = default
    if not isinstance(name, str) or not name:
        p.add("model", "required: the name of a model (see GET /v1/models)")
        return None, None
    return name, models.get(name)


def _stream(p: v.Problems, body: dict[str, Any]) -> bool:
    stream = body.get("stream")
    if stream is None:
        return False
    if not isinstance(stream, bool):
        p.add("stream", "must be a boolean")
        return False
    return stream


def _cap(
    p: v.Problems, body: dict[str, Any], name: str, model: Model | None, *, required: bool
) -> int | None:
    value = body.get(name)
    if value is None:
        if required:
            p.add(name, "required: a positive integer")
        return None
    if not v.is_int(value) or value < 1:
        p.add(name, "must be a positive integer")
    elif model is not None and value > model.max_output_tokens:
        p.add(name, f"at most {model.max_output_tokens} for {model.name}, got {value}")
    else:
        return value
    return None


def _done(p: v.Problems, what: str, name: str | None, model: Model | None) -> Model:
    """Raise the 400 listing every problem, or the 404 of an unknown model."""
    if p:
        if model is None and name:
            p.add("model", "unknown model (see GET /v1/models)")
        first = p.items[0]
        more = f" (and {len(p.items) - 1} more; see details)" if len(p.items) > 1 else ""
        raise ValidationError(
            f"The request is not a valid {what} request:"
            f" {first['path'] or 'body'}: {first['message']}{more}",
            details=p.items,
        )
    if model is None:
        raise ModelNotFound(
            f"The model {name!r} does not exist or is not served here; see GET /v1/models.",
            details=[{"path": "model", "message": "unknown model"}],
        )
    return model


def _count(value: Any) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return value if ok else None


def _text(value: Any) -> int:
    return len(value.encode()) if isinstance(value, str) else 0


# ---------------------------------------------------------------- the Responses API

_NO_CONTEXT_WINDOW = (
    "{field} makes the upstream add earlier turns this request does not show, so"
    " its cost cannot be bounded for {model}: send the whole conversation in"
    " `input` with `store: false`, or set `context_window` on the model in the"
    " configuration"
)


def _stored_state(p: v.Problems, body: dict[str, Any]) -> str | None:
    """The field naming state stored at the provider (``previous_response_id``
    or ``conversation``: a non-empty id, or ``{"id": …}``), else None."""
    found = None
    prev = body.get("previous_response_id")
    if prev is not None:
        if isinstance(prev, str) and prev:
            found = "previous_response_id"
        else:
            p.add("previous_response_id", "must be a non-empty string: a response's id")
    conv = body.get("conversation")
    if conv is not None:
        conv_id = conv.get("id") if isinstance(conv, dict) else conv
        if isinstance(conv_id, str) and conv_id:
            found = found or "conversation"
        else:
            p.add("conversation", 'must be a conversation\'s id, or {"id": …}')
    return found


class ResponsesDialect(TypedDialect):
    """OpenAI's Responses API (``POST /v1/responses``)."""

    api = "responses"
    path = "/v1/responses"
    upstream_path = "/responses"
    # Terminal events that carry the final usage; response.failed ends as an error.
    _FINAL: ClassVar[tuple[str, ...]] = ("response.completed", "response.incomplete")

    def parse(
        self,
        body: dict[str, Any],
        models: Mapping[str, Model],
        bytes_per_token: int,
        *,
        default_model: str | None = None,
    ) -> MeteredRequest:
        p = v.Problems()
        name, model = _model(p, body, models, default_model)
        inp = body.get("input")
        stored = _stored_state(p, body)
        if inp is None:
            if not stored:
                p.add("input", "required: a string or a list of input items")
        elif not isinstance(inp, str | list):
            p.add("input", "must be a string or a list of input items")
        if stored and model is not None and model.context_window is None:
            p.add(stored, _NO_CONTEXT_WINDOW.format(field=stored, model=model.name))
        if body.get("instructions") is not None and not isinstance(body["instructions"], str):
            p.add("instructions", "must be a string")
        if body.get("tools") is not None and not isinstance(body["tools"], list):
            p.add("tools", "must be a list")
        if body.get("background") is True:
            # A background response finishes after this request: nothing to settle then.
            p.add("background", "background responses are not supported; stream instead")
        stream = _stream(p, body)
        cap = _cap(p, body, "max_output_tokens", model, required=False)
        model = _done(p, "Responses API", name, model)
        upstream_body = dict(body)
        if cap is None:
            # No cap from the client: send the model's, so the hold is a true bound
            # (reasoning tokens count inside it, as OpenAI counts them).
            upstream_body["max_output_tokens"] = model.max_output_tokens
        image = model.max_image_tokens
        estimate = PER_MESSAGE_OVERHEAD + prompt_bound(inp, image)
        if isinstance(inp, list):
            estimate += PER_MESSAGE_OVERHEAD * len(inp)
        for field in ("instructions", "tools", "text", "tool_choice"):
            if body.get(field) is not None:
                estimate += prompt_bound(body[field], image)
        cap = cap or model.max_output_tokens
        if stored and model.context_window is not None:
            # The earlier turns are read by the provider, unseen here: the
            # prompt can be anything up to what the model reads at most.
            bound = model.context_window
            note = (
                f"A call with {stored} is held for {model.name}'s whole context window"
                f" ({bound} input tokens), since the earlier turns are stored upstream;"
                " sending the conversation in `input` with `store: false` is held for"
                " what it sends."
            )
            return ApiRequest(
                model,
                upstream_body,
                stream,
                bound,
                cap,
                sent_prompt_tokens=estimate,
                hold_note=note,
            )
        return ApiRequest(model, upstream_body, stream, estimate, cap)

    def valid_answer(self, body: dict[str, Any]) -> bool:
        return isinstance(body.get("output"), list)

    def event_error(self, obj: dict[str, Any]) -> str | None:
        kind = obj.get("type")
        if kind == "error":
            message = obj.get("message")
            return message if isinstance(message, str) and message else "error event"
        if kind == "response.failed":
            error = (obj.get("response") or {}).get("error")
            message = error.get("message") if isinstance(error, dict) else None
            return message if isinstance(message, str) and message else "response failed"
        return None

    def counts(self, usage: dict[str, Any] | None) -> TokenCounts | None:
        if not usage:
            return None
        inp, out = _count(usage.get("input_tokens")), _count(usage.get("output_tokens"))
        if inp is None or out is None:
            return None
        idet, odet = usage.get("input_tokens_details"), usage.get("output_tokens_details")
        cached = _count(idet.get("cached_tokens")) if isinstance(idet, dict) else None
        reasoning = _count(odet.get("reasoning_tokens")) if isinstance(odet, dict) else None
        # Details that do not fit their total are clamped: the totals are billed.
        return TokenCounts(
            inp, out, cached_input=min(cached or 0, inp), reasoning=min(reasoning or 0, out)
        )

    def estimated_usage(self, counts: TokenCounts) -> dict[str, Any]:
        return {
            "input_tokens": counts.input,
            "output_tokens": counts.output,
            "total_tokens": counts.input + counts.output,
            "estimated": True,
        }

    def answer_text_bytes(self, body: dict[str, Any]) -> int:
        total = 0
        for item in body.get("output") or []:
            if not isinstance(item, dict):
                continue
            total += _text(item.get("arguments"))
            for part in (item.get("content") or []) + (item.get("summary") or []):
                if isinstance(part, dict):
                    total += _text(part.get("text")) + _text(part.get("refusal"))
        return total

    def observe(self, relay: TypedRelay, obj: dict[str, Any]) -> EventAction:
        kind = obj.get("type")
        if not isinstance(kind, str):
            return PASS
        if kind.endswith(".delta"):
            relay.text_bytes += _text(obj.get("delta"))
            return PASS
        if kind in self._FINAL or kind == "response.failed":
            response = obj.get("response")
            usage = response.get("usage") if isinstance(response, dict) else None
            if isinstance(usage, dict):
                relay.usage = usage
            if kind == "response.failed":
                relay.error = obj  # relayed as it came, after the settlement
                return ERROR
            relay.usage_chunk = obj  # sent after settling, with the cost
            return DONE
        if kind == "error":
            relay.error = obj
            return ERROR
        return PASS

    def final_events(
        self,
        relay: Relay,
        req: MeteredRequest,
        usage: dict[str, Any],
        complete: bool,
        end: StreamEnd | Literal[""],
    ) -> list[bytes]:
        held = relay.usage_chunk
        if not complete or held is None:
            return [self.stream_error(relay, end)]
        response = held.get("response")
        response = response if isinstance(response, dict) else {}
        return [typed_event({**held, "response": {**response, "usage": usage}})]

    def failure_event(self, message: str, code: str) -> bytes:
        # The Responses API's own error event (the SDK yields it as ResponseErrorEvent).
        return typed_event(
            {"type": "error", "code": code, "message": message, "param": None, "sequence_number": 0}
        )


# ---------------------------------------------------------------- Anthropic Messages

_ANTHROPIC_ROLES = ("user", "assistant")


class MessagesDialect(TypedDialect):
    """Anthropic's Messages API (``POST /v1/messages``), to upstreams of kind anthropic."""

    api = "messages"
    path = "/v1/messages"
    upstream_path = "/messages"
    error_shape = "anthropic"
    passed_headers = ("anthropic-version", "anthropic-beta")

    def parse(
        self,
        body: dict[str, Any],
        models: Mapping[str, Model],
        bytes_per_token: int,
        *,
        default_model: str | None = None,
    ) -> MeteredRequest:
        p = v.Problems()
        name, model = _model(p, body, models, default_model)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            p.add("messages", "required: a non-empty list of messages")
            messages = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                p.add(f"messages[{i}]", "must be an object")
                continue
            if m.get("role") not in _ANTHROPIC_ROLES:
                p.add(f"messages[{i}].role", "must be 'user' or 'assistant'")
            if not isinstance(m.get("content"), str | list):
                p.add(f"messages[{i}].content", "required: a string or a list of content blocks")
        if model is not None and len(messages) > model.max_messages:
            p.add("messages", f"at most {model.max_messages} messages for {model.name}")
        system = body.get("system")
        if system is not None and not isinstance(system, str | list):
            p.add("system", "must be a string or a list of text blocks")
        if body.get("tools") is not None and not isinstance(body["tools"], list):
            p.add("tools", "must be a list")
        stream = _stream(p, body)
        # Anthropic requires max_tokens: it bounds the output (thinking included).
        cap = _cap(p, body, "max_tokens", model, required=True)
        model = _done(p, "Messages API", name, model)
        assert cap is not None
        image = model.max_image_tokens
        estimate = sum(
            PER_MESSAGE_OVERHEAD + prompt_bound(m.get("content"), image) for m in messages
        )
        for field in ("system", "tools", "tool_choice"):
            if body.get(field) is not None:
                estimate += PER_MESSAGE_OVERHEAD + prompt_bound(body[field], image)
        if body.get("tools"):
            estimate += ANTHROPIC_TOOL_PROMPT_TOKENS
        return ApiRequest(model, dict(body), stream, estimate, cap)

    def valid_answer(self, body: dict[str, Any]) -> bool:
        return isinstance(body.get("content"), list)

    def counts(self, usage: dict[str, Any] | None) -> TokenCounts | None:
        if not usage:
            return None
        inp, out = _count(usage.get("input_tokens")), _count(usage.get("output_tokens"))
        if inp is None or out is None:
            return None
        # Anthropic's input_tokens excludes the cache's: the prompt is all three.
        read = _count(usage.get("cache_read_input_tokens")) or 0
        write = _count(usage.get("cache_creation_input_tokens")) or 0
        return TokenCounts(inp + read + write, out, cached_input=read, cache_write=write)

    def estimated_usage(self, counts: TokenCounts) -> dict[str, Any]:
        return {"input_tokens": counts.input, "output_tokens": counts.output, "estimated": True}

    def answer_text_bytes(self, body: dict[str, Any]) -> int:
        total = 0
        for block in body.get("content") or []:
            if isinstance(block, dict):
                total += _text(block.get("text")) + _text(block.get("thinking"))
                if block.get("input") is not None:
                    total += len(orjson.dumps(block["input"]))
        return total

    def observe(self, relay: TypedRelay, obj: dict[str, Any]) -> EventAction:
        kind = obj.get("type")
        if kind == "content_block_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict):
                relay.text_bytes += (
                    _text(delta.get("text"))
                    + _text(delta.get("partial_json"))
                    + _text(delta.get("thinking"))
                )
            return PASS
        if kind == "message_start":
            message = obj.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            relay.start_usage = usage if isinstance(usage, dict) else None
            return PASS
        if kind == "message_delta":
            # Its usage is cumulative and may repeat the input side; message_start's
            # fields fill what it leaves out. The output count is final only here.
            delta_usage = obj.get("usage")
            if isinstance(delta_usage, dict):
                given = {k: n for k, n in delta_usage.items() if n is not None}
                relay.usage = {**(relay.start_usage or {}), **given}
            relay.usage_chunk = obj  # sent after settling, with the cost
            return HOLD
        if kind == "message_stop":
            return DONE
        if kind == "error":
            relay.error = obj
            return ERROR
        return PASS

    def final_events(
        self,
        relay: Relay,
        req: MeteredRequest,
        usage: dict[str, Any],
        complete: bool,
        end: StreamEnd | Literal[""],
    ) -> list[bytes]:
        if not complete:
            return [self.stream_error(relay, end)]
        held = relay.usage_chunk or {
            "type": "message_delta",
            "delta": {"stop_reason": None, "stop_sequence": None},
        }
        return [
            typed_event({**held, "usage": usage}),
            typed_event({"type": "message_stop"}),
        ]

    def failure_event(self, message: str, code: str) -> bytes:
        return typed_event(anthropic_error(500, message, code))


# ---------------------------------------------------------------- embeddings


class EmbeddingsDialect(Dialect):
    """OpenAI's embeddings (``POST /v1/embeddings``): input tokens only."""

    api = "embeddings"
    path = "/v1/embeddings"
    upstream_path = "/embeddings"

    def parse(
        self,
        body: dict[str, Any],
        models: Mapping[str, Model],
        bytes_per_token: int,
        *,
        default_model: str | None = None,
    ) -> MeteredRequest:
        p = v.Problems()
        name, model = _model(p, body, models, default_model)
        inp = body.get("input")
        single = isinstance(inp, str) or _tokens(inp)
        items: list[Any] = [inp] if single else inp if isinstance(inp, list) else []
        if not items:
            p.add("input", "required: a string, a list of strings, or token arrays")
            items = []
        elif len(items) > MAX_EMBEDDING_INPUTS:
            p.add("input", f"at most {MAX_EMBEDDING_INPUTS} inputs per request")
        estimate = 0
        for i, item in enumerate(items):
            path = "input" if single else f"input[{i}]"
            if isinstance(item, str) and item:
                estimate += len(item.encode())
            elif _tokens(item):
                estimate += len(item)
            else:
                p.add(path, "must be a non-empty string or a non-empty array of token ids")
        if body.get("stream"):
            p.add("stream", "embeddings do not stream")
        fmt = body.get("encoding_format")
        if fmt is not None and fmt not in ("float", "base64"):
            p.add("encoding_format", "must be 'float' or 'base64'")
        dims = body.get("dimensions")
        if dims is not None and (not v.is_int(dims) or dims < 1):
            p.add("dimensions", "must be a positive integer")
        model = _done(p, "embeddings", name, model)
        return ApiRequest(model, dict(body), False, estimate, 0)

    def valid_answer(self, body: dict[str, Any]) -> bool:
        return isinstance(body.get("data"), list)

    def counts(self, usage: dict[str, Any] | None) -> TokenCounts | None:
        n = _count(usage.get("prompt_tokens")) if usage else None
        return None if n is None else TokenCounts(n, 0)

    def estimated_usage(self, counts: TokenCounts) -> dict[str, Any]:
        return {"prompt_tokens": counts.input, "total_tokens": counts.input, "estimated": True}


def _tokens(value: Any) -> bool:
    """A non-empty array of token ids."""
    return isinstance(value, list) and bool(value) and all(v.is_int(t) for t in value)


RESPONSES = ResponsesDialect()
MESSAGES = MessagesDialect()
EMBEDDINGS = EmbeddingsDialect()


async def responses(request: web.Request) -> web.StreamResponse:
    """``POST /v1/responses``: OpenAI's Responses API, metered."""
    return await serve_metered(request, RESPONSES)


async def messages(request: web.Request) -> web.StreamResponse:
    """``POST /v1/messages``: Anthropic's Messages API, metered."""
    return await serve_metered(request, MESSAGES)


async def embeddings(request: web.Request) -> web.StreamResponse:
    """``POST /v1/embeddings``: embeddings, metered per input token."""
    return await serve_metered(request, EMBEDDINGS)


async def count_tokens(request: web.Request) -> web.Response:
    """``POST /v1/messages/count_tokens``: passed to the model's Anthropic upstream,
    unmetered (it generates nothing); authenticated like every route."""
    request[ERROR_SHAPE] = "anthropic"
    st = request.app[CHAT]
    principal = await authenticate(request)
    body = await read_json_object(request)
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise ValidationError(
            "The request is not a valid count_tokens request: model: required",
            details=[{"path": "model", "message": "required: the name of a model"}],
        )
    model = st.settings.config.models.get(name)
    if model is None:
        raise ModelNotFound(
            f"The model {name!r} does not exist or is not served here; see GET /v1/models.",
            details=[{"path": "model", "message": "unknown model"}],
        )
    check_api(model, MESSAGES)
    # Free, but a call to the operator's upstream all the same: it counts as a
    # request (per minute, and in flight), never as tokens or a daily message.
    limits = await st.limits.get(principal.account_id, principal.key_id)
    admission = await st.throttle.admit(limits, 0)
    try:
        status, answer = await st.upstream.forward(
            model,
            "/messages/count_tokens",
            body,
            MESSAGES.upstream_headers(request),
            seconds=min(COUNT_TOKENS_TIMEOUT, model.timeouts.total),
        )
    finally:
        await st.throttle.finish(admission, None)
    return web.Response(body=answer, status=status, content_type="application/json")


# ---------------------------------------------------------------- the endpoint table

_COST = {"cost": CREDITS, "cost_micros": MICROS, "estimated": BOOL}
RESPONSES_REQUEST: Schema = obj(
    {
        "model": STR,
        "input": {"oneOf": [STR, arr({"type": "object"})]},
        "instructions": nullable(STR),
        "stream": nullable(BOOL),
        "max_output_tokens": nullable({"type": "integer", "minimum": 1}),
        # Continuing stored state needs the model's context_window (else 400).
        "previous_response_id": nullable({"type": "string", "minLength": 1}),
        "conversation": nullable({"oneOf": [STR, {"type": "object"}]}),
        "store": nullable(BOOL),
        "tools": nullable(arr({"type": "object"})),
    },
    extra=True,
)
RESPONSE: Schema = obj(
    {
        "id": STR,
        "object": STR,
        "output": arr({"type": "object"}),
        "usage": obj(
            {"input_tokens": INT, "output_tokens": INT, "total_tokens": INT, **_COST},
            "input_tokens",
            "output_tokens",
            "cost",
            "cost_micros",
            extra=True,
        ),
    },
    "output",
    "usage",
    extra=True,
)
MESSAGES_REQUEST: Schema = obj(
    {
        "model": STR,
        "messages": arr(obj({"role": {"enum": list(_ANTHROPIC_ROLES)}}, "role", extra=True)),
        "max_tokens": {"type": "integer", "minimum": 1},
        "system": {"oneOf": [STR, arr({"type": "object"})]},
        "stream": nullable(BOOL),
        "tools": nullable(arr({"type": "object"})),
    },
    "messages",
    "max_tokens",
    extra=True,
)
MESSAGE: Schema = obj(
    {
        "id": STR,
        "type": {"const": "message"},
        "content": arr({"type": "object"}),
        "usage": obj(
            {"input_tokens": INT, "output_tokens": INT, **_COST},
            "input_tokens",
            "output_tokens",
            "cost",
            "cost_micros",
            extra=True,
        ),
    },
    "content",
    "usage",
    extra=True,
)
EMBEDDINGS_REQUEST: Schema = obj(
    {
        "model": STR,
        "input": {
            "oneOf": [STR, arr(STR), arr(INT), arr(arr(INT))],
            "description": "one input or a batch; priced per input token",
        },
        "encoding_format": {"enum": ["float", "base64"]},
        "dimensions": {"type": "integer", "minimum": 1},
    },
    "input",
    extra=True,
)
EMBEDDINGS_ANSWER: Schema = obj(
    {
        "object": STR,
        "data": arr({"type": "object"}),
        "model": STR,
        "usage": obj(
            {"prompt_tokens": INT, "total_tokens": INT, **_COST},
            "prompt_tokens",
            "cost",
            "cost_micros",
            extra=True,
        ),
    },
    "data",
    "usage",
    extra=True,
)
_METERED_ERRORS = (402, 404, 409, 422, 429, 502, 503, 504)

ENDPOINTS = (
    Endpoint(
        "POST",
        "/v1/responses",
        responses,
        "OpenAI Responses API (stateless: store false), charged to the caller",
        "completions",
        "caller",
        request=RESPONSES_REQUEST,
        response=RESPONSE,
        errors=_METERED_ERRORS,
        envelope=False,
        stream=True,
    ),
    Endpoint(
        "POST",
        "/v1/messages",
        messages,
        "Anthropic Messages API (x-api-key or Bearer key), charged to the caller",
        "completions",
        "caller",
        request=MESSAGES_REQUEST,
        response=MESSAGE,
        errors=_METERED_ERRORS,
        envelope=False,
        stream=True,
        error_shape="anthropic",
    ),
    Endpoint(
        "POST",
        "/v1/messages/count_tokens",
        count_tokens,
        "Anthropic's token count, passed through unmetered",
        "completions",
        "caller",
        request=obj({"model": STR, "messages": arr({"type": "object"})}, "model", extra=True),
        response=obj({"input_tokens": INT}, "input_tokens", extra=True),
        errors=(404, 502, 503, 504),
        envelope=False,
        error_shape="anthropic",
    ),
    Endpoint(
        "POST",
        "/v1/embeddings",
        embeddings,
        "OpenAI embeddings, charged per input token",
        "completions",
        "caller",
        request=EMBEDDINGS_REQUEST,
        response=EMBEDDINGS_ANSWER,
        errors=_METERED_ERRORS,
        envelope=False,
    ),
)
