"""What creditgate adds to a call, against a bare aiohttp pass-through and LiteLLM Proxy.

    .venv/bin/python bench/proxy_bench.py            # ~5 minutes; prints Markdown tables

One run measures, in interleaved rounds (A B C, C B A, …) so drift on this
shared machine hits every target alike:

* ``direct``      straight to ``creditgate mock-upstream``;
* ``bare``        through ``bench/bare_proxy.py``, a bare aiohttp pass-through
                  (the floor any aiohttp proxy pays; issue 9's baseline);
* ``creditgate``  through ``creditgate serve``, the whole path on: API-key auth,
                  validation, throttle (Redis), ledger reserve + settle
                  (Postgres, durable commits), metrics, one log line a request;
* ``creditgate-seq`` (only when asked: ``--targets … creditgate-seq``) the same
                  server with ``speculative_upstream`` and ``async_reserve``
                  set off — since issue 14 removed both, the same path as
                  ``creditgate`` (the keys are ignored with a warning);
* ``creditgate-budget`` (only when asked) the same ``creditgate`` server,
                  called with a second key of the same account that has a
                  (never reached) daily budget: what the budget check costs
                  (issue 17: it adds no statement, only work inside reserve
                  and settle);
* ``litellm``     through LiteLLM Proxy (one worker, no database), when a
                  ``litellm`` executable is found (``--litellm PATH``; by default
                  ``/tmp/litellm-venv/bin/litellm``). Never a project dependency:
                  ``python3 -m venv /tmp/litellm-venv &&
                  /tmp/litellm-venv/bin/pip install 'litellm[proxy]==1.106.0'``.

Every proxy is one process pinned to core 0 (``taskset``), one at a time under
load; the mock, this load generator (closed loop, aiohttp, uvloop) and the
bench's own ``redis-server`` and PostgreSQL (pgserver, in a temporary
directory, ``fsync`` on) run on core 1 — they are started here, so their CPU
is measurable and no one else's traffic is in it.

Reported per scenario and target: requests/s, the proxy core's busy share and
requests/s per core (1 / proxy CPU per request), latency p50/p99, added p50
vs direct, time to first byte for streams, per-chunk delay for the paced
stream, CPU ms per request of the proxy and of Postgres + Redis; idle and peak
RSS per proxy; creditgate's own step timings; and a verdict per issue-9
target, as a ratio to the bare proxy measured in the same run.

Extending it: a scenario is a ``Scenario`` row, a target a ``Target`` row and a
verdict a ``Goal`` row; the harness does the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
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

import aiohttp
import asyncpg
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from creditgate import ledger, migrations  # noqa: E402
from creditgate.auth import create_api_key  # noqa: E402

PROXY_CORE, LOAD_CORE = 0, 1
MODEL = "bench-model"
CHUNKS = 20
CONFIG = """
[upstreams.main]
base_url = "{upstream}"

[upstreams.claude]
base_url = "{upstream}"
kind = "anthropic"

[models."{model}"]
input_price = 0.15
output_price = 0.60
max_output_tokens = 4096
deployments = [{{ upstream = "main", model = "{model}" }}]

[models."{model}-claude"]
input_price = 0.15
output_price = 0.60
max_output_tokens = 4096
deployments = [{{ upstream = "claude", model = "{model}-claude" }}]

[tiers.free]
requests_per_minute = 100000000
tokens_per_minute = 1000000000
max_parallel = 1000
messages_per_day = 1000000000
"""
SEQUENTIAL = """
[ledger]
async_reserve = false

[proxy]
speculative_upstream = false
"""
LITELLM_CONFIG = """
model_list:
  - model_name: {model}
    litellm_params:
      model: openai/{model}
      api_base: {upstream}
      api_key: bench-not-a-key
litellm_settings:
  telemetry: false
