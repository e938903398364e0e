"""Clerk session tokens (JWTs) → verified session claims.

Checks, in order: the header names RS256 and a ``kid`` (``none``, HS* and
every other algorithm are refused before any key is looked up); the key is
one of the JWKS's RS256 keys; the signature; ``exp``, ``nbf`` and ``iat`` with
5 s leeway; ``iss`` when ``CLERK_ISSUER`` is set; ``azp`` against
``CLERK_AUTHORIZED_PARTIES`` when set (a token without ``azp`` is then
refused); ``sub`` present. Every failure is a 401 UNAUTHORIZED.

Organization context comes from v2 claims (``o: {id, rol, per, fpm}`` with
the top-level ``fea``) or v1 claims (``org_id``, ``org_role``,
``org_permissions``) and is returned in one shape.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
from jwt.exceptions import (
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidIssuedAtError,
    InvalidIssuerError,
    MissingRequiredClaimError,
    PyJWTError,
)

from creditgate.auth.jwks import JwksKeys
from creditgate.errors import Unauthorized
from creditgate.webkit.textguard import has_control

LEEWAY_SECONDS = 5
# A verified token is remembered (by its exact text) this long at most, and
# never past its own exp: a front end sends the same token for about a
# minute, and RS256 verification is most of what a session costs per request.
VERIFIED_TTL_SECONDS = 30.0
_MAX_ID_LEN = 255  # accounts.external_id's limit


@dataclass(frozen=True, slots=True)
class SessionClaims:
    """What creditgate uses of a verified Clerk session token."""

    user_id: str
    session_id: str | None = None
    org_id: str | None = None
    org_role: str | None = None  # with the "org:" prefix, e.g. "org:admin"
    org_permissions: frozenset[str] = field(default_factory=frozenset)


def _unauthorized(message: str) -> Unauthorized:
    return Unauthorized(message, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


def _id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_ID_LEN or has_control(value):
        raise _unauthorized(f"The session token's {what} is missing or malformed.")
    return value


def _role(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    return value if value.startswith("org:") else f"org:{value}"


def _v2_permissions(claims: Mapping[str, Any], org: Mapping[str, Any]) -> frozenset[str]:
    """Clerk v2's compact permissions: ``org:{feature}:{permission}``.

    ``fea`` lists features (``o:`` scoped ones are the org's), ``o.per`` the
    permission names, and ``o.fpm`` one bitmask per org feature whose bits,
    most significant first, select from ``per`` — the decoding of Clerk's own
    SDKs.
    """
    fea, per, fpm = claims.get("fea"), org.get("per"), org.get("fpm")
    if not (isinstance(fea, str) and isinstance(per, str) and isinstance(fpm, str)):
        return frozenset()
    features = [f.split(":", 1)[1] for f in fea.split(",") if f.strip().startswith("o:")]
    names = [p.strip() for p in per.split(",") if p.strip()]
    found: set[str] = set()
    for feature, mask_text in zip(features, fpm.split(","), strict=False):
        if not mask_text.strip().isdigit():
            continue
        bits = format(int(mask_text), "b").zfill(len(names))
        found.update(
            f"org:{feature.strip()}:{name}"
            for bit, name in zip(bits, names, strict=False)
            if bit == "1"
        )
    return frozenset(found)


def session_claims(claims: Mapping[str, Any]) -> SessionClaims:
    """The user, session and organization context of verified claims (v1 or v2)."""
    user_id = _id(claims.get("sub"), "subject (sub)")
    sid = claims.get("sid") if isinstance(claims.get("sid"), str) else None
    org = claims.get("o")
    if claims.get("v") == 2 or isinstance(org, dict):
        if not isinstance(org, dict) or org.get("id") is None:
            return SessionClaims(user_id, sid)
        return SessionClaims(
            user_id,
            sid,
            _id(org.get("id"), "organization id (o.id)"),
            _role(org.get("rol")),
            _v2_permissions(claims, org),
        )
    if claims.get("org_id") is None:
        return SessionClaims(user_id, sid)
    perms = claims.get("org_permissions")
    return SessionClaims(
        user_id,
        sid,
        _id(claims.get("org_id"), "organization id (org_id)"),
        _role(claims.get("org_role")),
        frozenset(p for p in perms if isinstance(p, str))
        if isinstance(perms, list)
        else frozenset(),
    )


class ClerkSessions:
    """Verifies Clerk session tokens against a JWKS URL."""

    def __init__(
        self,
        keys: JwksKeys,
        *,
        issuer: str | None = None,
        authorized_parties: tuple[str, ...] = (),
        max_verified: int = 10_000,
    ) -> None:
        self.keys = keys
        self._issuer = issuer
        self._parties = frozenset(authorized_parties)
        self._verified: dict[str, tuple[float, SessionClaims]] = {}
        self._max_verified = max_verified

    async def verify(self, token: str) -> SessionClaims:
        """The claims of a valid session token; Unauthorized (401) otherwise.

        ServiceUnavailable (503) when Clerk's keys cannot be fetched and the
        token's key is not already known.
        """
        now = time.time()
        hit = self._verified.get(token)
        if hit is not None and now < hit[0]:
            return hit[1]
        claims, exp = await self._verify(token)
        if len(self._verified) >= self._max_verified:
            self._verified.clear()  # bounded; a refill costs one verification per token
        self._verified[token] = (min(exp + LEEWAY_SECONDS, now + VERIFIED_TTL_SECONDS), claims)
        return claims

    async def _verify(self, token: str) -> tuple[SessionClaims, float]:
        try:
            header = jwt.get_unverified_header(token)
        except PyJWTError:
            raise _unauthorized("Malformed session token.") from None
        if header.get("alg") != "RS256":
            raise _unauthorized("Session tokens must be signed with RS256.")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise _unauthorized("The session token names no signing key (kid).")
        key = await self.keys.key(kid)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=["RS256"],
                leeway=LEEWAY_SECONDS,
                issuer=self._issuer,
                # Clerk session tokens carry no audience; azp is checked below.
                options={"require": ["exp", "iat", "sub"], "verify_aud": False},
            )
        except ExpiredSignatureError:
            raise _unauthorized("The session token has expired.") from None
        except (ImmatureSignatureError, InvalidIssuedAtError):
            raise _unauthorized("The session token is not valid yet.") from None
        except InvalidIssuerError:
            raise _unauthorized("The session token's issuer is not this Clerk instance.") from None
        except MissingRequiredClaimError as e:
            raise _unauthorized(f"The session token has no '{e.claim}' claim.") from None
        except PyJWTError:
            raise _unauthorized("Invalid session token.") from None
        if self._parties:
            azp = claims.get("azp")
            if not isinstance(azp, str) or azp not in self._parties:
                raise _unauthorized("The session token's authorized party (azp) is not allowed.")
        if claims.get("sts") == "pending":
            # Clerk's SDKs treat a session with pending tasks as signed out.
            raise _unauthorized("The session has pending tasks; finish signing in first.")
        return session_claims(claims), float(claims["exp"])
