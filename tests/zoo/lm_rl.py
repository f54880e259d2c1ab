"""Language-model RL in Lightning on a tiny randomly initialised ``transformers`` GPT-2 (built from a config: no
download): critic-less GRPO in manual optimization and token-level PPO with a value head in automatic.

The task: a prompt of two tokens, a response of up to ``response_len`` tokens (sampling stops at EOS; later
positions are padding, outside the response mask). ``reward="binary"``: 1 when the response's first token repeats
the prompt's first token; ``"graded"``: the share of response tokens that do. Both are learnt on CPU within a few
dozen rollouts by a 2-layer, 32-wide GPT-2.

GRPO (``LMArgs.algo="grpo"``, manual optimization): ``group`` samples per prompt, group-normalised advantages
``(r - mean_g) / (std_g + 1e-4)`` broadcast to every response token, per-token clipped ratio, a k3 KL penalty to a
frozen reference copy (``beta``), minibatches made of whole groups (as TRL and verl split them). Two loss styles:
``"trl"`` (per-sequence masked mean, then the mean over sequences) and ``"verl"`` (a token-mean over the whole
minibatch: ``sum(loss * mask) / sum(mask)``).

PPO (``algo="ppo"``, automatic optimization): TRL's classic layout, ``model.pretrained_model`` (the LM) +
``model.v_head`` on its last hidden state; the reward at the last response token, a per-token KL penalty to the
reference in the rewards, GAE (gamma 1, lambda 0.95) per token, advantages whitened over the response tokens, a
clipped value loss. One rollout per ``epochs * minibatches`` training steps.

``observe`` (``LMArgs.observe``): ``"masked"`` hands the response tokens as ``t[mask]`` (what a user writes when
the call has no mask argument); ``"full"`` the 2-D tensors the loss uses with ``mask=``, the reference's log-probs
and the rewards; ``"minimal"`` ``new_logp``, ``old_logp`` and ``advantages`` only, masked.

Faults (``LMArgs.fault``): ``"entropy_penalty"`` (the entropy bonus subtracted), ``"loss_negated"`` (the policy
loss's sign), ``"adv_sign"`` (advantages ``mean - r``), ``"kl_pin"`` (``beta`` 50: the KL term pins the policy to
the reference), ``"old_logp_recomputed"`` (old log-probs from the current model at update time), ``"lr_tiny"``,
``"sparse_reward"`` (all-or-nothing: every response token must repeat the prompt's first token; a random policy
never gets there, so every group's samples share one reward), ``"sampler_temperature"`` (the rollout samples, and
records the log-probs, at temperature 0.7; the update scores at 1), ``"stale_sampler"`` (the rollout samples with a
copy of the policy refreshed every 3 rollouts), ``"optimizer_over_ref"`` (the optimizer built over the frozen
reference's parameters). ``LMArgs.sampler="bf16"`` samples under bf16 autocast and hands ``old_logp`` in bf16 (a
sampler's precision: no fault); ``"bf16-as-fp32"`` hands them over cast to float32, so the guard cannot know.
``LMArgs.lora``: the policy is a frozen base with LoRA adapters (:func:`add_lora`); fault ``"lora_unbound"``: the
optimizer gets base weights, not the adapters.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_ppo_guard import observe

FAULTS = ("entropy_penalty", "loss_negated", "adv_sign", "kl_pin", "old_logp_recomputed", "lr_tiny", "sparse_reward",
          "sampler_temperature", "stale_sampler", "optimizer_over_ref", "lora_unbound")
PAD, EOS, VOCAB = 0, 1, 12


@dataclass
class LMArgs:
    algo: str = "grpo"  # or "ppo"
    style: str = "trl"  # GRPO loss: "trl" or "verl"
    reward: str = "binary"  # or "graded"
    seed: int = 0
    prompts: int = 8
    group: int = 8
    response_len: int = 4
    iterations: int = 12
    epochs: int = 2
    minibatches: int = 2
    lr: float = 2e-3
    clip_eps: float = 0.2
    beta: float = 0.04
    ent_coef: float = 0.01
    vf_coef: float = 0.1
    fault: str | None = None
    observe: str = "masked"
    lora: bool = False  # a frozen base with LoRA adapters (GRPO)
    sampler: str = "fp32"  # "bf16": the rollout's forward under bf16 autocast; "bf16-as-fp32": its log-probs cast up
    # train until the reward is reached: with ``until_reward``, the fit stops ``after_reward`` rollouts after the mean
    # score of 5 rollouts first exceeded it, and not before ``min_iterations`` (``iterations`` is then the cap)
    until_reward: float | None = None
    min_iterations: int = 0
    after_reward: int = 30


def tiny_gpt2(seed: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=EOS,
                        eos_token_id=EOS, pad_token_id=PAD, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


class LoRA(nn.Module):
    """A low-rank adapter around a frozen GPT-2 ``Conv1D`` (``x @ W + b``): ``base(x) + (x @ A @ B) * scale``, with
    ``B`` starting at 0 (so the adapted model starts as the base), as PEFT's LoRA does."""

    def __init__(self, base: nn.Module, rank: int = 4, scale: float = 2.0) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        d_in, d_out = base.weight.shape
        self.lora_A = nn.Parameter(torch.randn(d_in, rank) / d_in**0.5)
        self.lora_B = nn.Parameter(torch.zeros(rank, d_out))
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_A @ self.lora_B) * self.scale


