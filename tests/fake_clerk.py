"""A local stand-in for Clerk's Frontend API: a JWKS endpoint and a token minter.

Tokens are minted with PyJWT and RSA keys generated here, in Clerk's v1 and v2
claim formats; the JWKS is served over real HTTP by aiohttp, so creditgate's
PyJWKClient fetches it exactly as it would Clerk's.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from functools import cache
from typing import Any

import jwt
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

ISSUER = "https://clerk.creditgate.test"
PARTY = "http://localhost:3000"
JWKS_PATH = "/.well-known/jwks.json"


@cache
def rsa_key(name: str) -> rsa.RSAPrivateKey:
    """One RSA key per name for the whole test session (generation is slow)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class FakeClerk:
    """A JWKS server whose published keys, failures and fetch count tests control."""

    def __init__(self) -> None:
        self.published: list[str] = ["kid-1"]  # kids served in the JWKS
        self.fetches = 0
        self.down = False
        self.garbage = False  # answer 200 with something that is not a JWKS
        self.server: TestServer | None = None

    # ------------------------------------------------------------ the server

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(JWKS_PATH, self._jwks)
        return app

    async def _jwks(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if self.down:
            return web.Response(status=503, text="unavailable")
        if self.garbage:
            return web.Response(text="<html>maintenance</html>", content_type="text/html")
        return web.json_response({"keys": [self.jwk(kid) for kid in self.published]})

    async def start(self) -> str:
        self.server = TestServer(self.app())
        await self.server.start_server()
        return self.url

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url(JWKS_PATH))

    @staticmethod
    def jwk(kid: str) -> dict[str, Any]:
        public = rsa_key(kid).public_key()
        jwk: dict[str, Any] = RSAAlgorithm.to_jwk(public, as_dict=True)
        return {**jwk, "kid": kid, "use": "sig", "alg": "RS256"}

    # ------------------------------------------------------------ tokens

    @staticmethod
    def claims(
        sub: str | None = None,
        *,
        v: int = 2,
        org: str | None = None,
        role: str | None = None,
        permissions: list[str] | None = None,
        azp: str | None = PARTY,
        iss: str = ISSUER,
        exp_in: float = 60,
        nbf_in: float = -10,
        iat_in: float = -10,
        **extra: Any,
    ) -> dict[str, Any]:
        """Clerk session claims (v2 by default; ``v=1`` for the legacy org claims)."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "sub": sub or f"user_{uuid.uuid4().hex}",
            "sid": f"sess_{uuid.uuid4().hex[:16]}",
            "iss": iss,
            "exp": int(now + exp_in),
            "nbf": int(now + nbf_in),
            "iat": int(now + iat_in),
        }
        if azp is not None:
            claims["azp"] = azp
        if v == 2:
            claims["v"] = 2
            if org is not None:
                o: dict[str, Any] = {"id": org, "slg": "acme"}
                if role is not None:
                    o["rol"] = role  # v2: without the "org:" prefix
                claims["o"] = o
        elif org is not None:
            claims["org_id"] = org
            claims["org_slug"] = "acme"
            if role is not None:
                claims["org_role"] = role  # v1: "org:admin"
            claims["org_permissions"] = permissions or []
        claims.update(extra)
        return {k: v for k, v in claims.items() if v is not None}

    def token(
        self, sub: str | None = None, *, kid: str = "kid-1", signer: str | None = None, **kw: Any
    ) -> str:
        """A token naming ``kid``, signed with ``signer``'s private key (``kid``'s by default)."""
        key = rsa_key(signer or kid)
        return jwt.encode(self.claims(sub, **kw), key, algorithm="RS256", headers={"kid": kid})

    @staticmethod
    def unsigned(claims: dict[str, Any], kid: str = "kid-1") -> str:
        """``alg: none``: no signature at all."""
        header = b64(json.dumps({"alg": "none", "typ": "JWT", "kid": kid}).encode())
        return f"{header}.{b64(json.dumps(claims).encode())}."

    @staticmethod
    def hs256_with_public_key(claims: dict[str, Any], kid: str = "kid-1") -> str:
        """The classic key-confusion forgery: HMAC keyed with the RSA public key's PEM."""
        pem = (
            rsa_key(kid)
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
        payload = b64(json.dumps(claims).encode())
        sig = hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        return f"{header}.{payload}.{b64(sig)}"

    @staticmethod
    def tampered(token: str, **changes: Any) -> str:
        """``token`` with its payload edited and the original signature kept."""
        header, payload, sig = token.split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        claims.update(changes)
        return f"{header}.{b64(json.dumps(claims).encode())}.{sig}"
