"""Money safety on the request path (issue 14), tried as an adversary would.

Real Postgres and Redis, real sockets: creditgate in front of the mock
upstream, whose request counter shows which calls reached it; raw sockets
with a small receive buffer play the client that stops reading.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import tomllib
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from creditgate import ledger
from creditgate.config import ConfigError, Settings, parse_config
from creditgate.http.app import create_app
from creditgate.ledger.group_commit import GroupCommit
from creditgate.proxy.mock_upstream import MockStats
from creditgate.proxy.relay import READ_ERROR, Relay
from creditgate.proxy.upstream import UpstreamClient
from tests.conftest import Services
from tests.proxy.conftest import (
    MESSAGES,
    Debit,
    GatewayServer,
    Outcome,
    cost,
    outcome,
    prompt_estimate,
    proxy_config_text,
    settled_outcome,
    text_estimate,
)
from tests.proxy.test_faults import body, read_stream, text_of

# A model whose calls are cut after 2 s, with a settle margin of 1 s (so its
# holds live 3 s), and whose images may cost up to 3,000 tokens each.
EXTRA_CONFIG = """
[models."stallable"]
input_price = 1000
output_price = 3000
max_output_tokens = 4000
max_image_tokens = 3000
deployments = [{ upstream = "main", model = "stallable-upstream" }]
timeouts = { connect = 1, first_byte = 2, idle = 2, total = 2 }

[ledger]
settle_margin_seconds = 1
"""


@pytest.fixture
async def gws(services: Services, upstream: TestServer) -> AsyncIterator[TestClient]:
    """creditgate with the proxy tests' models plus ``stallable`` and a 1 s settle margin."""
    text = proxy_config_text(str(upstream.make_url("/v1"))) + EXTRA_CONFIG
    settings = Settings(
        config=parse_config(tomllib.loads(text, parse_float=Decimal), {}),
        database_url=services.database_url,
        redis_url=services.redis_url,
    )
    client = TestClient(GatewayServer(create_app(settings), handler_cancellation=False))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


async def emptied(db: asyncpg.Pool, account_id: uuid.UUID) -> None:
    """Take what the account has available (an adjustment), as another process might."""
    row = await db.fetchrow(
        "SELECT balance - reserved AS available FROM account_balances WHERE account_id = $1",
        account_id,
    )
    await ledger.post_entry(
        db,
        account_id=account_id,
        amount=-row["available"],
        kind="adjustment",
        idempotency_key=f"test:{uuid.uuid4()}",
        reason="emptied",
    )


def micros_as_credits(micros: int) -> str:
    return str(Decimal(micros) / 1_000_000)


# ---------------------------------------------------------------- nothing before a durable hold


async def test_refused_requests_start_no_upstream_call(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str
) -> None:
    c = await customer_factory(10)
    # Admitted once: speculation (removed) then started this account's calls early.
    first = await gw.post("/v1/chat/completions", json=body("mock-model", key), headers=c.auth)
    assert first.status == 200
    await emptied(db, c.account.id)
    seen = mock_stats.requests[key]

    async def call(stream: bool) -> int:
        resp = await gw.post(
            "/v1/chat/completions", json=body("mock-model", key, stream=stream), headers=c.auth
        )
        assert (await resp.json())["error"]["code"] == "INSUFFICIENT_CREDITS"
        return resp.status

    statuses = await asyncio.gather(*(call(i % 2 == 0) for i in range(40)))
    assert statuses == [402] * 40
    assert mock_stats.requests[key] == seen  # not one upstream call started
    got = await outcome(db, c.account.id)
    assert got.holds == ["settled"] and got.reserved == 0


async def test_throttled_requests_start_no_upstream_call(
    gw: TestClient, db, customer_factory, mock_stats: MockStats, key: str
) -> None:
    c = await customer_factory(10, tier="tight")  # 2 requests per minute
    for _ in range(2):
        resp = await gw.post("/v1/chat/completions", json=body("mock-model", key), headers=c.auth)
        assert resp.status == 200
    seen = mock_stats.requests[key]
    resps = await asyncio.gather(
        *(
            gw.post("/v1/chat/completions", json=body("mock-model", key), headers=c.auth)
            for _ in range(20)
        )
    )
    assert [r.status for r in resps] == [429] * 20
    assert mock_stats.requests[key] == seen
    assert (await outcome(db, c.account.id)).holds == ["settled", "settled"]


# ---------------------------------------------------------------- a call never outlives its hold


