"""An OpenAI chat-completions request: validated, bounded, and shaped for the upstream."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from creditgate.config import Model
from creditgate.errors import ModelNotFound, ValidationError
from creditgate.proxy import validation as v
from creditgate.proxy.pricing import estimate_request_tokens

TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: Model
    upstream_body: dict[str, Any]  # the client's body, with our additions; model set per deployment
    stream: bool
    include_usage: bool  # the client asked for the usage chunk
    max_output_tokens: int  # per choice; sent upstream, so it bounds the call
    n: int
    prompt_tokens_estimate: int

    @property
    def worst_case_output_tokens(self) -> int:
        return self.n * self.max_output_tokens

    @property
    def required_prompt_tokens(self) -> int:
        return self.prompt_tokens_estimate

    @property
    def hold_note(self) -> str | None:
        return None

    @property
    def worst_case_tokens(self) -> int:
        return self.prompt_tokens_estimate + self.worst_case_output_tokens


def _stream_fields(p: v.Problems, body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage), checked."""
    stream = body.get("stream")
    if stream is None:
        stream = False
    elif not isinstance(stream, bool):
        p.add("stream", "must be a boolean")
        stream = False
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            p.add("stream_options", "must be an object")
        elif not stream:
            # OpenAI refuses it too; saying so here lists it with any other problem.
            p.add("stream_options", "only allowed when stream is true")
        else:
            value = options.get("include_usage")
            if value is not None and not isinstance(value, bool):
                p.add("stream_options.include_usage", "must be a boolean")
            include_usage = value is True
    return stream, include_usage


def _output_cap(p: v.Problems, body: dict[str, Any], model: Model | None) -> int | None:
    """The larger of max_tokens / max_completion_tokens, each checked against the model."""
    cap: int | None = None
    for name in TOKEN_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        if not v.is_int(value) or value < 1:
            p.add(name, "must be a positive integer")
        elif model is not None and value > model.max_output_tokens:
            p.add(name, f"at most {model.max_output_tokens} for {model.name}, got {value}")
        else:
            # Both may be set; the upstream honours one of them, so the hold
            # must cover the larger.
            cap = value if cap is None else max(cap, value)
    return cap


def parse_chat_request(
    body: dict[str, Any],
    models: Mapping[str, Model],
    bytes_per_token: int,
    *,
    default_model: str | None = None,
) -> ChatRequest:
    """Validate ``body`` into a ChatRequest.

    Raises ValidationError (400) listing every problem as ``{path, message}``,
    or ModelNotFound (404) for a well-formed request naming an unknown model.
    Fields creditgate does not know pass through to the upstream untouched.
    ``bytes_per_token`` is no longer used for the prompt, whose estimate is an
    upper bound (proxy.pricing); it stays for existing callers.
    A body without ``model`` (or ``null``) uses ``default_model`` when given
    (the account's preference).
    """
    p = v.Problems()
    name = body.get("model")
    if name is None:
        name = default_model
    model: Model | None = None
    if not isinstance(name, str) or not name:
        p.add("model", "required: the name of a model (see GET /v1/models)")
    else:
        model = models.get(name)
    messages = v.check_messages(p, body.get("messages"), model.max_messages if model else None)
    stream, include_usage = _stream_fields(p, body)
    n = body.get("n")
    if n is None:
        n = 1
    elif not v.is_int(n) or not 1 <= n <= v.MAX_N:
        p.add("n", f"must be an integer from 1 to {v.MAX_N}")
        n = 1
    cap = _output_cap(p, body, model)
    v.check_tools(p, body)
    v.check_response_format(p, body.get("response_format"))
    v.check_sampling(p, body)
    if p:
        if model is None and isinstance(name, str) and name:
            p.add("model", "unknown model (see GET /v1/models)")
        raise ValidationError(
            f"The request is not a valid chat completion request: {_summary(p)}",
            details=p.items,
        )
    if model is None:
        raise ModelNotFound(
            f"The model {name!r} does not exist or is not served here; see GET /v1/models.",
            details=[{"path": "model", "message": "unknown model"}],
        )

    upstream_body = dict(body)
    if cap is None:
        # No cap from the client: send the model's, so the hold is a true bound.
        upstream_body[model.max_tokens_field] = model.max_output_tokens
    if stream:
        # Ask for the usage chunk always: it is what makes the charge exact.
        upstream_body["stream_options"] = {
            **(body.get("stream_options") or {}),
            "include_usage": True,
        }
    return ChatRequest(
        model=model,
        upstream_body=upstream_body,
        stream=stream,
        include_usage=include_usage,
        max_output_tokens=cap or model.max_output_tokens,
        n=n,
        prompt_tokens_estimate=estimate_request_tokens(body, messages, model.max_image_tokens),
    )


def _summary(p: v.Problems) -> str:
    first = p.items[0]
    more = len(p.items) - 1
    text = f"{first['path'] or 'body'}: {first['message']}"
    return text + (f" (and {more} more; see details)" if more else "")
