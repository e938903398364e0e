"""What a call costs, and how many tokens a prompt is estimated at (DESIGN.md §3, §9)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
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


# The largest provider-reported cost (usage.cost) taken as a charge, in the
# provider's currency; and the smallest exponent (10^-MAX_COST_DIGITS) and the
# most significant digits kept exact. Anything beyond is not a real price but
# a broken or hostile report: the call is priced by the table instead.
# (At most 10⁶ × config.MAX_MARKUP 10⁶ × 10⁶ µc = 10¹⁸ µc: a BIGINT holds it.)
MAX_REPORTED_COST = Decimal(1_000_000)
MAX_COST_DIGITS = 40
MICROS = 1_000_000


@dataclass(frozen=True, slots=True)
class TokenCounts:
    """The tokens of one call by kind, whatever API reported them.

    ``input`` and ``output`` are totals, as OpenAI counts them: the kinds
    below are parts of them, never added on top (``cached_input``,
    ``cache_write`` and ``audio_input`` of ``input``; ``audio_output`` and
    ``reasoning`` of ``output``). Reasoning (and prediction) tokens are billed
    at the output price, as OpenAI bills them; they are kept for the record.
    ``accepted_prediction`` and ``rejected_prediction`` (Predicted Outputs) are
    each a part of ``output`` too, recorded only (they may overlap the others).
    ``reported_cost`` is the call's cost as the upstream reported it
    (``usage.cost``, a decimal in the provider's currency), or None; models
    with ``pricing = "upstream"`` charge it times their markup.
    """

    input: int
    output: int
    cached_input: int = 0
    cache_write: int = 0
    audio_input: int = 0
    audio_output: int = 0
    reasoning: int = 0
    accepted_prediction: int = 0
    rejected_prediction: int = 0
    reported_cost: Decimal | None = None

    def __post_init__(self) -> None:
        assert min(self.input, self.output, self.cached_input, self.cache_write) >= 0
        assert min(self.audio_input, self.audio_output, self.reasoning) >= 0
        assert self.cached_input + self.cache_write + self.audio_input <= self.input
        assert self.audio_output + self.reasoning <= self.output
        assert 0 <= self.accepted_prediction <= self.output
        assert 0 <= self.rejected_prediction <= self.output
        assert self.reported_cost is None or _sound_cost(self.reported_cost)

    def breakdown(self) -> dict[str, int]:
        """The non-zero kinds (for the ledger and the usage API); totals always."""
        out = {"input": self.input, "output": self.output}
        for kind in RECORDED_KINDS:
            n = getattr(self, kind)
            if n:
                out[kind] = n
        return out


# The kinds ``breakdown`` records beside the totals, in its order.
RECORDED_KINDS = (
    "cached_input",
    "cache_write",
    "audio_input",
    "audio_output",
    "reasoning",
    "accepted_prediction",
    "rejected_prediction",
)


def token_series(counts: TokenCounts) -> list[tuple[str, str, int]]:
    """(direction, kind, tokens) partitioning each total, for the tokens metric.

    Each direction's kinds add up to its total (``text`` is the rest), so
    summing the metric by direction still gives the totals. Prediction
    tokens overlap the text and are not a series of their own.
    """
    text_in = counts.input - counts.cached_input - counts.cache_write - counts.audio_input
    text_out = counts.output - counts.audio_output - counts.reasoning
    series = [
        ("input", "text", text_in),
        ("input", "cached", counts.cached_input),
        ("input", "cache_write", counts.cache_write),
        ("input", "audio", counts.audio_input),
        ("output", "text", text_out),
        ("output", "audio", counts.audio_output),
        ("output", "reasoning", counts.reasoning),
    ]
    return [s for s in series if s[2]]


def cost_scaled(model: Model, counts: TokenCounts) -> int:
    """The call's cost in 10⁻⁹ µc by the price table: each kind at its price
    (absent: its side's). A reported cost plays no part here (``cost_of``)."""
    plain_in = counts.input - counts.cached_input - counts.cache_write - counts.audio_input
    plain_out = counts.output - counts.audio_output
    return (
        plain_in * model.input_price
        + counts.cached_input * _or(model.cached_input_price, model.input_price)
        + counts.cache_write * _or(model.cache_write_price, model.input_price)
        + counts.audio_input * _or(model.audio_input_price, model.input_price)
        + plain_out * model.output_price
        + counts.audio_output * _or(model.audio_output_price, model.output_price)
    )


def priced_by_upstream(model: Model, counts: TokenCounts) -> bool:
    """Whether the call is charged its reported cost × markup rather than the table."""
    return model.pricing == "upstream" and counts.reported_cost is not None


def upstream_cost_micros(model: Model, reported_cost: Decimal) -> int:
    """``ceil(reported_cost × markup × 10⁶)`` µc, exactly (rationals, no rounding
    before the one ceiling): ``markup`` is credits per unit of the cost."""
    exact = Fraction(reported_cost) * Fraction(model.markup) * MICROS
    return math.ceil(exact)


def cost_of(model: Model, counts: TokenCounts) -> int:
    """The call's cost in µc: the upstream's reported cost × markup for a model
    priced by its upstream when the response carried one, else the exact
    ceiling of ``cost_scaled`` (the price table)."""
    if counts.reported_cost is not None and priced_by_upstream(model, counts):
        return upstream_cost_micros(model, counts.reported_cost)
    return -(-cost_scaled(model, counts) // PRICE_SCALE)


def recorded_breakdown(model: Model, counts: TokenCounts) -> dict[str, int | str]:
    """What the ledger keeps with a debit: the counts by kind, and the upstream's
    reported cost (as an exact decimal string) when the charge was made from it."""
    record: dict[str, int | str] = dict(counts.breakdown())
    if priced_by_upstream(model, counts):
        assert counts.reported_cost is not None
        record["upstream_cost"] = format(counts.reported_cost, "f")
    return record


def cost_micros(model: Model, input_tokens: int, output_tokens: int) -> int:
    """``ceil(in·in_price + out·out_price)`` µc, exactly (prices are scaled integers)."""
    return cost_of(model, TokenCounts(input_tokens, output_tokens))


def highest_input_price(model: Model) -> int:
    """The most one prompt token can cost on ``model`` (a hold's bound)."""
    kinds = (model.cache_write_price, model.audio_input_price, model.cached_input_price)
    return max([model.input_price, *(p for p in kinds if p is not None)])


def highest_output_price(model: Model) -> int:
    """The most one generated token can cost on ``model`` (a hold's bound)."""
    return max(model.output_price, model.audio_output_price or 0)


def worst_case_micros(model: Model, input_tokens: int, output_tokens: int) -> int:
    """What a hold reserves: every token at the highest price of its side, so
    no mix of kinds the upstream may report can cost more."""
    assert input_tokens >= 0 and output_tokens >= 0
    scaled = input_tokens * highest_input_price(model) + output_tokens * highest_output_price(model)
    return -(-scaled // PRICE_SCALE)


def price_text(price: int) -> str:
    """A scaled price (10⁻⁹ µc per token) as the decimal credits per 1M tokens
    it was configured as, without trailing zeros (``1250000000`` → ``1.25``)."""
    return format(Decimal(price).scaleb(-9).normalize(), "f")


def affordable_max_tokens(model: Model, prompt_tokens: int, n: int, spendable: int) -> int:
    """The largest ``max_tokens`` a call with this prompt (and ``n`` choices)
    could send now with ``spendable`` µc: the hold's own worst case,
    ``ceil((prompt·in_max + n·max_tokens·out_max) / PRICE_SCALE) ≤ spendable``,
    solved exactly in integers; at most the model's own cap; 0 when even the
    prompt does not fit (nor a single generated token).
    """
    assert prompt_tokens >= 0 and n >= 1
    # ceil(x / S) ≤ A  ⇔  x ≤ A·S, for integers.
    left = max(0, spendable) * PRICE_SCALE - prompt_tokens * highest_input_price(model)
    if left < 0:
        return 0
    per_token = n * highest_output_price(model)
    if per_token == 0:
        return model.max_output_tokens
    return min(model.max_output_tokens, left // per_token)


def _or(price: int | None, default: int) -> int:
    return default if price is None else price


def _count(value: Any) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return value if ok else None


def _part(details: Any, key: str) -> int:
    n = _count(details.get(key)) if isinstance(details, dict) else None
    return n or 0


def _sound_cost(cost: Decimal) -> bool:
    """A reported cost creditgate charges from: finite, ≥ 0, bounded, and short
    enough that exact arithmetic on it stays cheap."""
    if not cost.is_finite() or cost < 0 or cost > MAX_REPORTED_COST:
        return False
    exponent = cost.as_tuple().exponent
    assert isinstance(exponent, int)  # finite
    return exponent >= -MAX_COST_DIGITS and len(cost.as_tuple().digits) <= MAX_COST_DIGITS


def reported_cost(value: Any) -> Decimal | None:
    """The upstream's ``usage.cost`` as an exact decimal, or None if absent or unsound.

    A JSON number arrives as a float: its shortest round-trip text
    (``repr``) is the decimal the upstream wrote whenever that had at most 15
    significant digits (every real price does), so no binary rounding reaches
    the charge. A string is read as a decimal as it is.
    """
    if isinstance(value, bool) or value is None:
        return None
    try:
        if isinstance(value, int):
            cost = Decimal(value)
        elif isinstance(value, float):
            cost = Decimal(repr(value))
        elif isinstance(value, str) and len(value) <= 2 * MAX_COST_DIGITS:
            cost = Decimal(value.strip())
        else:
            return None
    except InvalidOperation:
        return None
    return cost if _sound_cost(cost) else None


def counts_from_chat_usage(usage: dict[str, Any] | None) -> TokenCounts | None:
    """The counts in an OpenAI chat ``usage`` object; None if its totals are
    missing or invalid (the caller then estimates).

    Reads ``prompt_tokens_details`` (``cached_tokens``, ``audio_tokens``,
    and ``cache_write_tokens`` where a compatible upstream reports it),
    ``completion_tokens_details`` (``audio_tokens``, ``reasoning_tokens``,
    ``accepted_prediction_tokens``, ``rejected_prediction_tokens``) and
    ``cost`` (OpenRouter's reported cost; ignored when not a sound decimal).
    A detail that does not fit inside its total is clamped into it: the
    totals are what the provider bills, the details only how.
    """
    if not usage:
        return None
    prompt, completion = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
    if prompt is None or completion is None:
        return None
    pd, cd = usage.get("prompt_tokens_details"), usage.get("completion_tokens_details")
    cached = min(_part(pd, "cached_tokens"), prompt)
    write = min(_part(pd, "cache_write_tokens"), prompt - cached)
    audio_in = min(_part(pd, "audio_tokens"), prompt - cached - write)
    audio_out = min(_part(cd, "audio_tokens"), completion)
    reasoning = min(_part(cd, "reasoning_tokens"), completion - audio_out)
    return TokenCounts(
        prompt,
        completion,
        cached,
        write,
        audio_in,
        audio_out,
        reasoning,
        accepted_prediction=min(_part(cd, "accepted_prediction_tokens"), completion),
        rejected_prediction=min(_part(cd, "rejected_prediction_tokens"), completion),
        reported_cost=reported_cost(usage.get("cost")),
    )


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
