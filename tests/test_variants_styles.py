"""The user-style variants: a healthy fit raises no finding, a planted fault is named by its deadline.

Each variant is one real ``Trainer.fit`` of :mod:`tests.zoo.styles` (about a second
each). Also: the logged entropy of a multi-categorical policy is the entropy of the whole action, and an actor
held as an ``nn.ModuleList`` of layers is refused at fit start with the fix.
"""

from __future__ import annotations

import dataclasses
import math

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import CSVLogger

from lightning_ppo_guard import PPOGuard
from tests.zoo import run_variant
from tests.zoo.styles import (
    RETURN_TO_REACH,
    VARIANTS,
    LayerListPPO,
    StyleConfig,
    trainer_kwargs,
)

from .conftest import read_csv


def _params():
    return [pytest.param(v, seed, id=f"{v.name}-seed{seed}" if v.slow else v.name,
                         marks=[pytest.mark.slow] if v.slow else [])
            for v in VARIANTS for seed in ((0, 1, 2) if v.slow else (0,))]


def _named(guard):
    return [(f.code, f.role, f.step) for f in guard.findings]


def test_variant_names_are_unique():
    names = [v.name for v in VARIANTS]
    assert len(names) == len(set(names)), names


@pytest.mark.parametrize(("variant", "seed"), _params())
def test_variant(variant, seed):
    guard, trainer, module = run_variant(variant, seed=seed)
    if variant.healthy:
        assert guard.findings == [], f"{variant.name} is healthy ({variant.note}):\n{guard.summary('plain')}"
        if variant.name in RETURN_TO_REACH:  # trained, not merely run
            recent = module.episode_returns[-20:]
            assert sum(recent) / len(recent) >= RETURN_TO_REACH[variant.name], (variant.name, seed, recent)
        return
    deadline = variant.deadline if variant.deadline is not None else trainer.global_step
    assert trainer.global_step >= deadline, "the fit must run past the deadline for the check to mean anything"
    for code, role in sorted(variant.expect):
        steps = [f.step for f in guard.findings if (f.code, f.role) == (code, role)]
        assert steps, f"{variant.name}: expected {code}[{role}], got {_named(guard)}\n{guard.summary('plain')}"
        assert min(steps) <= deadline, f"{variant.name}: {code}[{role}] first at step {min(steps)} > {deadline}"
    others = [f for f in guard.findings if (f.code, f.role) not in variant.expect and f.code not in variant.allowed]
    assert not others, f"{variant.name}: unexpected findings {[(f.code, f.role, f.step) for f in others]}"


def _variant(name):
    return next(v for v in VARIANTS if v.name == name)


def test_multi_categorical_entropy_is_the_entropy_of_the_whole_action(tmp_path):
    """``ppo_guard/actor/entropy`` is the per-sample entropy of the joint action (the sum over the heads), as the
    loss uses it, and ``entropy_norm`` divides it by log of the joint action count (2 x 2 = 4)."""
    variant = _variant("multi-categorical-two-heads")
    trace: list[tuple[int, float]] = []  # (optimizer step, mean whole-action entropy of the minibatch)

    def make(seed):
        module, kwargs = variant.make(seed)
        heads_logp_and_entropy = module.logp_and_entropy

        def recording(dist, action):
            logp, entropy = heads_logp_and_entropy(dist, action)
            if torch.is_grad_enabled():  # the update, not the rollout
                trace.append((module.trainer.global_step, entropy.detach().mean().item()))
            return logp, entropy

        module.logp_and_entropy = recording
        return module, kwargs

    _, trainer, _ = run_variant(dataclasses.replace(variant, make=make), seed=0,
                                logger=CSVLogger(tmp_path, name="multi"), dense_steps=10**6)  # every minibatch
    rows = [r for r in read_csv(trainer.logger.log_dir) if "ppo_guard/actor/entropy" in r]
    assert rows and trace
    start = 0
    for row in sorted(rows, key=lambda r: r["step"]):
        window = [e for s, e in trace if start <= s < row["step"]]  # the observes this row reduces
        start = row["step"]
        assert window, row
        expected = sum(window) / len(window)
        assert row["ppo_guard/actor/entropy"] == pytest.approx(expected, rel=1e-5), row["step"]
        assert row["ppo_guard/actor/entropy_norm"] == pytest.approx(expected / math.log(4), rel=1e-5), row["step"]
    assert rows[0]["ppo_guard/actor/entropy"] > math.log(2) + 0.5  # the sum of two near-uniform heads, ~2 ln 2


def test_actor_as_modulelist_of_layers_is_refused_at_fit_start_with_the_fix():
    """``self.actor = nn.ModuleList([Linear, Tanh, Linear])`` applied in sequence is one actor, not three agents:
    auto-detection must refuse it before training and say how to name it."""
    module = LayerListPPO(StyleConfig(seed=0, iterations=2))
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(**trainer_kwargs(module), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[PPOGuard(verbose=False)])
    with pytest.raises((ValueError, MisconfigurationException)) as info:
        trainer.fit(module)
    assert trainer.global_step == 0
    message = str(info.value)
    assert "actor" in message and ("actors=" in message or "Sequential" in message), message
