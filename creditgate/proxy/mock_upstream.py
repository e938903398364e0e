"""A mock OpenAI-compatible upstream — a development and test tool, not a provider.

It answers ``POST /v1/chat/completions`` (JSON or SSE, ``usage`` as OpenAI
sends it, the final usage chunk when ``stream_options.include_usage`` is
set, ``n`` choices, tool calls when the request offers tools) and ``GET
/v1/models``, with deterministic text and token counts: ``prompt_tokens`` =
Σ ceil(content bytes / 4) + 3 per message, one completion token per chunk.

Fault modes (``mock_faults.FAULT_MODES``) make it misbehave on purpose: as
server defaults, per request by ``x-mock-*`` header, or in the body's
``"mock"`` object. ``GET /mock/stats`` counts, per ``key``, the requests it
received, the answers it finished and the streams whose reader went away.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from creditgate.proxy.mock_faults import FaultError, resolve

_SENTENCE = ("Hello", " from", " the", " mock", " upstream")
_ids = itertools.count(1)
STALL_LIMIT = 3600.0  # seconds a stalled stream waits for its reader to leave


@dataclass
class MockStats:
    """What the mock saw, per ``key``: tests and benchmarks count attempts here."""

    requests: Counter[str] = field(default_factory=Counter)
    completed: Counter[str] = field(default_factory=Counter)  # answers sent whole
    cut: Counter[str] = field(default_factory=Counter)  # streams whose reader left
    chunks_sent: Counter[str] = field(default_factory=Counter)  # token chunks written
    last_body: dict[str, Any] = field(default_factory=dict)  # the last request body per key
    # Responses stored (store: true) by id: their context's tokens (prompt and
    # output), which a call naming them as previous_response_id reads again.
    stored_tokens: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, dict[str, int]]:
        return {
            "requests": dict(self.requests),
            "completed": dict(self.completed),
            "cut": dict(self.cut),
            "chunks_sent": dict(self.chunks_sent),
            "last_body": self.last_body,
        }


STATS = web.AppKey("stats", MockStats)
FAILURES = web.AppKey("failures", Counter)
DEFAULTS = web.AppKey("defaults", dict[str, Any])


def prompt_tokens(messages: list[Any]) -> int:
    """The mock's token count of a prompt: Σ ceil(content bytes / 4) + 3 per message."""
    total = 0
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            content = "".join(
                p.get("text", "")
                for p in content
                if isinstance(p, dict) and p.get("type") == "text"
            )
        size = len(content.encode()) if isinstance(content, str) else 0
        total += -(-size // 4) + 3
    return total


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "mock_error", "param": None, "code": None}}
    return web.json_response(body, status=status, headers=headers)


# ---------------------------------------------------------------- what to answer


def _sample(schema: Any) -> Any:
    """A value that fits a JSON-schema property, for tool-call arguments."""
    kind = schema.get("type") if isinstance(schema, dict) else None
    if isinstance(schema, dict) and schema.get("enum"):
        return schema["enum"][0]
    return {"string": "mock", "integer": 1, "number": 1.5, "boolean": True, "array": []}.get(
        str(kind), {}
    )


def _tool_to_call(body: dict[str, Any]) -> dict[str, Any] | None:
    """The function the answer calls, when the request offers tools and a user spoke last."""
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and t.get("function")]
    choice = body.get("tool_choice")
    if not tools or choice == "none":
        return None
    messages = body["messages"]
    last = messages[-1] if messages else {}
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        tools = [t for t in tools if t["function"].get("name") == wanted] or tools
    elif isinstance(last, dict) and last.get("role") != "user":
        return None  # a tool result came back: answer in words
    fn = tools[0]["function"]
    return fn if isinstance(fn, dict) else None


def _tool_arguments(fn: dict[str, Any], modes: dict[str, Any]) -> str:
    if "tool_arguments" in modes:
        return str(modes["tool_arguments"])
    params = fn.get("parameters") or {}
    props = params.get("properties") or {}
    required = params.get("required") or list(props)
    return orjson.dumps({name: _sample(props.get(name)) for name in required}).decode()


def _words_after_tool(messages: list[Any]) -> list[str]:
    last = messages[-1] if messages else {}
    content = last.get("content") if isinstance(last, dict) else None
    text = content if isinstance(content, str) else orjson.dumps(content).decode()
    return ["The", " tool", " returned", ": ", text]


