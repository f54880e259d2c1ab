"""Quickstart: a hand-written PPO LightningModule on CartPole with PPOGuard (pip install "lightning_ppo_guard[demo]").

    python quickstart.py                  # healthy: no finding
    python quickstart.py --fault detached # logits detached in the update: PPG101, with the fix and a docs link

The guard is one callback; the module adds one ``observe(...)`` call per minibatch, before backward.
"""

import argparse

import gymnasium as gym
import lightning as L
import torch
from torch import nn
from torch.distributions import Categorical

from lightning_ppo_guard import PPOGuard, observe


class PPO(L.LightningModule):
    def __init__(self, fault=None, num_envs=4, num_steps=64, epochs=4, minibatches=4, clip_eps=0.2):
        super().__init__()
        self.automatic_optimization = False  # one training_step = one PPO iteration
        self.fault, self.num_steps, self.epochs, self.minibatches, self.clip_eps = (
            fault, num_steps, epochs, minibatches, clip_eps)
        self.env = gym.make_vec("CartPole-v1", num_envs=num_envs, vectorization_mode="sync",
                                vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})
        self.obs, _ = self.env.reset(seed=0)
        self.actor = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 2))
        self.critic = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 1))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3, eps=1e-5)

    def train_dataloader(self):
        return range(6)  # 6 PPO iterations; each item is the iteration number

    @torch.no_grad()
    def rollout(self):
        obs, actions, logp, values, rewards, dones = [], [], [], [], [], []
        for _ in range(self.num_steps):
            o = torch.as_tensor(self.obs, dtype=torch.float32)
            dist = Categorical(logits=self.actor(o))
            a = dist.sample()
            self.obs, r, term, trunc, _ = self.env.step(a.numpy())
            obs.append(o), actions.append(a), logp.append(dist.log_prob(a)), values.append(self.critic(o)[:, 0])
            rewards.append(torch.as_tensor(r, dtype=torch.float32)), dones.append(torch.as_tensor(term | trunc))
        next_value = self.critic(torch.as_tensor(self.obs, dtype=torch.float32))[:, 0]
        adv, last = torch.zeros(self.num_steps, len(self.obs)), 0.0
        for t in reversed(range(self.num_steps)):  # GAE(gamma=0.99, lambda=0.95)
            nxt = next_value if t == self.num_steps - 1 else values[t + 1]
            not_done = (~dones[t]).float()
            delta = rewards[t] + 0.99 * nxt * not_done - values[t]
            adv[t] = last = delta + 0.99 * 0.95 * not_done * last
        returns = adv + torch.stack(values)
        return [torch.cat(x) for x in (obs, actions, logp)] + [adv.reshape(-1), returns.reshape(-1)]

    def training_step(self, iteration, batch_idx):
        opt = self.optimizers()
        obs, actions, old_logp, adv_all, returns = self.rollout()
        for _ in range(self.epochs):
            for mb in torch.randperm(len(obs)).chunk(self.minibatches):
                logits = self.actor(obs[mb])
                if self.fault == "detached":
                    logits = logits.detach()  # the bug: no gradient reaches the actor through the policy term
                dist = Categorical(logits=logits)
                new_logp, entropy = dist.log_prob(actions[mb]), dist.entropy()
                adv = (adv_all[mb] - adv_all[mb].mean()) / (adv_all[mb].std() + 1e-8)
                ratio = (new_logp - old_logp[mb]).exp()
                pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - self.clip_eps, 1 + self.clip_eps)).mean()
                values = self.critic(obs[mb])[:, 0]
                v_loss = 0.5 * ((values - returns[mb]) ** 2).mean()
                loss = pg_loss + 0.5 * v_loss - 0.01 * entropy.mean()
                # the one line the guard needs: after the loss is built, before backward
                observe(self, new_logp=new_logp, old_logp=old_logp[mb], advantages=adv, clip_eps=self.clip_eps,
                        dist=dist, entropy=entropy, values=values, returns=returns[mb], rollout=iteration)
                opt.zero_grad()
                self.manual_backward(loss)
                self.clip_gradients(opt, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
                opt.step()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--fault", choices=["detached"], default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    guard = PPOGuard()  # roles auto-detected: actor='actor', critic='critic'
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[guard])
    trainer.fit(PPO(fault=args.fault))
    print("findings:", sorted(guard.codes()) or "none")
