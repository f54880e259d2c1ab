"""Issue 23: evidence hooks read slices of the tensor the loss uses; where a hook cannot fire, the guard says so once.

The MAPPO here averages ``(B, n_agents)`` log-probs and entropies whole and hands ``observe`` each agent's column
(:mod:`tests.zoo.mappo_stacked`): the sign rules must work on those views from the first measured steps.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_ppo_guard import PPOGuard, PPOGuardWarning
from lightning_ppo_guard.graph import watch_gradient
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
    seen = []
    watch_gradient(view, seen.append)
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


@pytest.mark.parametrize("make", [
    lambda t, m: t[m],
    lambda t, m: t.flatten()[m.flatten()],
    lambda t, m: torch.masked_select(t, m),
    lambda t, m: t.clone()[m],
    lambda t, m: t[m].clone(),
    lambda t, m: t.to(torch.float64)[m],
    lambda t, m: t[m.nonzero(as_tuple=True)],
    lambda t, m: t[:, [0, 2]],
], ids=["mask", "flat-mask", "masked-select", "clone-then-mask", "mask-then-clone", "cast-then-mask",
        "index-tuple", "column-list"])
def test_a_selection_or_copy_reads_its_part_of_the_gradient_of_the_tensor_the_loss_uses(make):
    """Masked tokens ``logp[mask]`` are a new tensor no loss uses: read at the node that made ``logp``."""
    torch.manual_seed(0)
    leaf = torch.randn(6, 4, requires_grad=True)
    used = leaf.log_softmax(-1)  # what the loss uses, a non-leaf
    mask = torch.rand(6, 4) > 0.4
    weight = torch.randn(6, 4)
    copy = make(used, mask)
    seen = []
    watch_gradient(copy, seen.append)
    (used * weight).sum().backward()
    assert len(seen) == 1 and torch.allclose(seen[0].double(), make(weight, mask).double())


def test_a_copy_the_loss_does_not_reach_is_never_read():
    leaf = torch.randn(6, 4, requires_grad=True)
    recomputed = leaf.log_softmax(-1)  # a second forward for observe; the loss uses another
    seen = []
    watch_gradient(recomputed[recomputed > -1.5], seen.append)
    leaf.log_softmax(-1).sum().backward()
    assert seen == []
