"""Issue 6: post-clip norms inferred from the clip coefficient, only where measurements show it is exact.

A clip by norm multiplies every gradient of a role by one number, so the clipped norms are the norms taken
after backward times that number, read from a few small probe tensors. The monitor measures and compares
until 4 clipped steps agreed, then infers and still measures 1 clipped step in 8. Every logged post-clip
norm is checked here against the seed checklist's per-parameter loop, run by the module itself at
``on_before_optimizer_step`` (manual optimization: after its clip, before the step).
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_ppo_guard import PPOGuard, PPOMonitor, _plan
from lightning_ppo_guard.reference import CartPolePPO, PPOConfig

from .conftest import fit, guard_rows, read_csv

ITERATIONS = 3


class Truth(CartPolePPO):
    """The reference PPO with a chosen clip, recording each role's clipped gradient norm by hand."""

    def __init__(self, clip: str, hidden: int = 256) -> None:
        cfg = PPOConfig(seed=0, hidden=hidden)  # 256: 135k parameters, above the size where inference pays
        cfg.total_timesteps = ITERATIONS * cfg.batch_size
        super().__init__(cfg)
        self.clip = clip
        self.clipped: list[tuple[float, float]] = []
        self.thetas: list[torch.Tensor] = []  # the actor's parameters before each step

    def clip_gradients(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.clip == "global":  # the reference: one coefficient for actor and critic together
            super().clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        elif self.clip == "per_role":  # one coefficient each (common in MAPPO code)
            torch.nn.utils.clip_grad_norm_(self.actor.parameters(), 0.1)
            torch.nn.utils.clip_grad_norm_(self.critic.parameters(), 0.5)
        elif self.clip == "value":  # clamps elements: no single coefficient per role
            super().clip_gradients(optimizer, 0.01, "value")
        elif self.clip == "scaled_late":  # the global clip, then from step 60 the large actor tensors halved
            super().clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            if len(self.clipped) >= 60:
                for p in self.actor.parameters():
                    if p.grad is not None and p.numel() > 1000:
                        p.grad.mul_(0.5)

    def on_before_optimizer_step(self, optimizer):
        def norm(module):
            return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in module.parameters() if p.grad is not None))

        self.clipped.append((norm(self.actor), norm(self.critic)))
        self.thetas.append(torch.cat([p.detach().reshape(-1) for p in self.actor.parameters()]))


class Counting:
    """Counts full post-clip passes and inferred ones (class-level patches of the step plan)."""

    def __init__(self, monkeypatch) -> None:
        self.measured = self.inferred = 0
        post, inferred = _plan.StepPlan.post_norms, _plan.StepPlan.inferred_norms

        def counted_post(plan):
            self.measured += 1
            return post(plan)

        def counted_inferred(plan, pre):
            self.inferred += 1
            return inferred(plan, pre)

        monkeypatch.setattr(_plan.StepPlan, "post_norms", counted_post)
        monkeypatch.setattr(_plan.StepPlan, "inferred_norms", counted_inferred)


def _run(tmp_path, monkeypatch, clip, callback, every=1, hidden=256):
    """Fit, then check each logged row (the mean of ``every`` steps) against the module's own numbers."""
    counts = Counting(monkeypatch)
    module = Truth(clip, hidden)
    logger = CSVLogger(tmp_path, name="run")
    fit(module, [callback], logger=logger)
    rows = guard_rows(read_csv(logger.log_dir))
    assert len(module.clipped) == ITERATIONS * 40 and len(rows) == len(module.clipped) // every
    for i, row in enumerate(rows):
        block = module.clipped[i * every:(i + 1) * every]
        for j, role in enumerate(("actor", "critic")):
            truth = sum(b[j] for b in block) / every
            assert row[f"ppo_guard/{role}/grad_norm_clipped"] == pytest.approx(truth, rel=1e-5), (i, role)
    return counts, rows


@pytest.mark.parametrize("clip", ["global", "per_role"])
def test_clip_by_norm_is_inferred_after_four_agreeing_steps(tmp_path, monkeypatch, clip):
    guard = PPOGuard(dense_steps=0, measure_every_n_steps=1, log_every_n_steps=1)
    counts, rows = _run(tmp_path, monkeypatch, clip, guard)
    steps = len(rows)
    # every step is clipped: 4 measured to learn, then clipped steps 8, 16, ... still measured and compared
    assert counts.measured == 4 + len(range(8, steps + 1, 8))
    assert counts.inferred == steps - counts.measured
    assert guard.findings == []
    coef = [r["ppo_guard/actor/clip_coef"] for r in rows]
    assert min(coef) < 0.9  # the clip really scaled the gradients on some steps