@dataclass
class _Plan:
    """One choice's answer: its token pieces, as text or as tool-call argument pieces."""

    pieces: list[str]
    finish: str
    tool: dict[str, Any] | None = None  # {"id", "name"} when the answer is a tool call


def _plan(body: dict[str, Any], modes: dict[str, Any]) -> _Plan:
    cap = body.get("max_completion_tokens") or body.get("max_tokens")
    capped = isinstance(cap, int) and not modes.get("ignore_max_tokens")
    fn = _tool_to_call(body)
    if fn is not None:
        args = _tool_arguments(fn, modes)
        pieces = [args[i : i + 8] for i in range(0, len(args), 8)] or [""]
        tool = {"id": f"call_mock_{next(_ids)}", "name": str(fn.get("name", "tool"))}
        return _Plan(pieces, "tool_calls", tool)
    if body["messages"] and (body["messages"][-1] or {}).get("role") == "tool":
        pieces = _words_after_tool(body["messages"])
    else:
        count = int(modes.get("chunks", 5))
        content = modes.get("content")
        pieces = [
            content if content is not None else _SENTENCE[i % len(_SENTENCE)] for i in range(count)
        ]
    finish = "stop"
    if capped and isinstance(cap, int) and len(pieces) >= cap:
        pieces, finish = pieces[:cap], "length"
    return _Plan(pieces, finish)


def _message(plan: _Plan) -> dict[str, Any]:
    if plan.tool is not None:
        call = {
            "id": plan.tool["id"],
            "type": "function",
            "function": {"name": plan.tool["name"], "arguments": "".join(plan.pieces)},
        }
        return {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}
    return {"role": "assistant", "content": "".join(plan.pieces), "refusal": None}


def _delta(plan: _Plan, i: int) -> dict[str, Any]:
    if plan.tool is None:
        return {"content": plan.pieces[i]}
    return {"tool_calls": [{"index": 0, "function": {"arguments": plan.pieces[i]}}]}


def _first_delta(plan: _Plan) -> dict[str, Any]:
    if plan.tool is None:
        return {"role": "assistant", "content": "", "refusal": None}
    call = {
        "index": 0,
        "id": plan.tool["id"],
        "type": "function",
        "function": {"name": plan.tool["name"], "arguments": ""},
    }
    return {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}


_JSON_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
# The shape modes that make the usage carry OpenAI's details objects.
_DETAIL_MODES = (
    "cached_tokens",
    "cache_write_tokens",
    "audio_input_tokens",
    "audio_output_tokens",
    "reasoning_tokens",
    "accepted_prediction_tokens",
    "rejected_prediction_tokens",
)


def _usage(text_in: int, text_out: int, modes: dict[str, Any]) -> dict[str, Any]:
    """The answer's ``usage``, as OpenAI reports it (and OpenRouter's ``cost``).

    Details are parts of the totals, as OpenAI counts them: audio prompt
    tokens are added to the prompt's text tokens, cached and cache-write
    tokens are that many of them (clamped to the text); reasoning, audio and
    rejected prediction tokens are added to the completion's text tokens,
    accepted prediction tokens are that many of them (clamped).
    """

    def n(name: str) -> int:
        value = modes.get(name, 0)
        if value < 0:
            raise ValueError(f"{name}: must not be negative")
        return int(value)

    audio_in, audio_out = n("audio_input_tokens"), n("audio_output_tokens")
    reasoning, rejected = n("reasoning_tokens"), n("rejected_prediction_tokens")
    prompt = text_in + audio_in
    completion = text_out + audio_out + reasoning + rejected
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if any(name in modes for name in _DETAIL_MODES):
        cached = min(n("cached_tokens"), text_in)
        prompt_details = {"cached_tokens": cached, "audio_tokens": audio_in}
        if "cache_write_tokens" in modes:  # not OpenAI's: only when asked for
            prompt_details["cache_write_tokens"] = min(n("cache_write_tokens"), text_in - cached)
        usage["prompt_tokens_details"] = prompt_details
        usage["completion_tokens_details"] = {
            "reasoning_tokens": reasoning,
            "audio_tokens": audio_out,
            "accepted_prediction_tokens": min(n("accepted_prediction_tokens"), text_out),
            "rejected_prediction_tokens": rejected,
        }
    if "cost" in modes:
        text = str(modes["cost"]).strip()
        if not _JSON_NUMBER.fullmatch(text):
            raise ValueError(f"cost: not a JSON number: {text!r}")
        # Written as the JSON number given, digit for digit (a float could round it),
        # with the two fields OpenRouter sends beside it.
        usage["cost"] = orjson.Fragment(text.encode())
        usage["is_byok"] = False
        usage["cost_details"] = {"upstream_inference_cost": None}
    return usage


