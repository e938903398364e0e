"""What creditgate adds to a call: through creditgate vs straight to the upstream.

    .venv/bin/python bench/proxy_bench.py            # ~3 minutes; prints a Markdown table

Starts ``creditgate mock-upstream`` and ``creditgate serve`` (one process, pinned
to core 0 with ``taskset``), seeds an account and an API key, and runs a
closed-loop load generator (this process and the mock pinned to core 1). For
every scenario the same requests go to each target — straight to the mock,
and through creditgate with the whole path on (API-key auth, throttle,
ledger reserve + settle, metrics, logs) — in interleaved rounds (A B B A …),
so drift on this shared machine hits both alike.

Reported per scenario and target: requests/s, latency p50/p99, time to first
byte (streams), and for creditgate the added p50/p99, added time to first
byte, CPU ms per request (``/proc/<pid>/stat``) and, for the paced stream,
how much later each chunk reaches the client than it left the upstream.

PostgreSQL and Redis: ``DATABASE_URL`` / ``REDIS_URL`` when set (a fresh
database is created on that server and dropped after), else embedded ones.

Extending it: a scenario is a ``Scenario`` row and a target a ``Target`` row
(a URL, headers, a process to measure); the harness does the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from creditgate import ledger, migrations  # noqa: E402
from creditgate.auth import create_api_key  # noqa: E402

PROXY_CORE, LOAD_CORE = 0, 1
MODEL = "bench-model"
CONFIG = """
[upstreams.main]
base_url = "{upstream}"

[models."{model}"]
input_price = 0.15
output_price = 0.60
max_output_tokens = 4096
deployments = [{{ upstream = "main", model = "{model}" }}]

[tiers.free]
requests_per_minute = 100000000
tokens_per_minute = 1000000000
max_parallel = 1000
messages_per_day = 1000000000
"""


@dataclass(frozen=True)
class Scenario:
    """One kind of call, run at one concurrency against every target."""

    name: str
    stream: bool
    concurrency: int
    chunks: int = 20  # completion tokens; one SSE event each when streaming
    chunk_delay_ms: int = 0  # the upstream's pace between chunks
    stamp: bool = False  # chunks carry the mock's send time: measures per-chunk delay

    def body(self) -> dict[str, Any]:
        mock: dict[str, Any] = {"chunks": self.chunks}
        if self.chunk_delay_ms:
            mock["chunk_delay_ms"] = self.chunk_delay_ms
        if self.stamp:
            mock["stamp"] = True
        body: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
            "max_tokens": 64,
            "mock": mock,
        }
        if self.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body


SCENARIOS = (
    Scenario("json, c=1", stream=False, concurrency=1),
    Scenario("json, c=32", stream=False, concurrency=32),
    Scenario("stream 20 chunks, c=1", stream=True, concurrency=1),
    Scenario("stream 20 chunks, c=32", stream=True, concurrency=32),
    Scenario("stream paced 2 ms, c=1", stream=True, concurrency=1, chunk_delay_ms=2, stamp=True),
)


@dataclass
class Target:
    """Where requests go; ``pid`` (if any) is the process whose CPU is charged to it."""

    name: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    pid: int | None = None


@dataclass
class Sample:
    latency: list[float] = field(default_factory=list)  # seconds, request to last byte
    ttfb: list[float] = field(default_factory=list)  # seconds, request to first body bytes
    chunk_delay: list[float] = field(default_factory=list)  # seconds, upstream send → arrival
    errors: int = 0
    elapsed: float = 0.0
    cpu_ticks: int = 0


# ---------------------------------------------------------------- load


async def one_call(
    session: aiohttp.ClientSession, target: Target, payload: bytes, scenario: Scenario, s: Sample
) -> None:
    started = time.perf_counter()
    async with session.post(target.url, data=payload, headers=target.headers) as resp:
        if not scenario.stream:
            await resp.read()
            s.latency.append(time.perf_counter() - started)
            if resp.status != 200:
                s.errors += 1
            return
        first: float | None = None
        reads: list[tuple[float, bytes]] = []
        async for chunk in resp.content.iter_any():
            now = time.perf_counter()
            if first is None:
                first = now
            if scenario.stamp:
                reads.append((time.monotonic(), chunk))
        done = time.perf_counter()
        if resp.status != 200 or first is None:
            s.errors += 1
            return
        s.latency.append(done - started)
        s.ttfb.append(first - started)
        if scenario.stamp:
            s.chunk_delay.extend(_chunk_delays(reads))


def _chunk_delays(reads: list[tuple[float, bytes]]) -> Iterator[float]:
    """Arrival time minus the mock's send stamp, for every stamped token chunk."""
    buf = b""
    for arrived, chunk in reads:
        buf += chunk
        *events, buf = buf.split(b"\n\n")
        for event in events:
            if not event.startswith(b"data: {"):
                continue
            for choice in orjson.loads(event[6:]).get("choices") or []:
                content = (choice.get("delta") or {}).get("content") or ""
                if content.strip():
                    yield arrived - float(content)


