"""``GET /api/preferences`` and ``PATCH /api/preferences``: the caller's account's settings.

* ``lowBalanceThreshold`` (credits, or null): when a charge leaves the
  available balance below it, one ``creditgate_low_balance_total`` increment
  and one signed webhook to ``notificationUrl`` — once per crossing (the
  database decides, see ``ledger.alerts``).
* ``notificationUrl`` (http or https, or null): where that webhook goes,
  signed with the account's Standard Webhooks secret. The secret is made when
  a URL is first set (or on ``rotateSigningSecret: true``) and is in that
  PATCH's answer only, as ``signingSecret``.
* ``defaultModel`` (a served model, or null): used by completions and quota
  checks that name no model.

Only the caller's account is ever read or changed (API key or session).
"""

from __future__ import annotations

from typing import Any

import yarl
from aiohttp import web

from creditgate import ledger
from creditgate.auth import authenticate
from creditgate.errors import ValidationError
from creditgate.http.params import Problems
from creditgate.http.state import STATE
from creditgate.logs import log
from creditgate.preferences import UNSET, Changes, get_preferences, update_preferences
from creditgate.webkit.envelope import data_response, read_json_object
from creditgate.webkit.openapi import (
    BOOL,
    CREDITS,
    CREDITS_TEXT,
    MICROS,
    STR,
    TIME,
    UUID,
    Endpoint,
    Schema,
    nullable,
    obj,
)
from creditgate.webkit.textguard import has_control

MAX_URL = 2048
_FIELDS = ("lowBalanceThreshold", "notificationUrl", "defaultModel", "rotateSigningSecret")


def _url(value: Any, problems: Problems, allowed_hosts: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        problems.append({"path": "notificationUrl", "message": "an http(s) URL, or null"})
        return None
    message = None
    try:
        url = yarl.URL(value)
    except ValueError:
        url = None
    if len(value) > MAX_URL:
        message = f"at most {MAX_URL} characters"
    elif has_control(value) or any(c.isspace() for c in value):
        # yarl keeps them; Postgres refuses NUL, and a sender must not get the rest.
        message = "must not contain spaces or control characters"
    elif url is None or url.scheme not in ("http", "https") or not url.host:
        message = "must be an absolute http:// or https:// URL"
    elif url.user is not None or url.password is not None:
        message = "must not carry credentials; authenticate the webhook by its signature"
    elif url.fragment:
        message = "must not have a #fragment"
    elif allowed_hosts and url.host.lower() not in allowed_hosts:
        message = f"this deployment sends notifications only to {', '.join(allowed_hosts)}"
    if message is not None:
        problems.append({"path": "notificationUrl", "message": message})
        return None
    return value


def parse_patch(body: dict[str, Any], models: Any, allowed_hosts: tuple[str, ...] = ()) -> Changes:
    """The changes a PATCH body asks for; ValidationError (400) listing every problem."""
    problems: Problems = [
        {"path": name, "message": f"unknown field (allowed: {', '.join(_FIELDS)})"}
        for name in sorted(set(body) - set(_FIELDS))
    ]
    if not body:
        problems.append({"path": "", "message": f"nothing to change: send one of {_FIELDS}"})
    threshold: Any = UNSET
    if "lowBalanceThreshold" in body:
        value = body["lowBalanceThreshold"]
        threshold = None
        if value is not None:
            try:
                threshold = ledger.credits_to_micros(value)
            except ValueError as e:
                problems.append({"path": "lowBalanceThreshold", "message": str(e)})
            else:
                if threshold < 0:
                    problems.append(
                        {"path": "lowBalanceThreshold", "message": "must not be negative"}
                    )
    url: Any = UNSET
    if "notificationUrl" in body:
        url = _url(body["notificationUrl"], problems, allowed_hosts)
    model: Any = UNSET
    if "defaultModel" in body:
        model = body["defaultModel"]
        if model is not None and (not isinstance(model, str) or model not in models):
            problems.append(
                {
                    "path": "defaultModel",
                    "message": "one of the models served here (GET /v1/models), or null",
                }
            )
    rotate = body.get("rotateSigningSecret", False)
    if not isinstance(rotate, bool):
        problems.append({"path": "rotateSigningSecret", "message": "true or false"})
    if problems:
        raise ValidationError("The preferences are invalid.", details=problems)
    return Changes(threshold, url, model, rotate is True)


async def get_prefs(request: web.Request) -> web.Response:
    """The caller's account's preferences (never the signing secret itself)."""
    st = request.app[STATE]
    principal = await authenticate(request)
    prefs = await get_preferences(st.db, principal.account_id)
    return data_response(request, prefs.as_json())


async def patch_prefs(request: web.Request) -> web.Response:
    """Change the caller's account's preferences; a new signing secret is shown here once."""
    st = request.app[STATE]
    principal = await authenticate(request)
    config = st.settings.config
    changes = parse_patch(
        await read_json_object(request), config.models, config.notifications.allowed_hosts
    )
    prefs, secret = await update_preferences(st.db, principal.account_id, changes)
    st.default_models.forget(principal.account_id)  # this process uses the new one at once
    log.info(
        "preferences changed",
        extra={"account_id": str(principal.account_id), "new_signing_secret": secret is not None},
    )
    out = prefs.as_json()
    if secret is not None:
        out["signingSecret"] = secret
    return data_response(request, out)


_VIEW: dict[str, Schema] = {
    "accountId": UUID,
    "lowBalanceThreshold": nullable(CREDITS),
    "lowBalanceThresholdMicros": nullable(MICROS),
    "lowBalance": {
        **BOOL,
        "description": "available crossed below the threshold and has not been back above",
    },
    "notificationUrl": nullable(STR),
    "defaultModel": nullable(STR),
    "signingSecretPrefix": nullable(
        {**STR, "description": "the first characters of the signing secret"}
    ),
    "signingSecretCreatedAt": nullable(TIME),
    "updatedAt": nullable(TIME),
}
PREFERENCES: Schema = obj(_VIEW, *_VIEW)
PREFERENCES_PATCH: Schema = {
    **obj(
        {
            "lowBalanceThreshold": nullable({"oneOf": [{**CREDITS, "minimum": 0}, CREDITS_TEXT]}),
            "notificationUrl": nullable({**STR, "pattern": "^https?://", "maxLength": MAX_URL}),
            "defaultModel": nullable({**STR, "description": "a model served here"}),
            "rotateSigningSecret": {**BOOL, "description": "true: make a new signing secret"},
        }
    ),
    "minProperties": 1,
}
PREFERENCES_CHANGED: Schema = obj(
    {
        **_VIEW,
        "signingSecret": {
            **STR,
            "description": "the new signing secret (whsec_…): shown in this answer only",
        },
    },
    *_VIEW,
)
ENDPOINTS = (
    Endpoint(
        "GET",
        "/api/preferences",
        get_prefs,
        "The caller's preferences: low-balance threshold, notification URL, default model",
        "account",
        "caller",
        response=PREFERENCES,
        errors=(503,),
    ),
    Endpoint(
        "PATCH",
        "/api/preferences",
        patch_prefs,
        "Change the caller's preferences (a new signing secret is shown here once)",
        "account",
        "caller",
        request=PREFERENCES_PATCH,
        response=PREFERENCES_CHANGED,
        errors=(503,),
    ),
)
