"""Moved to ``creditgate.webkit.openapi``; re-exported for existing imports."""

from creditgate.webkit.openapi import *  # noqa: F403
