"""PPO written the way users write it: other layouts, schedules, optimizers, precisions and Trainer features.

One small PPO on Gymnasium's CartPole-v1, written independently of the reference modules (only the vectorised
env, GAE and the orthogonal init are shared): the policy is ``self.pi`` and the value function ``self.vf``
(auto-detected by ``PPOGuard()``), the distribution comes from a ``get_dist`` helper, the loss lives in one
``ppo_loss`` helper that calls :func:`~lightning_ppo_guard.observe`, rollouts keep every sample (CleanRL style,
auto-reset steps included) and minibatches are ``minibatch_size`` chunks of a permutation, the last one holding
the remainder.

:class:`StyleConfig` holds the knobs; each one is the code a user would write, as a single ``if`` in its natural
place or as a subclass (:class:`SB3StylePPO`, :class:`TwoOptimizerPPO`, ...). :data:`VARIANTS` pairs each fit
with what a correct guard must say about it: nothing on a healthy run, the expected ``(code, role)`` on a
planted fault. Defaults: 4 envs x 64 steps = 256 samples, 4 epochs x 4 minibatches of 64 = 16 optimizer steps
per rollout, 6 rollouts (96 steps, about a second on one CPU thread).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Categorical
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, IterableDataset

from lightning_ppo_guard import observe
from lightning_ppo_guard.reference import CartPolePPOAuto, PPOConfig
from lightning_ppo_guard.reference import trainer_kwargs as reference_kwargs
from lightning_ppo_guard.reference._common import VecCartPole, compute_gae, layer_init
from tests.zoo import Variant

__all__ = [
    "VARIANTS",
    "ActorCriticPolicy",
    "AuxHeadPPO",
    "LayerListPPO",
    "LazyLinearPPO",
    "MlpExtractor",
    "NaiveNormPPO",
    "PolicyMLP",
    "RawOptimizerPPO",
    "SB3StylePPO",
    "SparseEmbeddingPPO",
    "StyleConfig",
    "StylePPO",
    "StylePPOAuto",
    "TwoHeadPPO",
    "TwoOptimizerPPO",
    "ValidatedPPO",
    "ValueMLP",
    "trainer_kwargs",
]

OBS_DIM, N_ACTIONS = VecCartPole.obs_dim, VecCartPole.num_actions


@dataclass
class StyleConfig:
    """Hyperparameters and knobs of the user-style PPO (the knobs default to off)."""

    num_envs: int = 4
    num_steps: int = 64
    iterations: int = 6
    """PPO iterations (rollouts) per Lightning epoch."""
    epochs: int = 4
    minibatch_size: int = 64
    lr: float = 1e-3
    """Policy learning rate."""
    vf_lr: float = 1e-3
    gamma: float = 0.98
    lam: float = 0.8
    clip: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    hidden: int = 64
    seed: int = 0
    warmup: int = 0
    """``LambdaLR(lambda s: min(1, s / warmup))``: lr 0 at the first scheduler step; stepped per optimizer step
    in :class:`StylePPOAuto`, per iteration in :class:`StylePPO`."""
    decay_to_zero: str | None = None
    """``"cosine"`` (``CosineAnnealingLR(eta_min=0)``) or ``"linear"``: the last iteration runs at lr exactly 0."""
    frozen_input_layer: bool = False
    """The policy's input layer gets its own param group with lr 0 (a deliberate freeze)."""
    checkpoint_middle: str | None = None
    """``"reentrant"`` / ``"non_reentrant"``: the policy's middle block runs under activation checkpointing."""
    values_2d: bool = False
    """The value function returns ``(B, 1)`` and the returns buffer is ``(B, 1)``."""
    actor_lr_drop_at: int | None = None
    """:class:`TwoOptimizerPPO`: a ``MultiStepLR`` milestone (in actor updates) with a gamma typo (1e-6)."""
    observe: str = "full"
    """The SB3 layout's observe call: ``"full"`` or ``"minimal"`` (new_logp, old_logp, advantages)."""
    fault: str | None = None
    """``"detached_logits"``, ``"actor_not_in_optimizer"``, ``"nan_advantage"`` or, on the SB3 layout,
    ``"value_head_unbound"`` (``policy.value_net`` left out of the optimizer); lr 0 is ``lr=0.0``."""

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def minibatches(self) -> int:
        return math.ceil(self.batch_size / self.minibatch_size)

    @property
    def steps_per_rollout(self) -> int:
        """Optimizer steps per rollout with one optimizer."""
        return self.epochs * self.minibatches


# ------------------------------------------------------------------------------------------------ networks
class PolicyMLP(nn.Module):
    """obs -> logits through an input block, a middle block (optionally checkpointed) and a linear head."""

    def __init__(self, hidden: int, n_out: int = N_ACTIONS, checkpoint_middle: str | None = None) -> None:
        super().__init__()
        self.inp = nn.Sequential(layer_init(nn.Linear(OBS_DIM, hidden)), nn.Tanh())
        self.mid = nn.Sequential(layer_init(nn.Linear(hidden, hidden)), nn.Tanh())
        self.head = layer_init(nn.Linear(hidden, n_out), std=0.01)
        self.checkpoint_middle = checkpoint_middle

    def forward(self, obs: Tensor) -> Tensor:
        h = self.inp(obs)
        if self.checkpoint_middle and torch.is_grad_enabled():  # save memory only where a backward follows
            h = checkpoint(self.mid, h, use_reentrant=self.checkpoint_middle == "reentrant")
        else:
            h = self.mid(h)
        return self.head(h)


