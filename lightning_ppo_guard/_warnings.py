"""The package's own warning category, so users can filter it (``-W ignore::...PPOGuardWarning``)."""

from __future__ import annotations

__all__ = ["PPOGuardWarning"]


class PPOGuardWarning(UserWarning):
    """Warnings issued by lightning_ppo_guard: findings about the PPO run, and bad input to ``observe``."""