def raw_request(port: int, auth: dict[str, str], payload: dict[str, Any]) -> socket.socket:
    """A client socket with a 4 KB receive buffer that has sent one chat request."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    data = orjson.dumps(payload)
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in auth.items())
        + "\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


async def test_a_stalled_reader_is_cut_at_its_deadline_and_billed_before_its_hold_expires(
    gws: TestClient, db, customer_factory, key: str
) -> None:
    # Enough for one worst case of `stallable` and a little more.
    c = await customer_factory(13)
    payload = body("stallable", key, stream=True, chunks=4000, content="x" * 5000)
    sock = await asyncio.to_thread(raw_request, gws.server.port, c.auth, payload)
    try:
        got = await asyncio.to_thread(sock.recv, 2048)  # reads 2 KB, then stops reading
        assert got.startswith(b"HTTP/1.1 200")
        # The call is cut at its 2 s deadline although its writes are blocked, and
        # settled (not expired: its hold lives 1 s longer) for what it relayed.
        after = await settled_outcome(db, c.account.id)
        assert after.holds == ["settled"] and after.reserved == 0
        [debit] = after.debits
        assert debit.estimated and debit.uncollected == 0
        assert 0 < debit.output_tokens <= 4000  # an estimate, clamped to max_tokens
        assert debit.amount == cost_stallable(prompt_estimate(MESSAGES), debit.output_tokens)
        # A second call can only spend what the first left: the credits are not freed twice.
        second = await gws.post(
            "/v1/chat/completions", json=body("stallable", key, stream=True), headers=c.auth
        )
        worst = cost_stallable(prompt_estimate(MESSAGES), 4000)
        assert second.status == (200 if after.balance >= worst else 402)
        await second.read()
        final = await settled_outcome(
            db, c.account.id, holds=len((await outcome(db, c.account.id)).holds)
        )
        assert final.reserved == 0 and all(d.uncollected == 0 for d in final.debits)
        assert final.balance >= 0
    finally:
        sock.close()


def cost_stallable(in_tokens: int, out_tokens: int) -> int:
    """µc: 1,000 credits per 1M tokens is 1,000 µc per token (3,000 for output)."""
    return in_tokens * 1000 + out_tokens * 3000


# ---------------------------------------------------------------- served usage is billed


async def test_bytes_sent_before_the_upstream_dropped_are_relayed_and_charged(
    gw: TestClient, db, customer_factory, key: str
) -> None:
    c = await customer_factory(10)
    resp = await gw.post(
        "/v1/chat/completions",
        json=body("pricey", key, stream=True, drop_after=3, chunk_delay_ms=20),
        headers=c.auth,
    )
    events, _ = await read_stream(resp)
    assert text_of(events) == "Hello from the"  # the three chunks
    out_tokens = text_estimate("Hello from the")
    charged = cost("pricey", prompt_estimate(MESSAGES), out_tokens)
    assert (await settled_outcome(db, c.account.id)).debits == [
        Debit(charged, prompt_estimate(MESSAGES), out_tokens, True, 0)
    ]


async def test_the_relay_forwards_what_arrived_before_the_connection_error(
    upstream: TestServer, key: str
) -> None:
    """Deterministically: the whole stream and the upstream's drop are buffered
    before the relay reads (as when it was blocked writing to a slow client);
    aiohttp's reads then raise the stored error first."""
    config = parse_config(
        tomllib.loads(proxy_config_text(str(upstream.make_url("/v1"))), parse_float=Decimal), {}
    )
    model = config.models["pricey"]
    ended: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        async with aiohttp.ClientSession() as session:
            stream = await UpstreamClient(session).stream(
                model, body("pricey", key, stream=True, drop_after=3, chunk_delay_ms=20)
            )
            await asyncio.sleep(0.5)  # the rest of the stream and the drop arrive meanwhile
            assert stream.response.content.exception() is not None
            resp = web.StreamResponse()
            await resp.prepare(request)
            relay = Relay(stream, resp)
            ended.append(await relay.run(5.0, send_timeout=5.0))
            await resp.write_eof()
            return resp

    app = web.Application()
    app.router.add_post("/relay", handler)
    async with TestClient(TestServer(app)) as client:
        resp = await client.post("/relay")
        events, _ = await read_stream(resp)
    assert text_of(events) == "Hello from the"
    assert ended == [READ_ERROR]


async def test_an_estimate_without_usage_is_clamped_to_n_times_max_tokens(
    gw: TestClient, db, customer_factory, key: str
) -> None:
    c = await customer_factory(10)
    # Two tokens of 3,000 bytes each: ~2,000 tokens by bytes, but max_tokens is 2.
    payload = {**body("pricey", key, no_usage=True, content="z" * 3000), "max_tokens": 2}
    resp = await gw.post("/v1/chat/completions", json=payload, headers=c.auth)
    assert resp.status == 200
    usage = (await resp.json())["usage"]
    assert usage["estimated"] is True and usage["completion_tokens"] == 2
    got = await outcome(db, c.account.id)
    charged = cost("pricey", prompt_estimate(MESSAGES), 2)
    assert got.debits == [Debit(charged, prompt_estimate(MESSAGES), 2, True, 0)]