# ---------------------------------------------------------------- the handler


async def chat_completions(request: web.Request) -> web.StreamResponse:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "invalid JSON")
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return _error(400, "messages is required")
    model = str(body.get("model", "mock-model"))
    try:
        modes = resolve(request.app[DEFAULTS], request.headers, body.get("mock"), model)
    except FaultError as e:
        return _error(400, f"mock: {e}")
    key = str(modes.get("key", "default"))
    stats = request.app[STATS]
    stats.requests[key] += 1
    stats.last_body[key] = body

    refused = await prelude(request, modes, key)
    if refused is not None:
        return refused

    n = body.get("n") or 1
    plans = [_plan(body, modes) for _ in range(n)]
    tokens = sum(len(p.pieces) for p in plans)
    try:
        usage = _usage(modes.get("prompt_tokens") or prompt_tokens(body["messages"]), tokens, modes)
    except ValueError as e:
        return _error(400, f"mock: {e}")
    ident = f"chatcmpl-mock-{next(_ids)}"
    created = int(time.time())
    if not body.get("stream"):
        answer: dict[str, Any] = {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {"index": i, "message": _message(p), "logprobs": None, "finish_reason": p.finish}
                for i, p in enumerate(plans)
            ],
            "system_fingerprint": None,
        }
        if not modes.get("no_usage"):
            answer["usage"] = usage
        stats.completed[key] += 1
        return web.Response(body=orjson.dumps(answer), content_type="application/json")
    return await _stream(request, body, modes, key, plans, usage, ident, created)


ErrorBody = Callable[[int, str, "dict[str, str] | None"], web.Response]


async def prelude(
    request: web.Request, modes: dict[str, Any], key: str, error: ErrorBody = _error
) -> web.StreamResponse | None:
    """The faults due before any answer (a status, a failure count, a slow first
    byte), for every API; ``error`` makes the API's error answer. None: go on."""
    stats = request.app[STATS]
    if "fail_times" in modes:
        failures = request.app[FAILURES]
        if failures[key] < modes["fail_times"]:
            failures[key] += 1
            headers = (
                {"Retry-After": f"{modes['retry_after']:g}"} if "retry_after" in modes else None
            )
            return error(modes.get("status", 500), "mock failure", headers)
    elif "status" in modes:
        headers = {"Retry-After": f"{modes['retry_after']:g}"} if "retry_after" in modes else None
        return error(modes["status"], f"mock status {modes['status']}", headers)
    if modes.get("first_byte_ms"):
        try:
            await asyncio.sleep(modes["first_byte_ms"] / 1000)
        except asyncio.CancelledError:  # the caller left (a server cancelling handlers)
            stats.cut[key] += 1
            raise
        transport = request.transport
        if transport is None or transport.is_closing():
            stats.cut[key] += 1  # the caller left meanwhile
            return web.Response()
    return None


