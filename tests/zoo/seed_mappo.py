"""The seed's own situation: MAPPO with three agents in a ``ModuleDict``, up to 40 masked candidate actions, one
centralised critic, AUTOMATIC optimization (one Adam over everything, the Trainer's shared grad-norm clip) and the
minimal call ``observe(self, new_logp=..., old_logp=..., advantages=..., role=agent)`` per agent, no rollout id.

The task (a contextual bandit unrolled over short episodes, so GAE and a critic matter): at each step every agent
sees a state embedding and a number of valid candidates (4..40); one candidate, a fixed function of the embedding
(the best of the first four under the agent's hidden scorer), pays ``reward_scale``. A random policy hits it ~5% of
the time; a learnt one well over half. The critic sees the agents' joint state and predicts each agent's return.

Faults (``fault=``):
- ``"lr_to_zero"``: the policy groups' linear decay counted in rollouts but stepped per optimizer step (the common
  ``total = num_iterations`` typo with ``interval="step"``): the actors' lr reaches 0 at step ``iterations`` (the
  end of rollout 2 here) and stays there; the critic's group keeps its lr.
- ``"unscaled_rewards"``: the rewards in raw units (a score in thousands: ``reward_scale=1e4``, no value
  normalisation): the value loss is ~1e7, the critic's gradient owns the shared clip (x1e4), and the actors' clipped
  gradient sits far below Adam's eps (the seed's "value_loss 700+, the actor hardly moves"). At ``reward_scale=1e3``
  the actors' clipped gradient starts at half of eps (their steps a third of healthy ones) and falls below a tenth of
  it by rollout 6, where PPG403 is named.
- ``"mask_mismatch"``: the update builds the distribution without the action mask the rollout sampled with (a
  rollout/update mismatch, as a hidden state or an observation normaliser gives): every ratio is off from the first
  minibatch of each rollout. PPG105 reads that first minibatch, so it needs ``rollout=`` (``rollout_ids=True``);
  without it the guard says once per agent that it cannot tell.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.distributions import Categorical
from torch.utils.data import DataLoader, IterableDataset

from lightning_ppo_guard import observe

__all__ = ["FAULTS", "SeedMAPPO", "SeedMAPPOConfig", "trainer_kwargs"]

FAULTS = ("lr_to_zero", "unscaled_rewards", "mask_mismatch")
AGENTS = ("scout", "tank", "medic")  # the ModuleDict's keys (role names in the guard: agent paths)


@dataclass
class SeedMAPPOConfig:
    seed: int = 0
    iterations: int = 12  # rollouts
    num_envs: int = 32
    horizon: int = 8  # steps per episode
    num_steps: int = 16  # steps per rollout and env
    epochs: int = 4
    minibatch: int = 128
    max_actions: int = 40
    min_actions: int = 4
    embed: int = 16
    hidden: int = 64
    lr: float = 1e-3
    clip_eps: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    gamma: float = 0.99
    gae_lambda: float = 0.95
    reward_scale: float = 1.0
    fault: str | None = None
    rollout_ids: bool = False  # observe(..., rollout=...): the seed's minimal call has none

    @property
    def steps_per_rollout(self) -> int:
        return self.epochs * (self.num_envs * self.num_steps // self.minibatch)


class CandidateEnv:
    """``num_envs`` copies for each agent: state embeddings, valid-candidate counts, one paying candidate."""

    def __init__(self, cfg: SeedMAPPOConfig, generator: torch.Generator) -> None:
        self.cfg, self.g = cfg, generator
        n = len(AGENTS)
        self.scorers = torch.randn(n, cfg.embed, cfg.min_actions, generator=generator)  # hidden, per agent
        self.t = torch.zeros(cfg.num_envs, dtype=torch.long)
        self.returns = torch.zeros(cfg.num_envs, n)
        self.finished: list[float] = []
        self._draw()

    def _draw(self) -> None:
        cfg, n = self.cfg, len(AGENTS)
        self.embed = torch.randn(cfg.num_envs, n, cfg.embed, generator=self.g)
        self.valid_n = torch.randint(cfg.min_actions, cfg.max_actions + 1, (cfg.num_envs, n), generator=self.g)

    @property
    def mask(self) -> Tensor:  # (E, n, A): True on the valid candidates
        return torch.arange(self.cfg.max_actions) < self.valid_n[..., None]

    @property
    def obs(self) -> Tensor:  # (E, n, embed + 1): the embedding and the episode's progress
        phase = (self.t.float() / self.cfg.horizon)[:, None, None].expand(-1, len(AGENTS), 1)
        return torch.cat([self.embed, phase], dim=-1)

    def target(self) -> Tensor:
        # the paying candidate is one of the first ``min_actions`` (always valid): which one, the embedding says
        scores = torch.einsum("eni,nia->ena", self.embed, self.scorers[..., :self.cfg.min_actions])
        return scores.argmax(-1)

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor]:
        """Rewards ``(E, n)`` and episode ends ``(E,)``."""
        reward = (actions == self.target()).float() * self.cfg.reward_scale
        self.returns += reward / self.cfg.reward_scale
        self.t += 1
        done = self.t >= self.cfg.horizon
        if done.any():
            self.finished += self.returns[done].mean(-1).tolist()
            self.returns[done] = 0.0
            self.t[done] = 0
        self._draw()
        return reward, done


class Actor(nn.Module):
    def __init__(self, cfg: SeedMAPPOConfig) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(cfg.embed + 1, cfg.hidden), nn.Tanh(), nn.Linear(cfg.hidden, cfg.hidden),
                                  nn.Tanh())
        self.head = nn.Linear(cfg.hidden, cfg.max_actions)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, state_embed: Tensor, mask: Tensor) -> Categorical:
        logits = self.head(self.body(state_embed)).masked_fill(~mask, torch.finfo(torch.float32).min)
        return Categorical(logits=logits)


class Rollouts(IterableDataset):
    """Per iteration: a fresh rollout, then ``epochs`` shuffled passes of minibatches (no rollout id)."""

    def __init__(self, module: SeedMAPPO) -> None:
        super().__init__()
        self.module = module

    def __len__(self) -> int:
        return self.module.cfg.iterations * self.module.cfg.steps_per_rollout

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        m, cfg = self.module, self.module.cfg
        for it in range(cfg.iterations):
            data = m.collect()
            size = len(data["obs"])
            for _ in range(cfg.epochs):
                perm = torch.randperm(size, generator=m.shuffler)
                for start in range(0, size, cfg.minibatch):
                    idx = perm[start:start + cfg.minibatch]
                    yield {**{k: v[idx] for k, v in data.items()}, "rollout": torch.tensor(it)}


class SeedMAPPO(L.LightningModule):
    def __init__(self, cfg: SeedMAPPOConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or SeedMAPPOConfig()
        if cfg.fault not in (None, *FAULTS):
            raise ValueError(f"fault must be one of {FAULTS} or None, got {cfg.fault!r}")
        if cfg.fault == "unscaled_rewards":
            cfg.reward_scale = 1e4
        self.cfg = cfg
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            self.agents = nn.ModuleDict({name: Actor(cfg) for name in AGENTS})
            joint = len(AGENTS) * (cfg.embed + 1)
            self.critic = nn.Sequential(nn.Linear(joint, cfg.hidden), nn.Tanh(), nn.Linear(cfg.hidden, cfg.hidden),
                                        nn.Tanh(), nn.Linear(cfg.hidden, len(AGENTS)))
        self.sampler = torch.Generator().manual_seed(cfg.seed)
        self.shuffler = torch.Generator().manual_seed(cfg.seed + 1)
        self.env = CandidateEnv(cfg, torch.Generator().manual_seed(cfg.seed + 2))
        self.hit_rates: list[float] = []  # per rollout, the share of steps whose candidate paid

    # ----------------------------------------------------------------------------------- setup
    def configure_optimizers(self) -> Any:
        cfg = self.cfg
        groups = [{"params": list(self.agents[name].parameters()), "name": name} for name in AGENTS]
        groups.append({"params": list(self.critic.parameters()), "name": "critic"})
        optimizer = torch.optim.Adam(groups, lr=cfg.lr, eps=1e-5)
        total = cfg.iterations * cfg.steps_per_rollout
        if cfg.fault == "lr_to_zero":
            total = cfg.iterations * 2  # the typo: counted in rollouts (x2 "to be safe"), stepped per minibatch

        def decay(step: int) -> float:
            return max(0.0, 1.0 - step / total)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [decay] * len(AGENTS) + [lambda _: 1.0])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Rollouts(self), batch_size=None)

    # --------------------------------------------------------------------------------- rollout
    @torch.no_grad()
    def collect(self) -> dict[str, Tensor]:
        cfg, env, n = self.cfg, self.env, len(AGENTS)
        obs, masks, actions, logp, values, rewards, dones = [], [], [], [], [], [], []
        for _ in range(cfg.num_steps):
            o, m = env.obs, env.mask
            acts, lps = [], []
            for i, name in enumerate(AGENTS):
                dist = self.agents[name](o[:, i], m[:, i])
                a = torch.multinomial(dist.probs, 1, generator=self.sampler).squeeze(-1)
                acts.append(a)
                lps.append(dist.log_prob(a))
            v = self.critic(o.reshape(cfg.num_envs, -1))
            a = torch.stack(acts, 1)
            r, d = env.step(a)
            obs.append(o), masks.append(m), actions.append(a), logp.append(torch.stack(lps, 1)), values.append(v)
            rewards.append(r), dones.append(d)
        next_value = self.critic(env.obs.reshape(cfg.num_envs, -1))
        adv = torch.zeros(cfg.num_steps, cfg.num_envs, n)
        last = torch.zeros(cfg.num_envs, n)
        for t in reversed(range(cfg.num_steps)):
            nxt = next_value if t == cfg.num_steps - 1 else values[t + 1]
            alive = (~dones[t]).float()[:, None]
            delta = rewards[t] + cfg.gamma * nxt * alive - values[t]
            last = delta + cfg.gamma * cfg.gae_lambda * alive * last
            adv[t] = last
        val = torch.stack(values)
        self.hit_rates.append(float(torch.stack(rewards).gt(0).float().mean()))
        flat = cfg.num_steps * cfg.num_envs
        return {"obs": torch.stack(obs).reshape(flat, n, -1), "mask": torch.stack(masks).reshape(flat, n, -1),
                "actions": torch.stack(actions).reshape(flat, n), "logp": torch.stack(logp).reshape(flat, n),
                "advantages": adv.reshape(flat, n), "returns": (adv + val).reshape(flat, n)}

    # ---------------------------------------------------------------------------------- update
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        cfg = self.cfg
        loss = torch.zeros(())
        rollout_id = int(batch.pop("rollout"))
        rollout = rollout_id if cfg.rollout_ids else None  # the seed's minimal call passes none
        for i, name in enumerate(AGENTS):
            mask = batch["mask"][:, i]
            if cfg.fault == "mask_mismatch":
                mask = torch.ones_like(mask)  # planted: the update forgets the rollout's action mask
            dist = self.agents[name](batch["obs"][:, i], mask)
            new_logp = dist.log_prob(batch["actions"][:, i])
            old_logp = batch["logp"][:, i]
            adv = batch["advantages"][:, i]
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            observe(self, new_logp=new_logp, old_logp=old_logp, advantages=adv, role=name, rollout=rollout)  # minimal
            ratio = (new_logp - old_logp).exp()
            pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps)).mean()
            loss = loss + pg - cfg.ent_coef * dist.entropy().mean()
        value = self.critic(batch["obs"].reshape(len(batch["obs"]), -1))
        loss = loss + cfg.vf_coef * ((value - batch["returns"]) ** 2).mean()
        return loss


def trainer_kwargs(**extra: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "log_every_n_steps": 1,
                              "gradient_clip_val": 0.5, "gradient_clip_algorithm": "norm",
                              "enable_progress_bar": False, "enable_model_summary": False}
    return {**kwargs, **extra}
