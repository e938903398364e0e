"""creditgate: a metered LLM proxy with a credit ledger."""

__version__ = "0.1.0"