"""


@dataclass(frozen=True)
class Scenario:
    """One kind of call, run at one concurrency against every target."""

    name: str
    stream: bool
    concurrency: int
    chunks: int = CHUNKS  # completion tokens; one SSE event each when streaming
    chunk_delay_ms: int = 0  # the upstream's pace between chunks
    stamp: bool = False  # chunks carry the mock's send time: measures per-chunk delay
    api: str = "chat"  # chat | responses | messages: the route and body called

    @property
    def path(self) -> str:
        """The route, under each target's /v1."""
        return {"chat": "/chat/completions", "responses": "/responses", "messages": "/messages"}[
            self.api
        ]

    def body(self) -> dict[str, Any]:
        mock: dict[str, Any] = {"chunks": self.chunks}
        if self.chunk_delay_ms:
            mock["chunk_delay_ms"] = self.chunk_delay_ms
        if self.stamp:
            mock["stamp"] = True
        prompt = "Say hello to the benchmark."
        body: dict[str, Any]
        if self.api == "responses":
            body = {"model": MODEL, "input": prompt, "max_output_tokens": 64, "mock": mock}
        elif self.api == "messages":
            body = {
                "model": f"{MODEL}-claude",
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 64,
                "mock": mock,
            }
        else:
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 64,
                "mock": mock,
            }
        if self.stream:
            body["stream"] = True
            if self.api == "chat":
                body["stream_options"] = {"include_usage": True}
        return body

    def headers(self) -> dict[str, str]:
        """The same settings as headers: they reach the mock through proxies that
        drop unknown body fields (LiteLLM forwards neither, the mock's defaults apply)."""
        h = {"x-mock-chunks": str(self.chunks)}
        if self.api == "messages":
            h["anthropic-version"] = "2023-06-01"
        if self.chunk_delay_ms:
            h["x-mock-chunk-delay-ms"] = str(self.chunk_delay_ms)
        if self.stamp:
            h["x-mock-stamp"] = "true"
        return h


SCENARIOS = (
    Scenario("json, c=1", stream=False, concurrency=1),
    Scenario("json, c=32", stream=False, concurrency=32),
    Scenario("stream 20 chunks, c=1", stream=True, concurrency=1),
    Scenario("stream 20 chunks, c=32", stream=True, concurrency=32),
    Scenario("stream paced 2 ms, c=1", stream=True, concurrency=1, chunk_delay_ms=2, stamp=True),
    # Issue 18: the Responses API and Anthropic Messages, through the same metered path
    # (LiteLLM is not measured on them: its bench config maps the chat route only).
    Scenario("responses stream 20 chunks, c=1", stream=True, concurrency=1, api="responses"),
    Scenario("responses stream 20 chunks, c=32", stream=True, concurrency=32, api="responses"),
    Scenario("messages stream 20 chunks, c=1", stream=True, concurrency=1, api="messages"),
    Scenario("messages stream 20 chunks, c=32", stream=True, concurrency=32, api="messages"),
)


@dataclass
class Target:
    """Where requests go; ``pid`` (if any) is the proxy process whose CPU is charged to it.

    ``url`` is the chat completions route; other scenarios call their own route
    under the same ``/v1`` (``url_for``)."""

    name: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    pid: int | None = None
    idle_rss_mb: float = float("nan")

    def url_for(self, scenario: Scenario) -> str:
        return self.url.removesuffix("/chat/completions") + scenario.path


@dataclass
class Sample:
    latency: list[float] = field(default_factory=list)  # seconds, request to last byte
    ttfb: list[float] = field(default_factory=list)  # seconds, request to first body bytes
    chunk_delay: list[float] = field(default_factory=list)  # seconds, upstream send → arrival
    errors: int = 0
    elapsed: float = 0.0
    proxy_ticks: int = 0  # the proxy process's CPU, in clock ticks
    backing_ticks: int = 0  # Postgres' and Redis' CPU, in clock ticks


@dataclass(frozen=True)
class Backing:
    """The bench's own Postgres and Redis, whose CPU is charged per request."""

    postmaster: int
    redis: int

    def ticks(self) -> int:
        return _tree_ticks(self.postmaster) + _cpu_ticks(self.redis)


# ---------------------------------------------------------------- load


