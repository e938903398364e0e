"""The mock upstream's other APIs: OpenAI's Responses API and embeddings, and
Anthropic's Messages API — their real wire formats, with the same fault modes
as chat completions (``mock_faults``) and the same ``/mock/stats``.

Deterministic counts, as the chat mock's: a prompt is Σ ceil(text bytes / 4) +
3 per input item or message; one output token per streamed piece (plus
``reasoning_tokens``); a Responses call naming a stored response as
``previous_response_id`` reads that response's prompt and output again.
``cached_tokens`` and ``cache_write_tokens`` are parts
of the prompt; Anthropic's ``input_tokens`` is reported without them, as
Anthropic does.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import struct
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from creditgate.proxy.mock_faults import FaultError, resolve
from creditgate.proxy.mock_upstream import (
    _SENTENCE,
    COMPLETED,
    CUT,
    DEFAULTS,
    STATS,
    _error,
    fault_at,
    prelude,
)

_ids = itertools.count(1)
EMBEDDING_DIMENSIONS = 8


def _texts(value: Any) -> list[str]:
    """Every string under ``value`` that is text a model reads (not ids or types)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [t for item in value for t in _texts(item)]
    if isinstance(value, dict):
        return [
            t
            for k, item in value.items()
            if k in ("text", "content", "input", "output", "arguments")
            for t in _texts(item)
        ]
    return []


