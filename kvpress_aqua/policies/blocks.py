"""Block summaries: keep the first and the newest tokens, reduce the middle of a sequence block by block."""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass

import torch

from .base import SlotView, TokenPolicy

__all__ = ["BlockSummary", "Draws"]


@dataclass
class Draws:
    """Uniform draws for the blocks of one layer, the same for a KV head whichever process holds it.

    Parameters
    ----------
    generator : torch.Generator
        The random source, on the tensors' device.
    heads : range, optional
        The KV heads the draws' axis 1 holds, out of ``num_heads`` (a tensor-parallel rank's share):
        every head is drawn and these are kept. ``None``: axis 1 is every head.
    num_heads : int, optional
        The model's KV heads (with ``heads``).

    """

    generator: torch.Generator
    heads: range | None = None
    num_heads: int | None = None

    def rand(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """Uniform ``[0, 1)`` draws of ``shape`` ``(batch, kv_heads, ...)``."""
        if self.heads is None:
            return torch.rand(shape, generator=self.generator, device=device)
        every = torch.rand((shape[0], self.num_heads, *shape[2:]), generator=self.generator, device=device)
        return every[:, self.heads.start:self.heads.stop]


@dataclass
class BlockSummary(TokenPolicy):
    """Keep ``sinks`` first and ``recent`` newest tokens; reduce every full block of the middle to a weighted few.

    Each full block of ``block`` middle tokens that no summary holds yet is reduced by
    :meth:`choose` to ``block / 2**halvings`` of its tokens, and each kept token then stands for
    ``2**halvings`` of them: its slot's log-weight ``halvings * ln 2`` is added to its attention
    score, which makes the attention over the kept tokens an estimate of the attention over the
    block. Blocks are reduced as soon as they are complete, during prefill chunks and decoding
    alike, so the cache holds ``sinks + recent`` tokens, up to ``block - 1`` pending ones and the
    summaries: a fixed *rate* ``2**-halvings`` of the middle, not a fixed token budget.

    Parameters
    ----------
    halvings : int, default 2
        Halvings per block: ``2**-halvings`` of the middle is kept (0 keeps every token).
    sinks : int, default 32
        First real tokens of each sequence kept exactly (left padding is not counted).
    recent : int, default 32
        Newest tokens kept exactly; older ones enter the blocks.
    block : int, default 128
        Middle tokens reduced together; a multiple of ``2**halvings``.
    seed : int, default 0
        Seed of the random draws (with the layer and the block's first position).

    Notes
    -----
    Shapes: the keys and values a block is chosen from are ``(batch, kv_heads, blocks, block, dim)``
    as stored (under AQUA, rotated and cut to the kept channels); each KV head chooses its own
    tokens. In a padded batch every row reduces the same number of blocks (the rows' fewest), so
    that rows keep equal slot counts; a row with more real tokens keeps its later blocks pending.
    Summaries are never reduced again (no merge of summaries), and a kept token is never dropped.
    The draws depend on how many blocks one call reduces, so the same text read in other chunk
    sizes may keep other tokens; they do not depend on which process holds a head (:class:`Draws`).
    Needs the cache's dynamic path (no static decode buffers).

    """

    halvings: int = 2
    sinks: int = 32
    recent: int = 32
    block: int = 128
    seed: int = 0
    weights_slots = True

    def __post_init__(self) -> None:
        kind = type(self).__name__
        for name in ("halvings", "sinks", "recent"):
            if getattr(self, name) < 0:
                raise ValueError(f"{kind}({name}={getattr(self, name)}): must be >= 0")
        if self.block < 2 ** self.halvings or self.block % 2 ** self.halvings:
            raise ValueError(f"{kind}(block={self.block}, halvings={self.halvings}): block must be a positive "
                             f"multiple of 2**halvings = {2 ** self.halvings}")

    @property
    def budget(self) -> None:
        """``None``: the policy keeps a rate of the middle, chosen by :meth:`compact`."""
        return None

    @property
    def rate(self) -> float:
        """Fraction of the middle tokens kept: ``2**-halvings``."""
        return 2.0 ** -self.halvings

    @property
    def kept_per_block(self) -> int:
        """Tokens a block is reduced to."""
        return self.block >> self.halvings

    def held(self, tokens: int) -> int:
        """Slots a sequence of ``tokens`` real tokens holds once its full blocks are reduced."""
        middle = max(0, tokens - self.sinks - self.recent)
        full = middle // self.block if self.halvings else 0
        return tokens - full * (self.block - self.kept_per_block)

    def compact(self, view: SlotView) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Reduce the oldest full pending blocks of the middle (as many as every row has), else ``None``."""
        if not self.halvings:
            return None
        position = view.index - view.left_pad
        pending = (view.valid & (position >= self.sinks) & (view.index < view.seen - self.recent)
                   & (view.log_weight == 0))
        blocks = int(pending.sum(-1).min()) // self.block
        if not blocks:
            return None
        batch, heads, slots = pending.shape
        # pending slots first, in slot order (slots are held in position order)
        candidates = torch.sort((~pending).to(torch.int8), dim=-1, stable=True).indices[..., :blocks * self.block]

        def gather(x: torch.Tensor) -> torch.Tensor:
            at = candidates[..., None].expand(-1, -1, -1, x.shape[-1])
            return x.gather(2, at).view(batch, heads, blocks, self.block, x.shape[-1])

        first = int(view.index.gather(2, candidates[..., :1]).min())
        generator = torch.Generator(device=view.keys.device).manual_seed(
            hash((self.seed, view.layer_idx, first)) % 2**63)
        chosen = self.choose(gather(view.keys), gather(view.values), Draws(generator, view.heads, view.num_heads))
        picked = candidates.view(batch, heads, blocks, self.block).gather(3, chosen).view(batch, heads, -1)
        dropped = torch.zeros_like(pending).scatter_(2, candidates, True).scatter_(2, picked, False)
        held = slots - blocks * (self.block - self.kept_per_block)
        kept = torch.sort(dropped.to(torch.int8), dim=-1, stable=True).indices[..., :held]
        log_weight = view.log_weight.scatter(2, picked, self.halvings * math.log(2.0))
        return kept, log_weight.gather(2, kept)

    @abstractmethod
    def choose(self, keys: torch.Tensor, values: torch.Tensor, draws: Draws) -> torch.Tensor:
        """The tokens each block keeps.

        Parameters
        ----------
        keys, values : torch.Tensor
            ``(batch, kv_heads, blocks, block, dim)``: the blocks' keys as stored and their values.
        draws : Draws
            The random source.

        Returns
        -------
        torch.Tensor
            int64 ``(batch, kv_heads, blocks, kept_per_block)``: positions in each block, ascending.

        """
