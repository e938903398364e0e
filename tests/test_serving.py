"""`creditgate serve --workers N` under a real Prometheus."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Services
from tests.logcapture import log_file
from tests.procs import free_port, server_env, start_mock_upstream, stop, wait_http, write_config

PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="needs the `prometheus` binary (Debian package prometheus)"
)


def _prometheus_config(tmp_path: Path, target: str) -> Path:
    path = tmp_path / "prometheus.yml"
    path.write_text(
        f"""
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: creditgate
    static_configs:
      - targets: ["{target}"]
"""
    )
    return path


async def _query(client: httpx.AsyncClient, promql: str) -> float | None:
    r = await client.get("/api/v1/query", params={"query": promql})
    if r.status_code != 200:  # Prometheus still starting
        return None
    result = r.json()["data"]["result"]
    return float(result[0]["value"][1]) if result else None


async def _completions(url: str, key: str, n: int) -> None:
    body = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(n):
        # A fresh connection each time, so the kernel spreads them over workers.
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            r = await c.post(
                "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
            )
            assert r.status_code == 200, r.text


async def _counted(url: str, n: int) -> None:
    """Wait until the workers' own exposition counts ``n`` answered completions."""
    deadline = time.monotonic() + 10
    total = 0.0
    async with httpx.AsyncClient(base_url=url, timeout=5) as c:
        while time.monotonic() < deadline:
            text = (await c.get("/metrics")).text
            total = sum(
                sample.value
                for family in text_string_to_metric_families(text)
                if family.name == "creditgate_http_requests"
                for sample in family.samples
                if sample.name == "creditgate_http_requests_total"
                and sample.labels.get("route") == "/v1/chat/completions"
                and sample.labels.get("status") == "200"
            )
            if total >= n:
                return
            await asyncio.sleep(0.1)
    pytest.fail(f"the workers counted {total} of {n} completions")


@needs_prometheus
@pytest.mark.slow
async def test_prometheus_sees_the_sum_over_workers(
    services: Services, db, customer_factory, tmp_path: Path
) -> None:
    mock, upstream = start_mock_upstream()
    port = free_port()
    env = server_env(services, write_config(tmp_path, upstream))
    sup = subprocess.Popen(
        [sys.executable, "-m", "creditgate", "serve", "--workers", "3", "--port", str(port)],
        env=env,
        stderr=log_file("serve-workers"),
    )
    prom_port = free_port()
    prom = None
    try:
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}/health")
        workers = psutil.Process(sup.pid).children()
        assert len(workers) == 3
        c = await customer_factory(10)
        url = f"http://127.0.0.1:{port}"
        await _completions(url, c.key, 20)
        # A worker counts a request after its last byte went out (the count
        # never delays the client), so the kill waits until all 20 are counted.
        await _counted(url, 20)

        # A worker that dies is replaced, and what it counted is not lost.
        victim = workers[0]
        victim.kill()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            now = {p.pid for p in psutil.Process(sup.pid).children()}
            if len(now) == 3 and victim.pid not in now:
                break
            await asyncio.sleep(0.2)
        else:
            pytest.fail("the dead worker was not replaced")
        await asyncio.to_thread(wait_http, f"{url}/health")
        await _completions(url, c.key, 20)

        prom = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={_prometheus_config(tmp_path, f'127.0.0.1:{port}')}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        promql = 'sum(creditgate_http_requests_total{route="/v1/chat/completions",status="200"})'
        seen = None
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{prom_port}", timeout=5) as pc:
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                try:
                    seen = await _query(pc, promql)
                except httpx.HTTPError:
                    seen = None
                if seen == 40:
                    break
                await asyncio.sleep(0.5)
        assert seen == 40
    finally:
        if prom is not None:
            stop(prom)
        code = stop(sup)
        stop(mock)
    assert code == 0  # SIGTERM stops the workers and the supervisor cleanly


async def _stream(url: str, key: str, chunks: int, started: asyncio.Event) -> tuple[int, bool]:
    """Stream a completion; return (content chunks received, whether [DONE] came)."""
    body = {
        "model": "mock-model",
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
        "mock": {"chunks": chunks, "chunk_delay_ms": 100},
    }
    got, done = 0, False
    try:
        async with (
            httpx.AsyncClient(base_url=url, timeout=30) as c,
            c.stream(
                "POST",
                "/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {key}"},
            ) as r,
        ):
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    # A cut stream ends with an error event (SERVER_SHUTTING_DOWN).
                    if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                        got += 1
                        started.set()
    except httpx.HTTPError:
        pass  # cut by the shutdown
    return got, done


@pytest.mark.slow
async def test_sigterm_lets_streams_finish_and_bills_the_cut_ones(
    services: Services, db, customer_factory, tmp_path: Path
) -> None:
    mock, upstream = start_mock_upstream()
    port = free_port()
    config = write_config(tmp_path, upstream, "\n[http]\nshutdown_timeout_seconds = 2\n")
    server = subprocess.Popen(
        [sys.executable, "-m", "creditgate", "serve", "--port", str(port)],
        env=server_env(services, config),
        stderr=log_file("serve"),
    )
    try:
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}/health")
        c = await customer_factory(10)
        url = f"http://127.0.0.1:{port}"
        # 10 streams that end within the grace period, 10 that cannot.
        plan = [5] * 10 + [60] * 10
        events = [asyncio.Event() for _ in plan]
        tasks = [
            asyncio.create_task(_stream(url, c.key, n, ev))
            for n, ev in zip(plan, events, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 20)
        server.terminate()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        assert server.wait(timeout=30) == 0
    finally:
        stop(server)
        stop(mock)

    short, long = results[:10], results[10:]
    assert all(done and got == 5 for got, done in short)
    assert all(not done and 0 < got < 60 for got, done in long)
    rows = await db.fetch(
        "SELECT output_tokens, estimated FROM ledger_entries"
        " WHERE account_id = $1 AND kind = 'debit' ORDER BY output_tokens",
        c.account.id,
    )
    # Every stream was billed: the finished ones exactly, the cut ones for
    # at least what the client received (an estimate, marked as such).
    assert len(rows) == 20
    exact = [r for r in rows if not r["estimated"]]
    estimated = [r for r in rows if r["estimated"]]
    assert [r["output_tokens"] for r in exact] == [5] * 10
    assert len(estimated) == 10
    assert all(r["output_tokens"] > 0 for r in estimated)
    live = await db.fetchval(
        "SELECT count(*) FROM holds WHERE account_id = $1 AND ended_at IS NULL", c.account.id
    )
    assert live == 0