def test_a_monitor_reads_its_checks_with_the_row(tmp_path, monkeypatch):
    """Without the guard's per-step transfer, the checks ride on the monitor's one transfer per row: the
    first row (40 steps) ends the learning, the later rows infer."""
    monitor = PPOMonitor(measure_every_n_steps=1, log_every_n_steps=40)
    counts, _ = _run(tmp_path, monkeypatch, "global", monitor, every=40)
    checks = len(range(48, 121, 8))  # after the first row: clipped steps 48, 56, ..., 120
    assert counts.measured == 40 + checks and counts.inferred == 80 - checks


def test_clip_by_value_is_always_measured(tmp_path, monkeypatch):
    guard = PPOGuard(dense_steps=0, measure_every_n_steps=1, log_every_n_steps=1)
    counts, rows = _run(tmp_path, monkeypatch, "value", guard)
    assert counts.inferred == 0 and counts.measured == len(rows)


def test_a_rescale_that_starts_late_is_caught_by_the_next_check(tmp_path, monkeypatch):
    """From step 60 the large actor tensors are also halved, the probes (biases) are not: the check at clipped
    step 64 disagrees and inference ends for good. Steps 60-62 were inferred from a coefficient that no longer
    held (the stated limit: at most 7 steps between checks); every other row is exact."""
    counts = Counting(monkeypatch)
    module = Truth("scaled_late")
    logger = CSVLogger(tmp_path, name="run")
    fit(module, [PPOGuard(dense_steps=0, measure_every_n_steps=1, log_every_n_steps=1)], logger=logger)
    rows = guard_rows(read_csv(logger.log_dir))
    assert len(rows) == len(module.clipped) == 120
    assert counts.measured == 4 + len(range(8, 65, 8)) + (120 - 64)
    wrong = []
    for i, (row, (actor, _)) in enumerate(zip(rows, module.clipped, strict=True)):
        if row["ppo_guard/actor/grad_norm_clipped"] != pytest.approx(actor, rel=1e-5):
            wrong.append(i)
    assert wrong == [60, 61, 62]


def test_a_small_model_is_always_measured(tmp_path, monkeypatch):
    """At 9k parameters one fused pass costs less than the inference's ops: never inferred."""
    guard = PPOGuard(dense_steps=0, measure_every_n_steps=1, log_every_n_steps=1)
    counts, rows = _run(tmp_path, monkeypatch, "global", guard, hidden=64)
    assert counts.inferred == 0 and counts.measured == len(rows)


def test_large_actor_parameter_norm_is_reread_every_8th_step_and_the_update_is_exact(tmp_path, monkeypatch):
    """135k parameters: ``param_norm`` is exact on measured steps 0, 8, 16, ... and at most 7 steps old between
    (within the sum of the update norms since, as documented); ``update_norm`` is exact on every step."""
    guard = PPOGuard(dense_steps=0, measure_every_n_steps=1, log_every_n_steps=1)
    module = Truth("global")
    logger = CSVLogger(tmp_path, name="run")
    fit(module, [guard], logger=logger)
    rows = guard_rows(read_csv(logger.log_dir))
    norms = [float(t.norm()) for t in module.thetas]
    updates = [float((b - a).norm()) for a, b in zip(module.thetas, module.thetas[1:], strict=False)]
    stale = 0
    for i, row in enumerate(rows):
        logged = row["ppo_guard/actor/param_norm"]
        if i % 8 == 0:
            assert logged == pytest.approx(norms[i], rel=1e-5), i
        else:
            assert abs(logged - norms[i]) <= sum(updates[i - i % 8:i]) * (1 + 1e-5), i
            stale += logged != pytest.approx(norms[i], rel=1e-6)
        if i < len(updates):
            assert row["ppo_guard/actor/update_norm"] == pytest.approx(updates[i], rel=1e-4), i
    assert stale > 0  # the cadence is real: between re-reads the logged norm is the older one
