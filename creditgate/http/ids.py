"""Moved to ``creditgate.webkit.ids``; re-exported for existing imports."""

from creditgate.webkit.ids import *  # noqa: F403
