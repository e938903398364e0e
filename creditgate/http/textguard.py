"""Moved to ``creditgate.webkit.textguard``; re-exported for existing imports."""

from creditgate.webkit.textguard import *  # noqa: F403
