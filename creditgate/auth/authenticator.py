"""One place that turns a request's credentials into a Principal (401 vs 403).

Credentials, in order: ``Authorization: Bearer cg_…`` (an API key),
``Authorization: Bearer <JWT>`` (a Clerk session token, cross-origin
front ends), ``x-api-key: cg_…`` (an API key as Anthropic's clients send
it), or the ``__session`` cookie (a same-origin front end).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from aiohttp import web

from creditgate.auth.api_keys import KEY_PREFIX, ApiKeyAuth
from creditgate.auth.clerk import ClerkSessions, SessionClaims
from creditgate.auth.jwks import JwksKeys
from creditgate.auth.principal import Principal
from creditgate.auth.session_accounts import SessionAccounts
from creditgate.config import Settings
from creditgate.errors import Forbidden, Unauthorized
from creditgate.ledger.db import Db
from creditgate.webkit.ids import ACCOUNT_ID

SESSION_COOKIE = "__session"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


@dataclass(frozen=True, slots=True)
class Credential:
    token: str
    source: str  # "header" | "cookie"

    @property
    def is_api_key(self) -> bool:
        return self.source == "header" and self.token.startswith(KEY_PREFIX)


@dataclass(frozen=True, slots=True)
class AdminCaller:
    """Who passed an admin check: the operator's ADMIN_TOKEN, an admin key or session."""

    via: str  # "admin_token" | "api_key" | "session"
    principal: Principal | None  # None for ADMIN_TOKEN, which is no account


def bearer_token(request: web.Request) -> str | None:
    """The token of ``Authorization: Bearer …``, or None."""
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    # Keys and JWTs are ASCII; anything else (undecodable bytes included) is malformed.
    if scheme.lower() != "bearer" or not token.strip() or not token.isascii():
        return None
    return token.strip()


def credential(request: web.Request) -> Credential | None:
    """The request's credential: the Authorization header, else the session cookie."""
    if "Authorization" in request.headers:
        token = bearer_token(request)
        if token is None:
            raise Unauthorized(
                "Malformed Authorization header: send 'Authorization: Bearer <token>'.",
                headers=_CHALLENGE,
            )
        return Credential(token, "header")
    api_key = request.headers.get("x-api-key")
    if api_key is not None:
        # Anthropic's SDKs and Claude Code (ANTHROPIC_API_KEY) send the key here.
        api_key = api_key.strip()
        if not api_key.startswith(KEY_PREFIX) or not api_key.isascii():
            raise Unauthorized(
                "Malformed x-api-key header: send a creditgate API key (cg_…).",
                headers=_CHALLENGE,
            )
        return Credential(api_key, "header")
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        return Credential(cookie, "cookie")
    return None


