"""``POST /api/usage/record``: usage that did not go through the proxy, charged to the ledger.

Server-to-server metering: an app that called a provider directly, a batch
job. The body is either token counts priced at the model's configured prices
(``{model, inputTokens, outputTokens}``, or ``{model, tokens}`` with the
tokens by kind as ``GET /api/user/usage`` shows them, each kind at its price)
or an explicit ``{cost}`` in credits
(``model`` then optional and free text), plus ``idempotencyKey`` and, for an
admin, the ``account``. The charge is a debit with its hold, like a
completion's (``ledger.record_usage``), so the balance row's CHECK, the
idempotency key and the Polar usage export apply to it unchanged. It is not
throttled: the usage already happened.

Who may call it: an admin (any account; ``account`` required with
ADMIN_TOKEN), or an API key with the ``usage:write`` scope (its own account
only; naming another is a 403).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiohttp import web

from creditgate import ledger
from creditgate.auth import AdminCaller, Principal, require_usage_writer
from creditgate.errors import Forbidden, ModelNotFound, ValidationError
from creditgate.http.params import Problems, parse_text, parse_time
from creditgate.http.state import STATE
from creditgate.http.user import TOKEN_BREAKDOWN
from creditgate.ledger.history import KINDS, camel
from creditgate.logs import log
from creditgate.proxy.pricing import TokenCounts, cost_of
from creditgate.proxy.validation import is_int
from creditgate.webkit.envelope import read_json_object, written_response
from creditgate.webkit.ids import REQUEST_ID
from creditgate.webkit.openapi import (
    BOOL,
    CREDITS,
    CREDITS_TEXT,
    INT,
    MICROS,
    STR,
    TIME,
    UUID,
    Endpoint,
    Schema,
    nullable,
    obj,
)

_FIELDS = {
    "account",
    "model",
    "inputTokens",
    "outputTokens",
    "tokens",
    "cost",
    "idempotencyKey",
    "occurredAt",
    "metadata",
    "allowOverdraft",
}
MAX_KEY = 200
MAX_MODEL = 200
MAX_TOKENS = 2**31 - 1
MAX_METADATA_KEYS = 50
MAX_METADATA_BYTES = 4096
# occurredAt may be this far ahead of our clock (the caller's may run fast).
CLOCK_SKEW = timedelta(minutes=5)


def _tokens(body: dict[str, Any], name: str, problems: Problems) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not is_int(value) or not 0 <= value <= MAX_TOKENS:
        problems.append({"path": name, "message": f"an integer from 0 to {MAX_TOKENS}"})
        return None
    return value


# The ``tokens`` object's keys (the usage API's names) → TokenCounts' fields.
TOKEN_KEYS = {camel(k): k for k in KINDS}


def _token_counts(
    body: dict[str, Any], input_tokens: int | None, output_tokens: int | None, problems: Problems
) -> TokenCounts | None:
    """The body's tokens by kind (``tokens``, as GET /api/user/usage shows them),
    with the totals from ``tokens`` or ``inputTokens``/``outputTokens`` (which must
    agree when both are given); None when the body gives no tokens at all."""
    value = body.get("tokens")
    if value is None:
        if input_tokens is None or output_tokens is None:
            return None
        return TokenCounts(input_tokens, output_tokens)
    if not isinstance(value, dict):
        problems.append({"path": "tokens", "message": "an object of token counts by kind"})
        return None
    found = len(problems)
    kinds: dict[str, int] = {}
    for key, n in value.items():
        path = f"tokens.{key}"
        if key not in TOKEN_KEYS:
            problems.append(
                {"path": path, "message": f"unknown kind; one of {', '.join(TOKEN_KEYS)}"}
            )
        elif not is_int(n) or not 0 <= n <= MAX_TOKENS:
            problems.append({"path": path, "message": f"an integer from 0 to {MAX_TOKENS}"})
        else:
            kinds[TOKEN_KEYS[key]] = n
    for kind, total in (("input", input_tokens), ("output", output_tokens)):
        if total is None:
            continue
        if kind not in kinds:
            kinds[kind] = total
        elif kinds[kind] != total:
            name = "inputTokens" if kind == "input" else "outputTokens"
            problems.append({"path": f"tokens.{kind}", "message": f"differs from {name}"})
    for kind, name in (("input", "inputTokens"), ("output", "outputTokens")):
        if kind not in kinds and len(problems) == found:
            problems.append({"path": f"tokens.{kind}", "message": f"required (or {name})"})
    if len(problems) > found:
        return None
    prompt_parts = kinds.get("cached_input", 0) + kinds.get("cache_write", 0)
    prompt_parts += kinds.get("audio_input", 0)
    if prompt_parts > kinds["input"]:
        problems.append(
            {
                "path": "tokens",
                "message": "cachedInput + cacheWrite + audioInput are parts of input:"
                " their sum must not exceed it",
            }
        )
    if kinds.get("audio_output", 0) + kinds.get("reasoning", 0) > kinds["output"]:
        problems.append(
            {
                "path": "tokens",
                "message": "audioOutput + reasoning are parts of output: their sum must"
                " not exceed it",
            }
        )
    for kind in ("accepted_prediction", "rejected_prediction"):
        if kinds.get(kind, 0) > kinds["output"]:
            problems.append(
                {"path": f"tokens.{camel(kind)}", "message": "part of output: at most output"}
            )
    if len(problems) > found:
        return None
    part = kinds.get
    return TokenCounts(
        kinds["input"],
        kinds["output"],
        cached_input=part("cached_input", 0),
        cache_write=part("cache_write", 0),
        audio_input=part("audio_input", 0),
        audio_output=part("audio_output", 0),
        reasoning=part("reasoning", 0),
        accepted_prediction=part("accepted_prediction", 0),
        rejected_prediction=part("rejected_prediction", 0),
    )


def _metadata(value: Any, problems: Problems) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append({"path": "metadata", "message": "an object"})
        return {}
    if len(value) > MAX_METADATA_KEYS:
        problems.append({"path": "metadata", "message": f"at most {MAX_METADATA_KEYS} keys"})
    elif len(orjson.dumps(value)) > MAX_METADATA_BYTES:
        problems.append({"path": "metadata", "message": f"at most {MAX_METADATA_BYTES} bytes"})
    elif _has_nul(value):  # Postgres jsonb cannot hold a NUL character
        problems.append({"path": "metadata", "message": "no NUL (\\u0000) characters"})
    return value


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


class _Parsed:
    """A checked request body (every problem listed at once)."""

    def __init__(self, body: dict[str, Any], models: Any) -> None:
        problems: Problems = [
            {"path": name, "message": "unknown field"} for name in sorted(set(body) - _FIELDS)
        ]
        self.account_ref: str | None = None
        if body.get("account") is not None:
            self.account_ref = parse_text(body["account"], "account", 255, problems)
        self.key = parse_text(body.get("idempotencyKey"), "idempotencyKey", MAX_KEY, problems)
        self.input_tokens = _tokens(body, "inputTokens", problems)
        self.output_tokens = _tokens(body, "outputTokens", problems)
        self.counts = _token_counts(body, self.input_tokens, self.output_tokens, problems)
        if self.counts is not None:
            self.input_tokens, self.output_tokens = self.counts.input, self.counts.output
        self.model: str | None = None
        if body.get("model") is not None:
            self.model = parse_text(body["model"], "model", MAX_MODEL, problems)
        self.cost: int | None = None
        self.source = "explicit"
        if body.get("cost") is not None:
            try:
                self.cost = ledger.credits_to_micros(body["cost"])
            except ValueError as e:
                problems.append({"path": "cost", "message": str(e)})
            else:
                if self.cost < 0:
                    problems.append({"path": "cost", "message": "must not be negative"})
        else:
            self.source = "tokens"
            if body.get("model") is None:
                problems.append(
                    {"path": "model", "message": "required unless an explicit cost is given"}
                )
            if body.get("tokens") is None:
                for name in ("inputTokens", "outputTokens"):
                    if body.get(name) is None:
                        problems.append(
                            {
                                "path": name,
                                "message": "required unless tokens or an explicit cost is given",
                            }
                        )
        self.occurred_at: datetime | None = None
        if body.get("occurredAt") is not None:
            self.occurred_at = parse_time(body["occurredAt"], "occurredAt", problems)
            if self.occurred_at is not None and self.occurred_at > datetime.now(UTC) + CLOCK_SKEW:
                problems.append({"path": "occurredAt", "message": "must not be in the future"})
        self.metadata = _metadata(body.get("metadata"), problems)
        overdraft = body.get("allowOverdraft", False)
        if not isinstance(overdraft, bool):
            problems.append({"path": "allowOverdraft", "message": "true or false"})
            overdraft = False
        self.allow_overdraft: bool = overdraft
        if problems:
            raise ValidationError("The usage record is invalid.", details=problems)
        if self.cost is None:
            assert self.model is not None
            model = models.get(self.model)
            if model is None:
                raise ModelNotFound(
                    f"The model {self.model!r} is not priced here; send an explicit cost"
                    " or one of GET /v1/models.",
                    details=[{"path": "model", "message": "unknown model"}],
                )
            assert self.counts is not None
            # Priced by kind, at the model's table: a recorded usage reports no
            # upstream cost, so pricing = "upstream" models use their table too.
            self.cost = cost_of(model, self.counts)


def _recorded_by(caller: AdminCaller | Principal) -> str:
    principal = caller.principal if isinstance(caller, AdminCaller) else caller
    if principal is None:
        return "admin_token"
    if principal.key_id is not None:
        return f"api_key:{principal.key_id}"
    return f"session:{principal.user_id}"


async def record_usage(request: web.Request) -> web.Response:
    """Charge usage recorded from outside the proxy; 201 with the entry (the same on a replay).

    402 when the account cannot cover it (unless ``allowOverdraft`` and its
    overdraft limit can); 409 when the key was used with another body.
    """
    st = request.app[STATE]
    caller = await require_usage_writer(request)
    parsed = _Parsed(await read_json_object(request), st.settings.config.models)
    own = caller if isinstance(caller, Principal) else caller.principal
    if parsed.account_ref is not None:
        account = await ledger.resolve_account(st.db, parsed.account_ref)
        if isinstance(caller, Principal) and account.id != caller.account_id:
            raise Forbidden("A usage:write key records usage for its own account only.")
    elif own is not None:
        found = await ledger.get_account(st.db, own.account_id)
        assert found is not None
        account = found
    else:
        raise ValidationError(
            "Name the account to charge: ADMIN_TOKEN acts for no account.",
            details=[{"path": "account", "message": "required with ADMIN_TOKEN"}],
        )
    if account.status == "closed":
        raise Forbidden("This account is closed: it takes no new charges.")
    assert parsed.key is not None and parsed.cost is not None
    recorded = await ledger.record_usage(
        st.db,
        ledger.UsageRecord(
            account_id=account.id,
            client_key=parsed.key,
            cost=parsed.cost,
            cost_source=parsed.source,
            model=parsed.model,
            input_tokens=parsed.input_tokens,
            output_tokens=parsed.output_tokens,
            breakdown=parsed.counts.breakdown() if parsed.counts is not None else None,
            occurred_at=parsed.occurred_at,
            metadata=parsed.metadata,
            allow_overdraft=parsed.allow_overdraft,
            recorded_by=_recorded_by(caller),
            request_id=request[REQUEST_ID],
        ),
    )
    log.info(
        "usage recorded",
        extra={
            "account_id": str(account.id),
            "entry_id": str(recorded.entry_id),
            "cost_micros": recorded.cost,
            "replayed": recorded.replayed,
        },
    )
    return written_response(request, recorded.as_json(), replayed=recorded.replayed)


_TOKENS: Schema = {**INT, "minimum": 0, "maximum": MAX_TOKENS}
USAGE_RECORD_REQUEST: Schema = {
    **obj(
        {
            "account": {
                **STR,
                "description": "account id or Clerk user/org id; admins (a usage:write key"
                " records for its own account)",
            },
            "model": {**STR, "maxLength": MAX_MODEL},
            "inputTokens": _TOKENS,
            "outputTokens": _TOKENS,
            "tokens": {
                **obj({camel(k): _TOKENS for k in KINDS}),
                "description": "tokens by kind, as GET /api/user/usage shows them (priced by"
                " kind without an explicit cost); input and output may be given here or as"
                " inputTokens/outputTokens",
            },
            "cost": {
                "oneOf": [{**CREDITS, "minimum": 0}, CREDITS_TEXT],
                "description": "credits (≥ 0, at most 6 decimals), charged instead of the"
                " model's price for the tokens",
            },
            "idempotencyKey": {**STR, "minLength": 1, "maxLength": MAX_KEY},
            "occurredAt": {**TIME, "description": "when the usage happened (default: now)"},
            "metadata": {
                "type": "object",
                "maxProperties": MAX_METADATA_KEYS,
                "description": f"stored with the record (≤ {MAX_METADATA_BYTES} bytes of JSON)",
            },
            "allowOverdraft": {**BOOL, "default": False},
        },
        "idempotencyKey",
    ),
    "anyOf": [
        {"required": ["model", "inputTokens", "outputTokens"]},
        {"required": ["model", "tokens"]},
        {"required": ["cost"]},
    ],
}
RECORDED: Schema = obj(
    {
        "entryId": UUID,
        "holdId": UUID,
        "accountId": UUID,
        "cost": CREDITS,
        "costMicros": MICROS,
        "balance": CREDITS,
        "balanceMicros": MICROS,
        "model": nullable(STR),
        "inputTokens": nullable(INT),
        "outputTokens": nullable(INT),
        "tokens": nullable(TOKEN_BREAKDOWN),
        "occurredAt": TIME,
        "metadata": {"type": "object"},
        "createdAt": TIME,
    },
    "entryId",
    "holdId",
    "accountId",
    "cost",
    "costMicros",
    "balance",
    "balanceMicros",
    "model",
    "inputTokens",
    "outputTokens",
    "occurredAt",
    "metadata",
    "createdAt",
)
ENDPOINTS = (
    Endpoint(
        "POST",
        "/api/usage/record",
        record_usage,
        "Charge usage that did not go through the proxy, once per idempotency key"
        " (an admin, or an API key with the usage:write scope)",
        "account",
        "admin",
        request=USAGE_RECORD_REQUEST,
        response=RECORDED,
        status=201,
        errors=(402, 404, 409, 503),
    ),
)
