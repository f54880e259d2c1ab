"""TorchRL's PPO losses, read from inside their own forward: :func:`watch_loss`.

A TorchRL ``ClipPPOLoss`` (or ``PPOLoss``, ``KLPENPPOLoss``) computes the new log-prob, the log-ratio, the normalised
advantages and the entropy inside ``forward``; a user can hand ``observe`` only a recomputed copy, which no loss uses
(one more actor forward, and the sign rules blind). :func:`watch_loss` instead wraps the loss *instance* so that each
forward hands the guard the loss's own tensors, in TorchRL's conventions ((B, 1) log-weights and advantages)::

    from lightning_ppo_guard.integrations.torchrl import watch_loss

    class PPO(L.LightningModule):
        def __init__(self):
            ...
            self.loss_module = ClipPPOLoss(self.policy_module, self.value_module, clip_epsilon=0.2)
            self.watch = watch_loss(self, self.loss_module)      # once; a no-op without a guard

        def training_step(self, batch, batch_idx):
            self.watch.rollout = batch_idx                       # optional: the rollout (PPO iteration) number
            out = self.loss_module(td)                           # the guard reads this forward
            loss = out["loss_objective"] + out["loss_critic"] + out["loss_entropy"]

What is read, per forward, with no extra computation: the log-weight ``log(pi_theta / pi_old)`` the clip acts on
(its gradient gives PPG107 and PPG104), the stored old log-prob (``tensor_keys.sample_log_prob``), the advantages as
the loss uses them (after its ``normalize_advantage``), the entropy tensor its bonus uses (PPG502), the distribution
(entropy_norm, a Gaussian's log_std) and the clip range. It relies on three methods of TorchRL's ``PPOLoss``
(``_log_weight``, ``_maybe_normalize_advantage``, ``_get_entropy``), checked when it is called, with a clear error
naming the version if they are missing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution

from lightning_ppo_guard.observe import observe

__all__ = ["LossWatch", "watch_loss"]

#: The loss methods the watch wraps (TorchRL's PPOLoss, 0.6 and later): the only place its log-ratio exists.
_WRAPPED = ("_log_weight", "_maybe_normalize_advantage", "_get_entropy")


def watch_loss(module: Any, loss_module: Any, *, role: str = "actor", rollout: int | None = None) -> LossWatch:
    """Make every forward of ``loss_module`` (a TorchRL ``PPOLoss``: ``ClipPPOLoss``, ``KLPENPPOLoss``...) call
    :func:`~lightning_ppo_guard.observe` on ``module`` (the LightningModule, or a ``FabricGuard``'s model) with the
    loss's own tensors. Call it once (``__init__`` or ``setup``); :meth:`LossWatch.remove` undoes it.

    Args:
        module: what ``observe`` is called on (the LightningModule whose Trainer holds the guard).
        loss_module: the TorchRL PPO loss instance.
        role: the actor role the loss trains (``"agent_1"`` for one agent's loss in MAPPO).
        rollout: the rollout id to start with; set :attr:`LossWatch.rollout` as rollouts change.

    Raises:
        TypeError: ``loss_module`` is not a TorchRL PPO loss.
        RuntimeError: this TorchRL version has no such methods (name the version in an issue).
    """
    return LossWatch(module, loss_module, role=role, rollout=rollout)


class LossWatch:
    """The wrap :func:`watch_loss` installs on one loss instance (see the module docstring)."""

    def __init__(self, module: Any, loss_module: Any, *, role: str = "actor", rollout: int | None = None) -> None:
        try:
            from torchrl.objectives import PPOLoss
        except ImportError as exc:  # pragma: no cover - the extra is missing
            raise ImportError("watch_loss needs TorchRL: pip install 'lightning-ppo-guard[torchrl]'") from exc
        if not isinstance(loss_module, PPOLoss):
            raise TypeError(
                f"watch_loss() takes a TorchRL PPO loss (ClipPPOLoss, PPOLoss, KLPENPPOLoss), got "
                f"{type(loss_module).__name__}. For a hand-written loss call observe(self, new_logp=..., "
                "old_logp=..., advantages=...) before backward.")
        missing = [name for name in _WRAPPED if not callable(getattr(loss_module, name, None))]
        if missing:
            import torchrl

            raise RuntimeError(
                f"watch_loss(): TorchRL {torchrl.__version__}'s {type(loss_module).__name__} has no {missing}; this "
                "integration reads the loss's log-ratio through them. Pin torchrl>=0.6, or call observe(self, "
                "log_ratio=..., old_logp=..., advantages=...) from your own loss.")
        if not isinstance(role, str) or not role:
            raise TypeError(f"watch_loss(): role must be a role name such as 'actor' or 'agent_2', got {role!r}.")
        self.module, self.loss_module, self.role, self.rollout = module, loss_module, role, rollout
        clip = getattr(loss_module, "clip_epsilon", None)  # a buffer (or a (low, high) pair): read once, here
        self.clip_eps = float(torch.as_tensor(clip).max()) if clip is not None else None
        self._captured: dict[str, Any] = {}
        self._originals = {name: getattr(loss_module, name) for name in _WRAPPED}
        object.__setattr__(loss_module, "_log_weight", self._log_weight)
        object.__setattr__(loss_module, "_maybe_normalize_advantage", self._normalize_advantage)
        object.__setattr__(loss_module, "_get_entropy", self._get_entropy)
        self._handle = loss_module.register_forward_hook(self._after_forward)

    # ------------------------------------------------------------------ the wrapped methods
    def _log_weight(self, tensordict: Any, *args: Any, **kwargs: Any) -> Any:
        out = self._originals["_log_weight"](tensordict, *args, **kwargs)
        log_weight, dist = out[0], out[1]
        if isinstance(log_weight, Tensor):  # a composite (multi-head) log-prob is summed by the loss itself
            key = self.loss_module.tensor_keys.sample_log_prob
            old = tensordict.get(key, None)
            self._captured.update(log_weight=log_weight, dist=dist, old=old if isinstance(old, Tensor) else None)
        return out

    def _normalize_advantage(self, advantage: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        out = self._originals["_maybe_normalize_advantage"](advantage, *args, **kwargs)
        self._captured["advantages"] = out
        return out  # type: ignore[no-any-return]

    def _get_entropy(self, dist: Any, *args: Any, **kwargs: Any) -> Any:
        out = self._originals["_get_entropy"](dist, *args, **kwargs)
        if isinstance(out, Tensor):
            self._captured["entropy"] = out
        return out

    def _after_forward(self, _module: Any, _args: Any, _output: Any) -> None:
        c, self._captured = self._captured, {}
        log_weight, old = c.get("log_weight"), c.get("old")
        if log_weight is None or old is None:
            return
        dist = c.get("dist")
        observe(self.module, log_ratio=log_weight, old_logp=old, advantages=c.get("advantages"),
                entropy=c.get("entropy"), dist=dist if isinstance(dist, Distribution) else None,
                clip_eps=self.clip_eps, rollout=self.rollout, role=self.role)

    def remove(self) -> None:
        """Restore the loss's own methods and remove the hook."""
        for name in _WRAPPED:
            self.loss_module.__dict__.pop(name, None)
        self._handle.remove()
