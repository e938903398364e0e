"""What a call costs, and how many tokens a prompt is estimated at (DESIGN.md §3, §9)."""

from __future__ import annotations

from typing import Any

import orjson

from creditgate.config import PRICE_SCALE, Model

PER_MESSAGE_OVERHEAD = 8  # tokens: role, separators


def cost_micros(model: Model, input_tokens: int, output_tokens: int) -> int:
    """``ceil(in·in_price + out·out_price)`` µc, exactly (prices are scaled integers)."""
    assert input_tokens >= 0 and output_tokens >= 0
    scaled = input_tokens * model.input_price + output_tokens * model.output_price
    return -(-scaled // PRICE_SCALE)


def _content_bytes(content: Any) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content.encode())
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                total += _content_bytes(part.get("text"))
            else:
                total += len(orjson.dumps(part))
        return total
    return len(orjson.dumps(content))


def estimate_prompt_tokens(messages: list[dict[str, Any]], bytes_per_token: int) -> int:
    """``ceil(utf8_bytes / bytes_per_token) + 8`` per message.

    Counts the text of the content (or the JSON of non-text parts) and of any
    tool calls. The upstream's usage replaces this estimate at settlement.
    """
    total = 0
    for message in messages:
        size = _content_bytes(message.get("content"))
        for extra in ("tool_calls", "function_call"):
            if message.get(extra) is not None:
                size += len(orjson.dumps(message[extra]))
        if isinstance(message.get("name"), str):
            size += len(message["name"].encode())
        total += -(-size // bytes_per_token) + PER_MESSAGE_OVERHEAD
    return total


def estimate_text_tokens(text_bytes: int, bytes_per_token: int) -> int:
    """Tokens of generated text when the upstream reported no usage."""
    return -(-text_bytes // bytes_per_token)
