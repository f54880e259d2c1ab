"""Every logged key carries its own quantity: each step, observe and host metric of every role, checked against
a naive computation made by the module itself, and the same rows whatever the order of the metric tables.

A change that files one metric's value under another's key (a swapped stack order, a wrong slot) fails here,
because no two of the quantities coincide on this run (different lrs for actor and critic, a clip that acts,
log-ratios far from 0 after the first minibatch).
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

import lightning_ppo_guard.reference.cartpole as cartpole
from lightning_ppo_guard import PPOMonitor, metrics, observe
from lightning_ppo_guard.functional import SEQUENCE_STATS
from lightning_ppo_guard.reference import CartPolePPO, PPOConfig

from .conftest import fit, read_csv

ITERATIONS = 2


class Naive(CartPolePPO):
    """The reference PPO recording, per optimizer step, the seed checklist's numbers by per-parameter loops."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.steps: list[dict[str, float]] = []
        self._pre: dict[str, float] = {}
        self._before: list[torch.Tensor] | None = None

    @staticmethod
    def _norm(tensors):
        return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))

    def on_after_backward(self):  # manual optimization: before the clip
        for role in ("actor", "critic"):
            self._pre[role] = self._norm([p.grad for p in getattr(self, role).parameters()])

    def on_before_optimizer_step(self, optimizer):  # after the module's clip, before the step
        rec: dict[str, float] = {}
        for role in ("actor", "critic"):
            params = list(getattr(self, role).parameters())
            clipped = self._norm([p.grad for p in params])
            rec.update({f"{role}/grad_norm": self._pre[role], f"{role}/grad_norm_clipped": clipped,
                        f"{role}/clip_coef": clipped / self._pre[role],
                        f"{role}/grad_none": float(sum(p.grad is None for p in params)),
                        f"{role}/grad_nonfinite": float(sum(not bool(torch.isfinite(p.grad).all()) for p in params))})
        actor = list(self.actor.parameters())
        rec["actor/grad_nonzero_frac"] = sum(int((p.grad != 0).sum()) for p in actor) / sum(p.numel() for p in actor)
        rec["actor/param_norm"] = self._norm(actor)
        self._before = [p.detach().clone() for p in actor]
        self.steps.append(rec)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self._close()

    def _close(self):
        if self._before is not None:
            rec = self.steps[-1]
            rec["actor/update_norm"] = self._norm([p.detach() - q for p, q in zip(self.actor.parameters(),
                                                                                  self._before, strict=True)])
            rec["actor/update_ratio"] = rec["actor/update_norm"] / rec["actor/param_norm"]
            self._before = None

    def ppo_losses(self, mb, rollout):
        self._close()  # the previous step's update is complete once the next minibatch starts
        return super().ppo_losses(mb, rollout)


def _observed(module: Naive, entropy0: list[float]):
    """Wrap ``observe`` to record the naive observe statistics of each minibatch into the module's last step."""

    def recording(pl_module, **kw):
        new, old = kw["new_logp"].detach().double(), kw["old_logp"].detach().double()
        r = (new - old).exp()
        ent = kw["dist"].entropy().detach().double()
        if not entropy0:
            entropy0.append(float(ent.mean()))
        adv = kw["advantages"].detach().double()
        ret, val = kw["returns"].detach().double(), kw["values"].detach().double()
        n = new.numel()
        module.pending_observe = {
            "actor/approx_kl": float(((r - 1) - (new - old)).mean()),
            "actor/approx_kl_k1": float((old - new).mean()),
            # |r - 1| > clip_eps by the definition's float32 arithmetic: a sample at the edge must fall the same way
            "actor/clip_fraction": sum(abs(float(x)) > kw["clip_eps"] for x in torch.expm1(
                kw["new_logp"].detach().float() - kw["old_logp"].detach().float())) / n,
            "actor/ratio_mean": float(r.mean()), "actor/ratio_min": float(r.min()), "actor/ratio_max": float(r.max()),
            "actor/ratio_dev": max(abs(float(x) - 1) for x in r),
            "actor/entropy": float(ent.mean()), "actor/entropy_norm": float(ent.mean()) / math.log(2),
            "actor/entropy_drift": float(ent.mean()) - entropy0[0],
            "actor/adv_mean": float(adv.mean()), "actor/adv_std": float(adv.std(unbiased=False)),
            "actor/adv_zero_frac": float((adv == 0).double().mean()),
            "actor/explained_variance": 1 - float((ret - val).var(unbiased=False)) / float(ret.var(unbiased=False)),
        }
        observe(pl_module, **kw)

    return recording


