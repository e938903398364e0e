"""What one API contributes to the one metered path: its dialect.

The metered path (``proxy.routes.serve_metered``: authenticate → parse →
throttle → reserve → upstream → relay → settle) is the same for every API
creditgate meters. A ``Dialect`` supplies only what differs between them:

- parsing and validating the request, with its prompt estimate and output cap
  (a ``MeteredRequest``);
- the upstream path and the client headers passed through to it;
- how usage is read from a JSON answer and from stream events, into
  ``TokenCounts``, and how an estimated usage is shaped when none came;
- how the cost is added to the final usage, and the events that end a stream
  (after its settlement) or cut it short;
- its error shape (``webkit.envelope.ERROR_SHAPE``).

``ChatDialect`` is OpenAI's chat completions; ``proxy.apis`` has the
Responses API, Anthropic Messages and embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Final, Literal, Protocol

import orjson
from aiohttp import web

from creditgate.config import ApiName, Model
from creditgate.proxy import relay as ends
from creditgate.proxy.pricing import TokenCounts, counts_from_chat_usage
from creditgate.proxy.relay import Relay, StreamEnd
from creditgate.proxy.request import parse_chat_request
from creditgate.proxy.sse import DONE_EVENT, error_event, event_data, generated_bytes, sse_event
from creditgate.proxy.upstream import Stream
from creditgate.webkit.drain import SHUTDOWN_END
from creditgate.webkit.envelope import dumps

_CHUNK_IDS = ("id", "created", "model", "system_fingerprint")
ErrorShape = Literal["openai", "anthropic"]


class MeteredRequest(Protocol):
    """A parsed request of any API: what the metered path needs of it."""

    @property
    def model(self) -> Model:
        """The model called."""
        ...

    @property
    def upstream_body(self) -> dict[str, Any]:
        """The body sent upstream (``model`` is set per deployment)."""
        ...

    @property
    def stream(self) -> bool:
        """Whether the answer streams."""
        ...

    @property
    def prompt_tokens_estimate(self) -> int:
        """An upper bound of the prompt's tokens: what the hold reserves for them."""
        ...

    @property
    def required_prompt_tokens(self) -> int:
        """The prompt the request itself carries (its bound): the throttle refuses
        one above a minute's tokens. Below ``prompt_tokens_estimate`` only when
        the upstream adds stored turns this request does not show."""
        ...

    @property
    def worst_case_output_tokens(self) -> int:
        """The most the call can generate (its cap is sent upstream)."""
        ...

    @property
    def hold_note(self) -> str | None:
        """Why the hold exceeds what the request shows, added to a 402's message."""
        ...

    @property
    def worst_case_tokens(self) -> int:
        """The carried prompt plus the output bound: what the throttle takes up
        front (corrected by the usage when the call ends)."""
        ...


def end_message(end: StreamEnd | Literal[""]) -> tuple[str, str]:
    """(message, code) of a stream cut short, whatever the API."""
    if end == ends.IDLE_TIMEOUT:
        return "The upstream stopped sending mid-stream.", "UPSTREAM_TIMEOUT"
    if end == ends.TOTAL_TIMEOUT:
        return "The completion exceeded the model's total time limit.", "UPSTREAM_TIMEOUT"
    if end == SHUTDOWN_END:
        return (
            "The server is shutting down; the stream was cut. Retry for the rest.",
            "SERVER_SHUTTING_DOWN",
        )
    if end == ends.MALFORMED:
        return "The upstream sent an event that is not JSON.", "UPSTREAM_ERROR"
    return "The upstream stream ended early.", "UPSTREAM_ERROR"


# The route of each API, recorded as each dialect class is defined (ChatDialect
# here, the others in proxy.apis, which the app imports): one place says it.
ROUTES: dict[ApiName, str] = {}


