"""Moved to ``creditgate.webkit.drain``; re-exported for existing imports."""

from creditgate.webkit.drain import *  # noqa: F403