def text_tokens(value: Any) -> int:
    """The mock's tokens of a text: ceil(UTF-8 bytes / 4)."""
    return -(-sum(len(t.encode()) for t in _texts(value)) // 4)


def items_tokens(items: Any) -> int:
    """Σ ceil(bytes / 4) + 3 per item (a string input is one item)."""
    if isinstance(items, list):
        return sum(text_tokens(i) + 3 for i in items)
    return text_tokens(items) + 3


def _anthropic_error(status: int, message: str, headers: dict[str, str] | None) -> web.Response:
    kind = {429: "rate_limit_error", 529: "overloaded_error"}.get(status, "api_error")
    if 400 <= status < 500 and status != 429:
        kind = "invalid_request_error"
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return web.json_response(body, status=status, headers=headers)


def _sse(obj: dict[str, Any]) -> bytes:
    return b"event: " + str(obj["type"]).encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


async def _setup(
    request: web.Request, error: Callable[..., web.Response]
) -> tuple[dict[str, Any], dict[str, Any], str] | web.StreamResponse:
    """(body, modes, key) of a request, or the answer that ends it early."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return error(400, "invalid JSON", None)
    if not isinstance(body, dict):
        return error(400, "the body must be an object", None)
    try:
        modes = resolve(
            request.app[DEFAULTS], request.headers, body.get("mock"), str(body.get("model"))
        )
    except FaultError as e:
        return error(400, f"mock: {e}", None)
    key = str(modes.get("key", "default"))
    stats = request.app[STATS]
    stats.requests[key] += 1
    stats.last_body[key] = body
    refused = await prelude(request, modes, key, error)
    if refused is not None:
        return refused
    return body, modes, key


def _pieces(modes: dict[str, Any], cap: Any) -> list[str]:
    count = int(modes.get("chunks", 5))
    content = modes.get("content")
    pieces = [
        content if content is not None else _SENTENCE[i % len(_SENTENCE)] for i in range(count)
    ]
    if isinstance(cap, int) and not modes.get("ignore_max_tokens"):
        pieces = pieces[:cap]
    return pieces


async def _stream(
    request: web.Request,
    modes: dict[str, Any],
    key: str,
    head: list[bytes],
    pieces: list[bytes],
    tail: list[bytes],
    error_event: bytes,
) -> web.StreamResponse:
    """Write ``head``, one event per piece (the faults due between them), ``tail``."""
    stats = request.app[STATS]
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    delay = modes.get("chunk_delay_ms", 0) / 1000
    heartbeat = modes.get("heartbeat_every")
    ended = CUT
    try:
        await resp.prepare(request)
        if modes.get("first_chunk_ms"):
            await asyncio.sleep(modes["first_chunk_ms"] / 1000)
        for i in range(len(pieces) + 1):
            fault_end = await fault_at(request, resp, modes, i, error_event)
            if fault_end is not None:
                ended = fault_end
                return resp
            if i == 0:
                await resp.write(b"".join(head))
            if i == len(pieces):
                break
            if delay:
                await asyncio.sleep(delay)
            if heartbeat and i % heartbeat == 0:
                await resp.write(b": keep-alive\n\n")
            await resp.write(pieces[i])
            stats.chunks_sent[key] += 1
        await resp.write(b"".join(tail))
        await resp.write_eof()
        ended = COMPLETED
    except ConnectionResetError:
        pass
    finally:
        if ended == COMPLETED:
            stats.completed[key] += 1
        elif ended == CUT:
            stats.cut[key] += 1
    return resp


# ---------------------------------------------------------------- Responses API


async def responses(request: web.Request) -> web.StreamResponse:
    """``POST /v1/responses``: a Response object, or its typed SSE events."""
    setup = await _setup(request, _error)
    if not isinstance(setup, tuple):
        return setup
    body, modes, key = setup
    model = str(body.get("model", "mock-model"))
    pieces = _pieces(modes, body.get("max_output_tokens"))
    reasoning = int(modes.get("reasoning_tokens", 0))
    stored = request.app[STATS].stored_tokens
    # A chained call reads the earlier turns again, as OpenAI bills them
    # (an id the mock never answered adds nothing).
    earlier = stored.get(str(body.get("previous_response_id")), 0)
    prompt = modes.get("prompt_tokens") or (
        earlier + items_tokens(body.get("input")) + text_tokens(body.get("instructions"))
    )
    cached = min(int(modes.get("cached_tokens", 0)), prompt)
    out = len(pieces) + reasoning
    usage = {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": out,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + out,
    }
    rid, mid = f"resp_mock{next(_ids)}", f"msg_mock{next(_ids)}"
    if body.get("store", True):
        stored[rid] = prompt + out
    base = {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "model": model,
        "status": "in_progress",
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "output": [],
        "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"),
        "store": body.get("store", True),
        "tool_choice": "auto",
        "tools": [],
        "usage": None,
    }
    text = "".join(pieces)
    part = {"type": "output_text", "text": text, "annotations": []}
    item = {
        "id": mid,
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [part],
    }
    final = {**base, "status": "completed", "output": [item]}
    if not modes.get("no_usage"):
        final["usage"] = usage
    if not body.get("stream"):
        request.app[STATS].completed[key] += 1
        return web.json_response(final)
    seq = itertools.count()

    def ev(kind: str, **fields: Any) -> bytes:
        return _sse({"type": kind, "sequence_number": next(seq), **fields})

    head = [
        ev("response.created", response=base),
        ev("response.in_progress", response=base),
        ev(
            "response.output_item.added",
            output_index=0,
            item={**item, "status": "in_progress", "content": []},
        ),
        ev(
            "response.content_part.added",
            item_id=mid,
            output_index=0,
            content_index=0,
            part={**part, "text": ""},
        ),
    ]
    deltas = [
        ev(
            "response.output_text.delta",
            item_id=mid,
            output_index=0,
            content_index=0,
            delta=p,
            logprobs=[],
        )
        for p in pieces
    ]
    tail = [
        ev(
            "response.output_text.done",
            item_id=mid,
            output_index=0,
            content_index=0,
            text=text,
            logprobs=[],
        ),
        ev("response.content_part.done", item_id=mid, output_index=0, content_index=0, part=part),
        ev("response.output_item.done", output_index=0, item=item),
        ev("response.completed", response=final),
    ]
    error = _sse(
        {
            "type": "error",
            "code": "server_error",
            "message": "mock mid-stream failure",
            "param": None,
            "sequence_number": 99,
        }
    )
    return await _stream(request, modes, key, head, deltas, tail, error)


# ---------------------------------------------------------------- Anthropic Messages


async def messages(request: web.Request) -> web.StreamResponse:
    """``POST /v1/messages``: a Message, or its SSE events (message_start … message_stop)."""
    setup = await _setup(request, _anthropic_error)
    if not isinstance(setup, tuple):
        return setup
    body, modes, key = setup
    if not isinstance(body.get("messages"), list) or not isinstance(body.get("max_tokens"), int):
        return _anthropic_error(400, "messages and max_tokens are required", None)
    if not request.headers.get("anthropic-version"):
        return _anthropic_error(400, "anthropic-version header is required", None)
    model = str(body.get("model", "mock-claude"))
    pieces = _pieces(modes, body.get("max_tokens"))
    prompt = modes.get("prompt_tokens") or (
        items_tokens(body["messages"]) + text_tokens(body.get("system"))
    )
    read = min(int(modes.get("cached_tokens", 0)), prompt)
    write = min(int(modes.get("cache_write_tokens", 0)), prompt - read)
    start_usage = {
        "input_tokens": prompt - read - write,
        "cache_creation_input_tokens": write,
        "cache_read_input_tokens": read,
        "output_tokens": 1,
    }
    mid = f"msg_mock{next(_ids)}"
    text = "".join(pieces)
    message: dict[str, Any] = {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {**start_usage, "output_tokens": len(pieces)},
    }
    if modes.get("no_usage"):
        del message["usage"]
    if not body.get("stream"):
        request.app[STATS].completed[key] += 1
        return web.json_response(message)
    started = {**message, "content": [], "stop_reason": None, "usage": start_usage}
    if modes.get("no_usage"):
        del started["usage"]
    head = [
        _sse({"type": "message_start", "message": started}),
        _sse(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            }
        ),
        _sse({"type": "ping"}),
    ]
    deltas = [
        _sse(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}}
        )
        for p in pieces
    ]
    delta: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
    }
    if not modes.get("no_usage"):
        delta["usage"] = {"output_tokens": len(pieces)}
    tail = [
        _sse({"type": "content_block_stop", "index": 0}),
        _sse(delta),
        _sse({"type": "message_stop"}),
    ]
    error = _sse(
        {
            "type": "error",
            "error": {"type": "overloaded_error", "message": "mock mid-stream failure"},
        }
    )
    return await _stream(request, modes, key, head, deltas, tail, error)


async def count_tokens(request: web.Request) -> web.Response:
    """``POST /v1/messages/count_tokens``: the prompt's tokens, as ``messages`` counts them."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _anthropic_error(400, "invalid JSON", None)
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return _anthropic_error(400, "messages is required", None)
    prompt = items_tokens(body["messages"]) + text_tokens(body.get("system"))
    return web.json_response({"input_tokens": prompt})


# ---------------------------------------------------------------- embeddings


def _vector(text_index: int, fmt: Any) -> Any:
    values = [((text_index + 1) * (d + 1)) / 100 for d in range(EMBEDDING_DIMENSIONS)]
    if fmt == "base64":  # what the openai SDK asks for by default, then decodes
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
    return values


async def embeddings(request: web.Request) -> web.StreamResponse:
    """``POST /v1/embeddings``: one vector per input; usage.prompt_tokens."""
    setup = await _setup(request, _error)
    if not isinstance(setup, tuple):
        return setup
    body, modes, key = setup
    inp = body.get("input")
    single = isinstance(inp, str) or (
        isinstance(inp, list) and bool(inp) and all(isinstance(t, int) for t in inp)
    )
    items = [inp] if single else inp
    if not isinstance(items, list) or not items:
        return _error(400, "input is required")
    tokens = sum(len(i) if isinstance(i, list) else text_tokens(i) for i in items)
    tokens = modes.get("prompt_tokens") or tokens
    answer: dict[str, Any] = {
        "object": "list",
        "data": [
            {
                "object": "embedding",
                "index": i,
                "embedding": _vector(i, body.get("encoding_format")),
            }
            for i in range(len(items))
        ],
        "model": str(body.get("model", "mock-embed")),
    }
    if not modes.get("no_usage"):
        answer["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
    request.app[STATS].completed[key] += 1
    return web.json_response(answer)


def add_api_routes(app: web.Application) -> None:
    """Register the Responses, Messages and embeddings routes on the mock app."""
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    app.router.add_post("/v1/embeddings", embeddings)
