"""The throttle and every Redis use against a real 3-master Redis Cluster (with replicas).

Each test starts its own cluster of ``redis-server --cluster-enabled yes`` on
free loopback ports (tests/cluster_support.py); the machine's Redis is not used.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from creditgate.config import Tier
from creditgate.throttle import Throttle, resolve
from creditgate.throttle.cluster import ClusterPipe, _routing_key, make_pipe, parse_cluster_url
from creditgate.throttle.errors import Throttled, ThrottleUnavailable
from creditgate.throttle.limits import Limits
from creditgate.throttle.resp import encode_args
from tests.cluster_support import RedisClusterNodes, cluster_tools, redis_cluster
from tests.conftest import Services
from tests.test_throttle_processes import serve_processes, wait_healthy
from tests.throttle_support import MESSAGES, config_text

pytestmark = pytest.mark.skipif(
    cluster_tools() is None, reason="redis-server/redis-cli not installed: no Redis Cluster"
)

R = 10  # requests per minute: no refill worth one request within a test's burst


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisClusterNodes]:
    with redis_cluster(tmp_path) as nodes:
        yield nodes


def ten_a_minute(account: uuid.UUID) -> Limits:
    return resolve(account, None, Tier("t", R, 10**9, 10**6, 10**6))


def accounts_on(cluster: RedisClusterNodes, masters: list[int]) -> dict[int, uuid.UUID]:
    """One account id per master, its keys (tag ``{id}``) on that master's shard."""
    found: dict[int, uuid.UUID] = {}
    while len(found) < len(masters):
        acct = uuid.uuid4()
        found.setdefault(cluster.master_of(f"cg:{{{acct}}}"), acct)
    return found


def account_on(cluster: RedisClusterNodes, master: int) -> uuid.UUID:
    """An account id whose keys (tag ``{id}``) sit on ``master``'s shard, as it sees it."""
    while True:
        acct = uuid.uuid4()
        if cluster.master_of(f"cg:{{{acct}}}", via=master) == master:
            return acct


async def burst(throttle: Throttle, limits: Limits, n: int) -> Counter[str]:
    """``n`` concurrent admissions (never finished): how many were admitted/refused."""

    async def one() -> str:
        try:
            await throttle.admit(limits, 1)
        except Throttled:
            return "refused"
        return "admitted"

    return Counter(await asyncio.gather(*(one() for _ in range(n))))


def test_cluster_url_parsing() -> None:
    parsed = parse_cluster_url("redis+cluster://u%40x:p%3Aw@10.0.0.1:7000,10.0.0.2:7001/")
    assert parsed.seeds == (("10.0.0.1", 7000), ("10.0.0.2", 7001))
    assert (parsed.user, parsed.password, parsed.tls) == ("u@x", "p:w", False)
    assert parse_cluster_url("rediss+cluster://:secret@h:1").password == "secret"
    with pytest.raises(ValueError, match="host:port"):
        parse_cluster_url("redis+cluster://h:notaport")


def test_routing_key_is_the_first_key() -> None:
    tag = f"cg:{{{uuid.uuid4()}}}"
    assert _routing_key(encode_args(("EVALSHA", "a" * 40, 2, tag, f"{tag}:par", "a"))) == (
        tag.encode()
    )
    assert _routing_key(encode_args(("EVALSHA", "a" * 40, 0, "arg"))) is None
    assert _routing_key(encode_args(("EVAL", "return 1", 1, "k", "arg"))) == b"k"
    assert _routing_key(encode_args(("GET", "k"))) == b"k"
    assert _routing_key(encode_args(("PING",))) is None


async def test_limits_hold_exactly_on_every_shard(cluster: RedisClusterNodes) -> None:
    pipe = make_pipe(cluster.url)
    assert isinstance(pipe, ClusterPipe)
    throttle = Throttle(pipe, policy="closed", timeout_ms=2000)
    await throttle.start()
    try:
        masters = cluster.masters()
        assert len(masters) == 3
        by_master = accounts_on(cluster, masters)
        results = await asyncio.gather(
            *(burst(throttle, ten_a_minute(a), 3 * R) for a in by_master.values())
        )
        assert all(r == {"admitted": R, "refused": 2 * R} for r in results), results
        assert not throttle.degraded
        # Each account's state lives on its own shard's master, nowhere else.
        for port, acct in by_master.items():
            assert cluster.client(port).exists(f"cg:{{{acct}}}", f"cg:{{{acct}}}:par") == 2
            slot = cluster.client(port).cluster("keyslot", f"cg:{{{acct}}}")
            for other in set(masters) - {port}:
                assert cluster.client(other).cluster("countkeysinslot", slot) == 0
    finally:
        await throttle.aclose()
        await pipe.aclose()


