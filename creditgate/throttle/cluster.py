"""The throttle's pipelined Redis connection, for a Redis Cluster.

``ClusterPipe`` offers what the throttle uses of ``resp.RedisPipe``
(``request``, ``execute``, ``execute_encoded``, ``reset``, ``aclose``) and
keeps its speed: one pipelined ``RedisPipe`` per master, so concurrent calls to
one shard still share one connection and one ``send`` per loop tick.

* Routing: a command goes to the master of its first key's slot (CRC16 with
  hash tags, ``redis.crc.key_slot``); for EVAL/EVALSHA the first key is the
  script's ``KEYS[1]``. Every key of an account shares the tag ``{account id}``
  (``limits.resolve``), so one script call always lands on one shard.
* The slot map comes from ``CLUSTER SLOTS``, asked of the seed nodes of the
  URL or any master already known, on first use and after ``reset``.
* ``MOVED slot host:port``: that slot is re-pointed at once, the call is sent
  there, and the whole map is refreshed in the background (a resharding moves
  many slots). ``ASK slot host:port``: ``ASKING`` and the call, back to back on
  the target's connection; the map is left alone (the slot is mid-migration).
* ``SCRIPT …``, ``PING``, ``FLUSHALL``/``FLUSHDB`` go to every master (a script
  must be loaded on each shard; a probe must reach each shard).
* Failures are the single node's: a lost master, ``CLUSTERDOWN`` or
  ``TRYAGAIN`` reach the throttle as ``RedisDown``/``RedisReplyError``, which
  applies its Redis-down policy and probes; the probe's ``reset`` drops the
  connections and the slot map, so the next probe learns the promoted replica.

URLs: ``redis+cluster://[user:password@]host:port[,host:port…]`` (TLS:
``rediss+cluster://``). The nodes listed are only seeds: the rest of the
cluster is learned from them. A cluster has no database number.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from creditgate.logs import log
from creditgate.throttle.resp import RedisDown, RedisPipe, RedisReplyError, encode_args

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
# Commands whose keys start at argument 3 (after the script and numkeys).
_SCRIPT_CALLS = frozenset((b"EVALSHA", b"EVAL", b"EVALSHA_RO", b"EVAL_RO", b"FCALL", b"FCALL_RO"))
# Keyless commands every master must see.
_EVERY_MASTER = frozenset(("SCRIPT", "PING", "FLUSHALL", "FLUSHDB"))
# Redirections followed for one call before giving up (a map in flux).
_MAX_REDIRECTS = 5
# TRYAGAIN (a slot's keys split mid-migration): wait this long, up to this often.
_TRYAGAIN_PAUSE = 0.02
_MAX_TRYAGAIN = 50
_ASKING = b"*1\r\n$6\r\nASKING\r\n"
_EVALSHA_HEAD = b"$7\r\nEVALSHA\r\n$40\r\n"
_EVALSHA_KEYS_AT = len(_EVALSHA_HEAD) + 40 + 2  # where numkeys' header starts


@dataclass(frozen=True, slots=True)
class ClusterURL:
    """A parsed ``redis+cluster://`` URL: the seed nodes and the credentials."""

    seeds: tuple[tuple[str, int], ...]
    user: str | None
    password: str | None
    tls: bool


