"""PPO with the real Stable-Baselines3 ``ActorCriticPolicy`` inside a LightningModule, SB3's loss written as its
``PPO.train`` writes it.

The policy is SB3's own (``MlpPolicy``: a ``mlp_extractor`` with separate policy and value MLPs, ``action_net``,
``value_net``; a ``log_std`` parameter for a Box action space), with the optimizer it builds itself
(``policy.optimizer``, Adam at ``lr_schedule(1)``). Rollouts are stepped by hand from gymnasium vector envs with
``policy(obs)`` (actions, values, log-probs), GAE as SB3's ``RolloutBuffer`` computes it, and the update uses
``policy.evaluate_actions`` (values, log-probs, entropy). Manual optimization: one ``training_step`` is one PPO
iteration.

``SB3Args.observe``: ``"full"`` hands ``observe`` SB3's ``Distribution`` wrapper as ``dist=`` (from
``policy.get_distribution``), the entropy ``evaluate_actions`` returned (the tensor the loss uses), values and
returns; ``"minimal"`` the README's call.

Faults (``SB3Args.fault``): ``"entropy_sign"`` (``loss = policy_loss - ent_coef * entropy_loss``), ``"ratio_inverted"``
(``exp(old - new)``), ``"old_logp_recomputed"`` (``old_logp = log_prob.detach()`` from ``evaluate_actions`` in the
update), ``"lr_tiny"`` (``lr_schedule`` 1e-9), ``"log_std_unbound"`` (Box actions: the optimizer rebuilt without
``policy.log_std``), ``"tiny_rewards"`` (rewards x 1e-5, advantages not normalised).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from lightning_ppo_guard import observe
from tests.zoo.gym_loop import GymLoopPPO

FAULTS = ("entropy_sign", "ratio_inverted", "old_logp_recomputed", "lr_tiny", "log_std_unbound", "tiny_rewards")


@dataclass
class SB3Args:
    env: str = "CartPole-v1"  # or "Pendulum-v1" (DiagGaussian)
    seed: int = 0
    num_envs: int = 8
    num_steps: int = 64
    iterations: int = 8
    epochs: int = 4
    minibatches: int = 4
    lr: float = 3e-4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_range: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    fault: str | None = None
    observe: str = "full"


class SB3PPO(GymLoopPPO):
    """PPO on SB3's ``ActorCriticPolicy`` (see the module docstring)."""

    def __init__(self, args: SB3Args) -> None:
        super().__init__(args.env, args.num_envs, args.iterations, args.seed)
        import gymnasium as gym
        from stable_baselines3.common.policies import ActorCriticPolicy

        if args.fault not in (None, *FAULTS):
            raise ValueError(f"fault must be one of {FAULTS} or None, got {args.fault!r}")
        self.args = args
        probe = gym.make(args.env)
        self.continuous = isinstance(probe.action_space, gym.spaces.Box)
        lr = 1e-9 if args.fault == "lr_tiny" else args.lr
        with torch.random.fork_rng():
            torch.manual_seed(args.seed)
            self.policy = ActorCriticPolicy(probe.observation_space, probe.action_space, lambda _: lr,
                                            net_arch=dict(pi=[64, 64], vf=[64, 64]))
        self.action_space = probe.action_space
        probe.close()

    def configure_optimizers(self) -> Any:
        if self.args.fault == "log_std_unbound":
            params = [p for n, p in self.policy.named_parameters() if n != "log_std"]
            return torch.optim.Adam(params, lr=self.args.lr, eps=1e-5)
        return self.policy.optimizer  # the one SB3 built: Adam over every policy parameter

    @torch.no_grad()
    def collect(self) -> dict[str, torch.Tensor]:
        a = self.args
        T, N = a.num_steps, a.num_envs
        buf: dict[str, list[torch.Tensor]] = {k: [] for k in ("obs", "actions", "logp", "values", "rewards", "dones",
                                                              "next_values")}
        scale = 1e-5 if a.fault == "tiny_rewards" else (0.1 if self.continuous else 1.0)
        for _ in range(T):
            obs = torch.as_tensor(self.env_obs(), dtype=torch.float32)
            actions, values, logp = self.policy(obs)
            env_actions = actions.numpy()
            if self.continuous:
                env_actions = np.clip(env_actions, self.action_space.low, self.action_space.high)
            _, reward, terminated, truncated, final = self.env_step(env_actions)
            reward = reward * scale
            # bootstrap a truncated episode with the value of its final observation (as SB3 does)
            next_values = self.policy.predict_values(torch.as_tensor(final, dtype=torch.float32)).squeeze(-1)
            next_values[torch.as_tensor(terminated)] = 0.0
            for k, v in (("obs", obs), ("actions", actions), ("logp", logp), ("values", values.squeeze(-1)),
                         ("rewards", torch.as_tensor(reward, dtype=torch.float32)),
                         ("dones", torch.as_tensor(terminated | truncated, dtype=torch.float32)),
                         ("next_values", next_values)):
                buf[k].append(v)
        data = {k: torch.stack(v) for k, v in buf.items()}  # (T, N, ...)
        adv = torch.zeros(T, N)
        last = torch.zeros(N)
        for t in reversed(range(T)):
            nonterminal = 1.0 - data["dones"][t]
            delta = data["rewards"][t] + a.gamma * data["next_values"][t] - data["values"][t]
            last = delta + a.gamma * a.gae_lambda * nonterminal * last
            adv[t] = last
        data["advantages"], data["returns"] = adv, adv + data["values"]
        return {k: v.reshape(T * N, *v.shape[2:]) for k, v in data.items() if k not in ("next_values", "rewards")}

    def training_step(self, batch: Any, batch_idx: int) -> None:
        a = self.args
        opt = cast(Any, self.optimizers())
        data = self.collect()
        n = data["obs"].shape[0]
        for _epoch in range(a.epochs):
            perm = torch.as_tensor(self._rng.permutation(n))
            for idx in torch.tensor_split(perm, a.minibatches):
                obs, actions, old_logp = data["obs"][idx], data["actions"][idx], data["logp"][idx]
                values, log_prob, entropy = self.policy.evaluate_actions(obs, actions)
                if a.fault == "old_logp_recomputed":
                    old_logp = log_prob.detach()  # planted: "the old policy's log-prob", from the current one
                values = values.flatten()
                adv = data["advantages"][idx]
                if a.fault != "tiny_rewards":
                    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                ratio = torch.exp(old_logp - log_prob if a.fault == "ratio_inverted" else log_prob - old_logp)
                policy_loss = -torch.min(adv * ratio, adv * torch.clamp(ratio, 1 - a.clip_range, 1 + a.clip_range))
                policy_loss = policy_loss.mean()
                value_loss = torch.nn.functional.mse_loss(data["returns"][idx], values)
                entropy_loss = -torch.mean(entropy)
                sign = -1.0 if a.fault == "entropy_sign" else 1.0
                loss = policy_loss + sign * a.ent_coef * entropy_loss + a.vf_coef * value_loss
                if a.observe == "minimal":
                    observe(self, new_logp=log_prob, old_logp=old_logp, advantages=adv)
                else:
                    observe(self, new_logp=log_prob, old_logp=old_logp, advantages=adv, entropy=entropy,
                            dist=self.policy.get_distribution(obs), values=values, returns=data["returns"][idx],
                            clip_eps=a.clip_range, rollout=int(batch))
                opt.zero_grad()
                self.manual_backward(loss)
                self.clip_gradients(opt, gradient_clip_val=a.max_grad_norm, gradient_clip_algorithm="norm")
                opt.step()
        self.log_returns()
