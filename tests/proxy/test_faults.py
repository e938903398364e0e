"""Every fault mode of the mock upstream, through creditgate: what the client
gets, how many upstream attempts were made (counted by the mock), and the
exact ledger outcome."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient

from creditgate.proxy.mock_upstream import MockStats, prompt_tokens
from tests.proxy.conftest import (
    MESSAGES,
    Debit,
    Outcome,
    cost,
    outcome,
    prompt_estimate,
    settled_outcome,
    text_estimate,
)

GRANT = 10_000_000  # µc: every customer here starts with 10 credits

OUT = 5  # the mock's default completion: five tokens …
TEXT = "Hello from the mock upstream"  # … of this text


def body(model: str, key: str, stream: bool = False, **mock: Any) -> dict[str, Any]:
    b: dict[str, Any] = {"model": model, "messages": MESSAGES, "mock": {"key": key, **mock}}
    if stream:
        b["stream"] = True
        b["stream_options"] = {"include_usage": True}
    return b


async def read_stream(resp: aiohttp.ClientResponse) -> tuple[list[dict[str, Any]], bytes]:
    """The data events of an SSE response (parsed; [DONE] as {"done": True}) and its raw bytes."""
    raw = await resp.read()
    events = []
    for block in re.split(rb"\n\n", raw):
        if block.startswith(b"data: "):
            data = block[6:]
            events.append({"done": True} if data == b"[DONE]" else orjson.loads(data))
    return events, raw


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(
        (c.get("delta") or {}).get("content") or "" for e in events for c in e.get("choices") or []
    )


async def released_nothing_charged(db, account_id) -> None:
    assert await outcome(db, account_id) == Outcome(GRANT, 0, ["released"], [])


async def wait_for(predicate, what: str) -> None:
    for _ in range(200):  # at most ~10 s
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


# ---------------------------------------------------------------- retries and fallback


async def test_fail_times_then_success_is_retried_and_charged_once(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str
) -> None:
    c = await customer_factory(10)
    resp = await gw.post(
        "/v1/chat/completions", json=body("mock-model", key, fail_times=2), headers=c.auth
    )
    assert resp.status == 200
    answer = await resp.json()
    assert answer["choices"][0]["message"]["content"] == TEXT
    assert resp.headers["x-creditgate-attempts"] == "3"
    assert mock_stats.requests[key] == 3
    charged = cost("mock-model", prompt_tokens(MESSAGES), OUT)
    assert answer["usage"]["cost_micros"] == charged
    assert await outcome(db, c.account.id) == Outcome(
        GRANT - charged, 0, ["settled"], [Debit(charged, prompt_tokens(MESSAGES), OUT, False, 0)]
    )


async def test_429_with_retry_after_is_retried_for_a_stream(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str
) -> None:
    c = await customer_factory(10)
    resp = await gw.post(
        "/v1/chat/completions",
        json=body("mock-model", key, stream=True, fail_times=2, status=429, retry_after=0.2),
        headers=c.auth,
    )
    assert resp.status == 200
    events, _ = await read_stream(resp)
    assert text_of(events) == TEXT and events[-1] == {"done": True}
    assert resp.headers["x-creditgate-attempts"] == "3"
    assert mock_stats.requests[key] == 3
    charged = cost("mock-model", prompt_tokens(MESSAGES), OUT)
    assert events[-2]["usage"]["cost_micros"] == charged
    assert await outcome(db, c.account.id) == Outcome(
        GRANT - charged, 0, ["settled"], [Debit(charged, prompt_tokens(MESSAGES), OUT, False, 0)]
    )


@pytest.mark.parametrize("stream", [False, True])
async def test_persistent_5xx_is_502_after_three_attempts_and_releases(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str, stream: bool
) -> None:
    c = await customer_factory(10)
    resp = await gw.post(
        "/v1/chat/completions", json=body("mock-model", key, stream, status=503), headers=c.auth
    )
    assert resp.status == 502
    err = (await resp.json())["error"]
    assert err["code"] == "UPSTREAM_ERROR" and "503" in err["message"]
    assert resp.headers["x-creditgate-attempts"] == "3"
    assert mock_stats.requests[key] == 3
    await released_nothing_charged(db, c.account.id)


async def test_retry_after_beyond_the_limit_is_not_waited_for(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str
) -> None:
    c = await customer_factory(10)
    resp = await gw.post(
        "/v1/chat/completions",
        json=body("mock-model", key, status=429, retry_after=120),
        headers=c.auth,
    )
    assert resp.status == 502
    assert mock_stats.requests[key] == 1  # no 2-minute wait: the next deployment (none) instead
    await released_nothing_charged(db, c.account.id)


async def test_failing_primary_falls_back_to_the_next_deployment(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str
) -> None:
    c = await customer_factory(10)
    resp = await gw.post(
        "/v1/chat/completions",
        json=body("fallback", key, status=503, for_model="fb-primary"),
        headers=c.auth,
    )
    assert resp.status == 200
    assert resp.headers["x-creditgate-deployment"] == "backup"
    assert resp.headers["x-creditgate-attempts"] == "4"  # 3 on the primary, 1 on the backup
    assert mock_stats.requests[key] == 4
    assert mock_stats.last_body[key]["model"] == "fb-backup"
    charged = cost("fallback", prompt_tokens(MESSAGES), OUT)
    assert await outcome(db, c.account.id) == Outcome(
        GRANT - charged, 0, ["settled"], [Debit(charged, prompt_tokens(MESSAGES), OUT, False, 0)]
    )


async def test_unreachable_deployment_is_retried_then_the_next_one_answers(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str
) -> None:
    c = await customer_factory(10)
    resp = await gw.post("/v1/chat/completions", json=body("rescued", key), headers=c.auth)
    assert resp.status == 200
    assert resp.headers["x-creditgate-deployment"] == "main"
    assert resp.headers["x-creditgate-attempts"] == "4"  # 3 refused connections, then the mock
    assert mock_stats.requests[key] == 1
    charged = cost("rescued", prompt_tokens(MESSAGES), OUT)
    assert await outcome(db, c.account.id) == Outcome(
        GRANT - charged, 0, ["settled"], [Debit(charged, prompt_tokens(MESSAGES), OUT, False, 0)]
    )


@pytest.mark.parametrize("status", [401, 403])
async def test_upstream_refusing_our_key_is_502_and_skips_to_the_next_deployment(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str, status: int
) -> None:
    c = await customer_factory(10)
    resp = await gw.post(
        "/v1/chat/completions", json=body("mock-model", key, status=status), headers=c.auth
    )
    assert resp.status == 502
    err = (await resp.json())["error"]
    assert err["code"] == "UPSTREAM_ERROR" and "credentials" in err["message"]
    assert mock_stats.requests[key] == 1  # retrying our bad key would not help
    await released_nothing_charged(db, c.account.id)

    key2 = key + "b"
    resp = await gw.post(
        "/v1/chat/completions",
        json=body("fallback", key2, status=status, for_model="fb-primary"),
        headers=c.auth,
    )
    assert resp.status == 200
    assert resp.headers["x-creditgate-deployment"] == "backup"
    assert mock_stats.requests[key2] == 2


@pytest.mark.parametrize("status", [400, 404, 409, 413, 422])
async def test_upstream_4xx_of_the_request_passes_through_unretried(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str, status: int
) -> None:
    c = await customer_factory(10)
    resp = await gw.post(
        "/v1/chat/completions", json=body("fallback", key, status=status), headers=c.auth
    )
    assert resp.status == status
    err = (await resp.json())["error"]
    assert err == {
        "code": "UPSTREAM_BAD_REQUEST",
        "message": f"mock status {status}",  # the upstream's own message
        "type": "invalid_request_error",
    }
    assert mock_stats.requests[key] == 1  # not retried, no fallback: the request is at fault
    await released_nothing_charged(db, c.account.id)


# ---------------------------------------------------------------- timeouts


async def test_slow_first_byte_is_504_and_the_upstream_call_is_dropped(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str
) -> None:
    c = await customer_factory(10)
    resp = await gw.post(
        "/v1/chat/completions", json=body("fast", key, first_byte_ms=1500), headers=c.auth
    )
    assert resp.status == 504
    assert (await resp.json())["error"]["code"] == "UPSTREAM_TIMEOUT"
    assert mock_stats.requests[key] == 1  # a timeout is not retried on the same deployment
    await released_nothing_charged(db, c.account.id)
    await wait_for(lambda: mock_stats.cut[key] == 1, "the mock sees its caller gone")


@pytest.mark.parametrize("mode", [{"first_chunk_ms": 1500}, {"stall_after": 0}])
async def test_stream_without_a_first_event_in_time_is_504(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str, mode: dict[str, int]
) -> None:
    # The upstream answered 200 and its headers, but no event: nothing reached
    # the client yet, so it is still a clean 504.
    c = await customer_factory(10)
    resp = await gw.post(
        "/v1/chat/completions", json=body("fast", key, stream=True, **mode), headers=c.auth
    )
    assert resp.status == 504
    assert (await resp.json())["error"]["code"] == "UPSTREAM_TIMEOUT"
    assert mock_stats.requests[key] == 1
    await released_nothing_charged(db, c.account.id)


async def test_stall_mid_stream_ends_with_an_error_event_and_charges_what_was_sent(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str
) -> None:
    c = await customer_factory(10)
    resp = await gw.post(
        "/v1/chat/completions",
        json=body("fast", key, stream=True, stall_after=2),
        headers=c.auth,
    )
    assert resp.status == 200
    events, _ = await read_stream(resp)
    assert text_of(events) == "Hello from"
    out_tokens = text_estimate("Hello from")
    charged = cost("fast", prompt_estimate(MESSAGES), out_tokens)
    usage, error = events[-2]["usage"], events[-1]["error"]
    assert usage["estimated"] is True and usage["cost_micros"] == charged
    assert error["code"] == "UPSTREAM_TIMEOUT"
    assert {"done": True} not in events
    assert mock_stats.requests[key] == 1
    await wait_for(lambda: mock_stats.cut[key] == 1, "the stalled upstream is closed")
    assert await outcome(db, c.account.id) == Outcome(
        GRANT - charged,
        0,
        ["settled"],
        [Debit(charged, prompt_estimate(MESSAGES), out_tokens, True, 0)],
    )


async def test_total_timeout_mid_stream_charges_exactly_the_text_relayed(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str
) -> None:
    c = await customer_factory(10)
    resp = await gw.post(
        "/v1/chat/completions",
        json=body("brief", key, stream=True, chunks=50, chunk_delay_ms=200),
        headers=c.auth,
    )
    assert resp.status == 200
    events, _ = await read_stream(resp)
    assert events[-1]["error"]["code"] == "UPSTREAM_TIMEOUT"
    text = text_of(events)
    assert 0 < len(text) < len(TEXT * 10)  # cut well before the 50 tokens
    out_tokens = text_estimate(text)  # exactly what reached the client, no more, no less
    charged = cost("brief", prompt_estimate(MESSAGES), out_tokens)
    assert await outcome(db, c.account.id) == Outcome(
        GRANT - charged,
        0,
        ["settled"],
        [Debit(charged, prompt_estimate(MESSAGES), out_tokens, True, 0)],
    )


# ---------------------------------------------------------------- broken streams


async def test_connection_dropped_before_any_event_is_retried(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str
) -> None:
    c = await customer_factory(10)
    resp = await gw.post(
        "/v1/chat/completions",
        json=body("mock-model", key, stream=True, drop_after=0),
        headers=c.auth,
    )
    assert resp.status == 502
    assert mock_stats.requests[key] == 3
    await released_nothing_charged(db, c.account.id)


async def test_connection_dropped_mid_stream_charges_the_text_so_far(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str
) -> None:
    c = await customer_factory(10)
    resp = await gw.post(
        "/v1/chat/completions",
        json=body("pricey", key, stream=True, drop_after=3),
        headers=c.auth,
    )
    assert resp.status == 200
    events, _ = await read_stream(resp)
    assert text_of(events) == "Hello from the"
    assert events[-1]["error"]["code"] == "UPSTREAM_ERROR"
    out_tokens = text_estimate("Hello from the")
    charged = cost("pricey", prompt_estimate(MESSAGES), out_tokens)
    assert events[-2]["usage"]["cost_micros"] == charged
    assert mock_stats.requests[key] == 1  # output had reached the client: no retry
    assert await outcome(db, c.account.id) == Outcome(
        GRANT - charged,
        0,
        ["settled"],
        [Debit(charged, prompt_estimate(MESSAGES), out_tokens, True, 0)],
    )


async def test_stream_failing_before_any_output_charges_nothing(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str
) -> None:
    # Events came (so the stream had begun) but no generated text.
    c = await customer_factory(10)
    resp = await gw.post(
        "/v1/chat/completions",
        json=body("pricey", key, stream=True, drop_after=2, content=""),
        headers=c.auth,
    )
    assert resp.status == 200
    events, _ = await read_stream(resp)
    assert events[-1]["error"]["code"] == "UPSTREAM_ERROR"
    assert not any("usage" in e and e["usage"] for e in events)
    await released_nothing_charged(db, c.account.id)


async def test_malformed_first_event_is_502_without_retry(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str
) -> None:
    c = await customer_factory(10)
    resp = await gw.post(
        "/v1/chat/completions",
        json=body("mock-model", key, stream=True, malformed_after=0),
        headers=c.auth,
    )
    assert resp.status == 502
    assert "not JSON" in (await resp.json())["error"]["message"]
    assert mock_stats.requests[key] == 1  # garbage would come again: next deployment (none)
    await released_nothing_charged(db, c.account.id)


async def test_malformed_event_mid_stream_is_not_forwarded_and_ends_the_stream(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str
) -> None:
    c = await customer_factory(10)
    resp = await gw.post(
        "/v1/chat/completions",
        json=body("pricey", key, stream=True, malformed_after=2),
        headers=c.auth,
    )
    assert resp.status == 200
    events, raw = await read_stream(resp)
    assert b"not json" not in raw  # the garbage never reaches the client's parser
    assert text_of(events) == "Hello from"
    assert events[-1]["error"]["code"] == "UPSTREAM_ERROR"
    out_tokens = text_estimate("Hello from")
    charged = cost("pricey", prompt_estimate(MESSAGES), out_tokens)
    assert mock_stats.requests[key] == 1
    assert await outcome(db, c.account.id) == Outcome(
        GRANT - charged,
        0,
        ["settled"],
        [Debit(charged, prompt_estimate(MESSAGES), out_tokens, True, 0)],
    )


async def test_error_event_as_first_event_is_retried(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str
) -> None:
    c = await customer_factory(10)
    resp = await gw.post(
        "/v1/chat/completions",
        json=body("mock-model", key, stream=True, error_after=0),
        headers=c.auth,
    )
    assert resp.status == 502
    assert "mock mid-stream failure" in (await resp.json())["error"]["message"]
    assert mock_stats.requests[key] == 3
    await released_nothing_charged(db, c.account.id)


async def test_upstream_error_event_mid_stream_is_passed_on_after_the_usage(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str
) -> None:
    c = await customer_factory(10)
    resp = await gw.post(
        "/v1/chat/completions",
        json=body("pricey", key, stream=True, error_after=2),
        headers=c.auth,
    )
    events, _ = await read_stream(resp)
    out_tokens = text_estimate("Hello from")
    charged = cost("pricey", prompt_estimate(MESSAGES), out_tokens)
    assert events[-2]["usage"]["cost_micros"] == charged
    assert events[-1] == {
        "error": {"message": "mock mid-stream failure", "type": "server_error", "code": None}
    }
    assert await outcome(db, c.account.id) == Outcome(
        GRANT - charged,
        0,
        ["settled"],
        [Debit(charged, prompt_estimate(MESSAGES), out_tokens, True, 0)],
    )


async def test_heartbeats_are_passed_through(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str
) -> None:
    c = await customer_factory(10)
    resp = await gw.post(
        "/v1/chat/completions",
        json=body("mock-model", key, stream=True, heartbeat_every=2),
        headers=c.auth,
    )
    events, raw = await read_stream(resp)
    assert raw.count(b": keep-alive\n\n") == 3  # before token chunks 0, 2 and 4
    assert text_of(events) == TEXT and events[-1] == {"done": True}
    charged = cost("mock-model", prompt_tokens(MESSAGES), OUT)
    assert await outcome(db, c.account.id) == Outcome(
        GRANT - charged, 0, ["settled"], [Debit(charged, prompt_tokens(MESSAGES), OUT, False, 0)]
    )


# ---------------------------------------------------------------- usage


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_without_usage_is_charged_by_estimate_marked(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str, stream: bool
) -> None:
    c = await customer_factory(10)
    resp = await gw.post(
        "/v1/chat/completions",
        json=body("pricey", key, stream, no_usage=True),
        headers=c.auth,
    )
    assert resp.status == 200
    if stream:
        events, _ = await read_stream(resp)
        assert events[-1] == {"done": True}  # a complete stream, just without usage
        assert text_of(events) == TEXT
        usage = events[-2]["usage"]
        assert events[-2]["choices"] == [] and events[-2]["id"] == events[0]["id"]
    else:
        usage = (await resp.json())["usage"]
    in_tokens, out_tokens = prompt_estimate(MESSAGES), text_estimate(TEXT)
    charged = cost("pricey", in_tokens, out_tokens)
    assert usage == {
        "prompt_tokens": in_tokens,
        "completion_tokens": out_tokens,
        "total_tokens": in_tokens + out_tokens,
        "estimated": True,
        "cost": pytest.approx(charged / 1_000_000),
        "cost_micros": charged,
    }
    assert await outcome(db, c.account.id) == Outcome(
        GRANT - charged, 0, ["settled"], [Debit(charged, in_tokens, out_tokens, True, 0)]
    )


@pytest.mark.parametrize("overdraft", [0, 20_000])
async def test_upstream_ignoring_max_tokens_is_charged_up_to_the_overdraft(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str, overdraft: int
) -> None:
    hold = cost("pricey", prompt_estimate(MESSAGES), 3)
    c = await customer_factory(f"{hold / 1_000_000:.6f}")  # exactly enough for the hold
    if overdraft:
        await db.execute(
            "UPDATE account_balances SET overdraft_limit = $2 WHERE account_id = $1",
            c.account.id,
            overdraft,
        )
    request = body("pricey", key, chunks=40, ignore_max_tokens=True)
    request["max_tokens"] = 3
    resp = await gw.post("/v1/chat/completions", json=request, headers=c.auth)
    assert resp.status == 200
    answer = await resp.json()
    assert answer["usage"]["completion_tokens"] == 40  # the upstream ignored the cap
    actual = cost("pricey", prompt_tokens(MESSAGES), 40)
    debited = min(actual, hold + overdraft)
    assert answer["usage"]["cost_micros"] == debited
    assert await outcome(db, c.account.id) == Outcome(
        hold - debited,
        0,
        ["settled"],
        [Debit(debited, prompt_tokens(MESSAGES), 40, False, actual - debited)],
    )
    assert actual - debited > 0  # the excess was recorded, not silently dropped


# ---------------------------------------------------------------- the client leaves


@pytest.mark.parametrize("handler_cancellation", [False, True])
async def test_client_leaving_mid_stream_cancels_the_upstream_and_pays_for_the_text_so_far(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str
) -> None:
    c = await customer_factory(10)
    resp = await gw.post(
        "/v1/chat/completions",
        json=body("pricey", key, stream=True, stall_after=2),  # then silence, for a minute
        headers=c.auth,
    )
    seen = b""
    while seen.count(b'"content":"') < 3:  # the role chunk and two tokens
        seen += await resp.content.readany()
    resp.close()  # the client goes away
    await wait_for(lambda: mock_stats.cut[key] == 1, "the upstream call is cancelled")
    out_tokens = text_estimate("Hello from")
    charged = cost("pricey", prompt_estimate(MESSAGES), out_tokens)
    assert await settled_outcome(db, c.account.id) == Outcome(
        GRANT - charged,
        0,
        ["settled"],
        [Debit(charged, prompt_estimate(MESSAGES), out_tokens, True, 0)],
    )
    assert mock_stats.requests[key] == 1


@pytest.mark.parametrize("handler_cancellation", [False, True])
async def test_client_leaving_before_the_answer_cancels_the_upstream_and_pays_the_prompt(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str
) -> None:
    c = await customer_factory(10)
    # The key's first lookup done before: the client leaves while the upstream
    # is slow to answer, after its hold is made, not before.
    assert (await gw.get("/api/user/balance", headers=c.auth)).status == 200
    with pytest.raises(TimeoutError):
        await gw.post(
            "/v1/chat/completions",
            json=body("pricey", key, first_byte_ms=1500),
            headers=c.auth,
            timeout=aiohttp.ClientTimeout(total=0.6),
        )
    charged = cost("pricey", prompt_estimate(MESSAGES), 0)
    assert await settled_outcome(db, c.account.id) == Outcome(
        GRANT - charged, 0, ["settled"], [Debit(charged, prompt_estimate(MESSAGES), 0, True, 0)]
    )
    await wait_for(lambda: mock_stats.cut[key] == 1, "the upstream call is cancelled")
