"""Checkpoint resume keeps the guard's state: counts, entropy baseline, rule state, findings already raised."""

from __future__ import annotations

import warnings

import lightning as L
import pytest

from lightning_ppo_guard import PPOGuard, PPOGuardWarning
from lightning_ppo_guard.reference import CartPolePPO, PPOConfig, trainer_kwargs


def _trainer(guard, max_epochs):
    kwargs = {**trainer_kwargs(CartPolePPO(PPOConfig())), "max_epochs": max_epochs}
    return L.Trainer(**kwargs, logger=False, enable_checkpointing=False, callbacks=[guard])


def test_resume_from_checkpoint_round_trip(tmp_path):
    cfg = PPOConfig(seed=0, fault="actor_not_in_optimizer")
    cfg.total_timesteps = 2 * cfg.batch_size  # one epoch = 2 PPO iterations
    per_epoch = 2 * cfg.update_epochs * cfg.num_minibatches
    first = PPOGuard()
    trainer = _trainer(first, max_epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PPOGuardWarning)
        trainer.fit(CartPolePPO(cfg))
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    assert first.optimizer_steps == per_epoch and first.codes() == {"PPG001"}

    second = PPOGuard()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(second, max_epochs=2).fit(CartPolePPO(cfg), ckpt_path=ckpt)
    # counts continue, the entropy baseline and the finding survive, and PPG001 is not warned again
    assert second.optimizer_steps == 2 * per_epoch
    assert second.progress.entropy0 == pytest.approx({k: float(v) for k, v in first.progress.entropy0.items()})
    assert [(f.code, f.role, f.step) for f in second.findings] == [(f.code, f.role, f.step) for f in first.findings]
    assert not [w for w in caught if issubclass(w.category, PPOGuardWarning)]
    assert second.diagnoser.state("actor").raised == ["PPG001"]
