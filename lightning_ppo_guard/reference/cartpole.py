"""Reference PPO on CartPole-v1, in manual and in automatic Lightning optimization.

CleanRL's ``ppo.py`` written as LightningModules: orthogonal init, GAE(lambda), per-minibatch advantage
normalisation, clipped surrogate, (clipped) value loss, entropy bonus, global grad-norm clipping, Adam with
eps 1e-5, optional linear lr annealing. Actor and critic are separate networks held as ``self.actor`` and
``self.critic``; one Adam optimizer with two param groups (actor ``cfg.lr``, critic ``cfg.critic_lr``)
so both share one grad-clip budget. Every minibatch update calls :func:`lightning_ppo_guard.observe`.

``cfg.fault`` plants one of the user bugs listed in :mod:`lightning_ppo_guard.reference.faults`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import lightning as L
import numpy as np
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import Tensor, nn
from torch.distributions import Categorical
from torch.utils.data import DataLoader, IterableDataset

from lightning_ppo_guard import observe
from lightning_ppo_guard.reference._common import LossTerms, VecCartPole, compute_gae, mlp, ppo_objective
from lightning_ppo_guard.reference.faults import (
    AUTO_FAULTS,
    MANUAL_FAULTS,
    apply_config_fault,
    validate_fault,
)

__all__ = ["Actor", "CartPolePPO", "CartPolePPOAuto", "Critic", "PPOConfig", "RolloutDataset"]

#: Keep this many of the most recent finished episode returns in ``module.recent_returns``.
RECENT_RETURNS = 100


@dataclass
class PPOConfig:
    """Hyperparameters of the reference PPO.

    The defaults (close to rl-baselines3-zoo's tuned CartPole PPO: gamma 0.98, lambda 0.8, many epochs,
    lr 1e-3, no value clipping) reach a return of 500 within ~40-60k steps on every seed tried; the full
    100k-step run takes ~15 s on 2 CPU cores.
    """

    num_envs: int = 8
    num_steps: int = 64
    """Rollout length per environment; one PPO iteration collects ``num_envs * num_steps`` steps."""
    total_timesteps: int = 100_000
    update_epochs: int = 10
    num_minibatches: int = 4
    lr: float = 1e-3
    """Actor learning rate."""
    critic_lr: float = 1e-3
    gamma: float = 0.98
    gae_lambda: float = 0.8
    clip_eps: float = 0.2
    clip_vloss: bool = False
    """CleanRL-style value clipping (same ``clip_eps``); off, as in SB3: with unnormalised returns of ~50
    it caps the critic's progress at 0.2 per iteration."""
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    norm_adv: bool = True
    target_kl: float | None = None
    """SB3-style early stop: end the update phase when a minibatch's approx_kl exceeds this (manual only)."""
    anneal_lr: bool = False
    reward_scale: float = 1.0
    """Multiplies the environment reward before GAE (episode returns are reported unscaled)."""
    hidden: int = 64
    seed: int = 0
    fault: str | None = None
    observe: str = "full"
    """How the module calls :func:`observe`: ``"full"`` (the README's call: clip_eps, dist, entropy, values, returns,
    rollout, target_kl) or ``"minimal"`` (``new_logp``, ``old_logp``, ``advantages``: what a loss has)."""

    def __post_init__(self) -> None:
        if self.observe not in ("full", "minimal"):
            raise ValueError(f"observe must be 'full' or 'minimal', got {self.observe!r}.")

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_iterations(self) -> int:
        return self.total_timesteps // self.batch_size


