"""What the monitor and the guard read from a Trainer and a LightningModule, as ``typing.Protocol`` s.

A ``lightning.Trainer`` satisfies :class:`TrainerLike` and a ``LightningModule`` :class:`ModuleLike`; a Fabric
loop answers them with small adapters (:mod:`lightning_ppo_guard.fabric`), so the same engine runs in both
without pretending to be a Trainer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

__all__ = ["ModuleLike", "TrainerLike"]


class TrainerLike(Protocol):
    """The Trainer attributes the monitor and the guard use (all public Lightning API)."""

    @property
    def optimizers(self) -> Sequence[Any]: ...  # torch optimizers (unwrapped)

    @property
    def loggers(self) -> Sequence[Any]: ...

    # ``log_every_n_steps`` and ``current_epoch`` are read with ``getattr`` (the Trainer sets the first at init, a
    # Fabric loop's view may lack the second): the engine falls back to logging every batch, resp. no fit fraction.

    @property
    def global_step(self) -> int: ...  # finished optimizer steps

    @property
    def training(self) -> bool: ...  # False in validation, test and sanity checks

    @property
    def is_global_zero(self) -> bool: ...

    @property
    def strategy(self) -> Any: ...  # has reduce_boolean_decision

    @property
    def scaler(self) -> Any: ...  # the AMP GradScaler, or None

    @property
    def log_dir(self) -> str | None: ...

    should_stop: bool


class ModuleLike(Protocol):
    """The LightningModule attributes the monitor uses."""

    @property
    def device(self) -> torch.device: ...

    @property
    def automatic_optimization(self) -> bool: ...

    def get_submodule(self, target: str) -> nn.Module: ...

    def parameters(self, recurse: bool = True) -> Any: ...

    def named_modules(self, *args: Any, **kwargs: Any) -> Any: ...
