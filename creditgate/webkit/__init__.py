"""The web toolkit every layer's routes share, below the domain.

JSON bodies and the envelopes (``envelope``), request ids (``ids``), the
OpenAPI endpoint records (``openapi``), the graceful drain (``drain``) and the
hostile-text checks (``textguard``). Nothing here knows the application's
state or a domain package: route modules in ``proxy/``, ``billing/``,
``webhooks/`` and ``throttle/`` use it without importing ``http/``.
"""
