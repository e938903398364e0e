"""A mock OpenAI-compatible upstream — a development and test tool, not a provider.

It answers ``POST /v1/chat/completions`` (JSON or SSE, ``usage`` as OpenAI
sends it, the final usage chunk when ``stream_options.include_usage`` is
set) and ``GET /v1/models``, with deterministic text and token counts:
``prompt_tokens`` = Σ ceil(content bytes / 4) + 3 per message, one completion
token per chunk.

Fault modes, per request through a ``"mock"`` object in the request body
(clients send it with ``extra_body``; creditgate passes unknown fields on):

  status             answer this HTTP status with an OpenAI error body
  fail_times, key    fail (status, default 500) this many times for ``key``, then succeed
  retry_after        with a failure: the Retry-After header (seconds)
  first_byte_ms      wait before the response headers
  chunk_delay_ms     wait between chunks
  chunks             completion tokens (default: the server's --chunks)
  stall_after        stop sending (but keep the connection) after this many chunks
  drop_after         close the connection after this many chunks
  malformed          send a chunk that is not JSON
  no_usage           never report usage
  ignore_max_tokens  generate ``chunks`` tokens whatever max_tokens says
  content            the text of every token (default cycles a word list)
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from typing import Any

import orjson
from aiohttp import web

_WORDS = ("Hello", " from", " the", " mock", " upstream", ".", " It", " streams", " tokens", ",")
_ids = itertools.count(1)
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


async def chat_completions(request: web.Request) -> web.StreamResponse:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "invalid JSON")
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return _error(400, "messages is required")
    defaults: dict[str, Any] = request.app[DEFAULTS]
    mock: dict[str, Any] = {**defaults, **(body.get("mock") or {})}

    if "fail_times" in mock:
        key = str(mock.get("key", "default"))
        failures = request.app[FAILURES]
        if failures[key] < int(mock["fail_times"]):
            failures[key] += 1
            headers = {"Retry-After": str(mock["retry_after"])} if "retry_after" in mock else None
            return _error(int(mock.get("status", 500)), "mock failure", headers)
    elif "status" in mock:
        return _error(int(mock["status"]), f"mock status {mock['status']}")
    if mock.get("first_byte_ms"):
        await asyncio.sleep(mock["first_byte_ms"] / 1000)

    model = str(body.get("model", "mock-model"))
    n_tokens = int(mock.get("chunks", 5))
    cap = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(cap, int) and not mock.get("ignore_max_tokens"):
        n_tokens = min(n_tokens, cap)
    content = mock.get("content")
    pieces = [content if content is not None else _WORDS[i % len(_WORDS)] for i in range(n_tokens)]
    finish = "length" if isinstance(cap, int) and n_tokens == cap else "stop"
    usage = {
        "prompt_tokens": prompt_tokens(body["messages"]),
        "completion_tokens": n_tokens,
        "total_tokens": prompt_tokens(body["messages"]) + n_tokens,
    }
    ident = f"chatcmpl-mock-{next(_ids)}"
    created = int(time.time())

    if not body.get("stream"):
        answer: dict[str, Any] = {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(pieces), "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "system_fingerprint": None,
        }
        if not mock.get("no_usage"):
            answer["usage"] = usage
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    delay = mock.get("chunk_delay_ms", 0) / 1000

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        obj: dict[str, Any] = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if include_usage:
            obj["usage"] = None
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    await resp.write(chunk({"role": "assistant", "content": "", "refusal": None}))
    for i, piece in enumerate(pieces):
        if mock.get("drop_after") is not None and i >= int(mock["drop_after"]):
            assert request.transport is not None
            request.transport.close()
            return resp
        if mock.get("stall_after") is not None and i >= int(mock["stall_after"]):
            await asyncio.sleep(3600)
        if mock.get("malformed") and i == 1:
            await resp.write(b"data: {not json\n\n")
        if delay:
            await asyncio.sleep(delay)
        await resp.write(chunk({"content": piece}))
    await resp.write(chunk({}, finish))
    if include_usage and not mock.get("no_usage"):
        final = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": [],
            "usage": usage,
        }
        await resp.write(b"data: " + orjson.dumps(final) + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def list_models(request: web.Request) -> web.Response:
    return web.json_response(
        {"object": "list", "data": [{"id": "mock-model", "object": "model", "owned_by": "mock"}]}
    )


def create_mock_app(
    *, chunks: int = 5, latency_ms: int = 0, chunk_delay_ms: int = 0
) -> web.Application:
    """The mock upstream app; the arguments are defaults a request's ``mock`` overrides."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[FAILURES] = Counter()
    defaults: dict[str, Any] = {"chunks": chunks}
    if latency_ms:
        defaults["first_byte_ms"] = latency_ms
    if chunk_delay_ms:
        defaults["chunk_delay_ms"] = chunk_delay_ms
    app[DEFAULTS] = defaults
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    return app
