"""The baseline of issue 9: a bare aiohttp pass-through proxy, and nothing else.

    .venv/bin/python bench/bare_proxy.py --port 8081 --upstream http://127.0.0.1:8080/v1

Every ``POST /v1/...`` is forwarded to the same path under ``--upstream`` on
one pooled client session, and the answer relayed: a JSON body whole, an SSE
stream read by read as it arrives. No auth, no validation, no metering, no
metrics, no logs — what any aiohttp proxy pays just to be in the path, so
``bench/proxy_bench.py`` can show what creditgate adds on top of it.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)
_FORWARDED = {"Content-Type": "application/json"}


async def forward(request: web.Request) -> web.StreamResponse:
    """Send the request's body upstream; relay the answer, streamed if it streams."""
    body = await request.read()
    url = request.app[UPSTREAM] + request.match_info["tail"]
    headers = dict(_FORWARDED)
    if "anthropic-version" in request.headers:  # the Messages API requires it
        headers["anthropic-version"] = request.headers["anthropic-version"]
    async with request.app[SESSION].post(url, data=body, headers=headers) as upstream:
        content_type = upstream.headers.get("Content-Type", "application/json")
        if not content_type.startswith("text/event-stream"):
            return web.Response(
                body=await upstream.read(),
                status=upstream.status,
                headers={"Content-Type": content_type},
            )
        resp = web.StreamResponse(status=upstream.status, headers={"Content-Type": content_type})
        await resp.prepare(request)
        async for chunk in upstream.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


async def health(request: web.Request) -> web.Response:
    """Answers once the server is up (the harness waits for it)."""
    return web.Response(text="ok")


async def _session(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
        skip_auto_headers=("User-Agent",),
    )
    yield
    await app[SESSION].close()


def create_app(upstream: str) -> web.Application:
    """The pass-through app, forwarding to ``upstream`` (a base URL ending in ``/v1``)."""
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/") + "/"
    app.cleanup_ctx.append(_session)
    app.router.add_post("/v1/{tail:.+}", forward)
    app.router.add_get("/health", health)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:8080/v1")
    args = parser.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    web.run_app(
        create_app(args.upstream), host="127.0.0.1", port=args.port, print=None, access_log=None
    )
