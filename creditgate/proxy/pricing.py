"""What a call costs, and how many tokens a prompt is estimated at (DESIGN.md §3, §9)."""

from __future__ import annotations

from typing import Any

import orjson

from creditgate.config import PRICE_SCALE, Model

PER_MESSAGE_OVERHEAD = 8  # tokens: role, separators
# The prompt bound: a byte-level tokenizer (BPE over UTF-8 bytes, as every
# OpenAI-style tokenizer is) makes at most one token per byte, so text counts
# one token per UTF-8 byte. An image costs at most its model's
# ``max_image_tokens`` whatever its URL or base64 text weighs; audio is
# bounded by the bytes of its base64 data. Other parts are refused (validation).
IMAGE_TOKENS = 1_500  # the default of a model's max_image_tokens
# Request fields other than messages that the upstream counts as prompt.
_PROMPT_FIELDS = ("tools", "functions", "response_format")


def cost_micros(model: Model, input_tokens: int, output_tokens: int) -> int:
    """``ceil(in·in_price + out·out_price)`` µc, exactly (prices are scaled integers)."""
    assert input_tokens >= 0 and output_tokens >= 0
    scaled = input_tokens * model.input_price + output_tokens * model.output_price
    return -(-scaled // PRICE_SCALE)


def _content_size(content: Any) -> tuple[int, int]:
    """(bytes bounding the tokens, images) of a message's content."""
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
            elif kind == "refusal" and isinstance(part.get("refusal"), str):
                size += len(part["refusal"].encode())
            elif kind == "image_url":
                images += 1
            else:  # input_audio (validation refuses the rest): its JSON bounds it
                size += len(orjson.dumps(part))
        return size, images
    return len(orjson.dumps(content)), 0


def estimate_prompt_tokens(messages: list[dict[str, Any]], image_tokens: int = IMAGE_TOKENS) -> int:
    """An upper bound of the prompt's tokens: UTF-8 bytes + 8 per message, plus
    ``image_tokens`` per image part.

    Counts the text of the content and of any tool calls and names. The
    upstream's usage replaces this bound at settlement.
    """
    total = 0
    for message in messages:
        size, images = _content_size(message.get("content"))
        for extra in ("tool_calls", "function_call"):
            if message.get(extra) is not None:
                size += len(orjson.dumps(message[extra]))
        if isinstance(message.get("name"), str):
            size += len(message["name"].encode())
        total += size + PER_MESSAGE_OVERHEAD + images * image_tokens
    return total


def estimate_request_tokens(
    body: dict[str, Any], messages: list[dict[str, Any]], image_tokens: int = IMAGE_TOKENS
) -> int:
    """The prompt bound of a whole request: its messages, plus the tool
    definitions and response schema the upstream also reads as prompt."""
    total = estimate_prompt_tokens(messages, image_tokens)
    for name in _PROMPT_FIELDS:
        value = body.get(name)
        if value:
            total += len(orjson.dumps(value))
    return total


def estimate_text_tokens(text_bytes: int, bytes_per_token: int) -> int:
    """Tokens of generated text when the upstream reported no usage."""
    return -(-text_bytes // bytes_per_token)
