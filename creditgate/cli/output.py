"""What a command hands back, and how ``main`` prints it: one JSON object or readable text."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class CliError(Exception):
    """A command's failure: an error code and a one-line message (exit 1)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Outcome:
    """A command's result: printed by ``main``, which exits with ``exit_code``."""

    result: dict[str, Any]
    text: str | None = None  # the readable form without --json; None: ``human(result)``
    exit_code: int = 0
    # Written to stderr before the result: a weaker setup, not a failure.
    warnings: Sequence[str] = field(default=())


def emit(args: argparse.Namespace, result: dict[str, Any], text: str | None = None) -> None:
    """Print ``result``: one JSON object with ``--json``, else ``text`` or a readable form."""
    from creditgate.webkit.envelope import dumps

    out = dumps(result).decode() if args.json else (text if text is not None else human(result))
    sys.stdout.write(out + "\n")
    sys.stdout.flush()


def fail(args: argparse.Namespace, code: str, message: str) -> int:
    """Report an error: ``{"error": …}`` on stdout with ``--json``, else one line on stderr.

    The line has argparse's prefix (``creditgate: error: …``) so usage errors
    and every other error look alike.
    """
    if getattr(args, "json", False):
        emit(args, {"error": {"code": code, "message": message}})
    else:
        sys.stderr.write(f"creditgate: error: {message}\n")
        sys.stderr.flush()
    return 1


def report(args: argparse.Namespace, outcome: Outcome) -> int:
    """Print a command's outcome; its exit code."""
    for warning in outcome.warnings:
        sys.stderr.write(f"warning: {warning}\n")
    emit(args, outcome.result, outcome.text)
    return outcome.exit_code


def human(value: Any, indent: str = "") -> str:
    """A result as aligned ``name  value`` lines; lists of objects as indented blocks."""
    from creditgate.webkit.envelope import dumps

    if not isinstance(value, dict):
        return indent + (value if isinstance(value, str) else dumps(value).decode())
    if not value:
        return indent + "(nothing)"
    width = max(len(str(k)) for k in value)
    lines: list[str] = []
    for name, item in value.items():
        if isinstance(item, list) and item and all(isinstance(i, dict) for i in item):
            lines.append(f"{indent}{name}:")
            for i, element in enumerate(item):
                if i:
                    lines.append("")
                lines.append(human(element, indent + "  "))
        elif isinstance(item, dict):
            lines.append(f"{indent}{name}:")
            lines.append(human(item, indent + "  "))
        else:
            shown = "-" if item is None or item == [] else item
            if not isinstance(shown, str):
                shown = dumps(shown).decode()
            lines.append(f"{indent}{name:<{width}}  {shown}")
    return "\n".join(lines)
