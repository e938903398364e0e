"""Hostile-text checks: what must be refused before it reaches Postgres, Redis or orjson.

PostgreSQL refuses NUL in ``text`` and ``jsonb`` (a 500 if it gets there),
orjson's serializer fails past 255 levels of nesting, and control characters
make no sense in an id, a URL or a name. These checks run where input enters:
``webkit.envelope.read_json`` (every JSON body), the envelope middleware (path
and query parameters), and the parsers of ids that arrive elsewhere (session
tokens, webhooks).
"""

from __future__ import annotations

import re
from typing import Any

# JSON deeper than this is refused at parse time (orjson writes at most 255
# levels; no route of ours needs more than a handful).
MAX_JSON_DEPTH = 64

# C0 controls and DEL: never part of an id, URL, name or key.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def has_control(text: str) -> bool:
    """True when ``text`` holds a C0 control character (NUL, tab, newline …) or DEL."""
    return _CONTROL.search(text) is not None


def control_problem(text: str) -> str | None:
    """The message for a text that must hold no control character; None when it is clean."""
    if "\x00" in text:
        return "must not contain NUL (\\u0000)"
    if has_control(text):
        return "must not contain control characters"
    return None


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def json_problem(raw: bytes, value: Any) -> dict[str, str] | None:
    """The first problem of a parsed JSON body, as ``{path, message}``; None when fine.

    Refused: nesting deeper than ``MAX_JSON_DEPTH``, NUL in any string, and
    control characters in object keys. Bodies that can hold none of them (no
    backslash escape or DEL, fewer brackets than the limit) skip the walk, so
    an ordinary request pays a few byte scans; the walk itself builds no
    paths until it has found something.
    """
    may_deep = raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH
    # NUL, or a control character in a key, is escaped (``\\u0000``, ``\\n``); DEL may be raw.
    may_control = b"\\" in raw or b"\x7f" in raw
    if not (may_deep or may_control) or _fine(value, b"\\u0000" in raw):
        return None
    return _locate(value)


def _fine(value: Any, may_nul: bool) -> bool:
    """True when ``value`` passes; the fast pass (no paths, containers only on the stack)."""
    if type(value) is not dict and type(value) is not list:
        return not (may_nul and isinstance(value, str) and "\x00" in value)
    stack: list[tuple[Any, int]] = [(value, 0)]
    search = _CONTROL.search
    while stack:
        node, depth = stack.pop()
        if depth >= MAX_JSON_DEPTH:
            return False
        children = node.values() if type(node) is dict else node
        if type(node) is dict and any(search(key) for key in node):
            return False
        for child in children:
            kind = type(child)
            if kind is dict or kind is list:
                stack.append((child, depth + 1))
            elif may_nul and kind is str and "\x00" in child:
                return False
    return True


def _locate(value: Any) -> dict[str, str] | None:
    """The path and message of the first problem (the slow pass, run once per refusal)."""
    # Iterative, so a body nested 1,000 deep cannot exhaust Python's stack.
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, dict | list) and depth >= MAX_JSON_DEPTH:
            return {"path": path, "message": f"nested deeper than {MAX_JSON_DEPTH} levels"}
        if isinstance(node, dict):
            for key, child in node.items():
                here = _join(path, key)
                problem = control_problem(key)
                if problem is not None:
                    return {"path": here, "message": f"field name {problem}"}
                stack.append((child, here, depth + 1))
        elif isinstance(node, list):
            for i, child in enumerate(node):
                stack.append((child, _join(path, i), depth + 1))
        elif isinstance(node, str) and "\x00" in node:
            return {"path": path, "message": "must not contain NUL (\\u0000)"}
    return None


def strings_problem(value: Any, path: str = "") -> str | None:
    """The path of the first string in ``value`` (nested dicts/lists) holding a NUL."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        node, here = stack.pop()
        if isinstance(node, str) and "\x00" in node:
            return here
        if isinstance(node, dict):
            stack.extend((v, _join(here, k)) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, _join(here, i)) for i, v in enumerate(node))
    return None
