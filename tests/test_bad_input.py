"""Bad input to observe(): a clear error or warning naming the fix, or a finding; never a crash of a healthy run."""

from __future__ import annotations

import pytest
import torch

import lightning_ppo_guard.reference.cartpole as cartpole
from lightning_ppo_guard import PPOGuard, PPOGuardWarning, observe
from lightning_ppo_guard.reference import CartPolePPO, PPOConfig

from .conftest import fit

PER = PPOConfig().update_epochs * PPOConfig().num_minibatches


def _run(monkeypatch, change, guard=None, quiet=True):
    """Fit one rollout of the reference PPO with its observe() arguments changed by ``change``."""

    def patched(pl_module, **kwargs):
        observe(pl_module, **change(dict(kwargs)))

    monkeypatch.setattr(cartpole, "observe", patched)
    cfg = PPOConfig(seed=0)
    cfg.total_timesteps = cfg.batch_size
    guard = guard or PPOGuard()
    fit(CartPolePPO(cfg), [guard], quiet=quiet)
    return guard


def test_integer_logp_is_a_type_error_naming_the_fix(monkeypatch):
    with pytest.raises(TypeError, match=r"dtype torch.int64.*Pass dist.log_prob\(actions\)"):
        _run(monkeypatch, lambda kw: {**kw, "new_logp": torch.zeros(kw["new_logp"].shape, dtype=torch.long)})


def test_not_a_tensor(monkeypatch):
    with pytest.raises(TypeError, match=r"old_logp must be a torch\.Tensor"):
        _run(monkeypatch, lambda kw: {**kw, "old_logp": kw["old_logp"].tolist()})


def test_mismatched_lengths_are_a_value_error(monkeypatch):
    with pytest.raises(ValueError, match=r"advantages has shape \(\d+,\) .* one value per sample"):
        _run(monkeypatch, lambda kw: {**kw, "advantages": kw["advantages"][:-1]})


def test_broadcasting_shapes_are_a_finding(monkeypatch):
    guard = _run(monkeypatch, lambda kw: {**kw, "advantages": kw["advantages"].unsqueeze(-1)})
    found = [f for f in guard.findings if f.code == "PPG104"]
    assert found, guard.findings
    (b,) = found[0].evidence["logp_shape"]
    assert found[0].evidence["broadcast"] == (b, b) and found[0].evidence["shape"] == (b, 1)


def test_empty_tensors_warn_and_are_skipped(monkeypatch):
    with pytest.warns(PPOGuardWarning, match="empty"):
        guard = _run(monkeypatch, lambda kw: {**kw, "new_logp": kw["new_logp"][:0], "old_logp": kw["old_logp"][:0],
                                              "advantages": None, "values": None, "returns": None}, quiet=False)
    assert guard.observes == 0 and guard.optimizer_steps == PER


def test_nan_logp_is_a_finding_not_a_crash(monkeypatch):
    def nan(kw):
        old = kw["old_logp"].clone()
        old[0] = float("nan")
        return {**kw, "old_logp": old}

    guard = _run(monkeypatch, nan)
    assert "PPG902" in guard.codes() and guard.optimizer_steps == PER


def test_unknown_role_lists_the_roles(monkeypatch):
    with pytest.raises(ValueError, match=r"no actor role has that name; the actor roles are \['actor'\]"):
        _run(monkeypatch, lambda kw: {**kw, "role": "agent_7"})


def test_bad_clip_eps_and_dist(monkeypatch):
    with pytest.raises(ValueError, match="clip_eps must be a positive number"):
        _run(monkeypatch, lambda kw: {**kw, "clip_eps": -0.2})
    with pytest.raises(TypeError, match=r"dist must be a torch\.distributions\.Distribution"):
        _run(monkeypatch, lambda kw: {**kw, "dist": "categorical"})


def test_frozen_actor_is_a_finding_not_a_crash():
    cfg = PPOConfig(seed=0)
    cfg.total_timesteps = cfg.batch_size
    module = CartPolePPO(cfg)
    module.actor.requires_grad_(False)
    guard = PPOGuard()
    fit(module, [guard])
    assert guard.codes() == {"PPG005"}
