"""``POST /v1/chat/completions`` (and ``/api/chat``), ``GET /v1/models``.

The request path: authenticate → validate → throttle → reserve the worst-case
cost → call the upstream → settle the actual cost → answer. Every exit
settles or releases the hold exactly once, and the settlement commits before
the response's last byte (the ``[DONE]`` event) is sent.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from creditgate import ledger
from creditgate.auth import authenticate
from creditgate.errors import UpstreamError
from creditgate.http.envelope import json_response, read_json_object
from creditgate.http.ids import REQUEST_ID
from creditgate.http.metrics import CREDITS_CHARGED, LEDGER_LATENCY, TOKENS
from creditgate.http.state import STATE, State
from creditgate.logs import log
from creditgate.proxy.pricing import cost_micros, estimate_text_tokens
from creditgate.proxy.request import ChatRequest, parse_chat_request
from creditgate.proxy.sse import (
    DONE,
    DONE_EVENT,
    EventSplitter,
    event_data,
    generated_bytes,
    inspect_chunk,
    sse_event,
)
from creditgate.proxy.upstream import UpstreamCall
from creditgate.throttle import Admission

# Failures reading from the upstream once its 200 has arrived.
_UPSTREAM_READ_ERRORS = (aiohttp.ClientError, TimeoutError)


@dataclass(frozen=True, slots=True)
class _Charge:
    settlement: ledger.Settlement
    usage: dict[str, Any]  # the usage object the client sees, with the cost in it


@dataclass(slots=True)
class _Call:
    """One metered call in flight: its hold, and whether settling has begun."""

    st: State
    chat: ChatRequest
    admission: Admission
    hold: ledger.Hold
    request_id: str
    settling: bool = False
    tokens: int | None = None  # actual tokens, once known (for the throttle)

    async def settle(self, usage: dict[str, Any] | None, text_bytes: int) -> _Charge:
        """Charge the call: the upstream's usage when valid, else an estimate (marked)."""
        chat = self.chat
        in_tok = usage.get("prompt_tokens") if usage else None
        out_tok = usage.get("completion_tokens") if usage else None
        exact = _count(in_tok) and _count(out_tok)
        if not exact:
            in_tok = chat.prompt_tokens_estimate
            out_tok = estimate_text_tokens(
                text_bytes, self.st.settings.config.estimate_bytes_per_token
            )
        assert isinstance(in_tok, int) and isinstance(out_tok, int)
        cost = cost_micros(chat.model, in_tok, out_tok)
        self.settling = True
        self.tokens = in_tok + out_tok
        started = time.perf_counter()
        # Shielded: once begun, a settlement completes even if the request is cancelled.
        # The throttle is corrected (and the lease returned) at the same time, so
        # both are done before the last byte and neither waits for the other.
        settlement, _ = await asyncio.gather(
            asyncio.shield(
                ledger.settle_hold(
                    self.st.db, self.hold.id, ledger.Usage(in_tok, out_tok, cost, not exact)
                )
            ),
            self.st.throttle.finish(self.admission, self.tokens),
        )
        LEDGER_LATENCY.labels("settle").observe(time.perf_counter() - started)
        TOKENS.labels(chat.model.name, "input").inc(in_tok)
        TOKENS.labels(chat.model.name, "output").inc(out_tok)
        CREDITS_CHARGED.labels(chat.model.name).inc(settlement.debited)
        if settlement.uncollected:
            log.warning(
                "cost above what the account could cover",
                extra={
                    "request_id": self.request_id,
                    "hold_id": str(self.hold.id),
                    "uncollected_micros": settlement.uncollected,
                },
            )
        if not exact:
            usage = {
                "prompt_tokens": in_tok,
                "completion_tokens": out_tok,
                "total_tokens": in_tok + out_tok,
                "estimated": True,
            }
        assert usage is not None
        return _Charge(
            settlement,
            {
                **usage,
                "cost": ledger.micros_to_credits(settlement.debited),
                "cost_micros": settlement.debited,
            },
        )

    async def release(self) -> None:
        if not self.settling:
            await asyncio.shield(ledger.release_hold(self.st.db, self.hold.id))


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """OpenAI-compatible chat completion, streaming or not, charged to the caller."""
    st = request.app[STATE]
    principal = await authenticate(request)
    config = st.settings.config
    chat = parse_chat_request(
        await read_json_object(request), config.models, config.estimate_bytes_per_token
    )
    limits = await st.limits.get(principal.account_id, principal.key_id)
    admission = await st.throttle.admit(
        limits, chat.worst_case_tokens, required_tokens=chat.prompt_tokens_estimate
    )
    call: _Call | None = None
    try:
        started = time.perf_counter()
        hold = await ledger.reserve_hold(
            st.db,
            hold_id=uuid.uuid4(),
            account_id=principal.account_id,
            amount=cost_micros(
                chat.model, chat.prompt_tokens_estimate, chat.worst_case_output_tokens
            ),
            ttl_seconds=config.hold_ttl_seconds,
            request_id=request[REQUEST_ID],
            model=chat.model.name,
        )
        LEDGER_LATENCY.labels("reserve").observe(time.perf_counter() - started)
        call = _Call(st, chat, admission, hold, request[REQUEST_ID])
        try:
            upstream = await st.upstream.open(chat.model, chat.upstream_body)
            headers = {
                **admission.headers,
                "x-creditgate-attempts": str(upstream.attempts),
                "x-creditgate-deployment": upstream.deployment.upstream.name,
            }
            if chat.stream:
                return await _stream(request, call, upstream, headers)
            return await _complete(call, upstream, headers)
        finally:
            await call.release()  # no-op once settling began
    finally:
        # A no-op once settling returned it; otherwise the call was never served:
        # its tokens and its daily message are given back, the lease returned.
        await st.throttle.finish(admission, call.tokens if call else None)


