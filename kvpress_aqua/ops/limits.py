"""Sizes that bound the attention ops' working sets (no torch: the planner reads them)."""

__all__ = ["BLOCK_SCORE_BYTES", "tier_block_rows"]

BLOCK_SCORE_BYTES = 8 * 2**20
"""Bytes of float32 scores one block of query rows may hold in the reference attention (past and new block).

The reference keeps about two such tensors alive at once (scores and their exponentials are computed
in place), so a layer's attention working set stays near ``2 x BLOCK_SCORE_BYTES`` however long the
chunk is (a single query row may need more). The fused kernel holds no score matrix at all."""


def tier_block_rows(batch: int, heads: int, queries: int) -> int:
    """Tier rows a retrieval chunk's attention streams per block: ``BLOCK_SCORE_BYTES`` of float32 scores.

    ``heads`` are the query heads and ``queries`` the chunk's tokens; at least 16 rows.
    """
    return max(16, BLOCK_SCORE_BYTES // (4 * batch * heads * queries))