async def test_an_estimate_without_usage_for_n_choices_is_clamped_to_n_times_max_tokens(
    gw: TestClient, db, customer_factory, key: str
) -> None:
    c = await customer_factory(10)
    # Three choices of 3,000 bytes each, max_tokens 2: at most 3 × 2 output tokens.
    payload = {
        **body("pricey", key, no_usage=True, content="z" * 3000),
        "max_tokens": 2,
        "n": 3,
    }
    resp = await gw.post("/v1/chat/completions", json=payload, headers=c.auth)
    assert resp.status == 200
    answer = await resp.json()
    assert len(answer["choices"]) == 3
    usage = answer["usage"]
    assert usage["estimated"] is True and usage["completion_tokens"] == 6
    got = await outcome(db, c.account.id)
    charged = cost("pricey", prompt_estimate(MESSAGES), 6)
    assert got.debits == [Debit(charged, prompt_estimate(MESSAGES), 6, True, 0)]


# ---------------------------------------------------------------- the hold bounds the charge


async def test_one_byte_tokens_and_costly_images_never_exceed_the_hold(
    gws: TestClient, db, customer_factory, key: str
) -> None:
    c = await customer_factory(100)
    text = "ab" * 2000  # 4,000 bytes: a byte-level tokenizer may make 4,000 tokens of it
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": "https://example.invalid/a.png"}},
                {"type": "image_url", "image_url": {"url": "https://example.invalid/b.png"}},
            ],
        }
    ]
    worst_prompt = len(text) + 2 * 3000  # every byte a token, each image at the model's maximum
    payload = {
        "model": "stallable",
        "messages": messages,
        "max_tokens": 5,
        "mock": {"key": key, "prompt_tokens": worst_prompt, "first_byte_ms": 1000},
    }
    call = asyncio.ensure_future(gws.post("/v1/chat/completions", json=payload, headers=c.auth))
    # While the call waits on the upstream, everything else is spent: only its hold is left.
    for _ in range(100):
        if (await outcome(db, c.account.id)).reserved:
            break
        await asyncio.sleep(0.02)
    await emptied(db, c.account.id)
    resp = await call
    assert resp.status == 200
    usage = (await resp.json())["usage"]
    assert usage["prompt_tokens"] == worst_prompt
    got = await outcome(db, c.account.id)
    [debit] = got.debits
    assert debit.input_tokens == worst_prompt and not debit.estimated
    assert debit.uncollected == 0  # the hold covered it all
    assert got.reserved == 0


# ---------------------------------------------------------------- lost replies


