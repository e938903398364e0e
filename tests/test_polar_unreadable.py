"""An answer polar-sdk cannot read is a Polar failure like any other.

polar-sdk raises a bare ValueError on a 200 whose body is not JSON; it used to
escape every ``except PolarError`` (a 500 on checkout, portal and subscription
routes, and the end of usage export in that process)."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from polar import PolarError
from polar.v2026_10 import PolarAsync

from creditgate.billing.client import PolarUnreadable, call_with_retries
from tests.billing_support import billing_config


async def test_a_200_that_is_not_json_is_a_polar_error() -> None:
    async def garbage(request: web.Request) -> web.Response:
        return web.Response(text="<html>maintenance</html>", content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", garbage)
    server = TestServer(app)
    await server.start_server()
    try:
        polar = PolarAsync("polar_test", base_url=str(server.make_url("")))
        with pytest.raises(PolarError) as raised:
            await call_with_retries(
                billing_config().polar, lambda: polar.checkouts.get("co_1"), attempts=1
            )
        assert isinstance(raised.value, PolarUnreadable)
    finally:
        await server.close()
