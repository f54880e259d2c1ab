"""Issue 23: PPO built with the real TorchRL and Stable-Baselines3, in a LightningModule, under the guard.

TorchRL (:mod:`tests.zoo.torchrl_ppo`): ``ClipPPOLoss`` read from inside its own forward by
:func:`~lightning_ppo_guard.integrations.torchrl.watch_loss`, or observed with the README's minimal call.
SB3 (:mod:`tests.zoo.sb3_ppo`): ``ActorCriticPolicy`` with the optimizer it builds, SB3's loss written out.
Discrete (CartPole, Categorical) and continuous (Pendulum: TorchRL's TanhNormal, SB3's DiagGaussian).
"""

from __future__ import annotations

import warnings

import lightning as L
import pytest

from lightning_ppo_guard import PPOGuard

pytest.importorskip("torchrl")
pytest.importorskip("stable_baselines3")

from tests.zoo.sb3_ppo import SB3PPO, SB3Args
from tests.zoo.torchrl_ppo import TorchRLArgs, TorchRLPPO, trainer_kwargs

ENVS = ("CartPole-v1", "Pendulum-v1")


def _fit(module, seed):
    guard = PPOGuard()
    L.seed_everything(seed, verbose=False)
    trainer = L.Trainer(**trainer_kwargs(module), logger=False, enable_checkpointing=False, callbacks=[guard])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)
    return guard


def _named(guard):
    return [(f.code, f.role, f.rollout) for f in guard.findings]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("env", ENVS)
def test_healthy_torchrl_clip_ppo_is_quiet(env, seed):
    module = TorchRLPPO(TorchRLArgs(env=env, seed=seed, iterations=24))
    guard = _fit(module, seed)
    assert guard.findings == [] and guard.notices == [], guard.summary()
    assert guard.observes > 0 and guard.optimizer_steps == 24 * 16


@pytest.mark.slow
def test_a_long_healthy_torchrl_pendulum_run_is_quiet():
    """200 rollouts: a TanhNormal's saturated action, recomputed through atanh, once spiked one sample's first ratio
    (0.07 at rollout 194): no systematic rollout/update mismatch, so no PPG105. The policy learns (-1250 -> -700)."""
    guard = _fit(TorchRLPPO(TorchRLArgs(env="Pendulum-v1", seed=0, iterations=200)), 0)
    assert guard.findings == [], guard.summary()


def test_healthy_torchrl_cartpole_learns_under_the_guard():
    module = TorchRLPPO(TorchRLArgs(seed=0, iterations=30))
    guard = _fit(module, 0)
    assert guard.findings == []
    recent = module.recent_returns[-20:]
    assert sum(recent) / len(recent) > 100.0, recent  # measured: 191, 184, 165 (seeds 0-2)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("env", ENVS)
def test_healthy_sb3_policy_is_quiet(env, seed):
    guard = _fit(SB3PPO(SB3Args(env=env, seed=seed, iterations=24)), seed)
    assert guard.findings == [] and guard.notices == [], guard.summary()


TORCHRL_FAULTS = [
    ("old_logp_recomputed", "PPG108", 2),
    ("loss_negated", "PPG107", 0),
    ("entropy_sign", "PPG502", 0),
    ("lr_tiny", "PPG204", 0),
    ("actor_not_in_optimizer", "PPG001", 0),
    ("tiny_rewards", "PPG402", 4),
]


@pytest.mark.parametrize("env", ENVS)
@pytest.mark.parametrize(("fault", "code", "deadline"), TORCHRL_FAULTS, ids=[f for f, _, _ in TORCHRL_FAULTS])
def test_torchrl_faults_are_named_through_the_loss_module(fault, code, deadline, env):
    """watch_loss reads ClipPPOLoss's own log-weight, advantages and entropy: each fault with its code within 5
    rollouts, and nothing else (no PPG104 from TorchRL's (B, 1) convention, no PPG301 for a ratio of exactly 1)."""
    guard = _fit(TorchRLPPO(TorchRLArgs(env=env, fault=fault, iterations=deadline + 3)), 0)
    assert [c for c, _, _ in _named(guard)] == [code], guard.summary()
    assert guard.findings[0].rollout <= deadline, _named(guard)


MINIMAL_TORCHRL = {"loss_negated": None, "entropy_sign": None}  # the recomputed copy no loss uses: cannot tell