class LostReserveReply:
    """The real pool, except that a reserve's reply is lost after it committed
    (as when the connection breaks between the commit and its answer)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def fetchval(self, query: str, *args: Any) -> Any:
        value = await self._pool.fetchval(query, *args)
        if "INSERT INTO holds" in query:
            raise ConnectionResetError("the reply was lost")
        return value

    async def fetchrow(self, query: str, *args: Any) -> Any:
        # The single reserve reads its row (the hold, or why not).
        value = await self._pool.fetchrow(query, *args)
        if "INSERT INTO holds" in query:
            raise ConnectionResetError("the reply was lost")
        return value

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


async def test_a_reserve_whose_reply_is_lost_is_released_at_once(db, customer_factory) -> None:
    c = await customer_factory(10)
    gc = GroupCommit(LostReserveReply(db), lanes=1)  # type: ignore[arg-type]
    hold_id = uuid.uuid4()
    with pytest.raises(ConnectionResetError):
        await gc.reserve(hold_id=hold_id, account_id=c.account.id, amount=1_000, ttl_seconds=600)
    # Committed, never answered: given back now (by the lane, right after the
    # caller hears of the failure), not at its TTL (600 s).
    for _ in range(250):
        got = await outcome(db, c.account.id)
        if got.holds == ["released"]:
            break
        await asyncio.sleep(0.02)
    assert got == Outcome(10_000_000, 0, ["released"], [])


async def test_a_reserve_committed_for_a_cancelled_caller_is_released(db, customer_factory) -> None:
    c = await customer_factory(10)
    gc = GroupCommit(db, lanes=1)
    held = [
        gc.reserve_soon(
            hold_id=uuid.uuid4(), account_id=c.account.id, amount=1_000, ttl_seconds=600
        )
        for _ in range(3)
    ]
    await asyncio.sleep(0)
    held[1].cancel()  # its caller left while the batch ran
    await asyncio.gather(held[0], held[2])
    for _ in range(100):
        got = await outcome(db, c.account.id)
        if "live" not in got.holds[1:2] and len(got.holds) == 3:
            break
        await asyncio.sleep(0.02)
    assert sorted(got.holds) == ["live", "live", "released"] and got.reserved == 2_000
    for h in (held[0], held[2]):
        await ledger.release_hold(db, h.result().id)


# ------------------------------------------------ a client gone before the first event


async def test_a_stream_whose_client_leaves_before_the_first_event_is_charged_its_prompt(
    gw: TestClient, db, customer_factory, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    c = await customer_factory(10)
    caplog.set_level(logging.INFO)
    payload = body("pricey", key, stream=True, first_byte_ms=1500)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await gw.post("/v1/chat/completions", json=payload, headers=c.auth)
    after = await settled_outcome(db, c.account.id)
    charged = cost("pricey", prompt_estimate(MESSAGES), 0)
    assert after == Outcome(
        10_000_000 - charged,
        0,
        ["settled"],
        [Debit(charged, prompt_estimate(MESSAGES), 0, True, 0)],
    )
    gone = [r for r in caplog.records if r.getMessage() == "client disconnected mid-call"]
    assert gone and gone[0].levelno == logging.INFO
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# ---------------------------------------------------------------- old configs, the sweeper


async def test_removed_config_keys_still_load_and_are_named_in_a_warning(
    services: Services, upstream: TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    old = (
        "\n[proxy]\nspeculative_upstream = true\n"
        "\n[ledger]\nasync_reserve = true\nhold_ttl_seconds = 900\n"
    )
    text = proxy_config_text(str(upstream.make_url("/v1"))) + old
    config = parse_config(tomllib.loads(text, parse_float=Decimal), {})
    assert config.ignored_keys == (
        "proxy.speculative_upstream",
        "ledger.async_reserve",
        "ledger.hold_ttl_seconds",
    )
    bad = text.replace("async_reserve = true", 'async_reserve = "x"')
    with pytest.raises(ConfigError, match=r"ledger\.async_reserve"):  # still checked for type
        parse_config(tomllib.loads(bad, parse_float=Decimal), {})
    settings = Settings(
        config=config, database_url=services.database_url, redis_url=services.redis_url
    )
    caplog.set_level(logging.WARNING)
    async with TestClient(GatewayServer(create_app(settings), handler_cancellation=False)):
        pass
    [warning] = [r for r in caplog.records if r.getMessage().startswith("config keys ignored")]
    assert warning.keys == list(config.ignored_keys)  # type: ignore[attr-defined]


async def test_the_sweeper_charges_an_expired_holds_recorded_progress(db, customer_factory) -> None:
    c = await customer_factory(10)
    live, crashed, silent = (uuid.uuid4() for _ in range(3))
    for hold_id, ttl in ((live, 600), (crashed, 0.01), (silent, 0.01)):
        await ledger.reserve_hold(
            db, hold_id=hold_id, account_id=c.account.id, amount=50_000, ttl_seconds=ttl
        )
    # Streams record progress as they go (proxy.metering); `silent` never sent text.
    for hold_id in (live, crashed):
        await db.execute(
            "INSERT INTO hold_progress (hold_id, input_tokens, output_tokens, cost)"
            " VALUES ($1, 12, 30, 42000)",
            hold_id,
        )
    await asyncio.sleep(0.05)
    assert await ledger.sweep_expired_holds(db) == 2
    got = await outcome(db, c.account.id)
    assert got.holds == ["live", "settled", "expired"]
    assert got.debits == [Debit(42_000, 12, 30, True, 0)]
    assert got.balance == 10_000_000 - 42_000 and got.reserved == 50_000
    # Only the live hold's progress is kept.
    assert await db.fetchval("SELECT array_agg(hold_id) FROM hold_progress") == [live]
    await ledger.release_hold(db, live)


async def test_a_long_stream_records_its_progress_on_its_hold(
    gw: TestClient, db, customer_factory, key: str
) -> None:
    c = await customer_factory(10)
    resp = await gw.post(
        "/v1/chat/completions",
        json=body("pricey", key, stream=True, chunks=60, chunk_delay_ms=50, content="word "),
        headers=c.auth,
    )
    assert resp.status == 200
    row = None
    for _ in range(100):  # a record once it has streamed text for a second
        await resp.content.readline()
        row = await db.fetchrow(
            "SELECT p.input_tokens, p.output_tokens, p.cost FROM hold_progress p"
            " JOIN holds h ON h.id = p.hold_id WHERE h.account_id = $1 AND h.ended_at IS NULL",
            c.account.id,
        )
        if row is not None:
            break
    assert row is not None and row["input_tokens"] == prompt_estimate(MESSAGES)
    assert 0 < row["output_tokens"] <= 100  # at most the whole text: 300 bytes / 3
    assert row["cost"] == cost("pricey", row["input_tokens"], row["output_tokens"])
    await resp.read()
    assert (await settled_outcome(db, c.account.id)).holds == ["settled"]
