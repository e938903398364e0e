"""``POST /v1/chat/completions`` (and ``/api/chat``), ``GET /v1/models``, and
``serve_metered``: the one metered path every API's route runs (chat here; the
Responses API, Anthropic Messages and embeddings in ``proxy.apis``), each
with its ``proxy.dialect.Dialect``.

The request path: authenticate → validate → throttle → reserve the worst-case
cost → call the upstream → settle the actual cost → answer. Every exit
settles or releases the hold exactly once (``MeteredCall``), and the
settlement commits before the response's last byte (the ``[DONE]`` event, or
the JSON body) is sent.

How each exit is billed:

===============================  ===========================================
the upstream answered            its usage, exactly
… without usage                  an estimate from the text, marked estimated
the client left mid-call         prompt estimate + the text generated so far
                                 (or the usage, if it came); upstream closed
the upstream failed or timed     mid-stream: what it generated (as above);
out                              before any output: nothing, hold released
the client stopped reading       as a client that left: what was relayed (the
                                 call is cut at its deadline or send timeout)
the request was refused          nothing; no hold was taken
===============================  ===========================================
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import Iterator
from typing import Any, Literal

import orjson
from aiohttp import web

from creditgate.auth import authenticate
from creditgate.config import Config, Model
from creditgate.domain_errors import DomainError
from creditgate.errors import ModelNotFound
from creditgate.ledger.errors import CreditsExhausted, KeyBudgetExceeded
from creditgate.ledger.ids import time_ordered_id
from creditgate.logs import log
from creditgate.metrics import (
    LEDGER_LATENCY,
    PROXY_OVERHEAD,
    STREAM_ENDS,
    UPSTREAM_DURATION,
    cached_labels,
)
from creditgate.proxy import relay as ends
from creditgate.proxy.dialect import CHAT_DIALECT, ROUTES, Dialect, MeteredRequest
from creditgate.proxy.disconnect import ClientWatch
from creditgate.proxy.metering import MeteredCall
from creditgate.proxy.ports import CHAT, ChatDeps
from creditgate.proxy.pricing import affordable_max_tokens, price_text, worst_case_micros
from creditgate.proxy.relay import Relay, StreamEnd
from creditgate.proxy.upstream import Answer, Stream
from creditgate.webkit.drain import SHUTDOWN_END, shutdown_cut, uncancel_cut
from creditgate.webkit.envelope import ERROR_SHAPE, json_response, read_json_object
from creditgate.webkit.ids import REQUEST_ID, STARTED
from creditgate.webkit.openapi import (
    BOOL,
    CREDITS,
    INT,
    MICROS,
    NUM,
    STR,
    Endpoint,
    Schema,
    arr,
    nullable,
    obj,
)

_RESERVE_LATENCY = LEDGER_LATENCY.labels("reserve")
_stream_ends = cached_labels(STREAM_ENDS)
_upstream_duration = cached_labels(UPSTREAM_DURATION)
_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # tell nginx-like proxies not to buffer the stream
}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """OpenAI-compatible chat completion, streaming or not, charged to the caller."""
    return await serve_metered(request, CHAT_DIALECT)


async def serve_metered(request: web.Request, dialect: Dialect) -> web.StreamResponse:
    """One metered call of any API, its dialect supplying what differs.

    Plain and in order: authenticate → validate → throttle → reserve (durable)
    → upstream → settle → answer. Nothing reaches the upstream or the client
    before the call's hold is committed and flushed.
    """
    request[ERROR_SHAPE] = dialect.error_shape  # errors in the shape its clients parse
    st = request.app[CHAT]
    principal = await authenticate(request)
    account_id = principal.account_id
    request_id = request[REQUEST_ID]
    config = st.settings.config
    body = await read_json_object(request)
    # Only a request naming no model asks for the account's default (cached).
    default_model = await st.default_models.get(account_id) if body.get("model") is None else None
    chat = dialect.parse(
        body, config.models, config.estimate_bytes_per_token, default_model=default_model
    )
    check_api(chat.model, dialect)
    limits = await st.limits.get(account_id, principal.key_id)
    admission = await st.throttle.admit(
        limits, chat.worst_case_tokens, required_tokens=chat.required_prompt_tokens
    )
    # The call's deadline is fixed before its hold is asked for, and the hold
    # expires a settle margin after that deadline counted from the database's
    # own clock at commit (later still): the hold outlives the call by construction.
    deadline = asyncio.get_running_loop().time() + chat.model.timeouts.total
    started = time.perf_counter()
    hold_id = time_ordered_id()
    holding = st.holds.reserve_soon(
        hold_id=hold_id,
        account_id=account_id,
        amount=worst_case_micros(
            chat.model, chat.prompt_tokens_estimate, chat.worst_case_output_tokens
        ),
        ttl_seconds=hold_ttl_seconds(config, chat.model),
        request_id=request_id,
        model=chat.model.name,
        key_id=principal.key_id,
    )
    try:
        hold = await holding
        _RESERVE_LATENCY.observe(time.perf_counter() - started)
    except BaseException as e:
        _add_affordable_max_tokens(e, chat)
        try:
            # Made but never answered (this handler was cancelled meanwhile, or
            # the reply was lost): given back at once, even if cancelled again.
            await asyncio.shield(_give_back(st, holding, hold_id, e))
        finally:
            await st.throttle.finish(admission, None)  # never served: all given back
        if isinstance(e, CreditsExhausted) and chat.hold_note:
            # Say why the hold is larger than the request looks (the ledger
            # knows amounts, not APIs).
            raise CreditsExhausted(f"{e.message} {chat.hold_note}", details=e.details) from None
        raise
    call = MeteredCall(
        st.holds, st.throttle, config, chat, hold, admission, request_id, deadline, dialect
    )
    try:
        if chat.stream:
            return await _stream(request, call, admission.headers, dialect)
        return await _complete(request, call, admission.headers, dialect)
    finally:
        await call.close()  # releases the hold unless it was settled
        _upstream_duration(chat.model.name).observe(call.upstream_seconds)
        PROXY_OVERHEAD.observe(time.perf_counter() - request[STARTED] - call.upstream_seconds)


def _add_affordable_max_tokens(error: BaseException, chat: MeteredRequest) -> None:
    """A 402 says the largest ``max_tokens`` this prompt could be sent with now
    (``details.affordableMaxTokens``), from what the ledger's refusal found
    spendable — computed on the refusal path only, no statement of its own."""
    if not isinstance(error, CreditsExhausted | KeyBudgetExceeded):
        return
    details = error.details
    if isinstance(details, dict) and isinstance(details.get("spendableMicros"), int):
        # Chat's ``n`` choices each generate up to max_tokens; other APIs one.
        choices = getattr(chat, "n", 1)
        details["affordableMaxTokens"] = affordable_max_tokens(
            chat.model, chat.prompt_tokens_estimate, choices, details["spendableMicros"]
        )


def check_api(model: Model, dialect: Dialect) -> None:
    """404 for a model called through an API it is not served by, naming its route."""
    if dialect.api in model.apis:
        return
    # ROUTES: each dialect's own path (dialect.py), so a route is written once.
    routes = " or ".join(f"POST {ROUTES.get(a, a)}" for a in sorted(model.apis))
    raise ModelNotFound(
        f"The model {model.name!r} is not served through POST {dialect.path}; call it"
        f" through {routes}.",
        details=[{"path": "model", "message": f"served by {routes}"}],
    )


def hold_ttl_seconds(config: Config, model: Model) -> int:
    """A call's hold lives its model's total timeout (the call's deadline) plus
    the settle margin (its settlement, retries included), rounded up to whole
    seconds (rounding up keeps the hold outliving the call)."""
    return math.ceil(model.timeouts.total + config.settle_margin_seconds)


async def _give_back(
    st: ChatDeps, holding: asyncio.Future[Any], hold_id: uuid.UUID, error: BaseException
) -> None:
    """End a reservation whose caller will not use it, however far it got."""
    if isinstance(error, DomainError):
        return  # refused (no credits, no account): nothing was reserved
    await st.holds.give_back(holding)
    if not isinstance(error, asyncio.CancelledError):
        # A reply that failed (a broken connection) may hide a committed
        # hold: releasing an unknown or ended hold is a no-op, so try.
        with contextlib.suppress(Exception):
            await st.holds.release(hold_id)


@contextlib.contextmanager
def _upstream_time(call: MeteredCall) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        call.upstream_seconds += time.perf_counter() - started


async def _client_left(
    call: MeteredCall, text_bytes: int = 0, usage: dict[str, Any] | None = None
) -> web.Response:
    """Bill a call whose client left: the usage if the upstream sent it, else the
    prompt and the text generated so far, estimated."""
    await call.settle(usage, text_bytes)
    log.info("client disconnected mid-call", extra={"request_id": call.request_id})
    return web.Response(status=499)  # nobody reads it; the access log shows why


async def _complete(
    request: web.Request, call: MeteredCall, headers: dict[str, str], dialect: Dialect
) -> web.StreamResponse:
    st = request.app[CHAT]
    answer: Answer | None = None  # stays None if the client left while we waited
    try:
        with ClientWatch(request) as watch, _upstream_time(call):
            answer = await st.upstream.complete(
                call.chat.model,
                call.chat.upstream_body,
                deadline=call.deadline,
                api=dialect,
                headers=dialect.upstream_headers(request),
            )
    except asyncio.CancelledError:
        if shutdown_cut(request):
            await call.release()  # nothing delivered: not charged (the client gets a 503)
            raise
        # aiohttp cancelled us (handler_cancellation: the client left).
        await _client_left(call)
        raise
    if watch.gone or answer is None:
        return await _client_left(call)
    body = answer.body
    charge = await call.settle(dialect.answer_usage(body), dialect.answer_text_bytes(body))
    return json_response(
        dialect.with_usage(body, charge.usage),
        headers={
            **headers,
            "x-creditgate-attempts": str(answer.attempts),
            "x-creditgate-deployment": answer.deployment.name,
        },
    )


async def _stream(
    request: web.Request, call: MeteredCall, headers: dict[str, str], dialect: Dialect
) -> web.StreamResponse:
    st = request.app[CHAT]
    model = call.chat.model
    upstream: Stream | None = None
    try:
        with ClientWatch(request) as watch, _upstream_time(call):
            upstream = await st.upstream.stream(
                model,
                call.chat.upstream_body,
                deadline=call.deadline,
                api=dialect,
                headers=dialect.upstream_headers(request),
            )
    except asyncio.CancelledError:
        if shutdown_cut(request):
            await call.release()  # as in _complete
            raise
        await _client_left(call)  # as in _complete
        raise
    if watch.gone or upstream is None:
        # The client left before the first event: nothing was sent, the prompt
        # estimate is charged (the upstream read it).
        if upstream is not None:
            upstream.close()
        return await _client_left(call)
    resp = web.StreamResponse(
        headers={
            **headers,
            **_SSE_HEADERS,
            "x-creditgate-attempts": str(upstream.attempts),
            "x-creditgate-deployment": upstream.deployment.name,
        }
    )
    relay = dialect.relay(upstream, resp, call.progress)
    try:
        # The headers go now: the upstream's first event is already here.
        await resp.prepare(request)
        with ClientWatch(request) as watch, _upstream_time(call):
            await relay.run(model.timeouts.idle, send_timeout=model.timeouts.idle)
    except asyncio.CancelledError:
        upstream.close()
        if shutdown_cut(request):
            # The drain's cut (webkit.drain): ended like any stream cut short.
            uncancel_cut()
            _stream_ends(model.name, SHUTDOWN_END).inc()
            return await _finish_stream(call, relay, SHUTDOWN_END, request.transport, dialect)
        # aiohttp cancelled us (the client left): what was generated is owed.
        _stream_ends(model.name, ends.CANCELLED).inc()
        await call.settle(relay.usage, relay.text_bytes)
        raise
    except BaseException:
        upstream.close()
        raise
    end = ends.CLIENT_GONE if watch.gone else relay.end
    _stream_ends(model.name, end).inc()
    if end != ends.DONE_END:
        upstream.close()  # the upstream stops generating
    if end in (ends.CLIENT_GONE, ends.STALLED):
        if end == ends.STALLED and request.transport is not None:
            # A write that timed out leaves the response half-written: the
            # connection is dropped, nothing more goes to this client.
            request.transport.abort()
        await _client_left(call, relay.text_bytes, relay.usage)
        return resp
    await _finish_stream(call, relay, end, request.transport, dialect)
    if end == ends.DONE_END:
        await upstream.finish()  # after the client has its last byte
    return resp


async def _finish_stream(
    call: MeteredCall,
    relay: Relay,
    end: StreamEnd | Literal[""],
    transport: asyncio.BaseTransport | None,
    dialect: Dialect,
) -> web.StreamResponse:
    """Settle, then send the dialect's final events: the usage with its cost
    (chat: if asked for) and the stream's end (chat: ``[DONE]``) or an error event."""
    resp = relay.resp
    send_timeout = call.chat.model.timeouts.idle
    complete = end == ends.DONE_END or (end == ends.EOF_END and relay.usage is not None)
    tail: list[bytes] = []
    if not complete and relay.usage is None and relay.text_bytes == 0:
        # The upstream failed before generating anything: nothing is charged.
        await call.release()
        log.info("stream failed before any output", extra={**call.log_ids(), "end": end})
        return await _end_stream(resp, [dialect.stream_error(relay, end)], transport, send_timeout)
    try:
        charge = await call.settle(relay.usage, relay.text_bytes)
    except Exception:
        # The content went out and retries (proxy.metering) did not record its
        # charge: the stream must not end as a success. The hold stays for the
        # sweeper, which charges the progress it recorded.
        log.error("settlement failed after a stream", exc_info=True, extra=call.log_ids())
        tail.append(
            dialect.failure_event(
                "The charge for this completion could not be recorded.", "SERVICE_UNAVAILABLE"
            )
        )
    else:
        tail += dialect.final_events(relay, call.chat, charge.usage, complete, end)
        if not complete:
            log.info("stream ended early", extra={**call.log_ids(), "end": end})
    return await _end_stream(resp, tail, transport, send_timeout)


async def _end_stream(
    resp: web.StreamResponse,
    tail: list[bytes],
    transport: asyncio.BaseTransport | None,
    send_timeout: float,
) -> web.StreamResponse:
    """Write the stream's last events, bounded like every other write to the client."""
    try:
        async with asyncio.timeout(send_timeout):
            await resp.write(b"".join(tail))
            await resp.write_eof()
    except ConnectionResetError:
        pass  # the client left after the content; the charge stands
    except TimeoutError:
        # A client that stopped reading at the very end: the charge stands, the
        # connection is dropped rather than held.
        if isinstance(transport, asyncio.Transport):
            transport.abort()
    return resp


def _model_json(m: Model) -> dict[str, Any]:
    pricing: dict[str, Any] = {
        "input": orjson.Fragment(m.input_price_text.encode()),
        "output": orjson.Fragment(m.output_price_text.encode()),
    }
    # The per-kind prices the model sets (absent: its side's price applies).
    for kind in ("cached_input", "cache_write", "audio_input", "audio_output"):
        price = getattr(m, f"{kind}_price")
        if price is not None:
            pricing[kind] = orjson.Fragment(price_text(price).encode())
    return {
        "id": m.name,
        "object": "model",
        "created": 0,
        "owned_by": "creditgate",
        "pricing": {**pricing, "unit": "credits per 1M tokens"},
        "max_output_tokens": m.max_output_tokens,
        # The APIs (routes) that serve it: chat, responses, messages, embeddings.
        "apis": sorted(m.apis),
    }


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models``: the public models this deployment serves, with their prices."""
    st = request.app[CHAT]
    await authenticate(request)
    data = [_model_json(m) for m in st.settings.config.models.values() if m.public]
    return json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    """``GET /v1/models/{model}``: one model (unlisted ones too, by exact name)."""
    st = request.app[CHAT]
    await authenticate(request)
    name = request.match_info["model"]
    model = st.settings.config.models.get(name)
    if model is None:
        raise ModelNotFound(f"The model {name!r} does not exist or is not served here.")
    return json_response(_model_json(model))


# ---------------------------------------------------------------- the endpoint table

_MESSAGE: Schema = obj(
    {
        "role": {"enum": ["system", "developer", "user", "assistant", "tool", "function"]},
        "content": {"oneOf": [STR, arr({"type": "object"}), {"type": "null"}]},
        "name": STR,
        "tool_calls": arr({"type": "object"}),
        "tool_call_id": STR,
    },
    "role",
    extra=True,
)
CHAT_REQUEST: Schema = obj(
    {
        "model": {
            **STR,
            "description": "a model from GET /v1/models; default: the account's defaultModel",
        },
        "messages": arr(_MESSAGE, minItems=1),
        "stream": nullable(BOOL),
        "stream_options": nullable(obj({"include_usage": BOOL}, extra=True)),
        "max_tokens": nullable({"type": "integer", "minimum": 1}),
        "max_completion_tokens": nullable({"type": "integer", "minimum": 1}),
        "n": nullable({"type": "integer", "minimum": 1, "maximum": 128}),
        "tools": nullable(arr({"type": "object"})),
        "response_format": nullable({"type": "object"}),
    },
    "messages",
    extra=True,  # unknown fields go to the upstream untouched
)
USAGE: Schema = obj(
    {
        "prompt_tokens": INT,
        "completion_tokens": INT,
        "total_tokens": INT,
        "cost": CREDITS,
        "cost_micros": MICROS,
        "estimated": BOOL,
    },
    "prompt_tokens",
    "completion_tokens",
    "cost",
    "cost_micros",
    extra=True,
)
CHAT_COMPLETION: Schema = obj(
    {
        "id": STR,
        "object": STR,
        "created": INT,
        "model": STR,
        "choices": arr({"type": "object"}),
        "usage": USAGE,
    },
    "choices",
    "usage",
    extra=True,
)
MODEL: Schema = obj(
    {
        "id": STR,
        "object": {"const": "model"},
        "created": INT,
        "owned_by": STR,
        "pricing": obj(
            {
                "input": NUM,
                "output": NUM,
                "cached_input": NUM,
                "cache_write": NUM,
                "audio_input": NUM,
                "audio_output": NUM,
                "unit": STR,
            },
            "input",
            "output",
            "unit",
        ),
        "max_output_tokens": INT,
        "apis": arr({"enum": ["chat", "responses", "messages", "embeddings"]}),
    },
    "id",
    "object",
    "pricing",
)


def _chat_endpoint(path: str, summary: str) -> Endpoint:
    return Endpoint(
        "POST",
        path,
        chat_completions,
        summary,
        "completions",
        "caller",
        request=CHAT_REQUEST,
        response=CHAT_COMPLETION,
        errors=(402, 404, 409, 422, 429, 502, 503, 504),
        envelope=False,
        stream=True,
    )


ENDPOINTS = (
    _chat_endpoint(
        "/v1/chat/completions", "OpenAI-compatible chat completion, charged to the caller"
    ),
    _chat_endpoint("/api/chat", "The same handler as /v1/chat/completions"),
    Endpoint(
        "GET",
        "/v1/models",
        list_models,
        "The models served here, with prices",
        "completions",
        "caller",
        response=obj({"object": {"const": "list"}, "data": arr(MODEL)}, "object", "data"),
        envelope=False,
        errors=(503,),
    ),
    Endpoint(
        "GET",
        "/v1/models/{model}",
        get_model,
        "One model, with its prices",
        "completions",
        "caller",
        response=MODEL,
        envelope=False,
        errors=(404, 503),
    ),
)
