"""Which diagnosis each planted fault must be named with, for which role, and by when."""

from __future__ import annotations

__all__ = ["EXPECTED"]

#: fault -> (role, code, last rollout index by which it must be named). Wiring and binding faults are named
#: in the first rollout (index 0); an lr of 0 once the actor has not moved in two rollouts (index 1: a warm-up
#: from 0 rises within its first); step-size faults within 5 rollouts (index 4).
EXPECTED: dict[str, tuple[str, str, int]] = {
    "detached_logits": ("actor", "PPG101", 0),
    "no_grad_forward": ("actor", "PPG101", 0),
    "actor_not_in_optimizer": ("actor", "PPG001", 0),
    "agent_unbound": ("agent_2", "PPG001", 0),
    "actor_replaced": ("actor", "PPG002", 0),
    "lr_zero": ("actor", "PPG003", 1),
    "old_logp_not_detached": ("actor", "PPG103", 0),
    "logp_by_hand": ("actor", "PPG106", 0),
    "zero_grad_before_step": ("actor", "PPG202", 0),
    "lr_tiny": ("actor", "PPG204", 4),
    "target_kl_tiny": ("actor", "PPG302", 4),
    "tiny_advantages": ("actor", "PPG402", 4),
    "critic_eats_clip": ("actor", "PPG403", 4),
    "entropy_frozen": ("actor", "PPG501", 4),
}
