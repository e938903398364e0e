"""Validating an OpenAI chat-completions request and shaping what goes upstream."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from creditgate.config import Model
from creditgate.errors import ModelNotFound, ValidationError
from creditgate.proxy.pricing import estimate_prompt_tokens

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MAX_N = 128


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
    def worst_case_tokens(self) -> int:
        return self.prompt_tokens_estimate + self.worst_case_output_tokens


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_chat_request(
    body: dict[str, Any], models: Mapping[str, Model], bytes_per_token: int
) -> ChatRequest:
    """Validate ``body``; raise ValidationError listing every problem, or ModelNotFound.

    Fields creditgate does not know pass through to the upstream untouched.
    """
    problems: list[dict[str, str]] = []

    def bad(path: str, message: str) -> None:
        problems.append({"path": path, "message": message})

    name = body.get("model")
    if not isinstance(name, str) or not name:
        bad("model", "required: the name of a model (see GET /v1/models)")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        bad("messages", "required: a non-empty array of messages")
        messages = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            bad(f"messages[{i}]", "must be an object")
            continue
        if m.get("role") not in ROLES:
            bad(f"messages[{i}].role", f"must be one of {sorted(ROLES)}")
        content = m.get("content")
        if content is not None and not isinstance(content, str | list):
            bad(f"messages[{i}].content", "must be a string, an array of parts, or null")
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    bad(f"messages[{i}].content[{j}]", "must be an object with a 'type'")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        bad("stream", "must be a boolean")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            bad("stream_options", "must be an object")
        else:
            include_usage = options.get("include_usage") is True
            if "include_usage" in options and not isinstance(options["include_usage"], bool):
                bad("stream_options.include_usage", "must be a boolean")
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not _is_int(n) or not 1 <= n <= MAX_N:
        bad("n", f"must be an integer from 1 to {MAX_N}")
        n = 1
    limits = {f: body.get(f) for f in ("max_tokens", "max_completion_tokens")}
    for field_name, value in limits.items():
        if value is not None and (not _is_int(value) or value < 1):
            bad(field_name, "must be a positive integer")
    if problems:
        raise ValidationError(
            "The request is not a valid chat completion request.", details=problems
        )

    assert isinstance(name, str)
    model = models.get(name)
    if model is None:
        raise ModelNotFound(
            f"The model {name!r} does not exist or is not served here; see GET /v1/models.",
            details=[{"path": "model", "message": "unknown model"}],
        )
    requested = limits["max_completion_tokens"] or limits["max_tokens"]
    if requested is not None and requested > model.max_output_tokens:
        field_name = "max_completion_tokens" if limits["max_completion_tokens"] else "max_tokens"
        raise ValidationError(
            f"{field_name} is {requested}; {name} allows at most {model.max_output_tokens}.",
            details=[{"path": field_name, "message": f"at most {model.max_output_tokens}"}],
        )
    upstream_body = dict(body)
    if requested is None:
        # No cap from the client: send the model's, so the hold is a true bound.
        upstream_body["max_tokens"] = model.max_output_tokens
    if stream:
        # Ask for the usage chunk always: it is what makes the charge exact.
        upstream_body["stream_options"] = {**(options or {}), "include_usage": True}
    return ChatRequest(
        model=model,
        upstream_body=upstream_body,
        stream=bool(stream),
        include_usage=include_usage,
        max_output_tokens=requested or model.max_output_tokens,
        n=n,
        prompt_tokens_estimate=estimate_prompt_tokens(messages, bytes_per_token),
    )