class _Chunks:
    """The SSE events of one streamed answer."""

    def __init__(self, body: dict[str, Any], ident: str, created: int) -> None:
        self.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self.base = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": str(body.get("model", "mock-model")),
            "system_fingerprint": None,
        }

    def chunk(self, index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
        obj: dict[str, Any] = {
            **self.base,
            "choices": [
                {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            ],
        }
        if self.include_usage:
            obj["usage"] = None  # as OpenAI sends it when usage was asked for
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    def usage(self, usage: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps({**self.base, "choices": [], "usage": usage}) + b"\n\n"


async def _stream(
    request: web.Request,
    body: dict[str, Any],
    modes: dict[str, Any],
    key: str,
    plans: list[_Plan],
    usage: dict[str, Any],
    ident: str,
    created: int,
) -> web.StreamResponse:
    stats = request.app[STATS]
    transport = request.transport
    assert transport is not None
    if modes.get("send_buffer"):
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, modes["send_buffer"])
    events = _Chunks(body, ident, created)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    delay = modes.get("chunk_delay_ms", 0) / 1000
    heartbeat = modes.get("heartbeat_every")
    stamp = modes.get("stamp", False)
    longest = max(len(p.pieces) for p in plans)
    ended = CUT  # unless the stream gets further: its reader left (or cancelled us)
    try:
        await resp.prepare(request)
        if modes.get("first_chunk_ms"):
            await asyncio.sleep(modes["first_chunk_ms"] / 1000)
        for i in range(longest + 1):
            # Faults are due once i rounds of token chunks are out (at 0: before any event).
            fault_end = await fault_at(request, resp, modes, i)
            if fault_end is not None:
                ended = fault_end
                return resp
            if i == 0:
                await resp.write(
                    b"".join(events.chunk(c, _first_delta(p)) for c, p in enumerate(plans))
                )
            if i == longest:
                break
            if delay:
                await asyncio.sleep(delay)
            if heartbeat and i % heartbeat == 0:
                await resp.write(b": keep-alive\n\n")
            for c, plan in enumerate(plans):
                if i < len(plan.pieces):
                    delta = {"content": f"{time.monotonic():.6f} "} if stamp else _delta(plan, i)
                    await resp.write(events.chunk(c, delta))
                    stats.chunks_sent[key] += 1
        tail = [events.chunk(c, {}, p.finish) for c, p in enumerate(plans)]
        if events.include_usage and not modes.get("no_usage"):
            tail.append(events.usage(usage))
        tail.append(b"data: [DONE]\n\n")
        await resp.write(b"".join(tail))
        await resp.write_eof()
        ended = COMPLETED
    except ConnectionResetError:
        pass  # the reader left
    finally:
        if ended == COMPLETED:
            stats.completed[key] += 1
        elif ended == CUT:
            stats.cut[key] += 1
    return resp


# How a mock stream ended (for MockStats).
COMPLETED, CUT, DROPPED = "completed", "cut", "dropped"


_OPENAI_ERROR_EVENT = (
    b"data: "
    + orjson.dumps(
        {"error": {"message": "mock mid-stream failure", "type": "server_error", "code": None}}
    )
    + b"\n\n"
)


async def fault_at(
    request: web.Request,
    resp: web.StreamResponse,
    modes: dict[str, Any],
    sent: int,
    error_event: bytes = _OPENAI_ERROR_EVENT,
) -> str | None:
    """Apply the fault modes due once ``sent`` token chunks are out.

    Returns how the stream ended when a fault ended it, None to go on.
    ``error_event`` is the API's mid-stream error (``error_after``).
    """
    if modes.get("drop_after") == sent:
        assert request.transport is not None
        request.transport.close()
        return DROPPED
    if modes.get("malformed_after") == sent:
        await resp.write(b"data: {not json\n\n")
    if modes.get("error_after") == sent:
        await resp.write(error_event)
        await resp.write_eof()
        return COMPLETED
    if modes.get("stall_after") == sent:
        # Keep the connection, send nothing, until the reader goes away.
        loop = asyncio.get_running_loop()
        until = loop.time() + STALL_LIMIT
        while loop.time() < until:
            transport = request.transport
            if transport is None or transport.is_closing():
                break
            await asyncio.sleep(0.02)
        return CUT
    return None


async def list_models(request: web.Request) -> web.Response:
    return web.json_response(
        {"object": "list", "data": [{"id": "mock-model", "object": "model", "owned_by": "mock"}]}
    )


async def mock_stats(request: web.Request) -> web.Response:
    """``GET /mock/stats``: requests, completed answers and cut streams per key."""
    return web.json_response(request.app[STATS].as_json())


def create_mock_app(**defaults: Any) -> web.Application:
    """The mock upstream app; ``defaults`` are fault modes a request may override."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATS] = MockStats()
    app[FAILURES] = Counter()
    app[DEFAULTS] = {k: v for k, v in defaults.items() if v is not None}
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    # The other APIs (Responses, Anthropic Messages, embeddings) build on this
    # module's faults and stats, so they are imported here, when the app is made.
    from creditgate.proxy.mock_apis import add_api_routes

    add_api_routes(app)
    app.router.add_get("/mock/stats", mock_stats)
    return app
