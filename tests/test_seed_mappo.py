"""Issue 23: the seed's own situation with the minimal call (:mod:`tests.zoo.seed_mappo`).

Three agents in a ``ModuleDict`` called ``agents``, up to 40 masked candidate actions, a centralised critic, one Adam
under the Trainer's shared grad-norm clip, AUTOMATIC optimization, and ``observe(new_logp, old_logp, advantages,
role=...)`` per agent with no rollout id. A rollout is 16 optimizer steps. The guard must find the roles itself,
name an lr schedule that reaches 0 (PPG003) and unscaled rewards whose critic eats the shared clip (PPG403) within 5
rollouts, say once per agent that it cannot tell the rollout-level rules without ``rollout=`` (a rollout/update
mismatch, PPG105, is named once ``rollout=`` is passed), and stay quiet on healthy fits that learn.
"""

from __future__ import annotations

import csv
import math
import warnings

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_ppo_guard import PPOGuard
from tests.zoo.seed_mappo import AGENTS, SeedMAPPO, SeedMAPPOConfig, trainer_kwargs


def _fit(cfg: SeedMAPPOConfig, tmp_path=None) -> tuple[SeedMAPPO, PPOGuard, list[str]]:
    module, guard = SeedMAPPO(cfg), PPOGuard()
    logger = CSVLogger(str(tmp_path), name="seed") if tmp_path is not None else False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.Trainer(callbacks=[guard], logger=logger, enable_checkpointing=False, **trainer_kwargs()).fit(module)
    return module, guard, [str(w.message) for w in caught if "cannot tell" in str(w.message)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_seed_like_mappo_learns_and_is_quiet(seed, tmp_path):
    module, guard, blind = _fit(SeedMAPPOConfig(seed=seed, iterations=36), tmp_path)
    assert guard.findings == [], guard.summary()
    assert sum(module.hit_rates[-3:]) / 3 > 0.5 > 0.12 > module.hit_rates[0]  # it learns: ~6% -> ~75% hits
    # one "cannot tell" per agent, naming rollout= (never one per step)
    assert sorted((n["role"], n["rule"]) for n in guard.notices) == sorted((a, "rollout=") for a in AGENTS)
    assert len(blind) == len(AGENTS) and all("rollout=" in m for m in blind)
    if seed == 0:  # the logged numbers read as a policy that learns
        with open(next(tmp_path.rglob("metrics.csv"))) as f:
            rows = list(csv.DictReader(f))
        kl = [float(r["ppo_guard/scout/approx_kl"]) for r in rows if r.get("ppo_guard/scout/approx_kl")]
        assert kl and all(math.isfinite(v) for v in kl) and max(kl) > 1e-4


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("fault", "code"), [("lr_to_zero", "PPG003"), ("unscaled_rewards", "PPG403")])
def test_seed_like_mappo_faults_are_named_within_5_rollouts(fault, code, seed):
    module, guard, _ = _fit(SeedMAPPOConfig(seed=seed, fault=fault, iterations=8))
    assert max(module.hit_rates) < 0.12  # the fault is real: the agents never learn
    assert {f.code for f in guard.findings} == {code}, guard.summary()
    first = {f.role: f.step for f in guard.findings}
    assert sorted(first) == sorted(AGENTS)
    assert max(first.values()) < 5 * module.cfg.steps_per_rollout, first


def test_an_agents_container_under_another_name_gets_the_exact_line():
    class Team(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.squad = nn.ModuleDict({a: nn.Linear(4, 40) for a in AGENTS})
            self.critic = nn.Linear(12, 3)

    from lightning_ppo_guard.roles import detect

    with pytest.raises(ValueError, match=r"PPOGuard\(actors='squad', critic='critic'\)"):
        detect(Team())
    team = Team()
    team.agents = team.squad  # the usual name is found on its own
    del team.squad
    found = detect(team)
    assert found.actor == ("agents",) and found.critic == ("critic",)


def test_per_agent_actor_critics_are_not_taken_for_actors():
    class PerAgent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.actor, self.critic = nn.Linear(4, 2), nn.Linear(4, 1)

    class Team(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.agents = nn.ModuleList([PerAgent(), PerAgent()])

    from lightning_ppo_guard.roles import detect

    with pytest.raises(ValueError):  # several actor/critic candidates one level down: the user must name them
        detect(Team())


def test_a_rollout_update_mismatch_needs_rollout_ids_and_says_so_without_them():
    """The update forgets the rollout's action mask: every first ratio of a rollout is off. With ``rollout=`` it is
    PPG105 for each agent at the first rollout read; the minimal call cannot tell, and says so once per agent."""
    with_ids, guard, _ = _fit(SeedMAPPOConfig(seed=0, fault="mask_mismatch", iterations=6, rollout_ids=True))
    assert {f.code for f in guard.findings} == {"PPG105"} and guard.notices == [], guard.summary()
    assert sorted(f.role for f in guard.findings) == sorted(AGENTS)
    assert max(f.step for f in guard.findings) < 2 * with_ids.cfg.steps_per_rollout
    _, blind, said = _fit(SeedMAPPOConfig(seed=0, fault="mask_mismatch", iterations=6))
    assert blind.findings == [] and len(said) == len(AGENTS) and all("PPG105" in m for m in said)


def test_healthy_seed_like_mappo_with_rollout_ids_is_quiet():
    module, guard, said = _fit(SeedMAPPOConfig(seed=1, iterations=24, rollout_ids=True))
    assert guard.findings == [] and guard.notices == [] and said == [], guard.summary()
    assert module.hit_rates[-1] > 0.3