@pytest.mark.parametrize("env", ENVS)
@pytest.mark.parametrize(("fault", "code", "deadline"), TORCHRL_FAULTS, ids=[f for f, _, _ in TORCHRL_FAULTS])
def test_torchrl_with_the_minimal_call_names_what_it_can_and_says_what_it_cannot(fault, code, deadline, env):
    """observe(new_logp=<a recomputed log-prob>, old_logp=..., advantages=<(B, 1)>): the signs cannot be read from a
    copy no loss uses, and the guard says so once (PPG107's notice) instead of staying silent."""
    guard = _fit(TorchRLPPO(TorchRLArgs(env=env, fault=fault, observe="minimal", iterations=deadline + 3)), 0)
    expected = MINIMAL_TORCHRL.get(fault, code)
    assert [c for c, _, _ in _named(guard)] == ([] if expected is None else [expected]), guard.summary()
    if fault != "actor_not_in_optimizer":  # a root cause explains the rest: no notice then
        assert [n["rule"] for n in guard.notices] == ["PPG107"], guard.notices
        assert "very tensor the loss uses" in guard.notices[0]["message"]


SB3_FAULTS = [
    ("entropy_sign", "PPG502", 0),
    ("ratio_inverted", "PPG107", 0),
    ("old_logp_recomputed", "PPG108", 2),
    ("lr_tiny", "PPG204", 0),
    ("tiny_rewards", "PPG402", 4),
]


@pytest.mark.parametrize("observe", ["full", "minimal"])
@pytest.mark.parametrize("env", ENVS)
@pytest.mark.parametrize(("fault", "code", "deadline"), SB3_FAULTS, ids=[f for f, _, _ in SB3_FAULTS])
def test_sb3_faults_are_named(fault, code, deadline, env, observe):
    """SB3's Distribution wrapper passed as dist= (unwrapped), the entropy evaluate_actions returned; with the minimal
    call the entropy's sign cannot be told (no entropy=), every other fault is named the same."""
    guard = _fit(SB3PPO(SB3Args(env=env, fault=fault, iterations=deadline + 3, observe=observe)), 0)
    if observe == "minimal" and fault == "entropy_sign":
        assert guard.findings == [], guard.summary()
        return
    assert [c for c, _, _ in _named(guard)] == [code], guard.summary()
    assert guard.findings[0].rollout <= deadline, _named(guard)


@pytest.mark.parametrize("observe", ["full", "minimal"])
def test_sb3_log_std_left_out_of_the_optimizer_is_named(observe):
    guard = _fit(SB3PPO(SB3Args(env="Pendulum-v1", fault="log_std_unbound", iterations=3, observe=observe)), 0)
    assert _named(guard) == [("PPG001", "actor", 0)], guard.summary()


@pytest.mark.parametrize("env", ENVS)
def test_healthy_sb3_with_the_minimal_call_is_quiet(env):
    guard = _fit(SB3PPO(SB3Args(env=env, seed=0, iterations=24, observe="minimal")), 0)
    assert guard.findings == [] and guard.notices == [], guard.summary()


def test_watch_loss_refuses_what_is_not_a_torchrl_ppo_loss_and_can_be_removed():
    import torch

    from lightning_ppo_guard.integrations.torchrl import watch_loss

    module = TorchRLPPO(TorchRLArgs(observe="minimal"))
    with pytest.raises(TypeError, match="takes a TorchRL PPO loss"):
        watch_loss(module, torch.nn.Linear(2, 2))
    watch = watch_loss(module, module.loss_module)
    assert "_log_weight" in vars(module.loss_module)
    watch.remove()
    assert "_log_weight" not in vars(module.loss_module) and not module.loss_module._forward_hooks


@pytest.mark.parametrize("loss", ["KLPENPPOLoss", "PPOLoss"])
@pytest.mark.parametrize(("fault", "code"), [(None, None), ("loss_negated", "PPG107"),
                                             ("old_logp_recomputed", "PPG108"), ("entropy_sign", "PPG502")])
def test_watch_loss_reads_every_torchrl_ppo_loss(loss, fault, code):
    """The other members of TorchRL's PPO loss family, read the same way: KLPENPPOLoss (an adaptive KL penalty, no
    clip) and PPOLoss (the plain surrogate)."""
    guard = _fit(TorchRLPPO(TorchRLArgs(loss=loss, fault=fault, iterations=24 if fault is None else 6)), 0)
    assert [c for c, _, _ in _named(guard)] == ([] if code is None else [code]), guard.summary()
    assert guard.notices == []


def test_a_tanh_normal_policy_logs_its_log_std():
    """TorchRL's TanhNormal is a squashed Gaussian: its base Normal's log std is read (and logged) as a Normal's is,
    so PPG504 (a std collapse) can be judged on it."""
    import math

    guard = _fit(TorchRLPPO(TorchRLArgs(env="Pendulum-v1", iterations=3)), 0)
    log_std = guard.last_logged.get("ppo_guard/actor/log_std")
    assert log_std is not None and math.isfinite(log_std) and -3.0 < log_std < 1.0, guard.last_logged
