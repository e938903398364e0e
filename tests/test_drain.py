"""SIGTERM drains a real ``creditgate serve`` (one worker, and ``--workers 2``).

Streams that end within ``shutdown_timeout_seconds`` finish and are billed
exactly; streams that outlive it are cut at the timeout with an error event
(and the usage chunk when asked for), billed for what they delivered; a
non-streaming call still waiting at the cut gets a 503 and is not charged.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from creditgate.http.drain import SHUTDOWN_MARGIN_SECONDS
from creditgate.proxy.pricing import TokenCounts, cost_of, estimate_text_tokens
from tests.conftest import Services, make_settings
from tests.logcapture import log_file
from tests.procs import free_port, server_env, start_mock_upstream, stop, wait_http, write_config

TIMEOUT = 2  # [http] shutdown_timeout_seconds in these tests
BYTES_PER_TOKEN = 3  # [proxy] estimate_bytes_per_token, the default


@dataclass
class Seen:
    """What one streaming client received."""

    text: str = ""
    chunks: int = 0
    done: bool = False
    usage: dict | None = None
    error: dict | None = None
    error_at: float = 0.0  # time.monotonic() when the error event arrived
    lines: list[str] = field(default_factory=list)


async def _stream(url: str, key: str, chunks: int, usage: bool, started: asyncio.Event) -> Seen:
    body: dict = {
        "model": "mock-model",
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
        "mock": {"chunks": chunks, "chunk_delay_ms": 100},
    }
    if usage:
        body["stream_options"] = {"include_usage": True}
    seen = Seen()
    async with (
        httpx.AsyncClient(base_url=url, timeout=30) as c,
        c.stream(
            "POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as r,
    ):
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                seen.done = True
                continue
            event = json.loads(line[6:])
            if "error" in event:
                seen.error, seen.error_at = event["error"], time.monotonic()
            elif event.get("usage"):
                seen.usage = event["usage"]
            elif event["choices"] and (text := event["choices"][0]["delta"].get("content")):
                seen.text += text
                seen.chunks += 1
                started.set()
    return seen


async def _sdk_stream(url: str, key: str, started: asyncio.Event) -> tuple[openai.APIError, str]:
    """A long stream through the openai SDK: the cut must raise its APIError; (it, the text)."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    stream = await client.chat.completions.create(
        model="mock-model",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_body={"mock": {"chunks": 100, "chunk_delay_ms": 100}},
    )
    text = ""
    try:
        async for chunk in stream:
            text += chunk.choices[0].delta.content or ""
            started.set()
    except openai.APIError as e:
        return e, text
    finally:
        await client.close()
    raise AssertionError("the stream ended without an error")