class Actor(nn.Module):
    """Policy network: observations -> action logits."""

    def __init__(self, obs_dim: int = 4, num_actions: int = 2, hidden: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = mlp(obs_dim, hidden, num_actions, out_std=0.01)
        if dropout:  # after each hidden activation
            layers = list(self.net)
            self.net = nn.Sequential(*layers[:2], nn.Dropout(dropout), *layers[2:4], nn.Dropout(dropout), layers[4])

    def forward(self, obs: Tensor) -> Tensor:
        return self.net(obs)


class Critic(nn.Module):
    """Value network: observations -> V(s), shape ``(batch,)``."""

    def __init__(self, obs_dim: int = 4, hidden: int = 64) -> None:
        super().__init__()
        self.net = mlp(obs_dim, hidden, 1, out_std=1.0)

    def forward(self, obs: Tensor) -> Tensor:
        return self.net(obs).squeeze(-1)


class _CartPolePPOBase(L.LightningModule):
    """Networks, rollout collection, GAE and the per-minibatch PPO loss shared by both modules."""

    supported_faults: frozenset[str] = MANUAL_FAULTS

    def __init__(self, cfg: PPOConfig | None = None) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else PPOConfig()
        validate_fault(cfg.fault, self.supported_faults)
        self.cfg: PPOConfig = apply_config_fault(cfg)
        self.fault: str | None = cfg.fault
        self.obs_dim, self.num_actions = VecCartPole.obs_dim, VecCartPole.num_actions
        with torch.random.fork_rng():  # seeded init without touching the caller's global RNG
            torch.manual_seed(self.cfg.seed)
            dropout = 0.1 if self.fault == "dropout_policy" else 0.0  # planted: dropout in the policy
            self.actor = Actor(self.obs_dim, self.num_actions, self.cfg.hidden, dropout)
            self.critic = Critic(self.obs_dim, self.cfg.hidden)
        self.recent_returns: list[float] = []
        self._pending_returns: list[float] = []
        self._env: VecCartPole | None = None
        self._sampler = torch.Generator().manual_seed(self.cfg.seed)
        self._shuffler = np.random.default_rng(self.cfg.seed)

    # ----------------------------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> Any:
        cfg = self.cfg
        param_groups = [{"params": list(self.critic.parameters()), "lr": cfg.critic_lr, "name": "critic"}]
        if self.fault != "actor_not_in_optimizer":
            param_groups.insert(0, {"params": list(self.actor.parameters()), "lr": cfg.lr, "name": "actor"})
        optimizer = torch.optim.Adam(param_groups, eps=1e-5)
        if not cfg.anneal_lr:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda it: max(0.0, 1.0 - it / max(1, cfg.num_iterations))
        )
        return {"optimizer": optimizer, "lr_scheduler": self._scheduler_config(scheduler)}

    def _scheduler_config(self, scheduler: Any) -> dict[str, Any]:
        return {"scheduler": scheduler, "interval": "epoch"}

    def on_fit_start(self) -> None:
        if self.fault == "actor_replaced":
            # "re-initialise the policy before training": runs after configure_optimizers.
            self.actor = Actor(self.obs_dim, self.num_actions, self.cfg.hidden).to(self.device)

    def on_fit_end(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None

    # ------------------------------------------------------------------------------------- rollout
    def policy(self, obs: Tensor) -> Categorical:
        """The action distribution for ``obs`` (used both in the rollout and in the update)."""
        return self.make_dist(self.actor(obs))

    def make_dist(self, logits: Tensor) -> Categorical:
        if self.fault == "entropy_frozen":
            logits = logits / 1e4  # "temperature" for exploration
        return Categorical(logits=logits)

    @torch.no_grad()
    def collect_rollout(self) -> dict[str, Tensor]:
        """Run the current policy for ``num_steps`` steps; return the flat batch of valid transitions.

        The batch holds ``obs``, ``actions``, ``logp``, ``values``, ``advantages`` and ``returns``
        (dummy auto-reset steps dropped). Finished episode returns go to ``recent_returns``.
        """
        cfg = self.cfg
        if self._env is None:
            self._env = VecCartPole(cfg.num_envs, seed=cfg.seed)
        env, device = self._env, self.device
        shape = (cfg.num_steps, cfg.num_envs)
        # in the module's precision (a "bf16-true" / "64-true" Trainer), also where a DataLoader collects (automatic)
        dtype = cast(torch.dtype, self.dtype)
        obs = torch.zeros((*shape, self.obs_dim), device=device, dtype=dtype)
        actions = torch.zeros(shape, dtype=torch.long, device=device)
        logp, values, rewards = (torch.zeros(shape, device=device, dtype=dtype) for _ in range(3))
        terminated, truncated, valid = (torch.zeros(shape, dtype=torch.bool, device=device) for _ in range(3))

        for t in range(cfg.num_steps):
            obs[t] = torch.as_tensor(env.obs, device=device)
            dist = self.policy(obs[t])
            action = torch.multinomial(dist.probs.cpu(), 1, generator=self._sampler).squeeze(-1)
            actions[t] = action.to(device)
            logp[t] = dist.log_prob(actions[t])
            values[t] = self.critic(obs[t])
            out = env.step(action.numpy())
            rewards[t] = torch.as_tensor(out["reward"], device=device) * cfg.reward_scale
            terminated[t] = torch.as_tensor(out["terminated"], device=device)
            truncated[t] = torch.as_tensor(out["truncated"], device=device)
            valid[t] = torch.as_tensor(out["valid"], device=device)
        next_value = self.critic(torch.as_tensor(env.obs, device=device, dtype=obs.dtype))  # the module's precision

        gamma, lam = cfg.gamma, cfg.gae_lambda
        advantages, returns = compute_gae(rewards, values, next_value, terminated, truncated, gamma, lam)
        finished = env.pop_finished_returns()
        self._pending_returns.extend(finished)
        self.recent_returns = (self.recent_returns + finished)[-RECENT_RETURNS:]

        keep = valid.reshape(-1)
        batch = {
            "obs": obs.reshape(-1, self.obs_dim)[keep],
            "actions": actions.reshape(-1)[keep],
            "logp": logp.reshape(-1)[keep],
            "values": values.reshape(-1)[keep],
            "advantages": advantages.reshape(-1)[keep],
            "returns": returns.reshape(-1)[keep],
        }
        return batch

    def rollout_index(self, index_in_epoch: int) -> int:
        """A PPO iteration number that keeps increasing over Lightning epochs (and a resumed fit)."""
        epoch = self._trainer.current_epoch if self._trainer is not None else 0
        return epoch * self.cfg.num_iterations + index_in_epoch

    def minibatch_indices(self, n: int) -> list[Tensor]:
        """One epoch's shuffled indices over ``n`` samples, in ``num_minibatches`` nearly equal chunks."""
        perm = torch.as_tensor(self._shuffler.permutation(n), device=self.device)
        return list(torch.tensor_split(perm, self.cfg.num_minibatches))

    # -------------------------------------------------------------------------------------- update
    def ppo_losses(self, mb: dict[str, Tensor], rollout: int) -> LossTerms:
        """The PPO loss of one minibatch; hands the policy term to the guard via :func:`observe`."""
        cfg, fault = self.cfg, self.fault
        obs, actions = mb["obs"], mb["actions"]

        if fault == "no_grad_forward":
            with torch.no_grad():
                logits = self.actor(obs)
        elif fault == "detached_logits":
            logits = self.actor(obs).detach()
        else:
            logits = self.actor(obs)
        dist = self.make_dist(logits)
        if fault == "logp_by_hand":
            probs = torch.softmax(logits, dim=-1)
            new_logp = torch.log(probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1))
        else:
            new_logp = dist.log_prob(actions)
        entropy = dist.entropy()

        old_logp = mb["logp"]
        if fault == "old_logp_not_detached":
            old_logp = dist.log_prob(actions)  # "recompute old log-probs for the ratio"
        elif fault == "old_logp_recomputed":
            with torch.no_grad():  # "the old policy's log-probs", taken from the current actor
                old_logp = self.make_dist(self.actor(obs)).log_prob(actions)
        logratio = new_logp - old_logp
        values, returns = self.critic(obs), mb["returns"]
        advantages, terms = ppo_objective(cfg, logratio, mb["advantages"], values, mb["values"], returns, entropy)
        if cfg.observe == "minimal":
            observe(self, new_logp=new_logp, old_logp=old_logp, advantages=advantages)
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
            role="actor",
        )
        return terms

    def log_episode_returns(self) -> None:
        """Log ``train/episode_return`` (mean of the episodes finished since the last call), if any."""
        if self._pending_returns:
            self.log("train/episode_return", float(np.mean(self._pending_returns)))
            self._pending_returns = []

    def log_terms(self, terms: list[LossTerms]) -> None:
        for name in ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction"):
            self.log(f"train/{name}", torch.stack([getattr(t, name) for t in terms]).mean())


