"""Token-level PPO (the RLHF shape) with PPOGuard: a tiny language model with a value head, on a toy reward.

    python token_level.py                  # healthy: no finding
    python token_level.py --fault detached # the LM head's logits detached in the update: PPG101 for the actor

Each sample is a generated sequence of up to ``length`` tokens after a prompt token, with a mask for the tokens
past the end of each response; the reward (at the last response token) is the share of tokens equal to
``target``. The guard sees one log-prob per *valid token*: ``observe`` gets the masked, flattened tensors.
"""

import argparse

import lightning as L
import torch
from torch import nn
from torch.distributions import Categorical

from lightning_ppo_guard import PPOGuard, observe


class TinyLM(nn.Module):
    """Embedding and a GRU body shared by the LM head (the policy) and the value head (the critic)."""

    def __init__(self, vocab=16, hidden=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.body = nn.GRU(hidden, hidden, batch_first=True)
        self.lm_head = nn.Linear(hidden, vocab)
        self.v_head = nn.Linear(hidden, 1)

    def forward(self, tokens, state=None):
        hidden, state = self.body(self.embed(tokens), state)
        return self.lm_head(hidden), self.v_head(hidden).squeeze(-1), hidden, state


class TokenPPO(L.LightningModule):
    def __init__(self, fault=None, batch=32, length=8, target=3, epochs=2, minibatches=2, iterations=6):
        super().__init__()
        self.automatic_optimization = False
        self.fault, self.batch, self.length, self.target = fault, batch, length, target
        self.epochs, self.minibatches, self.iterations = epochs, minibatches, iterations
        self.policy = TinyLM()
        self.generator = torch.Generator().manual_seed(0)

    def configure_optimizers(self):
        return torch.optim.Adam(self.policy.parameters(), lr=3e-3, eps=1e-5)

    def train_dataloader(self):
        return range(self.iterations)

    @torch.no_grad()
    def generate(self):
        prompt = torch.randint(0, 16, (self.batch, 1), generator=self.generator)
        tokens, logp, state, last = [], [], None, prompt
        for _ in range(self.length):
            logits, _, _, state = self.policy(last, state)
            dist = Categorical(logits=logits[:, -1])
            last = dist.sample()[:, None]
            tokens.append(last), logp.append(dist.log_prob(last[:, 0]))
        tokens, old_logp = torch.cat(tokens, 1), torch.stack(logp, 1)
        lengths = torch.randint(self.length // 2, self.length + 1, (self.batch,), generator=self.generator)
        mask = torch.arange(self.length)[None] < lengths[:, None]  # responses of different lengths
        reward = ((tokens == self.target) & mask).float().sum(1) / lengths
        inputs = torch.cat([prompt, tokens[:, :-1]], 1)
        values = self.policy(inputs)[1]
        rewards = torch.zeros_like(values).scatter(1, (lengths - 1)[:, None], reward[:, None])
        adv, last_adv = torch.zeros_like(values), torch.zeros(self.batch)
        for t in reversed(range(self.length)):  # GAE over tokens (gamma 1, lambda 0.95), zero past the end
            nxt = values[:, t + 1] * mask[:, t + 1] if t + 1 < self.length else torch.zeros(self.batch)
            delta = rewards[:, t] + nxt - values[:, t]
            last_adv = (delta + 0.95 * last_adv * (mask[:, t + 1] if t + 1 < self.length else 0)) * mask[:, t]
            adv[:, t] = last_adv
        return inputs, tokens, old_logp, adv, adv + values, mask

    def training_step(self, iteration, batch_idx):
        opt = self.optimizers()
        inputs, tokens, old_logp, adv_all, returns, mask = self.generate()
        for _ in range(self.epochs):
            for mb in torch.randperm(self.batch).chunk(self.minibatches):
                logits, values, _, _ = self.policy(inputs[mb])
                if self.fault == "detached":
                    logits = logits.detach()  # the bug: the policy term cannot reach the LM
                m = mask[mb]
                dist = Categorical(logits=logits[m])  # one distribution per valid token
                new_logp, entropy = dist.log_prob(tokens[mb][m]), dist.entropy()
                adv = adv_all[mb][m]
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                ratio = (new_logp - old_logp[mb][m]).exp()
                pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()
                v_loss = 0.5 * ((values[m] - returns[mb][m]) ** 2).mean()
                loss = pg_loss + 0.5 * v_loss - 0.01 * entropy.mean()
                # per valid token: masked, flattened tensors of one shape
                observe(self, new_logp=new_logp, old_logp=old_logp[mb][m], advantages=adv, clip_eps=0.2,
                        dist=dist, entropy=entropy, values=values[m], returns=returns[mb][m], rollout=iteration)
                opt.zero_grad()
                self.manual_backward(loss)
                self.clip_gradients(opt, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
                opt.step()


def make_guard(**kwargs):
    # the LM head is the actor, the value head the critic, the embedding and the GRU a trunk both use
    return PPOGuard(actors="policy.lm_head", critic="policy.v_head", shared=["policy.embed", "policy.body"],
                    **kwargs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--fault", choices=["detached"], default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    guard = make_guard()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[guard])
    trainer.fit(TokenPPO(fault=args.fault))
    print("findings:", sorted(f"{f.code}[{f.role}]" for f in guard.findings) or "none")