def _fit_logged(tmp_path, monkeypatch, name):
    cfg = PPOConfig(seed=0, lr=1e-3, critic_lr=2.5e-3)
    cfg.total_timesteps = ITERATIONS * cfg.batch_size
    module = Naive(cfg)
    entropy0: list[float] = []
    monkeypatch.setattr(cartpole, "observe", _observed(module, entropy0))
    observes: list[dict[str, float]] = []
    original = module.on_before_optimizer_step

    def with_observe(optimizer):  # one observe per optimizer step: file it with that step's record
        original(optimizer)
        module.steps[-1].update(module.pending_observe)
        observes.append(module.pending_observe)

    module.on_before_optimizer_step = with_observe
    logger = CSVLogger(tmp_path, name=name)
    fit(module, [PPOMonitor(log_every_n_steps=1, dense_steps=10**6)], logger=logger)  # every step, every count
    rows = [{k.removeprefix("ppo_guard/"): v for k, v in r.items() if k.startswith("ppo_guard/")}
            for r in read_csv(logger.log_dir)]
    return module, [r for r in rows if r]


def test_every_logged_key_carries_its_own_quantity(tmp_path, monkeypatch):
    module, rows = _fit_logged(tmp_path, monkeypatch, "run")
    per = module.cfg.update_epochs * module.cfg.num_minibatches
    assert len(rows) == len(module.steps) == ITERATIONS * per
    actor_keys = {f"actor/{s.name}" for s in (*metrics.STEP_METRICS, *metrics.OBSERVE_METRICS) if s.roles != "shared"}
    actor_keys.discard("actor/log_std")  # a Gaussian's: this policy is categorical, so it must not be logged
    # LM RL's (a reference model's log-probs, per-sequence rewards and groups): this loop passes none, so none is logged
    actor_keys -= {f"actor/{name}" for name in ("ref_kl", *SEQUENCE_STATS)}
    critic_keys = {f"critic/{s.name}" for s in metrics.STEP_METRICS if s.roles == "all"}
    host = {"actor/binding", "critic/binding", "actor/lr", "critic/lr"}
    for i, (row, naive) in enumerate(zip(rows, module.steps, strict=True)):
        expected = actor_keys | critic_keys | host | ({"actor/updates_per_rollout"} if i >= per else set())
        assert set(row) == expected, (i, set(row) ^ expected)  # no key is logged that this test does not check
        for key, want in naive.items():
            assert row[key] == pytest.approx(want, rel=2e-4, abs=1e-7), (i, key, row[key], want)
        assert (row["actor/lr"], row["critic/lr"]) == (1e-3, 2.5e-3)
        assert row["actor/binding"] == row["critic/binding"] == 1.0
        if i >= per:
            assert row["actor/updates_per_rollout"] == per
    # the quantities really differ, so a swap of any two of them cannot pass unnoticed (the shared clip gives
    # actor and critic one clip_coef, and the two counts are 0)
    late = rows[-1]
    values = [late[k] for k in sorted(actor_keys | critic_keys)
              if not k.endswith(("grad_none", "grad_nonfinite")) and k != "critic/clip_coef"]
    assert len({round(v, 9) for v in values}) == len(values), late


def test_reordering_the_metric_tables_changes_nothing_that_is_logged(tmp_path, monkeypatch):
    _, rows = _fit_logged(tmp_path, monkeypatch, "ordered")
    with monkeypatch.context() as patch:
        patch.setattr(metrics, "STEP_METRICS", tuple(reversed(metrics.STEP_METRICS)))
        patch.setattr(metrics, "OBSERVE_METRICS", tuple(reversed(metrics.OBSERVE_METRICS)))
        _, reordered = _fit_logged(tmp_path, monkeypatch, "reversed")
    assert reordered == rows
