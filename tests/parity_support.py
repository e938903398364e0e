"""Shared pieces of the billing-parity tests (issue 10): an app with everything connected.

The app has an ADMIN_TOKEN, Clerk sessions (the local JWKS) and Polar (the
session's fake); TEST_CONFIG keeps notifications on this machine and their
retries short.
"""

from __future__ import annotations

import dataclasses
import tomllib
import uuid
from decimal import Decimal

from aiohttp.test_utils import TestClient

from creditgate.config import Settings, parse_config
from tests.billing_support import (
    CLERK_WEBHOOK_SECRET,
    POLAR_WEBHOOK_SECRET,
    billing_toml,
)
from tests.conftest import Services
from tests.fake_clerk import ISSUER, PARTY, FakeClerk
from tests.logcapture import remember_secret
from tests.polar_fake import TOKEN

ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
remember_secret(ADMIN_TOKEN)


def parity_settings(
    services: Services,
    upstream_url: str,
    *,
    polar_url: str | None,
    clerk: FakeClerk | None = None,
    extra_toml: str = "",
) -> Settings:
    """Settings with admin token, Polar (``polar_url``; None: off) and Clerk (if given)."""
    raw = tomllib.loads(billing_toml(upstream_url, extra_toml), parse_float=Decimal)
    settings = Settings(
        config=parse_config(raw, {}),
        database_url=services.database_url,
        redis_url=services.redis_url,
        admin_token=ADMIN_TOKEN,
        polar_access_token=TOKEN if polar_url else None,
        polar_base_url=polar_url,
        polar_webhook_secret=POLAR_WEBHOOK_SECRET,
        clerk_webhook_secret=CLERK_WEBHOOK_SECRET,
    )
    if clerk is not None:
        settings = dataclasses.replace(
            settings,
            clerk_jwks_url=clerk.url,
            clerk_issuer=ISSUER,
            clerk_authorized_parties=(PARTY,),
        )
    return settings


async def signed_in(app: TestClient, clerk: FakeClerk) -> tuple[dict[str, str], str]:
    """A new Clerk user's session headers, and the account creditgate made for it."""
    headers = {"Authorization": f"Bearer {clerk.token(f'user_{uuid.uuid4().hex}')}"}
    resp = await app.get("/api/user/balance", headers=headers)
    assert resp.status == 200
    return headers, (await resp.json())["data"]["accountId"]
