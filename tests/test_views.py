"""Issue 23: evidence hooks read slices of the tensor the loss uses; where a hook cannot fire, the guard says so once.

The MAPPO here averages ``(B, n_agents)`` log-probs and entropies whole and hands ``observe`` each agent's column
(:mod:`tests.zoo.mappo_stacked`): the sign rules must work on those views from the first measured steps.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_ppo_guard import PPOGuard, PPOGuardWarning
from lightning_ppo_guard.diagnostics import hook_point
from tests.zoo.mappo_stacked import StackedMAPPO, StackedMAPPOConfig

from .conftest import fit

AGENTS = {"agent_0", "agent_1", "agent_2"}


def _fit(iterations=3, **kw):
    cfg = StackedMAPPOConfig(seed=0, **kw)
    cfg.total_timesteps = iterations * cfg.num_envs * cfg.num_steps
    guard = PPOGuard()
    fit(StackedMAPPO(cfg), [guard])
    return guard


@pytest.mark.parametrize(("fault", "code"), [("entropy_sign", "PPG502"), ("ratio_inverted", "PPG107")])
def test_a_sign_error_is_named_for_every_agent_through_its_slice(fault, code):
    guard = _fit(fault_stacked=fault)
    named = {f.role: f for f in guard.findings if f.code == code}
    assert set(named) == AGENTS, guard.summary()
    assert all(f.rollout == 0 and f.step <= 4 for f in named.values()), guard.summary()  # the first measured steps
    assert guard.notices == []


def test_healthy_stacked_mappo_is_quiet_and_reads_every_hook():
    guard = _fit()
    assert guard.findings == [] and guard.notices == [], guard.summary()


def test_copies_no_loss_uses_say_once_per_rule_that_the_sign_cannot_be_read():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = StackedMAPPOConfig(seed=0, fault_stacked="entropy_sign", observe_copies=True)
        cfg.total_timesteps = 3 * cfg.num_envs * cfg.num_steps
        guard = PPOGuard()
        fit(StackedMAPPO(cfg), [guard], quiet=False)
    assert "PPG502" not in guard.codes()  # blind to it ...
    rules = sorted((n["role"], n["rule"]) for n in guard.notices)
    assert rules == sorted((a, r) for a in AGENTS for r in ("PPG107", "PPG502")), rules  # ... and says so, once
    blind = [str(w.message) for w in caught if issubclass(w.category, PPOGuardWarning) and "cannot tell" in
             str(w.message)]
    assert len(blind) == 6 and all("Pass" in m for m in blind), blind
    assert "new_logp[mask]" in guard.notices[0]["message"] or "entropy" in guard.notices[0]["message"]


@pytest.mark.parametrize("make", [
    lambda t: t[:, 1],
    lambda t: t[2:7, 0],
    lambda t: t.t()[1],
    lambda t: t.reshape(-1)[3:11],
    lambda t: t.unsqueeze(-1)[:, 2],
    lambda t: t[:, ::2][:, 1],
], ids=["column", "block", "transposed-row", "flat-range", "unsqueezed", "strided"])
def test_a_view_reads_its_part_of_its_base_gradient(make):
    base = torch.randn(8, 3, requires_grad=True)
    leaf_grad = torch.randn(8, 3)
    view = make(base * 1.0)  # a non-leaf, as new_logp is
    target, part = hook_point(view)
    seen = []
    target.register_hook(lambda g: seen.append(part(g)))
    # the loss uses the whole base tensor, never the view
    (view._base * leaf_grad).sum().backward()
    expected = make(leaf_grad)
    assert len(seen) == 1 and torch.equal(seen[0], expected)


def test_automatic_optimization_without_rollout_ids_says_once_what_it_cannot_judge():
    """The reference automatic module with the minimal call: old log-probs recomputed from the current policy
    (PPG108) cannot be told in windows of observes, and the guard says so once, naming rollout=."""
    from lightning_ppo_guard.reference import CartPolePPOAuto, PPOConfig

    cfg = PPOConfig(seed=0, fault="old_logp_recomputed", observe="minimal")
    cfg.total_timesteps = 4 * cfg.batch_size
    guard = PPOGuard()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(CartPolePPOAuto(cfg), [guard], quiet=False)
    assert guard.findings == [], guard.summary()
    assert [(n["role"], n["rule"]) for n in guard.notices] == [("actor", "rollout=")]
    assert "PPG108" in guard.notices[0]["message"] and "Pass rollout=" in guard.notices[0]["message"]
    assert sum("cannot tell [rollout=" in str(w.message) for w in caught) == 1
    # with rollout ids (the full call) it is named, and nothing is said about rollouts
    cfg = PPOConfig(seed=0, fault="old_logp_recomputed")
    cfg.total_timesteps = 4 * cfg.batch_size
    guard = PPOGuard()
    fit(CartPolePPOAuto(cfg), [guard])
    assert guard.codes() == {"PPG108"} and guard.notices == []