async def _complete(call: _Call, upstream: UpstreamCall, headers: dict[str, str]) -> web.Response:
    try:
        raw = await upstream.response.read()
    except _UPSTREAM_READ_ERRORS:
        raise UpstreamError("The upstream connection failed while sending the answer.") from None
    finally:
        upstream.release()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
        raise UpstreamError("The upstream answered something that is not a chat completion.")
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else None
    text_bytes = sum(
        generated_bytes(c["message"])
        for c in body["choices"]
        if isinstance(c, dict) and isinstance(c.get("message"), dict)
    )
    body["usage"] = (await call.settle(usage, text_bytes)).usage
    return json_response(body, headers=headers)


async def _stream(
    request: web.Request, call: _Call, upstream: UpstreamCall, headers: dict[str, str]
) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={
            **headers,
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    splitter = EventSplitter()
    usage: dict[str, Any] | None = None
    usage_chunk: dict[str, Any] | None = None
    text_bytes = 0
    done = client_gone = upstream_failed = False
    try:
        await resp.prepare(request)
        async for chunk in upstream.response.content.iter_any():
            for event in splitter.feed(chunk):
                data = event_data(event)
                if data is None:  # comments and heartbeats pass through
                    await resp.write(event)
                    continue
                if data.strip() == DONE:
                    done = True
                    break
                info = inspect_chunk(data)
                if info is not None:
                    text_bytes += info.text_bytes
                    if info.usage is not None:
                        usage = info.usage
                    if info.usage_only:
                        # Held back: it is sent after settling, with the cost in it.
                        usage_chunk = orjson.loads(data)
                        continue
                await resp.write(event)
            if done:
                break
    except _UPSTREAM_READ_ERRORS:
        upstream_failed = True
    except ConnectionResetError:
        client_gone = True  # the client went away: stop the upstream, charge what it made
    except asyncio.CancelledError:
        # Shutdown reached its deadline with this stream still running: bill
        # what was sent, then let the cancellation through.
        upstream.close()
        await call.settle(usage, text_bytes)
        log.info("stream cut at shutdown", extra={"request_id": call.request_id})
        raise
    finally:
        if not done:
            upstream.close()
        else:
            upstream.release()

    complete = done or usage is not None
    charge = await call.settle(usage, text_bytes)
    if client_gone:
        log.info("client disconnected mid-stream", extra={"request_id": call.request_id})
        return resp
    try:
        if call.chat.include_usage:
            final = usage_chunk or {"object": "chat.completion.chunk", "choices": []}
            final["usage"] = charge.usage
            await resp.write(sse_event(final))
        if complete and not upstream_failed:
            await resp.write(DONE_EVENT)
        else:
            await resp.write(
                sse_event(
                    {
                        "error": {
                            "message": "The upstream stream ended early.",
                            "type": "api_error",
                            "code": "UPSTREAM_ERROR",
                        }
                    }
                )
            )
        await resp.write_eof()
    except ConnectionResetError:
        pass
    return resp


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models``: the models this deployment serves, with their prices."""
    st = request.app[STATE]
    await authenticate(request)
    data = [
        {
            "id": m.name,
            "object": "model",
            "created": 0,
            "owned_by": "creditgate",
            "pricing": {
                "input": orjson.Fragment(m.input_price_text.encode()),
                "output": orjson.Fragment(m.output_price_text.encode()),
                "unit": "credits per 1M tokens",
            },
            "max_output_tokens": m.max_output_tokens,
        }
        for m in st.settings.config.models.values()
    ]
    return json_response({"object": "list", "data": data})
