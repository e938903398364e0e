"""Per-account preferences: notification URL, signing secret, default model, threshold.

The low-balance threshold lives on the balance row (``ledger.alerts``), where
the crossing trigger can see it; the rest in ``account_preferences``. Every
function is scoped to one account id, the caller's.
"""

from __future__ import annotations

import base64
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from creditgate import ledger
from creditgate.errors import NotFound
from creditgate.ledger.db import Db, transaction
from creditgate.ledger.entries import iso

SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's prefix, not a secret
_SHOWN_PREFIX = len(SECRET_PREFIX) + 4  # what GET shows to tell secrets apart
UNSET: Any = object()  # a PATCH field not sent (None means "clear it")


def new_signing_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True, slots=True)
class Preferences:
    account_id: uuid.UUID
    low_balance_threshold: int | None  # µc
    low_balance_below: bool
    notification_url: str | None
    default_model: str | None
    signing_secret_prefix: str | None  # "whsec_AbCd" — never the whole secret
    signing_secret_created_at: datetime | None
    updated_at: datetime | None

    def as_json(self) -> dict[str, Any]:
        """The API's view (``GET /api/preferences``)."""
        threshold = self.low_balance_threshold
        return {
            "accountId": str(self.account_id),
            "lowBalanceThreshold": None
            if threshold is None
            else ledger.micros_to_credits(threshold),
            "lowBalanceThresholdMicros": threshold,
            "lowBalance": self.low_balance_below,
            "notificationUrl": self.notification_url,
            "defaultModel": self.default_model,
            "signingSecretPrefix": self.signing_secret_prefix,
            "signingSecretCreatedAt": iso(self.signing_secret_created_at)
            if self.signing_secret_created_at
            else None,
            "updatedAt": iso(self.updated_at) if self.updated_at else None,
        }


@dataclass(frozen=True, slots=True)
class Changes:
    """What a PATCH sets; ``UNSET`` leaves a field as it is, None clears it."""

    low_balance_threshold: Any = UNSET  # int µc | None
    notification_url: Any = UNSET  # str | None
    default_model: Any = UNSET  # str | None
    rotate_signing_secret: bool = False


_SELECT = """
SELECT b.account_id, b.low_balance_threshold, b.low_balance_below,
       p.notification_url, p.default_model, p.signing_secret, p.signing_secret_created_at,
       p.updated_at
FROM account_balances b LEFT JOIN account_preferences p USING (account_id)
WHERE b.account_id = $1
"""


def _from_row(row: Any) -> Preferences:
    secret = row["signing_secret"]
    return Preferences(
        account_id=row["account_id"],
        low_balance_threshold=row["low_balance_threshold"],
        low_balance_below=row["low_balance_below"],
        notification_url=row["notification_url"],
        default_model=row["default_model"],
        signing_secret_prefix=secret[:_SHOWN_PREFIX] if secret else None,
        signing_secret_created_at=row["signing_secret_created_at"],
        updated_at=row["updated_at"],
    )


async def get_preferences(db: Db, account_id: uuid.UUID) -> Preferences:
    """The account's preferences (defaults where none were set)."""
    row = await db.fetchrow(_SELECT, account_id)
    if row is None:
        raise NotFound("no such account")
    return _from_row(row)


async def update_preferences(
    db: Db, account_id: uuid.UUID, changes: Changes
) -> tuple[Preferences, str | None]:
    """Apply ``changes`` in one transaction; the preferences and a new secret, if one was made.

    A signing secret is made when a notification URL is set and the account
    has none yet, or when ``rotate_signing_secret`` asks for a new one. The
    secret is returned here only: it is the one time it is shown.
    """
    async with transaction(db) as conn:
        if changes.low_balance_threshold is not UNSET:
            await ledger.set_low_balance_threshold(conn, account_id, changes.low_balance_threshold)
        await conn.execute(
            "INSERT INTO account_preferences (account_id) VALUES ($1)"
            " ON CONFLICT (account_id) DO NOTHING",
            account_id,
        )
        current = await conn.fetchrow(
            "SELECT notification_url, default_model, signing_secret FROM account_preferences"
            " WHERE account_id = $1 FOR UPDATE",
            account_id,
        )
        assert current is not None
        url = current["notification_url"]
        if changes.notification_url is not UNSET:
            url = changes.notification_url
        model = current["default_model"]
        if changes.default_model is not UNSET:
            model = changes.default_model
        secret: str | None = None
        if changes.rotate_signing_secret or (url is not None and current["signing_secret"] is None):
            secret = new_signing_secret()
        await conn.execute(
            """
            UPDATE account_preferences
            SET notification_url = $2, default_model = $3,
                signing_secret = COALESCE($4, signing_secret),
                signing_secret_created_at = CASE WHEN $4::text IS NULL
                                                 THEN signing_secret_created_at ELSE now() END,
                updated_at = now()
            WHERE account_id = $1
            """,
            account_id,
            url,
            model,
            secret,
        )
        row = await conn.fetchrow(_SELECT, account_id)
    return _from_row(row), secret


async def delivery_target(db: Db, account_id: uuid.UUID) -> tuple[str, str] | None:
    """(notification URL, signing secret) of the account, or None without a URL."""
    row = await db.fetchrow(
        "SELECT notification_url, signing_secret FROM account_preferences"
        " WHERE account_id = $1 AND notification_url IS NOT NULL AND signing_secret IS NOT NULL",
        account_id,
    )
    if row is None:
        return None
    return row["notification_url"], row["signing_secret"]
