"""What a call costs, and how many tokens a prompt is estimated at (DESIGN.md §3, §9)."""

from __future__ import annotations

from typing import Any

import orjson

from creditgate.config import PRICE_SCALE, Model

PER_MESSAGE_OVERHEAD = 8  # tokens: role, separators
# An image costs what its size and detail say, not what its URL or base64 text
# weighs: a flat estimate at the top of OpenAI's range (a 2048×2048 image in
# high detail is 1,105 tokens) keeps holds near the truth for both.
IMAGE_TOKENS = 1_500
# Request fields other than messages that the upstream counts as prompt.
_PROMPT_FIELDS = ("tools", "functions", "response_format")


def cost_micros(model: Model, input_tokens: int, output_tokens: int) -> int:
    """``ceil(in·in_price + out·out_price)`` µc, exactly (prices are scaled integers)."""
    assert input_tokens >= 0 and output_tokens >= 0
    scaled = input_tokens * model.input_price + output_tokens * model.output_price
    return -(-scaled // PRICE_SCALE)


def _content_size(content: Any) -> tuple[int, int]:
    """(UTF-8 bytes of text, images) in a message's content."""
    if content is None:
        return 0, 0
    if isinstance(content, str):
        return len(content.encode()), 0
    if isinstance(content, list):
        size = images = 0
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                size += len(part["text"].encode())
            elif kind == "image_url":
                images += 1
            else:  # audio, files, provider parts: their JSON, a generous bound
                size += len(orjson.dumps(part))
        return size, images
    return len(orjson.dumps(content)), 0


def estimate_prompt_tokens(messages: list[dict[str, Any]], bytes_per_token: int) -> int:
    """``ceil(utf8_bytes / bytes_per_token) + 8`` per message.

    Counts the text of the content (the JSON of non-text parts, a flat
    ``IMAGE_TOKENS`` per image) and of any tool calls. The upstream's usage
    replaces this estimate at settlement.
    """
    total = 0
    for message in messages:
        size, images = _content_size(message.get("content"))
        for extra in ("tool_calls", "function_call"):
            if message.get(extra) is not None:
                size += len(orjson.dumps(message[extra]))
        if isinstance(message.get("name"), str):
            size += len(message["name"].encode())
        total += -(-size // bytes_per_token) + PER_MESSAGE_OVERHEAD + images * IMAGE_TOKENS
    return total


def estimate_request_tokens(
    body: dict[str, Any], messages: list[dict[str, Any]], bytes_per_token: int
) -> int:
    """The prompt estimate of a whole request: its messages, plus the tool
    definitions and response schema the upstream also reads as prompt."""
    total = estimate_prompt_tokens(messages, bytes_per_token)
    for name in _PROMPT_FIELDS:
        value = body.get(name)
        if value:
            total += -(-len(orjson.dumps(value)) // bytes_per_token)
    return total


def estimate_text_tokens(text_bytes: int, bytes_per_token: int) -> int:
    """Tokens of generated text when the upstream reported no usage."""
    return -(-text_bytes // bytes_per_token)
