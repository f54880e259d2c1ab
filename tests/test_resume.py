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


def _fit(guard, cfg, max_epochs=1, ckpt=None):
    trainer = _trainer(guard, max_epochs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PPOGuardWarning)
        trainer.fit(CartPolePPO(cfg), ckpt_path=ckpt)
    return trainer


def test_a_guard_reused_for_a_second_fit_behaves_as_a_fresh_one():
    guard = PPOGuard(on_stall="stop")
    faulty = PPOConfig(seed=0, fault="actor_not_in_optimizer")
    faulty.total_timesteps = 3 * faulty.batch_size
    first = _fit(guard, faulty)
    per = faulty.update_epochs * faulty.num_minibatches
    assert first.should_stop and first.global_step == per and guard.codes() == {"PPG001"}

    healthy = PPOConfig(seed=1)
    healthy.total_timesteps = 3 * healthy.batch_size
    second = _fit(guard, healthy)
    # no finding, no stop, and counts from zero: nothing of the first fit leaks into the second
    assert guard.findings == [] and not guard.verdict.stall and guard.diagnoser.states.keys() <= {"actor", "critic"}
    assert all(not s.raised and s.critic.streak == 0 for s in guard.diagnoser.states.values())
    assert not second.should_stop and second.global_step == 3 * per == guard.optimizer_steps
    assert guard.progress.rollout == {"actor": 2} and guard.updates_per_rollout == {"actor": per}


def test_a_run_the_guard_stopped_stops_again_when_resumed_with_the_same_fault(tmp_path):
    cfg = PPOConfig(seed=0, fault="actor_not_in_optimizer")
    cfg.total_timesteps = 2 * cfg.batch_size  # one epoch = 2 PPO iterations
    per = cfg.update_epochs * cfg.num_minibatches
    first = _fit(PPOGuard(on_stall="stop"), cfg, max_epochs=3)
    assert first.global_step == per  # stopped after the first rollout
    ckpt = tmp_path / "stopped.ckpt"
    first.save_checkpoint(ckpt)

    guard = PPOGuard(on_stall="stop")
    resumed = _fit(guard, cfg, max_epochs=3, ckpt=ckpt)
    # the decision came back with the findings: the resumed run stops at its first batch end, not 5 rollouts later
    assert resumed.should_stop and resumed.global_step == 2 * per
    assert guard.codes() == {"PPG001"} and guard.verdict.stall and len(guard.findings) == 1
