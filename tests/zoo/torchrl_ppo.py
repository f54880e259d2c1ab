"""PPO built with the real TorchRL parts inside a LightningModule, as its tutorial writes it.

``ProbabilisticActor`` (a ``Categorical`` over CartPole's actions, or a ``TanhNormal`` on Pendulum), a
``ValueOperator``, TorchRL's ``GAE`` and ``ClipPPOLoss`` (``normalize_advantage=True``, its default smooth-L1 critic
loss; ``TorchRLArgs.loss`` picks ``KLPENPPOLoss`` or the unclipped ``PPOLoss`` instead); gymnasium vector envs
stepped by hand into ``TensorDict`` rollouts of shape ``(num_envs, num_steps)``, the time dimension last, as
TorchRL's value estimators want it. Manual optimization: one ``training_step`` is one PPO
iteration (``epochs`` x ``minibatches`` updates).

``TorchRLArgs.observe`` is how the module hands the guard its policy term:

* ``"watch"``: :func:`lightning_ppo_guard.integrations.torchrl.watch_loss` on the loss (no extra forward);
* ``"minimal"``: the README's call, ``observe(self, new_logp=..., old_logp=..., advantages=...)`` with a log-prob
  recomputed for the guard (the loss computes its own inside, so this copy is one no loss uses) and TorchRL's (B, 1)
  advantages.

Faults (``TorchRLArgs.fault``), each a mistake TorchRL users make:

* ``"old_logp_recomputed"``: the rollout keeps no log-prob (``return_log_prob=False``), and the update fills
  ``action_log_prob`` from the current policy under ``no_grad`` before each minibatch: the ratio is exactly 1.
* ``"loss_negated"``: ``loss = -out["loss_objective"] + ...`` (TorchRL's objective is already a loss to minimise).
* ``"entropy_sign"``: ``loss = ... - out["loss_entropy"]`` (its loss_entropy is already -coef * entropy).
* ``"lr_tiny"``: Adam at 1e-9.
* ``"actor_not_in_optimizer"``: the optimizer gets ``self.value_module.parameters()`` only.
* ``"tiny_rewards"``: rewards x 1e-5 and ``normalize_advantage=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from lightning_ppo_guard import observe
from tests.zoo.gym_loop import GymLoopPPO

FAULTS = ("old_logp_recomputed", "loss_negated", "entropy_sign", "lr_tiny", "actor_not_in_optimizer", "tiny_rewards")


@dataclass
class TorchRLArgs:
    env: str = "CartPole-v1"  # or "Pendulum-v1" (continuous, TanhNormal)
    seed: int = 0
    num_envs: int = 8
    num_steps: int = 64
    iterations: int = 8
    epochs: int = 4
    minibatches: int = 4
    lr: float = 3e-4
    gamma: float = 0.99
    lmbda: float = 0.95
    clip_epsilon: float = 0.2
    entropy_coeff: float = 0.01
    max_grad_norm: float = 0.5
    hidden: int = 64
    fault: str | None = None
    observe: str = "watch"  # "watch" (the integration) or "minimal" (the README's call)
    loss: str = "ClipPPOLoss"  # or "KLPENPPOLoss" (adaptive KL penalty), "PPOLoss" (the unclipped surrogate)


def _mlp(inp: int, out: int, hidden: int, std: float) -> nn.Sequential:
    last = nn.Linear(hidden, out)
    nn.init.orthogonal_(last.weight, std)
    nn.init.zeros_(last.bias)
    return nn.Sequential(nn.Linear(inp, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), last)


class TorchRLPPO(GymLoopPPO):
    """PPO with TorchRL's ``ClipPPOLoss`` (see the module docstring); ``recent_returns`` holds finished episodes."""

    def __init__(self, args: TorchRLArgs) -> None:
        super().__init__(args.env, args.num_envs, args.iterations, args.seed)
        from tensordict.nn import NormalParamExtractor, TensorDictModule
        from torchrl import objectives
        from torchrl.modules import ProbabilisticActor, TanhNormal, ValueOperator
        from torchrl.objectives.value import GAE

        if args.fault not in (None, *FAULTS):
            raise ValueError(f"fault must be one of {FAULTS} or None, got {args.fault!r}")
        self.args = args
        self.continuous = args.env.startswith("Pendulum")
        obs_dim, act = (3, 1) if self.continuous else (4, 2)
        with torch.random.fork_rng():
            torch.manual_seed(args.seed)
            if self.continuous:
                net = nn.Sequential(_mlp(obs_dim, 2 * act, args.hidden, 0.01), NormalParamExtractor())
                body = TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"])
                self.policy_module = ProbabilisticActor(
                    body, in_keys=["loc", "scale"], distribution_class=TanhNormal,
                    distribution_kwargs={"low": -2.0, "high": 2.0}, return_log_prob=args.fault != "old_logp_recomputed")
            else:
                body = TensorDictModule(_mlp(obs_dim, act, args.hidden, 0.01), in_keys=["observation"],
                                        out_keys=["logits"])
                self.policy_module = ProbabilisticActor(
                    body, in_keys=["logits"], distribution_class=torch.distributions.Categorical,
                    return_log_prob=args.fault != "old_logp_recomputed")
            self.value_module = ValueOperator(_mlp(obs_dim, 1, args.hidden, 1.0), in_keys=["observation"])
        self.advantage_module = GAE(gamma=args.gamma, lmbda=args.lmbda, value_network=self.value_module,
                                    average_gae=False)
        loss_cls = getattr(objectives, args.loss)
        extra = {"clip_epsilon": args.clip_epsilon} if args.loss == "ClipPPOLoss" else {}
        self.loss_module = loss_cls(
            self.policy_module, self.value_module, entropy_coeff=args.entropy_coeff,
            normalize_advantage=args.fault != "tiny_rewards", **extra)
        self.watch = None
        if args.observe == "watch":
            from lightning_ppo_guard.integrations.torchrl import watch_loss

            self.watch = watch_loss(self, self.loss_module)

    def configure_optimizers(self) -> Any:
        lr = 1e-9 if self.args.fault == "lr_tiny" else self.args.lr
        params = (list(self.value_module.parameters()) if self.args.fault == "actor_not_in_optimizer"
                  else list(self.policy_module.parameters()) + list(self.value_module.parameters()))
        return torch.optim.Adam(params, lr=lr, eps=1e-5)

    # ---------------------------------------------------------------------------------- rollout
    @torch.no_grad()
    def collect(self) -> Any:
        from tensordict import TensorDict
        from torchrl.envs.utils import ExplorationType, set_exploration_type

        a = self.args
        steps = []
        for _ in range(a.num_steps):
            obs = torch.as_tensor(self.env_obs(), dtype=torch.float32)
            with set_exploration_type(ExplorationType.RANDOM):  # TorchRL's actors act deterministically by default
                td = self.policy_module(TensorDict(observation=obs, batch_size=[a.num_envs]))
            _, reward, terminated, truncated, final = self.env_step(td["action"].numpy())
            done = terminated | truncated
            scale = 1e-5 if a.fault == "tiny_rewards" else (0.1 if self.continuous else 1.0)
            td.set("next", TensorDict(
                observation=torch.as_tensor(final, dtype=torch.float32),
                reward=torch.as_tensor(reward * scale, dtype=torch.float32).unsqueeze(-1),
                done=torch.as_tensor(done).unsqueeze(-1), terminated=torch.as_tensor(terminated).unsqueeze(-1),
                batch_size=[a.num_envs]))
            steps.append(td)
        data = torch.stack(steps, dim=1)  # (num_envs, num_steps): time last
        self.advantage_module(data)
        return data.reshape(-1)

    # ---------------------------------------------------------------------------------- update
    def training_step(self, batch: Any, batch_idx: int) -> None:
        a = self.args
        opt = cast(Any, self.optimizers())
        data = self.collect()
        if self.watch is not None:
            self.watch.rollout = int(batch)
        n = data.shape[0]
        for _epoch in range(a.epochs):
            perm = torch.as_tensor(self._rng.permutation(n))
            for idx in torch.tensor_split(perm, a.minibatches):
                mb = data[idx]
                if a.fault == "old_logp_recomputed":
                    with torch.no_grad():  # planted: "the old policy's log-prob", from the current policy
                        mb.set("action_log_prob", self.policy_module.get_dist(mb).log_prob(mb["action"]))
                out = self.loss_module(mb)
                objective = -out["loss_objective"] if a.fault == "loss_negated" else out["loss_objective"]
                entropy = -out["loss_entropy"] if a.fault == "entropy_sign" else out["loss_entropy"]
                loss = objective + out["loss_critic"] + entropy
                if "loss_kl" in out.keys():  # noqa: SIM118 (a TensorDict's keys)  KLPENPPOLoss: the adaptive KL penalty term
                    loss = loss + out["loss_kl"]
                if a.observe == "minimal":
                    new_logp = self.policy_module.get_dist(mb).log_prob(mb["action"])  # one more actor forward
                    observe(self, new_logp=new_logp, old_logp=mb["action_log_prob"], advantages=mb["advantage"])
                opt.zero_grad()
                self.manual_backward(loss)
                self.clip_gradients(opt, gradient_clip_val=a.max_grad_norm, gradient_clip_algorithm="norm")
                opt.step()
        self.log_returns()


def trainer_kwargs(module: TorchRLPPO) -> dict[str, Any]:
    return dict(max_epochs=1, accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                num_sanity_val_steps=0, log_every_n_steps=1)