async def test_leases_are_renewed_on_every_shard(cluster: RedisClusterNodes) -> None:
    # renew.lua runs per admission on its account's shard, like admit.lua.
    pipe = ClusterPipe(cluster.url)
    throttle = Throttle(pipe, policy="closed", timeout_ms=2000, lease_ttl_ms=900)
    await throttle.start()
    try:
        by_master = accounts_on(cluster, cluster.masters())
        admitted = {port: await throttle.admit(ten_a_minute(a), 1) for port, a in by_master.items()}
        first = {
            port: float(cluster.client(port).zscore(f"cg:{{{a}}}:par", admitted[port].lease_id))
            for port, a in by_master.items()
        }
        # The keeper renews every ttl/3; wait until each lease's expiry moved on.
        async with asyncio.timeout(20):
            while True:
                now = {
                    port: cluster.client(port).zscore(f"cg:{{{a}}}:par", admitted[port].lease_id)
                    for port, a in by_master.items()
                }
                if all(v is not None and v > first[p] for p, v in now.items()):
                    break
                await asyncio.sleep(0.1)
        assert not throttle.degraded
    finally:
        await throttle.aclose()
        await pipe.aclose()


async def test_ask_then_moved_while_a_slot_is_resharded(cluster: RedisClusterNodes) -> None:
    pipe = ClusterPipe(cluster.url)
    throttle = Throttle(pipe, policy="closed", timeout_ms=2000)
    await throttle.start()
    try:
        acct = uuid.uuid4()
        limits = ten_a_minute(acct)
        key = f"cg:{{{acct}}}"
        source = cluster.master_of(key)
        target = next(p for p in cluster.masters() if p != source)
        slot = int(cluster.client(source).execute_command("CLUSTER", "KEYSLOT", key))
        assert await burst(throttle, limits, 3) == {"admitted": 3}
        # Mid-migration: the keys are on the target; the source answers ASK.
        cluster.move_slot_keys(slot, source, target)
        assert cluster.client(source).cluster("countkeysinslot", slot) == 0
        assert await burst(throttle, limits, 3) == {"admitted": 3}
        assert pipe._slots is not None and pipe._slots[slot] == f"127.0.0.1:{source}"
        # Finished: the source answers MOVED; the pipe re-points the slot.
        cluster.finish_slot(slot, target)
        assert await burst(throttle, limits, 3 * R) == {"admitted": R - 6, "refused": 3 * R - 4}
        assert pipe._slots[slot] == f"127.0.0.1:{target}"
        assert not throttle.degraded
    finally:
        await throttle.aclose()
        await pipe.aclose()


async def test_tryagain_while_an_accounts_keys_are_split_mid_migration(
    cluster: RedisClusterNodes,
) -> None:
    # redis-cli --cluster reshard moves a slot's keys in batches: for a moment
    # an account's hash is on the target and its lease set still on the source,
    # and a script call gets TRYAGAIN. It waits and retries; no degradation.
    pipe = ClusterPipe(cluster.url)
    throttle = Throttle(pipe, policy="closed", timeout_ms=5000)
    await throttle.start()
    try:
        acct = uuid.uuid4()
        limits = ten_a_minute(acct)
        key = f"cg:{{{acct}}}"
        source = cluster.master_of(key)
        target = next(p for p in cluster.masters() if p != source)
        slot = int(cluster.client(source).execute_command("CLUSTER", "KEYSLOT", key))
        assert await burst(throttle, limits, 2) == {"admitted": 2}  # leases held: both keys
        cluster.move_slot_keys(slot, source, target, keys=[key])
        before = cluster.error_count(source, "TRYAGAIN")
        pending = asyncio.ensure_future(throttle.admit(limits, 1))
        async with asyncio.timeout(10):
            while cluster.error_count(source, "TRYAGAIN") == before:
                await asyncio.sleep(0.01)
        assert not pending.done()
        await asyncio.to_thread(cluster.move_slot_keys, slot, source, target, [f"{key}:par"])
        await pending
        cluster.finish_slot(slot, target)
        assert await burst(throttle, limits, 2 * R) == {"admitted": R - 3, "refused": R + 3}
        assert not throttle.degraded
    finally:
        await throttle.aclose()
        await pipe.aclose()


