"""MAPPO whose loss uses the agents' log-probs and entropies *whole*, observed per agent through slices.

A common MAPPO layout (and the seed's): the agents' logits are stacked into one ``(B, n_agents, A)`` tensor, one
``Categorical`` gives ``new_logp`` and ``entropy`` of shape ``(B, n_agents)``, and the loss averages them whole;
the user hands the guard each agent's column, ``new_logp[:, i]``, ``entropy[:, i]``. Those slices are views no
loss uses, so a hook on them alone would never fire: the guard reads them at their base.

Faults (``fault=``): ``"entropy_sign"`` (the entropy bonus added to the loss: a penalty), ``"ratio_inverted"``
(``ratio = exp(old - new)``: the policy learns backwards). ``observe_copies=True`` hands ``observe`` copies
(``new_logp[:, i].clone()``), which the guard cannot read: it must say so once per rule, not stay silent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch.distributions import Categorical

from lightning_ppo_guard import observe
from lightning_ppo_guard.reference.mappo import MAPPOConfig, MultiCartPoleMAPPO

__all__ = ["StackedMAPPO", "StackedMAPPOConfig"]

FAULTS = ("entropy_sign", "ratio_inverted")


@dataclass
class StackedMAPPOConfig(MAPPOConfig):
    fault_stacked: str | None = None  # one of FAULTS (the reference's own ``fault`` stays None)
    observe_copies: bool = False


class StackedMAPPO(MultiCartPoleMAPPO):
    """The reference MAPPO's rollout and networks, with one stacked loss over all agents."""

    cfg: StackedMAPPOConfig

    def __init__(self, cfg: StackedMAPPOConfig) -> None:
        if cfg.fault_stacked not in (None, *FAULTS):
            raise ValueError(f"fault_stacked must be one of {FAULTS} or None, got {cfg.fault_stacked!r}")
        super().__init__(cfg)

    def stacked_loss(self, data: dict[str, torch.Tensor], idx: torch.Tensor, rollout: int) -> torch.Tensor:
        cfg, n = self.cfg, self.cfg.n_agents
        obs, actions, old_logp = data["obs"][idx], data["actions"][idx], data["logp"][idx]  # (B, n, ...)
        valid = data["valid"][idx].float()  # (B, n): an agent's dummy auto-reset steps weigh 0
        adv = data["advantages"][idx]
        adv = (adv - adv.mean(0)) / (adv.std(0) + 1e-8)  # per agent, over the minibatch
        logits = torch.stack([self.actors[i](obs[:, i]) for i in range(n)], dim=1)  # (B, n, A)
        dist = Categorical(logits=logits)
        new_logp, entropy = dist.log_prob(actions), dist.entropy()  # (B, n) each: the loss uses them whole
        log_ratio = new_logp - old_logp
        if cfg.fault_stacked == "ratio_inverted":
            log_ratio = old_logp - new_logp  # planted: upside down
        ratio = log_ratio.exp()
        surrogate = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps))
        weight = valid / valid.sum().clamp(min=1)
        policy_loss = (surrogate * weight).sum()
        entropy_mean = (entropy * weight).sum()
        values = self.critic(obs.reshape(len(idx), -1))  # (B, n)
        value_loss = 0.5 * (((values - data["returns"][idx]) ** 2) * weight).sum()
        sign = 1.0 if cfg.fault_stacked == "entropy_sign" else -1.0  # planted: + ent_coef * entropy
        loss = policy_loss + sign * cfg.ent_coef * entropy_mean + cfg.vf_coef * value_loss
        for i in range(n):
            lp, ent = new_logp[:, i], entropy[:, i]
            if cfg.observe_copies:
                lp, ent = lp.clone(), ent.clone()  # copies no loss uses: the guard cannot read their gradient
            observe(self, new_logp=lp, old_logp=old_logp[:, i], advantages=adv[:, i], entropy=ent,
                    num_actions=self.num_actions, clip_eps=cfg.clip_eps, rollout=rollout, role=f"agent_{i}")
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> None:
        cfg = self.cfg
        epoch = self._trainer.current_epoch if self._trainer is not None else 0
        iteration = epoch * cfg.num_iterations + int(batch)
        opt = cast(LightningOptimizer, self.optimizers())
        data = self.collect_rollout()
        samples = data["obs"].shape[0]
        for _epoch in range(cfg.update_epochs):
            perm = torch.as_tensor(self._shuffler.permutation(samples), device=self.device)
            for idx in torch.tensor_split(perm, cfg.num_minibatches):
                loss = self.stacked_loss(data, idx, iteration)
                opt.zero_grad()
                self.manual_backward(loss)
                self.clip_gradients(opt, gradient_clip_val=cfg.max_grad_norm,  # type: ignore[arg-type]
                                    gradient_clip_algorithm="norm")
                opt.step()
        self._log([[] for _ in range(cfg.n_agents)])

    def _log(self, per_agent: Any) -> None:
        if any(self._pending_returns):
            finished = [r for returns in self._pending_returns for r in returns]
            self.log("train/episode_return", sum(finished) / len(finished))
            self._pending_returns = [[] for _ in range(self.cfg.n_agents)]
