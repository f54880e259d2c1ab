"""The shared-trunk role: the heads' gradients into the trunk (exact against autograd), logged per step,
PPG404 from the rules, and what a fit with auto-detected roles logs and says."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_ppo_guard._trunk import POLICY, VALUE, TrunkProbe
from lightning_ppo_guard.rules import Diagnoser, StepFacts
from tests.zoo import run_variant
from tests.zoo.cleanrl import VARIANTS

from .conftest import read_csv

BY_NAME = {v.name: v for v in VARIANTS}


class Trunked(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 16), nn.Tanh())
        self.pi = nn.Linear(16, 3)
        self.v = nn.Linear(16, 1)


def _losses(net, obs, *, twice=False, between=None):
    """A PPO-like loss: a policy term through ``pi`` and a value term through ``v`` (with ``twice`` each head reads
    its own forward of the trunk, as CleanRL's ``get_value``/``get_dist`` do; ``between`` is applied to the trunk's
    output before the heads)."""
    h = net.trunk(obs)
    h2 = net.trunk(obs) if twice else h
    if between is not None:
        h, h2 = between(h), between(h2)
    logp = torch.log_softmax(net.pi(h), -1)[:, 0]
    policy = -(logp * torch.linspace(-1, 1, len(obs))).mean()
    value = 37.0 * (net.v(h2).squeeze(-1) - 5.0).pow(2).mean()
    return policy, value, (h, h2)


@pytest.mark.parametrize("twice", [False, True])
@pytest.mark.parametrize("between", [None, torch.relu, lambda t: t.flatten(1)])
def test_the_heads_gradients_into_the_trunk_are_exact(twice, between):
    torch.manual_seed(0)
    net, obs = Trunked(), torch.randn(32, 4)
    # the truth: each term's gradient with respect to the tensor its head read
    policy, value, (h, h2) = _losses(net, obs, twice=twice, between=between)
    g_pi = torch.autograd.grad(policy, h, retain_graph=True)[0]
    g_v = torch.autograd.grad(value, h2)[0]
    probe = TrunkProbe([net.trunk], [(POLICY, net.pi), (VALUE, net.v)], lambda: True, torch.device("cpu"))
    policy, value, _ = _losses(net, obs, twice=twice, between=between)
    (policy + value).backward()
    norms, both = probe.read()
    assert both
    assert norms.tolist() == pytest.approx([float(g_pi.norm()), float(g_v.norm())], rel=1e-5)
    # the trunk's own gradient is untouched by the hooks: the same as without them
    probe.close()
    with_hooks = [p.grad.clone() for p in net.trunk.parameters()]
    net.zero_grad()
    policy, value, _ = _losses(net, obs, twice=twice, between=between)
    (policy + value).backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(with_hooks, net.trunk.parameters(), strict=True))


def test_the_probe_measures_nothing_unarmed_or_without_grad_and_says_so():
    net, obs = Trunked(), torch.randn(8, 4)
    armed = {"on": False}
    probe = TrunkProbe([net.trunk], [(POLICY, net.pi), (VALUE, net.v)], lambda: armed["on"], torch.device("cpu"))
    sum(_losses(net, obs)[:2]).backward()
    assert probe.read()[1] is False  # not armed: no hook, nothing claimed
    armed["on"] = True
    with torch.no_grad():
        _losses(net, obs)
    assert probe.read()[1] is False
    # a head whose input is not the trunk's output (two ops away) is not measured: absent, not 0
    h = net.trunk(obs)
    net.pi(torch.tanh(h * 2.0)).sum().backward(retain_graph=True)
    assert probe.read()[1] is False


def test_ppg404_needs_the_value_term_to_own_the_trunk_rollout_after_rollout():
    def run(ratios, per_rollout=4):
        d, found = Diagnoser(), []
        for i, r in enumerate(ratios):
            facts = StepFacts(grad_norm=1.0, grad_norm_clipped=1.0, clip_coef=1.0, nonzero_frac=1.0, grad_none=0,
                              trainable_tensors=4, nonfinite=0.0, update_norm=1e-3, update_ratio=1e-3, binding=1.0,
                              lr=1e-3, segment=i // per_rollout, policy=False, head_ratio=r)
            found += d.check_step("shared", i, facts)
        return found

    assert run([5e3] * 16) == []  # four rollouts dominated: not yet
    found = run([5e3] * 17)  # the fifth rollout's first measured step
    assert [f.code for f in found] == ["PPG404"] and found[0].evidence["rollouts"] == 5
    assert run([5e3] * 12 + [50.0] * 4 + [5e3] * 12) == []  # one healthy rollout breaks the streak
    assert run([200.0] * 40) == []  # the value term larger, but not owning the trunk
    assert run([math.nan] * 40) == []  # not measured: no evidence


def test_a_shared_trunk_fit_logs_the_heads_shares_and_names_the_roles_once(tmp_path, caplog):
    logger = CSVLogger(tmp_path, name="run")
    with caplog.at_level(logging.INFO):
        guard, _, _ = run_variant(BY_NAME["cleanrl-trunk"], 0, logger=logger)
    lines = [r.getMessage() for r in caplog.records if "roles, auto-detected" in r.getMessage()]
    assert lines == ["PPOGuard roles, auto-detected: PPOGuard(actors='agent.actor', critic='agent.critic', "
                     "shared='agent.network')"]
    assert [(r.name, r.kind) for r in guard.roles] == [("actor", "actor"), ("critic", "critic"), ("shared", "shared")]
    rows = [r for r in read_csv(logger.log_dir) if "ppo_guard/shared/head_grad_policy" in r]
    assert len(rows) >= 5
    for r in rows:
        p, v, share = (r[f"ppo_guard/shared/{k}"] for k in ("head_grad_policy", "head_grad_value", "value_grad_share"))
        assert p > 0 and v >= 0 and 0 <= share <= 1
        if len(rows) and r["step"] > 16:  # one measured step per row after the dense start: the share is exact
            assert share == pytest.approx(v / (p + v), rel=1e-4)
        assert r["ppo_guard/shared/update_ratio"] > 0 and r["ppo_guard/shared/binding"] == 1.0
    assert not any(k.startswith("ppo_guard/actor/head_") for r in rows for k in r)
    assert guard.findings == []