async def test_two_processes_share_limits_across_shards_and_survive_a_failover(
    services: Services,
    upstream: TestServer,
    db,
    customer_factory,
    cluster: RedisClusterNodes,
    tmp_path: Path,
) -> None:
    config = tmp_path / "creditgate.toml"
    config.write_text(config_text(str(upstream.make_url("/v1"))))
    customers = {}
    while len(customers) < 2:  # two accounts whose keys sit on different shards
        c = await customer_factory(1, tier="ten")
        customers.setdefault(cluster.master_of(f"cg:{{{c.account.id}}}"), c)
    victim = next(iter(customers))
    while True:  # an unlimited account on the shard that will fail
        heavy = await customer_factory(1, tier="free")
        if cluster.master_of(f"cg:{{{heavy.account.id}}}") == victim:
            break
    env = {
        "REDIS_URL": cluster.url,
        "THROTTLE_REDIS_TIMEOUT_MS": "2000",
        "THROTTLE_ON_REDIS_ERROR": "closed",
    }
    with serve_processes(services, config, 2, tmp_path, **env) as procs:
        urls = [u for _, u in procs]
        async with aiohttp.ClientSession() as session:
            await wait_healthy(session, urls)
            for url in urls:  # /ready pings the cluster through redis-py's RedisCluster
                async with session.get(f"{url}/ready") as resp:
                    assert (await resp.json())["checks"]["redis"] == "ok"

            async def one(i: int, auth: dict[str, str]) -> int:
                async with session.post(
                    f"{urls[i % 2]}/v1/chat/completions",
                    json={"model": "mock-model", "messages": MESSAGES},
                    headers=auth,
                ) as resp:
                    return resp.status

            results = await asyncio.gather(
                *(one(i, c.auth) for c in customers.values() for i in range(3 * R))
            )
            for n, _ in enumerate(customers):
                assert Counter(results[n * 3 * R : (n + 1) * 3 * R]) == {200: R, 429: 2 * R}

            # Fail the shard over under both processes; neither is restarted.
            replica = cluster.replica_of(victim)
            assert cluster.client(victim).execute_command("WAIT", 1, 5000) == 1
            cluster.kill(victim)
            cluster.client(replica).execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
            statuses: list[int] = []
            async with asyncio.timeout(30):
                while statuses.count(503) < 2 or statuses[-2:] != [200, 200]:
                    statuses.append(await one(len(statuses), heavy.auth))
                    await asyncio.sleep(0.02)
            assert set(statuses) == {200, 503}  # the "closed" policy, then shared again
            # The replicated buckets came along: the limited account is still full.
            after = await asyncio.gather(*(one(i, customers[victim].auth) for i in range(2)))
            assert after == [429, 429]


@pytest.mark.parametrize("promotion", ["automatic", "takeover", "paused-takeover"])
async def test_a_killed_master_fails_over_and_the_throttle_recovers(
    cluster: RedisClusterNodes, promotion: str
) -> None:
    pipe = ClusterPipe(cluster.url, connect_timeout=0.5)
    throttle = Throttle(pipe, policy="closed", timeout_ms=300, probe_interval=0.1)
    await throttle.start()
    try:
        masters = cluster.masters()
        victim = cluster.ports[0]  # the URL's first seed
        assert victim in masters
        masters = [victim, *(m for m in masters if m != victim)]
        acct = accounts_on(cluster, masters)[victim]
        stop = asyncio.Event()
        outcomes: list[str] = []

        async def load() -> None:
            # Admit and finish in a loop on the doomed shard: "mid-load".
            limits = resolve(acct, None, Tier("t", 10**6, 10**9, 10**6, 10**6))
            while not stop.is_set():
                try:
                    await throttle.finish(await throttle.admit(limits, 1), 1)
                    outcomes.append("ok")
                except ThrottleUnavailable:
                    outcomes.append("closed")  # the Redis-down policy, applied
                await asyncio.sleep(0.005)

        loader = asyncio.create_task(load())
        await asyncio.sleep(0.3)
        replica = cluster.replica_of(victim)
        if promotion == "paused-takeover":
            # Hung, not dead: connecting works, nothing answers (so each call
            # to it costs the whole time budget, and asking it for the slot
            # map the connect timeout).
            cluster.pause(victim)
        else:
            cluster.kill(victim)
        if promotion != "automatic":  # an operator's forced promotion, at once
            cluster.client(replica).execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
        # "automatic": the replica is elected after the node timeout (1 s here),
        # and until then every node answers CLUSTERDOWN.
        async with asyncio.timeout(20):
            while "closed" not in outcomes:
                await asyncio.sleep(0.05)
            while outcomes[-1] != "ok":  # recovered, same Throttle, same process
                await asyncio.sleep(0.05)
        stop.set()
        await loader
        assert not throttle.degraded
        # Down once, recovered once: no flapping while the cluster was down.
        first, last = outcomes.index("closed"), len(outcomes) - 1 - outcomes[::-1].index("closed")
        assert set(outcomes[first : last + 1]) == {"closed"}, outcomes
        assert outcomes[0] == "ok"
        assert cluster.master_of(f"cg:{{{acct}}}", via=replica) == replica
        # Limits hold exactly on the promoted shard, and on the others.
        fresh = accounts_on(cluster, [replica, *masters[1:]])
        results = await asyncio.gather(
            *(burst(throttle, ten_a_minute(a), 2 * R) for a in fresh.values())
        )
        assert all(r == {"admitted": R, "refused": R} for r in results), results
    finally:
        await throttle.aclose()
        await pipe.aclose()


