"""Sharded parameters (FSDP2's ``fully_shard``, ``DTensor``): measure the local shards, then sum across ranks.

Under FSDP2 a parameter and its gradient are ``DTensor``s, and each rank holds a shard. A role's squared norm is
the sum of its shards' squared norms; a nonzero count and a count of non-finite tensors add up the same way. So the
plan measures ``to_local()`` views with the same fused ops as for plain tensors, sums each role's local squares,
and one ``all_reduce`` (SUM) per measurement gives every rank the global numbers: every rank measures the same
steps (the cadence is a function of step counts and rollout ids), so the collectives line up.

A tensor replicated over some mesh dimensions (HSDP's replicate dimension, or a plain tensor next to DTensors) is
weighted by 1 / (ranks holding a copy), so the sum counts it once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch without distributed
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["Shards", "fingerprints", "global_norms", "local"]


def local(t: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` (a view, no copy); any other tensor as it is."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def _copies(t: Tensor, world: int) -> int:
    """How many ranks hold the same values of ``t``'s local tensor."""
    if DTensor is None or not isinstance(t, DTensor):
        return world
    mesh = t.device_mesh
    return math.prod(mesh.size(i) for i, p in enumerate(t.placements) if p.is_replicate())


class Shards:
    """How to turn one plan's local sums into global ones, or ``None`` for a plan without ``DTensor``s."""

    def __init__(self, weights: Tensor) -> None:
        self.weights = weights  # per tensor: 1 / (ranks holding a copy)

    @classmethod
    def of(cls, tensors: Sequence[Tensor | None], device: torch.device) -> Shards | None:
        """The weights of ``tensors`` (1 for a ``None``), or None when none of them is a ``DTensor``."""
        if DTensor is None or not any(isinstance(t, DTensor) for t in tensors):
            return None
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return cls(torch.tensor([1.0 / _copies(t, world) if t is not None else 1.0 for t in tensors], device=device))

    @staticmethod
    def all_reduce(t: Tensor) -> Tensor:
        """Sum ``t`` over every rank, in place (a no-op outside a process group)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t)
        return t


def global_norms(tensors: Sequence[Tensor | None], device: torch.device) -> Tensor:
    """Per-tensor L2 norms (0 for ``None``) of tensors that may be ``DTensor`` shards, summed over the ranks when
    some are (one ``all_reduce``): a rank whose shard of a small tensor is empty still sees its global norm."""
    zero = torch.zeros((), device=device)
    sq = torch.stack([local(t).detach().float().square().sum() if t is not None else zero for t in tensors])
    shards = Shards.of(tensors, device)
    return sq.sqrt() if shards is None else Shards.all_reduce(sq * shards.weights).sqrt()


def fingerprints(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """Per tensor, its L2 norm and its sum (``[2, n]``), global over the ranks as :func:`global_norms`: equal twice
    when nothing changed the tensor in between; both scaled by one factor when only a weight decay did."""
    sums = torch.stack([torch.stack([torch.linalg.vector_norm(local(t).detach(), dtype=torch.float32).square(),
                                     local(t).detach().sum(dtype=torch.float32)])
                        for t in tensors], dim=1) if tensors else torch.zeros(2, 0, device=device)
    shards = Shards.of(tensors, device)
    if shards is not None:
        sums = Shards.all_reduce(sums * shards.weights)
    return torch.stack([sums[0].sqrt(), sums[1]])