async def one_call(
    session: aiohttp.ClientSession,
    target: Target,
    payload: bytes,
    headers: dict[str, str],
    scenario: Scenario,
    s: Sample,
) -> None:
    started = time.perf_counter()
    async with session.post(target.url_for(scenario), data=payload, headers=headers) as resp:
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
                    with contextlib.suppress(ValueError):
                        yield arrived - float(content)


async def run_batch(
    session: aiohttp.ClientSession,
    target: Target,
    scenario: Scenario,
    seconds: float,
    s: Sample,
    backing: Backing,
) -> None:
    payload = orjson.dumps(scenario.body())
    headers = {**target.headers, **scenario.headers(), "Content-Type": "application/json"}
    stop = time.perf_counter() + seconds
    proxy_before, backing_before = _cpu_ticks(target.pid), backing.ticks()

    async def worker() -> None:
        while time.perf_counter() < stop:
            try:
                await one_call(session, target, payload, headers, scenario, s)
            except aiohttp.ClientError:
                s.errors += 1
                await asyncio.sleep(0.01)  # a refused connection must not spin

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(scenario.concurrency)))
    s.elapsed += time.perf_counter() - started
    s.proxy_ticks += _cpu_ticks(target.pid) - proxy_before
    s.backing_ticks += backing.ticks() - backing_before