async def test_a_cluster_that_refuses_keyed_calls_keeps_the_throttle_degraded(
    cluster: RedisClusterNodes,
) -> None:
    # A master with an unserved slot answers CLUSTERDOWN to every keyed call
    # but still accepts SCRIPT LOAD: the probe must not call it healthy.
    pipe = ClusterPipe(cluster.url)
    throttle = Throttle(pipe, policy="closed", timeout_ms=1000, probe_interval=0.05)
    await throttle.start()
    try:
        master = cluster.masters()[0]
        acct = accounts_on(cluster, cluster.masters())[master]
        limits = ten_a_minute(acct)
        assert await burst(throttle, limits, 1) == {"admitted": 1}
        owned = next(s for s, p in cluster.slot_owners().items() if p == master)
        cluster.client(master).execute_command("CLUSTER", "DELSLOTS", owned)
        with pytest.raises(ThrottleUnavailable):
            await throttle.admit(limits, 1)
        states = []
        for _ in range(10):  # the probe runs every 50 ms meanwhile
            await asyncio.sleep(0.05)
            states.append(throttle.degraded)
        assert states == [True] * 10
        cluster.client(master).execute_command("CLUSTER", "ADDSLOTS", owned)
        async with asyncio.timeout(10):
            while throttle.degraded:
                await asyncio.sleep(0.05)
        assert await burst(throttle, limits, R) == {"admitted": R - 1, "refused": 1}
    finally:
        await throttle.aclose()
        await pipe.aclose()


async def test_doctor_checks_a_cluster_url(
    services: Services, cluster: RedisClusterNodes, tmp_path: Path
) -> None:
    """`creditgate doctor` pings a cluster the way the server reaches it, and a dead
    cluster is a failed check, not a crash."""
    from tests.procs import free_port, write_config
    from tests.test_first_hour import _doctor, _serve_env

    config = write_config(tmp_path, "http://127.0.0.1:9/v1")
    _, report, err = await _doctor(_serve_env(services, config, REDIS_URL=cluster.url))
    redis_check = next(c for c in report["checks"] if c["name"] == "redis")
    assert redis_check["status"] == "ok", (redis_check, err[-500:])
    assert redis_check["detail"].startswith("reachable at cluster 127.0.0.1:"), redis_check

    dead = f"redis+cluster://:pw-c7@127.0.0.1:{free_port()}"
    code, report, err = await _doctor(_serve_env(services, config, REDIS_URL=dead))
    redis_check = next(c for c in report["checks"] if c["name"] == "redis")
    assert code == 1 and redis_check["status"] == "fail", redis_check
    assert "Traceback" not in err and "pw-c7" not in str(report) + err


async def test_the_local_policy_admits_locally_through_a_failover(
    cluster: RedisClusterNodes,
) -> None:
    """The default Redis-down policy on a cluster: while a shard fails over, its
    accounts are decided by the process's own buckets (never an error), then by
    Redis again once the replica is promoted."""
    pipe = ClusterPipe(cluster.url, connect_timeout=0.5)
    throttle = Throttle(pipe, policy="local", timeout_ms=300, probe_interval=0.1)
    await throttle.start()
    try:
        victim = cluster.ports[0]
        acct = account_on(cluster, victim)
        stop = asyncio.Event()
        stores: list[str] = []

        async def load() -> None:
            limits = resolve(acct, None, Tier("t", 10**6, 10**9, 10**6, 10**6))
            while not stop.is_set():
                admission = await throttle.admit(limits, 1)  # never raises under "local"
                stores.append(admission.store)
                await throttle.finish(admission, 1)
                await asyncio.sleep(0.005)

        loader = asyncio.create_task(load())
        await asyncio.sleep(0.3)
        replica = cluster.replica_of(victim)
        cluster.kill(victim)  # the replica is elected after the node timeout
        async with asyncio.timeout(20):
            while "local" not in stores:
                await asyncio.sleep(0.05)
            while stores[-1] != "redis":
                await asyncio.sleep(0.05)
        stop.set()
        await loader
        assert stores[0] == "redis" and not throttle.degraded
        first = stores.index("local")
        last = len(stores) - 1 - stores[::-1].index("local")
        assert set(stores[first : last + 1]) == {"local"}, stores  # no flapping
        # Back on Redis: the promoted shard's limits hold exactly.
        fresh = account_on(cluster, replica)
        assert await burst(throttle, ten_a_minute(fresh), 2 * R) == {
            "admitted": R,
            "refused": R,
        }
    finally:
        await throttle.aclose()
        await pipe.aclose()
