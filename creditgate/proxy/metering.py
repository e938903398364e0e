"""One metered call: its hold and throttle admission, ended exactly once.

``settle`` charges the actual cost (the upstream's usage, or an estimate
marked ``estimated``) and ``release`` ends the hold with no charge; either
also returns the throttle admission, corrected by the tokens actually used.
``close`` (in the handler's ``finally``) releases whatever is still open, so
every exit path — errors, disconnects, cancellation — ends the hold.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from tenacity import (
    AsyncRetrying,
    retry_if_not_exception_type,
    stop_after_delay,
    stop_never,
    wait_exponential_jitter,
)

from creditgate import ledger
from creditgate.domain_errors import DomainError
from creditgate.errors import ServiceUnavailable
from creditgate.ledger.errors import HoldNotFound
from creditgate.logs import log
from creditgate.metrics import CREDITS_CHARGED, LEDGER_LATENCY, TOKENS, cached_labels
from creditgate.proxy.dialect import CHAT_DIALECT
from creditgate.proxy.pricing import (
    TokenCounts,
    cost_of,
    estimate_text_tokens,
    recorded_breakdown,
    token_series,
)

if TYPE_CHECKING:
    from creditgate.config import Model
    from creditgate.proxy.dialect import MeteredRequest
    from creditgate.proxy.ports import Admissions, HoldBook, MeteringSettings
    from creditgate.throttle import Admission

_SETTLE_LATENCY = LEDGER_LATENCY.labels("settle")
PROGRESS_INTERVAL = 1.0  # seconds between two progress records of one stream
# Seconds of text before a stream's first record: a process killed later than
# this into a stream still owes its prompt and what went out.
FIRST_PROGRESS_DELAY = 0.1
# Of the settle margin (the hold's life after the call's deadline), the share
# settlement retries may use: the rest is slack before the sweeper's turn.
SETTLE_RETRY_SHARE = 0.8
# A settlement still failing when that share is spent goes on in the
# background until it commits (served usage is never forgiven): waits grow to
# this cap. Past the hold's expiry it commits as a late debit (ledger.holds);
# if the sweeper charged the hold's recorded progress first, that one stands.
LATE_SETTLE_MAX_WAIT = 30.0
LATE_SETTLE_FIRST_WAIT = 0.5
_late_settlements: set[asyncio.Task[None]] = set()

_tokens = cached_labels(TOKENS)
_credits_charged = cached_labels(CREDITS_CHARGED)
# What an upstream's usage says in its own currency: not shown to the client,
# whose usage.cost is the credits charged (a reseller's margin stays its own).
UPSTREAM_COST_FIELDS = ("cost_details", "is_byok")


def usage_of(model: Model, counts: TokenCounts, *, estimated: bool) -> ledger.Usage:
    """What the ledger debits for ``counts`` on ``model``: the cost (by kind, or
    the reported cost × markup) and the tokens by kind kept on the entry. Any
    route's metering (chat, or another API's usage read into TokenCounts)
    charges through this, so every debit records its kinds the same way."""
    return ledger.Usage(
        counts.input,
        counts.output,
        cost_of(model, counts),
        estimated=estimated,
        breakdown=tuple(recorded_breakdown(model, counts).items()),
    )


class UsageShape(Protocol):
    """How one API reports usage (``proxy.dialect.Dialect``): read, and estimated."""

    def counts(self, usage: dict[str, Any] | None) -> TokenCounts | None:
        """The tokens of the API's usage object; None if missing or invalid."""
        ...

    def estimated_usage(self, counts: TokenCounts) -> dict[str, Any]:
        """The usage object a client sees for an estimated charge."""
        ...


@dataclass(frozen=True, slots=True)
class Charge:
    settlement: ledger.Settlement
    usage: dict[str, Any]  # the usage object the client sees, with the cost in it


