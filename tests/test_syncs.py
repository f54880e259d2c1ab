"""Host synchronisations per optimizer step, counted (structure, not timing)."""

from __future__ import annotations

import pytest
import torch

from lightning_ppo_guard import PPOGuard, PPOMonitor
from lightning_ppo_guard.reference import CartPolePPO, PPOConfig

from .conftest import fit


class _Counter:
    def __init__(self):
        self.calls = 0
        self.active = False


def _count_syncs(monkeypatch, callback, iterations=3):
    """Fit the reference PPO and count .item()/.tolist() calls made by lightning_ppo_guard code."""
    counter = _Counter()
    for name in ("item", "tolist"):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, **kwargs):
            import sys

            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("lightning_ppo_guard.") and not caller.startswith("lightning_ppo_guard.reference"):
                counter.calls += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    cfg = PPOConfig(seed=0)
    cfg.total_timesteps = iterations * cfg.batch_size
    trainer = fit(CartPolePPO(cfg), [callback])
    return counter.calls, trainer.global_step


def test_guard_syncs_at_most_once_per_measured_step(monkeypatch):
    guard = PPOGuard(dense_steps=0, measure_every_n_steps=1)
    calls, steps = _count_syncs(monkeypatch, guard)
    flushes = 3  # one per training batch (Trainer log_every_n_steps=1, one PPO iteration per batch)
    assert calls <= steps + flushes + 1, (calls, steps)


def test_guard_cadence_cuts_the_syncs(monkeypatch):
    guard = PPOGuard(dense_steps=0, measure_every_n_steps=16)
    calls, steps = _count_syncs(monkeypatch, guard)
    measured = -(-steps // 16)
    # measured steps + each rollout's first minibatch (always observed) + one flush per batch
    assert calls <= measured + 3 + 3 + 1, (calls, steps)


def test_monitor_alone_syncs_only_to_log(monkeypatch):
    calls, _ = _count_syncs(monkeypatch, PPOMonitor(measure_every_n_steps=1))
    assert calls <= 3 + 1  # one per logged row


@pytest.mark.parametrize("dense_steps, epochs", [(16, 10), (128, 40)])
def test_no_host_read_inside_an_optimizer_step(monkeypatch, dense_steps, epochs):
    """The default tier reads to the host only at its read points (rollout boundaries, batch ends in manual
    optimization, rows, a full pending list), never inside the hooks around an optimizer step: on a GPU that
    would stall the step. The second case measures 128 steps of a 160-step batch, so the pending list fills."""
    guard = PPOGuard(dense_steps=dense_steps)
    inside = {"depth": 0, "reads": 0, "reads_inside": 0}
    for name in ("after_backward", "before_optimizer_step", "pre_step", "post_step"):  # the engine's step hooks
        method = getattr(guard.engine, name)

        def wrapped(*args, _method=method, **kwargs):
            inside["depth"] += 1
            try:
                return _method(*args, **kwargs)
            finally:
                inside["depth"] -= 1

        monkeypatch.setattr(guard.engine, name, wrapped)
    for name in ("item", "tolist"):
        original = getattr(torch.Tensor, name)

        def read(self, *args, _original=original, **kwargs):
            import sys

            if sys._getframe(1).f_globals.get("__name__", "").startswith("lightning_ppo_guard._"):
                inside["reads"] += 1
                inside["reads_inside"] += inside["depth"] > 0
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)
    cfg = PPOConfig(seed=0, update_epochs=epochs)
    cfg.total_timesteps = 3 * cfg.batch_size
    trainer = fit(CartPolePPO(cfg), [guard])
    assert inside["reads_inside"] == 0, inside
    assert 0 < inside["reads"] <= 3 * 4, inside  # a handful per batch (one PPO iteration), not one per step
    assert trainer.global_step == 3 * epochs * 4