class Dialect:
    """One API's part of the metered path; see the module's docstring.

    The defaults are OpenAI's conventions (``usage`` with ``prompt_tokens``,
    an ``{"error": …}`` object in a stream); each API overrides what differs.
    """

    api: ClassVar[ApiName]
    path: ClassVar[str]  # the route, e.g. "/v1/chat/completions"
    upstream_path: ClassVar[str]  # appended to the upstream's base_url
    error_shape: ClassVar[ErrorShape] = "openai"
    # Client headers passed through to the upstream (lower case).
    passed_headers: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "api" in cls.__dict__:  # a concrete API, not a shared base like TypedDialect
            ROUTES[cls.api] = cls.path

    def parse(
        self,
        body: dict[str, Any],
        models: Mapping[str, Model],
        bytes_per_token: int,
        *,
        default_model: str | None = None,
    ) -> MeteredRequest:
        """Validate ``body``: 400 listing each problem, 404 for an unknown model."""
        raise NotImplementedError

    def upstream_headers(self, request: web.Request) -> dict[str, str]:
        """The client's headers the upstream should see (``passed_headers``)."""
        return {h: request.headers[h] for h in self.passed_headers if h in request.headers}

    # -- the upstream's answers, judged before anything reaches the client

    def valid_answer(self, body: dict[str, Any]) -> bool:
        """Whether a 200 JSON answer is one of this API's (else: garbage, next deployment)."""
        raise NotImplementedError

    def event_error(self, obj: dict[str, Any]) -> str | None:
        """The message of an error event (a stream's first event is checked), else None."""
        error = obj.get("error")
        if isinstance(error, dict):
            message = error.get("message")
            return message if isinstance(message, str) and message else "error event"
        return None

    # -- usage

    def counts(self, usage: dict[str, Any] | None) -> TokenCounts | None:
        """The tokens in this API's usage object; None if missing or invalid."""
        return counts_from_chat_usage(usage)

    def estimated_usage(self, counts: TokenCounts) -> dict[str, Any]:
        """The usage object the client sees when the charge is an estimate."""
        return {
            "prompt_tokens": counts.input,
            "completion_tokens": counts.output,
            "total_tokens": counts.input + counts.output,
            "estimated": True,
        }

    def answer_usage(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The usage object of a JSON answer."""
        usage = body.get("usage")
        return usage if isinstance(usage, dict) else None

    def answer_text_bytes(self, body: dict[str, Any]) -> int:
        """Generated text in a JSON answer (for an estimate without usage)."""
        return 0

    def with_usage(self, body: dict[str, Any], usage: dict[str, Any]) -> dict[str, Any]:
        """The answer the client gets: its usage replaced by the charged one (cost added)."""
        body["usage"] = usage
        return body

    # -- streams

    def relay(
        self, stream: Stream, resp: web.StreamResponse, progress: Callable[[int], None]
    ) -> Relay:
        """The relay of one stream of this API."""
        raise NotImplementedError

    def final_events(
        self,
        relay: Relay,
        req: MeteredRequest,
        usage: dict[str, Any],
        complete: bool,
        end: StreamEnd | Literal[""],
    ) -> list[bytes]:
        """The events sent after the settlement: the usage (``usage``, the cost in
        it), and the stream's end (``complete``) or the error that cut it short."""
        raise NotImplementedError

    def stream_error(self, relay: Relay, end: StreamEnd | Literal[""]) -> bytes:
        """The event ending a stream cut short: the upstream's own error event
        when it sent one, else ours."""
        raise NotImplementedError

    def failure_event(self, message: str, code: str) -> bytes:
        """An error event of our own, in this API's shape."""
        return error_event(message, code)


class ChatDialect(Dialect):
    """OpenAI chat completions (``POST /v1/chat/completions``)."""

    api = "chat"
    path = "/v1/chat/completions"
    upstream_path = "/chat/completions"

    def parse(
        self,
        body: dict[str, Any],
        models: Mapping[str, Model],
        bytes_per_token: int,
        *,
        default_model: str | None = None,
    ) -> MeteredRequest:
        return parse_chat_request(body, models, bytes_per_token, default_model=default_model)

    def valid_answer(self, body: dict[str, Any]) -> bool:
        return isinstance(body.get("choices"), list)

    def answer_text_bytes(self, body: dict[str, Any]) -> int:
        return sum(
            generated_bytes(c["message"])
            for c in body["choices"]
            if isinstance(c, dict) and isinstance(c.get("message"), dict)
        )

    def relay(
        self, stream: Stream, resp: web.StreamResponse, progress: Callable[[int], None]
    ) -> Relay:
        return Relay(stream, resp, progress=progress)

    def final_events(
        self,
        relay: Relay,
        req: MeteredRequest,
        usage: dict[str, Any],
        complete: bool,
        end: StreamEnd | Literal[""],
    ) -> list[bytes]:
        tail: list[bytes] = []
        if getattr(req, "include_usage", False):  # the client asked for the usage chunk
            tail.append(sse_event(self._usage_chunk(relay, usage)))
        tail.append(DONE_EVENT if complete else self.stream_error(relay, end))
        return tail

    @staticmethod
    def _usage_chunk(relay: Relay, usage: dict[str, Any]) -> dict[str, Any]:
        """OpenAI's final chunk: no choices, the usage — here with its cost."""
        if relay.usage_chunk is not None:
            return {**relay.usage_chunk, "usage": usage}
        last = relay.last_chunk or {}
        chunk: dict[str, Any] = {k: last[k] for k in _CHUNK_IDS if k in last}
        return {**chunk, "object": "chat.completion.chunk", "choices": [], "usage": usage}

    def stream_error(self, relay: Relay, end: StreamEnd | Literal[""]) -> bytes:
        if end == ends.ERROR_EVENT and relay.error is not None:
            return sse_event({"error": relay.error})  # the upstream's own error, as it sent it
        return error_event(*end_message(end))


CHAT_DIALECT = ChatDialect()


# ---------------------------------------------------------------- typed event streams

# What a typed relay does with one event (TypedDialect.observe).
EventAction = Literal["pass", "hold", "done", "error"]
PASS: Final = "pass"  # noqa: S105 -- relayed now, as it came (not a password)
HOLD: Final = "hold"  # held back: sent after the settlement, with the cost
DONE: Final = "done"  # the terminal event: the stream is complete
ERROR: Final = "error"  # an error event: the stream ends (kept in relay.error)


def typed_event(obj: dict[str, Any]) -> bytes:
    """An SSE event named by its data's ``type``, as the Responses and Messages APIs send them."""
    name = obj.get("type")
    head = b"event: " + str(name).encode() + b"\n" if isinstance(name, str) else b""
    return head + b"data: " + dumps(obj) + b"\n\n"


class TypedRelay(Relay):
    """A relay of typed events (``event: <type>`` + JSON data), read by its dialect.

    The dialect says per event whether it passes, is held back (the usage,
    sent after settling with its cost), ends the stream, or is an error.
    """

    __slots__ = ("dialect", "start_usage")

    def __init__(
        self,
        stream: Stream,
        resp: web.StreamResponse,
        dialect: TypedDialect,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(stream, resp, progress=progress)
        self.dialect = dialect
        self.start_usage: dict[str, Any] | None = None  # Anthropic's message_start usage

    def _take(self, events: list[bytes]) -> bytes:
        out: list[bytes] = []
        for event in events:
            data = event_data(event)
            if data is None:  # a comment or a bare event line: passed through
                out.append(event)
                continue
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                obj = None
            if not isinstance(obj, dict):
                self.end = ends.MALFORMED
                break
            action = self.dialect.observe(self, obj)
            if action == PASS:
                out.append(event)
            elif action == DONE:
                self.end = ends.DONE_END
                break
            elif action == ERROR:
                self.end = ends.ERROR_EVENT
                break
        return b"".join(out)


class TypedDialect(Dialect):
    """An API whose streams are typed events ending in a terminal event."""

    def observe(self, relay: TypedRelay, obj: dict[str, Any]) -> EventAction:
        """Note what ``obj`` carries (text, usage, an error) on ``relay``; say what to do."""
        raise NotImplementedError

    def relay(
        self, stream: Stream, resp: web.StreamResponse, progress: Callable[[int], None]
    ) -> Relay:
        return TypedRelay(stream, resp, self, progress=progress)

    def stream_error(self, relay: Relay, end: StreamEnd | Literal[""]) -> bytes:
        if end == ends.ERROR_EVENT and relay.error is not None:
            return typed_event(relay.error)  # the upstream's own error event, as it sent it
        return self.failure_event(*end_message(end))
