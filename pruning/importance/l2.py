"""``l2``: see `pruning.importance.norms`."""

from pruning.importance.norms import L2Importance

__all__ = ["L2Importance"]
