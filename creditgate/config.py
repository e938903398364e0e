"""Settings from the environment and one TOML file (DESIGN.md §8).

Secrets and addresses come from environment variables; models, prices, tiers
and products from the TOML file named by ``CREDITGATE_CONFIG``. Every problem
is reported at start as a ``ConfigError`` naming the field, never later as a
500.
"""

from __future__ import annotations

import os
import tomllib
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

# Prices are kept as integers of 10⁻⁹ µc per token so cost arithmetic is exact.
PRICE_SCALE = 10**9
# The optional per-kind prices of a model (absent: the plain price of its side).
KIND_PRICES = ("cached_input_price", "cache_write_price", "audio_input_price", "audio_output_price")
# How a model's calls are priced: by its price table, or by the cost the
# upstream reports (usage.cost) times the model's markup (proxy.pricing).
PricingSource = Literal["table", "upstream"]
PRICING_SOURCES: tuple[PricingSource, ...] = get_args(PricingSource)
# The largest markup accepted: a guard against a typo, far above any real margin.
MAX_MARKUP = Decimal(1_000_000)
DEFAULT_TIER = "free"
# Largest requests/tokens per minute the throttle counts exactly (see above).
MAX_PER_MINUTE = 2**53 // 60_000 // 4
# What the throttle does while Redis is unreachable (THROTTLE_ON_REDIS_ERROR);
# the one definition, the throttle imports it.
ThrottlePolicy = Literal["local", "open", "closed"]
THROTTLE_POLICIES: tuple[ThrottlePolicy, ...] = get_args(ThrottlePolicy)
DEFAULT_MAX_MESSAGES = 2048  # OpenAI's own limit on messages per request
# The APIs a model can be served through (proxy.apis): each is one route.
ApiName = Literal["chat", "responses", "messages", "embeddings"]
API_NAMES: tuple[ApiName, ...] = get_args(ApiName)
# The wire format an upstream speaks: OpenAI's (chat, responses, embeddings)
# or Anthropic's Messages API.
UpstreamKind = Literal["openai", "anthropic"]
UPSTREAM_KINDS: tuple[UpstreamKind, ...] = get_args(UpstreamKind)
ANTHROPIC_VERSION = "2023-06-01"  # sent when the client names none
# Which APIs a model serves when its config says nothing, by its upstreams' kind.
DEFAULT_APIS: dict[UpstreamKind, frozenset[ApiName]] = {
    "openai": frozenset({"chat", "responses"}),
    "anthropic": frozenset({"messages"}),
}


class ConfigError(Exception):
    """A setting is missing or malformed; the message names the field."""


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    base_url: str
    api_key: str | None
    api_key_env: str | None = None  # the variable the key is read from, for warnings
    kind: UpstreamKind = "openai"  # the wire format it speaks
    anthropic_version: str = ANTHROPIC_VERSION  # kind "anthropic": the default version header


def missing_upstream_keys(config: Config) -> list[Upstream]:
    """Upstreams that name an ``api_key_env`` variable which is unset or empty.

    Such an upstream starts fine and then every call fails at the provider, so
    ``serve`` warns about each at start and ``doctor`` reports it.
    """
    upstreams = {d.upstream.name: d.upstream for m in config.models.values() for d in m.deployments}
    return [u for _, u in sorted(upstreams.items()) if u.api_key_env and not u.api_key]


@dataclass(frozen=True, slots=True)
class Deployment:
    """One place a model is served: an upstream and the name it knows the model by."""

    upstream: Upstream
    model: str  # the name the upstream knows the model by
    name: str  # unique within the model; reported in x-creditgate-deployment
    priority: int  # lower is tried first; defaults to the position in the list
    weight: int  # share of first attempts among deployments of equal priority


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 5.0
    first_byte: float = 60.0
    idle: float = 60.0
    total: float = 600.0


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    input_price: int  # 10⁻⁹ µc per input token (credits per 1M tokens × 10⁹)
    output_price: int  # 10⁻⁹ µc per output token
    max_output_tokens: int
    deployments: tuple[Deployment, ...]
    timeouts: Timeouts
    input_price_text: str  # as written in the config, for /v1/models
    output_price_text: str
    max_messages: int = DEFAULT_MAX_MESSAGES
    public: bool = True  # listed by GET /v1/models (unlisted models are still served)
    # The field that carries the cap creditgate sends when a request sets none:
    # "max_completion_tokens" for upstream models that refuse "max_tokens".
    max_tokens_field: str = "max_tokens"
    # Prompt tokens one image part may cost at most on this model: what a hold
    # reserves per image (proxy.pricing), so it must be the model's true maximum.
    max_image_tokens: int = 1_500
    # Prices per kind of token (10⁻⁹ µc per token); None: the plain price of
    # its side (input_price or output_price) applies. proxy.pricing reads them.
    cached_input_price: int | None = None  # prompt tokens read from a cache
    cache_write_price: int | None = None  # prompt tokens written to a cache
    audio_input_price: int | None = None
    audio_output_price: int | None = None
    # "upstream": a call is charged the cost the upstream reports (usage.cost,
    # in its currency) times ``markup`` credits per unit of that currency; a
    # response without a cost falls back to the prices above, which also
    # size the hold (proxy.pricing).
    pricing: PricingSource = "table"
    markup: Decimal = Decimal(1)
    # The APIs (routes) this model is served through; another one answers 404.
    apis: frozenset[ApiName] = DEFAULT_APIS["openai"]
    # The most tokens the model reads as input: what a Responses call that
    # continues stored state (previous_response_id, conversation) is held for,
    # since those earlier turns are unseen here. None: such calls are refused.
    context_window: int | None = None