async def run_batch(
    session: aiohttp.ClientSession, target: Target, scenario: Scenario, seconds: float, s: Sample
) -> None:
    payload = orjson.dumps(scenario.body())
    stop = time.perf_counter() + seconds
    ticks_before = _cpu_ticks(target.pid)

    async def worker() -> None:
        while time.perf_counter() < stop:
            try:
                await one_call(session, target, payload, scenario, s)
            except aiohttp.ClientError:
                s.errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(scenario.concurrency)))
    s.elapsed += time.perf_counter() - started
    s.cpu_ticks += _cpu_ticks(target.pid) - ticks_before


def _cpu_ticks(pid: int | None) -> int:
    if pid is None:
        return 0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def run_scenario(
    targets: list[Target], scenario: Scenario, rounds: int, seconds: float
) -> dict[str, Sample]:
    results = {t.name: Sample() for t in targets}
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        for t in targets:  # warm up connections, caches and the JIT-less rest
            await run_batch(session, t, scenario, min(1.0, seconds), Sample())
        for r in range(rounds):
            order = targets if r % 2 == 0 else list(reversed(targets))  # A B, B A, …
            for t in order:
                await run_batch(session, t, scenario, seconds, results[t.name])
    return results


# ---------------------------------------------------------------- report


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def report(scenario: Scenario, results: dict[str, Sample], base: str, clk_tck: int) -> list[str]:
    rows = []
    b = results[base]
    for name, s in results.items():
        n = len(s.latency)
        row = [
            scenario.name,
            name,
            str(n),
            f"{n / s.elapsed:.0f}" if s.elapsed else "-",
            ms(pct(s.latency, 0.5)),
            ms(pct(s.latency, 0.99)),
        ]
        if name == base:
            row += ["", ""]
        else:
            row += [
                "+" + ms(pct(s.latency, 0.5) - pct(b.latency, 0.5)),
                "+" + ms(pct(s.latency, 0.99) - pct(b.latency, 0.99)),
            ]
        if scenario.stream:
            ttfb = ms(pct(s.ttfb, 0.5))
            if name != base:
                ttfb += f" (+{ms(pct(s.ttfb, 0.5) - pct(b.ttfb, 0.5))})"
            row.append(ttfb)
        else:
            row.append("")
        if scenario.stamp and s.chunk_delay:
            row.append(
                f"{ms(statistics.median(s.chunk_delay))} / {ms(pct(s.chunk_delay, 0.99))}"
                f" / {ms(max(s.chunk_delay))}"
            )
        else:
            row.append("")
        cpu = s.cpu_ticks / clk_tck / n * 1000 if n and name != base else None
        row.append(f"{cpu:.3f}" if cpu is not None else "")
        row.append(str(s.errors))
        rows.append("| " + " | ".join(row) + " |")
    return rows


