"""Moved to ``creditgate.webkit.envelope``; re-exported for existing imports."""

from creditgate.webkit.envelope import *  # noqa: F403