# A tier's four throttle limits, in the order the throttle script takes them.
LimitName = Literal["requests_per_minute", "tokens_per_minute", "max_parallel", "messages_per_day"]
LIMIT_NAMES: tuple[LimitName, ...] = get_args(LimitName)


@dataclass(frozen=True, slots=True)
class Tier:
    name: str
    requests_per_minute: int
    tokens_per_minute: int
    max_parallel: int
    messages_per_day: int


@dataclass(frozen=True, slots=True)
class ThrottleConfig:
    """The ``[throttle]`` table: how limits are counted (the limits are the tiers)."""

    day_zone: str = "UTC"  # IANA zone whose midnight resets messages_per_day
    lease_ttl_seconds: float = 60.0  # a crashed process's parallel slots free after this


# A Polar product: a one-off credit pack or a subscription's monthly credits.
ProductKind = Literal["pack", "subscription"]


@dataclass(frozen=True, slots=True)
class Product:
    id: str
    kind: ProductKind
    credits_micros: int
    tier: str | None
    name: str | None = None  # shown as the balance's ``plan``; defaults to the tier or the id

    @property
    def plan_name(self) -> str:
        return self.name or self.tier or self.id


# What the usage meter in Polar sums: micro-credits or tokens.
METER_PROPERTIES = ("credits", "total_tokens")


@dataclass(frozen=True, slots=True)
class PolarConfig:
    """The ``[polar]`` table: usage export, reconciliation, checkout (DESIGN.md §6)."""

    organization_id: str | None = None  # only with a personal (not organization) token
    event_name: str = "llm_usage"
    batch_size: int = 100
    export_interval_seconds: float = 2.0
    request_timeout_seconds: float = 10.0
    max_attempts: int = 5  # per Polar call, before the caller gives up until later
    retry_initial_seconds: float = 0.5
    retry_max_seconds: float = 30.0
    meter_id: str | None = None  # the Polar meter reconciliation reads
    meter_property: str = "credits"
    reconcile_interval_seconds: int = 900  # 0: no periodic reconciliation
    reconcile_tolerance: int = 0  # meter units
    reconcile_lag_seconds: int = 3 * 3600  # Polar's meters trail ingestion by up to 3 h
    # The server's periodic reconciliation checks this many hours of event time,
    # ending where the lag ends; Polar answers hourly quantities for up to 7 days.
    reconcile_window_hours: int = 24
    success_url: str | None = None
    portal_return_url: str | None = None
    # GET /api/subscription asks Polar again when its stored state is older.
    subscription_max_age_seconds: int = 300


@dataclass(frozen=True, slots=True)
class NotificationsConfig:
    """The ``[notifications]`` table: delivery of low-balance webhooks."""

    request_timeout_seconds: float = 10.0
    max_attempts: int = 5  # per alert, with exponential backoff and jitter
    retry_initial_seconds: float = 1.0
    retry_max_seconds: float = 60.0
    poll_interval_seconds: float = 5.0  # besides LISTEN: finds alerts whose sender died
    # Hosts a notificationUrl may name (lower case); empty: any host.
    allowed_hosts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """``[http]`` limits on slow clients (docs/security.md).

    ``header_timeout_seconds`` is aiohttp's keep-alive timer, which also runs
    from the moment a connection opens until its request's headers are
    complete: one timeout for unfinished headers and for idle keep-alive
    connections. ``body_timeout_seconds`` bounds reading a whole body.
    ``max_connections`` caps open connections per process (``http.serving``).
    """

    header_timeout_seconds: float = 30.0
    body_timeout_seconds: float = 60.0
    max_connections: int = 1000  # open connections per process; one more is a 503


HTTP_LIMIT_KEYS = {"header_timeout_seconds", "body_timeout_seconds", "max_connections"}


