"""The chat route's fault modes on the Responses, Messages and embeddings routes:
each billed as chat bills it (tests/proxy/test_faults.py) — nothing when no
output reached anyone, the text relayed when a stream is cut, the prompt when
the client leaves before the answer — with errors in each API's own shape."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient

from creditgate.proxy.mock_upstream import MockStats
from tests.proxy.conftest import Debit, Outcome, cost, outcome, settled_outcome

GRANT = 10_000_000
PROMPT = "Say hello"
PROMPT_ESTIMATE = len(PROMPT.encode()) + 8  # the hold's bound: bytes + 8 per message
PROMPT_TOKENS = math.ceil(len(PROMPT) / 4) + 3  # the mock's count


def text_estimate(text: str) -> int:
    return math.ceil(len(text.encode()) / 3)


def responses_body(model: str, stream: bool, mock: dict[str, Any]) -> dict[str, Any]:
    return {"model": model, "input": PROMPT, "stream": stream, "mock": mock}


def messages_body(model: str, stream: bool, mock: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": 100,
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": stream,
        "mock": mock,
    }


class Api:
    def __init__(
        self,
        path: str,
        model: str,
        fast: str,
        body: Callable[[str, bool, dict[str, Any]], dict[str, Any]],
        delta: bytes,
    ) -> None:
        self.path, self.model, self.fast, self.body, self.delta = path, model, fast, body, delta

    def text(self, events: list[dict[str, Any]]) -> str:
        out = ""
        for e in events:
            if e.get("type") == "response.output_text.delta":
                out += e["delta"]
            elif e.get("type") == "content_block_delta":
                out += e["delta"].get("text", "")
        return out

    def error_code(self, body: dict[str, Any]) -> str:
        """creditgate's code in an error answer or event, whatever its shape."""
        if self.path == "/v1/messages":
            assert body["type"] == "error"
            return str(body["error"]["code"])
        if "type" in body:  # a Responses error event
            assert body["type"] == "error"
            return str(body["code"])
        return str(body["error"]["code"])


APIS = {
    "responses": Api(
        "/v1/responses", "reasoner", "fast", responses_body, b'"response.output_text.delta"'
    ),
    "messages": Api("/v1/messages", "claude", "claude-fast", messages_body, b'"text_delta"'),
}
STREAMING = pytest.mark.parametrize("api", list(APIS.values()), ids=list(APIS))


