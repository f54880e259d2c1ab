"""Pieces shared by the reference PPO modules: layer init, the vectorised CartPole, GAE, Trainer kwargs.

The environment is Gymnasium's numpy-vectorised ``CartPoleVectorEnv`` (``vector_entry_point``), which
auto-resets with ``AutoresetMode.NEXT_STEP``: the step *after* an episode ends is a dummy transition
(the action is ignored, the reward is 0, the returned observation is the new episode's first one).
:class:`VecCartPole` marks those dummy steps with ``valid=False`` so the update can drop them, and
:func:`compute_gae` cuts the advantage recursion at every episode end. Because the observation
returned on the ending step is the real final observation, a time-limit truncation is bootstrapped
with the value of that observation (CleanRL does not bootstrap truncations; here it costs nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn


def gymnasium() -> Any:
    """The ``gymnasium`` module, imported when an environment is built: it is the ``demo`` extra, not a
    dependency, so importing the package (or the reference modules) never needs it."""
    try:
        import gymnasium as gym
    except ImportError as err:  # tests/test_bad_input.py blocks the import to check this message
        raise ImportError(
            "The reference PPO modules step Gymnasium's CartPole: install the demo extra, "
            'pip install "lightning_ppo_guard[demo]" (or pip install gymnasium).') from err
    return gym

__all__ = [
    "LossTerms",
    "VecCartPole",
    "compute_gae",
    "layer_init",
    "mlp",
    "normalize_advantages",
    "ppo_objective",
    "trainer_kwargs",
]


def layer_init(layer: nn.Linear, std: float = math.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    """Orthogonal weight init with gain ``std`` and a constant bias, as in CleanRL."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


def mlp(in_dim: int, hidden: int, out_dim: int, out_std: float) -> nn.Sequential:
    """Two tanh hidden layers (orthogonal init, gain sqrt(2)) and a linear head with gain ``out_std``."""
    return nn.Sequential(
        layer_init(nn.Linear(in_dim, hidden)),
        nn.Tanh(),
        layer_init(nn.Linear(hidden, hidden)),
        nn.Tanh(),
        layer_init(nn.Linear(hidden, out_dim), std=out_std),
    )


class VecCartPole:
    """``num_envs`` CartPole-v1 copies stepped as one numpy batch, with episode returns tracked by hand.

    Attributes:
        obs: the current observations, shape ``(num_envs, 4)``, float32.
        finished_returns: undiscounted returns of the episodes finished since the last
            :meth:`pop_finished_returns`.
    """

    obs_dim: int = 4
    num_actions: int = 2

    def __init__(self, num_envs: int, seed: int) -> None:
        self.num_envs = num_envs
        self.env = gymnasium().make_vec("CartPole-v1", num_envs=num_envs, vectorization_mode="vector_entry_point")
        self.obs, _ = self.env.reset(seed=seed)
        self._prev_done = np.zeros(num_envs, dtype=bool)
        self._running_return = np.zeros(num_envs, dtype=np.float64)
        self.finished_returns: list[float] = []

    def step(self, actions: np.ndarray) -> dict[str, np.ndarray]:
        """Step all copies; return ``reward``, ``terminated``, ``truncated`` and ``valid`` (a real step).

        ``valid`` is False for the dummy auto-reset step that follows an episode end.
        """
        valid = ~self._prev_done
        self.obs, reward, terminated, truncated, _ = self.env.step(actions)
        done = terminated | truncated
        self._running_return += reward
        for i in np.flatnonzero(done):
            self.finished_returns.append(float(self._running_return[i]))
            self._running_return[i] = 0.0
        self._prev_done = done
        return {"reward": reward, "terminated": terminated, "truncated": truncated, "valid": valid}

    def pop_finished_returns(self) -> list[float]:
        """Return and clear the episode returns finished since the last call."""
        out, self.finished_returns = self.finished_returns, []
        return out

    def close(self) -> None:
        self.env.close()