def _http_limits(t: dict[str, Any]) -> HttpLimits:
    return HttpLimits(
        header_timeout_seconds=_seconds(
            t.get("header_timeout_seconds", 30), "http.header_timeout_seconds"
        ),
        body_timeout_seconds=_seconds(
            t.get("body_timeout_seconds", 60), "http.body_timeout_seconds"
        ),
        max_connections=_int(t.get("max_connections", 1000), "http.max_connections", minimum=1),
    )


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    """The ``[retention]`` table: how long operational rows are kept (docs/operations.md).

    Never money: entries, settled or charged holds and everything ``verify``
    sums are kept; a hold that moved no money may go (``unbilled_holds_days``).
    A period of 0 days keeps the table's rows forever.
    """

    # Webhook deliveries processed or given up, by receipt: the id must be
    # remembered longer than any sender redelivers (Svix, Polar: days).
    webhook_events_days: int = 30
    # Low-balance notifications sent, failed or skipped, by when they ended.
    low_balance_alerts_days: int = 90
    # Holds released or expired with nothing charged, by when they ended
    # (migration 0018; never less than 7 days, whatever is set).
    unbilled_holds_days: int = 90
    # How often each server process prunes (the CLI: `creditgate prune`).
    interval_seconds: float = 3600.0
    # Rows deleted per statement (short transactions, short locks).
    batch_size: int = 5000


# Shorter than this, a sender's redelivery could find its id forgotten.
MIN_WEBHOOK_EVENTS_DAYS = 7
# The floor migration 0018's function applies anyway: a hold's late
# settlement or replayed reserve comes within minutes, never days.
MIN_UNBILLED_HOLDS_DAYS = 7


def _days_with_floor(t: dict[str, Any], key: str, default: int, floor: int, why: str) -> int:
    """A ``[retention]`` period in days: 0 (keep forever) or at least ``floor``."""
    days = _int(t.get(key, default), f"retention.{key}")
    if 0 < days < floor:
        raise ConfigError(f"retention.{key}: 0 (keep) or at least {floor} ({why}), got {days}")
    return days


def _retention_config(t: dict[str, Any]) -> RetentionConfig:
    d = RetentionConfig()
    _check_keys(t, set(RetentionConfig.__dataclass_fields__), "retention")
    webhook_days = _days_with_floor(
        t,
        "webhook_events_days",
        d.webhook_events_days,
        MIN_WEBHOOK_EVENTS_DAYS,
        "a redelivered webhook must still be recognised",
    )
    holds_days = _days_with_floor(
        t,
        "unbilled_holds_days",
        d.unbilled_holds_days,
        MIN_UNBILLED_HOLDS_DAYS,
        "a late settlement must still find its hold",
    )
    interval = d.interval_seconds
    if "interval_seconds" in t:
        interval = _seconds(t["interval_seconds"], "retention.interval_seconds")
    if interval < 1:
        raise ConfigError(f"retention.interval_seconds: at least 1, got {interval}")
    return RetentionConfig(
        webhook_events_days=webhook_days,
        low_balance_alerts_days=_int(
            t.get("low_balance_alerts_days", d.low_balance_alerts_days),
            "retention.low_balance_alerts_days",
        ),
        unbilled_holds_days=holds_days,
        interval_seconds=interval,
        batch_size=_int(t.get("batch_size", d.batch_size), "retention.batch_size", minimum=1),
    )


