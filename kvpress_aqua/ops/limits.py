"""Sizes that bound the attention ops' working sets (no torch: the planner reads them)."""

__all__ = ["BLOCK_SCORE_BYTES", "TIER_BLOCK_BYTES", "tier_block_rows"]

BLOCK_SCORE_BYTES = 8 * 2**20
"""Bytes of float32 scores one block of query rows may hold in the reference attention (past and new block).

The reference keeps about two such tensors alive at once (scores and their exponentials are computed
in place), so a layer's attention working set stays near ``2 x BLOCK_SCORE_BYTES`` however long the
chunk is (a single query row may need more). The fused kernel holds no score matrix at all."""

TIER_BLOCK_BYTES = 256 * 2**20
"""Bytes of retrieval-tier rows (keys and values) a chunk's attention copies to the accelerator at once."""


def tier_block_rows(rows: int, row_bytes: int) -> int:
    """Tier tokens per block: ``TIER_BLOCK_BYTES`` over ``rows`` (sequences x KV heads) of ``row_bytes`` each.

    At least 512 tokens, so that a block is worth an attention call.
    """
    return max(512, TIER_BLOCK_BYTES // max(1, rows * row_bytes))