def compute_gae(
    rewards: Tensor,
    values: Tensor,
    next_value: Tensor,
    terminated: Tensor,
    truncated: Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over a rollout of shape ``(T, ...)``.

    ``values[t]`` is V(obs_t) and ``next_value`` is V(obs_T) for the observation after the last step.
    Terminated steps do not bootstrap; truncated ones bootstrap with V of the final observation (which,
    with next-step auto-reset, is ``values[t + 1]``). The recursion stops at every episode end.

    Returns:
        ``(advantages, returns)`` with ``returns = advantages + values``.
    """
    num_steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(next_value)
    not_terminated = 1.0 - terminated.float()
    not_done = 1.0 - (terminated | truncated).float()
    for t in reversed(range(num_steps)):
        value_tp1 = next_value if t == num_steps - 1 else values[t + 1]
        delta = rewards[t] + gamma * value_tp1 * not_terminated[t] - values[t]
        last_gae = delta + gamma * gae_lambda * not_done[t] * last_gae
        advantages[t] = last_gae
    return advantages, advantages + values


def normalize_advantages(advantages: Tensor) -> Tensor:
    """``(adv - mean) / (std + 1e-8)`` over the minibatch (CleanRL's per-minibatch normalisation)."""
    return (advantages - advantages.mean()) / (advantages.std() + 1e-8)


@dataclass
class LossTerms:
    """The loss of one minibatch and its detached statistics."""

    loss: Tensor
    policy_loss: Tensor
    value_loss: Tensor
    entropy: Tensor
    approx_kl: Tensor
    clip_fraction: Tensor


def ppo_objective(
    cfg: Any,
    logratio: Tensor,
    advantages: Tensor,
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    entropy: Tensor,
    *,
    norm_adv: bool | None = None,
) -> tuple[Tensor, LossTerms]:
    """The clipped PPO objective of one minibatch (CleanRL ``ppo.py``), shared by the reference modules.

    Normalises ``advantages`` per minibatch when ``cfg.norm_adv`` (``norm_adv=False`` when the caller already
    normalised them, e.g. over the whole minibatch before sharding it across ranks); clipped surrogate; value
    loss (clipped around ``old_values`` when ``cfg.clip_vloss``); entropy bonus. Returns the advantages as they
    entered the policy loss (what ``observe`` must see) and the loss terms.
    """
    ratio = logratio.exp()
    if (cfg.norm_adv if norm_adv is None else norm_adv) and advantages.numel() > 1:
        advantages = normalize_advantages(advantages)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - cfg.clip_eps, 1 + cfg.clip_eps)
    policy_loss = torch.max(pg_loss1, pg_loss2).mean()

    if cfg.clip_vloss:
        v_clipped = old_values + torch.clamp(values - old_values, -cfg.clip_eps, cfg.clip_eps)
        value_loss = 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2).mean()
    else:
        value_loss = 0.5 * ((values - returns) ** 2).mean()

    entropy_mean = entropy.mean()
    if getattr(cfg, "fault", None) == "entropy_sign":
        loss = policy_loss + cfg.ent_coef * entropy_mean + cfg.vf_coef * value_loss  # planted: the sign of the bonus
    else:
        loss = policy_loss - cfg.ent_coef * entropy_mean + cfg.vf_coef * value_loss

    with torch.no_grad():
        approx_kl = ((ratio - 1) - logratio).mean()
        clip_fraction = ((ratio - 1.0).abs() > cfg.clip_eps).float().mean()
    return advantages, LossTerms(
        loss=loss,
        policy_loss=policy_loss.detach(),
        value_loss=value_loss.detach(),
        entropy=entropy_mean.detach(),
        approx_kl=approx_kl,
        clip_fraction=clip_fraction,
    )


def trainer_kwargs(module: Any) -> dict[str, Any]:
    """The ``Trainer`` keyword arguments a reference module needs.

    Contains ``max_epochs`` (the whole run is one Lightning epoch), ``accelerator="cpu"``, ``devices=1``,
    ``log_every_n_steps=1``, no progress bar and no model summary; for :class:`CartPolePPOAuto` also
    ``gradient_clip_val=cfg.max_grad_norm`` and ``gradient_clip_algorithm="norm"`` (automatic optimization
    clips in the Trainer; the manual modules clip inside ``training_step``). It never sets ``callbacks``,
    ``logger`` or ``enable_checkpointing``, so::

        Trainer(**trainer_kwargs(m), callbacks=[...], logger=..., enable_checkpointing=False)

    Override any entry with ``{**trainer_kwargs(m), "accelerator": "gpu"}``.
    """
    kwargs: dict[str, Any] = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    kwargs.update(module.extra_trainer_kwargs())
    return kwargs