@dataclass(frozen=True, slots=True)
class Config:
    """What the TOML file describes: upstreams, models, tiers, products."""

    models: Mapping[str, Model]
    tiers: Mapping[str, Tier]
    products: Mapping[str, Product] = field(default_factory=dict)
    polar: PolarConfig = field(default_factory=PolarConfig)
    estimate_bytes_per_token: int = 3
    # A call's hold expires its model's timeouts.total plus this margin after
    # it was reserved; the call itself is cut at timeouts.total, so the margin
    # is what its settlement (with retries) has left before the sweeper.
    settle_margin_seconds: float = 30.0
    # Largest group-commit batch of reserves or settles (1: one statement per call).
    group_commit_max_batch: int = 64
    # Group-commit batches in flight at once per kind (reserve, settle) per process.
    group_commit_lanes: int = 2
    # Keys an older config may still set that no longer do anything: their
    # names, for a warning at start (never an error: old configs load).
    ignored_keys: tuple[str, ...] = ()
    max_body_bytes: int = 1024 * 1024
    throttle: ThrottleConfig = field(default_factory=ThrottleConfig)
    shutdown_timeout_seconds: int = 30
    notifications: NotificationsConfig = field(default_factory=NotificationsConfig)
    http_limits: HttpLimits = field(default_factory=HttpLimits)
    retention: RetentionConfig = field(default_factory=RetentionConfig)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a creditgate process needs, read once at start."""

    config: Config
    database_url: str | None
    redis_url: str | None
    host: str = "127.0.0.1"
    # A read replica for balance and usage reads (docs/deploying.md); None: the primary.
    database_read_url: str | None = None
    port: int = 8080
    admin_token: str | None = None
    metrics_token: str | None = None
    log_level: str = "info"
    throttle_on_redis_error: ThrottlePolicy = "local"
    throttle_redis_timeout_ms: int = 50
    clerk_jwks_url: str | None = None
    clerk_issuer: str | None = None
    clerk_authorized_parties: tuple[str, ...] = ()
    # The Clerk organization whose org:admin members are creditgate admins.
    clerk_admin_org_id: str | None = None
    clerk_webhook_secret: str | None = None
    polar_access_token: str | None = None
    polar_environment: str = "sandbox"
    polar_base_url: str | None = None
    polar_webhook_secret: str | None = None
    # Origins (scheme://host[:port]) whose pages may send state-changing
    # requests with the session cookie, besides creditgate's own origin and
    # CLERK_AUTHORIZED_PARTIES (issue 15, auth hardening).
    allowed_origins: tuple[str, ...] = ()
    # A `creditgate dev` process: what dev leaves unconfigured on purpose
    # (Polar) is not worth a warning there.
    dev: bool = False


# ---------------------------------------------------------------- parsing


def _decimal(value: Any, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | Decimal | str):
        raise ConfigError(f"{where}: expected a number, got {type(value).__name__}")
    try:
        d = Decimal(value)
    except InvalidOperation:
        raise ConfigError(f"{where}: {value!r} is not a number") from None
    if not d.is_finite() or d < 0:
        raise ConfigError(f"{where}: must be a finite number ≥ 0, got {value}")
    return d


def _price(value: Any, where: str) -> int:
    scaled = _decimal(value, where) * PRICE_SCALE
    if scaled != scaled.to_integral_value():
        raise ConfigError(f"{where}: at most 9 decimal places, got {value}")
    return int(scaled)


def _kind_price(m: dict[str, Any], key: str, where: str) -> int | None:
    return _price(m[key], f"{where}.{key}") if key in m else None


def _markup(m: dict[str, Any], pricing: str, where: str) -> Decimal:
    """The credits charged per unit of the upstream's reported cost (default 1)."""
    if "markup" not in m:
        return Decimal(1)
    if pricing != "upstream":
        # A markup the table pricing would silently ignore is a mistake: say so.
        raise ConfigError(f'{where}.markup: only applies with pricing = "upstream"')
    markup = _decimal(m["markup"], f"{where}.markup")
    if markup > MAX_MARKUP:
        raise ConfigError(f"{where}.markup: at most {MAX_MARKUP}, got {m['markup']}")
    return markup


