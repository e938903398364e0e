"""``creditgate``: serve, dev, migrate, mock-upstream, and the operator commands.

Every command takes ``--json`` and then prints exactly one JSON object on
stdout. Exit 0 on success (and on an identical idempotent replay), 1 on an
error (``{"error": {code, message}}``), 2 on a usage error. Logs go to stderr.

Modules, one per command group: ``accounts`` (migrate, accounts, credits,
usage, balance, verify), ``keys`` (keys, limits), ``ops`` (doctor,
reconcile), ``servers`` (serve, mock-upstream), ``dev``; ``parser`` names
them all. An operator command returns an ``Outcome`` (result, readable text,
exit code) or raises ``CliError``; only ``main`` prints and picks the exit
code. Commands open the database through ``db.connected`` and run no SQL of
their own (it lives in ``ledger``, ``auth`` and ``throttle``).
"""

from __future__ import annotations

import asyncio
import os

from creditgate.cli.output import CliError, fail, report
from creditgate.cli.parser import parser
from creditgate.domain_errors import DomainError
from creditgate.errors import ApiError
from creditgate.http.domain_errors import api_error
from creditgate.logs import setup_logging

# The parser under its former name (tests and tools build it to read the help).
_parser = parser

__all__ = ["CliError", "main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``creditgate`` command: run one command, return its exit code."""
    # argparse reads "-5" as a positional (a negative AMOUNT), not as an option.
    args = parser().parse_args(argv)
    if hasattr(args, "server"):
        try:
            return int(args.server(args))
        except CliError as e:
            return fail(args, e.code, e.message)
    setup_logging(os.environ.get("LOG_LEVEL", "warning"))
    try:
        outcome = asyncio.run(args.run(args))
    except (CliError, ApiError) as e:
        return fail(args, e.code, e.message)
    except DomainError as e:  # the ledger's refusals: the same codes the API answers
        return fail(args, api_error(e).code, e.message)
    return report(args, outcome)
