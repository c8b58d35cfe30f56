"""``l1``: see `pruning.importance.norms`."""

from pruning.importance.norms import L1Importance

__all__ = ["L1Importance"]
