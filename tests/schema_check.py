"""A small JSON Schema checker for the subset the routes' declared bodies use.

Enough to hold the published document (``/openapi.json``, from the endpoint
table) to what the routes take and answer in these tests — types, enums,
``anyOf``/``oneOf``, closed objects with their required properties, bounds,
lengths, patterns; not a general validator. Returns the problems, each with
its path. (schemathesis checks the same document against a fuzzed live
server in tests/test_openapi.py.)
"""

from __future__ import annotations

import re
from typing import Any

_TYPES: dict[str, Any] = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
}


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def problems(value: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """Where ``value`` breaks ``schema`` (empty: it conforms)."""
    found: list[str] = []
    if "oneOf" in schema:
        matching = sum(not problems(value, s, path) for s in schema["oneOf"])
        if matching != 1:
            found.append(f"{path}: matches {matching} of oneOf, not exactly 1")
    if "anyOf" in schema:
        options = [problems(value, s, path) for s in schema["anyOf"]]
        if all(options):
            found.append(f"{path}: matches none of anyOf ({options})")
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{path}: {value!r} not in {schema['enum']}")
    kind = schema.get("type")
    if kind is not None and not _is_type(value, kind):
        return [*found, f"{path}: expected {kind}, got {type(value).__name__}"]
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            found.append(f"{path}: below {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            found.append(f"{path}: above {schema['maximum']}")
    if isinstance(value, str):
        if len(value) > schema.get("maxLength", len(value)):
            found.append(f"{path}: longer than {schema['maxLength']}")
        if len(value) < schema.get("minLength", 0):
            found.append(f"{path}: shorter than {schema['minLength']}")
        if "pattern" in schema and re.search(schema["pattern"], value) is None:
            found.append(f"{path}: does not match {schema['pattern']}")
    if isinstance(value, dict):
        props: dict[str, Any] = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                found.append(f"{path}.{name}: required, missing")
        for name, item in value.items():
            if name in props:
                found += problems(item, props[name], f"{path}.{name}")
            elif schema.get("additionalProperties") is False:
                found.append(f"{path}.{name}: not declared")
    return found


def _operation(method: str, path: str) -> dict[str, Any]:
    from creditgate.http.app import ENDPOINTS
    from creditgate.http.openapi import document

    op: dict[str, Any] = document(ENDPOINTS)["paths"][path][method.lower()]
    return op


def request_schema(method: str, path: str) -> dict[str, Any]:
    """The JSON body schema the published document declares for this operation."""
    schema: dict[str, Any] = _operation(method, path)["requestBody"]["content"]["application/json"][
        "schema"
    ]
    return schema


def response_schema(method: str, path: str, status: int) -> dict[str, Any]:
    """The body schema (envelope included) the document declares for this success status."""
    schema: dict[str, Any] = _operation(method, path)["responses"][str(status)]["content"][
        "application/json"
    ]["schema"]
    return schema


def assert_conforms(value: Any, schema: dict[str, Any]) -> None:
    """Fail with every problem when ``value`` does not conform to ``schema``."""
    found = problems(value, schema)
    assert not found, found