class MeteredCall:
    """The hold and the throttle admission of one call in flight.

    It takes the narrow interfaces it uses (``proxy.ports``): the holds, the
    throttle and two settings — not the app's state — so its exits can be
    driven with in-process fakes (tests/test_metered_call.py).
    """

    __slots__ = (
        "_ended",
        "_progress_at",
        "_progress_task",
        "admission",
        "chat",
        "deadline",
        "hold",
        "holds",
        "request_id",
        "settings",
        "shape",
        "throttle",
        "upstream_seconds",
    )

    def __init__(
        self,
        holds: HoldBook,
        throttle: Admissions,
        settings: MeteringSettings,
        chat: MeteredRequest,
        hold: ledger.Hold,
        admission: Admission,
        request_id: str,
        deadline: float,
        shape: UsageShape = CHAT_DIALECT,
    ) -> None:
        self.holds = holds
        self.throttle = throttle
        self.settings = settings
        self.deadline = deadline  # loop time: the call is cut here; its hold lives longer
        self._progress_at = 0.0  # loop time of the last progress record (0: no text yet)
        self._progress_task: asyncio.Task[None] | None = None
        # The call's parsed request, of whichever API (the name is chat's, the first).
        self.chat = chat
        self.shape = shape  # how its API reports usage
        self.hold = hold
        self.admission = admission
        self.request_id = request_id
        self._ended = False
        # Time spent waiting on the upstream (and, streaming, relaying it):
        # the rest of the request's time is creditgate's overhead.
        self.upstream_seconds = 0.0

    def measure(self, usage: dict[str, Any] | None, text_bytes: int) -> tuple[ledger.Usage, bool]:
        """The usage to charge, and whether it is the upstream's own count."""
        measured, _, exact = self._measure(usage, text_bytes)
        return measured, exact

    def _measure(
        self, usage: dict[str, Any] | None, text_bytes: int
    ) -> tuple[ledger.Usage, TokenCounts, bool]:
        chat = self.chat
        counts = self.shape.counts(usage)
        exact = counts is not None
        if counts is None:
            # Never more than the call could generate: max_tokens bounds the
            # upstream, so it bounds an estimate too.
            out_tok = min(
                estimate_text_tokens(text_bytes, self.settings.estimate_bytes_per_token),
                chat.worst_case_output_tokens,
            )
            counts = TokenCounts(chat.prompt_tokens_estimate, out_tok)
        return usage_of(chat.model, counts, estimated=not exact), counts, exact

    async def settle(self, usage: dict[str, Any] | None, text_bytes: int) -> Charge:
        """Charge the call: the upstream's usage when valid, else an estimate (marked).

        ``text_bytes`` is the generated text seen, for the estimate. Once begun
        the settlement completes even if the request is cancelled; the
        throttle is corrected concurrently, so neither waits for the other.
        """
        assert not self._ended, "a call is settled or released once"
        self._ended = True
        measured, counts, exact = self._measure(usage, text_bytes)
        tokens = measured.input_tokens + measured.output_tokens
        started = time.perf_counter()
        # Queued first (group commit, ledger.group_commit: batched with
        # concurrent settles), so the statement is on its way while the
        # throttle's correction makes its Redis round trip in this task; the
        # settlement runs to the end even if this task is cancelled meanwhile.
        settling = self.holds.settle_soon(self.hold.id, measured)
        try:
            try:
                await self.throttle.finish(self.admission, tokens)
            finally:
                settlement = await asyncio.shield(self._settled(settling, measured))
        except HoldNotFound:
            # No such hold: reserves are durable, so only a database restored
            # from an older backup gets here; nothing is charged.
            log.warning("hold lost before its settlement", extra=self.log_ids())
            raise ServiceUnavailable(
                "The database restarted during this call and its reservation was lost;"
                " nothing was charged. Retry the request."
            ) from None
        _SETTLE_LATENCY.observe(time.perf_counter() - started)
        model = self.chat.model.name
        for direction, kind, n in token_series(counts):
            _tokens(model, direction, kind).inc(n)
        _credits_charged(model).inc(settlement.debited)
        if measured.cost > self.hold.amount:
            # Only a reported cost above the price table's worst case (or an
            # upstream ignoring max_tokens) gets here: charged as far as the
            # account covers it, the rest recorded as uncollected.
            log.warning(
                "cost above the hold",
                extra={
                    **self.log_ids(),
                    "model": model,
                    "cost_micros": measured.cost,
                    "hold_micros": self.hold.amount,
                },
            )
        if settlement.uncollected:
            log.warning(
                "cost above what the account could cover",
                extra={**self.log_ids(), "uncollected_micros": settlement.uncollected},
            )
        seen: dict[str, Any]
        if exact:
            assert usage is not None
            seen = {k: v for k, v in usage.items() if k not in UPSTREAM_COST_FIELDS}
        else:
            seen = self.shape.estimated_usage(
                TokenCounts(measured.input_tokens, measured.output_tokens)
            )
        return Charge(
            settlement,
            {
                **seen,
                "cost": ledger.micros_to_credits(settlement.debited),
                "cost_micros": settlement.debited,
            },
        )

    async def _settled(
        self, settling: asyncio.Future[ledger.Settlement], usage: ledger.Usage
    ) -> ledger.Settlement:
        """The settlement, retried while the database fails (a restart, a broken
        connection) until it commits or the hold is about to expire.

        Safe to repeat: a settlement is idempotent by hold id (a repeat
        returns the first). A refusal (a ledger error: no such hold,
        already ended) is final. The hold expires ``settle_margin_seconds`` after the
        call's deadline; retries stop before that.
        """
        try:
            return await settling
        except DomainError:
            raise
        except Exception:
            log.warning("settlement failed; retrying", exc_info=True, extra=self.log_ids())
        loop = asyncio.get_running_loop()
        margin = self.settings.settle_margin_seconds
        budget = max(0.0, self.deadline + margin * SETTLE_RETRY_SHARE - loop.time())
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_delay(budget),
                wait=wait_exponential_jitter(multiplier=0.1, max=2.0, jitter=0.1),
                retry=retry_if_not_exception_type(DomainError),
                reraise=True,
            ):
                with attempt:
                    return await self.holds.settle(self.hold.id, usage)
        except DomainError:
            raise
        except Exception:
            # The call fails now; its usage is still owed, so keep settling.
            task = asyncio.create_task(self._settle_late(usage))
            _late_settlements.add(task)
            task.add_done_callback(_late_settlements.discard)
            raise
        raise AssertionError("unreachable: tenacity returns or raises")

    async def _settle_late(self, usage: ledger.Usage) -> None:
        """Retry a settlement the call gave up on until it commits or is refused."""
        log.warning("settlement still failing; retrying in the background", extra=self.log_ids())
        try:
            async for attempt in AsyncRetrying(
                stop=stop_never,
                wait=wait_exponential_jitter(
                    multiplier=LATE_SETTLE_FIRST_WAIT, max=LATE_SETTLE_MAX_WAIT, jitter=0.1
                ),
                retry=retry_if_not_exception_type(DomainError),
                reraise=True,
            ):
                with attempt:
                    settlement = await self.holds.settle(self.hold.id, usage)
        except DomainError:
            # No such hold (a restored backup) or released: nothing more to do here.
            log.warning("late settlement refused", exc_info=True, extra=self.log_ids())
            return
        except asyncio.CancelledError:
            # Shutdown: the sweeper charges the hold's recorded progress, if any.
            log.warning("late settlement abandoned at shutdown", extra=self.log_ids())
            raise
        log.info(
            "late settlement committed",
            extra={**self.log_ids(), "debited_micros": settlement.debited},
        )

    def progress(self, text_bytes: int) -> None:
        """A stream delivered text: record what it owes so far, first once it
        has streamed ``FIRST_PROGRESS_DELAY``, then at most every
        ``PROGRESS_INTERVAL``, one record in flight (a task, off the latency
        path). If this process dies, the sweeper charges the last record
        (ledger.holds): the prompt and the text up to it are not forgiven.
        Streams that end within the first delay (a mock's, a benchmark's)
        write nothing; a model's stream lasts longer (BENCHMARKS.md)."""
        if text_bytes <= 0 or self._ended:
            return
        now = asyncio.get_running_loop().time()
        if not self._progress_at:
            # The first text: as if a record had been made, so that the first
            # real one falls due FIRST_PROGRESS_DELAY from now.
            self._progress_at = now - PROGRESS_INTERVAL + FIRST_PROGRESS_DELAY
        running = self._progress_task is not None and not self._progress_task.done()
        if running or now - self._progress_at < PROGRESS_INTERVAL:
            return
        self._progress_at = now
        measured, _ = self.measure(None, text_bytes)
        self._progress_task = asyncio.create_task(self._record(measured))

    async def _record(self, usage: ledger.Usage) -> None:
        try:
            await self.holds.record_progress(self.hold.id, usage)
        except Exception:
            # Progress is a crash's fallback, not the charge: the call goes on.
            log.warning("progress record failed", exc_info=True, extra=self.log_ids())

    def log_ids(self) -> dict[str, str]:
        """The call's ids, as structured log fields."""
        return {"request_id": self.request_id, "hold_id": str(self.hold.id)}

    async def release(self) -> None:
        """End the hold with no charge and give the throttle its tokens back."""
        if self._ended:
            return
        self._ended = True
        # Never served: the throttle gives back its tokens and its daily message.
        finishing = asyncio.ensure_future(self.throttle.finish(self.admission, None))
        try:
            await asyncio.shield(self.holds.release(self.hold.id))
        finally:
            await finishing

    async def close(self) -> None:
        """Release the hold if the call was neither settled nor released."""
        await self.release()


async def finish_late_settlements(grace: float) -> int:
    """Give background settlements up to ``grace`` seconds to commit, then
    cancel the rest (at shutdown); returns how many were still pending."""
    pending = set(_late_settlements)
    if not pending:
        return 0
    _done, still = await asyncio.wait(pending, timeout=grace)
    for task in still:
        task.cancel()
    if still:
        await asyncio.wait(still)
    return len(still)
