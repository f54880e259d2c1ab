"""Reference MAPPO: ``n_agents`` independent CartPole batches, per-agent actors, one centralised critic.

Agent ``i`` controls its own vectorised CartPole (``num_envs`` copies). Environment copy ``j`` of every
agent forms one joint state: the centralised critic sees the concatenated observations of all agents and
outputs one value per agent. Each agent has its own PPO policy loss (own advantages, own clip), the
losses are summed with the critic's, and one Adam optimizer over all actors and the critic takes one
step per minibatch (manual optimization, shared grad-norm clip). ``observe(..., role=f"agent_{i}")`` is
called per agent per minibatch.

``cfg.fault="agent_unbound"`` leaves agent 2's actor out of the optimizer; ``"detached_logits"`` detaches every
agent's logits in the update.

Under DDP (``Trainer(strategy="ddp", devices=n)``) every rank collects the same rollout (same seeds, and DDP
keeps the weights identical) and trains on its ``1/n`` share of every minibatch; advantages are normalised
over the whole minibatch first. With ``cfg.minibatch_multiple`` a multiple of ``n`` the shares are equal,
so DDP's averaged gradient is the one-process gradient of the same minibatch (``tests/test_ddp.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import lightning as L
import numpy as np
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import Tensor, nn
from torch.distributions import Categorical
from torch.utils.data import DataLoader

from lightning_ppo_guard import observe
from lightning_ppo_guard.reference._common import (
    LossTerms,
    VecCartPole,
    compute_gae,
    mlp,
    normalize_advantages,
    ppo_objective,
)
from lightning_ppo_guard.reference.cartpole import RECENT_RETURNS, Actor, PPOConfig
from lightning_ppo_guard.reference.faults import MAPPO_FAULTS, apply_config_fault, validate_fault

__all__ = ["CentralCritic", "MAPPOConfig", "MultiCartPoleMAPPO", "ShardedMAPPO"]

#: The agent whose actor the ``agent_unbound`` fault leaves out of the optimizer.
UNBOUND_AGENT = 2


@dataclass
class MAPPOConfig(PPOConfig):
    """:class:`PPOConfig` plus the number of agents; ``num_envs`` and ``total_timesteps`` are per agent.

    With the defaults every agent goes from ~20 to ~350-500 in 60k steps (~30 s on 2 CPU cores).
    """

    total_timesteps: int = 60_000
    n_agents: int = 3
    minibatch_multiple: int = 1
    """Trim every minibatch to a multiple of this many samples. Under DDP each rank trains on its share of
    each minibatch; a multiple of the world size makes the shares equal (the one-process run then computes
    the same averaged gradient)."""
    share_actor: bool = False
    """Parameter sharing: one actor (``self.actor``) acts for every agent; the guard sees one role, ``actor``,
    fed by every agent's ``observe``."""