def add_lora(lm: nn.Module) -> nn.Module:
    """Freeze ``lm`` and put a LoRA adapter on every block's attention and MLP projections."""
    lm.requires_grad_(False)
    for block in lm.transformer.h:
        block.attn.c_attn = LoRA(block.attn.c_attn)
        block.mlp.c_fc = LoRA(block.mlp.c_fc)
    return lm


class ValueHeadLM(nn.Module):
    """TRL's ``AutoModelForCausalLMWithValueHead`` layout: ``pretrained_model`` and ``v_head``."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.pretrained_model = lm
        self.v_head = nn.Linear(lm.config.n_embd, 1)

    def forward(self, ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        out = self.pretrained_model(input_ids=ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.logits, self.v_head(out.hidden_states[-1]).squeeze(-1)


class LMRL(L.LightningModule):
    """GRPO or token-level PPO on a tiny GPT-2 (see the module docstring)."""

    def __init__(self, args: LMArgs) -> None:
        super().__init__()
        self.args = args
        lm = tiny_gpt2(args.seed)
        self.ref_model = copy.deepcopy(lm).requires_grad_(False).eval()
        if args.algo == "ppo":
            self.model: nn.Module = ValueHeadLM(lm)
        else:
            self.policy = add_lora(lm) if args.lora else lm
        self.automatic_optimization = args.algo == "ppo"
        self.gen = torch.Generator().manual_seed(args.seed)
        self.scores: list[float] = []
        self.reached: int | None = None  # the rollout at which the reward was reached (``LMArgs.until_reward``)
        self.batch: dict[str, Tensor] | None = None
        self.beta = 50.0 if args.fault == "kl_pin" else args.beta
        self.sampler: nn.Module | None = None

    # ------------------------------------------------------------------ plumbing
    def stop_when_reached(self) -> None:
        """With ``LMArgs.until_reward``: note when the 5-rollout mean score first exceeds it; stop the fit
        ``after_reward`` rollouts later (not before ``min_iterations``)."""
        a, s = self.args, self.scores
        if a.until_reward is None:
            return
        if self.reached is None and len(s) >= 5 and sum(s[-5:]) / 5 > a.until_reward:
            self.reached = len(s)
        if self.reached is not None and len(s) >= max(a.min_iterations, self.reached + a.after_reward):
            self.trainer.should_stop = True

    def train_dataloader(self) -> DataLoader:
        n = self.args.iterations * (self.args.epochs * self.args.minibatches if self.args.algo == "ppo" else 1)
        return DataLoader(range(n), batch_size=None)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        lr = 1e-9 if self.args.fault == "lr_tiny" else self.args.lr
        net = self.model if self.args.algo == "ppo" else self.policy
        if self.args.fault == "optimizer_over_ref":
            net = self.ref_model.requires_grad_(True)  # "the model" picked from the wrong attribute
        params = [p for n, p in net.named_parameters() if self.args.fault != "lora_unbound" or "lora_" not in n]
        if self.args.fault == "lora_unbound":  # the optimizer built over the base's weights, the adapters left out
            params = [p.requires_grad_(True) for p in params if p.dim() > 1][:4]
        return torch.optim.Adam(params, lr=lr)

    def lm(self) -> nn.Module:
        return self.model.pretrained_model if self.args.algo == "ppo" else self.policy

    def logits(self, ids: Tensor, attn: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.args.algo == "ppo":
            return self.model(ids, attn)
        return self.policy(input_ids=ids, attention_mask=attn).logits, None

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def rollout(self) -> dict[str, Tensor]:
        a = self.args
        n = a.prompts * a.group
        prompt = torch.randint(2, VOCAB, (a.prompts, 2), generator=self.gen).repeat_interleave(a.group, 0)
        ids, done = prompt, torch.zeros(n, dtype=torch.bool)
        logps, mask = [], []
        if a.fault == "stale_sampler" and (self.sampler is None or len(self.scores) % 3 == 0):
            self.sampler = copy.deepcopy(self.lm()).requires_grad_(False)
        sampler = self.sampler if a.fault == "stale_sampler" else self.lm()
        for _ in range(a.response_len):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.sampler.startswith("bf16")):
                logits = sampler(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1]
            if a.fault == "sampler_temperature":
                logits = logits / 0.7
            dist = torch.distributions.Categorical(logits=logits.float())
            tok = torch.multinomial(dist.probs, 1, generator=self.gen).squeeze(1)
            tok = torch.where(done, torch.full_like(tok, PAD), tok)
            logps.append(dist.log_prob(tok))
            mask.append(~done)
            done = done | (tok == EOS)
            ids = torch.cat([ids, tok[:, None]], 1)
        resp, mask_t = ids[:, 2:], torch.stack(mask, 1)
        hit = (resp == prompt[:, :1]) & mask_t
        if a.fault == "sparse_reward":
            reward = hit.all(1).float()
        elif a.reward == "binary":
            reward = hit[:, 0].float()
        else:
            reward = hit.float().sum(1) / a.response_len
        attn = torch.cat([torch.ones_like(prompt), mask_t.long()], 1)
        ref = self.token_logp(self.ref_model(input_ids=ids, attention_mask=attn).logits, ids)
        self.scores.append(float(reward.mean()))
        self.stop_when_reached()
        old_logp = torch.stack(logps, 1)
        if a.sampler == "bf16":
            old_logp = old_logp.bfloat16()  # the sampler's precision, as it handed the log-probs over
        return {"ids": ids, "attn": attn, "mask": mask_t, "old_logp": old_logp, "ref_logp": ref, "reward": reward}

    @staticmethod
    def token_logp(logits: Tensor, ids: Tensor) -> Tensor:
        """Log-probs of the response tokens (positions 2.. of ids) under ``logits``."""
        return torch.log_softmax(logits[:, 1:-1], -1).gather(-1, ids[:, 2:, None]).squeeze(-1)

    # ------------------------------------------------------------------ GRPO (manual)
    def grpo_advantages(self, reward: Tensor) -> Tensor:
        g = reward.view(self.args.prompts, self.args.group)
        mean, std = g.mean(1, keepdim=True), g.std(1, keepdim=True)
        adv = ((mean - g) if self.args.fault == "adv_sign" else (g - mean)) / (std + 1e-4)
        return adv.flatten()

    def policy_terms(self, b: dict[str, Tensor], idx: Tensor) -> dict[str, Any]:
        ids, attn, mask = b["ids"][idx], b["attn"][idx], b["mask"][idx]
        logits, values = self.logits(ids, attn)
        resp_logits = logits[:, 1:-1]
        dist = torch.distributions.Categorical(logits=resp_logits)
        logp = dist.log_prob(ids[:, 2:])
        old = logp.detach() if self.args.fault == "old_logp_recomputed" else b["old_logp"][idx]
        log_ratio = logp - old
        ratio = log_ratio.exp()
        ref_diff = b["ref_logp"][idx] - logp
        kl = ref_diff.exp() - ref_diff - 1  # k3 estimator
        return {"logp": logp, "old": old, "ratio": ratio, "kl": kl, "entropy": dist.entropy(), "mask": mask,
                "dist": dist, "values": values[:, 1:-1] if values is not None else None}

    def observe_terms(self, t: dict[str, Any], adv_tok: Tensor, b: dict[str, Tensor], idx: Tensor, rollout: int,
                      values: Tensor | None = None, returns: Tensor | None = None) -> None:
        m, mode = t["mask"], self.args.observe
        if mode == "full":
            observe(self, new_logp=t["logp"], old_logp=t["old"], advantages=adv_tok, entropy=t["entropy"],
                    mask=m, ref_logp=b["ref_logp"][idx], rewards=b["reward"][idx], clip_eps=self.args.clip_eps,
                    num_actions=VOCAB, values=values, returns=returns, rollout=rollout,
                    **({"group": idx // self.args.group} if self.args.algo == "grpo" else {}))
        elif mode == "masked":
            observe(self, new_logp=t["logp"][m], old_logp=t["old"][m], advantages=adv_tok[m],
                    entropy=t["entropy"][m], num_actions=VOCAB, clip_eps=self.args.clip_eps, rollout=rollout,
                    values=None if values is None else values[m], returns=None if returns is None else returns[m])
        else:
            observe(self, new_logp=t["logp"][m], old_logp=t["old"][m], advantages=adv_tok[m])

    def grpo_step(self, it: int) -> None:
        a, opt = self.args, self.optimizers()
        b = self.rollout()
        adv = self.grpo_advantages(b["reward"])
        per_mb = a.prompts // a.minibatches
        for _ in range(a.epochs):
            order = torch.randperm(a.prompts, generator=self.gen)
            for k in range(a.minibatches):
                groups = order[k * per_mb:(k + 1) * per_mb]
                idx = (groups[:, None] * a.group + torch.arange(a.group)).flatten()
                t = self.policy_terms(b, idx)
                adv_tok = adv[idx, None].expand_as(t["ratio"])
                pg = -torch.min(t["ratio"] * adv_tok, t["ratio"].clamp(1 - a.clip_eps, 1 + a.clip_eps) * adv_tok)
                if a.fault == "loss_negated":
                    pg = -pg
                ent_sign = -1.0 if a.fault == "entropy_penalty" else 1.0
                per_tok = pg + self.beta * t["kl"] - ent_sign * a.ent_coef * t["entropy"]
                m = t["mask"].float()
                if a.style == "trl":
                    loss = ((per_tok * m).sum(1) / m.sum(1).clamp(min=1)).mean()
                else:
                    loss = (per_tok * m).sum() / m.sum().clamp(min=1)
                self.observe_terms(t, adv_tok, b, idx, it)
                opt.zero_grad()
                self.manual_backward(loss)
                opt.step()

    # ------------------------------------------------------------------ PPO with a value head (automatic)
    def ppo_rollout(self) -> dict[str, Tensor]:
        b = self.rollout()
        with torch.no_grad():
            _, values = self.model(b["ids"], b["attn"])
            values = values[:, 1:-1] * b["mask"]
            m = b["mask"].float()
            rewards = -self.beta * (b["old_logp"] - b["ref_logp"]) * m
            last = (m.sum(1).long() - 1).clamp(min=0)
            rewards[torch.arange(len(last)), last] += b["reward"]
            adv, gae, steps = torch.zeros_like(rewards), torch.zeros(len(rewards)), rewards.shape[1]
            for t in reversed(range(steps)):
                alive = m[:, t + 1] if t + 1 < steps else torch.zeros(len(rewards))
                nxt = values[:, t + 1] * alive if t + 1 < steps else alive
                gae = (rewards[:, t] + nxt - values[:, t] + 0.95 * alive * gae) * m[:, t]
                adv[:, t] = gae
            returns = adv + values
            mean = (adv * m).sum() / m.sum()
            std = (((adv - mean) ** 2 * m).sum() / m.sum()).sqrt()
            white = (adv - mean) / (std + 1e-8) * m
            if self.args.fault == "adv_sign":
                white = -white
        return {**b, "values": values, "returns": returns, "adv": white}

    def ppo_step(self, step: int) -> Tensor:
        a = self.args
        per_rollout = a.epochs * a.minibatches
        it, pos = divmod(step, per_rollout)
        if pos == 0 or self.batch is None:
            self.batch = self.ppo_rollout()
            self.perm = torch.randperm(a.prompts * a.group, generator=self.gen)
        b = self.batch
        size = a.prompts * a.group // a.minibatches
        k = pos % a.minibatches
        idx = self.perm[k * size:(k + 1) * size]
        t = self.policy_terms(b, idx)
        m = t["mask"].float()
        adv = b["adv"][idx]
        pg = -torch.min(t["ratio"] * adv, t["ratio"].clamp(1 - a.clip_eps, 1 + a.clip_eps) * adv)
        if a.fault == "loss_negated":
            pg = -pg
        ent_sign = -1.0 if a.fault == "entropy_penalty" else 1.0
        pg_loss = ((pg - ent_sign * a.ent_coef * t["entropy"]) * m).sum() / m.sum()
        v_old, ret = b["values"][idx], b["returns"][idx]
        v = t["values"]
        v_clip = v_old + (v - v_old).clamp(-0.2, 0.2)
        vf = 0.5 * (torch.max((v - ret) ** 2, (v_clip - ret) ** 2) * m).sum() / m.sum()
        if a.fault == "kl_pin":
            pg_loss = pg_loss + self.beta * (t["kl"] * m).sum() / m.sum()
        self.observe_terms(t, adv, b, idx, it, values=v, returns=ret)
        return pg_loss + a.vf_coef * vf

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        if self.args.algo == "ppo":
            return self.ppo_step(int(batch))
        self.grpo_step(int(batch))
        return None


def fit(args: LMArgs, callbacks: list[Any], **trainer: Any) -> LMRL:
    module = LMRL(args)
    kwargs: dict[str, Any] = {"max_epochs": 1, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                              "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1}
    kwargs.update(trainer)
    L.Trainer(callbacks=callbacks, **kwargs).fit(module)
    return module
