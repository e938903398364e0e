"""Server-sent events: splitting a byte stream into events and reading their data.

The splitter copes with events cut across network reads and with ``\\n``,
``\\r\\n`` or ``\\r`` line ends; events are passed on byte for byte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from creditgate.webkit.envelope import dumps

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE = re.compile(rb"\r\n|\n|\r")
DONE = b"[DONE]"


class EventSplitter:
    """Feed bytes, get back complete events (each with its terminating blank line)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" not in buf:
            # The common case (OpenAI and most providers end lines with \n):
            # bytes.split finds the same events as the regex, in C.
            parts = buf.split(b"\n\n")
            self._buf = parts.pop()
            return [part + b"\n\n" for part in parts]
        events = []
        start = 0
        while True:
            m = _EVENT_END.search(buf, start)
            if m is None:
                break
            events.append(buf[start : m.end()])
            start = m.end()
        self._buf = buf[start:]
        return events

    def rest(self) -> bytes:
        """Bytes after the last complete event (a stream cut mid-event)."""
        return self._buf


def event_data(event: bytes) -> bytes | None:
    """The ``data`` field of an event (lines joined by ``\\n``), or None if it has none."""
    if event.startswith(b"data:") and event.find(b"\n") == len(event) - 2 and b"\r" not in event:
        # One data line and its blank line, as nearly every chunk is: no split.
        value = event[5:-2]
        return value[1:] if value.startswith(b" ") else value
    if b"data:" not in event:
        return None
    parts = []
    for line in _LINE.split(event):
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(parts) if parts else None


def sse_event(payload: Any) -> bytes:
    """One ``data:`` event carrying ``payload`` as JSON."""
    return b"data: " + dumps(payload) + b"\n\n"


DONE_EVENT = b"data: [DONE]\n\n"


def error_event(message: str, code: str, type_: str = "api_error") -> bytes:
    """An OpenAI-style mid-stream error: the SDKs raise ``APIError`` on it."""
    return sse_event({"error": {"message": message, "type": type_, "param": None, "code": code}})


@dataclass(slots=True)
class ChunkInfo:
    obj: dict[str, Any]  # the parsed chunk
    usage: dict[str, Any] | None  # the chunk's usage object, when it carries one
    usage_only: bool  # OpenAI's final usage chunk: no choices, only usage
    text_bytes: int  # generated text in the chunk (for an estimate without usage)
    error: dict[str, Any] | None  # an error object the upstream sent mid-stream


def inspect_chunk(data: bytes) -> ChunkInfo | None:
    """What a ``chat.completion.chunk`` carries; None if the data is not a JSON object."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        usage = None
    choices = obj.get("choices")
    text = 0
    if isinstance(choices, list):
        for choice in choices:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if isinstance(delta, dict):
                text += generated_bytes(delta)
    error = obj.get("error")
    return ChunkInfo(
        obj=obj,
        usage=usage,
        usage_only=usage is not None and not choices,
        text_bytes=text,
        error=error if isinstance(error, dict) else None,
    )


# Generated text fields of a message or delta: the answer, a refusal, and the
# reasoning text some providers return (DeepSeek, OpenRouter, vLLM).
_TEXT_FIELDS = ("content", "refusal", "reasoning_content", "reasoning")


def _function_bytes(fn: Any) -> int:
    if not isinstance(fn, dict):
        return 0
    total = 0
    for key in ("name", "arguments"):
        value = fn.get(key)
        if isinstance(value, str):
            total += len(value.encode())
    return total


def generated_bytes(message: dict[str, Any]) -> int:
    """UTF-8 bytes a model generated in a message or delta: text and tool calls.

    Tool calls count their function names and arguments, not the JSON
    around them, which the model does not generate as tokens.
    """
    total = 0
    for key in _TEXT_FIELDS:
        value = message.get(key)
        if isinstance(value, str):
            total += len(value.encode())
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            if isinstance(call, dict):
                total += _function_bytes(call.get("function"))
    total += _function_bytes(message.get("function_call"))
    return total
