"""Calling the upstream provider: pooled connections, timeouts, retries, fallback.

Everything here happens before a byte reaches the client, so a failed
attempt can be retried without duplicating output. An attempt succeeds when
the upstream answered 200 **and** the start of its answer is sound: for a
stream, the first complete SSE event (a comment, or a JSON chunk that is not
an error); for a plain completion, the whole JSON body. So a stream that is
cut, times out or sends garbage before its first event is retried like a 5xx.

Per deployment (tried in ``routing.attempt_order``):

=====================================  ======================================
connection error, 429, 500/502/503/504  retried with exponential backoff and
  or the stream dropped before its        jitter (tenacity), honouring
  first event                             ``Retry-After``; then next deployment
401/403 (our key), garbage, a           next deployment at once
  first-byte timeout, a Retry-After
  longer than ``MAX_RETRY_AFTER``,
  other statuses
400/404/409/413/422 (the request's      raised at once as UpstreamBadRequest
  own fault)                              (status and message kept)
=====================================  ======================================

All attempts together stay within the model's ``timeouts.total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import aiohttp
import orjson
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential_jitter,
)

from creditgate.config import Deployment, Model
from creditgate.errors import ApiError, UpstreamBadRequest, UpstreamError, UpstreamTimeout
from creditgate.metrics import UPSTREAM_FIRST_BYTE, UPSTREAM_REQUESTS, cached_labels
from creditgate.proxy.routing import attempt_order
from creditgate.proxy.sse import EventSplitter, event_data

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
PASS_THROUGH_STATUSES = frozenset({400, 404, 409, 413, 422})
ATTEMPTS_PER_DEPLOYMENT = 3
MAX_RETRY_AFTER = 10.0  # seconds: an upstream asking for a longer wait is skipped
MAX_BODY_BYTES = 64 * 1024 * 1024  # a non-streaming answer larger than this is garbage
MAX_ERROR_BYTES = 64 * 1024
ERROR_BODY_TIMEOUT = 5.0  # seconds to read an error answer's body
DRAIN_TIMEOUT = 1.0  # seconds to wait for a stream's end after [DONE]
DRAIN_BYTES = 64 * 1024
_upstream_requests = cached_labels(UPSTREAM_REQUESTS)
_first_byte = cached_labels(UPSTREAM_FIRST_BYTE)


class WireApi(Protocol):
    """What the client needs of an API (``proxy.dialect.Dialect``): where it is
    served upstream and how its answers are judged before the client sees them."""

    @property
    def upstream_path(self) -> str:
        """Appended to the upstream's base_url, e.g. ``/chat/completions``."""
        ...

    def valid_answer(self, body: dict[str, Any]) -> bool:
        """Whether a 200 JSON answer is one of this API's."""
        ...

    def event_error(self, obj: dict[str, Any]) -> str | None:
        """The message of a stream event that is an error, else None."""
        ...


class _ChatWire:
    """Chat completions: the API a call names none of (``proxy.dialect.ChatDialect``)."""

    upstream_path = "/chat/completions"

    def valid_answer(self, body: dict[str, Any]) -> bool:
        return isinstance(body.get("choices"), list)

    def event_error(self, obj: dict[str, Any]) -> str | None:
        error = obj.get("error")
        if isinstance(error, dict):
            message = error.get("message")
            return message if isinstance(message, str) and message else "error event"
        return None


CHAT_WIRE: WireApi = _ChatWire()