HEADER = (
    "| scenario | target | requests | req/s | p50 ms | p99 ms | added p50 | added p99 "
    "| TTFB p50 ms (added) | chunk delay p50/p99/max ms | proxy CPU ms/req | errors |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


# ---------------------------------------------------------------- set-up


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(core: int, argv: list[str]) -> list[str]:
    taskset = shutil.which("taskset")
    return [taskset, "-c", str(core), *argv] if taskset else argv


async def wait_ready(url: str, what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as s:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{what} exited with {proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError):
                async with s.get(url) as resp:
                    if resp.status < 500:
                        return
            if time.monotonic() > deadline:
                raise SystemExit(f"{what} did not start")
            await asyncio.sleep(0.1)


@contextlib.contextmanager
def services() -> Iterator[tuple[str, str]]:
    """(base Postgres URL, Redis URL): the environment's, or embedded ones."""
    stops = []
    data = Path(tempfile.mkdtemp(prefix="cg-bench-"))
    pg, rd = os.environ.get("DATABASE_URL"), os.environ.get("REDIS_URL")
    try:
        if not pg:
            from creditgate.embedded import EmbeddedPostgres

            e = EmbeddedPostgres(data)
            stops.append(e.stop)
            pg = e.url
        if not rd:
            from creditgate.embedded import EmbeddedRedis

            r = EmbeddedRedis(data)
            stops.append(r.stop)
            rd = r.url
        yield pg, rd
    finally:
        for stop in reversed(stops):
            stop()
        shutil.rmtree(data, ignore_errors=True)


def on_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def seed(database_url: str) -> str:
    """Migrate, create an account with plenty of credits, return its API key."""
    conn = await asyncpg.connect(database_url)
    try:
        await migrations.migrate(conn)
        account = await ledger.ensure_account(conn, "user", f"bench_{uuid.uuid4().hex[:8]}")
        await ledger.post_entry(
            conn,
            account_id=account.id,
            amount=1_000_000 * ledger.money.MICROS_PER_CREDIT,
            kind="grant",
            idempotency_key=f"bench:{account.id}",
            reason="benchmark credits",
        )
        return (await create_api_key(conn, account.id, "bench")).key
    finally:
        await conn.close()


async def floor(database_url: str, redis_url: str) -> str:
    """The round trips the whole path cannot avoid, measured now: a committed
    one-row write in Postgres (reserve and settle are one each) and a Redis
    command (admit and finish are one each)."""
    import redis.asyncio as aioredis

    conn = await asyncpg.connect(database_url)
    commits = []
    try:
        # A logged table: a temporary one writes no WAL, so its commit costs no fsync.
        await conn.execute("CREATE TABLE IF NOT EXISTS bench_probe (n int)")
        for _ in range(300):
            t = time.perf_counter()
            await conn.execute("INSERT INTO bench_probe VALUES (1)")
            commits.append(time.perf_counter() - t)
    finally:
        await conn.close()
    client = aioredis.from_url(redis_url)
    pings = []
    try:
        for _ in range(300):
            t = time.perf_counter()
            await client.ping()
            pings.append(time.perf_counter() - t)
    finally:
        await client.aclose()
    return (
        f"floor: Postgres commit p50 {ms(pct(commits, 0.5))} ms (p99 {ms(pct(commits, 0.99))}),"
        f" Redis round trip p50 {ms(pct(pings, 0.5))} ms — the whole path makes two of each"
    )


STEPS = (  # (histogram, label selector, short name): steps creditgate times itself
    ("creditgate_ledger_operation_seconds", 'operation="reserve"', "reserve"),
    ("creditgate_ledger_operation_seconds", 'operation="settle"', "settle"),
    ("creditgate_upstream_first_byte_seconds", "", "upstream first byte"),
    ("creditgate_http_request_duration_seconds", 'route="/v1/chat/completions"', "whole request"),
)


async def step_totals(metrics_url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of each step's histogram, from creditgate's /metrics."""
    async with aiohttp.ClientSession() as s, s.get(metrics_url) as resp:
        text = await resp.text()
    totals: dict[str, tuple[float, float]] = {}
    for line in text.splitlines():
        for metric, label, name in STEPS:
            if label not in line or not line.startswith(metric):
                continue
            total, count = totals.get(name, (0.0, 0.0))
            value = float(line.rsplit(" ", 1)[1])
            if line.startswith(metric + "_sum"):
                totals[name] = (total + value, count)
            elif line.startswith(metric + "_count"):
                totals[name] = (total, count + value)
    return totals


def step_means(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> str:
    parts = []
    for _, _, name in STEPS:
        s1, c1 = after.get(name, (0.0, 0.0))
        s0, c0 = before.get(name, (0.0, 0.0))
        if c1 > c0:
            parts.append(f"{name} {ms((s1 - s0) / (c1 - c0))}")
    return ", ".join(parts)


def commit() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


async def main(args: argparse.Namespace) -> None:
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {LOAD_CORE})
    scenarios = [s for s in SCENARIOS if not args.only or any(o in s.name for o in args.only)]
    creditgate = [str(Path(sys.executable).parent / "creditgate")]
    with services() as (pg_base, redis_url), tempfile.TemporaryDirectory() as tmp:
        db_name = f"cg_bench_{uuid.uuid4().hex[:10]}"
        admin = await asyncpg.connect(pg_base)
        await admin.execute(f'CREATE DATABASE "{db_name}"')
        await admin.close()
        database_url = on_database(pg_base, db_name)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            key = await seed(database_url)
            mock_port, cg_port = free_port(), free_port()
            mock = subprocess.Popen(
                pinned(LOAD_CORE, [*creditgate, "mock-upstream", "--port", str(mock_port)]),
                stderr=subprocess.DEVNULL,
            )
            procs.append(mock)
            config = Path(tmp) / "bench.toml"
            config.write_text(
                CONFIG.format(upstream=f"http://127.0.0.1:{mock_port}/v1", model=MODEL)
            )
            env = {
                **os.environ,
                "CREDITGATE_CONFIG": str(config),
                "DATABASE_URL": database_url,
                "REDIS_URL": redis_url,
                "LOG_LEVEL": args.log_level,
            }
            cg = subprocess.Popen(
                pinned(PROXY_CORE, [*creditgate, "serve", "--port", str(cg_port)]),
                env=env,
                stderr=subprocess.DEVNULL,  # JSON logs: formatted (the cost counts), discarded
            )
            procs.append(cg)
            await wait_ready(f"http://127.0.0.1:{mock_port}/v1/models", "mock-upstream", mock)
            await wait_ready(f"http://127.0.0.1:{cg_port}/health", "creditgate", cg)
            targets = [
                Target("direct", f"http://127.0.0.1:{mock_port}/v1/chat/completions"),
                Target(
                    "creditgate",
                    f"http://127.0.0.1:{cg_port}/v1/chat/completions",
                    {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
                    cg.pid,
                ),
            ]
            clk_tck = os.sysconf("SC_CLK_TCK")
            print(f"commit {commit()}, {args.rounds} rounds × {args.seconds:g} s per target")
            print(await floor(database_url, redis_url) + "\n")
            print(HEADER)
            metrics_url = f"http://127.0.0.1:{cg_port}/metrics"
            means = []
            for scenario in scenarios:
                before = await step_totals(metrics_url)
                results = await run_scenario(targets, scenario, args.rounds, args.seconds)
                means.append(
                    f"- {scenario.name}: {step_means(before, await step_totals(metrics_url))}"
                )
                for row in report(scenario, results, "direct", clk_tck):
                    print(row, flush=True)
            print(f"\ncreditgate RSS after the run: {_rss_mb(cg.pid):.0f} MB")
            print("mean ms per step, as creditgate's own histograms record them:")
            print("\n".join(means))
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=10)
            admin = await asyncpg.connect(pg_base)
            await admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
            await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds per scenario")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per target per round")
    parser.add_argument("--only", nargs="*", help="run the scenarios whose name contains these")
    parser.add_argument("--log-level", default="info", help="creditgate's LOG_LEVEL (default info)")
    args = parser.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(main(args))
