"""Low-balance notifications: the outbox the crossing trigger fills, signed webhooks, the worker.

``outbox`` claims and finishes alerts; ``sender`` signs (Standard Webhooks,
svix's signer) and posts them with tenacity's retries; ``worker`` runs in
every server process, woken by Postgres ``LISTEN`` and polling besides.
"""

from creditgate.notify.worker import LOW_BALANCE, NOTIFIER, AlertWorker, setup_notifications

__all__ = ["LOW_BALANCE", "NOTIFIER", "AlertWorker", "setup_notifications"]