class _Retryable(Exception):
    """A failure worth another attempt on the same deployment."""

    def __init__(self, error: ApiError, retry_after: float | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry_after = retry_after


class _NextDeployment(Exception):
    """A failure another attempt on this deployment would repeat."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass(slots=True)
class Answer:
    """A non-streaming completion, read and parsed."""

    body: dict[str, Any]
    deployment: Deployment
    attempts: int


@dataclass(slots=True)
class Stream:
    """A streaming completion whose first event has arrived; the rest is unread."""

    response: aiohttp.ClientResponse
    head: bytes  # bytes read while checking the start, not yet forwarded
    deployment: Deployment
    attempts: int
    deadline: float  # loop time at which the model's total timeout ends

    async def finish(self) -> None:
        """After ``[DONE]``: read the body's last bytes, so the connection goes back
        to the pool instead of being closed (a new one costs a TLS handshake)."""
        drained = False
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT):
                left = DRAIN_BYTES
                while left > 0 and not drained:
                    chunk = await self.response.content.readany()
                    drained = not chunk
                    left -= len(chunk)
        except (TimeoutError, aiohttp.ClientError):
            pass
        finally:
            if drained:
                self.response.release()
            else:
                self.response.close()  # it kept talking after [DONE], or we were cancelled

    def close(self) -> None:
        """Drop the connection: the upstream sees the call cancelled."""
        self.response.close()


_backoff = wait_exponential_jitter(multiplier=0.05, max=2.0, jitter=0.05)


def _wait(state: RetryCallState) -> float:
    exc = state.outcome.exception() if state.outcome else None
    backoff = _backoff(state)
    if isinstance(exc, _Retryable) and exc.retry_after is not None:
        return max(backoff, exc.retry_after)
    return backoff


def retry_after_seconds(headers: Any) -> float | None:
    """The wait an upstream asked for: ``retry-after-ms``, or ``Retry-After`` in
    seconds or as an HTTP date; None when absent or unreadable."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        with contextlib.suppress(ValueError):
            return max(0.0, float(ms) / 1000)
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


async def _error_message(resp: aiohttp.ClientResponse) -> str:
    """The upstream's own error message, read within a bounded size and time."""
    raw = b""
    with contextlib.suppress(TimeoutError, aiohttp.ClientError):
        async with asyncio.timeout(ERROR_BODY_TIMEOUT):
            while len(raw) < MAX_ERROR_BYTES:
                chunk = await resp.content.readany()
                if not chunk:
                    break
                raw += chunk
    with contextlib.suppress(orjson.JSONDecodeError):
        body = orjson.loads(raw)
        error = body.get("error") if isinstance(body, dict) else None
        message = error.get("message") if isinstance(error, dict) else error
        if isinstance(message, str) and message:
            return message[:1000]
    return f"the upstream answered {resp.status}"


def _garbage(what: str) -> _NextDeployment:
    return _NextDeployment(UpstreamError(f"The upstream answered {what}."))


class UpstreamClient:
    """One pooled aiohttp session for every upstream."""

    def __init__(self, session: aiohttp.ClientSession, rng: random.Random | None = None) -> None:
        self._session = session
        self._rng = rng
        self._timeouts: dict[str, aiohttp.ClientTimeout] = {}

    async def complete(
        self,
        model: Model,
        body: dict[str, Any],
        *,
        deadline: float | None = None,
        api: WireApi = CHAT_WIRE,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        """A non-streaming answer of ``api``; see ``_call`` for the errors it raises.

        ``headers`` are client headers passed through (e.g. ``anthropic-version``)."""
        result = await self._call(
            model, body, stream=False, deadline=deadline, api=api, extra=headers
        )
        assert isinstance(result, Answer)
        return result

    async def stream(
        self,
        model: Model,
        body: dict[str, Any],
        *,
        deadline: float | None = None,
        api: WireApi = CHAT_WIRE,
        headers: Mapping[str, str] | None = None,
    ) -> Stream:
        """A streamed answer of ``api``, started; see ``_call`` for the errors it raises."""
        result = await self._call(
            model, body, stream=True, deadline=deadline, api=api, extra=headers
        )
        assert isinstance(result, Stream)
        return result

    async def forward(
        self,
        model: Model,
        path: str,
        body: dict[str, Any],
        headers: Mapping[str, str],
        *,
        seconds: float,
    ) -> tuple[int, bytes]:
        """One plain POST to the model's first deployment, answered as it came
        (status and body): for unmetered helpers such as Anthropic's
        ``count_tokens``. Raises UpstreamError / UpstreamTimeout when unreachable."""
        deployment = attempt_order(model.deployments, self._rng)[0]
        payload = {**body, "model": deployment.model}
        sent = _auth_headers(deployment, headers)
        try:
            async with asyncio.timeout(seconds):
                async with self._session.post(
                    f"{deployment.upstream.base_url}{path}",
                    data=orjson.dumps(payload),
                    headers=sent,
                ) as resp:
                    raw = await resp.content.read(MAX_ERROR_BYTES)
                    return resp.status, raw
        except TimeoutError:
            raise UpstreamTimeout(f"The upstream sent nothing within {seconds:g} s.") from None
        except (aiohttp.ClientError, OSError):
            raise UpstreamError("Could not reach the upstream provider.") from None

    async def _call(
        self,
        model: Model,
        body: dict[str, Any],
        *,
        stream: bool,
        deadline: float | None,
        api: WireApi = CHAT_WIRE,
        extra: Mapping[str, str] | None = None,
    ) -> Answer | Stream:
        """Try the model's deployments until one answers soundly, by ``deadline``
        (loop time; default: the model's total timeout from now). The proxy
        passes its call's deadline, which its hold outlives (proxy.routes).

        Raises UpstreamBadRequest (the request's own fault, status kept),
        UpstreamTimeout (504: nothing within the first-byte or total timeout)
        or UpstreamError (502: failed after retries, or garbage).
        """
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + model.timeouts.total
        attempts = 0
        last: ApiError | None = None  # made only when it is needed: off the happy path
        for deployment in attempt_order(model.deployments, self._rng):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            payload = orjson.dumps({**body, "model": deployment.model})
            try:
                # The first attempt runs outside tenacity: building its
                # retrying machinery costs ~25 µs, paid only once a retry is due.
                try:
                    attempts += 1
                    return await self._attempt(
                        model, deployment, payload, attempts, deadline, stream, api, extra
                    )
                except _Retryable as e:
                    failed: _Retryable | None = e
                async for attempt in AsyncRetrying(
                    stop=stop_after_attempt(ATTEMPTS_PER_DEPLOYMENT)
                    | stop_before_delay(deadline - loop.time()),
                    wait=_wait,
                    retry=retry_if_exception_type(_Retryable),
                    reraise=True,
                ):
                    with attempt:
                        if failed is not None:
                            # Attempt 1, already made: tenacity judges it like any other.
                            first, failed = failed, None
                            raise first
                        attempts += 1
                        return await self._attempt(
                            model, deployment, payload, attempts, deadline, stream, api, extra
                        )
            except (_Retryable, _NextDeployment) as e:
                last = e.error
            except UpstreamBadRequest as e:
                e.headers["x-creditgate-attempts"] = str(attempts)
                raise
        if last is None:
            last = UpstreamError("The upstream provider failed.")
        if loop.time() >= deadline and not isinstance(last, UpstreamTimeout):
            last = UpstreamTimeout(
                f"The upstream did not answer within {model.timeouts.total:g} s"
                f" ({attempts} attempts; last: {last.message})"
            )
        last.headers["x-creditgate-attempts"] = str(attempts)
        raise last

    def _client_timeout(self, model: Model) -> aiohttp.ClientTimeout:
        # Only the connect phase is left to aiohttp; first byte, idle and total
        # are enforced here and in the relay, which know which one ran out.
        timeout = self._timeouts.get(model.name)
        if timeout is None:
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=model.timeouts.connect, sock_read=None
            )
            self._timeouts[model.name] = timeout
        return timeout

    async def _attempt(
        self,
        model: Model,
        deployment: Deployment,
        payload: bytes,
        attempts: int,
        deadline: float,
        stream: bool,
        api: WireApi,
        extra: Mapping[str, str] | None,
    ) -> Answer | Stream:
        t = model.timeouts
        headers = _auth_headers(deployment, extra)
        url = f"{deployment.upstream.base_url}{api.upstream_path}"
        labels = (model.name, deployment.name)
        loop = asyncio.get_running_loop()
        started = loop.time()
        first_byte_by = min(started + t.first_byte, deadline)
        resp: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout_at(first_byte_by):
                resp = await self._session.post(
                    url, data=payload, headers=headers, timeout=self._client_timeout(model)
                )
                if resp.status != 200:
                    await self._refused(resp, labels)
                if stream:
                    head = await self._stream_head(resp, api)
        except aiohttp.ConnectionTimeoutError:  # `connect` ran out: a connection error
            _upstream_requests(*labels, "connect_error").inc()
            raise _Retryable(UpstreamError("Could not connect to the upstream provider.")) from None
        except TimeoutError:
            if resp is not None:
                resp.close()
            _upstream_requests(*labels, "timeout").inc()
            waited = min(t.first_byte, t.total)
            raise _NextDeployment(
                UpstreamTimeout(f"The upstream sent nothing within {waited:g} s.")
            ) from None
        except (aiohttp.ClientError, OSError):
            if resp is not None:
                resp.close()
            _upstream_requests(*labels, "connect_error").inc()
            raise _Retryable(UpstreamError("Could not reach the upstream provider.")) from None
        except BaseException:  # _Retryable, _NextDeployment, UpstreamBadRequest, cancellation
            if resp is not None:
                resp.close()
            raise
        _first_byte(model.name).observe(loop.time() - started)
        if stream:
            _upstream_requests(*labels, "ok").inc()
            return Stream(resp, head, deployment, attempts, deadline)
        try:
            async with asyncio.timeout_at(deadline):
                raw = await _read_body(resp)
        except TimeoutError:
            resp.close()
            _upstream_requests(*labels, "timeout").inc()
            raise _NextDeployment(
                UpstreamTimeout(f"The upstream's answer took longer than {t.total:g} s.")
            ) from None
        except aiohttp.ClientError:
            resp.close()
            _upstream_requests(*labels, "read_error").inc()
            raise _Retryable(UpstreamError("The upstream connection failed mid-answer.")) from None
        finally:
            resp.release()
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict) or not api.valid_answer(answer):
            _upstream_requests(*labels, "garbage").inc()
            raise _garbage("something that is not an answer of its API")
        _upstream_requests(*labels, "ok").inc()
        return Answer(answer, deployment, attempts)

    async def _refused(self, resp: aiohttp.ClientResponse, labels: tuple[str, str]) -> NoReturn:
        """Classify a non-200 answer: raise the error it amounts to."""
        status = resp.status
        _upstream_requests(*labels, f"http_{status // 100}xx").inc()
        try:
            message = await _error_message(resp)
        finally:
            resp.release()  # back to the pool when the body was read whole
        if status in PASS_THROUGH_STATUSES:
            raise UpstreamBadRequest(status, message)
        if status in RETRY_STATUSES:
            wait = retry_after_seconds(resp.headers)
            error = UpstreamError(f"The upstream provider failed ({status}): {message}")
            if wait is not None and wait > MAX_RETRY_AFTER:
                raise _NextDeployment(error)
            raise _Retryable(error, wait)
        if status in (401, 403):
            raise _NextDeployment(
                UpstreamError(f"The upstream provider refused creditgate's credentials ({status}).")
            )
        raise _NextDeployment(UpstreamError(f"The upstream provider answered {status}: {message}"))

    async def _stream_head(self, resp: aiohttp.ClientResponse, api: WireApi) -> bytes:
        """Read until the first complete event and check it; returns the bytes read."""
        splitter = EventSplitter()
        head = b""
        while True:
            chunk = await resp.content.readany()
            if not chunk:
                if head:
                    raise _garbage("a stream that is not server-sent events")
                raise _Retryable(UpstreamError("The upstream closed the stream before any event."))
            head += chunk
            events = splitter.feed(chunk)
            if events:
                break
            if len(head) > MAX_ERROR_BYTES:
                raise _garbage("a stream that is not server-sent events")
        data = event_data(events[0])
        if data is None:
            return head  # a comment (a heartbeat): the stream is alive
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            raise _garbage("a stream event that is not JSON")
        message = api.event_error(obj)
        if message is not None:
            raise _Retryable(UpstreamError(f"The upstream provider failed: {message}"))
        return head


def _auth_headers(deployment: Deployment, extra: Mapping[str, str] | None) -> dict[str, str]:
    """The headers of a call to ``deployment``: its key, as its kind sends it,
    and the client's passed-through headers (never the client's credentials)."""
    upstream = deployment.upstream
    headers = {"Content-Type": "application/json", **(extra or {})}
    if upstream.kind == "anthropic":
        headers.setdefault("anthropic-version", upstream.anthropic_version)
        if upstream.api_key:
            headers["x-api-key"] = upstream.api_key
    elif upstream.api_key:
        headers["Authorization"] = f"Bearer {upstream.api_key}"
    return headers


async def _read_body(resp: aiohttp.ClientResponse) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        chunk = await resp.content.readany()
        if not chunk:
            return b"".join(parts)
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _garbage(f"a body over {MAX_BODY_BYTES} bytes")
        parts.append(chunk)
