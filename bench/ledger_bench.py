"""Ledger benchmark: reserve+settle pairs per second, and the latency of each.

Scenarios (issue 3):
  a  1,000 accounts, each pair on a random one (accounts do not contend)
  b  one hot account, every pair on it (all pairs serialise on its balance row)

It creates a database of its own on the given server (``cg_bench_<random>``),
applies the migrations, funds the accounts, runs each scenario for a fixed
time with N concurrent workers calling the real ``creditgate.ledger``
functions through one asyncpg pool (as one server process would) — by default
through ``GroupCommit`` as the server does, or one statement per call with
``--mode single`` — and drops the database at the end. Results: one JSON
object per scenario on stdout.

    python bench/ledger_bench.py --database-url postgresql://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import statistics
import sys
import time
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from creditgate import ledger, migrations
from creditgate.ledger.group_commit import GroupCommit
from creditgate.ledger.ids import time_ordered_id

HOLD = 50_000  # µc reserved per call (a worst case)
COST = 12_345  # µc actually charged
# With --breakdown: the tokens by kind a settle records (migration 0012), as a
# cached, reasoning call's would be.
BREAKDOWN = (("input", 100), ("output", 20), ("cached_input", 80), ("reasoning", 12))


def _database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def _proc_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) the given local processes have used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # not local, or gone
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


async def _backend_pids(pool: asyncpg.Pool, n: int) -> list[int]:
    """The server processes behind the pool's connections (Postgres on this machine)."""
    conns = [await pool.acquire() for _ in range(n)]
    try:
        return [await c.fetchval("SELECT pg_backend_pid()") for c in conns]
    finally:
        for c in conns:
            await pool.release(c)


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))] * 1000


async def _fund(pool: asyncpg.Pool, n: int) -> list[uuid.UUID]:
    ids = []
    for i in range(n):
        account = await ledger.ensure_account(pool, "user", f"bench_{i}")
        await ledger.post_entry(
            pool,
            account_id=account.id,
            amount=10**14,
            kind="grant",
            idempotency_key=f"bench:{i}",
            reason="benchmark credits",
        )
        ids.append(account.id)
    return ids