class CartPolePPO(_CartPolePPOBase):
    """PPO on CartPole-v1 with MANUAL optimization: one ``training_step`` is one PPO iteration.

    ``train_dataloader`` yields one dummy item (the iteration index) per iteration. Each step collects a
    rollout, then runs ``update_epochs`` x ``num_minibatches`` updates (observe, optional target_kl stop
    before the backward, ``manual_backward``, grad-norm clip, ``step``, ``zero_grad``).
    Use ``Trainer(**trainer_kwargs(module), ...)``.
    """

    def __init__(self, cfg: PPOConfig | None = None) -> None:
        super().__init__(cfg)
        self.automatic_optimization = False

    def train_dataloader(self) -> DataLoader:
        # one batch per PPO iteration: a range is a map-style dataset (len, getitem) to torch, not to its stubs
        return DataLoader(range(self.cfg.num_iterations), batch_size=None)  # type: ignore[arg-type]

    def extra_trainer_kwargs(self) -> dict[str, Any]:
        return {}

    def training_step(self, batch: Any, batch_idx: int) -> None:
        iteration = self.rollout_index(int(batch))
        data = self.collect_rollout()
        terms = self.update(data, iteration)
        if self.cfg.anneal_lr:
            self.lr_schedulers().step()  # type: ignore[union-attr]
        self.log_episode_returns()
        if terms:
            self.log_terms(terms)

    def update(self, data: dict[str, Tensor], iteration: int) -> list[LossTerms]:
        """The PPO update phase of one rollout; returns the terms of the minibatches that were applied."""
        cfg, opt = self.cfg, cast(LightningOptimizer, self.optimizers())  # one optimizer
        applied: list[LossTerms] = []
        for _epoch in range(cfg.update_epochs):
            for idx in self.minibatch_indices(len(data["obs"])):
                terms = self.ppo_losses({k: v[idx] for k, v in data.items()}, rollout=iteration)
                if cfg.target_kl is not None and terms.approx_kl.item() > cfg.target_kl:
                    return applied  # SB3-style early stop, before this minibatch's backward/step
                self.manual_backward(terms.loss)
                if self.fault == "zero_grad_before_step":
                    opt.zero_grad()  # misplaced: clears the gradients the backward just produced
                self.clip_gradients(opt, gradient_clip_val=cfg.max_grad_norm,  # type: ignore[arg-type]  # (as documented)
                                    gradient_clip_algorithm="norm")
                opt.step()
                opt.zero_grad()
                applied.append(terms)
        return applied