class Authenticator:
    """API keys and Clerk sessions → Principal; the admin check."""

    def __init__(self, settings: Settings) -> None:
        self._admin_token = settings.admin_token
        self._admin_org = settings.clerk_admin_org_id
        # Pages that may send state-changing cookie requests (besides our own origin).
        self._origins = frozenset(
            o.lower() for o in (*settings.clerk_authorized_parties, *settings.allowed_origins)
        )
        self.sessions: ClerkSessions | None = None
        if settings.clerk_jwks_url is not None:
            self.sessions = ClerkSessions(
                JwksKeys(settings.clerk_jwks_url),
                issuer=settings.clerk_issuer,
                authorized_parties=settings.clerk_authorized_parties,
            )

    async def start(self, db: Db) -> None:
        """Bind to the database; start the key-usage writer and the JWKS prefetch."""
        self.keys = ApiKeyAuth(db)
        self.accounts = SessionAccounts(db)
        self.keys.last_used.start()
        if self.sessions is not None:
            self.sessions.keys.prefetch()

    async def stop(self) -> None:
        """Write pending key usage; stop background work."""
        await self.keys.last_used.stop()
        if self.sessions is not None:
            await self.sessions.keys.close()

    async def authenticate(self, request: web.Request) -> Principal:
        """The caller (API key or session): 401 without valid credentials, 403 if closed."""
        cred = credential(request)
        if cred is None:
            raise Unauthorized(
                "Missing credentials: send 'Authorization: Bearer <API key or session token>'.",
                headers=_CHALLENGE,
            )
        if cred.is_api_key:
            principal = await self.keys.authenticate(cred.token)
        else:
            principal = await self._session(request, cred)
        request[ACCOUNT_ID] = principal.account_id
        return principal

    async def session(self, request: web.Request) -> Principal:
        """The caller of a session-only route: an API key here is a 403."""
        cred = credential(request)
        if cred is not None and cred.is_api_key:
            # Authenticate it first: a bad key is still "who are you?" (401).
            await self.keys.authenticate(cred.token)
            raise Forbidden("This route needs a signed-in Clerk session; API keys cannot use it.")
        return await self.authenticate(request)

    async def admin(self, request: web.Request) -> AdminCaller:
        """Admit ADMIN_TOKEN, an admin API key, or an ``org:admin`` of the admin org.

        401 without valid credentials; 403 for anyone else authenticated.
        """
        if self._is_admin_token(request):
            return AdminCaller("admin_token", None)
        principal = await self.authenticate(request)
        if not principal.admin:
            raise Forbidden(
                "This route needs an admin: an admin API key, ADMIN_TOKEN, or the"
                " org:admin role in the admin organization."
            )
        return AdminCaller(principal.via, principal)

    async def usage_writer(self, request: web.Request) -> AdminCaller | Principal:
        """An admin (any account), or a ``usage:write`` API key (its own account)."""
        if self._is_admin_token(request):
            return AdminCaller("admin_token", None)
        principal = await self.authenticate(request)
        if principal.admin:
            return AdminCaller(principal.via, principal)
        if not principal.may_record_usage():
            raise Forbidden(
                "Recording usage needs an API key with the 'usage:write' scope, or an admin."
            )
        return principal

    def _is_admin_token(self, request: web.Request) -> bool:
        """The request's bearer token is the operator's ADMIN_TOKEN."""
        token = bearer_token(request)
        return (
            token is not None
            and self._admin_token is not None
            and hmac.compare_digest(token.encode(), self._admin_token.encode())
        )

    async def _session(self, request: web.Request, cred: Credential) -> Principal:
        if self.sessions is None:
            raise Unauthorized(
                "Invalid API key. (Session tokens are not accepted: Clerk is not configured.)",
                headers=_CHALLENGE,
            )
        claims = await self.sessions.verify(cred.token)
        if cred.source == "cookie" and request.method not in _SAFE_METHODS:
            self._check_origin(request)
        return await self._principal(claims)

    def _check_origin(self, request: web.Request) -> None:
        """A state-changing cookie request must name an allowed ``Origin``.

        A cookie rides along with cross-site requests (CSRF), so the browser's
        ``Origin`` header must be creditgate's own origin, an authorized party
        or one of ALLOWED_ORIGINS. Without one (or with ``null``) the request's
        page is unknown: refused too. Bearer-token calls never get here.
        """
        origin = request.headers.get("Origin")
        if origin is None or origin == "null":
            raise Forbidden(
                "A state-changing request authenticated by the session cookie needs an "
                "Origin header naming an allowed origin; send the session token as "
                "'Authorization: Bearer <token>' from other clients."
            )
        origin = origin.strip().lower()
        if origin not in self._origins and origin != f"{request.scheme}://{request.host}".lower():
            raise Forbidden(
                "Cross-origin request with a session cookie refused: this page's origin is "
                "not allowed (see ALLOWED_ORIGINS)."
            )

    async def _principal(self, claims: SessionClaims) -> Principal:
        if claims.org_id is not None:
            account = await self.accounts.get("org", claims.org_id)
        else:
            account = await self.accounts.get("user", claims.user_id)
        if account.status == "closed":
            raise Forbidden("This account is closed.")
        return Principal(
            account_id=account.id,
            tier=account.tier,
            via="session",
            user_id=claims.user_id,
            org_id=claims.org_id,
            org_role=claims.org_role,
            permissions=claims.org_permissions,
            admin=(
                self._admin_org is not None
                and claims.org_id == self._admin_org
                and claims.org_role == "org:admin"
            ),
        )


AUTH = web.AppKey("creditgate.auth", Authenticator)