class _Single:
    """The plain one-statement calls, each on its own pooled connection."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def reserve(self, **kw: Any) -> ledger.Hold:
        return await ledger.reserve_hold(self._pool, **kw)

    async def settle(self, hold_id: uuid.UUID, usage: ledger.Usage) -> ledger.Settlement:
        return await ledger.settle_hold(self._pool, hold_id, usage)


async def _budgeted_keys(pool: asyncpg.Pool, accounts: list[uuid.UUID]) -> dict[uuid.UUID, Any]:
    """An API key per account with a monthly budget the run never reaches (issue 17)."""
    from creditgate.auth import create_api_key

    keys = {}
    for account_id in accounts:
        key = await create_api_key(
            pool, account_id, "bench", budget=10**14, budget_period="month", max_live=10**6
        )
        keys[account_id] = key.id
    return keys


async def _scenario(
    pool: asyncpg.Pool,
    api: Any,
    accounts: list[uuid.UUID],
    workers: int,
    seconds: float,
    warmup: float,
    breakdown: bool = False,
    keys: dict[uuid.UUID, Any] | None = None,
) -> dict[str, Any]:
    usage = ledger.Usage(100, 20, COST, breakdown=BREAKDOWN if breakdown else None)
    reserve_s: list[float] = []
    settle_s: list[float] = []
    measuring = False
    stop_at = time.perf_counter() + warmup + seconds

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            account = random.choice(accounts)
            t0 = time.perf_counter()
            hold = await api.reserve(
                hold_id=time_ordered_id(),
                account_id=account,
                amount=HOLD,
                ttl_seconds=600,
                key_id=keys.get(account) if keys else None,
            )
            t1 = time.perf_counter()
            await api.settle(hold.id, usage)
            t2 = time.perf_counter()
            if measuring:
                reserve_s.append(t1 - t0)
                settle_s.append(t2 - t1)

    backends = await _backend_pids(pool, pool.get_max_size())
    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    await asyncio.sleep(warmup)
    measuring = True
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    server0 = _proc_cpu(backends)
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    server_cpu = _proc_cpu(backends) - server0
    client_cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    pairs = len(settle_s)
    return {
        "pairs": pairs,
        "seconds": round(elapsed, 2),
        "pairs_per_s": round(pairs / elapsed),
        "reserve_p50_ms": round(_pct(reserve_s, 0.50), 2),
        "reserve_p99_ms": round(_pct(reserve_s, 0.99), 2),
        "settle_p50_ms": round(_pct(settle_s, 0.50), 2),
        "settle_p99_ms": round(_pct(settle_s, 0.99), 2),
        "reserve_mean_ms": round(statistics.fmean(reserve_s) * 1000, 2),
        "settle_mean_ms": round(statistics.fmean(settle_s) * 1000, 2),
        # Share of one core this client process used: the rest of the machine's
        # two cores went to Postgres (and to whatever else shares the machine).
        "client_cpu_cores": round(client_cpu / elapsed, 2),
        # CPU per pair, measured, not inferred: this process, and the Postgres
        # backends serving its connections (read from /proc; 0 if not local).
        "client_cpu_us_per_pair": round(client_cpu / pairs * 1e6),
        "server_cpu_us_per_pair": round(server_cpu / pairs * 1e6),
    }


async def main(args: argparse.Namespace) -> int:
    name = f"cg_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(args.database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = _database(args.database_url, name)
    try:
        conn = await asyncpg.connect(url)
        try:
            await migrations.migrate(conn)
        finally:
            await conn.close()
        # A server process's pool: min 1, max 20 (http/app.py).
        size = args.pool_size
        pool = await asyncpg.create_pool(url, min_size=size, max_size=size)
        try:
            api = GroupCommit(pool, lanes=args.lanes) if args.mode == "group" else _Single(pool)
            for scenario in args.scenario:
                n = args.accounts if scenario == "a" else 1
                accounts = await _fund(pool, n)
                if args.low_balance_threshold is not None:
                    # Armed, but far below the balance: the crossing trigger's
                    # WHEN clause is evaluated on every update and never fires.
                    micros = ledger.credits_to_micros(args.low_balance_threshold)
                    for account_id in accounts:
                        await ledger.set_low_balance_threshold(pool, account_id, micros)
                keys = await _budgeted_keys(pool, accounts) if args.key_budget else None
                result = await _scenario(
                    pool,
                    api,
                    accounts,
                    args.workers,
                    args.seconds,
                    args.warmup,
                    args.breakdown,
                    keys,
                )
                out = {
                    "scenario": scenario,
                    "mode": args.mode,
                    "key_budget": args.key_budget,
                    "low_balance_threshold": args.low_balance_threshold,
                    "breakdown": args.breakdown,
                    "accounts": n,
                    "workers": args.workers,
                    "pool": size,
                    **result,
                }
                if args.verify:
                    out["verify_ok"] = (await ledger.verify_ledger(pool)).ok
                print(json.dumps(out), flush=True)
        finally:
            await pool.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    return 0


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--database-url",
        default=os.environ.get(
            "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="a server to create the benchmark's own database on",
    )
    p.add_argument("--scenario", nargs="+", choices=["a", "b"], default=["a", "b"])
    p.add_argument("--accounts", type=int, default=1000, help="accounts of scenario a")
    p.add_argument(
        "--mode",
        choices=["group", "single"],
        default="group",
        help="group: through GroupCommit, as the server does; single: one statement per call",
    )
    p.add_argument("--workers", type=int, default=64, help="concurrent reserve+settle callers")
    p.add_argument("--pool-size", type=int, default=20, help="connections (the server's max)")
    p.add_argument("--lanes", type=int, default=2, help="GroupCommit batches in flight per kind")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--verify", action="store_true", help="run verify_ledger after each scenario")
    p.add_argument(
        "--breakdown", action="store_true", help="settle with tokens by kind (migration 0012)"
    )
    p.add_argument(
        "--key-budget",
        action="store_true",
        help="reserve with an API key per account that has a (never reached) budget",
    )
    p.add_argument(
        "--low-balance-threshold",
        help="set every account's low-balance threshold (credits) below its balance",
    )
    return p.parse_args(argv)


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    sys.exit(asyncio.run(main(_args())))
