"""JSON-lines logging on stderr (DESIGN.md §9).

Messages are static strings; everything variable goes in structured fields
(``extra=``), and only ids, never keys, tokens, prompts, completions or emails.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

import orjson

log = logging.getLogger("creditgate")

# Attributes every LogRecord has; anything else came from ``extra=``.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


# Credentials as they can appear in any logger's text — aiohttp's server
# logger quotes the raw header line of a request it cannot parse (a key with a
# \x01 in it, the first 100 bytes of an oversized cookie), asyncpg quotes
# parameters. Each is replaced by "[redacted]" in the finished line.
_SECRETS = re.compile(
    r"""
      (?P<scheme>\b(?:bearer|basic)(?:\s|\\x20|%20)+)[^\s"',;\\]+  # Authorization schemes
    | (?P<cookie>__session=)[^\s"',;\\]*                         # Clerk's session cookie
    | (?P<header>\b(?:authorization|cookie|x-api-key|webhook-signature|svix-signature)
         (?:"|')?\s*(?::|=)\s*(?:"|')?)[^\r\n"'\\]*    # a whole credential header's value
    | (?-i:cg_[A-Za-z0-9_-]{12,})              # creditgate API keys (case-sensitive)
    | eyJ[A-Za-z0-9_-]{6,}  (?:\.[A-Za-z0-9_-]*){0,2}             # JWTs, even cut short
    | (?-i:\b(?:whsec|polar_[a-z]{2,4}|sk)_[A-Za-z0-9_-]{12,})  # webhook, Polar, OpenAI secrets
    """,
    re.IGNORECASE | re.VERBOSE,
)


def _redact_match(m: re.Match[str]) -> str:
    prefix = m.group("scheme") or m.group("cookie") or m.group("header") or ""
    return prefix + "[redacted]"


# Every pattern above contains one of these (lower case): a line with none of
# them — nearly every line — skips the regex (~2 µs instead of ~100 µs).
_TRIGGERS = (
    "bearer", "basic", "__session", "authorization", "cookie", "x-api-key",
    "signature", "cg_", "eyj", "whsec_", "polar_", "sk_",
)  # fmt: skip


def redact(text: str) -> str:
    """``text`` with every credential-shaped substring replaced by ``[redacted]``."""
    lower = text.lower()
    if not any(trigger in lower for trigger in _TRIGGERS):
        return text
    return _SECRETS.sub(_redact_match, text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and the extra fields.

    The finished line passes ``redact``: whichever logger wrote it (ours,
    aiohttp's, asyncpg's), no credential leaves the process.
    """

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            # Our messages are static; other libraries' may use %-arguments.
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return redact(orjson.dumps(out, default=str).decode())


def setup_logging(level: str = "info") -> None:
    """Send every logger's records to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # What no line of ours prints, so no record needs to collect it: the
    # caller's file and line (a stack walk per record), thread and process
    # names (the logging HOWTO's "Optimization" switches). ~30% of a record's cost.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # aiohttp's access log repeats what our middleware logs, in free text.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    # polar-sdk's httpx logs every Polar request at info, in free text.
    logging.getLogger("httpx").setLevel(logging.WARNING)
