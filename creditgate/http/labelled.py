"""Re-export of ``creditgate.metrics.cached_labels`` for existing imports."""

from creditgate.metrics import MAX_CHILDREN as MAX_CHILDREN
from creditgate.metrics import cached_labels as cached_labels
