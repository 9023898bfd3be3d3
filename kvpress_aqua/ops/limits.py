"""Sizes that bound the attention ops' working sets (no torch: the planner reads them)."""

__all__ = ["BLOCK_SCORE_BYTES"]

BLOCK_SCORE_BYTES = 8 * 2**20
"""Bytes of float32 scores one block of query rows may hold in the reference attention (past and new block).

The reference keeps about two such tensors alive at once (scores and their exponentials are computed
in place), so a layer's attention working set stays near ``2 x BLOCK_SCORE_BYTES`` however long the
chunk is (a single query row may need more). The fused kernel holds no score matrix at all."""