def _int(value: Any, where: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{where}: must be ≥ {minimum}, got {value}")
    return value


def _seconds(value: Any, where: str) -> float:
    d = _decimal(value, where)
    if d <= 0:
        raise ConfigError(f"{where}: must be > 0 seconds, got {value}")
    return float(d)


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _lease_ttl(value: Any) -> float:
    seconds = _seconds(value, "throttle.lease_ttl_seconds")
    if seconds < 0.5:
        # Leases are renewed every third of their life; shorter would be busy work.
        raise ConfigError(f"throttle.lease_ttl_seconds: at least 0.5, got {value}")
    return seconds


def _zone(value: Any, where: str) -> str:
    name = _str(value, where)
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{where}: unknown time zone {name!r} (an IANA name)") from None
    return name


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
    return value


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown field (allowed: {sorted(allowed)})")


def _choice(value: Any, allowed: tuple[str, ...], where: str) -> str:
    if value not in allowed:
        raise ConfigError(f"{where}: one of {list(allowed)}, got {value!r}")
    return str(value)


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value


def _deployments(
    value: Any, upstreams: Mapping[str, Upstream], where: str
) -> tuple[Deployment, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: expected a non-empty list")
    tables = [_table(d, f"{where}[{i}]") for i, d in enumerate(value)]
    # The default name is the upstream's; when several unnamed deployments share
    # an upstream (a cheaper model at the same provider as fallback), each
    # defaults to "upstream/model" instead, so the common case needs no names.
    unnamed_per_upstream: dict[Any, int] = {}
    for d in tables:
        if "name" not in d:
            key = d.get("upstream")
            unnamed_per_upstream[key] = unnamed_per_upstream.get(key, 0) + 1
    deployments: list[Deployment] = []
    for i, d in enumerate(tables):
        dwhere = f"{where}[{i}]"
        _check_keys(d, {"upstream", "model", "name", "priority", "weight"}, dwhere)
        up_name = _str(d.get("upstream"), f"{dwhere}.upstream")
        if up_name not in upstreams:
            raise ConfigError(f"{dwhere}.upstream: no upstream named {up_name!r}")
        default = up_name
        if unnamed_per_upstream.get(up_name, 0) > 1:
            default = f"{up_name}/{_str(d.get('model'), f'{dwhere}.model')}"
        name = _str(d.get("name", default), f"{dwhere}.name")
        if any(other.name == name for other in deployments):
            raise ConfigError(
                f"{dwhere}.name: {name!r} is already a deployment of this model;"
                " give this deployment its own name"
            )
        deployments.append(
            Deployment(
                upstream=upstreams[up_name],
                model=_str(d.get("model"), f"{dwhere}.model"),
                name=name,
                priority=_int(d.get("priority", i), f"{dwhere}.priority"),
                weight=_int(d.get("weight", 1), f"{dwhere}.weight", minimum=1),
            )
        )
    return tuple(deployments)


def _apis(value: Any, deployments: tuple[Deployment, ...], where: str) -> frozenset[ApiName]:
    """The APIs a model serves: ``api`` (a name or a list), by default its upstreams' kind's.

    Its deployments must all speak the wire format of those APIs: a
    ``messages`` model is served by ``anthropic`` upstreams, the others by
    ``openai`` ones (creditgate relays each API as it is, it does not translate).
    """
    kinds = {d.upstream.kind for d in deployments}
    if len(kinds) > 1:
        raise ConfigError(
            f"{where}.deployments: all of a model's upstreams must be of one kind,"
            f" got {sorted(kinds)}"
        )
    kind = kinds.pop()
    if value is None:
        return DEFAULT_APIS[kind]
    names = value if isinstance(value, list) else [value]
    if not names:
        raise ConfigError(f"{where}.api: name at least one of {list(API_NAMES)}")
    apis: set[ApiName] = set()
    for n in names:
        match n:
            case "chat" | "responses" | "messages" | "embeddings" as api:
                apis.add(api)
            case other:
                raise ConfigError(f"{where}.api: one of {list(API_NAMES)}, got {other!r}")
    wrong = sorted(a for a in apis if (a == "messages") != (kind == "anthropic"))
    if wrong:
        raise ConfigError(
            f"{where}.api: {wrong[0]!r} cannot be served by upstreams of kind {kind!r}"
            " (messages needs kind 'anthropic'; chat, responses and embeddings kind 'openai')"
        )
    return frozenset(apis)


def _url(value: Any, where: str) -> str:
    url = _str(value, where)
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}: must be an http(s) URL, got {url!r}")
    return url.rstrip("/")


def parse_config(raw: dict[str, Any], env: Mapping[str, str]) -> Config:
    """Validate a parsed TOML document (floats as Decimal) into a Config."""
    _check_keys(
        raw,
        {
            "upstreams",
            "models",
            "tiers",
            "products",
            "polar",
            "ledger",
            "proxy",
            "http",
            "throttle",
            "notifications",
            "retention",
        },
        "config",
    )
    upstreams: dict[str, Upstream] = {}
    for name, up in _table(raw.get("upstreams", {}), "upstreams").items():
        where = f"upstreams.{name}"
        up = _table(up, where)
        _check_keys(up, {"base_url", "api_key_env", "kind", "anthropic_version"}, where)
        base_url = up.get("base_url")
        if name == "main" and env.get("UPSTREAM_BASE_URL"):
            base_url = env["UPSTREAM_BASE_URL"]  # the documented override
        if name == "anthropic" and env.get("ANTHROPIC_UPSTREAM_BASE_URL"):
            base_url = env["ANTHROPIC_UPSTREAM_BASE_URL"]  # its Messages twin
        key_env = up.get("api_key_env")
        api_key = env.get(_str(key_env, f"{where}.api_key_env")) if key_env else None
        up_kind: UpstreamKind
        match up.get("kind", "openai"):
            case "openai" | "anthropic" as up_kind:
                pass
            case other:
                raise ConfigError(f"{where}.kind: one of {list(UPSTREAM_KINDS)}, got {other!r}")
        upstreams[name] = Upstream(
            name,
            _url(base_url, f"{where}.base_url"),
            api_key,
            str(key_env) if key_env else None,
            kind=up_kind,
            anthropic_version=_str(
                up.get("anthropic_version", ANTHROPIC_VERSION), f"{where}.anthropic_version"
            ),
        )

    models: dict[str, Model] = {}
    for name, m in _table(raw.get("models", {}), "models").items():
        where = f"models.{name}"
        m = _table(m, where)
        _check_keys(
            m,
            {
                "input_price",
                "output_price",
                "max_output_tokens",
                "max_messages",
                "deployments",
                "timeouts",
                "public",
                "max_tokens_field",
                "max_image_tokens",
                "context_window",
                "api",
                *KIND_PRICES,
                "pricing",
                "markup",
            },
            where,
        )
        for required in ("input_price", "output_price", "max_output_tokens", "deployments"):
            if required not in m:
                raise ConfigError(f"{where}.{required}: missing")
        t = _table(m.get("timeouts", {}), f"{where}.timeouts")
        _check_keys(t, {"connect", "first_byte", "idle", "total"}, f"{where}.timeouts")
        timeouts = Timeouts(**{k: _seconds(v, f"{where}.timeouts.{k}") for k, v in t.items()})
        pricing = _choice(m.get("pricing", "table"), PRICING_SOURCES, f"{where}.pricing")
        deployments = _deployments(m["deployments"], upstreams, f"{where}.deployments")
        models[name] = Model(
            name=name,
            input_price=_price(m["input_price"], f"{where}.input_price"),
            output_price=_price(m["output_price"], f"{where}.output_price"),
            max_output_tokens=_int(m["max_output_tokens"], f"{where}.max_output_tokens", minimum=1),
            deployments=deployments,
            timeouts=timeouts,
            input_price_text=str(m["input_price"]),
            output_price_text=str(m["output_price"]),
            max_messages=_int(
                m.get("max_messages", DEFAULT_MAX_MESSAGES), f"{where}.max_messages", minimum=1
            ),
            public=_bool(m.get("public", True), f"{where}.public"),
            max_tokens_field=_choice(
                m.get("max_tokens_field", "max_tokens"),
                ("max_tokens", "max_completion_tokens"),
                f"{where}.max_tokens_field",
            ),
            max_image_tokens=_int(
                m.get("max_image_tokens", 1_500), f"{where}.max_image_tokens", minimum=1
            ),
            cached_input_price=_kind_price(m, "cached_input_price", where),
            cache_write_price=_kind_price(m, "cache_write_price", where),
            audio_input_price=_kind_price(m, "audio_input_price", where),
            audio_output_price=_kind_price(m, "audio_output_price", where),
            pricing="upstream" if pricing == "upstream" else "table",
            markup=_markup(m, pricing, where),
            apis=_apis(m.get("api"), deployments, where),
            context_window=(
                None
                if m.get("context_window") is None
                else _int(m["context_window"], f"{where}.context_window", minimum=1)
            ),
        )
    if not models:
        raise ConfigError("models: at least one model is required")

    tiers: dict[str, Tier] = {}
    tier_fields = LIMIT_NAMES
    for name, t in _table(raw.get("tiers", {}), "tiers").items():
        where = f"tiers.{name}"
        t = _table(t, where)
        _check_keys(t, set(tier_fields), where)
        for f in tier_fields:
            if f not in t:
                raise ConfigError(f"{where}.{f}: missing")
        tiers[name] = Tier(name, *(_int(t[f], f"{where}.{f}", minimum=1) for f in tier_fields))
        for f in ("requests_per_minute", "tokens_per_minute"):
            # The throttle keeps levels as units × 60,000 ms in Lua doubles: exact below 2^53.
            if t[f] > MAX_PER_MINUTE:
                raise ConfigError(f"{where}.{f}: at most {MAX_PER_MINUTE}, got {t[f]}")
    if DEFAULT_TIER not in tiers:
        raise ConfigError(f"tiers.{DEFAULT_TIER}: the default tier must be defined")

    products: dict[str, Product] = {}
    for pid, p in _table(raw.get("products", {}), "products").items():
        where = f"products.{pid}"
        p = _table(p, where)
        _check_keys(p, {"kind", "credits", "tier", "name"}, where)
        kind: ProductKind
        match _str(p.get("kind"), f"{where}.kind"):
            case "pack" | "subscription" as kind:
                pass
            case other:
                raise ConfigError(f"{where}.kind: must be 'pack' or 'subscription', got {other!r}")
        micros = _decimal(p.get("credits", 0), f"{where}.credits") * 1_000_000
        if micros != micros.to_integral_value():
            raise ConfigError(f"{where}.credits: at most 6 decimal places")
        tier = p.get("tier")
        if tier is not None and tier not in tiers:
            raise ConfigError(f"{where}.tier: no tier named {tier!r}")
        plan_name = _str(p["name"], f"{where}.name") if "name" in p else None
        products[pid] = Product(pid, kind, int(micros), tier, plan_name)

    ledger = _table(raw.get("ledger", {}), "ledger")
    _check_keys(
        ledger,
        {
            "hold_ttl_seconds",
            "settle_margin_seconds",
            "group_commit_max_batch",
            "group_commit_lanes",
            "async_reserve",
        },
        "ledger",
    )
    proxy = _table(raw.get("proxy", {}), "proxy")
    _check_keys(proxy, {"estimate_bytes_per_token", "speculative_upstream"}, "proxy")
    # Removed optimisations and the fixed TTL: still accepted (checked for
    # type), ignored, and named in a warning at start (http.app).
    ignored: list[str] = []
    for table, name, check in (
        (proxy, "speculative_upstream", _bool),
        (ledger, "async_reserve", _bool),
        (ledger, "hold_ttl_seconds", _int),
    ):
        if name in table:
            check(table[name], f"{'proxy' if table is proxy else 'ledger'}.{name}")
            ignored.append(f"{'proxy' if table is proxy else 'ledger'}.{name}")
    http = _table(raw.get("http", {}), "http")
    _check_keys(http, {"max_body_bytes", "shutdown_timeout_seconds", *HTTP_LIMIT_KEYS}, "http")
    throttle = _table(raw.get("throttle", {}), "throttle")
    _check_keys(throttle, {"day_zone", "lease_ttl_seconds"}, "throttle")
    config = Config(
        models=models,
        tiers=tiers,
        products=products,
        polar=_polar_config(_table(raw.get("polar", {}), "polar")),
        estimate_bytes_per_token=_int(
            proxy.get("estimate_bytes_per_token", 3), "proxy.estimate_bytes_per_token", minimum=1
        ),
        settle_margin_seconds=_seconds(
            ledger.get("settle_margin_seconds", 30), "ledger.settle_margin_seconds"
        ),
        group_commit_max_batch=_int(
            ledger.get("group_commit_max_batch", 64), "ledger.group_commit_max_batch", minimum=1
        ),
        group_commit_lanes=_int(
            ledger.get("group_commit_lanes", 2), "ledger.group_commit_lanes", minimum=1
        ),
        ignored_keys=tuple(ignored),
        max_body_bytes=_int(
            http.get("max_body_bytes", 1024 * 1024), "http.max_body_bytes", minimum=1
        ),
        throttle=ThrottleConfig(
            day_zone=_zone(throttle.get("day_zone", "UTC"), "throttle.day_zone"),
            lease_ttl_seconds=_lease_ttl(throttle.get("lease_ttl_seconds", 60)),
        ),
        shutdown_timeout_seconds=_int(
            http.get("shutdown_timeout_seconds", 30), "http.shutdown_timeout_seconds", minimum=0
        ),
        notifications=_notifications_config(_table(raw.get("notifications", {}), "notifications")),
        http_limits=_http_limits(http),
        retention=_retention_config(_table(raw.get("retention", {}), "retention")),
    )
    return config


def _polar_config(t: dict[str, Any]) -> PolarConfig:
    d = PolarConfig()
    _check_keys(t, set(PolarConfig.__dataclass_fields__), "polar")

    def opt_str(name: str) -> str | None:
        return _str(t[name], f"polar.{name}") if name in t else None

    def opt_url(name: str) -> str | None:
        return _url(t[name], f"polar.{name}") if name in t else None

    def num(name: str, default: float) -> float:
        return _seconds(t[name], f"polar.{name}") if name in t else default

    def whole(name: str, default: int, minimum: int) -> int:
        return _int(t[name], f"polar.{name}", minimum=minimum) if name in t else default

    event_name = _str(t.get("event_name", d.event_name), "polar.event_name")
    if len(event_name) > 128:
        raise ConfigError("polar.event_name: at most 128 characters (Polar's limit)")
    meter_property = _str(t.get("meter_property", d.meter_property), "polar.meter_property")
    if meter_property not in METER_PROPERTIES:
        raise ConfigError(f"polar.meter_property: one of {list(METER_PROPERTIES)}")
    batch_size = whole("batch_size", d.batch_size, 1)
    if batch_size > 1000:
        raise ConfigError("polar.batch_size: at most 1000 (keep Polar's batches modest)")
    return PolarConfig(
        organization_id=opt_str("organization_id"),
        event_name=event_name,
        batch_size=batch_size,
        export_interval_seconds=num("export_interval_seconds", d.export_interval_seconds),
        request_timeout_seconds=num("request_timeout_seconds", d.request_timeout_seconds),
        max_attempts=whole("max_attempts", d.max_attempts, 1),
        retry_initial_seconds=num("retry_initial_seconds", d.retry_initial_seconds),
        retry_max_seconds=num("retry_max_seconds", d.retry_max_seconds),
        meter_id=opt_str("meter_id"),
        meter_property=meter_property,
        reconcile_interval_seconds=whole(
            "reconcile_interval_seconds", d.reconcile_interval_seconds, 0
        ),
        reconcile_tolerance=whole("reconcile_tolerance", d.reconcile_tolerance, 0),
        reconcile_lag_seconds=whole("reconcile_lag_seconds", d.reconcile_lag_seconds, 0),
        reconcile_window_hours=_window_hours(
            whole("reconcile_window_hours", d.reconcile_window_hours, 1)
        ),
        success_url=opt_url("success_url"),
        portal_return_url=opt_url("portal_return_url"),
        subscription_max_age_seconds=whole(
            "subscription_max_age_seconds", d.subscription_max_age_seconds, 0
        ),
    )


def _window_hours(hours: int) -> int:
    if hours > 168:
        raise ConfigError("polar.reconcile_window_hours: at most 168 (Polar's hourly limit)")
    return hours


def _notifications_config(t: dict[str, Any]) -> NotificationsConfig:
    d = NotificationsConfig()
    _check_keys(t, set(NotificationsConfig.__dataclass_fields__), "notifications")

    def num(name: str, default: float) -> float:
        return _seconds(t[name], f"notifications.{name}") if name in t else default

    hosts = t.get("allowed_hosts", [])
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h for h in hosts):
        raise ConfigError("notifications.allowed_hosts: a list of host names or addresses")
    max_attempts = d.max_attempts
    if "max_attempts" in t:
        max_attempts = _int(t["max_attempts"], "notifications.max_attempts", minimum=1)
    return NotificationsConfig(
        request_timeout_seconds=num("request_timeout_seconds", d.request_timeout_seconds),
        max_attempts=max_attempts,
        retry_initial_seconds=num("retry_initial_seconds", d.retry_initial_seconds),
        retry_max_seconds=num("retry_max_seconds", d.retry_max_seconds),
        poll_interval_seconds=num("poll_interval_seconds", d.poll_interval_seconds),
        allowed_hosts=tuple(h.lower() for h in hosts),
    )


