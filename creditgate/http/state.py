"""What a running app holds: settings and the shared clients, made at start.

The outermost layer: it may import every package. Nothing below ``http/``
imports it; they read the narrow views it satisfies as it is —
``resources.Resources`` and ``proxy.ports.ChatDeps`` — stored by
``http.app`` under their own app keys (ARCHITECTURE.md, "Layers").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg
import redis.asyncio as aioredis
from aiohttp import web
from redis.asyncio.cluster import RedisCluster

from creditgate.auth import ApiKeyAuth
from creditgate.config import Settings
from creditgate.ledger.group_commit import GroupCommit
from creditgate.preferences.cache import DefaultModels
from creditgate.proxy.upstream import UpstreamClient
from creditgate.throttle import LimitsCache, Throttle


@dataclass(slots=True)
class State:
    settings: Settings
    # Made in the app's startup (http.app._resources):
    db: asyncpg.Pool = field(init=False)
    # Balance and usage reads: a replica's pool (DATABASE_READ_URL), or db
    # itself. Never used for anything a money decision rests on.
    read_db: asyncpg.Pool = field(init=False)
    holds: GroupCommit = field(init=False)  # reserve/settle with group commit, on db
    redis: aioredis.Redis | RedisCluster = field(init=False)  # throttle.cluster.make_client
    throttle: Throttle = field(init=False)
    limits: LimitsCache = field(init=False)
    upstream: UpstreamClient = field(init=False)
    keys: ApiKeyAuth = field(init=False)
    default_models: DefaultModels = field(init=False)  # per account, for requests naming none


STATE = web.AppKey("creditgate", State)
