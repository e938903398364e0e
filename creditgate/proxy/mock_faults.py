"""The mock upstream's fault modes: one table, three ways to set them.

Each mode can be set as a server default (``creditgate mock-upstream
--drop-after 3``), per request by header when calling the mock directly
(``x-mock-drop-after: 3``), or per request in the body's ``"mock"`` object
(``{"mock": {"drop_after": 3}}`` — creditgate passes unknown fields through,
so this reaches the mock behind it; the SDKs send it with ``extra_body``).
The body wins over headers, headers over the server's defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class FaultMode:
    name: str  # body key; the flag is --name-with-dashes, the header x-mock-name-with-dashes
    type: type  # int, float, bool or str
    help: str
    fault: bool = True  # False: a shape setting, applied even when for_model does not match

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def header(self) -> str:
        return "x-mock-" + self.name.replace("_", "-")


FAULT_MODES: tuple[FaultMode, ...] = (
    FaultMode("status", int, "answer with this HTTP status and an OpenAI error body"),
    FaultMode(
        "fail_times",
        int,
        "fail the first N requests of a key (with --status, default 500), then succeed",
    ),
    FaultMode("retry_after", float, "with a failure: send Retry-After (seconds)"),
    FaultMode("first_byte_ms", int, "wait this long before the response headers"),
    FaultMode(
        "first_chunk_ms", int, "streams: send the headers, then wait this long before any event"
    ),
    FaultMode("chunk_delay_ms", int, "wait this long before each token chunk"),
    FaultMode(
        "stall_after", int, "streams: after N token chunks stop sending, keep the connection"
    ),
    FaultMode("drop_after", int, "streams: after N token chunks close the connection"),
    FaultMode(
        "malformed_after", int, "streams: after N token chunks send an event that is not JSON"
    ),
    FaultMode("error_after", int, "streams: after N token chunks send an OpenAI error event, end"),
    FaultMode("heartbeat_every", int, "streams: a ': keep-alive' comment before every Nth chunk"),
    FaultMode("no_usage", bool, "never report usage (an upstream without usage support)"),
    FaultMode("ignore_max_tokens", bool, "generate all --chunks tokens whatever max_tokens says"),
    FaultMode("chunks", int, "completion tokens per choice, one per stream chunk", fault=False),
    FaultMode(
        "prompt_tokens",
        int,
        "report this many prompt tokens (a tokenizer at one token per byte, costly images)",
        fault=False,
    ),
    FaultMode("content", str, "the text of every token (default: a fixed sentence)", fault=False),
    # The usage details of real providers (OpenAI's prompt_tokens_details and
    # completion_tokens_details, OpenRouter's cost). Any of the token ones
    # makes the usage carry both details objects, as OpenAI's does.
    FaultMode(
        "cached_tokens",
        int,
        "report this many prompt tokens as read from a cache (chat: prompt_tokens_details;"
        " Responses: input_tokens_details; Messages: cache_read_input_tokens)",
        fault=False,
    ),
    FaultMode(
        "cache_write_tokens",
        int,
        "report this many prompt tokens as written to a cache"
        " (chat: prompt_tokens_details.cache_write_tokens;"
        " Messages: cache_creation_input_tokens)",
        fault=False,
    ),
    FaultMode(
        "audio_input_tokens",
        int,
        "add this many audio prompt tokens (prompt_tokens_details.audio_tokens)",
        fault=False,
    ),
    FaultMode(
        "audio_output_tokens",
        int,
        "add this many audio completion tokens (completion_tokens_details.audio_tokens)",
        fault=False,
    ),
    FaultMode(
        "reasoning_tokens",
        int,
        "add this many hidden reasoning tokens (chat: completion_tokens_details;"
        " Responses: output_tokens_details)",
        fault=False,
    ),
    FaultMode(
        "accepted_prediction_tokens",
        int,
        "report this many of the text tokens as a prediction's"
        " (completion_tokens_details.accepted_prediction_tokens)",
        fault=False,
    ),
    FaultMode(
        "rejected_prediction_tokens",
        int,
        "add this many rejected prediction tokens"
        " (completion_tokens_details.rejected_prediction_tokens)",
        fault=False,
    ),
    FaultMode(
        "cost",
        str,
        "report usage.cost, the call's cost in the provider's currency, as this JSON number"
        " (OpenRouter's field)",
        fault=False,
    ),
    FaultMode(
        "tool_arguments", str, "the JSON arguments of a tool call (default: from the schema)"
    ),
    FaultMode(
        "stamp",
        bool,
        "streams: each token is the mock's monotonic clock when sent (to time chunk delays)",
        fault=False,
    ),
    FaultMode(
        "send_buffer", int, "the socket's send buffer in bytes (to show backpressure)", fault=False
    ),
    FaultMode(
        "key", str, "the counter --fail-times and /mock/stats use (default 'default')", fault=False
    ),
    FaultMode(
        "for_model",
        str,
        "apply the fault modes only to requests for this model (as the upstream sees it)",
        fault=False,
    ),
)
BY_NAME = {m.name: m for m in FAULT_MODES}


class FaultError(ValueError):
    """A fault mode with a value of the wrong type."""


def coerce(mode: FaultMode, value: Any) -> Any:
    """``value`` (from a flag, header or JSON) as the mode's type."""
    try:
        if mode.type is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off", ""):
                    return False
                raise ValueError(value)
            return bool(value)
        if mode.type is int and isinstance(value, float):
            raise ValueError(value)
        return mode.type(value)
    except (TypeError, ValueError):
        raise FaultError(f"{mode.name}: expected {mode.type.__name__}, got {value!r}") from None


def resolve(
    defaults: dict[str, Any],
    headers: Mapping[str, str],
    body_modes: Any,
    model: str,
) -> dict[str, Any]:
    """The modes in force for one request: defaults < headers < the body's ``mock``."""
    modes = dict(defaults)
    for mode in FAULT_MODES:
        if mode.header in headers:
            modes[mode.name] = coerce(mode, headers[mode.header])
    if isinstance(body_modes, dict):
        for name, value in body_modes.items():
            known = BY_NAME.get(name)
            if known is None:
                raise FaultError(
                    f"{name}: no such fault mode (see creditgate mock-upstream --help)"
                )
            if value is not None:
                modes[name] = coerce(known, value)
    target = modes.get("for_model")
    if target is not None and target != model:
        modes = {k: v for k, v in modes.items() if not BY_NAME[k].fault}
    return modes


def describe() -> str:
    """How to set the fault modes, for ``creditgate mock-upstream --help``."""
    lines = [
        "Every option from --status on is a fault mode, and a server default. A request",
        'sets its own with a header (calling the mock directly) or in its body\'s "mock"',
        "object (which creditgate passes through to the upstream):",
        "",
        f"  {'flag':<20} {'header':<24} body key",
    ]
    for mode in FAULT_MODES:
        lines.append(f"  {mode.flag:<20} {mode.header:<24} {mode.name}")
    lines += [
        "",
        "examples:",
        "  curl -H 'x-mock-drop-after: 3' -d '{\"stream\": true, \"messages\": []}' \\",
        "       http://127.0.0.1:8081/v1/chat/completions",
        '  client.chat.completions.create(..., extra_body={"mock": {"fail_times": 2,',
        '                                                  "key": "t1"}})',
    ]
    return "\n".join(lines)