def is_cluster_url(url: str) -> bool:
    """True when ``url`` names a Redis Cluster (``redis+cluster://``, ``rediss+cluster://``)."""
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def parse_cluster_url(url: str) -> ClusterURL:
    """The seeds and credentials of a ``redis+cluster://user:pw@h:p,h:p`` URL."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in CLUSTER_SCHEMES:
        raise ValueError(f"not a Redis Cluster URL scheme: {scheme!r}")
    rest = rest.split("/", 1)[0].split("?", 1)[0]
    userinfo, at, hosts = rest.rpartition("@")
    user = password = None
    if at:
        name, colon, secret = userinfo.partition(":")
        user = unquote(name) or None if colon else None
        password = unquote(secret) if colon else unquote(name)
    seeds = []
    for part in hosts.split(","):
        part = part.strip()
        if not part:
            continue
        host, colon, port = part.rpartition(":")
        if not colon:
            host, port = part, "6379"
        try:
            seeds.append((host.strip("[]") or "127.0.0.1", int(port)))
        except ValueError:
            raise ValueError(f"bad Redis Cluster node {part!r}: expected host:port") from None
    if not seeds:
        raise ValueError("a Redis Cluster URL needs at least one host:port")
    return ClusterURL(tuple(seeds), user, password, scheme.lower() == "rediss+cluster")


def make_pipe(url: str, *, connect_timeout: float = 1.0) -> RedisPipe | ClusterPipe:
    """The throttle's connection for ``url``: one node's ``RedisPipe`` or a ``ClusterPipe``."""
    if is_cluster_url(url):
        return ClusterPipe(url, connect_timeout=connect_timeout)
    return RedisPipe(url, connect_timeout=connect_timeout)


def make_client(url: str, **kwargs: Any) -> aioredis.Redis | RedisCluster:
    """A redis-py asyncio client for ``url``: ``RedisCluster`` when it names a cluster."""
    if not is_cluster_url(url):
        return aioredis.from_url(url, **kwargs)
    parsed = parse_cluster_url(url)
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in parsed.seeds],
        username=parsed.user,
        password=parsed.password,
        ssl=parsed.tls,
        **kwargs,
    )


class _NodePipe(RedisPipe):
    """One master's pipelined connection, which can also send ``ASKING`` + a call."""

    async def asking(self, count: int, encoded: bytes) -> Any:
        """``ASKING`` then the call, adjacent on the connection (an ASK redirection)."""
        protocol = self._protocol
        if protocol is None or protocol.lost.done():
            protocol = await self._connect()
        # Both written in this tick, so no other call can come between them.
        ok = protocol.send(_ASKING)
        reply = protocol.send(b"*%d\r\n" % count + encoded)
        outcomes: tuple[Any, Any] = await asyncio.gather(ok, reply, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return outcomes[1]


def _redirection(exc: BaseException | None) -> tuple[str, int, str] | None:
    """("MOVED"|"ASK", slot, "host:port") of a redirection error, ("TRYAGAIN", -1, ""), or None."""
    if not isinstance(exc, RedisReplyError):
        return None
    text = str(exc)
    if text.startswith("TRYAGAIN"):
        return "TRYAGAIN", -1, ""
    parts = text.split()
    if len(parts) != 3 or parts[0] not in ("MOVED", "ASK"):
        return None
    return parts[0], int(parts[1]), parts[2]


def _routing_key(encoded: bytes) -> bytes | None:
    """The key a command (encoded by ``encode_args``) is routed by, or None for none."""
    if encoded.startswith(_EVALSHA_HEAD):
        # The hot path (every throttle call): EVALSHA <40-hex sha> numkeys key …
        pos = _EVALSHA_KEYS_AT
        end = encoded.index(b"\r\n", pos)
        start = end + 2
        if encoded[start : start + 2] == b"0\r":
            return None  # no keys
        pos = encoded.index(b"\r\n", start) + 2
        end = encoded.index(b"\r\n", pos)
        start = end + 2
        return encoded[start : start + int(encoded[pos + 1 : end])]
    pos = 0
    values: list[bytes] = []
    want = 2  # the command name, then its first argument (or more for scripts)
    while len(values) < want and pos < len(encoded):
        end = encoded.index(b"\r\n", pos)
        length = int(encoded[pos + 1 : end])
        start = end + 2
        values.append(encoded[start : start + length])
        pos = start + length + 2
        if len(values) == 1 and values[0].upper() in _SCRIPT_CALLS:
            want = 3
        elif want == 3 and len(values) == 3:
            if int(values[2]) == 0:
                return None
            want = 4
    return values[want - 1] if len(values) == want else None


class ClusterPipe:
    """The throttle's Redis connection to a Redis Cluster: one pipe per master."""

    def __init__(self, url: str, *, connect_timeout: float = 1.0) -> None:
        self._url = parse_cluster_url(url)
        self._connect_timeout = connect_timeout
        self._pipes: dict[str, _NodePipe] = {}
        self._slots: list[str] | None = None  # master "host:port" by slot; "" unserved
        # The masters of the last map: asked for the next one too (reset keeps them).
        self._known: list[str] = []
        self._refreshing: asyncio.Task[list[str]] | None = None
        self._background: set[asyncio.Future[Any]] = set()

    # ------------------------------------------------------------ RedisPipe's interface

    async def execute(self, *args: Any) -> Any:
        """Send one command and wait for its reply; keyless admin commands go to every master."""
        name = str(args[0].decode() if isinstance(args[0], bytes) else args[0]).upper()
        if name in _EVERY_MASTER:
            slots = await self._slot_map()
            masters = sorted(set(slots) - {""})
            replies = await asyncio.gather(*(self._pipe(a).execute(*args) for a in masters))
            if name == "SCRIPT":
                # Keyless commands succeed on a cluster that refuses every keyed
                # one (CLUSTERDOWN while a master is failing over); the probe
                # (SCRIPT LOAD) must not call such a cluster healthy.
                await self._require_state_ok(masters)
            return replies[0]
        return await self.execute_encoded(len(args), encode_args(args))

    def request(self, count: int, encoded: bytes) -> asyncio.Future[Any]:
        """Send a command to its slot's master now; its reply's future (redirections followed).

        As with ``RedisPipe.request``, the future outlives a caller that stops
        waiting for it.
        """
        slots = self._slots
        if slots is None:
            return asyncio.ensure_future(self.execute_encoded(count, encoded))
        key = _routing_key(encoded)
        addr = slots[key_slot(key) if key is not None else 0]
        loop = asyncio.get_running_loop()
        if not addr:
            failed: asyncio.Future[Any] = loop.create_future()
            failed.set_exception(RedisDown("no master serves this slot"))
            return failed
        inner = self._pipe(addr).request(count, encoded)
        outer: asyncio.Future[Any] = loop.create_future()
        inner.add_done_callback(lambda done: self._relay(done, outer, count, encoded))
        return outer

    async def execute_encoded(self, count: int, encoded: bytes) -> Any:
        """``execute`` of ``count`` arguments already encoded by ``encode_args``."""
        await self._slot_map()
        return await self.request(count, encoded)

    def reset(self) -> None:
        """Drop every connection and the slot map; the next call learns the cluster again."""
        for pipe in self._pipes.values():
            pipe.reset()
        self._pipes.clear()
        self._slots = None

    async def aclose(self) -> None:
        """Close every connection."""
        for task in (self._refreshing, *self._background):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self.reset()

    # ------------------------------------------------------------ introspection

    @property
    def masters(self) -> list[str]:
        """The masters ("host:port") of the current slot map (empty before the first call)."""
        return sorted(set(self._slots or ()) - {""})

    def node(self, addr: str) -> RedisPipe:
        """The pipe to one master, e.g. for ``INFO`` per shard."""
        return self._pipe(addr)

    # ------------------------------------------------------------ internals

    async def _require_state_ok(self, masters: list[str]) -> None:
        infos = await asyncio.gather(*(self._pipe(a).execute("CLUSTER", "INFO") for a in masters))
        for info in infos:
            if b"cluster_state:ok" not in info:
                raise RedisReplyError("CLUSTERDOWN a node reports cluster_state other than ok")

    def _relay(
        self, inner: asyncio.Future[Any], outer: asyncio.Future[Any], count: int, encoded: bytes
    ) -> None:
        if outer.done():
            _consume(inner)
            return
        if inner.cancelled():
            outer.cancel()
            return
        exc = inner.exception()
        redirect = _redirection(exc)
        if redirect is None:
            if exc is not None:
                outer.set_exception(exc)
            else:
                outer.set_result(inner.result())
            return
        follow = asyncio.ensure_future(self._follow(redirect, count, encoded))
        follow.add_done_callback(lambda done: _copy(done, outer))

    async def _follow(self, redirect: tuple[str, int, str], count: int, encoded: bytes) -> Any:
        """The call's reply after following MOVED/ASK redirections and TRYAGAIN pauses."""
        redirects = tries = 0
        while True:
            kind, slot, addr = redirect
            try:
                if kind == "ASK":
                    return await self._pipe(addr).asking(count, encoded)
                if kind == "MOVED":
                    if self._slots is not None:
                        self._slots[slot] = addr
                    self._refresh_soon()
                    return await self._pipe(addr).execute_encoded(count, encoded)
                # TRYAGAIN: the slot is mid-migration with this call's keys on
                # both sides (redis-cli moves a slot's keys in batches); they
                # will all be on one side within moments. The caller's time
                # budget still bounds its wait (a late admission is given back).
                await asyncio.sleep(_TRYAGAIN_PAUSE)
                key = _routing_key(encoded)
                slots = await self._slot_map()
                target = slots[key_slot(key) if key is not None else 0]
                if not target:
                    raise RedisDown("no master serves this slot")
                return await self._pipe(target).execute_encoded(count, encoded)
            except RedisReplyError as exc:
                again = _redirection(exc)
                if again is None:
                    raise
                if again[0] == "TRYAGAIN":
                    tries += 1
                    if tries > _MAX_TRYAGAIN:
                        raise
                else:
                    redirects += 1
                    if redirects > _MAX_REDIRECTS:
                        raise RedisReplyError(f"too many redirections for slot {again[1]}") from exc
                redirect = again

    def _pipe(self, addr: str) -> _NodePipe:
        pipe = self._pipes.get(addr)
        if pipe is None:
            userinfo = ""
            if self._url.password is not None:
                user = self._url.user or ""
                userinfo = f"{_quote(user)}:{_quote(self._url.password)}@"
            scheme = "rediss" if self._url.tls else "redis"
            url = f"{scheme}://{userinfo}{addr}/0"
            pipe = self._pipes[addr] = _NodePipe(url, connect_timeout=self._connect_timeout)
        return pipe

    async def _slot_map(self) -> list[str]:
        if self._slots is not None:
            return self._slots
        return await self._refresh()

    def _refresh_soon(self) -> None:
        """Refresh the map in the background (one refresh at a time)."""
        if self._refreshing is None or self._refreshing.done():
            task = asyncio.ensure_future(self._refresh())
            self._background.add(task)
            task.add_done_callback(self._refreshed)

    def _refreshed(self, task: asyncio.Future[Any]) -> None:
        self._background.discard(task)
        _consume(task)  # a failure only means the next MOVED or reset tries again

    async def _refresh(self) -> list[str]:
        # Concurrent callers share one CLUSTER SLOTS round.
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._load_slots())
        return await asyncio.shield(self._refreshing)

    async def _load_slots(self) -> list[str]:
        """CLUSTER SLOTS of the masters last known and the seeds, all at once; the first wins.

        All at once: a dead node whose address swallows packets costs the
        connect timeout, which must not delay learning the map from the others.
        """
        seeds = [f"{_host(h)}:{p}" for h, p in self._url.seeds]
        candidates = list(dict.fromkeys([*self._known, *seeds]))

        async def ask(addr: str) -> tuple[str, Any]:
            try:
                async with asyncio.timeout(self._connect_timeout):
                    return addr, await self._pipe(addr).execute("CLUSTER", "SLOTS")
            except (RedisDown, RedisReplyError, TimeoutError):
                self._drop(addr)
                raise

        asks = [asyncio.ensure_future(ask(addr)) for addr in candidates]
        last: BaseException | None = None
        try:
            for answer in asyncio.as_completed(asks):
                try:
                    addr, reply = await answer
                except (RedisDown, RedisReplyError, TimeoutError) as exc:
                    last = exc
                    continue
                slots = _slot_table(reply, addr.rpartition(":")[0])
                self._slots = slots
                self._known = sorted(set(slots) - {""})
                # Connections to nodes that no longer serve a slot (a demoted master).
                for stale in set(self._pipes) - set(slots) - set(seeds):
                    self._drop(stale)
                log.info("redis cluster slot map loaded", extra={"masters": len(self._known)})
                return slots
        finally:
            for pending in asks:
                pending.cancel()
            await asyncio.gather(*asks, return_exceptions=True)
        raise RedisDown(f"no Redis Cluster node answered CLUSTER SLOTS: {type(last).__name__}")

    def _drop(self, addr: str) -> None:
        pipe = self._pipes.pop(addr, None)
        if pipe is not None:
            pipe.reset()


def _slot_table(reply: list[Any], asked_host: str) -> list[str]:
    """CLUSTER SLOTS' reply as the master "host:port" of each slot ("" when unserved)."""
    slots = [""] * REDIS_CLUSTER_HASH_SLOTS
    for entry in reply:
        start, end, master = int(entry[0]), int(entry[1]), entry[2]
        raw_host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
        # An empty or "?" host means "the node you asked" (cluster-preferred-endpoint-type).
        host = asked_host if raw_host in ("", "?") else _host(raw_host)
        slots[start : end + 1] = [f"{host}:{int(master[1])}"] * (end - start + 1)
    return slots


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _quote(text: str) -> str:
    return quote(text, safe="")


def _copy(source: asyncio.Future[Any], target: asyncio.Future[Any]) -> None:
    if target.done():
        _consume(source)
        return
    if source.cancelled():
        target.cancel()
    elif (exc := source.exception()) is not None:
        target.set_exception(exc)
    else:
        target.set_result(source.result())


def _consume(task: asyncio.Future[Any]) -> None:
    """Mark a background future's exception as seen (asyncio logs unseen ones)."""
    if not task.cancelled():
        task.exception()