def load_config(path: str | Path | None, env: Mapping[str, str]) -> Config:
    """Read the TOML file at ``path`` (or the built-in dev config when None)."""
    try:
        if path is None:
            text = resources.files("creditgate").joinpath("dev.toml").read_text("utf-8")
        else:
            text = Path(path).read_text("utf-8")
    except OSError as e:
        raise ConfigError(f"CREDITGATE_CONFIG: cannot read {path}: {e.strerror}") from None
    try:
        raw = tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(
            f"CREDITGATE_CONFIG: {path or 'dev.toml'} is not valid TOML: {e}"
        ) from None
    return parse_config(raw, env)


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read settings from the environment (``os.environ`` by default)."""
    env = os.environ if env is None else env
    port_text = env.get("CREDITGATE_PORT", "8080")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"CREDITGATE_PORT: expected a port number, got {port_text!r}")
    polar_env = env.get("POLAR_ENVIRONMENT", "sandbox")
    if polar_env not in ("sandbox", "production"):
        raise ConfigError(f"POLAR_ENVIRONMENT: 'sandbox' or 'production', got {polar_env!r}")
    log_level = env.get("LOG_LEVEL", "info").lower()
    if log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"LOG_LEVEL: debug, info, warning or error, got {log_level!r}")
    policy = _throttle_policy(env.get("THROTTLE_ON_REDIS_ERROR", "local").lower())
    budget_text = env.get("THROTTLE_REDIS_TIMEOUT_MS", "50")
    if not budget_text.isdigit() or not 1 <= int(budget_text) <= 10_000:
        raise ConfigError(
            f"THROTTLE_REDIS_TIMEOUT_MS: milliseconds from 1 to 10000, got {budget_text!r}"
        )
    parties = tuple(
        p.strip() for p in env.get("CLERK_AUTHORIZED_PARTIES", "").split(",") if p.strip()
    )
    origins = _origins(env.get("ALLOWED_ORIGINS", ""))
    jwks_url = env.get("CLERK_JWKS_URL") or None
    if jwks_url is not None and not jwks_url.startswith(("http://", "https://")):
        raise ConfigError(f"CLERK_JWKS_URL: must be an http(s) URL, got {jwks_url!r}")
    return Settings(
        config=load_config(env.get("CREDITGATE_CONFIG") or None, env),
        database_url=env.get("DATABASE_URL") or None,
        database_read_url=env.get("DATABASE_READ_URL") or None,
        redis_url=env.get("REDIS_URL") or None,
        host=env.get("CREDITGATE_HOST", "127.0.0.1"),
        port=int(port_text),
        admin_token=env.get("ADMIN_TOKEN") or None,
        metrics_token=env.get("METRICS_TOKEN") or None,
        log_level=log_level,
        throttle_on_redis_error=policy,
        throttle_redis_timeout_ms=int(budget_text),
        clerk_jwks_url=jwks_url,
        clerk_issuer=env.get("CLERK_ISSUER") or None,
        clerk_authorized_parties=parties,
        clerk_admin_org_id=env.get("CLERK_ADMIN_ORG_ID") or None,
        clerk_webhook_secret=env.get("CLERK_WEBHOOK_SECRET") or None,
        polar_access_token=env.get("POLAR_ACCESS_TOKEN") or None,
        polar_environment=polar_env,
        polar_base_url=env.get("POLAR_BASE_URL") or None,
        polar_webhook_secret=env.get("POLAR_WEBHOOK_SECRET") or None,
        allowed_origins=origins,
    )


def _origins(text: str) -> tuple[str, ...]:
    """ALLOWED_ORIGINS: comma-separated ``scheme://host[:port]``, compared exactly."""
    found = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        scheme, sep, rest = item.partition("://")
        if scheme not in ("http", "https") or not sep or not rest or "/" in rest:
            raise ConfigError(
                f"ALLOWED_ORIGINS: expected origins like https://app.example.com, got {item!r}"
            )
        found.append(item.lower())
    return tuple(found)


def _throttle_policy(text: str) -> ThrottlePolicy:
    """THROTTLE_ON_REDIS_ERROR's value as its type, or ConfigError."""
    for policy in THROTTLE_POLICIES:
        if text == policy:
            return policy
    raise ConfigError(f"THROTTLE_ON_REDIS_ERROR: local, open or closed, got {text!r}")