async def events_of(resp: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    """The data of each SSE event of a response."""
    out = []
    for block in (await resp.read()).split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data: "):
                out.append(orjson.loads(line[6:]))
    return out


async def wait_for(check: Callable[[], bool], what: str) -> None:
    for _ in range(200):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(what)


async def released(db, account_id) -> None:
    assert await outcome(db, account_id) == Outcome(GRANT, 0, ["released"], [])


@STREAMING
@pytest.mark.parametrize("stream", [False, True])
async def test_persistent_upstream_error_is_502_in_the_apis_shape_and_releases(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str, api: Api, stream: bool
) -> None:
    c = await customer_factory(10)
    resp = await gw.post(
        api.path, json=api.body(api.model, stream, {"key": key, "status": 500}), headers=c.auth
    )
    assert resp.status == 502
    assert api.error_code(await resp.json()) == "UPSTREAM_ERROR"
    assert mock_stats.requests[key] == 3
    await released(db, c.account.id)


@STREAMING
async def test_a_failure_then_success_is_retried_and_charged_once(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str, api: Api
) -> None:
    c = await customer_factory(10)
    resp = await gw.post(
        api.path, json=api.body(api.model, True, {"key": key, "fail_times": 1}), headers=c.auth
    )
    assert resp.status == 200
    assert api.text(await events_of(resp)) == "Hello from the mock upstream"
    assert mock_stats.requests[key] == 2
    charged = cost(api.model, PROMPT_TOKENS, 5)
    assert await outcome(db, c.account.id) == Outcome(
        GRANT - charged, 0, ["settled"], [Debit(charged, PROMPT_TOKENS, 5, False, 0)]
    )


@STREAMING
@pytest.mark.parametrize("stream", [False, True])
async def test_slow_first_byte_is_504_and_releases(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str, api: Api, stream: bool
) -> None:
    c = await customer_factory(10)
    resp = await gw.post(
        api.path,
        json=api.body(api.fast, stream, {"key": key, "first_byte_ms": 1500}),
        headers=c.auth,
    )
    assert resp.status == 504
    assert api.error_code(await resp.json()) == "UPSTREAM_TIMEOUT"
    await released(db, c.account.id)
    await wait_for(lambda: mock_stats.cut[key] == 1, "the upstream call is dropped")


@STREAMING
async def test_connection_dropped_mid_stream_charges_the_text_so_far(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str, api: Api
) -> None:
    c = await customer_factory(10)
    resp = await gw.post(
        api.path, json=api.body(api.model, True, {"key": key, "drop_after": 3}), headers=c.auth
    )
    assert resp.status == 200
    events = await events_of(resp)
    assert api.text(events) == "Hello from the"
    assert api.error_code(events[-1]) == "UPSTREAM_ERROR"
    out = text_estimate("Hello from the")
    charged = cost(api.model, PROMPT_ESTIMATE, out)
    assert mock_stats.requests[key] == 1  # output had reached the client: no retry
    assert await outcome(db, c.account.id) == Outcome(
        GRANT - charged, 0, ["settled"], [Debit(charged, PROMPT_ESTIMATE, out, True, 0)]
    )


@STREAMING
async def test_upstream_error_event_mid_stream_is_relayed_and_the_text_charged(
    gw: TestClient, db, customer_factory, key: str, api: Api
) -> None:
    c = await customer_factory(10)
    resp = await gw.post(
        api.path, json=api.body(api.model, True, {"key": key, "error_after": 2}), headers=c.auth
    )
    events = await events_of(resp)
    assert api.text(events) == "Hello from"
    last = events[-1]
    assert last["type"] == "error"
    message = last["message"] if api.path == "/v1/responses" else last["error"]["message"]
    assert message == "mock mid-stream failure"  # the upstream's own event
    out = text_estimate("Hello from")
    charged = cost(api.model, PROMPT_ESTIMATE, out)
    assert (await outcome(db, c.account.id)).debits == [
        Debit(charged, PROMPT_ESTIMATE, out, True, 0)
    ]


@STREAMING
async def test_client_leaving_mid_stream_pays_for_the_text_so_far(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str, api: Api
) -> None:
    c = await customer_factory(10)
    resp = await gw.post(
        api.path, json=api.body(api.model, True, {"key": key, "stall_after": 2}), headers=c.auth
    )
    seen = b""
    while seen.count(api.delta) < 2:
        seen += await resp.content.readany()
    resp.close()  # the client goes away
    await wait_for(lambda: mock_stats.cut[key] == 1, "the upstream call is cancelled")
    out = text_estimate("Hello from")
    charged = cost(api.model, PROMPT_ESTIMATE, out)
    assert await settled_outcome(db, c.account.id) == Outcome(
        GRANT - charged, 0, ["settled"], [Debit(charged, PROMPT_ESTIMATE, out, True, 0)]
    )


@STREAMING
@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_without_usage_is_charged_by_estimate_marked(
    gw: TestClient, db, customer_factory, key: str, api: Api, stream: bool
) -> None:
    c = await customer_factory(10)
    resp = await gw.post(
        api.path, json=api.body(api.model, stream, {"key": key, "no_usage": True}), headers=c.auth
    )
    assert resp.status == 200
    await resp.read()  # a stream's charge is committed before its last byte
    out = text_estimate("Hello from the mock upstream")
    charged = cost(api.model, PROMPT_ESTIMATE, out)
    assert (await outcome(db, c.account.id)).debits == [
        Debit(charged, PROMPT_ESTIMATE, out, True, 0)
    ]


# ---------------------------------------------------------------- embeddings

EMBED = {"model": "embed", "input": ["hello world", "héhé ✓"]}
EMBED_ESTIMATE = len(b"hello world") + len("héhé ✓".encode())


async def test_embeddings_upstream_error_is_502_and_releases(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str
) -> None:
    c = await customer_factory(10)
    resp = await gw.post(
        "/v1/embeddings", json={**EMBED, "mock": {"key": key, "status": 503}}, headers=c.auth
    )
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "UPSTREAM_ERROR"
    assert mock_stats.requests[key] == 3
    await released(db, c.account.id)


async def test_embeddings_timeout_is_504_and_releases(
    gw: TestClient, db, customer_factory, key: str
) -> None:
    c = await customer_factory(10)
    resp = await gw.post(
        "/v1/embeddings",
        json={**EMBED, "model": "embed-fast", "mock": {"key": key, "first_byte_ms": 1500}},
        headers=c.auth,
    )
    assert resp.status == 504
    await released(db, c.account.id)


async def test_embeddings_client_leaving_before_the_answer_pays_the_input(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str
) -> None:
    c = await customer_factory(10)
    assert (await gw.get("/api/user/balance", headers=c.auth)).status == 200
    with pytest.raises(TimeoutError):
        await gw.post(
            "/v1/embeddings",
            json={**EMBED, "mock": {"key": key, "first_byte_ms": 1500}},
            headers=c.auth,
            timeout=aiohttp.ClientTimeout(total=0.6),
        )
    charged = cost("embed", EMBED_ESTIMATE, 0)
    assert await settled_outcome(db, c.account.id) == Outcome(
        GRANT - charged, 0, ["settled"], [Debit(charged, EMBED_ESTIMATE, 0, True, 0)]
    )
    await wait_for(lambda: mock_stats.cut[key] == 1, "the upstream call is cancelled")


@STREAMING
@pytest.mark.parametrize(
    ("mode", "code"),
    [({"malformed_after": 2}, "UPSTREAM_ERROR"), ({"stall_after": 2}, "UPSTREAM_TIMEOUT")],
    ids=["malformed", "idle-timeout"],
)
async def test_a_stream_cut_by_garbage_or_silence_ends_with_our_error_and_charges_the_text(
    gw: TestClient,
    db,
    customer_factory,
    key: str,
    api: Api,
    mode: dict[str, int],
    code: str,
) -> None:
    c = await customer_factory(10)
    resp = await gw.post(
        api.path, json=api.body(api.fast, True, {"key": key, **mode}), headers=c.auth
    )
    assert resp.status == 200
    events = await events_of(resp)
    assert api.text(events) == "Hello from"
    assert api.error_code(events[-1]) == code
    out = text_estimate("Hello from")
    charged = cost(api.fast, PROMPT_ESTIMATE, out)
    assert (await outcome(db, c.account.id)).debits == [
        Debit(charged, PROMPT_ESTIMATE, out, True, 0)
    ]


@STREAMING
async def test_heartbeats_pass_through_typed_streams(
    gw: TestClient, db, customer_factory, key: str, api: Api
) -> None:
    c = await customer_factory(10)
    resp = await gw.post(
        api.path, json=api.body(api.model, True, {"key": key, "heartbeat_every": 2}), headers=c.auth
    )
    raw = await resp.read()
    assert raw.count(b": keep-alive\n\n") == 3  # before chunks 0, 2 and 4
    charged = cost(api.model, PROMPT_TOKENS, 5)
    assert (await outcome(db, c.account.id)).debits == [Debit(charged, PROMPT_TOKENS, 5, False, 0)]
