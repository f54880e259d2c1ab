"""CleanRL-style PPO as LightningModules: code the guard was *not* tuned on, healthy and with planted faults.

This follows CleanRL's single-file scripts (``ppo.py``, ``ppo_continuous_action.py``, ``ppo_atari.py``) line by
line, moved into a ``LightningModule`` with manual optimization: one ``training_step`` is one PPO iteration
(``DataLoader(range(num_iterations), batch_size=None)``), the ``Agent`` is held as ``self.agent`` and has
CleanRL's ``get_value`` / ``get_action_and_value``, one ``Adam(agent.parameters(), lr, eps=1e-5)`` holds actor and
critic in ONE param group, the lr is annealed by writing ``optimizer.param_groups[0]["lr"]`` at the start of each
iteration, and ``target_kl`` is checked after each epoch (CleanRL's ``break``), not before each minibatch.

How it differs from the reference PPO the guard was tuned on (:mod:`lightning_ppo_guard.reference.cartpole`):
the actor is ``agent.actor`` / ``agent.actor_mean`` / a head on a shared ``agent.network`` trunk, not
``self.actor``; Gymnasium's ``SyncVectorEnv`` with ``RecordEpisodeStatistics`` and same-step auto-reset
(``next_done`` as in CleanRL); one param group; 16, 20, 32 or 64 optimizer steps per rollout instead of 40; an lr
annealed by hand (or by a ``LambdaLR`` that ends at exactly 0); a Gaussian policy with a bare ``actor_logstd``.

Three modules:

* :class:`CleanRLPPO`: ``ppo.py`` on CartPole-v1, separate ``agent.actor`` and ``agent.critic`` MLPs.
* :class:`CleanRLContinuousPPO`: ``ppo_continuous_action.py`` on Pendulum-v1 (or :class:`MultiPendulum`, several
  torques), ``agent.actor_mean`` + a bare ``agent.actor_logstd`` parameter, ``Normal`` summed over action dims,
  CleanRL's observation/reward normalisation wrappers, actions clipped to the bounds (``ClipAction``) when
  stepping while the sampled action is stored.
* :class:`CleanRLTrunkPPO`: ``ppo_atari.py``'s layout (``agent.network`` trunk feeding ``agent.actor`` and
  ``agent.critic`` heads), with an MLP trunk on CartPole observations.

Faults (``CleanRLArgs.fault``), each a single ``if`` in the place a user would write it:

* ``"lr_zero"`` / ``"lr_tiny"``: from optimizer step ``stall_step`` on, the param group's lr is 0 / 1e-9.
* ``"detached"``: from optimizer step ``stall_step`` on, the agent detaches its logits (or Gaussian mean):
  ``stall_step=0`` is the classic early bug, a later one a "critic-only phase" switched on by a step counter.
* ``"old_logp_not_detached"``: the old log-probs are recomputed from the live agent in the update, without
  ``no_grad``, so ``ratio == 1`` identically and the clipped surrogate has no gradient.
* ``"old_logp_recomputed"``: the old log-probs are recomputed from the current agent in the update under
  ``no_grad`` (detached): every minibatch's ratio is exactly 1, clipping never acts, the policy still learns.
* ``"target_kl_tiny"``: ``target_kl=1e-7``; CleanRL's per-epoch break then ends every update phase after its
  first epoch (``num_minibatches`` steps, not 1).
* ``"trunk_unbound"`` / ``"trunk_frozen"`` (shared trunk): ``agent.network`` is left out of the optimizer /
  frozen with ``requires_grad_(False)``.
* ``"logstd_unbound"`` / ``"logstd_frozen"`` (Gaussian): the bare ``agent.actor_logstd`` is left out of the
  optimizer / frozen.
* ``"entropy_sign"``: ``loss = pg_loss + ent_coef * entropy_loss + ...`` (the bonus added: an entropy penalty).
* ``"ratio_inverted"``: ``ratio = (oldlogprob - newlogprob).exp()``: the surrogate pushes the policy away from
  better actions and the clip no longer bounds the step.
* ``"dropout"``: the actor MLP has ``nn.Dropout(0.1)`` after each hidden layer, active in rollout and update.
* ``reward_scale``: rewards multiplied before they are stored (``100``: unscaled rewards, a value loss of ~1e5 whose
  gradient swamps a shared trunk).

:data:`VARIANTS` lists the fits and what the guard must say about each.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import gymnasium as gym
import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Distribution, Normal
from torch.utils.data import DataLoader

from lightning_ppo_guard import observe
from tests.zoo import Variant

__all__ = [
    "RETURN_TO_REACH",
    "VARIANTS",
    "Agent",
    "CleanRLArgs",
    "CleanRLContinuousPPO",
    "CleanRLPPO",
    "CleanRLTrunkPPO",
    "GaussianAgent",
    "MultiPendulum",
    "SharedTrunkAgent",
    "layer_init",
]

#: Keep this many of the most recent finished episode returns in ``module.recent_returns``.
RECENT_RETURNS = 100
#: The lr a late "lr_*" fault writes into the param group.
STALL_LR = {"lr_zero": 0.0, "lr_tiny": 1e-9}
#: Fault -> the agent's parameters (by name prefix) it freezes, or leaves out of the optimizer.
FROZEN = {"trunk_frozen": "network.", "logstd_frozen": "actor_logstd"}
UNBOUND = {"trunk_unbound": "network.", "logstd_unbound": "actor_logstd"}
FAULTS = ("lr_zero", "lr_tiny", "detached", "old_logp_not_detached", "old_logp_recomputed", "target_kl_tiny",
          "entropy_sign", "dropout",
          "ratio_inverted",
          *FROZEN, *UNBOUND)


@dataclass(frozen=True)
class CleanRLArgs:
    """CleanRL's ``Args`` (the algorithm part), plus how the module talks to the guard and which fault it plants.

    Defaults are ``ppo.py``'s (CartPole-v1: 4 envs x 128 steps, 4 epochs x 4 minibatches = 16 optimizer steps
    per rollout, lr 2.5e-4 annealed linearly, clipped value loss, ent_coef 0.01).
    """

    env_id: str = "CartPole-v1"
    num_pendulums: int = 1
    """Continuous module only: > 1 drives :class:`MultiPendulum` (that many torques) instead of ``env_id``."""
    total_timesteps: int = 500_000
    learning_rate: float = 2.5e-4
    num_envs: int = 4
    num_steps: int = 128
    anneal_lr: str | None = "linear"
    """``"linear"``: CleanRL's ``param_groups[0]["lr"] = frac * lr`` at each iteration start (last lr is lr / N);
    ``"to_zero"``: a ``LambdaLR`` stepped after each iteration whose last value is exactly 0; ``None``: constant."""
    gamma: float = 0.99
    gae_lambda: float = 0.95
    num_minibatches: int = 4
    update_epochs: int = 4
    norm_adv: bool = True
    clip_coef: float = 0.2
    clip_vloss: bool = True
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    target_kl: float | None = None
    hidden: int = 64
    seed: int = 1
    observe: str = "full"
    """``"minimal"``: ``observe(new_logp, old_logp, advantages)``; ``"full"``: also clip_eps, entropy, values,
    returns, rollout and target_kl; ``"dist"``: like full, with ``dist=`` (the agent's distribution) for entropy."""
    reward_scale: float = 1.0
    """Rewards are multiplied by this before they are stored (and enter GAE); the logged returns are the env's."""
    trunk_lr: float | None = None
    """Shared trunk only: ``agent.network`` in a param group of its own at this lr (``0.0``: a deliberate freeze)."""
    adv_scale: float = 1.0
    """The advantages are multiplied by this as they enter the policy loss (``1e-6`` with ``norm_adv=False``: a
    planted scale bug that leaves the policy gradient far below Adam's eps)."""
    state_std: bool = False
    """Continuous module only: ``agent.actor_logstd`` is a linear head on the observation (state-dependent std)."""
    fault: str | None = None
    stall_step: int = 200
    """First optimizer step (0-based) of the ``lr_zero``, ``lr_tiny`` and ``detached`` faults."""

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    @property
    def num_iterations(self) -> int:
        return self.total_timesteps // self.batch_size

    @property
    def steps_per_rollout(self) -> int:
        return self.update_epochs * self.num_minibatches

    def __post_init__(self) -> None:
        if self.fault is not None and self.fault not in FAULTS:
            raise ValueError(f"Unknown fault {self.fault!r}; valid: {', '.join(FAULTS)} (or None).")
        if self.observe not in ("minimal", "full", "dist"):
            raise ValueError(f"observe must be 'minimal', 'full' or 'dist', got {self.observe!r}.")
        if self.anneal_lr not in (None, "linear", "to_zero"):
            raise ValueError(f"anneal_lr must be None, 'linear' or 'to_zero', got {self.anneal_lr!r}.")
        if self.batch_size % self.num_minibatches:
            raise ValueError("num_envs * num_steps must be a multiple of num_minibatches (else CleanRL's slicing "
                             "adds a short extra minibatch).")


# ------------------------------------------------------------------------------------------------- networks
def layer_init(layer: nn.Linear, std: float = math.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    """CleanRL's orthogonal init."""
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


def _mlp(in_dim: int, hidden: int, out_dim: int, std: float) -> nn.Sequential:
    return nn.Sequential(
        layer_init(nn.Linear(in_dim, hidden)),
        nn.Tanh(),
        layer_init(nn.Linear(hidden, hidden)),
        nn.Tanh(),
        layer_init(nn.Linear(hidden, out_dim), std=std),
    )


class Agent(nn.Module):
    """``ppo.py``'s Agent: separate ``critic`` and ``actor`` MLPs, a ``Categorical`` over the logits."""

    detach_policy: bool = False
    """Set by the ``detached`` fault: the logits are detached before the distribution is built."""

    def __init__(self, envs: gym.vector.VectorEnv, hidden: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        obs_dim = int(np.array(envs.single_observation_space.shape).prod())
        self.critic = _mlp(obs_dim, hidden, 1, std=1.0)
        self.actor = _mlp(obs_dim, hidden, int(envs.single_action_space.n), std=0.01)
        if dropout:  # "regularise the policy"
            layers = list(self.actor)
            self.actor = nn.Sequential(*layers[:2], nn.Dropout(dropout), *layers[2:4], nn.Dropout(dropout), layers[4])

    def get_value(self, x: Tensor) -> Tensor:
        return self.critic(x)

    def get_dist(self, x: Tensor) -> Distribution:
        logits = self.actor(x)
        if self.detach_policy:
            logits = logits.detach()
        return Categorical(logits=logits)

    def get_action_and_value(self, x: Tensor, action: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        probs = self.get_dist(x)
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action), probs.entropy(), self.critic(x)


class GaussianAgent(nn.Module):
    """``ppo_continuous_action.py``'s Agent: ``actor_mean`` MLP, a bare state-independent ``actor_logstd``
    parameter, ``Normal(mean, std)`` with log-prob and entropy summed over the action dims."""

    detach_policy: bool = False
    """Set by the ``detached`` fault: the mean is detached (``actor_logstd`` still gets a gradient)."""

    def __init__(self, envs: gym.vector.VectorEnv, hidden: int = 64, dropout: float = 0.0,
                 state_std: bool = False) -> None:
        super().__init__()
        obs_dim = int(np.array(envs.single_observation_space.shape).prod())
        act_dim = int(np.prod(envs.single_action_space.shape))
        self.critic = _mlp(obs_dim, hidden, 1, std=1.0)
        self.actor_mean = _mlp(obs_dim, hidden, act_dim, std=0.01)
        self.actor_logstd: nn.Module | nn.Parameter
        if state_std:  # a state-dependent log std: a linear head on the observation, without a clamp
            self.actor_logstd = layer_init(nn.Linear(obs_dim, act_dim), std=0.01)
        else:
            self.actor_logstd = nn.Parameter(torch.zeros(1, act_dim))

    def get_value(self, x: Tensor) -> Tensor:
        return self.critic(x)

    def get_dist(self, x: Tensor) -> Distribution:
        action_mean = self.actor_mean(x)
        if self.detach_policy:
            action_mean = action_mean.detach()
        if isinstance(self.actor_logstd, nn.Module):
            action_logstd = self.actor_logstd(x)
        else:
            action_logstd = self.actor_logstd.expand_as(action_mean)
        action_std = torch.exp(action_logstd)
        return Normal(action_mean, action_std)

    def get_action_and_value(self, x: Tensor, action: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        probs = self.get_dist(x)
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action).sum(1), probs.entropy().sum(1), self.critic(x)


class SharedTrunkAgent(nn.Module):
    """``ppo_atari.py``'s Agent layout: a shared ``network`` trunk feeding an ``actor`` head and a ``critic`` head
    (an MLP trunk here, on CartPole observations, instead of the Nature CNN)."""

    detach_policy: bool = False

    def __init__(self, envs: gym.vector.VectorEnv, hidden: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        obs_dim = int(np.array(envs.single_observation_space.shape).prod())
        self.network = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden, hidden)),
            nn.Tanh(),
        )
        self.actor = layer_init(nn.Linear(hidden, int(envs.single_action_space.n)), std=0.01)
        self.critic = layer_init(nn.Linear(hidden, 1), std=1)

    def get_value(self, x: Tensor) -> Tensor:
        return self.critic(self.network(x))

    def get_dist(self, x: Tensor) -> Distribution:
        logits = self.actor(self.network(x))
        if self.detach_policy:
            logits = logits.detach()
        return Categorical(logits=logits)

    def get_action_and_value(self, x: Tensor, action: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        hidden = self.network(x)
        logits = self.actor(hidden)
        if self.detach_policy:
            logits = logits.detach()
        probs = Categorical(logits=logits)
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action), probs.entropy(), self.critic(hidden)


# ---------------------------------------------------------------------------------------------- environments
class MultiPendulum(gym.Env):
    """``n`` independent Pendulum-v1 copies driven as one robot: ``n`` torques, observations concatenated,
    rewards summed, 200 steps. A continuous task with a multi-dimensional action (no MuJoCo needed)."""

    def __init__(self, n: int = 3) -> None:
        self.pendulums = [gym.make("Pendulum-v1") for _ in range(n)]
        obs_space, act_space = self.pendulums[0].observation_space, self.pendulums[0].action_space
        self.observation_space = gym.spaces.Box(np.tile(obs_space.low, n), np.tile(obs_space.high, n), dtype=np.float32)
        self.action_space = gym.spaces.Box(np.tile(act_space.low, n), np.tile(act_space.high, n), dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        seeds = [None] * len(self.pendulums) if seed is None else [seed * 1000 + i for i in range(len(self.pendulums))]
        obs = [p.reset(seed=s)[0] for p, s in zip(self.pendulums, seeds, strict=True)]
        return np.concatenate(obs).astype(np.float32), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        outs = [p.step(action[i : i + 1]) for i, p in enumerate(self.pendulums)]
        obs = np.concatenate([o[0] for o in outs]).astype(np.float32)
        reward = float(sum(o[1] for o in outs))
        return obs, reward, any(o[2] for o in outs), any(o[3] for o in outs), {}

    def close(self) -> None:
        for p in self.pendulums:
            p.close()


def make_env(env_id: str) -> Callable[[], gym.Env]:
    """``ppo.py``'s ``make_env``: the env with episode statistics."""

    def thunk() -> gym.Env:
        return gym.wrappers.RecordEpisodeStatistics(gym.make(env_id))

    return thunk


def make_continuous_env(env_id: str, gamma: float, num_pendulums: int = 1) -> Callable[[], gym.Env]:
    """``ppo_continuous_action.py``'s ``make_env``: statistics, ``ClipAction`` (the sampled action is stored, the
    clipped one stepped), observation and reward normalisation with CleanRL's clips."""

    def thunk() -> gym.Env:
        env = MultiPendulum(num_pendulums) if num_pendulums > 1 else gym.make(env_id)
        env = gym.wrappers.FlattenObservation(env)
        env = gym.wrappers.RecordEpisodeStatistics(env)
        env = gym.wrappers.ClipAction(env)
        env = gym.wrappers.NormalizeObservation(env)
        env = gym.wrappers.TransformObservation(env, lambda obs: np.clip(obs, -10, 10), env.observation_space)
        env = gym.wrappers.NormalizeReward(env, gamma=gamma)
        env = gym.wrappers.TransformReward(env, lambda reward: np.clip(reward, -10, 10))
        return env

    return thunk


# ----------------------------------------------------------------------------------------------------- PPO
class CleanRLPPO(L.LightningModule):
    """CleanRL ``ppo.py`` on CartPole-v1 as a LightningModule (manual optimization, one step = one iteration).

    ``module.recent_returns`` holds the last episode returns (``RecordEpisodeStatistics``), ``module.epochs_run`` the
    number of epochs each iteration ran (fewer than ``update_epochs`` when ``target_kl`` broke the loop), and
    ``module.entropy_log`` ``(optimizer step, dist.entropy().sum(-1).mean())`` per minibatch when
    ``args.observe == "dist"``.
    Use ``Trainer(**trainer_kwargs(), ...)``.
    """

    agent_cls: type[nn.Module] = Agent

    def __init__(self, args: CleanRLArgs | None = None) -> None:
        super().__init__()
        self.args = args = args if args is not None else CleanRLArgs()
        self.automatic_optimization = False
        if args.fault == "target_kl_tiny":
            self.args = args = replace(args, target_kl=1e-7)  # "stop early to stay close to the old policy"
        # env setup
        self.envs = self.make_envs()
        with torch.random.fork_rng():
            torch.manual_seed(args.seed)
            self.agent = self.agent_cls(self.envs, args.hidden, 0.1 if args.fault == "dropout" else 0.0,
                                        **({"state_std": True} if args.state_std else {}))
        if args.fault in FROZEN:  # planted: a part of the agent frozen
            for name, p in self.agent.named_parameters():
                if name.startswith(FROZEN[args.fault]):
                    p.requires_grad_(False)
        self.recent_returns: list[float] = []
        self.entropy_log: list[tuple[int, float]] = []
        self.epochs_run: list[int] = []
        self.rng = np.random.default_rng(args.seed)

    def make_envs(self) -> gym.vector.VectorEnv:
        args = self.args
        return gym.vector.SyncVectorEnv([make_env(args.env_id) for _ in range(args.num_envs)],
                                        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)

    def configure_optimizers(self) -> Any:
        args = self.args
        params = self.agent.parameters()
        if args.fault in UNBOUND:  # planted: a part of the agent left out of the optimizer
            params = [p for name, p in self.agent.named_parameters() if not name.startswith(UNBOUND[args.fault])]
        if args.trunk_lr is not None:  # group 0 stays the annealed one (CleanRL writes param_groups[0]["lr"])
            named = list(self.agent.named_parameters())
            params = [{"params": [p for n, p in named if not n.startswith("network.")]},
                      {"params": [p for n, p in named if n.startswith("network.")], "lr": args.trunk_lr}]
        optimizer = torch.optim.Adam(params, lr=args.learning_rate, eps=1e-5)
        if args.anneal_lr != "to_zero":
            return optimizer
        last = max(1, args.num_iterations - 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: max(0.0, 1.0 - it / last))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(range(self.args.num_iterations), batch_size=None)

    def on_fit_start(self) -> None:
        # ALGO Logic: Storage setup
        args, envs, device = self.args, self.envs, self.device
        shape = (args.num_steps, args.num_envs)
        self.obs = torch.zeros(shape + envs.single_observation_space.shape, device=device)
        self.actions = torch.zeros(shape + envs.single_action_space.shape, device=device)
        self.logprobs = torch.zeros(shape, device=device)
        self.rewards = torch.zeros(shape, device=device)
        self.dones = torch.zeros(shape, device=device)
        self.values = torch.zeros(shape, device=device)
        # start the game
        next_obs, _ = envs.reset(seed=args.seed)
        self.next_obs = torch.tensor(next_obs, dtype=torch.float32, device=device)
        self.next_done = torch.zeros(args.num_envs, device=device)

    def on_fit_end(self) -> None:
        self.envs.close()

    @torch.no_grad()
    def collect_rollout(self) -> None:
        args, agent, device = self.args, self.agent, self.device
        for step in range(0, args.num_steps):
            self.obs[step] = self.next_obs
            self.dones[step] = self.next_done

            # ALGO LOGIC: action logic
            action, logprob, _, value = agent.get_action_and_value(self.next_obs)
            self.values[step] = value.flatten()
            self.actions[step] = action
            self.logprobs[step] = logprob

            # execute the game and log data.
            next_obs, reward, terminations, truncations, infos = self.envs.step(action.cpu().numpy())
            next_done = np.logical_or(terminations, truncations)
            reward = args.reward_scale * torch.as_tensor(reward, dtype=torch.float32, device=device)
            self.rewards[step] = reward.view(-1)
            self.next_obs = torch.tensor(next_obs, dtype=torch.float32, device=device)
            self.next_done = torch.tensor(next_done, dtype=torch.float32, device=device)

            if "final_info" in infos:
                episodes_over = np.nonzero(infos["final_info"]["_episode"])[0]
                finished = infos["final_info"]["episode"]["r"][episodes_over].tolist()
                self.recent_returns = (self.recent_returns + [float(r) for r in finished])[-RECENT_RETURNS:]

    def training_step(self, batch: Any, batch_idx: int) -> None:
        args, agent = self.args, self.agent
        optimizer = self.optimizers()
        iteration = int(batch) + 1  # CleanRL counts iterations from 1
        # Annealing the rate if instructed to do so.
        if args.anneal_lr == "linear":
            frac = 1.0 - (iteration - 1.0) / args.num_iterations
            optimizer.param_groups[0]["lr"] = frac * args.learning_rate

        self.collect_rollout()

        # bootstrap value if not done
        with torch.no_grad():
            next_value = agent.get_value(self.next_obs).reshape(1, -1)
            advantages = torch.zeros_like(self.rewards)
            lastgaelam = 0
            for t in reversed(range(args.num_steps)):
                if t == args.num_steps - 1:
                    nextnonterminal = 1.0 - self.next_done
                    nextvalues = next_value
                else:
                    nextnonterminal = 1.0 - self.dones[t + 1]
                    nextvalues = self.values[t + 1]
                delta = self.rewards[t] + args.gamma * nextvalues * nextnonterminal - self.values[t]
                advantages[t] = lastgaelam = delta + args.gamma * args.gae_lambda * nextnonterminal * lastgaelam
            returns = advantages + self.values

        # flatten the batch
        b_obs = self.obs.reshape((-1, *self.envs.single_observation_space.shape))
        b_logprobs = self.logprobs.reshape(-1)
        b_actions = self.actions.reshape((-1, *self.envs.single_action_space.shape))
        b_advantages = advantages.reshape(-1)
        b_returns = returns.reshape(-1)
        b_values = self.values.reshape(-1)

        # Optimizing the policy and value network
        b_inds = np.arange(args.batch_size)
        clipfracs = []
        self.epochs_run.append(0)
        for _epoch in range(args.update_epochs):
            self.rng.shuffle(b_inds)
            for start in range(0, args.batch_size, args.minibatch_size):
                end = start + args.minibatch_size
                mb_inds = b_inds[start:end]
                if args.fault in STALL_LR and self.global_step >= args.stall_step:
                    optimizer.param_groups[0]["lr"] = STALL_LR[args.fault]  # planted: the lr drops to ~0 for good
                if args.fault == "detached" and self.global_step >= args.stall_step:
                    agent.detach_policy = True  # planted: "critic-only phase", the policy head output is detached

                _, newlogprob, entropy, newvalue = agent.get_action_and_value(b_obs[mb_inds], b_actions[mb_inds])
                oldlogprob = b_logprobs[mb_inds]
                if args.fault == "old_logp_not_detached":
                    # planted: "recompute the old log-probs for the ratio", without no_grad
                    _, oldlogprob, _, _ = agent.get_action_and_value(b_obs[mb_inds], b_actions[mb_inds])
                elif args.fault == "old_logp_recomputed":
                    with torch.no_grad():  # planted: "the old policy's log-probs", from the current agent
                        _, oldlogprob, _, _ = agent.get_action_and_value(b_obs[mb_inds], b_actions[mb_inds])
                logratio = newlogprob - oldlogprob
                ratio = logratio.exp()
                if args.fault == "ratio_inverted":
                    ratio = (oldlogprob - newlogprob).exp()  # planted: the ratio upside down

                with torch.no_grad():
                    # calculate approx_kl http://joschu.net/blog/kl-approx.html
                    old_approx_kl = (-logratio).mean()
                    approx_kl = ((ratio - 1) - logratio).mean()
                    clipfracs += [((ratio - 1.0).abs() > args.clip_coef).float().mean().item()]

                mb_advantages = b_advantages[mb_inds]
                if args.norm_adv:
                    mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)
                mb_advantages = mb_advantages * args.adv_scale

                # Policy loss
                pg_loss1 = -mb_advantages * ratio
                pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
                pg_loss = torch.max(pg_loss1, pg_loss2).mean()

                # Value loss
                newvalue = newvalue.view(-1)
                if args.clip_vloss:
                    v_loss_unclipped = (newvalue - b_returns[mb_inds]) ** 2
                    v_clipped = b_values[mb_inds] + torch.clamp(
                        newvalue - b_values[mb_inds],
                        -args.clip_coef,
                        args.clip_coef,
                    )
                    v_loss_clipped = (v_clipped - b_returns[mb_inds]) ** 2
                    v_loss_max = torch.max(v_loss_unclipped, v_loss_clipped)
                    v_loss = 0.5 * v_loss_max.mean()
                else:
                    v_loss = 0.5 * ((newvalue - b_returns[mb_inds]) ** 2).mean()

                entropy_loss = entropy.mean()
                if args.fault == "entropy_sign":
                    loss = pg_loss + args.ent_coef * entropy_loss + v_loss * args.vf_coef  # planted: bonus added
                else:
                    loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef

                self.observe_minibatch(newlogprob, oldlogprob, mb_advantages, entropy, newvalue, b_returns[mb_inds],
                                       b_obs[mb_inds], iteration)
                optimizer.zero_grad()
                self.manual_backward(loss)
                self.clip_gradients(optimizer, gradient_clip_val=args.max_grad_norm, gradient_clip_algorithm="norm")
                optimizer.step()

            self.epochs_run[-1] += 1
            if args.target_kl is not None and approx_kl > args.target_kl:
                break

        if args.anneal_lr == "to_zero":
            self.lr_schedulers().step()  # type: ignore[union-attr]

        y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
        var_y = np.var(y_true)
        explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y

        # record rewards for plotting purposes
        self.log("charts/learning_rate", float(optimizer.param_groups[0]["lr"]))
        self.log("losses/value_loss", v_loss.detach())
        self.log("losses/policy_loss", pg_loss.detach())
        self.log("losses/entropy", entropy_loss.detach())
        self.log("losses/old_approx_kl", old_approx_kl)
        self.log("losses/approx_kl", approx_kl)
        self.log("losses/clipfrac", float(np.mean(clipfracs)))
        self.log("losses/explained_variance", float(explained_var))
        if self.recent_returns:
            self.log("charts/episodic_return", float(np.mean(self.recent_returns[-20:])))

    def observe_minibatch(self, newlogprob: Tensor, oldlogprob: Tensor, mb_advantages: Tensor, entropy: Tensor,
                          newvalue: Tensor, mb_returns: Tensor, mb_obs: Tensor, iteration: int) -> None:
        """The one line a user adds for the guard, in the style ``args.observe`` picks."""
        args = self.args
        if args.observe == "minimal":
            observe(self, new_logp=newlogprob, old_logp=oldlogprob, advantages=mb_advantages)
            return
        dist = None
        if args.observe == "dist":
            # get_action_and_value does not return the distribution; users who hand it over rebuild it
            dist = self.agent.get_dist(mb_obs)
            with torch.no_grad():
                self.entropy_log.append((self.global_step, float(dist.entropy().sum(-1).mean())))
        observe(self, new_logp=newlogprob, old_logp=oldlogprob, advantages=mb_advantages, clip_eps=args.clip_coef,
                dist=dist, entropy=entropy if dist is None else None, values=newvalue, returns=mb_returns,
                rollout=iteration, target_kl=args.target_kl)


class CleanRLContinuousPPO(CleanRLPPO):
    """CleanRL ``ppo_continuous_action.py`` (Pendulum-v1, or :class:`MultiPendulum` with ``num_pendulums > 1``)."""

    agent_cls = GaussianAgent

    def make_envs(self) -> gym.vector.VectorEnv:
        args = self.args
        return gym.vector.SyncVectorEnv(
            [make_continuous_env(args.env_id, args.gamma, args.num_pendulums) for _ in range(args.num_envs)],
            autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
        )


class CleanRLTrunkPPO(CleanRLPPO):
    """CleanRL ``ppo_atari.py``'s shared-trunk agent (``agent.network`` -> ``agent.actor`` / ``agent.critic``)."""

    agent_cls = SharedTrunkAgent


# -------------------------------------------------------------------------------------------------- variants
def trainer_kwargs(max_steps: int = -1) -> dict[str, Any]:
    """What a CleanRL-style module needs from the Trainer: one epoch, CPU, one logged row per iteration."""
    return {"max_epochs": 1, "max_steps": max_steps, "accelerator": "cpu", "devices": 1, "log_every_n_steps": 1}


def _maker(cls: type[CleanRLPPO], args: CleanRLArgs, max_steps: int = -1) -> Callable[..., tuple[Any, dict]]:
    def make(seed: int, observe: str | None = None) -> tuple[Any, dict[str, Any]]:
        """``observe`` overrides the module's observe style (``"minimal"``: new_logp, old_logp, advantages)."""
        return cls(replace(args, seed=seed, observe=observe or args.observe)), trainer_kwargs(max_steps)

    return make


#: The CleanRL 4x4 run (ppo.py's defaults) over this many env steps: 150k reach returns of 300-370 on CartPole-v1
#: (seeds 0-2) in ~27 s on one CPU thread; the short variants are the first few hundred steps of this run.
LONG_TIMESTEPS = 150_000
#: Continuous Pendulum-v1: rl-zoo's gamma 0.9 and lr 1e-3, 8 envs x 256 steps, 10 epochs x 8 minibatches (80 steps
#: per rollout); 120k steps take returns from ~-1250 to -650..-690 (seeds 0-2) in ~27 s.
PENDULUM = CleanRLArgs(env_id="Pendulum-v1", total_timesteps=120_000, learning_rate=1e-3, num_envs=8, num_steps=256,
                       gamma=0.9, num_minibatches=8, update_epochs=10, ent_coef=0.0, observe="dist")
#: Shared trunk on CartPole-v1: ppo.py's 4 envs x 128, 4 x 4, with the reference's gamma 0.98, lambda 0.8 and lr 1e-3
#: (with ppo.py's gamma 0.99 / lr 2.5e-4 the shared trunk stays near 100 at 150k); 100k steps reach 457-477 in ~18 s.
TRUNK = CleanRLArgs(total_timesteps=100_000, learning_rate=1e-3, gamma=0.98, gae_lambda=0.8)

#: Mean return of the last 20 episodes a slow (full-training) variant must reach on every seed: random play scores
#: ~22 on CartPole and ~-1250 on Pendulum; the measured ends (seeds 0-2) are given with each config above.
RETURN_TO_REACH = {"cleanrl-4x4-long": 200.0, "cleanrl-continuous-long": -900.0, "cleanrl-trunk-long": 300.0}

#: Steps per rollout -> (update_epochs, num_minibatches) of the healthy twins and the late stalls.
SHAPES = {16: (4, 4), 20: (5, 4), 32: (4, 8), 64: (8, 8)}
#: Late fault -> the code a correct guard names for it.
LATE = {"lr_zero": "PPG003", "detached": "PPG101", "lr_tiny": "PPG204"}

ACTOR = {"actors": "agent.actor", "critic": "agent.critic"}


def _variants() -> list[Variant]:
    base = CleanRLArgs(total_timesteps=LONG_TIMESTEPS)
    out: list[Variant] = []

    # --- healthy CartPole, CleanRL's defaults and other steps per rollout (the twins of the late stalls)
    for spr, (epochs, minibatches) in SHAPES.items():
        args = replace(base, update_epochs=epochs, num_minibatches=minibatches)
        run = args.stall_step + 6 * spr  # as long as the late-stall runs below: one rollout past their deadline
        out.append(Variant(
            name=f"cleanrl-{epochs}x{minibatches}", family="cleanrl", make=_maker(CleanRLPPO, args, run),
            guard_kwargs=ACTOR,
            note=f"healthy ppo.py, {epochs} epochs x {minibatches} minibatches = {spr} steps per rollout, the first "
                 f"{run} optimizer steps of a {LONG_TIMESTEPS // 1000}k-step run (lr annealed linearly)"))
    out.append(Variant(
        name="cleanrl-4x4-long", family="cleanrl", make=_maker(CleanRLPPO, base), guard_kwargs=ACTOR, slow=True,
        note=f"healthy ppo.py trained to the end ({LONG_TIMESTEPS // 1000}k steps, lr annealed to lr/N): returns "
             "300-370, no finding over the whole anneal"))
    out.append(Variant(
        name="cleanrl-4x4-minimal-observe", family="cleanrl",
        make=_maker(CleanRLPPO, replace(base, observe="minimal"), 296), guard_kwargs=ACTOR,
        note="healthy ppo.py calling observe(new_logp, old_logp, advantages) only: no rollout id, no clip_eps"))
    out.append(Variant(
        name="cleanrl-4x4-anneal-short", family="cleanrl",
        make=_maker(CleanRLPPO, replace(base, total_timesteps=24 * base.batch_size)), guard_kwargs=ACTOR,
        note="healthy ppo.py whose whole linear anneal fits in 24 iterations: the lr falls to lr/24 (1e-5) in "
             "384 steps, a small step, not a stall"))
    out.append(Variant(
        name="cleanrl-4x4-anneal-to-zero", family="cleanrl",
        make=_maker(CleanRLPPO, replace(base, anneal_lr="to_zero", total_timesteps=24 * base.batch_size)),
        guard_kwargs=ACTOR,
        note="healthy: a LambdaLR annealing to exactly 0 on the last of 24 iterations; lr 0 at the scheduled end "
             "of training is the schedule, not a bug"))
    out.append(Variant(
        name="cleanrl-4x4-target-kl", family="cleanrl",
        make=_maker(CleanRLPPO, replace(base, target_kl=5e-4), 296), guard_kwargs=ACTOR,
        note="healthy ppo.py with a tight target_kl=5e-4 checked after each epoch (CleanRL): about 1 rollout in 3 "
             "stops after 2 or 3 of its 4 epochs, none after the first; the policy moves by a healthy KL"))

    # --- late stalls: the run is healthy until optimizer step stall_step, then the actor stops moving
    for fault, code in LATE.items():
        for spr, (epochs, minibatches) in SHAPES.items():
            args = replace(base, update_epochs=epochs, num_minibatches=minibatches, fault=fault)
            deadline = args.stall_step + 5 * spr
            out.append(Variant(
                name=f"cleanrl-{epochs}x{minibatches}-late-{fault.replace('_', '-')}", family="cleanrl-late-stall",
                make=_maker(CleanRLPPO, args, deadline + spr), expect=frozenset({(code, "actor")}),
                deadline=deadline, guard_kwargs=ACTOR,
                note=f"{fault} from optimizer step {args.stall_step} on, {spr} steps per rollout: {code} within 5 "
                     "rollouts of the stall, long past the guard's dense phase (its first 16 steps)"))

    args = replace(base, observe="minimal", fault="detached")
    out.append(Variant(
        name="cleanrl-4x4-minimal-observe-late-detached", family="cleanrl-late-stall",
        make=_maker(CleanRLPPO, args, args.stall_step + 6 * 16), expect=frozenset({("PPG101", "actor")}),
        deadline=args.stall_step + 5 * 16, guard_kwargs=ACTOR,
        note="the logits detached from step 200 on, observed with observe(new_logp, old_logp, advantages) only: "
             "PPG101 without rollout ids"))

    # --- early faults, CleanRL 4x4 (16 steps per rollout)
    early = [
        ("detached", "PPG101", "logits detached from the first update: no policy gradient"),
        ("old_logp_not_detached", "PPG103", "old log-probs recomputed with grad: ratio == 1, zero policy gradient"),
        ("old_logp_recomputed", "PPG108", "old log-probs recomputed from the current agent under no_grad: ratio "
         "exactly 1 on every minibatch while the agent learns (not 'steps too small', PPG301)"),
        ("target_kl_tiny", "PPG302", "target_kl=1e-7 with CleanRL's per-epoch break: every update phase stops after "
         "its first epoch (4 steps instead of 16)"),
        ("entropy_sign", "PPG502", "the entropy bonus added to the loss instead of subtracted (an entropy penalty)"),
        ("dropout", "PPG105", "dropout (p=0.1) in the actor MLP, active in rollout and update: the first ratio is "
         "not 1"),
    ]
    # without target_kl (a per-epoch check) or entropy in observe, these two cannot be told: see README
    minimal = {"target_kl_tiny": frozenset(), "entropy_sign": frozenset()}
    for fault, code, what in early:
        args = replace(base, fault=fault, stall_step=0)
        # the first 5 rollouts; under target_kl_tiny a rollout is one epoch (num_minibatches steps)
        deadline = 5 * (args.num_minibatches if fault == "target_kl_tiny" else args.steps_per_rollout)
        out.append(Variant(
            name=f"cleanrl-4x4-{fault.replace('_', '-')}", family="cleanrl-early-fault",
            make=_maker(CleanRLPPO, args, deadline + args.steps_per_rollout), expect=frozenset({(code, "actor")}),
            deadline=deadline, guard_kwargs=ACTOR, note=f"{what}; {code} within the first 5 rollouts",
            minimal=minimal.get(fault)))

    args = replace(base, fault="ratio_inverted")
    out.append(Variant(
        name="cleanrl-4x4-ratio-inverted", family="cleanrl-early-fault",
        make=_maker(CleanRLPPO, args, 6 * args.steps_per_rollout), expect=frozenset({("PPG107", "actor")}),
        deadline=args.steps_per_rollout, guard_kwargs=ACTOR,
        note="ratio = exp(old - new): the loss's gradient raises the log-prob of the actions with negative "
             "advantages (the policy learns backwards, returns fall): PPG107 in the first rollout"))
    args = replace(base, reward_scale=100.0, learning_rate=1e-3)
    out.append(Variant(
        name="cleanrl-4x4-value-clip-unscaled", family="cleanrl-early-fault",
        make=_maker(CleanRLPPO, args, 8 * args.steps_per_rollout), expect=frozenset({("PPG406", "critic")}),
        deadline=5 * args.steps_per_rollout, guard_kwargs=ACTOR,
        note="rewards x100 with ppo.py's clip_vloss (0.2 around the rollout's values) at lr 1e-3: within a rollout the "
             "critic moves past the clip, the clipped branch then wins on every sample and the critic's gradient is "
             "exactly 0: PPG406 within 5 rollouts (at ppo.py's 2.5e-4 the critic stays inside the clip and learns)"))

    args = replace(base, adv_scale=1e-6, norm_adv=False)
    out.append(Variant(
        name="cleanrl-4x4-adv-scale-1e-6", family="cleanrl-early-fault",
        make=_maker(CleanRLPPO, args, 8 * args.steps_per_rollout), expect=frozenset({("PPG402", "actor")}),
        allowed=frozenset({"PPG405"}), deadline=5 * args.steps_per_rollout, guard_kwargs=ACTOR,
        note="advantages x1e-6 and not normalised (lr 2.5e-4, typical): named as an advantage-scale problem "
             "(PPG402) within 5 rollouts; once the eps-bound steps are seen, PPG405 (gradient below Adam's eps), "
             "never 'raise the lr' (PPG204) nor 'the critic eats the clip' (PPG403)"))

    # --- continuous Gaussian (Pendulum-v1), bare actor_logstd
    gauss = {"actors": "agent.actor_mean", "critic": "agent.critic"}
    pend_spr = PENDULUM.steps_per_rollout
    out.append(Variant(
        name="cleanrl-continuous", family="cleanrl-continuous",
        make=_maker(CleanRLContinuousPPO, PENDULUM, 2 * pend_spr), guard_kwargs=gauss,
        note=f"healthy ppo_continuous_action.py on Pendulum-v1 (2 rollouts of {pend_spr} steps), roles named with "
             "the bare actor_logstd left outside the actor role, observe(dist=Normal)"))
    out.append(Variant(
        name="cleanrl-continuous-3d", family="cleanrl-continuous",
        make=_maker(CleanRLContinuousPPO, replace(PENDULUM, num_pendulums=3), 2 * pend_spr),
        note="healthy ppo_continuous_action.py on 3 pendulums at once (3 torques), auto-detected roles (actor = "
             "actor_mean + actor_logstd): per-sample entropy is the sum over the 3 action dims"))
    out.append(Variant(
        name="cleanrl-continuous-long", family="cleanrl-continuous", make=_maker(CleanRLContinuousPPO, PENDULUM),
        slow=True, note=f"healthy ppo_continuous_action.py trained on Pendulum-v1 for "
                        f"{PENDULUM.total_timesteps // 1000}k steps, auto-detected roles"))
    out.append(Variant(
        name="cleanrl-continuous-detached-mean", family="cleanrl-continuous",
        make=_maker(CleanRLContinuousPPO, replace(PENDULUM, fault="detached", stall_step=0), 2 * pend_spr),
        expect=frozenset({("PPG102", "actor")}), deadline=2 * pend_spr,
        note="the Gaussian mean is detached (actor_logstd still learns and keeps new_logp's graph alive): new_logp "
             "requires grad but reaches none of actor_mean's tensors, PPG102 in the second rollout (once "
             "actor_mean is seen not to move across a rollout boundary: an auxiliary phase would have moved it)"))
    for fault, code, what in (("logstd_frozen", "PPG006", "actor_logstd.requires_grad_(False): a frozen part"),
                              ("logstd_unbound", "PPG001", "actor_logstd left out of the optimizer")):
        out.append(Variant(
            name=f"cleanrl-continuous-{fault.replace('_', '-')}", family="cleanrl-roles",
            make=_maker(CleanRLContinuousPPO, replace(PENDULUM, fault=fault), pend_spr),
            expect=frozenset({(code, "actor")}), deadline=pend_spr,
            note=f"{what}, auto-detected roles: {code} for the actor in the first rollout"))

    # --- shared trunk (ppo_atari.py layout), auto-detected: agent.network is the shared role
    out.append(Variant(
        name="cleanrl-trunk", family="cleanrl-trunk", make=_maker(CleanRLTrunkPPO, TRUNK, 296),
        note="healthy ppo_atari.py layout: a shared agent.network trunk feeding actor and critic heads, "
             "auto-detected as actor, critic and shared"))
    out.append(Variant(
        name="cleanrl-trunk-long", family="cleanrl-trunk", make=_maker(CleanRLTrunkPPO, TRUNK),
        slow=True, note=f"healthy shared-trunk PPO trained on CartPole for {TRUNK.total_timesteps // 1000}k steps"))
    out.append(Variant(
        name="cleanrl-trunk-named", family="cleanrl-trunk", make=_maker(CleanRLTrunkPPO, TRUNK, 96),
        guard_kwargs={"actors": "agent.actor", "critic": "agent.critic"},
        note="healthy shared trunk with the heads named and the trunk in no role (as a user may write it)"))
    out.append(Variant(
        name="cleanrl-trunk-lr-zero", family="cleanrl-trunk", make=_maker(CleanRLTrunkPPO, replace(TRUNK, trunk_lr=0.0),
                                                                          96),
        note="healthy: the shared trunk in a param group at lr 0 (features frozen on purpose), the heads learning: "
             "neither PPG003 nor PPG203 for the shared role"))
    out.append(Variant(
        name="cleanrl-trunk-detached", family="cleanrl-trunk",
        make=_maker(CleanRLTrunkPPO, replace(TRUNK, fault="detached", stall_step=0), 6 * 16),
        expect=frozenset({("PPG101", "actor")}), deadline=5 * 16,
        note="the actor head's logits are detached; the trunk still learns through the critic: PPG101"))
    for fault, code, what in (("trunk_unbound", "PPG001", "agent.network left out of the optimizer"),
                              ("trunk_frozen", "PPG006", "agent.network.requires_grad_(False)")):
        out.append(Variant(
            name=f"cleanrl-{fault.replace('_', '-')}", family="cleanrl-roles",
            make=_maker(CleanRLTrunkPPO, replace(TRUNK, fault=fault), 2 * 16),
            expect=frozenset({(code, "shared")}), deadline=16,
            note=f"{what}: {code} for the shared role in the first rollout"))
    out.append(Variant(
        name="cleanrl-trunk-unscaled-rewards", family="cleanrl-roles",
        make=_maker(CleanRLTrunkPPO, replace(TRUNK, reward_scale=100.0, clip_vloss=False), 11 * 16),
        expect=frozenset({("PPG404", "shared")}), deadline=10 * 16,
        note="rewards x100 and no value clipping (value loss ~1e5, return flat at ~20): the critic head sends "
             "~1e3-1e4x the actor head's gradient into the trunk, PPG404 within 10 rollouts"))
    return out


VARIANTS: list[Variant] = _variants()
