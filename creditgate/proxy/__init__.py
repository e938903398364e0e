"""The proxy: OpenAI-compatible chat completions, metered through the ledger."""
