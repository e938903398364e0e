"""Per-account preferences: low-balance threshold, notification URL and secret, default model.

``store`` reads and writes them (the threshold through ``creditgate.ledger``,
on the balance row); ``cache`` keeps each account's default model for the
proxy.
"""

from creditgate.preferences.cache import DefaultModels
from creditgate.preferences.store import (
    UNSET,
    Changes,
    Preferences,
    delivery_target,
    get_preferences,
    new_signing_secret,
    update_preferences,
)

__all__ = [
    "UNSET",
    "Changes",
    "DefaultModels",
    "Preferences",
    "delivery_target",
    "get_preferences",
    "new_signing_secret",
    "update_preferences",
]