async def _waiting_call(url: str, key: str) -> httpx.Response:
    """A non-streaming call whose upstream answers only after the cut."""
    body = {
        "model": "mock-model",
        "messages": [{"role": "user", "content": "hi"}],
        "mock": {"first_byte_ms": 20_000},
    }
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        return await c.post(
            "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        )


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_finishes_short_streams_and_cuts_long_ones_at_the_timeout(
    services: Services, db, customer_factory, tmp_path: Path, workers: int
) -> None:
    mock, upstream = start_mock_upstream()
    port = free_port()
    config = write_config(tmp_path, upstream, f"\n[http]\nshutdown_timeout_seconds = {TIMEOUT}\n")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "creditgate",
            "serve",
            "--port",
            str(port),
            "--workers",
            f"{workers}",
        ],
        env=server_env(services, config),
        stderr=log_file(f"serve-drain-{workers}"),
    )
    try:
        url = f"http://127.0.0.1:{port}"
        await asyncio.to_thread(wait_http, f"{url}/health")
        c = await customer_factory(10)
        # (content chunks at 100 ms each, include_usage): 4 end in ~0.5 s, 4 cannot end in 2 s.
        plan = [(5, False), (5, True)] * 2 + [(60, False), (60, True)] * 2
        events = [asyncio.Event() for _ in range(len(plan) + 1)]
        streams = [
            asyncio.create_task(_stream(url, c.key, n, usage, ev))
            for (n, usage), ev in zip(plan, events, strict=False)
        ]
        sdk = asyncio.create_task(_sdk_stream(url, c.key, events[-1]))
        waiting = asyncio.create_task(_waiting_call(url, c.key))
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 20)
        await asyncio.sleep(0.2)  # the waiting call is in (it needs no upstream byte)
        sigterm = time.monotonic()
        server.terminate()
        await asyncio.sleep(0.3)
        # A second signal (Ctrl-C reaches every worker of the group, and the
        # supervisor forwards its own) must not abort the drain.
        server.send_signal(signal.SIGINT)
        results = await asyncio.wait_for(asyncio.gather(*streams), 30)
        sdk_error, sdk_text = await asyncio.wait_for(sdk, 30)
        refused = await asyncio.wait_for(waiting, 30)
        code = await asyncio.to_thread(server.wait, 30)
        exited = time.monotonic() - sigterm
    finally:
        stop(server)
        stop(mock)

    assert code == 0
    assert exited < TIMEOUT + SHUTDOWN_MARGIN_SECONDS, exited
    short, long = results[:4], results[4:]
    for seen in short:  # finished normally
        assert seen.done and seen.chunks == 5 and seen.error is None
    for seen in long:  # cut at the timeout, with the error event
        assert not seen.done and 0 < seen.chunks < 60
        assert seen.error is not None and seen.error["code"] == "SERVER_SHUTTING_DOWN"
        assert abs(seen.error_at - sigterm - TIMEOUT) <= 0.5, seen.error_at - sigterm
    assert sdk_error.code == "SERVER_SHUTTING_DOWN"
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "SERVICE_UNAVAILABLE"

    rows = await db.fetch(
        "SELECT input_tokens, output_tokens, estimated, -amount AS debited FROM ledger_entries"
        " WHERE account_id = $1 AND kind = 'debit'",
        c.account.id,
    )
    # 8 streams + the SDK's; the refused call is not charged.
    assert len(rows) == 9
    exact = sorted(r["output_tokens"] for r in rows if not r["estimated"])
    assert exact == [5, 5, 5, 5]  # the finished streams: the upstream's usage
    model = make_settings(services, upstream).config.models["mock-model"]
    for r in rows:  # each finished stream charged its exact price, to the µc
        if not r["estimated"]:
            counts = TokenCounts(input=r["input_tokens"], output=r["output_tokens"])
            assert r["debited"] == cost_of(model, counts), dict(r)
    for seen in short[1::2]:  # asked for usage: the cost it reports is the debit
        assert seen.usage is not None and not seen.usage.get("estimated")
        assert seen.usage["cost_micros"] in {r["debited"] for r in rows if not r["estimated"]}
    # The cut ones: the text their clients received, estimated (the upstream sent no usage).
    estimated = sorted(r["output_tokens"] for r in rows if r["estimated"])
    texts = [s.text for s in long] + [sdk_text]
    assert estimated == sorted(
        estimate_text_tokens(len(t.encode()), BYTES_PER_TOKEN) for t in texts
    )
    assert all(t > 0 for t in estimated)
    for seen in long[1::2]:  # asked for usage: the usage chunk came, with the estimate and cost
        assert seen.usage is not None and seen.usage["estimated"] is True
        assert seen.usage["completion_tokens"] == estimate_text_tokens(
            len(seen.text.encode()), BYTES_PER_TOKEN
        )
        assert seen.usage["cost_micros"] in {r["debited"] for r in rows if r["estimated"]}
    for seen in long[0::2]:
        assert seen.usage is None
    live = await db.fetchval(
        "SELECT count(*) FROM holds WHERE account_id = $1 AND ended_at IS NULL", c.account.id
    )
    assert live == 0


def test_the_supervisor_kills_only_a_worker_still_running_past_its_drain() -> None:
    from creditgate.supervisor import _wait_for_drain

    drains = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])
    stuck = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            " print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert stuck.stdout is not None and stuck.stdout.readline() == b"ready\n"
        stuck.terminate()  # ignored: only the kill stops it
        assert _wait_for_drain([drains, stuck], seconds=1.0) == [stuck.pid]
        assert drains.returncode == 0
        assert stuck.returncode == -9
    finally:
        stop(stuck)
        stop(drains)


def test_the_supervisor_exits_1_when_it_had_to_kill_a_worker(tmp_path: Path) -> None:
    """A kill is the last resort, and the exit code says it happened."""
    script = tmp_path / "supervise_stuck.py"
    script.write_text(
        "import subprocess, sys\n"
        "from creditgate import supervisor\n"
        "stuck = ('import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);'\n"
        "         ' time.sleep(60)')\n"
        "supervisor._spawn = lambda host, port, env: subprocess.Popen(\n"
        "    [sys.executable, '-c', stuck], env=env)\n"
        "supervisor.SHUTDOWN_MARGIN_SECONDS = 0.5\n"
        "print('ready', flush=True)\n"
        "sys.exit(supervisor.supervise(2, '127.0.0.1', 9, 0.5))\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        time.sleep(1.0)  # both workers started and ignore SIGTERM
        proc.terminate()
        code = proc.wait(timeout=30)
    finally:
        stop(proc)
    assert code == 1
