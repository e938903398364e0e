"""The narrow interfaces the request path uses, instead of the whole app state.

``MeteredCall`` and the chat handler take these (structural ``Protocol``s):
the production objects (``ledger.GroupCommit``, ``throttle.Throttle``,
``throttle.LimitsCache``, ``proxy.upstream.UpstreamClient``,
``preferences.DefaultModels``, ``config.Config``) satisfy them as they are,
and tests drive the request path with small in-process fakes
(``tests/test_metered_call.py``). ``http.app`` stores the app's state under
``CHAT``; the state satisfies ``ChatDeps`` without this module knowing it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

from aiohttp import web

from creditgate.config import Model, Settings
from creditgate.ledger import Hold, Settlement, Usage
from creditgate.proxy.upstream import CHAT_WIRE, Answer, Stream, WireApi
from creditgate.throttle import Admission, Limits


class HoldBook(Protocol):
    """The ledger's hold operations of one call (``ledger.GroupCommit``)."""

    def reserve_soon(
        self,
        *,
        hold_id: uuid.UUID,
        account_id: uuid.UUID,
        amount: int,
        ttl_seconds: int,
        request_id: str | None = None,
        model: str | None = None,
        key_id: uuid.UUID | None = None,
    ) -> asyncio.Future[Hold]:
        """Queue the reserve; the future of its hold (raises a ledger refusal).

        ``key_id``: the API key of the call, whose budget the hold counts against."""
        ...

    async def give_back(self, holding: asyncio.Future[Hold]) -> None:
        """End a reserve no longer wanted, however far it got."""
        ...

    def settle_soon(self, hold_id: uuid.UUID, usage: Usage) -> asyncio.Future[Settlement]:
        """Queue the settlement; it runs whatever becomes of the future."""
        ...

    async def settle(self, hold_id: uuid.UUID, usage: Usage) -> Settlement:
        """Settle (idempotent by hold id: a repeat returns the first settlement)."""
        ...

    async def release(self, hold_id: uuid.UUID) -> bool:
        """End the hold without a charge; False if it had already ended."""
        ...

    async def record_progress(self, hold_id: uuid.UUID, usage: Usage) -> None:
        """Record what a stream owes so far (the sweeper's fallback)."""
        ...


class Admissions(Protocol):
    """The throttle's admission of one call (``throttle.Throttle``)."""

    async def admit(self, limits: Limits, tokens: int, *, required_tokens: int = 0) -> Admission:
        """Take the call's share of every limit, or raise ``throttle.Throttled``."""
        ...

    async def finish(self, admission: Admission, actual_tokens: int | None) -> None:
        """Correct by the actual tokens (None: never served) and return the lease."""
        ...


class LimitsSource(Protocol):
    """The limits of a caller (``throttle.LimitsCache``)."""

    async def get(self, account_id: uuid.UUID, key_id: uuid.UUID | None) -> Limits:
        """The limits of requests of the account made with the key (None: a session)."""
        ...


class DefaultModelSource(Protocol):
    """The account's default model (``preferences.DefaultModels``)."""

    async def get(self, account_id: uuid.UUID) -> str | None:
        """The model a request naming none uses, or None."""
        ...


class Completions(Protocol):
    """The upstream client (``proxy.upstream.UpstreamClient``)."""

    async def complete(
        self,
        model: Model,
        body: dict[str, Any],
        *,
        deadline: float | None = None,
        api: WireApi = CHAT_WIRE,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        """One JSON answer of ``api``."""
        ...

    async def stream(
        self,
        model: Model,
        body: dict[str, Any],
        *,
        deadline: float | None = None,
        api: WireApi = CHAT_WIRE,
        headers: Mapping[str, str] | None = None,
    ) -> Stream:
        """One streamed answer of ``api``, its first event checked."""
        ...

    async def forward(
        self,
        model: Model,
        path: str,
        body: dict[str, Any],
        headers: Mapping[str, str],
        *,
        seconds: float,
    ) -> tuple[int, bytes]:
        """An unmetered POST to the model's upstream, answered as it came."""
        ...


class MeteringSettings(Protocol):
    """The two settings a metered call reads (``config.Config``)."""

    @property
    def estimate_bytes_per_token(self) -> int:
        """Bytes of text per token, for an estimate when the upstream sent no usage."""
        ...

    @property
    def settle_margin_seconds(self) -> float:
        """A hold's life after the call's deadline (settlement retries use 80%)."""
        ...


class ChatDeps(Protocol):
    """What the chat and models routes use of the app."""

    @property
    def settings(self) -> Settings:
        """The validated settings (models, estimates, margins)."""
        ...

    @property
    def holds(self) -> HoldBook:
        """The ledger's holds."""
        ...

    @property
    def throttle(self) -> Admissions:
        """The throttle."""
        ...

    @property
    def limits(self) -> LimitsSource:
        """The callers' limits."""
        ...

    @property
    def upstream(self) -> Completions:
        """The upstream client."""
        ...

    @property
    def default_models(self) -> DefaultModelSource:
        """The accounts' default models."""
        ...


CHAT: web.AppKey[ChatDeps] = web.AppKey("creditgate.chat")
