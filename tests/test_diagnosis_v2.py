"""Diagnosis v2 on real fits: signs read from the backward, the Gaussian std's collapse, rollouts inferred.

The zoo-level expectations (every planted fault of both zoos, full and minimal observe) are in
``tests/test_fault_zoo.py`` and ``tests/test_variants_*.py``; these check the mechanisms themselves.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.zoo import Variant, run_variant
from tests.zoo import cleanrl as C

GAUSS = {"actors": {"actor": ["agent.actor_mean", "agent.actor_logstd"]}, "critic": "agent.critic"}


def test_a_collapsing_gaussian_std_is_named_before_its_log_probs_overflow():
    """A mechanism test, not a zoo variant: a state-dependent log_std head at lr 1e-2 under an entropy penalty of
    1.0, 64 steps per rollout (realistic penalties move Pendulum's log_std by ~0.05 per rollout: a collapse takes
    ~100 rollouts there). The std falls 100x in ~8 rollouts while approx_kl explodes; observe gets dist= only, so
    the penalty's sign (PPG502) cannot be read and the collapse is named by its symptom."""
    args = replace(C.PENDULUM, state_std=True, fault="entropy_sign", ent_coef=1.0, learning_rate=1e-2, num_envs=2,
                   num_steps=128, update_epochs=8, num_minibatches=8)
    variant = Variant("std-collapse", "mechanism", C._maker(C.CleanRLContinuousPPO, args, 12 * 64), guard_kwargs=GAUSS)
    guard, _, _ = run_variant(variant, 0)
    named = {f.code: f for f in guard.findings}
    assert "PPG504" in named, guard.summary()
    assert named["PPG504"].evidence["std_ratio"] < 0.01 and named["PPG504"].step <= 11 * 64
    assert "PPG502" not in named  # dist= only: the entropy tensor of the loss was not handed over
    assert guard.last_logged["ppo_guard/actor/log_std"] < -4.6


@pytest.mark.parametrize("observe", ["full", "dist"])
def test_the_entropy_sign_needs_the_loss_s_own_entropy_tensor(observe):
    """With entropy= (the tensor the loss uses) the penalty is named at the second measured observe; with dist= only
    (its entropy recomputed for observe, not in the loss) the guard cannot tell and says nothing."""
    args = replace(C.CleanRLArgs(), fault="entropy_sign", observe=observe)
    variant = Variant("entropy-sign", "mechanism", C._maker(C.CleanRLPPO, args, 32), guard_kwargs=C.ACTOR)
    guard, _, _ = run_variant(variant, 0)
    if observe == "full":
        assert [(f.code, f.step) for f in guard.findings] == [("PPG502", 1)]
        assert guard.findings[0].evidence["slope"] == pytest.approx(args.ent_coef, rel=1e-4)
    else:
        assert guard.findings == []


@pytest.mark.parametrize("observe", ["full", "minimal"])
def test_first_ratio_names_the_dropout_layers_it_saw_in_train_mode(observe):
    """The reference actor with dropout (p=0.1) in the rollout and the update: PPG105 in the first rollout with
    rollout= (the second of two deviating rollouts), after two batches without it (a batch taken as a rollout), and
    its evidence names the layers."""
    from lightning_ppo_guard import PPOGuard
    from lightning_ppo_guard.reference import CartPolePPO, PPOConfig

    from .conftest import fit

    cfg = PPOConfig(seed=0, fault="dropout_policy", observe=observe)
    cfg.total_timesteps = 4 * cfg.batch_size
    guard = PPOGuard()
    fit(CartPolePPO(cfg), [guard])
    (finding,) = guard.findings
    assert finding.code == "PPG105" and finding.rollout == (1 if observe == "full" else 2)
    assert finding.evidence["train_mode_layers"] == "net.2 (Dropout p=0.1), net.5 (Dropout p=0.1)"


def test_an_optimizer_that_maximizes_flips_the_signs_the_backward_shows():
    """loss = -(PPO loss) with Adam(maximize=True) trains exactly as the usual minimisation: no PPG107 nor PPG502
    (the gradients of the ascended loss have the opposite signs)."""
    import torch

    class Ascending(C.CleanRLPPO):
        def manual_backward(self, loss, *args, **kwargs):
            return super().manual_backward(-loss, *args, **kwargs)

        def configure_optimizers(self):
            return torch.optim.Adam(self.agent.parameters(), lr=self.args.learning_rate, eps=1e-5, maximize=True)

    variant = Variant("ascending", "mechanism", C._maker(Ascending, C.CleanRLArgs(), 64), guard_kwargs=C.ACTOR)
    guard, _, _ = run_variant(variant, 0)
    assert guard.findings == [], guard.summary()
    # and the same module with its entropy bonus added is still named, maximize or not
    variant = Variant("ascending-sign", "mechanism", C._maker(Ascending, C.CleanRLArgs(fault="entropy_sign"), 32),
                      guard_kwargs=C.ACTOR)
    guard, _, _ = run_variant(variant, 0)
    assert [f.code for f in guard.findings] == ["PPG502"]


def test_a_manual_loop_with_one_minibatch_per_batch_is_not_taken_for_rollouts():
    """Manual optimization without rollout ids, one observe and one step per training batch: after two such batches
    the guard stops taking batches for rollouts (no rollout metric, no light check per batch), and a first ratio
    away from 1 on every batch (each batch is a later minibatch of a long rollout) is no PPG105."""
    import lightning as L
    import torch
    from torch.distributions import Categorical
    from torch.utils.data import DataLoader

    from lightning_ppo_guard import PPOGuard, observe

    class OneMinibatchPerBatch(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.actor, self.critic = torch.nn.Linear(4, 2), torch.nn.Linear(4, 1)
            g = torch.Generator().manual_seed(0)
            self.obs, self.act = torch.randn(64, 4, generator=g), torch.randint(0, 2, (64,), generator=g)
            self.adv = torch.randn(64, generator=g)
            with torch.no_grad():
                self.old = Categorical(logits=self.actor(self.obs)).log_prob(self.act) - 0.05  # a later minibatch

        def train_dataloader(self):
            return DataLoader(range(40), batch_size=None)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            new = Categorical(logits=self.actor(self.obs)).log_prob(self.act)
            loss = -(torch.exp(new - self.old) * self.adv).mean() + self.critic(self.obs).pow(2).mean()
            observe(self, new_logp=new, old_logp=self.old, advantages=self.adv)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    guard = PPOGuard(actors="actor", critic="critic")
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1, callbacks=[guard])
    trainer.fit(OneMinibatchPerBatch())
    assert guard.findings == [], guard.summary()
    assert guard.updates_per_rollout == {} and "ppo_guard/actor/updates_per_rollout" not in guard.last_logged
