"""The planted faults: realistic user bugs that keep a PPO actor from learning (or are suspicious).

Each reference module takes ``cfg.fault`` (one of the names below, or ``None`` for a healthy run).
Faults that a user would make in the config (a learning rate, a reward scale, a KL limit) are applied
by :func:`apply_config_fault`; the others are single ``if self.fault == ...`` branches written in the
natural place of the training code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, TypeVar

__all__ = [
    "AUTO_FAULTS",
    "FAULTS",
    "MANUAL_FAULTS",
    "MAPPO_FAULTS",
    "apply_config_fault",
    "validate_fault",
]

FAULTS: dict[str, str] = {
    "detached_logits": "the update computes `logits = self.actor(obs).detach()`: no policy gradient",
    "no_grad_forward": "the update's actor forward runs under `torch.no_grad()`: new_logp has no graph",
    "actor_not_in_optimizer": "configure_optimizers only gets the critic's parameters",
    "agent_unbound": "MAPPO: agent 2's actor parameters are left out of the optimizer (agents 0 and 1 bound)",
    "actor_replaced": "on_fit_start re-creates self.actor after the optimizer was built: the optimizer "
    "holds the old tensors",
    "lr_zero": "actor learning rate 0",
    "lr_tiny": "actor learning rate 1e-9",
    "target_kl_tiny": "target_kl=1e-6: the KL early stop ends every update phase after its first minibatch",
    "old_logp_not_detached": "old_logp is recomputed from the live forward without detach: ratio == 1 "
    "identically and the policy gradient is 0",
    "old_logp_recomputed": "old_logp is recomputed from the current actor at update time, under no_grad: the "
    "ratio is exactly 1 on every minibatch, clipping never acts",
    "logp_by_hand": "new_logp = log(softmax(logits).gather(a)) instead of Categorical.log_prob",
    "tiny_advantages": "rewards scaled by 1e-5 and advantages not normalised: the entropy bonus dominates "
    "the policy term",
    "critic_eats_clip": "rewards scaled by 1e3: the critic's gradient eats the shared clip_grad_norm budget "
    "and the actor's clipped gradient falls under Adam's eps",
    "zero_grad_before_step": "opt.zero_grad() between manual_backward and opt.step(): nothing is updated",
    "entropy_frozen": "logits divided by a temperature of 1e4 before the Categorical: entropy pinned at "
    "ln 2, the policy cannot move",
    "entropy_sign": "the entropy bonus is added to the loss (loss = ... + ent_coef * entropy.mean()): a penalty "
    "that drives the policy to determinism",
    "lr_huge": "actor learning rate 0.05 with 10 epochs: each update phase moves the policy far from the rollout's",
    "critic_clip_unscaled": "rewards x100 with CleanRL-style value clipping (clip 0.2 around the rollout's values): "
    "the clipped branch wins on every sample and the critic gets no gradient",
    "dropout_policy": "the actor has dropout (p=0.1), active in the rollout and in the update: the first "
    "minibatch's ratio is not 1",
}

#: Faults :class:`CartPolePPO` (manual optimization) supports.
MANUAL_FAULTS: frozenset[str] = frozenset(FAULTS) - {"agent_unbound"}
#: Faults :class:`CartPolePPOAuto` supports (no target_kl early stop, no hand-written optimizer calls).
AUTO_FAULTS: frozenset[str] = MANUAL_FAULTS - {"target_kl_tiny", "zero_grad_before_step"}
#: Faults :class:`MultiCartPoleMAPPO` supports.
MAPPO_FAULTS: frozenset[str] = frozenset({"agent_unbound", "detached_logits"})

_Cfg = TypeVar("_Cfg")


def validate_fault(fault: str | None, supported: Iterable[str] | None = None) -> str | None:
    """Return ``fault`` unchanged if it is ``None`` or a known (and supported) name, else raise ValueError.

    Args:
        fault: a key of :data:`FAULTS`, or ``None`` for a healthy run.
        supported: the subset of names the caller implements (default: all of :data:`FAULTS`).
    """
    if fault is None:
        return None
    valid = sorted(FAULTS if supported is None else supported)
    if fault not in valid:
        raise ValueError(f"Unknown or unsupported fault {fault!r}; valid: {', '.join(valid)} (or None).")
    return fault


def apply_config_fault(cfg: _Cfg) -> _Cfg:
    """Return a copy of the dataclass ``cfg`` with the config-level part of ``cfg.fault`` applied."""
    fault: str | None = getattr(cfg, "fault", None)
    changes: dict[str, Any] = {
        "lr_zero": {"lr": 0.0},
        "lr_tiny": {"lr": 1e-9},
        "target_kl_tiny": {"target_kl": 1e-6},
        "tiny_advantages": {"reward_scale": 1e-5, "norm_adv": False},
        "critic_eats_clip": {"reward_scale": 1e3},
        "lr_huge": {"lr": 0.05},
        "critic_clip_unscaled": {"reward_scale": 100.0, "clip_vloss": True},
    }.get(fault or "", {})
    return dataclasses.replace(cfg, **changes) if changes else cfg  # type: ignore[type-var]