class CentralCritic(nn.Module):
    """Centralised value network: joint obs ``(batch, n_agents * obs_dim)`` -> ``(batch, n_agents)``."""

    def __init__(self, obs_dim: int, n_agents: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = mlp(obs_dim * n_agents, hidden, n_agents, out_std=1.0)

    def forward(self, joint_obs: Tensor) -> Tensor:
        return self.net(joint_obs)


class MultiCartPoleMAPPO(L.LightningModule):
    """MAPPO on ``n_agents`` CartPole batches with MANUAL optimization (one ``training_step`` per iteration).

    Attributes:
        actors: one :class:`Actor` per agent (``nn.ModuleList``).
        critic: the :class:`CentralCritic`.
        recent_returns: per agent, the most recent finished episode returns.
    """

    def __init__(self, cfg: MAPPOConfig | None = None) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else MAPPOConfig()
        validate_fault(cfg.fault, MAPPO_FAULTS)
        if cfg.fault == "agent_unbound" and cfg.n_agents <= UNBOUND_AGENT:
            raise ValueError(f"fault 'agent_unbound' needs n_agents > {UNBOUND_AGENT}, got {cfg.n_agents}.")
        self.cfg: MAPPOConfig = apply_config_fault(cfg)
        self.fault: str | None = cfg.fault
        self.automatic_optimization = False
        self.obs_dim, self.num_actions = VecCartPole.obs_dim, VecCartPole.num_actions
        with torch.random.fork_rng():  # seeded init without touching the caller's global RNG
            torch.manual_seed(self.cfg.seed)
            if self.cfg.share_actor:
                self.actor = Actor(self.obs_dim, self.num_actions, self.cfg.hidden)
                self.actors = nn.ModuleList([self.actor] * self.cfg.n_agents)  # the same module for every agent
            else:
                self.actors = nn.ModuleList(
                    Actor(self.obs_dim, self.num_actions, self.cfg.hidden) for _ in range(self.cfg.n_agents)
                )
            self.critic = CentralCritic(self.obs_dim, self.cfg.n_agents, self.cfg.hidden)
        self.recent_returns: list[list[float]] = [[] for _ in range(self.cfg.n_agents)]
        self._pending_returns: list[list[float]] = [[] for _ in range(self.cfg.n_agents)]
        self._envs: list[VecCartPole] | None = None
        self._sampler = torch.Generator().manual_seed(self.cfg.seed)
        self._shuffler = np.random.default_rng(self.cfg.seed)

    # ----------------------------------------------------------------------------------- setup
    def configure_optimizers(self) -> Any:
        cfg = self.cfg
        param_groups = [
            {"params": list(actor.parameters()), "lr": cfg.lr, "name": f"agent_{i}"}
            for i, actor in enumerate(self.actors)
            if not (self.fault == "agent_unbound" and i == UNBOUND_AGENT)
        ] if not cfg.share_actor else [{"params": list(self.actor.parameters()), "lr": cfg.lr, "name": "actor"}]
        param_groups.append({"params": list(self.critic.parameters()), "lr": cfg.critic_lr, "name": "critic"})
        optimizer = torch.optim.Adam(param_groups, eps=1e-5)
        if not cfg.anneal_lr:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda it: max(0.0, 1.0 - it / max(1, cfg.num_iterations))
        )
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def train_dataloader(self) -> DataLoader:
        # one batch per PPO iteration: a range is a map-style dataset (len, getitem) to torch, not to its stubs
        return DataLoader(range(self.cfg.num_iterations), batch_size=None)  # type: ignore[arg-type]

    def extra_trainer_kwargs(self) -> dict[str, Any]:
        return {}

    def on_fit_end(self) -> None:
        for env in self._envs or []:
            env.close()
        self._envs = None

    # --------------------------------------------------------------------------------- rollout
    @torch.no_grad()
    def collect_rollout(self) -> dict[str, Tensor]:
        """Run all agents for ``num_steps`` steps; return flat ``(T * num_envs, n_agents, ...)`` tensors.

        Keys: ``obs`` (per-agent observations), ``actions``, ``logp``, ``values``, ``advantages``,
        ``returns`` and ``valid`` (False on an agent's dummy auto-reset steps).
        """
        cfg, device = self.cfg, self.device
        n_agents, num_envs = cfg.n_agents, cfg.num_envs
        if self._envs is None:
            self._envs = [VecCartPole(num_envs, seed=cfg.seed * 100 + i) for i in range(n_agents)]
        envs = self._envs
        shape = (cfg.num_steps, num_envs, n_agents)
        dtype = cast(torch.dtype, self.dtype)  # the module's precision ("bf16-true", "64-true")
        obs = torch.zeros((*shape, self.obs_dim), device=device, dtype=dtype)
        actions = torch.zeros(shape, dtype=torch.long, device=device)
        logp, values, rewards = (torch.zeros(shape, device=device, dtype=dtype) for _ in range(3))
        terminated, truncated, valid = (torch.zeros(shape, dtype=torch.bool, device=device) for _ in range(3))

        for t in range(cfg.num_steps):
            obs[t] = torch.as_tensor(np.stack([env.obs for env in envs], axis=1), device=device)
            values[t] = self.critic(obs[t].reshape(num_envs, -1))
            for i, (actor, env) in enumerate(zip(self.actors, envs, strict=True)):
                dist = Categorical(logits=actor(obs[t, :, i]))
                action = torch.multinomial(dist.probs.cpu(), 1, generator=self._sampler).squeeze(-1)
                actions[t, :, i] = action.to(device)
                logp[t, :, i] = dist.log_prob(actions[t, :, i])
                out = env.step(action.numpy())
                rewards[t, :, i] = torch.as_tensor(out["reward"], device=device) * cfg.reward_scale
                terminated[t, :, i] = torch.as_tensor(out["terminated"], device=device)
                truncated[t, :, i] = torch.as_tensor(out["truncated"], device=device)
                valid[t, :, i] = torch.as_tensor(out["valid"], device=device)
        next_obs = torch.as_tensor(np.stack([env.obs for env in envs], axis=1), device=device, dtype=obs.dtype)
        next_value = self.critic(next_obs.reshape(num_envs, -1))

        gamma, lam = cfg.gamma, cfg.gae_lambda
        advantages, returns = compute_gae(rewards, values, next_value, terminated, truncated, gamma, lam)
        for i, env in enumerate(envs):
            finished = env.pop_finished_returns()
            self._pending_returns[i].extend(finished)
            self.recent_returns[i] = (self.recent_returns[i] + finished)[-RECENT_RETURNS:]

        flat = cfg.num_steps * num_envs
        return {
            "obs": obs.reshape(flat, n_agents, self.obs_dim),
            "actions": actions.reshape(flat, n_agents),
            "logp": logp.reshape(flat, n_agents),
            "values": values.reshape(flat, n_agents),
            "advantages": advantages.reshape(flat, n_agents),
            "returns": returns.reshape(flat, n_agents),
            "valid": valid.reshape(flat, n_agents),
        }

    # ---------------------------------------------------------------------------------- update
    def agent_losses(self, data: dict[str, Tensor], agent: int, idx: Tensor, rollout: int) -> LossTerms:
        """PPO loss of ``agent`` on the flat samples ``idx``; hands the policy term to :func:`observe`."""
        cfg = self.cfg
        advantages = data["advantages"][idx, agent]
        if cfg.norm_adv and advantages.numel() > 1:
            advantages = normalize_advantages(advantages)  # over the whole minibatch, before it is sharded
        idx, advantages = self.rank_share(idx), self.rank_share(advantages)
        obs = data["obs"][idx]  # (B, n_agents, obs_dim)
        actions, old_logp = data["actions"][idx, agent], data["logp"][idx, agent]

        logits = self.actors[agent](obs[:, agent])
        if self.fault == "detached_logits":
            logits = logits.detach()  # planted: no policy gradient
        dist = Categorical(logits=logits)
        new_logp = dist.log_prob(actions)
        entropy = dist.entropy()
        logratio = new_logp - old_logp
        values = self.critic(obs.reshape(len(idx), -1))[:, agent]
        old_values, returns = data["values"][idx, agent], data["returns"][idx, agent]
        advantages, terms = ppo_objective(cfg, logratio, advantages, values, old_values, returns, entropy,
                                          norm_adv=False)
        role = "actor" if cfg.share_actor else f"agent_{agent}"
        if cfg.observe == "minimal":
            observe(self, new_logp=new_logp, old_logp=old_logp, advantages=advantages, role=role)
            return terms
        observe(
            self,
            new_logp=new_logp,
            old_logp=old_logp,
            advantages=advantages,
            clip_eps=cfg.clip_eps,
            dist=dist,
            entropy=entropy,
            values=values,
            returns=returns,
            rollout=rollout,
            target_kl=cfg.target_kl,
            role=role,
        )
        return terms

    def rank_share(self, t: Tensor) -> Tensor:
        """This rank's contiguous share of a minibatch tensor under DDP (the whole tensor in one process)."""
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return t
        return t.tensor_split(trainer.world_size)[trainer.global_rank]

    def training_step(self, batch: Any, batch_idx: int) -> None:
        cfg = self.cfg
        epoch = self._trainer.current_epoch if self._trainer is not None else 0
        iteration = epoch * cfg.num_iterations + int(batch)  # keeps increasing over epochs
        opt = cast(LightningOptimizer, self.optimizers())  # one optimizer
        data = self.collect_rollout()

        per_agent: list[list[LossTerms]] = [[] for _ in range(cfg.n_agents)]
        for _epoch in range(cfg.update_epochs):
            # each agent shuffles its own valid samples into num_minibatches chunks
            chunks = []
            for agent in range(cfg.n_agents):
                valid_idx = torch.nonzero(data["valid"][:, agent]).squeeze(-1)
                order = torch.as_tensor(self._shuffler.permutation(len(valid_idx)), device=self.device)
                perm = valid_idx[order]
                m = cfg.minibatch_multiple
                chunks.append([c[: len(c) - len(c) % m] for c in torch.tensor_split(perm, cfg.num_minibatches)])
            for k in range(cfg.num_minibatches):
                terms = [self.agent_losses(data, a, chunks[a][k], iteration) for a in range(cfg.n_agents)]
                loss = torch.stack([t.loss for t in terms]).sum()
                self.manual_backward(loss)
                self.clip_gradients(opt, gradient_clip_val=cfg.max_grad_norm,  # type: ignore[arg-type]  # (as documented)
                                    gradient_clip_algorithm="norm")
                opt.step()
                opt.zero_grad()
                for agent, t in enumerate(terms):
                    per_agent[agent].append(t)

        if cfg.anneal_lr:
            self.lr_schedulers().step()  # type: ignore[union-attr]
        self._log(per_agent)

    def _log(self, per_agent: list[list[LossTerms]]) -> None:
        if any(self._pending_returns):
            all_finished = [r for returns in self._pending_returns for r in returns]
            self.log("train/episode_return", float(np.mean(all_finished)))
        for agent, terms in enumerate(per_agent):
            if self._pending_returns[agent]:
                self.log(f"train/agent_{agent}/episode_return", float(np.mean(self._pending_returns[agent])))
                self._pending_returns[agent] = []
            for name in ("policy_loss", "entropy", "approx_kl", "clip_fraction"):
                self.log(f"train/agent_{agent}/{name}", torch.stack([getattr(t, name) for t in terms]).mean())
        value_losses = [t.value_loss for terms in per_agent for t in terms]
        self.log("train/value_loss", torch.stack(value_losses).mean())


class ShardedMAPPO(MultiCartPoleMAPPO):
    """The reference MAPPO with each actor and the critic sharded by FSDP2 (``fully_shard`` in ``configure_model``)
    when the Trainer gives a device mesh: ``Trainer(strategy=ModelParallelStrategy(data_parallel_size=n,
    tensor_parallel_size=1), use_distributed_sampler=False)``. Parameters and gradients are then ``DTensor``
    shards; without a mesh it is :class:`MultiCartPoleMAPPO`."""

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for actor in self.actors:
            fully_shard(actor, mesh=mesh)
        fully_shard(self.critic, mesh=mesh)
