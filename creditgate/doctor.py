"""``creditgate doctor``: check a deployment's settings and services, one line per check.

Each check answers ``ok``, ``warn`` (works, but probably not what you want),
``fail`` (something will not work) or ``skip`` (not configured, on purpose).
The command exits 1 when any check fails. It reads settings exactly like
``serve`` and never prints a secret: URLs are reduced to host and port.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

import aiohttp
import asyncpg

from creditgate import migrations
from creditgate.config import ConfigError, Settings, load_settings
from creditgate.ledger.role_report import role_report

TIMEOUT = 5.0  # seconds per network check


# A check's verdict; any "fail" makes `creditgate doctor` exit 1.
CheckStatus = Literal["ok", "warn", "fail", "skip"]


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: CheckStatus
    detail: str

    def as_json(self) -> dict[str, str]:
        """``{name, status, detail}``."""
        return {"name": self.name, "status": self.status, "detail": self.detail}

    def line(self) -> str:
        """``ok    database    reachable …``: the check as one aligned line."""
        return f"{self.status:<5} {self.name:<22} {self.detail}"


def where(url: str) -> str:
    """``host:port`` of a URL (each seed's, for a Redis Cluster): enough to recognise
    it, never its password."""
    from creditgate.throttle.cluster import is_cluster_url, parse_cluster_url

    try:
        if is_cluster_url(url):
            seeds = parse_cluster_url(url).seeds
            return "cluster " + ",".join(f"{host}:{port}" for host, port in seeds)
        parts = urlsplit(url)
        if parts.scheme == "unix":
            return parts.path
        return f"{parts.hostname or 'localhost'}:{parts.port or '-'}"
    except ValueError:
        return "(not a valid URL)"


async def run_checks(env: dict[str, str] | None = None) -> list[Check]:
    """Every check, in the order an operator fixes them."""
    try:
        settings = load_settings(env)
    except ConfigError as e:
        return [Check("configuration", "fail", str(e))]
    checks = [Check("configuration", "ok", "settings and config file are valid")]
    checks += await _database(settings)
    checks.append(await _redis(settings))
    checks += await _upstreams(settings)
    checks.append(_polar(settings))
    checks += await _clerk(settings)
    return checks


async def _database(settings: Settings) -> list[Check]:
    url = settings.database_url
    if url is None:
        return [Check("database", "fail", "DATABASE_URL is not set")]
    try:
        conn = await asyncpg.connect(url, timeout=TIMEOUT)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        reason = type(e).__name__ if isinstance(e, TimeoutError) else str(e).splitlines()[0]
        return [Check("database", "fail", f"cannot connect to {where(url)}: {reason}")]
    try:
        out = [Check("database", "ok", f"reachable at {where(url)}")]
        role = await role_report(conn)
        if role.missing:
            out.append(
                Check("database role", "fail", f"{role.name} lacks {', '.join(role.missing)}")
            )
        elif role.superuser:
            out.append(
                Check(
                    "database role",
                    "warn",
                    f"{role.name} is a superuser: serve with a role that can only use the ledger",
                )
            )
        else:
            out.append(Check("database role", "ok", f"{role.name} may use the ledger tables"))
        try:
            todo = await migrations.pending(conn)
        except migrations.MigrationError as e:
            out.append(Check("migrations", "fail", str(e)))
        else:
            if todo:
                detail = f"{len(todo)} pending ({', '.join(todo)}): run 'creditgate migrate'"
                out.append(Check("migrations", "fail", detail))
            else:
                out.append(Check("migrations", "ok", "all applied"))
        return out
    finally:
        await conn.close()


async def _redis(settings: Settings) -> Check:
    from creditgate.throttle.cluster import make_client

    url = settings.redis_url
    if url is None:
        return Check("redis", "fail", "REDIS_URL is not set")
    client = None
    try:
        # The client the server uses: RedisCluster for a redis+cluster:// URL.
        client = make_client(url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT)
        await client.ping()
    except Exception as e:  # any failure is the answer: not reachable (or not a Redis URL)
        return Check("redis", "fail", f"cannot reach {where(url)}: {type(e).__name__}")
    finally:
        if client is not None:
            await client.aclose()
    return Check("redis", "ok", f"reachable at {where(url)}")


async def _upstreams(settings: Settings) -> list[Check]:
    upstreams = {
        d.upstream.name: d.upstream for m in settings.config.models.values() for d in m.deployments
    }
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    out: list[Check] = []
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for name, up in sorted(upstreams.items()):
            label = f"upstream {name}"
            if up.api_key_env and not up.api_key:
                out.append(Check(f"{label} key", "fail", f"{up.api_key_env} is not set"))
            elif up.api_key_env:
                out.append(Check(f"{label} key", "ok", f"{up.api_key_env} is set"))
            try:
                # Any HTTP answer (even 401 or 404) means the host is there.
                async with http.get(up.base_url + "/models") as resp:
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as e:
                detail = f"{up.base_url} did not answer: {type(e).__name__}"
                out.append(Check(label, "fail", detail))
            else:
                out.append(Check(label, "ok", f"{up.base_url} answers (HTTP {status})"))
    return out


def _polar(settings: Settings) -> Check:
    if settings.polar_access_token is None:
        return Check("polar", "skip", "POLAR_ACCESS_TOKEN is not set: no usage export, no checkout")
    if settings.polar_webhook_secret is None:
        return Check(
            "polar",
            "fail",
            "POLAR_WEBHOOK_SECRET is not set: orders and refunds would never credit accounts",
        )
    return Check("polar", "ok", f"configured ({settings.polar_environment})")


async def _clerk(settings: Settings) -> list[Check]:
    url = settings.clerk_jwks_url
    if url is None:
        return [Check("clerk", "skip", "CLERK_JWKS_URL is not set: only API keys authenticate")]
    out: list[Check] = []
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as http,
            http.get(url) as resp,
        ):
            body = await resp.json(content_type=None) if resp.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        out.append(
            Check("clerk", "fail", f"JWKS at {where(url)} did not answer: {type(e).__name__}")
        )
    else:
        if isinstance(body, dict) and isinstance(body.get("keys"), list) and body["keys"]:
            out.append(Check("clerk", "ok", f"JWKS at {where(url)} has {len(body['keys'])} key(s)"))
        else:
            out.append(Check("clerk", "fail", f"JWKS at {where(url)} returned no keys"))
    if settings.clerk_webhook_secret is None:
        out.append(
            Check(
                "clerk webhooks",
                "warn",
                "CLERK_WEBHOOK_SECRET is not set: deleted users keep their accounts open",
            )
        )
    return out


def run(env: dict[str, str] | None = None) -> list[Check]:
    """``run_checks`` from synchronous code."""
    return asyncio.run(run_checks(env))
