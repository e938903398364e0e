"""``GET /api/quota/check``: would a call of this size be admitted now? Changes nothing.

It asks exactly what a completion's admission does, in the same order, and
takes nothing: the throttle's check mode (every limit of the account and key,
in one read-only script call) and the credit check (the worst-case cost — the
prompt tokens plus ``max_tokens`` at the model's prices — against the
available balance plus the overdraft limit, as the hold's statement tests it).
A real call refused by both is refused by the throttle first (429), so
``reason`` names the throttle then.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from creditgate import ledger
from creditgate.auth import Principal, authenticate
from creditgate.config import Model
from creditgate.errors import ModelNotFound, ValidationError
from creditgate.http.params import Problems, parse_int
from creditgate.http.state import STATE, State
from creditgate.proxy.pricing import worst_case_micros
from creditgate.throttle import LIMIT_NAMES, Standing, format_duration
from creditgate.webkit.envelope import data_response
from creditgate.webkit.openapi import (
    BOOL,
    CREDITS,
    INT,
    MICROS,
    NUM,
    STR,
    Endpoint,
    Param,
    Schema,
    nullable,
    obj,
)

MAX_PROMPT_TOKENS = 10**9
# The limits' names in the answer, in LIMIT_NAMES order.
_LIMIT_KEYS = dict(zip(LIMIT_NAMES, ("requests", "tokens", "parallel", "daily"), strict=True))


async def resolve_model(st: State, principal: Principal, name: str | None) -> Model:
    """The model named, else the account's ``defaultModel``; 400 / 404 otherwise."""
    if name is None:
        name = await st.default_models.get(principal.account_id)
        if name is None:
            raise ValidationError(
                "No model given, and the account has no defaultModel (see /api/preferences).",
                details=[{"path": "model", "message": "required: the name of a model"}],
            )
    model = st.settings.config.models.get(name)
    if model is None:
        raise ModelNotFound(
            f"The model {name!r} does not exist or is not served here; see GET /v1/models.",
            details=[{"path": "model", "message": "unknown model"}],
        )
    return model


def _standing_json(s: Standing) -> dict[str, Any]:
    return {
        "limit": s.limit,
        "remaining": s.remaining,
        "reset": None if s.reset_ms is None else format_duration(s.reset_ms),
        "resetSeconds": None if s.reset_ms is None else s.reset_ms / 1000,
    }


async def quota_check(request: web.Request) -> web.Response:
    """``{allowed, reason, worstCaseCost…, available…, limits}`` for a call of this size."""
    st = request.app[STATE]
    principal = await authenticate(request)
    q = request.query
    problems: Problems = []
    for name in ("model", "max_tokens", "prompt_tokens"):
        if len(q.getall(name, [])) > 1:
            problems.append({"path": name, "message": "given more than once"})
    prompt = 0
    if "prompt_tokens" in q:
        parsed = parse_int(
            q["prompt_tokens"], "prompt_tokens", problems, low=0, high=MAX_PROMPT_TOKENS
        )
        prompt = parsed or 0
    cap: int | None = None
    if "max_tokens" in q:
        cap = parse_int(q["max_tokens"], "max_tokens", problems, low=1, high=MAX_PROMPT_TOKENS)
    if problems:
        raise ValidationError("The quota check has invalid parameters.", details=problems)
    model = await resolve_model(st, principal, q.get("model") or None)
    if cap is None:
        cap = model.max_output_tokens
    elif cap > model.max_output_tokens:
        # The completion itself would be refused (400) for this.
        raise ValidationError(
            f"max_tokens: at most {model.max_output_tokens} for {model.name}, got {cap}",
            details=[
                {
                    "path": "max_tokens",
                    "message": f"at most {model.max_output_tokens} for {model.name}, got {cap}",
                }
            ],
        )
    worst = worst_case_micros(model, prompt, cap)
    limits = await st.limits.get(principal.account_id, principal.key_id)
    check = await st.throttle.check(limits, prompt + cap, required_tokens=prompt)
    bal = await ledger.get_balance(st.db, principal.account_id)
    room = bal.available + bal.overdraft_limit
    fits = worst <= room
    # The key's budget, as the reserve would test it (the tighter of the two is named).
    budget = (
        await ledger.key_budget(st.db, principal.key_id, st.settings.config.throttle.day_zone)
        if principal.key_id is not None
        else None
    )
    reason = None
    if not check.allowed:
        reason = "RATE_LIMITED"
    elif budget is not None and worst > budget.remaining and (fits or budget.remaining <= room):
        reason = "KEY_BUDGET_EXCEEDED"
    elif not fits:
        reason = "INSUFFICIENT_CREDITS"
    return data_response(
        request,
        {
            "allowed": reason is None,
            "reason": reason,
            "limit": check.limit,
            "retryAfter": check.retry_after,
            "model": model.name,
            "promptTokens": prompt,
            "maxTokens": cap,
            "worstCaseCost": ledger.micros_to_credits(worst),
            "worstCaseCostMicros": worst,
            "available": ledger.micros_to_credits(bal.available),
            "availableMicros": bal.available,
            "overdraftLimit": ledger.micros_to_credits(bal.overdraft_limit),
            "overdraftLimitMicros": bal.overdraft_limit,
            "limits": {_LIMIT_KEYS[name]: _standing_json(s) for name, s in check.standings.items()},
        },
    )


_STANDING: Schema = obj(
    {
        "limit": INT,
        "remaining": nullable(INT),
        "reset": nullable({**STR, "description": "until full again, e.g. 1s, 6m0s"}),
        "resetSeconds": nullable(NUM),
    },
    "limit",
    "remaining",
    "reset",
    "resetSeconds",
)
QUOTA_CHECK: Schema = obj(
    {
        "allowed": BOOL,
        "reason": nullable(
            {"enum": ["RATE_LIMITED", "INSUFFICIENT_CREDITS", "KEY_BUDGET_EXCEEDED"]}
        ),
        "limit": nullable({"enum": list(LIMIT_NAMES)}),
        "retryAfter": nullable(INT),
        "model": STR,
        "promptTokens": INT,
        "maxTokens": INT,
        "worstCaseCost": CREDITS,
        "worstCaseCostMicros": MICROS,
        "available": CREDITS,
        "availableMicros": MICROS,
        "overdraftLimit": CREDITS,
        "overdraftLimitMicros": MICROS,
        "limits": obj({name: _STANDING for name in _LIMIT_KEYS.values()}, *_LIMIT_KEYS.values()),
    },
    "allowed",
    "reason",
    "limit",
    "retryAfter",
    "model",
    "promptTokens",
    "maxTokens",
    "worstCaseCost",
    "worstCaseCostMicros",
    "available",
    "availableMicros",
    "overdraftLimit",
    "overdraftLimitMicros",
    "limits",
)
ENDPOINTS = (
    Endpoint(
        "GET",
        "/api/quota/check",
        quota_check,
        "Would a call of this size be admitted now? (takes nothing)",
        "account",
        "caller",
        response=QUOTA_CHECK,
        errors=(400, 404, 503),
        params=(
            Param("model", STR, description="the model; default: the account's defaultModel"),
            Param(
                "max_tokens",
                {**INT, "minimum": 1},
                description="the output cap; default: the model's max_output_tokens",
            ),
            Param(
                "prompt_tokens",
                {**INT, "minimum": 0, "maximum": MAX_PROMPT_TOKENS},
                description="the prompt's size in tokens (default 0)",
            ),
        ),
    ),
)
