"""Field-by-field checks of an OpenAI chat-completions request body.

Each check appends ``{path, message}`` problems instead of raising, so one 400
lists everything wrong with a request. The checks follow OpenAI's API
reference for the fields it documents (types, required members, ranges) and
let everything else through: unknown fields, unknown content-part types and
unknown tool types are passed to the upstream untouched, so provider
extensions (and future OpenAI fields) keep working through creditgate.
"""

from __future__ import annotations

import re
from typing import Any, TypeGuard

# Tuples, not sets: a JSON list or object in these fields is unhashable, and
# `x in frozenset` raised TypeError (a 500) where `x in tuple` is just False.
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
MAX_N = 128
MAX_STOP = 4
MAX_TOOLS = 128
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
TOOL_CHOICES = ("none", "auto", "required")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
IMAGE_DETAILS = ("auto", "low", "high")


class Problems:
    """The problems found so far, as the ``details`` of a 400."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[dict[str, str]] = []

    def add(self, path: str, message: str) -> None:
        self.items.append({"path": path, "message": message})

    def __bool__(self) -> bool:
        return bool(self.items)


def is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _string(p: Problems, path: str, value: Any, *, required: bool = False) -> None:
    if value is None:
        if required:
            p.add(path, "required: a string")
    elif not isinstance(value, str):
        p.add(path, "must be a string")


def _object(
    value: Any, p: Problems, path: str, *, required: bool = False
) -> TypeGuard[dict[str, Any]]:
    """True when ``value`` is an object (a problem is recorded otherwise, if it matters)."""
    if isinstance(value, dict):
        return True
    if value is not None or required:
        p.add(path, "required: an object" if value is None else "must be an object")
    return False


# ---------------------------------------------------------------- messages


def _part(p: Problems, path: str, part: Any) -> None:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        p.add(path, "must be an object with a string 'type'")
        return
    kind = part["type"]
    if kind == "text":
        _string(p, f"{path}.text", part.get("text"), required=True)
    elif kind == "refusal":
        _string(p, f"{path}.refusal", part.get("refusal"), required=True)
    elif kind == "image_url":
        image = part.get("image_url")
        if _object(image, p, f"{path}.image_url", required=True):
            _string(p, f"{path}.image_url.url", image.get("url"), required=True)
            detail = image.get("detail")
            if detail is not None and detail not in IMAGE_DETAILS:
                p.add(f"{path}.image_url.detail", f"must be one of {sorted(IMAGE_DETAILS)}")
    elif kind == "input_audio":
        audio = part.get("input_audio")
        if _object(audio, p, f"{path}.input_audio", required=True):
            _string(p, f"{path}.input_audio.data", audio.get("data"), required=True)
            _string(p, f"{path}.input_audio.format", audio.get("format"), required=True)
    else:
        # A file (a PDF's pages, a file id) or a part type unknown here has no
        # size bound creditgate can compute: its hold would not bound its cost.
        p.add(
            f"{path}.type",
            f"content parts of type {kind!r} are not accepted: their cost cannot be bounded"
            " before the call (accepted: text, refusal, image_url, input_audio)",
        )


def _content(p: Problems, path: str, content: Any, *, required: bool) -> None:
    if isinstance(content, str):
        return
    if isinstance(content, list):
        if not content:
            p.add(path, "must not be an empty array")
        for j, part in enumerate(content):
            _part(p, f"{path}[{j}]", part)
    elif content is None:
        if required:
            p.add(path, "required: a string or an array of content parts")
    else:
        p.add(path, "must be a string, an array of content parts, or null")


def _tool_call(p: Problems, path: str, call: Any) -> None:
    if not isinstance(call, dict):
        p.add(path, "must be an object")
        return
    _string(p, f"{path}.id", call.get("id"), required=True)
    kind = call.get("type")
    if not isinstance(kind, str):
        p.add(f"{path}.type", "required: a string ('function')")
    elif kind == "function":
        fn = call.get("function")
        if _object(fn, p, f"{path}.function", required=True):
            _string(p, f"{path}.function.name", fn.get("name"), required=True)
            _string(p, f"{path}.function.arguments", fn.get("arguments"), required=True)


def _message(p: Problems, path: str, m: Any) -> None:
    if not isinstance(m, dict):
        p.add(path, "must be an object with a 'role'")
        return
    role = m.get("role")
    if role not in ROLES:
        p.add(f"{path}.role", f"must be one of {sorted(ROLES)}")
        _content(p, f"{path}.content", m.get("content"), required=False)
        return
    _string(p, f"{path}.name", m.get("name"))
    content = m.get("content")
    if role == "assistant":
        tool_calls = m.get("tool_calls")
        if tool_calls is not None:
            if not isinstance(tool_calls, list):
                p.add(f"{path}.tool_calls", "must be an array")
            else:
                for k, call in enumerate(tool_calls):
                    _tool_call(p, f"{path}.tool_calls[{k}]", call)
        has_other = bool(tool_calls) or m.get("function_call") is not None
        _content(p, f"{path}.content", content, required=not has_other and not m.get("audio"))
        _string(p, f"{path}.refusal", m.get("refusal"))
    elif role == "tool":
        _content(p, f"{path}.content", content, required=True)
        _string(p, f"{path}.tool_call_id", m.get("tool_call_id"), required=True)
    elif role == "function":
        _string(p, f"{path}.name", m.get("name"), required=True)
        _string(p, f"{path}.content", content)
    else:  # system, developer, user
        _content(p, f"{path}.content", content, required=True)


def check_messages(p: Problems, messages: Any, limit: int | None) -> list[Any]:
    """Check ``messages``; returns them as a list (empty when unusable)."""
    if not isinstance(messages, list) or not messages:
        p.add("messages", "required: a non-empty array of messages")
        return []
    if limit is not None and len(messages) > limit:
        p.add("messages", f"at most {limit} messages for this model, got {len(messages)}")
    for i, m in enumerate(messages):
        _message(p, f"messages[{i}]", m)
    return messages


# ---------------------------------------------------------------- tools


def _tool(p: Problems, path: str, tool: Any) -> None:
    if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
        p.add(path, "must be an object with a string 'type' ('function')")
        return
    if tool["type"] != "function":
        return  # another kind of tool (a provider's or a newer API's): passed through
    fn = tool.get("function")
    if not _object(fn, p, f"{path}.function", required=True):
        return
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        p.add(f"{path}.function.name", "required: 1–64 of a-z, A-Z, 0-9, '_' and '-'")
    _string(p, f"{path}.function.description", fn.get("description"))
    _object(fn.get("parameters"), p, f"{path}.function.parameters")
    strict = fn.get("strict")
    if strict is not None and not isinstance(strict, bool):
        p.add(f"{path}.function.strict", "must be a boolean")


def check_tools(p: Problems, body: dict[str, Any]) -> None:
    """``tools``, ``tool_choice``, ``parallel_tool_calls`` and the legacy ``functions``."""
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            p.add("tools", "must be an array of tools")
        else:
            if len(tools) > MAX_TOOLS:
                p.add("tools", f"at most {MAX_TOOLS} tools")
            for i, tool in enumerate(tools):
                _tool(p, f"tools[{i}]", tool)
    choice = body.get("tool_choice")
    if choice is not None:
        if isinstance(choice, str):
            if choice not in TOOL_CHOICES:
                p.add("tool_choice", f"must be one of {sorted(TOOL_CHOICES)} or an object")
        elif isinstance(choice, dict) and isinstance(choice.get("type"), str):
            if choice["type"] == "function":
                fn = choice.get("function")
                if _object(fn, p, "tool_choice.function", required=True):
                    _string(p, "tool_choice.function.name", fn.get("name"), required=True)
        else:
            p.add("tool_choice", "must be a string or an object with a 'type'")
    _boolean(p, body, "parallel_tool_calls")
    functions = body.get("functions")
    if functions is not None:
        if not isinstance(functions, list):
            p.add("functions", "must be an array")
        else:
            for i, fn in enumerate(functions):
                if _object(fn, p, f"functions[{i}]", required=True):
                    _string(p, f"functions[{i}].name", fn.get("name"), required=True)
    call = body.get("function_call")
    if call is not None and not (call in ("none", "auto") or isinstance(call, dict)):
        p.add("function_call", "must be 'none', 'auto' or an object")


# ---------------------------------------------------------------- the rest


def _boolean(p: Problems, body: dict[str, Any], name: str) -> None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        p.add(name, "must be a boolean")


def _number(p: Problems, body: dict[str, Any], name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is not None and (not is_number(value) or not low <= value <= high):
        p.add(name, f"must be a number from {low:g} to {high:g}")


def check_response_format(p: Problems, fmt: Any) -> None:
    """``response_format``: text, json_object, or json_schema with a named schema."""
    if fmt is None:
        return
    if not isinstance(fmt, dict) or fmt.get("type") not in RESPONSE_FORMATS:
        p.add("response_format.type", f"must be one of {sorted(RESPONSE_FORMATS)}")
        return
    if fmt["type"] == "json_schema":
        schema = fmt.get("json_schema")
        if _object(schema, p, "response_format.json_schema", required=True):
            name = schema.get("name")
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                p.add(
                    "response_format.json_schema.name",
                    "required: 1–64 of a-z, A-Z, 0-9, '_' and '-'",
                )
            _object(schema.get("schema"), p, "response_format.json_schema.schema")
            strict = schema.get("strict")
            if strict is not None and not isinstance(strict, bool):
                p.add("response_format.json_schema.strict", "must be a boolean")


def check_sampling(p: Problems, body: dict[str, Any]) -> None:
    """Sampling and output options with OpenAI's documented types and ranges."""
    _number(p, body, "temperature", 0, 2)
    _number(p, body, "top_p", 0, 1)
    _number(p, body, "presence_penalty", -2, 2)
    _number(p, body, "frequency_penalty", -2, 2)
    _boolean(p, body, "logprobs")
    _boolean(p, body, "store")
    top_logprobs = body.get("top_logprobs")
    if top_logprobs is not None and (not is_int(top_logprobs) or not 0 <= top_logprobs <= 20):
        p.add("top_logprobs", "must be an integer from 0 to 20")
    seed = body.get("seed")
    if seed is not None and not is_int(seed):
        p.add("seed", "must be an integer")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str):
        if not isinstance(stop, list) or len(stop) > MAX_STOP:
            p.add("stop", f"must be a string or an array of at most {MAX_STOP} strings")
        elif not all(isinstance(s, str) for s in stop):
            p.add("stop", "every stop sequence must be a string")
    bias = body.get("logit_bias")
    if bias is not None and (
        not isinstance(bias, dict)
        or not all(is_number(v) and -100 <= v <= 100 for v in bias.values())
    ):
        p.add("logit_bias", "must be an object of token ids to numbers from -100 to 100")
    for name in ("user", "reasoning_effort", "service_tier"):
        _string(p, name, body.get(name))
    for name in ("metadata", "prediction", "audio", "web_search_options"):
        _object(body.get(name), p, name)
    modalities = body.get("modalities")
    if modalities is not None and (
        not isinstance(modalities, list) or not all(isinstance(m, str) for m in modalities)
    ):
        p.add("modalities", "must be an array of strings")