class ValueMLP(nn.Module):
    """obs -> V(s), shape ``(B,)`` (or ``(B, 1)`` with ``keepdim``)."""

    def __init__(self, hidden: int, keepdim: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(
            layer_init(nn.Linear(OBS_DIM, hidden)), nn.Tanh(),
            layer_init(nn.Linear(hidden, hidden)), nn.Tanh(),
            layer_init(nn.Linear(hidden, 1), std=1.0),
        )
        self.keepdim = keepdim

    def forward(self, obs: Tensor) -> Tensor:
        v = self.net(obs)
        return v if self.keepdim else v.squeeze(-1)


# ------------------------------------------------------------------------------------------- the PPO module
class StylePPO(L.LightningModule):
    """PPO with MANUAL optimization: one ``training_step`` collects a rollout and runs its update phase."""

    def __init__(self, cfg: StyleConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else StyleConfig()
        self.automatic_optimization = False
        with torch.random.fork_rng():
            torch.manual_seed(self.cfg.seed)
            self.build_networks()
        self.iteration = 0
        self.episode_returns: list[float] = []
        self._env: VecCartPole | None = None
        self._perm = torch.Generator().manual_seed(self.cfg.seed)

    def build_networks(self) -> None:
        cfg = self.cfg
        self.pi = PolicyMLP(cfg.hidden, checkpoint_middle=cfg.checkpoint_middle)
        self.vf = ValueMLP(cfg.hidden, keepdim=cfg.values_2d)

    # ----------------------------------------------------------------------------------- the model
    def get_dist(self, obs: Tensor) -> Categorical:
        logits = self.pi(obs)
        if self.cfg.fault == "detached_logits":
            logits = logits.detach()
        return Categorical(logits=logits, validate_args=False)  # no per-call argument checks, for speed

    def get_value(self, obs: Tensor) -> Tensor:
        return self.vf(obs)

    def logp_and_entropy(self, dist: Categorical, action: Tensor) -> tuple[Tensor, Tensor]:
        return dist.log_prob(action), dist.entropy()

    def env_action(self, action: Tensor) -> Tensor:
        """The part of the sampled action the environment gets."""
        return action

    # ---------------------------------------------------------------------------------- optimizers
    def configure_optimizers(self) -> Any:
        cfg = self.cfg
        if cfg.frozen_input_layer:  # pretrained input features, kept fixed
            pi_groups = [{"params": self.pi.inp.parameters(), "lr": 0.0},
                         {"params": [*self.pi.mid.parameters(), *self.pi.head.parameters()], "lr": cfg.lr}]
        else:
            pi_groups = [{"params": self.pi.parameters(), "lr": cfg.lr}]
        if cfg.fault == "actor_not_in_optimizer":
            pi_groups = []  # "the policy has its own optimizer" -- that was never written
        opt = torch.optim.Adam([*pi_groups, {"params": self.vf.parameters(), "lr": cfg.vf_lr}], eps=1e-5)
        sched = self.make_scheduler(opt)
        if sched is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": self.scheduler_config(sched)}

    def make_scheduler(self, opt: torch.optim.Optimizer) -> Any:
        cfg = self.cfg
        if cfg.warmup:
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / cfg.warmup))
        last = cfg.iterations - 1  # the scheduler is stepped after each iteration: the last one runs at lr(last)
        if cfg.decay_to_zero == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=last, eta_min=0.0)
        if cfg.decay_to_zero == "linear":
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0 - it / last)
        return None

    def scheduler_config(self, sched: Any) -> dict[str, Any]:
        return {"scheduler": sched}  # manual optimization: stepped by hand in training_step

    # -------------------------------------------------------------------------------------- rollout
    @torch.no_grad()
    def collect(self, env: VecCartPole | None = None) -> dict[str, Tensor]:
        """One rollout of ``num_steps`` x ``num_envs``, flattened; every sample is kept."""
        cfg = self.cfg
        if env is None:
            if self._env is None:
                self._env = VecCartPole(cfg.num_envs, seed=cfg.seed)
            env = self._env

        def as_t(x: Any, dtype: torch.dtype = torch.float32) -> Tensor:
            return torch.as_tensor(x, dtype=dtype, device=self.device)

        steps: dict[str, list[Tensor]] = {k: [] for k in ("obs", "act", "logp", "val", "rew", "term", "trunc",
                                                          "next_obs")}
        for _ in range(cfg.num_steps):
            obs = as_t(env.obs)
            dist = self.get_dist(obs)
            action = dist.sample()
            out = env.step(self.env_action(action).cpu().numpy())
            steps["obs"].append(obs)
            steps["act"].append(action)
            steps["logp"].append(self.logp_and_entropy(dist, action)[0])
            steps["val"].append(self.get_value(obs).reshape(-1))
            steps["rew"].append(as_t(out["reward"]))
            steps["term"].append(as_t(out["terminated"], torch.bool))
            steps["trunc"].append(as_t(out["truncated"], torch.bool))
            steps["next_obs"].append(as_t(env.obs))
        buf = {k: torch.stack(v) for k, v in steps.items()}
        last_value = self.get_value(as_t(env.obs)).reshape(-1)
        adv, ret = compute_gae(buf["rew"], buf["val"], last_value, buf["term"], buf["trunc"], cfg.gamma, cfg.lam)
        if cfg.fault == "nan_advantage":
            adv[0, 0] = float("nan")  # one poisoned advantage (a NaN reward from a broken wrapper does the same)
        finished = env.pop_finished_returns()
        if env is self._env:  # training episodes only (not a held-out env's)
            self.episode_returns.extend(finished)
        buf.update(adv=adv, ret=ret)
        batch = {k: buf[k].reshape(cfg.batch_size, *buf[k].shape[2:]) for k in ("obs", "act", "logp", "adv", "ret",
                                                                                   "next_obs")}
        if cfg.values_2d:
            batch["ret"] = batch["ret"].unsqueeze(-1)  # the critic's (B, 1) convention
        return batch

    def minibatches(self, n: int) -> list[Tensor]:
        perm = torch.randperm(n, generator=self._perm).to(self.device)
        return list(perm.split(self.cfg.minibatch_size))

    # --------------------------------------------------------------------------------------- update
    def normalise(self, adv: Tensor) -> Tensor:
        if len(adv) > 1:  # as SB3: the std of a single sample is NaN
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        return adv

    def ppo_loss(self, mb: dict[str, Tensor], rollout: int) -> Tensor:
        """Clipped surrogate + value regression - entropy bonus of one minibatch; hands it to the guard."""
        cfg = self.cfg
        dist = self.get_dist(mb["obs"])
        logp, entropy = self.logp_and_entropy(dist, mb["act"])
        adv = self.normalise(mb["adv"])
        ratio = torch.exp(logp - mb["logp"])
        surrogate = torch.min(ratio * adv, ratio.clamp(1.0 - cfg.clip, 1.0 + cfg.clip) * adv)
        value = self.get_value(mb["obs"])
        loss = -surrogate.mean() + cfg.vf_coef * F.mse_loss(value, mb["ret"]) - cfg.ent_coef * entropy.mean()
        observe(self, new_logp=logp, old_logp=mb["logp"], advantages=adv, clip_eps=cfg.clip, dist=dist,
                values=value, returns=mb["ret"], rollout=rollout)
        return loss

    def train_dataloader(self) -> DataLoader:
        return DataLoader(range(self.cfg.iterations), batch_size=None)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        cfg = self.cfg
        data = self.collect()
        for _ in range(cfg.epochs):
            for idx in self.minibatches(len(data["obs"])):
                self.update({k: v[idx] for k, v in data.items()}, rollout=self.iteration)
        self.after_policy_phase(data)
        self.iteration += 1
        if cfg.warmup or cfg.decay_to_zero:
            self.lr_schedulers().step()  # type: ignore[union-attr]

    def after_policy_phase(self, data: dict[str, Tensor]) -> None:
        """After a rollout's PPO epochs (an auxiliary phase goes here); nothing by default."""

    def update(self, mb: dict[str, Tensor], rollout: int) -> None:
        opt = self.optimizers()
        loss = self.ppo_loss(mb, rollout)
        opt.zero_grad()
        self.manual_backward(loss)
        self.clip_gradients(opt, gradient_clip_val=self.cfg.max_grad_norm, gradient_clip_algorithm="norm")
        opt.step()

    def on_fit_end(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None


class MinibatchStream(IterableDataset):
    """Per iteration: a fresh rollout, then ``epochs`` shuffled passes of minibatches (with the rollout index).

    ``__len__`` keeps Lightning from prefetching: the next rollout is collected after the last update.
    """

    def __init__(self, module: StylePPO) -> None:
        super().__init__()
        self.module = module

    def __len__(self) -> int:
        return self.module.cfg.iterations * self.module.cfg.steps_per_rollout

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        m = self.module
        for it in range(m.cfg.iterations):
            data = m.collect()
            for _ in range(m.cfg.epochs):
                for idx in m.minibatches(len(data["obs"])):
                    yield {**{k: v[idx] for k, v in data.items()}, "rollout": torch.tensor(it)}


class StylePPOAuto(StylePPO):
    """The same PPO with AUTOMATIC optimization: one ``training_step`` per minibatch, clipping by the Trainer."""

    def __init__(self, cfg: StyleConfig | None = None) -> None:
        super().__init__(cfg)
        self.automatic_optimization = True

    def scheduler_config(self, sched: Any) -> dict[str, Any]:
        every = 1 if self.cfg.warmup else self.cfg.steps_per_rollout  # warm-up per step, decay per iteration
        return {"scheduler": sched, "interval": "step", "frequency": every}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(MinibatchStream(self), batch_size=None)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        rollout = int(batch.pop("rollout"))
        return self.ppo_loss(batch, rollout)


# ------------------------------------------------------------------------------------------ the subclasses
class AuxPolicy(nn.Module):
    """A trunk feeding the policy head, and an auxiliary head predicting the next observation."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(layer_init(nn.Linear(OBS_DIM, hidden)), nn.Tanh(),
                                   layer_init(nn.Linear(hidden, hidden)), nn.Tanh())
        self.logits = layer_init(nn.Linear(hidden, N_ACTIONS), std=0.01)
        self.next_obs = nn.Sequential(layer_init(nn.Linear(hidden + N_ACTIONS, hidden)), nn.Tanh(),
                                      layer_init(nn.Linear(hidden, OBS_DIM), std=1.0))

    def forward(self, obs: Tensor) -> Tensor:
        return self.logits(self.trunk(obs))

    def predict_next_obs(self, obs: Tensor, action: Tensor) -> Tensor:
        return self.next_obs(torch.cat([self.trunk(obs), F.one_hot(action, N_ACTIONS).float()], dim=-1))


class AuxHeadPPO(StylePPO):
    """The policy carries a next-observation head trained by an extra loss term (self-supervised auxiliary)."""

    aux_coef = 0.5

    def build_networks(self) -> None:
        self.pi = AuxPolicy(self.cfg.hidden)
        self.vf = ValueMLP(self.cfg.hidden)

    def ppo_loss(self, mb: dict[str, Tensor], rollout: int) -> Tensor:
        aux = F.mse_loss(self.pi.predict_next_obs(mb["obs"], mb["act"]), mb["next_obs"])
        return super().ppo_loss(mb, rollout) + self.aux_coef * aux


class PhasicAuxPPO(AuxHeadPPO):
    """Phasic Policy Gradient's layout: the aux head is trained only in an auxiliary phase of its own (its own loss,
    backward and optimizer steps after each rollout's policy phase), so at the policy steps it gets no gradient and
    the last steps of each rollout build no policy or value loss."""

    def ppo_loss(self, mb: dict[str, Tensor], rollout: int) -> Tensor:
        return StylePPO.ppo_loss(self, mb, rollout)

    def after_policy_phase(self, data: dict[str, Tensor]) -> None:
        opt = self.optimizers()
        for idx in self.minibatches(len(data["obs"])):  # the auxiliary phase
            aux = F.mse_loss(self.pi.predict_next_obs(data["obs"][idx], data["act"][idx]), data["next_obs"][idx])
            opt.zero_grad()
            self.manual_backward(aux)
            opt.step()


class SeparateAuxStepPPO(AuxHeadPPO):
    """The aux loss backward'ed and stepped on its own (same optimizer) before each policy minibatch's step."""

    def ppo_loss(self, mb: dict[str, Tensor], rollout: int) -> Tensor:
        return StylePPO.ppo_loss(self, mb, rollout)

    def update(self, mb: dict[str, Tensor], rollout: int) -> None:
        opt = self.optimizers()
        aux = F.mse_loss(self.pi.predict_next_obs(mb["obs"], mb["act"]), mb["next_obs"])
        opt.zero_grad()
        self.manual_backward(aux)
        opt.step()
        super().update(mb, rollout)


class MlpExtractor(nn.Module):
    """SB3's ``MlpExtractor``: separate policy and value MLPs on the extracted features."""

    def __init__(self, feature_dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.policy_net = nn.Sequential(nn.Linear(feature_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.value_net = nn.Sequential(nn.Linear(feature_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.latent_dim_pi = self.latent_dim_vf = hidden

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        return self.forward_actor(features), self.forward_critic(features)

    def forward_actor(self, features: Tensor) -> Tensor:
        return self.policy_net(features)

    def forward_critic(self, features: Tensor) -> Tensor:
        return self.value_net(features)


class ActorCriticPolicy(nn.Module):
    """SB3's discrete ``ActorCriticPolicy``: features extractor, ``mlp_extractor``, ``action_net``, ``value_net``."""

    def __init__(self, hidden: int = 64, detach_logits: bool = False) -> None:
        super().__init__()
        self.features_extractor = nn.Flatten()
        self.mlp_extractor = MlpExtractor(OBS_DIM, hidden)
        self.action_net = nn.Linear(self.mlp_extractor.latent_dim_pi, N_ACTIONS)
        self.value_net = nn.Linear(self.mlp_extractor.latent_dim_vf, 1)
        self.detach_logits = detach_logits
        # SB3's ortho_init gains
        for module, gain in ((self.mlp_extractor, math.sqrt(2)), (self.action_net, 0.01), (self.value_net, 1.0)):
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    layer_init(layer, std=gain)

    def _get_action_dist_from_latent(self, latent_pi: Tensor) -> Categorical:
        action_logits = self.action_net(latent_pi)
        if self.detach_logits:
            action_logits = action_logits.detach()
        return Categorical(logits=action_logits)

    def get_distribution(self, obs: Tensor) -> Categorical:
        return self._get_action_dist_from_latent(self.mlp_extractor.forward_actor(self.features_extractor(obs)))

    def predict_values(self, obs: Tensor) -> Tensor:
        return self.value_net(self.mlp_extractor.forward_critic(self.features_extractor(obs)))

    def evaluate_actions(self, obs: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        latent_pi, latent_vf = self.mlp_extractor(self.features_extractor(obs))
        distribution = self._get_action_dist_from_latent(latent_pi)
        return self.value_net(latent_vf), distribution.log_prob(actions), distribution.entropy()


class SB3StylePPO(StylePPO):
    """``self.policy`` is an SB3-style ``ActorCriticPolicy``; the update is the body of SB3's ``PPO.train``."""

    def build_networks(self) -> None:
        self.policy = ActorCriticPolicy(self.cfg.hidden, detach_logits=self.cfg.fault == "detached_logits")

    def get_dist(self, obs: Tensor) -> Categorical:
        return self.policy.get_distribution(obs)

    def get_value(self, obs: Tensor) -> Tensor:
        return self.policy.predict_values(obs).flatten()

    def configure_optimizers(self) -> Any:
        params = self.policy.parameters()
        if self.cfg.fault == "value_head_unbound":  # "the value head is trained elsewhere" -- it is not
            params = [p for name, p in self.policy.named_parameters() if not name.startswith("value_net.")]
        return torch.optim.Adam(params, lr=self.cfg.lr, eps=1e-5)

    def ppo_loss(self, mb: dict[str, Tensor], rollout: int) -> Tensor:
        cfg, clip_range = self.cfg, self.cfg.clip
        values, log_prob, entropy = self.policy.evaluate_actions(mb["obs"], mb["act"])
        values = values.flatten()
        advantages = mb["adv"]
        if len(advantages) > 1:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        ratio = torch.exp(log_prob - mb["logp"])
        policy_loss_1 = advantages * ratio
        policy_loss_2 = advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
        policy_loss = -torch.min(policy_loss_1, policy_loss_2).mean()
        value_loss = F.mse_loss(mb["ret"], values)
        entropy_loss = -torch.mean(entropy)
        loss = policy_loss + cfg.ent_coef * entropy_loss + cfg.vf_coef * value_loss
        if cfg.observe == "minimal":
            observe(self, new_logp=log_prob, old_logp=mb["logp"], advantages=advantages)
            return loss
        observe(self, new_logp=log_prob, old_logp=mb["logp"], advantages=advantages, clip_eps=clip_range,
                entropy=entropy, num_actions=N_ACTIONS, values=values, returns=mb["ret"], rollout=rollout)
        return loss


class HeldOutRollout(IterableDataset):
    """A rollout of the current policy on a held-out env (its own seed), as one pass of minibatches."""

    def __init__(self, module: StylePPO) -> None:
        super().__init__()
        self.module = module
        self.env: VecCartPole | None = None

    def __len__(self) -> int:
        return self.module.cfg.minibatches

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        m = self.module
        if self.env is None:
            self.env = VecCartPole(m.cfg.num_envs, seed=m.cfg.seed + 10_000)
        data = m.collect(self.env)
        for idx in m.minibatches(len(data["obs"])):
            yield {k: v[idx] for k, v in data.items()}


class ValidatedPPO(StylePPO):
    """A validation loop every epoch computes the same loss helper (and so reaches ``observe``)."""

    def val_dataloader(self) -> DataLoader:
        return DataLoader(HeldOutRollout(self), batch_size=None)

    def validation_step(self, mb: dict[str, Tensor], batch_idx: int) -> None:
        self.log("val/ppo_loss", self.ppo_loss(mb, rollout=self.iteration))


class TwoOptimizerPPO(StylePPO):
    """``self.policy_model`` / ``self.value_model``, one Adam each, stepped critic first, then actor."""

    def build_networks(self) -> None:
        self.policy_model = PolicyMLP(self.cfg.hidden)
        self.value_model = ValueMLP(self.cfg.hidden)

    def get_dist(self, obs: Tensor) -> Categorical:
        return Categorical(logits=self.policy_model(obs))

    def get_value(self, obs: Tensor) -> Tensor:
        return self.value_model(obs)

    def configure_optimizers(self) -> Any:
        cfg = self.cfg
        pi_opt = torch.optim.Adam(self.policy_model.parameters(), lr=cfg.lr, eps=1e-5)
        vf_opt = torch.optim.Adam(self.value_model.parameters(), lr=cfg.vf_lr, eps=1e-5)
        if cfg.actor_lr_drop_at is None:
            return [pi_opt, vf_opt]
        drop = torch.optim.lr_scheduler.MultiStepLR(pi_opt, milestones=[cfg.actor_lr_drop_at], gamma=1e-6)
        return [pi_opt, vf_opt], [drop]

    def update(self, mb: dict[str, Tensor], rollout: int) -> None:
        pi_opt, vf_opt = self.optimizers()
        loss = self.ppo_loss(mb, rollout)
        pi_opt.zero_grad()
        vf_opt.zero_grad()
        self.manual_backward(loss)
        for opt in (vf_opt, pi_opt):
            self.clip_gradients(opt, gradient_clip_val=self.cfg.max_grad_norm, gradient_clip_algorithm="norm")
        vf_opt.step()
        pi_opt.step()
        if self.cfg.actor_lr_drop_at is not None:
            self.lr_schedulers().step()  # type: ignore[union-attr]


class RawOptimizerPPO(TwoOptimizerPPO):
    """The same two Adams taken unwrapped (``self.optimizers(use_pl_optimizer=False)``), clipped with
    ``clip_grad_norm_`` and stepped by hand: Lightning announces none of these steps (no
    ``on_before_optimizer_step``) and counts none in ``global_step``."""

    def update(self, mb: dict[str, Tensor], rollout: int) -> None:
        pi_opt, vf_opt = self.optimizers(use_pl_optimizer=False)
        loss = self.ppo_loss(mb, rollout)
        pi_opt.zero_grad()
        vf_opt.zero_grad()
        self.manual_backward(loss)
        for net in (self.value_model, self.policy_model):
            nn.utils.clip_grad_norm_(net.parameters(), self.cfg.max_grad_norm)
        vf_opt.step()
        pi_opt.step()
        if self.cfg.actor_lr_drop_at is not None:
            self.lr_schedulers().step()  # type: ignore[union-attr]


class BinnedPolicy(nn.Module):
    """Embeds the discretised observation (one bin index per dimension, ``sparse=True``) next to the raw one."""

    def __init__(self, hidden: int, bins: int = 8, emb_dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(OBS_DIM * bins, emb_dim, sparse=True)
        self.mlp = nn.Sequential(layer_init(nn.Linear(OBS_DIM + emb_dim, hidden)), nn.Tanh(),
                                 layer_init(nn.Linear(hidden, hidden)), nn.Tanh(),
                                 layer_init(nn.Linear(hidden, N_ACTIONS), std=0.01))
        self.register_buffer("scale", torch.tensor([2.4, 3.0, 0.21, 3.0]))
        self.register_buffer("edges", torch.linspace(-1.0, 1.0, bins - 1))
        self.register_buffer("offset", torch.arange(OBS_DIM) * bins)

    def forward(self, obs: Tensor) -> Tensor:
        idx = torch.bucketize(obs / self.scale, self.edges) + self.offset
        return self.mlp(torch.cat([obs, self.embed(idx).sum(dim=1)], dim=-1))


class SparseEmbeddingPPO(StylePPO):
    """A sparse ``nn.Embedding`` in the policy, optimised by ``SparseAdam`` next to ``Adam`` for the rest."""

    def build_networks(self) -> None:
        self.pi = BinnedPolicy(self.cfg.hidden)
        self.vf = ValueMLP(self.cfg.hidden)

    def configure_optimizers(self) -> Any:
        dense = [p for name, p in self.named_parameters() if not name.startswith("pi.embed.")]
        return [torch.optim.Adam(dense, lr=self.cfg.lr, eps=1e-5),
                torch.optim.SparseAdam(self.pi.embed.parameters(), lr=self.cfg.lr)]

    def update(self, mb: dict[str, Tensor], rollout: int) -> None:
        dense_opt, sparse_opt = self.optimizers()
        loss = self.ppo_loss(mb, rollout)
        dense_opt.zero_grad()
        sparse_opt.zero_grad()
        self.manual_backward(loss)
        # clip_grad_norm_ has no sparse kernel: clip the dense parameters only
        self.clip_gradients(dense_opt, gradient_clip_val=self.cfg.max_grad_norm, gradient_clip_algorithm="norm")
        dense_opt.step()
        sparse_opt.step()


class LazyLinearPPO(StylePPO):
    """The policy's input layer is an ``nn.LazyLinear``, materialised by the first rollout's forward."""

    def build_networks(self) -> None:
        hidden = self.cfg.hidden
        self.pi = nn.Sequential(nn.LazyLinear(hidden), nn.Tanh(), layer_init(nn.Linear(hidden, hidden)), nn.Tanh(),
                                layer_init(nn.Linear(hidden, N_ACTIONS), std=0.01))
        self.vf = ValueMLP(hidden)


class LazyEverywherePPO(StylePPO):
    """Every layer of the actor and the critic is lazy: at fit start neither role has a materialised tensor."""

    def build_networks(self) -> None:
        hidden = self.cfg.hidden
        self.pi = nn.Sequential(nn.LazyLinear(hidden), nn.Tanh(), nn.LazyLinear(N_ACTIONS))
        self.vf = nn.Sequential(nn.LazyLinear(hidden), nn.Tanh(), nn.LazyLinear(1))

    def get_value(self, obs: Tensor) -> Tensor:
        return self.vf(obs).reshape(-1)


class TwoHeadPPO(StylePPO):
    """A factored action: two independent categorical heads, log-prob and entropy summed over the heads.

    The env wrapper uses head 0 (push left/right) and ignores head 1 (a second binary choice).
    """

    heads = 2

    def build_networks(self) -> None:
        self.pi = PolicyMLP(self.cfg.hidden, n_out=self.heads * N_ACTIONS)
        self.vf = ValueMLP(self.cfg.hidden)

    def get_dist(self, obs: Tensor) -> Categorical:
        return Categorical(logits=self.pi(obs).view(-1, self.heads, N_ACTIONS))  # batch_shape (B, heads)

    def logp_and_entropy(self, dist: Categorical, action: Tensor) -> tuple[Tensor, Tensor]:
        return dist.log_prob(action).sum(-1), dist.entropy().sum(-1)

    def env_action(self, action: Tensor) -> Tensor:
        return action[:, 0]


class NaiveNormPPO(StylePPO):
    """Advantage normalisation without SB3's one-sample check: a minibatch of one sample gets std NaN."""

    def normalise(self, adv: Tensor) -> Tensor:
        return (adv - adv.mean()) / (adv.std() + 1e-8)


class LayerListPPO(StylePPO):
    """The actor held as an ``nn.ModuleList`` of its layers, applied in sequence (not one module per agent)."""

    def build_networks(self) -> None:
        hidden = self.cfg.hidden
        self.actor = nn.ModuleList([layer_init(nn.Linear(OBS_DIM, hidden)), nn.Tanh(),
                                    layer_init(nn.Linear(hidden, N_ACTIONS), std=0.01)])
        self.critic = ValueMLP(hidden)

    def get_dist(self, obs: Tensor) -> Categorical:
        h = obs
        for layer in self.actor:
            h = layer(h)
        return Categorical(logits=h)

    def get_value(self, obs: Tensor) -> Tensor:
        return self.critic(obs)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.cfg.lr, eps=1e-5)


# ---------------------------------------------------------------------------------------------- variants
def trainer_kwargs(module: StylePPO, **extra: Any) -> dict[str, Any]:
    """One Lightning epoch of ``cfg.iterations`` rollouts on the CPU (automatic modules clip in the Trainer)."""
    kwargs: dict[str, Any] = {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "log_every_n_steps": 1}
    if module.automatic_optimization:
        kwargs.update(gradient_clip_val=module.cfg.max_grad_norm, gradient_clip_algorithm="norm")
    return {**kwargs, **extra}


def _fit(module: StylePPO, **extra: Any) -> tuple[StylePPO, dict[str, Any]]:
    return module, trainer_kwargs(module, **extra)


def warmup_per_step(seed: int) -> tuple[Any, dict[str, Any]]:
    """Transformer-style linear warm-up from lr 0 (``LambdaLR(min(1, s/10))``), stepped per optimizer step in
    automatic optimization: the first step runs at lr exactly 0, the tenth at full lr."""
    return _fit(StylePPOAuto(StyleConfig(seed=seed, warmup=10)))


def warmup_per_iteration(seed: int) -> tuple[Any, dict[str, Any]]:
    """The same warm-up lambda stepped once per PPO iteration (manual optimization): the whole first rollout
    (16 steps) runs at lr exactly 0, full lr from the eleventh rollout on."""
    return _fit(StylePPO(StyleConfig(seed=seed, warmup=10, iterations=12)))


def cosine_to_zero(seed: int) -> tuple[Any, dict[str, Any]]:
    """``CosineAnnealingLR(T_max=<scheduler steps>, eta_min=0)`` stepped after each iteration: the schedule
    ends at exactly 0, so the last rollout's 16 updates run at lr 0 (users count T_max as the steps taken)."""
    return _fit(StylePPO(StyleConfig(seed=seed, decay_to_zero="cosine")))


def linear_to_zero(seed: int) -> tuple[Any, dict[str, Any]]:
    """Linear decay to 0 over the iterations (SB3's ``linear_schedule``, whose last update phase runs at
    progress 0), in automatic optimization with the scheduler stepped every rollout's worth of steps."""
    return _fit(StylePPOAuto(StyleConfig(seed=seed, decay_to_zero="linear")))


def frozen_input_layer(seed: int) -> tuple[Any, dict[str, Any]]:
    """Per-layer learning rates with one layer at lr 0: pretrained input features frozen on purpose (its own
    param group), while the rest of the policy learns at 1e-3."""
    return _fit(StylePPO(StyleConfig(seed=seed, frozen_input_layer=True)))


def aux_head(seed: int) -> tuple[Any, dict[str, Any]]:
    """Auxiliary self-supervised losses (UNREAL, SPR, world-model heads): the policy module holds a
    next-observation head the policy never uses, trained by its own loss term added to the PPO loss."""
    return _fit(AuxHeadPPO(StyleConfig(seed=seed)))


def aux_head_own_phase(seed: int) -> tuple[Any, dict[str, Any]]:
    """Phasic Policy Gradient (Cobbe et al. 2021): the aux head is trained in an auxiliary phase after each policy
    phase, never at a policy step."""
    return _fit(PhasicAuxPPO(StyleConfig(seed=seed)))


def aux_head_own_step(seed: int) -> tuple[Any, dict[str, Any]]:
    """The aux loss stepped on its own before each policy step (its own backward and optimizer step)."""
    return _fit(SeparateAuxStepPPO(StyleConfig(seed=seed)))


def checkpointed_reentrant(seed: int) -> tuple[Any, dict[str, Any]]:
    """Activation checkpointing (``checkpoint(block, x, use_reentrant=True)``, the old default) on the policy's
    middle block, as users of large policies do to save memory: the autograd graph hides the block's weights
    behind one ``CheckpointFunctionBackward`` node."""
    return _fit(StylePPO(StyleConfig(seed=seed, checkpoint_middle="reentrant")))


def checkpointed_non_reentrant(seed: int) -> tuple[Any, dict[str, Any]]:
    """Activation checkpointing with ``use_reentrant=False`` (the recommended mode, saved-tensor hooks)."""
    return _fit(StylePPO(StyleConfig(seed=seed, checkpoint_middle="non_reentrant")))


def sb3_layout(seed: int) -> tuple[Any, dict[str, Any]]:
    """Stable-Baselines3 ported to Lightning: ``self.policy`` holds ``mlp_extractor`` (``policy_net``,
    ``value_net``), ``action_net`` and ``value_net``; one Adam over ``policy.parameters()``; ``PPOGuard()`` with
    no arguments must find the actor (``policy_net`` + ``action_net``) and the critic inside it."""
    return _fit(SB3StylePPO(StyleConfig(seed=seed)))


def sb3_layout_detached(seed: int) -> tuple[Any, dict[str, Any]]:
    """The SB3 layout with ``action_net(latent).detach()``: no policy gradient reaches the actor."""
    return _fit(SB3StylePPO(StyleConfig(seed=seed, fault="detached_logits", iterations=3)))


def sb3_layout_long(seed: int) -> tuple[Any, dict[str, Any]]:
    """The SB3 layout trained to the end (auto-detected roles): 150 rollouts of 256 env steps, ~10 s."""
    return _fit(SB3StylePPO(StyleConfig(seed=seed, iterations=SB3_LONG_ITERATIONS)))


def sb3_lr_huge(seed: int, observe: str = "full") -> tuple[Any, dict[str, Any]]:
    """The SB3 layout at lr 0.05 (50x its tuned 1e-3): each update phase jumps far from the rollout's policy."""
    return _fit(SB3StylePPO(StyleConfig(seed=seed, lr=0.05, iterations=8, observe=observe)))


def sb3_value_head_unbound(seed: int) -> tuple[Any, dict[str, Any]]:
    """The SB3 layout whose optimizer skips ``policy.value_net`` (a value head nested in the actor's module)."""
    return _fit(SB3StylePPO(StyleConfig(seed=seed, fault="value_head_unbound", iterations=2)))


def values_b1(seed: int) -> tuple[Any, dict[str, Any]]:
    """Critics that keep the trailing dim: values ``(B, 1)`` and returns ``(B, 1)`` (``F.mse_loss`` on equal
    shapes, correct), while the log-probs are ``(B,)``; both are handed to ``observe`` as they are."""
    return _fit(StylePPO(StyleConfig(seed=seed, values_2d=True)))


def validation_observe(seed: int) -> tuple[Any, dict[str, Any]]:
    """A validation loop over a held-out rollout every epoch that reuses the training loss helper, so
    ``observe`` is reached from ``validation_step`` (under ``inference_mode``) and the sanity check."""
    module = ValidatedPPO(StyleConfig(seed=seed, iterations=3))
    return _fit(module, max_epochs=2, check_val_every_n_epoch=1, num_sanity_val_steps=2)


def bf16_reference(seed: int) -> tuple[Any, dict[str, Any]]:
    """``Trainer(precision="bf16-mixed")`` on the reference automatic PPO: rollouts in fp32 (the dataloader runs
    outside autocast), updates in bf16 autocast, so the first ratio of a rollout is 1 only to bf16 precision."""
    module = CartPolePPOAuto(PPOConfig(seed=seed, total_timesteps=4 * 512))
    return module, {**reference_kwargs(module), "precision": "bf16-mixed"}


def bf16_styles(seed: int) -> tuple[Any, dict[str, Any]]:
    """``precision="bf16-mixed"`` on this module in automatic optimization."""
    return _fit(StylePPOAuto(StyleConfig(seed=seed)), precision="bf16-mixed")


def remainder_of_one(seed: int) -> tuple[Any, dict[str, Any]]:
    """A fixed minibatch size that does not divide the rollout: 3 envs x 43 steps = 129 = 64 + 64 + 1, so the
    last minibatch of every epoch holds one sample (normalisation skipped for it, as SB3 does)."""
    return _fit(StylePPO(StyleConfig(seed=seed, num_envs=3, num_steps=43)))


def two_optimizers(seed: int) -> tuple[Any, dict[str, Any]]:
    """Separate Adams for actor and critic in manual optimization, stepped critic first, then actor (two
    optimizer steps per minibatch: Lightning's ``global_step`` counts both)."""
    return _fit(TwoOptimizerPPO(StyleConfig(seed=seed)))


#: TwoOptimizerPPO: two optimizer steps per minibatch; the actor's lr drops at its 192nd update = step 384.
_TWO_OPT_STEPS_PER_ROLLOUT = 2 * StyleConfig().steps_per_rollout
_LR_DROP_STEP = 384


def two_optimizers_lr_drop(seed: int) -> tuple[Any, dict[str, Any]]:
    """Two optimizers, and a ``MultiStepLR`` on the actor's with a gamma typo (1e-6 for 0.1): from optimizer step
    384 on the actor trains at lr 1e-9 while the critic keeps learning."""
    cfg = StyleConfig(seed=seed, iterations=19, actor_lr_drop_at=_LR_DROP_STEP // 2)
    return _fit(TwoOptimizerPPO(cfg))


def raw_optimizers(seed: int) -> tuple[Any, dict[str, Any]]:
    """The two optimizers unwrapped and stepped by hand (``use_pl_optimizer=False``): no step is announced."""
    return _fit(RawOptimizerPPO(StyleConfig(seed=seed)))


def raw_optimizers_lr_drop(seed: int) -> tuple[Any, dict[str, Any]]:
    """Unwrapped optimizers and the actor's ``MultiStepLR`` gamma typo: lr 1e-9 from its 192nd update on."""
    cfg = StyleConfig(seed=seed, iterations=19, actor_lr_drop_at=_LR_DROP_STEP // 2)
    return _fit(RawOptimizerPPO(cfg))


def sparse_embedding(seed: int) -> tuple[Any, dict[str, Any]]:
    """Sparse gradients: an ``nn.Embedding(sparse=True)`` of the discretised observation inside the policy,
    optimised by its own ``SparseAdam`` next to ``Adam`` (recommender-style features, tile coding)."""
    return _fit(SparseEmbeddingPPO(StyleConfig(seed=seed)))


def lazy_linear(seed: int) -> tuple[Any, dict[str, Any]]:
    """Lazy modules: the policy's input layer is ``nn.LazyLinear``, uninitialised until the first rollout's
    forward (after ``configure_optimizers`` and the guard's fit start)."""
    return _fit(LazyLinearPPO(StyleConfig(seed=seed)))


def lazy_everywhere(seed: int) -> tuple[Any, dict[str, Any]]:
    """Both roles made of lazy modules only: no tensor of either exists at fit start (not a frozen actor)."""
    return _fit(LazyEverywherePPO(StyleConfig(seed=seed)))


def multi_categorical(seed: int) -> tuple[Any, dict[str, Any]]:
    """A multi-discrete action (two categorical heads as one ``Categorical`` of batch shape ``(B, 2)``), log-prob
    and entropy summed over the heads; the ``dist`` handed to ``observe`` is that per-head Categorical."""
    return _fit(TwoHeadPPO(StyleConfig(seed=seed)))


def nan_adv_one_sample(seed: int) -> tuple[Any, dict[str, Any]]:
    """Per-minibatch normalisation ``(adv - mean) / (std + 1e-8)`` with a one-sample remainder minibatch:
    ``std`` of one sample is NaN, the loss and every gradient after it are NaN (third update of the run). One
    rollout: the next one would stop the user's run anyway (sampling from NaN probabilities raises)."""
    return _fit(NaiveNormPPO(StyleConfig(seed=seed, num_envs=3, num_steps=43, iterations=1)))


def nan_adv_planted(seed: int) -> tuple[Any, dict[str, Any]]:
    """One NaN advantage in the rollout buffer (a NaN reward, a bad bootstrap): the minibatch holding it
    normalises to all-NaN advantages (one rollout, as above)."""
    return _fit(StylePPO(StyleConfig(seed=seed, fault="nan_advantage", iterations=1)))


def fault_detached(seed: int) -> tuple[Any, dict[str, Any]]:
    """``get_dist`` builds the Categorical from ``self.pi(obs).detach()``."""
    return _fit(StylePPO(StyleConfig(seed=seed, fault="detached_logits", iterations=3)))


def fault_detached_auto(seed: int) -> tuple[Any, dict[str, Any]]:
    """Detached logits in automatic optimization."""
    return _fit(StylePPOAuto(StyleConfig(seed=seed, fault="detached_logits", iterations=3)))


def fault_not_in_optimizer(seed: int) -> tuple[Any, dict[str, Any]]:
    """``configure_optimizers`` holds only the value function's parameters."""
    return _fit(StylePPO(StyleConfig(seed=seed, fault="actor_not_in_optimizer", iterations=3)))


def fault_lr_zero(seed: int) -> tuple[Any, dict[str, Any]]:
    """The policy's learning rate is 0 for the whole run (``StyleConfig(lr=0.0)``)."""
    return _fit(StylePPO(StyleConfig(seed=seed, lr=0.0, iterations=3)))


_ROLLOUT = StyleConfig().steps_per_rollout
SB3_LONG_ITERATIONS = 150
#: Mean return of the last 20 episodes a slow variant must reach on every seed (random play: ~22).
RETURN_TO_REACH = {"sb3-layout-long": 250.0}  # measured: 312, 404, 494 (seeds 0-2)
_ACTOR = "actor"
_NAN_ALLOWED = frozenset({"PPG901", "PPG902"})

VARIANTS: list[Variant] = [
    Variant("warmup-per-step", "schedule", warmup_per_step,
            note="lr 0 at step 0 only, rising over 10 steps: a warm-up is not a zero lr"),
    Variant("warmup-per-iteration", "schedule", warmup_per_iteration,
            note="the first rollout entirely at lr 0, then rising: a warm-up, not a zero lr"),
    Variant("cosine-to-zero", "schedule", cosine_to_zero,
            note="the last rollout at lr exactly 0 after a cosine decay: the schedule's end, not a stall"),
    Variant("linear-to-zero", "schedule", linear_to_zero,
            note="the last rollout at lr exactly 0 after a linear decay (automatic optimization)"),
    Variant("frozen-input-layer", "optimizer", frozen_input_layer,
            note="one layer at lr 0 on purpose, the rest of the actor learning: not an actor-lr-zero"),
    Variant("aux-next-obs-head", "layout", aux_head,
            note="the aux head is outside new_logp's graph but trained by its own loss: not logp-graph-misses-actor"),
    Variant("aux-head-own-phase", "layout", aux_head_own_phase,
            note="Phasic Policy Gradient: the aux head gets its gradient in an auxiliary phase, never at a policy "
                 "step (it moves between rollouts: not PPG102); the aux steps build no value loss (not PPG406)"),
    Variant("aux-head-own-step", "layout", aux_head_own_step,
            note="the aux loss stepped on its own before each policy step: not PPG102, not PPG406"),
    Variant("checkpoint-reentrant", "trainer-feature", checkpointed_reentrant,
            note="the checkpointed block's weights are reached through CheckpointFunctionBackward"),
    Variant("checkpoint-non-reentrant", "trainer-feature", checkpointed_non_reentrant,
            note="non-reentrant checkpointing keeps the ordinary graph"),
    Variant("sb3-layout", "layout", sb3_layout,
            note="SB3 ActorCriticPolicy under self.policy, auto-detected roles: actor and critic live inside it"),
    Variant("sb3-layout-detached-logits", "layout", sb3_layout_detached,
            expect=frozenset({("PPG101", _ACTOR)}), deadline=_ROLLOUT,
            note="action_net(latent).detach(): new_logp has no graph"),
    Variant("sb3-layout-long", "layout", sb3_layout_long, slow=True,
            note=f"the SB3 layout trained for {SB3_LONG_ITERATIONS} rollouts, auto-detected roles, seeds 0-2"),
    Variant("sb3-value-head-unbound", "layout", sb3_value_head_unbound,
            expect=frozenset({("PPG001", "critic")}), deadline=_ROLLOUT,
            note="policy.value_net (nested in the module that holds the actor) left out of the optimizer: PPG001 "
                 "for the critic at fit start"),
    Variant("values-b1", "shapes", values_b1,
            note="values/returns (B, 1) against (B,) log-probs: compared with each other only, no broadcast"),
    Variant("validation-step-observe", "trainer-feature", validation_observe,
            note="observe from validation_step (no grad by design) must not be read as training"),
    Variant("bf16-reference-auto", "precision", bf16_reference,
            note="bf16 autocast updates against fp32 rollout log-probs: the first ratio is 1 to bf16 precision"),
    Variant("bf16-styles-auto", "precision", bf16_styles,
            note="bf16-mixed on this module, automatic optimization"),
    Variant("remainder-minibatch-of-one", "loop", remainder_of_one,
            note="a one-sample minibatch has no advantage spread to measure, and is not degenerate advantages"),
    Variant("two-optimizers-critic-first", "optimizer", two_optimizers,
            guard_kwargs={"actors": "policy_model", "critic": "value_model"},
            note="actor and critic optimizers, the critic's stepped first"),
    Variant("two-optimizers-actor-lr-1e-9", "optimizer", two_optimizers_lr_drop,
            expect=frozenset({("PPG204", _ACTOR)}), deadline=_LR_DROP_STEP + 5 * _TWO_OPT_STEPS_PER_ROLLOUT,
            guard_kwargs={"actors": "policy_model", "critic": "value_model"},
            note="actor lr 1e-9 from step 384 (MultiStepLR gamma typo): update-too-small within 5 rollouts"),
    Variant("raw-optimizers", "optimizer", raw_optimizers,
            guard_kwargs={"actors": "policy_model", "critic": "value_model"},
            note="unwrapped optimizers stepped by hand: measured through their step pre-hooks, quiet"),
    Variant("raw-optimizers-actor-lr-1e-9", "optimizer", raw_optimizers_lr_drop,
            expect=frozenset({("PPG204", _ACTOR)}),
            guard_kwargs={"actors": "policy_model", "critic": "value_model"},
            note="unwrapped optimizers, actor lr 1e-9 from its 192nd update: update-too-small (Lightning's "
                 "global_step stays 0 without its optimizer wrapper, so the finding's step is 0: no deadline)"),
    Variant("sparse-embedding-sparseadam", "optimizer", sparse_embedding,
            note="sparse gradients (SparseAdam) in the actor: measured, not a crash"),
    Variant("lazy-linear", "layout", lazy_linear,
            note="an uninitialised LazyLinear at fit start, materialised by the first rollout"),
    Variant("lazy-everywhere", "layout", lazy_everywhere,
            note="every layer of actor and critic lazy: no tensor at fit start is no frozen actor (not PPG005/PPG006)"),
    Variant("multi-categorical-two-heads", "distribution", multi_categorical,
            note="a (B, 2)-batched Categorical whose log-prob and entropy are summed over the heads"),
    Variant("nan-adv-one-sample-std", "advantages", nan_adv_one_sample,
            expect=frozenset({("PPG401", _ACTOR)}), deadline=StyleConfig(num_envs=3, num_steps=43).steps_per_rollout,
            allowed=_NAN_ALLOWED,
            note="NaN advantages are named as such (PPG401 covers NaN); the NaN gradients and log-probs that "
                 "follow from them (PPG901/PPG902) may be named too"),
    Variant("nan-adv-planted", "advantages", nan_adv_planted,
            expect=frozenset({("PPG401", _ACTOR)}), deadline=_ROLLOUT, allowed=_NAN_ALLOWED,
            note="one NaN advantage in the buffer: PPG401; its NaN gradients/log-probs may be named too"),
    Variant("styles-detached-logits", "fault", fault_detached,
            expect=frozenset({("PPG101", _ACTOR)}), deadline=_ROLLOUT, note="get_dist on detached logits"),
    Variant("styles-detached-logits-auto", "fault", fault_detached_auto,
            expect=frozenset({("PPG101", _ACTOR)}), deadline=_ROLLOUT,
            note="detached logits, automatic optimization"),
    Variant("styles-actor-not-in-optimizer", "fault", fault_not_in_optimizer,
            expect=frozenset({("PPG001", _ACTOR)}), deadline=_ROLLOUT, note="only the value function is optimised"),
    Variant("styles-sb3-lr-huge", "fault", sb3_lr_huge, expect=frozenset({("PPG303", "actor")}),
            allowed=frozenset({"PPG503"}), deadline=5 * _ROLLOUT,
            note="SB3 layout at lr 0.05: approx_kl above 0.1 on 3 of 5 rollouts (0.16, 0.74, ..., 0.15), PPG303 within "
                 "5 rollouts; the policy may collapse to a deterministic one after (PPG503)"),
    Variant("styles-lr-zero", "fault", fault_lr_zero,
            expect=frozenset({("PPG003", _ACTOR)}), deadline=2 * _ROLLOUT,
            note="policy lr 0 for the whole run: named once the policy has not moved in two rollouts (a warm-up "
                 "from 0 rises within its first)"),
]
