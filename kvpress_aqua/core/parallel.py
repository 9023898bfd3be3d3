"""A model split over several devices: the KV heads of a tensor-parallel rank, and device names for accounting.

Two ways of splitting a model reach the cache:

- **layers on different devices** (accelerate's ``device_map="auto"``): each decoder layer's keys
  arrive on that layer's device, so every per-layer tensor the cache makes is made there (on the
  layer's first update) and a channel policy moves its per-layer tensors there
  (:meth:`~kvpress_aqua.policies.base.ChannelPolicy.place`);
- **heads on different ranks** (``transformers``' tensor parallelism, ``tp_plan="auto"`` under
  ``torchrun``): each rank's attention projects its own contiguous share of the KV heads, so its
  cache holds those heads only (:func:`local_kv_heads`), with the AQUA bases cut to them.

Eviction ranks the slots of each KV head on their own, so no decision needs another rank's heads:
the cache never communicates.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["device_name", "head_share", "local_kv_heads", "shards_kv_heads", "tensor_parallel_rank"]

_KEY_PROJECTIONS = ("k_proj", "qkv_proj")
"""The last name of a module that projects keys (alone, or fused with queries and values)."""


def tensor_parallel_rank(model: Any) -> tuple[int, int]:
    """``(rank, world)`` of this process along the model's tensor-parallel axis; ``(0, 1)`` when not sharded.

    Reads what ``transformers`` records when it shards a model (``model.tp_size`` and the device
    mesh it was sharded over, whose ``"tp"`` axis is the one that splits heads).
    """
    world = getattr(model, "tp_size", None) or getattr(model, "_tp_size", None) or 1
    if world == 1:
        return 0, 1
    mesh = getattr(model, "_device_mesh", None)
    if mesh is None:
        raise ValueError(f"the model is sharded over {world} tensor-parallel ranks but carries no device mesh, so "
                         "this process's share of the heads is unknown; load it with tp_plan='auto'")
    names = getattr(mesh, "mesh_dim_names", None) or ()
    rank = mesh.get_local_rank("tp") if "tp" in names else mesh.get_local_rank()
    return int(rank), int(world)


def shards_kv_heads(plan: dict[str, str]) -> bool:
    """Whether a ``transformers`` tensor-parallel plan leaves each rank a share of the KV heads.

    It does when the key projection is split by output rows (``colwise``); a plan that gathers the
    projection's output whole (Phi-3's fused ``qkv_proj``: ``colwise_gather_output`` in transformers
    5, ``colwise_rep`` in 4.57), or that does not split it, leaves every rank every head.
    """
    styles = [style for name, style in plan.items() if name.rsplit(".", 1)[-1] in _KEY_PROJECTIONS]
    return any(style.startswith("colwise") and "gather" not in style and not style.endswith("_rep")
               for style in styles)


def head_share(num_kv_heads: int, rank: int, world: int) -> range:
    """The KV heads ``rank`` of ``world`` holds: the ``rank``-th of ``world`` equal, contiguous shares.

    ``transformers`` shards ``k_proj`` and ``v_proj`` by output rows (``colwise``), so a rank
    projects a contiguous block of heads.

    Raises
    ------
    ValueError
        When the heads do not split evenly (a rank would hold part of a head).

    """
    if num_kv_heads % world:
        raise ValueError(f"{num_kv_heads} KV heads do not split over {world} tensor-parallel ranks; use a "
                         f"tensor-parallel size that divides {num_kv_heads}")
    share = num_kv_heads // world
    return range(rank * share, (rank + 1) * share)


def local_kv_heads(model: Any, num_kv_heads: int) -> range:
    """The KV heads this process's attention computes, so its cache holds: a rank's share, or all of them."""
    rank, world = tensor_parallel_rank(model)
    if world == 1 or not shards_kv_heads(getattr(model, "tp_plan", None) or getattr(model, "_tp_plan", None) or {}):
        return range(num_kv_heads)
    return head_share(num_kv_heads, rank, world)


def device_name(device: torch.device | str) -> str:
    """The name a memory report files a device's bytes under: ``"cpu"``, ``"cuda:1"``..."""
    return str(torch.device(device))
