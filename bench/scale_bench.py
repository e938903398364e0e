"""Ledger at scale (issue 19): reserve/settle against an empty vs a 10M-entry ledger.

Not a test: a measurement, printed as one JSON object per phase on stdout.

1. A database of its own (``cg_scale_<random>``), migrated; 1,000 funded
   accounts.
2. **empty**: reserve + settle pairs through ``GroupCommit`` (the server's
   path): one caller (latency), then ``--workers`` callers for
   ``--seconds`` (throughput, CPU per pair, WAL bytes per pair from
   ``pg_current_wal_lsn()`` — minus the WAL the rest of the machine wrote in
   an equal idle window just before, since the LSN is the whole server's).
3. **generate**: ``--entries`` ledger entries written in SQL
   (``generate_series``): for each account a run of settled holds and their
   debits, with a correct running balance, spread over the past
   ``--days`` days, with time-ordered ids as the server makes them
   (ledger/ids.py); the user triggers are off during the bulk load (for
   speed; they are put back, and a full ``verify`` checks the result), and
   the indexes are rebuilt after it to the shape right-most appends give.
4. ``verify --full`` on the whole ledger (its time), which also writes the
   checkpoint.
5. **loaded**: step 2 again, against the big ledger.
6. ``--new`` more pairs, then an incremental ``verify``: its wall time and
   its Postgres backend's CPU time.

The database is dropped at the end (``--keep`` keeps it). ``--compare DB``
only measures reserve/settle on a fresh empty ledger against the kept one,
in alternating rounds (a fairer comparison on a shared machine).

    .venv/bin/python bench/scale_bench.py --keep
    .venv/bin/python bench/scale_bench.py --compare cg_scale_<id> --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import statistics
import sys
import time
import uuid
from typing import Any

import asyncpg
from ledger_bench import _backend_pids, _database, _fund, _pct, _proc_cpu

from creditgate import ledger, migrations
from creditgate.ledger.group_commit import GroupCommit
from creditgate.ledger.ids import time_ordered_id

# Connections are never replaced (asyncpg closes one after 50,000 queries or
# 300 s idle by default): the per-pair Postgres CPU is read from the
# backends' /proc counters, which a replaced backend would take with it.
_POOL: dict[str, Any] = {"max_inactive_connection_lifetime": 0, "max_queries": 2**62}
HOLD = 50_000  # µc reserved per call
COST = 12_345  # µc charged per call


async def _pairs(
    pool: asyncpg.Pool, api: GroupCommit, accounts: list[uuid.UUID], workers: int, seconds: float
) -> dict[str, Any]:
    reserve_s: list[float] = []
    settle_s: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            account = random.choice(accounts)
            t0 = time.perf_counter()
            hold = await api.reserve(
                hold_id=time_ordered_id(), account_id=account, amount=HOLD, ttl_seconds=600
            )
            t1 = time.perf_counter()
            await api.settle(hold.id, ledger.Usage(100, 20, COST))
            reserve_s.append(t1 - t0)
            settle_s.append(time.perf_counter() - t1)

    backends = await _backend_pids(pool, pool.get_max_size())
    lsn0 = await pool.fetchval("SELECT pg_current_wal_lsn()")
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    server0 = _proc_cpu(backends)
    await asyncio.gather(*(worker() for _ in range(workers)))
    elapsed = time.perf_counter() - t0
    server_cpu = _proc_cpu(backends) - server0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    wal = await pool.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1)", lsn0)
    client_cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    n = len(settle_s)
    return {
        "workers": workers,
        "pairs": n,
        "pairs_per_s": round(n / elapsed),
        "reserve_p50_ms": round(_pct(reserve_s, 0.50), 3),
        "reserve_p99_ms": round(_pct(reserve_s, 0.99), 3),
        "settle_p50_ms": round(_pct(settle_s, 0.50), 3),
        "settle_p99_ms": round(_pct(settle_s, 0.99), 3),
        "reserve_mean_ms": round(statistics.fmean(reserve_s) * 1000, 3),
        "settle_mean_ms": round(statistics.fmean(settle_s) * 1000, 3),
        "client_cpu_us_per_pair": round(client_cpu / n * 1e6),
        "pg_cpu_us_per_pair": round(server_cpu / n * 1e6),
        "wal_bytes": int(wal),
        "seconds": round(elapsed, 2),
    }


async def _background_wal(pool: asyncpg.Pool, seconds: float) -> int:
    """WAL the rest of the server writes while this bench idles (others' jobs)."""
    lsn0 = await pool.fetchval("SELECT pg_current_wal_lsn()")
    await asyncio.sleep(seconds)
    return int(await pool.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1)", lsn0))


async def _measure(
    pool: asyncpg.Pool, accounts: list[uuid.UUID], args: argparse.Namespace, phase: str
) -> None:
    api = GroupCommit(pool, lanes=2)
    await _pairs(pool, api, accounts, 4, 2.0)  # warm-up (caches, plans)
    one = await _pairs(pool, api, accounts, 1, args.seconds)
    idle = await _background_wal(pool, args.seconds)
    many = await _pairs(pool, api, accounts, args.workers, args.seconds)
    entries = await pool.fetchval("SELECT count(*) FROM ledger_entries")
    own_wal = max(0, many["wal_bytes"] - idle)
    print(
        json.dumps(
            {
                "phase": phase,
                "entries_before": entries,
                "one_caller": one,
                "concurrent": many,
                "background_wal_bytes_same_window": idle,
                "wal_bytes_per_pair": round(own_wal / many["pairs"]),
            }
        ),
        flush=True,
    )


async def _generate(
    pool: asyncpg.Pool, accounts: list[uuid.UUID], total: int, days: int, batch: int
) -> dict[str, Any]:
    per = total // len(accounts)
    t0 = time.perf_counter()
    async with pool.acquire() as conn:
        # The months of the generated history (migrate made this one and later).
        await conn.execute(
            "SELECT creditgate_ledger_partition(m) FROM generate_series("
            " now() - make_interval(days => $1), now(), interval '1 month') AS m",
            days + 31,
        )
        # The server's ids are time-ordered (ledger/ids.py): so are the
        # history's, made from each row's own time (UUIDv7 layout: 48 bits of
        # milliseconds, version 7, variant 10, the rest from a seed).
        await conn.execute(
            """
            CREATE FUNCTION pg_temp.uuid7_at(ts timestamptz, seed uuid) RETURNS uuid
            LANGUAGE sql IMMUTABLE AS $$
            SELECT encode(set_byte(set_byte(
                overlay(uuid_send(seed) PLACING
                        substring(int8send(floor(extract(epoch FROM ts) * 1000)::bigint) FROM 3)
                        FROM 1 FOR 6),
                6, (get_byte(uuid_send(seed), 6) & 15) | 112),
                8, (get_byte(uuid_send(seed), 8) & 63) | 128), 'hex')::uuid
            $$
            """
        )
        # Bulk load only (this scratch database): triggers off for speed; every
        # row written is what the triggers would have let through, and a full
        # verify checks the whole result below.
        await conn.execute("ALTER TABLE ledger_entries DISABLE TRIGGER USER")
        await conn.execute("ALTER TABLE holds DISABLE TRIGGER USER")
        try:
            for start in range(0, len(accounts), batch):
                ids = accounts[start : start + batch]
                async with conn.transaction():
                    # Per account, calls k = 1..per at increasing times: a hold
                    # settled by its debit; the debit's running balance follows.
                    await conn.execute(
                        """
                        INSERT INTO holds (id, account_id, amount, request_id, model,
                                           created_at, expires_at, outcome, ended_at)
                        SELECT pg_temp.uuid7_at(t, md5(a.id::text || ':' || k)::uuid), a.id, $3,
                               'gen-' || k,
                               'mock-model', t, t + interval '10 minutes', 'settled',
                               t + interval '1 second'
                        FROM unnest($1::uuid[]) AS a(id), generate_series(1, $2) AS k,
                             LATERAL (SELECT now() - make_interval(days => $4)
                                      + (k::float8 / $2) * make_interval(days => $4) AS t) ts
                        """,
                        ids,
                        per,
                        HOLD,
                        days,
                    )
                    # Each entry with its key row (migration 0017), same created_at.
                    await conn.execute(
                        """
                        WITH e AS (
                        INSERT INTO ledger_entries (id, account_id, kind, amount, idempotency_key,
                            fingerprint, hold_id, request_id, model, input_tokens, output_tokens,
                            balance_after, created_at)
                        SELECT pg_temp.uuid7_at(t + interval '1 second',
                                                md5('entry:' || a.id::text || ':' || k)::uuid),
                               a.id, 'debit', -$3::bigint,
                               'hold:' || h.id::text, '\\x00'::bytea,
                               h.id, 'gen-' || k, 'mock-model',
                               100, 20, b.balance - k * $3::bigint, t + interval '1 second'
                        FROM unnest($1::uuid[]) WITH ORDINALITY AS a(id, n)
                        JOIN account_balances b ON b.account_id = a.id,
                             generate_series(1, $2) AS k,
                             LATERAL (SELECT now() - make_interval(days => $4)
                                      + (k::float8 / $2) * make_interval(days => $4) AS t) ts,
                             LATERAL (SELECT pg_temp.uuid7_at(t, md5(a.id::text || ':' || k)::uuid)
                                      AS id) h
                        ORDER BY a.n, k
                        RETURNING id, idempotency_key, hold_id, created_at
                        )
                        INSERT INTO ledger_entry_keys (id, idempotency_key, hold_id, created_at)
                        SELECT id, idempotency_key, hold_id, created_at FROM e
                        """,
                        ids,
                        per,
                        COST,
                        days,
                    )
                    await conn.execute(
                        "UPDATE account_balances SET balance = balance - $2::bigint * $3"
                        " WHERE account_id = ANY($1::uuid[])",
                        ids,
                        per,
                        COST,
                    )
                print(
                    json.dumps({"generated_accounts": start + len(ids), "per_account": per}),
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            await conn.execute("ALTER TABLE ledger_entries ENABLE TRIGGER USER")
            await conn.execute("ALTER TABLE holds ENABLE TRIGGER USER")
        # Rows were loaded account by account, so the time-ordered id indexes
        # took inserts all over and split half-full; a server appends them at
        # the right-most page (90% full). Rebuilt to the server's shape.
        for table in ("ledger_entries", "ledger_entry_keys", "holds"):
            await conn.execute(f"REINDEX TABLE {table}")
        await conn.execute("VACUUM ANALYZE ledger_entries")
        await conn.execute("VACUUM ANALYZE ledger_entry_keys")
        await conn.execute("VACUUM ANALYZE holds")
        size = await conn.fetchval(
            # A partitioned table has no storage of its own: its partitions'.
            "SELECT sum(pg_total_relation_size(relid)) + pg_total_relation_size('holds')"
            " + pg_total_relation_size('ledger_entry_keys')"
            " FROM pg_partition_tree('ledger_entries')"
        )
    return {
        "phase": "generate",
        "entries": per * len(accounts),
        "seconds": round(time.perf_counter() - t0, 1),
        "ledger_keys_and_holds_bytes": size,
    }


async def _calls(pool: asyncpg.Pool, accounts: list[uuid.UUID], n: int) -> None:
    """``n`` reserve + settle pairs, 64 at a time, on random accounts."""
    api = GroupCommit(pool, lanes=2)

    async def one(account: uuid.UUID) -> None:
        hold = await api.reserve(
            hold_id=time_ordered_id(), account_id=account, amount=HOLD, ttl_seconds=600
        )
        await api.settle(hold.id, ledger.Usage(100, 20, COST))

    done = 0
    while done < n:
        chunk = min(64, n - done)
        await asyncio.gather(*(one(random.choice(accounts)) for _ in range(chunk)))
        done += chunk


async def _timed_verify(pool: asyncpg.Pool, full: bool) -> dict[str, Any]:
    async with pool.acquire() as conn:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        cpu0, t0 = _proc_cpu([pid]), time.perf_counter()
        if full:
            report = await ledger.verify_ledger(conn, checkpoint=True)
        else:
            report = await ledger.verify_incremental(conn)
        return {
            "phase": "verify --full" if full else "verify (incremental)",
            "ok": report.ok,
            "problems": report.problems[:3],
            "mode": report.mode,
            "entries_checked": report.entries,
            "checkpointed_entries": report.checkpointed_entries,
            "wall_seconds": round(time.perf_counter() - t0, 3),
            "pg_backend_cpu_seconds": round(_proc_cpu([pid]) - cpu0, 3),
        }


async def main(args: argparse.Namespace) -> int:
    name = f"cg_scale_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(args.database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = _database(args.database_url, name)
    print(json.dumps({"database": name}), file=sys.stderr, flush=True)
    try:
        conn = await asyncpg.connect(url)
        try:
            await migrations.migrate(conn)
        finally:
            await conn.close()
        pool = await asyncpg.create_pool(url, min_size=20, max_size=20, **_POOL)
        try:
            accounts = await _fund(pool, args.accounts)
            await _measure(pool, accounts, args, "empty")
            print(json.dumps(await _timed_verify(pool, full=True)), flush=True)
            print(
                json.dumps(await _generate(pool, accounts, args.entries, args.days, args.batch)),
                flush=True,
            )
            print(json.dumps(await _timed_verify(pool, full=True)), flush=True)
            await _measure(pool, accounts, args, "loaded")
            # The measurement above added entries: checkpoint them, then time
            # an incremental run over exactly --new new calls.
            print(json.dumps(await _timed_verify(pool, full=False)), flush=True)
            await _calls(pool, accounts, args.new)
            print(json.dumps(await _timed_verify(pool, full=False)), flush=True)
        finally:
            await pool.close()
    finally:
        if not args.keep:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    return 0


async def compare(args: argparse.Namespace) -> int:
    """Reserve/settle on an empty ledger vs an existing big one, in alternating rounds.

    Rounds go empty, big, big, empty, … so the drift of a shared machine hits
    both alike; each round measures one caller, then ``--workers`` callers.
    """
    name = f"cg_scale_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(args.database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    empty_url = _database(args.database_url, name)
    big_url = _database(args.database_url, args.compare)
    try:
        conn = await asyncpg.connect(empty_url)
        try:
            await migrations.migrate(conn)
        finally:
            await conn.close()
        empty = await asyncpg.create_pool(empty_url, min_size=20, max_size=20, **_POOL)
        big = await asyncpg.create_pool(big_url, min_size=20, max_size=20, **_POOL)
        try:
            targets = {
                "empty": (empty, await _fund(empty, args.accounts)),
                "big": (big, [r["id"] for r in await big.fetch("SELECT id FROM accounts")]),
            }
            for pool, accounts in targets.values():
                await _pairs(pool, GroupCommit(pool, lanes=2), accounts, 4, 2.0)  # warm-up
            order = ["empty", "big", "big", "empty"] * args.rounds
            for label in order:
                pool, accounts = targets[label]
                api = GroupCommit(pool, lanes=2)
                entries = await pool.fetchval(
                    "SELECT reltuples::bigint FROM pg_class WHERE relname = 'ledger_entries'"
                )
                one = await _pairs(pool, api, accounts, 1, args.seconds)
                many = await _pairs(pool, api, accounts, args.workers, args.seconds)
                wal = await _statement_wal(pool, accounts, 500)
                print(
                    json.dumps(
                        {
                            "ledger": label,
                            "entries": entries,
                            "one_caller": one,
                            "concurrent": many,
                            "statement_wal": wal,
                        }
                    ),
                    flush=True,
                )
        finally:
            await empty.close()
            await big.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    return 0


async def _statement_wal(pool: asyncpg.Pool, accounts: list[uuid.UUID], n: int) -> dict[str, Any]:
    """WAL of the single-statement reserve and settle, from EXPLAIN (ANALYZE, WAL).

    Exact and this database's own (the server's LSN also counts every other
    database's writes): the statements of ``ledger.holds``, run for real.
    """
    from creditgate.ledger.holds import _RESERVE, _SETTLE, settle_fingerprint

    def wal(plan: Any) -> tuple[int, int]:
        top = json.loads(plan)[0]["Plan"]
        return int(top.get("WAL Bytes", 0)), int(top.get("WAL FPI", 0))

    totals = {"reserve": [0, 0], "settle": [0, 0]}
    usage = ledger.Usage(100, 20, COST)
    for _ in range(n):
        hold = time_ordered_id()
        got = await pool.fetchval(
            "EXPLAIN (ANALYZE, WAL, FORMAT JSON) " + _RESERVE,
            hold,
            random.choice(accounts),
            HOLD,
            None,
            None,
            600,
            None,  # no API key: no budget
            "UTC",
        )
        b, f = wal(got)
        totals["reserve"][0] += b
        totals["reserve"][1] += f
        got = await pool.fetchval(
            "EXPLAIN (ANALYZE, WAL, FORMAT JSON) " + _SETTLE,
            hold,
            usage.cost,
            time_ordered_id(),
            settle_fingerprint(usage),
            usage.input_tokens,
            usage.output_tokens,
            usage.estimated,
            None,  # no breakdown
        )
        b, f = wal(got)
        totals["settle"][0] += b
        totals["settle"][1] += f
    return {
        f"{k}_{what}": round(v[i] / n, 1)
        for k, v in totals.items()
        for i, what in ((0, "wal_bytes"), (1, "full_page_images"))
    }


async def verify_new(args: argparse.Namespace) -> int:
    """On an existing big ledger: catch the checkpoint up, add ``--new`` calls, time verify."""
    pool = await asyncpg.create_pool(
        _database(args.database_url, args.verify_new), min_size=20, max_size=20
    )
    try:
        accounts = [r["id"] for r in await pool.fetch("SELECT id FROM accounts")]
        print(json.dumps(await _timed_verify(pool, full=False)), flush=True)
        await _calls(pool, accounts, args.new)
        print(json.dumps(await _timed_verify(pool, full=False)), flush=True)
        print(json.dumps(await _timed_verify(pool, full=False)), flush=True)  # nothing new
    finally:
        await pool.close()
    return 0


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--database-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="a server where this may create and drop a database",
    )
    p.add_argument("--accounts", type=int, default=1000)
    p.add_argument("--entries", type=int, default=10_000_000)
    p.add_argument("--days", type=int, default=30, help="the generated history's time span")
    # Short transactions: a long one holds back every commit-safe reader of the
    # server (the Polar exporter waits for transactions older than its batch).
    p.add_argument("--batch", type=int, default=5, help="accounts per bulk-load transaction")
    p.add_argument("--workers", type=int, default=16, help="concurrent callers")
    p.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    p.add_argument("--new", type=int, default=10_000, help="calls before the incremental verify")
    p.add_argument("--keep", action="store_true", help="keep the database")
    p.add_argument(
        "--compare",
        metavar="DATABASE",
        help="only compare reserve/settle on a fresh empty ledger with this existing one",
    )
    p.add_argument("--rounds", type=int, default=3, help="--compare: rounds of 4")
    p.add_argument(
        "--verify-new",
        metavar="DATABASE",
        help="only time an incremental verify after --new calls on this existing ledger",
    )
    return p.parse_args(argv)


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    arguments = _args()
    if arguments.compare:
        sys.exit(asyncio.run(compare(arguments)))
    if arguments.verify_new:
        sys.exit(asyncio.run(verify_new(arguments)))
    sys.exit(asyncio.run(main(arguments)))