class RolloutDataset(IterableDataset):
    """Yields the minibatches of PPO: per iteration, a fresh rollout of the module's current actor,
    shuffled into ``num_minibatches`` minibatches, ``update_epochs`` times.

    Each item is a dict of tensors (``obs``, ``actions``, ``logp``, ``values``, ``advantages``,
    ``returns``) plus ``rollout``, the PPO iteration number as a 0-d tensor.

    ``__len__`` is defined on purpose: with a known length Lightning does not prefetch a batch, so the next
    rollout is collected only after the last update of the current one. Without it, Lightning fetches
    batch ``k + 1`` before running step ``k``, the next rollout is collected one optimizer step early, and
    its ``old_logp`` come from a policy that differs from the one the update starts from.
    """

    def __init__(self, module: _CartPolePPOBase) -> None:
        super().__init__()
        self.module = module
        cfg = module.cfg
        self.num_iterations = cfg.num_iterations
        self.updates_per_iteration = cfg.update_epochs * cfg.num_minibatches

    def __len__(self) -> int:
        return self.num_iterations * self.updates_per_iteration

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        module, cfg = self.module, self.module.cfg
        for iteration in range(self.num_iterations):
            data = module.collect_rollout()
            rollout = torch.tensor(module.rollout_index(iteration))
            for _epoch in range(cfg.update_epochs):
                for idx in module.minibatch_indices(len(data["obs"])):
                    yield {**{k: v[idx] for k, v in data.items()}, "rollout": rollout}


class CartPolePPOAuto(_CartPolePPOBase):
    """PPO on CartPole-v1 with AUTOMATIC optimization: one ``training_step`` is one minibatch update.

    Rollouts come from :class:`RolloutDataset`. Gradient clipping is done by the Trainer: pass
    ``gradient_clip_val=cfg.max_grad_norm, gradient_clip_algorithm="norm"`` (``trainer_kwargs(module)``
    does). There is no target_kl early stop. With ``anneal_lr`` the lr decays once per iteration.
    """

    supported_faults = AUTO_FAULTS

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RolloutDataset(self), batch_size=None)

    def extra_trainer_kwargs(self) -> dict[str, Any]:
        return {"gradient_clip_val": self.cfg.max_grad_norm, "gradient_clip_algorithm": "norm"}

    def _scheduler_config(self, scheduler: Any) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "scheduler": scheduler,
            "interval": "step",
            "frequency": cfg.update_epochs * cfg.num_minibatches,
        }

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        terms = self.ppo_losses(batch, rollout=int(batch["rollout"]))
        self.log_episode_returns()
        self.log_terms([terms])
        return terms.loss
