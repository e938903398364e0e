"""A real Redis Cluster on loopback ports, for tests and the benchmark.

``redis-server --cluster-enabled yes`` per node in a temp dir, joined by
``redis-cli --cluster create``; never the machine's Redis on 6379.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis
from redis.crc import key_slot


def _free_port() -> int:
    # Cluster nodes also listen on port + 10000 (the bus): keep both free.
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 < 65536:
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


def cluster_tools() -> tuple[str, str] | None:
    """(redis-server, redis-cli) when both are installed, else None."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    return (server, cli) if server and cli else None


class RedisClusterNodes:
    """``masters`` masters with ``replicas`` replicas each, as real processes."""

    def __init__(self, workdir: Path, masters: int = 3, replicas: int = 1) -> None:
        tools = cluster_tools()
        assert tools is not None
        self.server, self.cli = tools
        self.workdir = workdir
        self.masters_count = masters
        self.replicas = replicas
        self.ports = [_free_port() for _ in range(masters * (1 + replicas))]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.paused: set[int] = set()

    @property
    def url(self) -> str:
        """A ``redis+cluster://`` URL with two seed nodes."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:2])

    def start(self) -> None:
        for port in self.ports:
            self._start_node(port)
        for i, port in enumerate(self.ports):
            self.ports[i] = self._listening(port)
        subprocess.run(
            [
                self.cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in self.ports),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
        )
        self.wait_ok()
        self.wait_replicas_synced()

    def _start_node(self, port: int) -> None:
        node_dir = self.workdir / str(port)
        node_dir.mkdir(exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [
                self.server,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "1000",
                "--save",
                "",
                "--appendonly",
                "no",
                # A replica syncs at once (the default waits 5 s for more replicas):
                # one that never synced is never promoted.
                "--repl-diskless-sync-delay",
                "0",
                "--dir",
                str(node_dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def _listening(self, port: int) -> int:
        """The node's port once it answers. A port is free when chosen but any
        process's outgoing connection may take it (or its bus port) before the
        node binds it: then the node exits and starts again on a fresh port."""
        for _ in range(5):
            if self._up(port):
                return port
            proc = self.procs.pop(port)
            proc.kill()
            proc.wait()
            port = _free_port()
            self._start_node(port)
        raise AssertionError("no redis-server node could start on five ports")

    def _up(self, port: int) -> bool:
        client = redis.Redis(port=port, socket_connect_timeout=0.2, socket_timeout=0.5)
        deadline = time.monotonic() + 10
        try:
            while time.monotonic() < deadline:
                try:
                    client.ping()
                    return True
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    if self.procs[port].poll() is not None:
                        return False  # it exited: the port was taken
                    time.sleep(0.05)
            return False
        finally:
            client.close()

    def client(self, port: int) -> redis.Redis:
        """A plain (non-cluster) client of one node."""
        return redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=2)

    def alive(self) -> list[int]:
        """The ports of nodes running and not paused."""
        return [p for p, proc in self.procs.items() if proc.poll() is None and p not in self.paused]

    def wait_ok(self, timeout: float = 20) -> None:
        """Until every live node says cluster_state:ok and agrees on the masters."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                states = [self.client(p).cluster("info")["cluster_state"] for p in self.alive()]
                maps = {tuple(sorted(self.slot_owners(p).items())) for p in self.alive()}
                if all(s == "ok" for s in states) and len(maps) == 1:
                    return
            except redis.exceptions.RedisError:
                pass
            assert time.monotonic() < deadline, "the Redis Cluster did not become ok"
            time.sleep(0.1)

    def wait_replicas_synced(self, timeout: float = 20) -> None:
        """Until every replica's link to its master is up (only then can it be promoted)."""
        deadline = time.monotonic() + timeout
        while True:
            infos = [self.client(p).info("replication") for p in self.alive()]
            if all(i.get("master_link_status", "up") == "up" for i in infos):
                return
            assert time.monotonic() < deadline, "Redis Cluster replicas did not sync"
            time.sleep(0.1)

    def slot_owners(self, via: int | None = None) -> dict[int, int]:
        """Slot range start -> master port, as node ``via`` sees it."""
        port = via if via is not None else self.alive()[0]
        owners: dict[int, int] = {}
        for entry in self.client(port).execute_command("CLUSTER", "SLOTS"):
            owners[int(entry[0])] = int(entry[2][1])
        return owners

    def master_of(self, key: str, via: int | None = None) -> int:
        """The port of the master serving ``key``'s slot."""
        slot = key_slot(key.encode())
        port = via if via is not None else self.alive()[0]
        for entry in self.client(port).execute_command("CLUSTER", "SLOTS"):
            if int(entry[0]) <= slot <= int(entry[1]):
                return int(entry[2][1])
        raise AssertionError(f"slot {slot} is not served")

    def node_id(self, port: int) -> str:
        return str(self.client(port).execute_command("CLUSTER", "MYID").decode())

    def replica_of(self, master: int) -> int:
        """The port of a live replica of ``master``."""
        master_id = self.node_id(master)
        for port in self.alive():
            if port == master:
                continue
            info = self.client(port).execute_command("CLUSTER", "NODES").decode()
            for line in info.splitlines():
                fields = line.split()
                if "myself" in fields[2] and "slave" in fields[2] and fields[3] == master_id:
                    return port
        raise AssertionError(f"no replica of {master}")

    def masters(self) -> list[int]:
        return sorted(set(self.slot_owners().values()))

    def kill(self, port: int) -> None:
        """SIGKILL one node (no goodbye to the cluster, like a crashed machine)."""
        proc = self.procs[port]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def pause(self, port: int) -> None:
        """SIGSTOP one node: connections open, nothing answered (a hung or cut-off machine)."""
        os.kill(self.procs[port].pid, signal.SIGSTOP)
        self.paused.add(port)

    def move_slot_keys(
        self, slot: int, source: int, target: int, keys: list[str] | None = None
    ) -> None:
        """Start a slot's migration (IMPORTING/MIGRATING) and MIGRATE ``keys`` (default: all).

        The migration is not finished (``finish_slot``).
        """
        src, dst = self.client(source), self.client(target)
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(source))
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(target))
        if keys is None:
            keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
        if keys:
            src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)

    def error_count(self, port: int, error: str) -> int:
        """How many ``error`` replies (e.g. TRYAGAIN) a node has sent (INFO errorstats)."""
        stats = self.client(port).info("errorstats")
        return int(stats.get(f"errorstat_{error}", {}).get("count", 0))

    def finish_slot(self, slot: int, target: int) -> None:
        """End a migration: every master learns ``target`` owns ``slot``."""
        target_id = self.node_id(target)
        for port in self.masters():
            self.client(port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        self.client(target).execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)


@contextlib.contextmanager
def redis_cluster(
    workdir: Path, masters: int = 3, replicas: int = 1
) -> Iterator[RedisClusterNodes]:
    """A started cluster, stopped (every node killed) on exit."""
    nodes = RedisClusterNodes(workdir, masters, replicas)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()
