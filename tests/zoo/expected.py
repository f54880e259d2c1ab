"""Which diagnosis each planted fault must be named with, for which role, and by when."""

from __future__ import annotations

__all__ = ["EXPECTED", "EXPECTED_MINIMAL"]

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
    "old_logp_recomputed": ("actor", "PPG108", 2),
    "logp_by_hand": ("actor", "PPG106", 0),
    "zero_grad_before_step": ("actor", "PPG202", 0),
    "lr_tiny": ("actor", "PPG204", 4),
    "target_kl_tiny": ("actor", "PPG302", 4),
    "tiny_advantages": ("actor", "PPG402", 4),
    "critic_eats_clip": ("actor", "PPG403", 4),
    "entropy_frozen": ("actor", "PPG501", 4),
    "entropy_sign": ("actor", "PPG502", 0),
    "lr_huge": ("actor", "PPG303", 4),
    "critic_clip_unscaled": ("critic", "PPG406", 4),
    "dropout_policy": ("actor", "PPG105", 1),  # on two consecutive rollouts' first minibatches
}

#: With the minimal observe (new_logp, old_logp, advantages), the faults whose expectation differs: None when the
#: fault cannot be told from those inputs (the entropy's sign is read from the entropy tensor's backward).
EXPECTED_MINIMAL: dict[str, tuple[str, str, int] | None] = {
    **EXPECTED,
    "entropy_frozen": ("actor", "PPG301", 4),  # no entropy given: "frozen while the parameters move"
    "entropy_sign": None,
    "dropout_policy": ("actor", "PPG105", 2),  # rollouts inferred from manual batches: judged as the 2nd one ends
}