def _stat_fields(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _cpu_ticks(pid: int | None) -> int:
    """utime + stime (fields 14 and 15 of /proc/<pid>/stat): every thread of the process."""
    if pid is None:
        return 0
    try:
        fields = _stat_fields(pid)
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def _tree_ticks(root: int) -> int:
    """CPU of a process, its live children, and its children already reaped (cutime +
    cstime): Postgres' postmaster and its backends, checkpointer, WAL writer, …"""
    try:
        fields = _stat_fields(root)
    except OSError:
        return 0
    total = sum(int(fields[i]) for i in (11, 12, 13, 14))
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            child = _stat_fields(int(entry.name))
            if int(child[1]) == root:  # field 4: the parent's pid
                total += int(child[11]) + int(child[12])
    return total


def _rss_mb(pid: int, field_name: str = "VmRSS") -> float:
    """Resident memory in MB: VmRSS now, or VmHWM (the peak since the process started)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def run_scenario(
    targets: list[Target], scenario: Scenario, rounds: int, seconds: float, backing: Backing
) -> dict[str, Sample]:
    if scenario.api != "chat":
        targets = [t for t in targets if t.name != "litellm"]
    results = {t.name: Sample() for t in targets}
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        for t in targets:  # warm up connections, caches and the JIT-less rest
            await run_batch(session, t, scenario, min(1.0, seconds), Sample(), backing)
        for r in range(rounds):
            order = targets if r % 2 == 0 else list(reversed(targets))  # A B C, C B A, …
            for t in order:
                await run_batch(session, t, scenario, seconds, results[t.name], backing)
    return results


# ---------------------------------------------------------------- report


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


@dataclass
class Row:
    """One scenario × target, summarised (also what ``--json`` writes)."""

    scenario: str
    target: str
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    added_p50_ms: float | None
    ttfb_p50_ms: float | None
    added_ttfb_p50_ms: float | None
    chunk_delay_ms: tuple[float, float, float] | None  # p50, p99, max
    proxy_cpu_ms: float | None  # per request
    proxy_busy: float | None  # share of its core
    backing_cpu_ms: float  # Postgres + Redis, per request

    @property
    def rps_per_core(self) -> float | None:
        """Requests/s one fully used core would serve at this CPU cost per request."""
        return 1000 / self.proxy_cpu_ms if self.proxy_cpu_ms else None


def summarise(
    scenario: Scenario, results: dict[str, Sample], targets: list[Target], clk_tck: int
) -> list[Row]:
    base = results["direct"]
    rows = []
    for t in targets:
        if t.name not in results:
            continue  # not measured on this scenario (LiteLLM on the non-chat routes)
        s = results[t.name]
        n = len(s.latency)
        direct = t.name == "direct"
        cpu = s.proxy_ticks / clk_tck / n * 1000 if n and t.pid is not None else None
        rows.append(
            Row(
                scenario=scenario.name,
                target=t.name,
                requests=n,
                errors=s.errors,
                rps=n / s.elapsed if s.elapsed else 0.0,
                p50_ms=pct(s.latency, 0.5) * 1000,
                p99_ms=pct(s.latency, 0.99) * 1000,
                added_p50_ms=None
                if direct
                else (pct(s.latency, 0.5) - pct(base.latency, 0.5)) * 1000,
                ttfb_p50_ms=pct(s.ttfb, 0.5) * 1000 if scenario.stream else None,
                added_ttfb_p50_ms=(pct(s.ttfb, 0.5) - pct(base.ttfb, 0.5)) * 1000
                if scenario.stream and not direct
                else None,
                chunk_delay_ms=(
                    statistics.median(s.chunk_delay) * 1000,
                    pct(s.chunk_delay, 0.99) * 1000,
                    max(s.chunk_delay) * 1000,
                )
                if s.chunk_delay
                else None,
                proxy_cpu_ms=cpu,
                proxy_busy=s.proxy_ticks / clk_tck / s.elapsed
                if s.elapsed and t.pid is not None
                else None,
                backing_cpu_ms=s.backing_ticks / clk_tck / n * 1000 if n else float("nan"),
            )
        )
    return rows


def _f(value: float | None, digits: int = 2, sign: bool = False) -> str:
    if value is None or value != value:  # None or NaN
        return ""
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


HEADER = (
    "| scenario | target | req/s | proxy core busy | req/s per core | p50 ms | p99 ms "
    "| added p50 | TTFB p50 ms (added) | chunk delay p50/p99/max ms | proxy CPU ms/req "
    "| PG + Redis CPU ms/req | errors |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def table_row(r: Row) -> str:
    ttfb = ""
    if r.ttfb_p50_ms is not None:
        ttfb = _f(r.ttfb_p50_ms)
        if r.added_ttfb_p50_ms is not None:
            ttfb += f" ({_f(r.added_ttfb_p50_ms, sign=True)})"
    delay = " / ".join(_f(v) for v in r.chunk_delay_ms) if r.chunk_delay_ms else ""
    cells = [
        r.scenario,
        r.target,
        f"{r.rps:.0f}",
        f"{r.proxy_busy:.0%}" if r.proxy_busy is not None else "",
        f"{r.rps_per_core:.0f}" if r.rps_per_core else "",
        _f(r.p50_ms),
        _f(r.p99_ms),
        _f(r.added_p50_ms, sign=True),
        ttfb,
        delay,
        _f(r.proxy_cpu_ms, 3),
        _f(r.backing_cpu_ms, 3) if r.target.startswith("creditgate") else "",
        str(r.errors),
    ]
    return "| " + " | ".join(cells) + " |"


@dataclass(frozen=True)
class Goal:
    """One of issue 9's targets: creditgate's figure against the bare proxy's, as a ratio.

    The issue's absolute numbers (creditgate target / bare proxy on the issue's
    machine) give the ratio; ``higher`` says which way is better.
    """

    name: str
    scenario: str
    metric: str  # a Row attribute
    issue_target: float
    issue_bare: float
    higher: bool = False

    @property
    def ratio(self) -> float:
        return self.issue_target / self.issue_bare


GOALS = (
    Goal("added p50, non-streaming, c=1", "json, c=1", "added_p50_ms", 1.0, 0.1),
    Goal("added p50, streaming, c=1", "stream 20 chunks, c=1", "added_p50_ms", 1.5, 0.16),
    Goal("proxy CPU per request, non-streaming", "json, c=1", "proxy_cpu_ms", 0.8, 0.1),
    Goal(
        "requests/s per core, non-streaming, c=32", "json, c=32", "rps_per_core", 1200, 8700, True
    ),
    Goal("streams/s per core, c=32", "stream 20 chunks, c=32", "rps_per_core", 800, 2800, True),
)
IDLE_RSS_TARGET_MB = 120


def verdicts(rows: list[Row], targets: list[Target]) -> list[str]:
    by = {(r.scenario, r.target): r for r in rows}
    out = [
        "| target (issue 9) | bare | creditgate | litellm | creditgate / bare | allowed"
        " | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in GOALS:
        vals = {}
        for name in ("bare", "creditgate", "litellm"):
            row = by.get((g.scenario, name))
            vals[name] = getattr(row, g.metric) if row is not None else None
        bare, cg = vals["bare"], vals["creditgate"]
        if bare is None or cg is None or bare <= 0:
            out.append(f"| {g.name} | {_f(bare)} | {_f(cg)} | {_f(vals['litellm'])} | | | n/a |")
            continue
        ratio = cg / bare
        met = ratio >= g.ratio if g.higher else ratio <= g.ratio
        bound = f"{'≥' if g.higher else '≤'} {g.ratio:.3g}×"
        digits = 0 if g.higher else 3
        out.append(
            f"| {g.name} | {_f(bare, digits)} | {_f(cg, digits)} | {_f(vals['litellm'], digits)}"
            f" | {ratio:.3g}× | {bound} | {'met' if met else 'NOT met'} |"
        )
    cg_target = next((t for t in targets if t.name == "creditgate"), None)
    if cg_target is not None:
        idle = cg_target.idle_rss_mb
        met = idle <= IDLE_RSS_TARGET_MB
        bare_t = next((t for t in targets if t.name == "bare"), None)
        lite = next((t for t in targets if t.name == "litellm"), None)
        out.append(
            f"| idle RSS per worker, MB | {_f(bare_t.idle_rss_mb, 0) if bare_t else ''}"
            f" | {idle:.0f} | {_f(lite.idle_rss_mb, 0) if lite else ''} | |"
            f" ≤ {IDLE_RSS_TARGET_MB} MB | {'met' if met else 'NOT met'} |"
        )
    return out


# ---------------------------------------------------------------- set-up


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(core: int, argv: list[str]) -> list[str]:
    taskset = shutil.which("taskset")
    return [taskset, "-c", str(core), *argv] if taskset else argv


async def wait_ready(
    url: str, what: str, proc: subprocess.Popen[bytes], timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
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
            await asyncio.sleep(0.2)


@contextlib.contextmanager
def services(data: Path) -> Iterator[tuple[str, str, Backing]]:
    """The bench's own Postgres (pgserver, fsync on) and redis-server, on core 1.

    Both inherit this process's affinity (set to the load core first)."""
    from creditgate.embedded import EmbeddedPostgres

    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise SystemExit("redis-server is required (apt-get install redis-server)")
    pg = EmbeddedPostgres(data)
    redis_port = free_port()
    redis = subprocess.Popen(
        [
            redis_server,
            "--port", str(redis_port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(data),
        ],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", redis_port)):
                break
            if time.monotonic() > deadline or redis.poll() is not None:
                raise SystemExit("redis-server did not start")
            time.sleep(0.05)
        yield pg.url, f"redis://127.0.0.1:{redis_port}/0", Backing(pg._server.get_pid(), redis.pid)
    finally:
        redis.terminate()
        redis.wait(timeout=10)
        pg.stop()


async def seed(database_url: str) -> tuple[str, str]:
    """Migrate, create an account with plenty of credits; return its API key and
    a second key of it with a daily budget the bench never reaches."""
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
        plain = await create_api_key(conn, account.id, "bench")
        capped = await create_api_key(
            conn,
            account.id,
            "bench-budget",
            budget=100_000 * ledger.money.MICROS_PER_CREDIT,
            budget_period="day",
        )
        return plain.key, capped.key
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
        backend = await conn.fetchval("SELECT pg_backend_pid()")
        ticks = _cpu_ticks(backend)
        for _ in range(1000):
            t = time.perf_counter()
            await conn.execute("INSERT INTO bench_probe VALUES (1)")
            commits.append(time.perf_counter() - t)
        commit_cpu = (_cpu_ticks(backend) - ticks) / os.sysconf("SC_CLK_TCK") / 1000 * 1000
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
        f"floor: Postgres commit p50 {ms(pct(commits, 0.5))} ms (p99 {ms(pct(commits, 0.99))},"
        f" {commit_cpu:.3f} ms of its backend's CPU),"
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


def litellm_version(exe: str) -> str:
    python = Path(exe).parent / "python"
    out = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() or "unknown"


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


async def main(args: argparse.Namespace) -> None:
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {LOAD_CORE})  # and so Postgres, Redis, the mock
    scenarios = [s for s in SCENARIOS if not args.only or any(o in s.name for o in args.only)]
    wanted = set(args.targets)
    creditgate = [str(Path(sys.executable).parent / "creditgate")]
    litellm = args.litellm if args.litellm and Path(args.litellm).exists() else None
    if "litellm" not in wanted:
        litellm = None
    elif litellm is None:
        print(f"(no LiteLLM at {args.litellm}: its column is left out)")
        wanted.discard("litellm")
    with (
        tempfile.TemporaryDirectory(prefix="cg-bench-") as tmp,
        services(Path(tmp)) as (
            pg_url,
            redis_url,
            backing,
        ),
    ):
        procs: list[subprocess.Popen[bytes]] = []
        try:
            key, budget_key = await seed(pg_url)
            mock_port, cg_port, bare_port, lite_port = (free_port() for _ in range(4))
            mock = subprocess.Popen(
                pinned(
                    LOAD_CORE,
                    [*creditgate, "mock-upstream", "--port", str(mock_port), "--chunks", "20"],
                ),
                stderr=subprocess.DEVNULL,
            )
            procs.append(mock)
            upstream = f"http://127.0.0.1:{mock_port}/v1"
            await wait_ready(f"{upstream}/models", "mock-upstream", mock)
            targets = [Target("direct", f"{upstream}/chat/completions")]
            if "bare" in wanted:
                bare = subprocess.Popen(
                    pinned(
                        PROXY_CORE,
                        [
                            sys.executable,
                            str(ROOT / "bench" / "bare_proxy.py"),
                            "--port",
                            str(bare_port),
                            "--upstream",
                            upstream,
                        ],
                    )
                )
                procs.append(bare)
                await wait_ready(f"http://127.0.0.1:{bare_port}/health", "bare proxy", bare)
                targets.append(
                    Target(
                        "bare", f"http://127.0.0.1:{bare_port}/v1/chat/completions", pid=bare.pid
                    )
                )
            # creditgate-seq: the same server with speculation and unflushed
            # reserves set off; issue 14 removed both, so it now runs the same
            # path as creditgate (kept to re-run the older tables' commands).
            for name, extra in (
                ("creditgate", ""),
                ("creditgate-seq", SEQUENTIAL),
            ):
                if name not in wanted:
                    continue
                port = cg_port if name == "creditgate" else free_port()
                config = Path(tmp) / f"{name}.toml"
                config.write_text(CONFIG.format(upstream=upstream, model=MODEL) + extra)
                env = {
                    **os.environ,
                    "CREDITGATE_CONFIG": str(config),
                    "DATABASE_URL": pg_url,
                    "REDIS_URL": redis_url,
                    "LOG_LEVEL": args.log_level,
                }
                cg = subprocess.Popen(
                    pinned(PROXY_CORE, [*creditgate, "serve", "--port", str(port)]),
                    env=env,
                    stderr=subprocess.DEVNULL,  # JSON logs: formatted (the cost counts), discarded
                )
                procs.append(cg)
                await wait_ready(f"http://127.0.0.1:{port}/health", name, cg)
                targets.append(
                    Target(
                        name,
                        f"http://127.0.0.1:{port}/v1/chat/completions",
                        {"Authorization": f"Bearer {key}"},
                        cg.pid,
                    )
                )
                if name == "creditgate" and "creditgate-budget" in wanted:
                    # The same server and account, a key with a budget: the
                    # difference is the budget check alone.
                    targets.append(
                        Target(
                            "creditgate-budget",
                            f"http://127.0.0.1:{port}/v1/chat/completions",
                            {"Authorization": f"Bearer {budget_key}"},
                            cg.pid,
                        )
                    )
            if litellm is not None:
                lite_config = Path(tmp) / "litellm.yaml"
                lite_config.write_text(LITELLM_CONFIG.format(upstream=upstream, model=MODEL))
                lite_env = {
                    k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")
                }
                lite_env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
                # It refuses to start without one; with no database it checks it per request.
                lite_key = "sk-bench-" + uuid.uuid4().hex
                lite_env["LITELLM_MASTER_KEY"] = lite_key
                lite = subprocess.Popen(
                    pinned(
                        PROXY_CORE,
                        [
                            litellm,
                            "--config",
                            str(lite_config),
                            "--port",
                            str(lite_port),
                            "--host",
                            "127.0.0.1",
                            "--num_workers",
                            "1",
                        ],
                    ),
                    env=lite_env,
                    cwd=tmp,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                procs.append(lite)
                await wait_ready(
                    f"http://127.0.0.1:{lite_port}/health/liveliness", "litellm", lite, 120
                )
                targets.append(
                    Target(
                        "litellm",
                        f"http://127.0.0.1:{lite_port}/v1/chat/completions",
                        {"Authorization": f"Bearer {lite_key}"},
                        _server_pid(lite.pid),
                    )
                )
            await asyncio.sleep(1.0)  # let start-up work settle before idle RSS
            for t in targets:
                if t.pid is not None:
                    t.idle_rss_mb = _rss_mb(t.pid)
            clk_tck = os.sysconf("SC_CLK_TCK")
            print(f"commit {commit()}, {args.rounds} rounds × {args.seconds:g} s per target")
            print(f"load average at start: {loadavg()}")
            if litellm is not None:
                print(f"LiteLLM {litellm_version(litellm)}")
            print(await floor(pg_url, redis_url) + "\n")
            print(HEADER, flush=True)
            metrics_url = f"http://127.0.0.1:{cg_port}/metrics"
            has_cg = any(t.name == "creditgate" for t in targets)
            means, rows, loads = [], [], [loadavg()]
            for scenario in scenarios:
                before = await step_totals(metrics_url) if has_cg else {}
                results = await run_scenario(targets, scenario, args.rounds, args.seconds, backing)
                if has_cg:
                    after = await step_totals(metrics_url)
                    means.append(f"- {scenario.name}: {step_means(before, after)}")
                for row in summarise(scenario, results, targets, clk_tck):
                    rows.append(row)
                    print(table_row(row), flush=True)
                loads.append(loadavg())
            print("\n| proxy | idle RSS MB | peak RSS MB |\n|---|---|---|")
            for t in targets:
                if t.pid is not None:
                    peak = _rss_mb(t.pid, "VmHWM")
                    print(f"| {t.name} | {t.idle_rss_mb:.0f} | {peak:.0f} |")
            print()
            print("\n".join(verdicts(rows, targets)))
            print(f"\nload average after each scenario: {' → '.join(loads)}")
            if means:
                print("mean ms per step, as creditgate's own histograms record them:")
                print("\n".join(means))
            if args.json:
                Path(args.json).write_text(
                    json.dumps(
                        {
                            "commit": commit(),
                            "load": loads,
                            "rows": [r.__dict__ for r in rows],
                            "rss": {t.name: t.idle_rss_mb for t in targets},
                        },
                        indent=1,
                    )
                )
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()


def _server_pid(pid: int) -> int:
    """The process that serves: LiteLLM's CLI runs uvicorn in-process, but if it
    forked a single child, that child is the one to measure."""
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        children = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError):
                    if int(_stat_fields(int(entry.name))[1]) == pid:
                        children.append(int(entry.name))
        if len(children) == 1 and _rss_mb(children[0]) > _rss_mb(pid):
            return children[0]
        time.sleep(0.2)
    return pid


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds per scenario")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per target per round")
    parser.add_argument("--only", nargs="*", help="run the scenarios whose name contains these")
    parser.add_argument(
        "--targets",
        nargs="*",
        default=["bare", "creditgate", "litellm"],
        help="proxies to measure besides direct (default: bare creditgate litellm)",
    )
    parser.add_argument(
        "--litellm",
        default="/tmp/litellm-venv/bin/litellm",
        help="the litellm executable of a separate venv (its column is skipped if absent)",
    )
    parser.add_argument("--log-level", default="info", help="creditgate's LOG_LEVEL (default info)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(main(args))
