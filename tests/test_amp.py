"""Issue 4: mixed precision. Logged gradient norms are the unscaled ones; steps the GradScaler skips are no stall.

Lightning turns ``precision="16-mixed"`` into bf16 on CPU, so the fp16 tests pass the plugin themselves:
``MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))`` (CPU fp16 autocast and a real
GradScaler, which skips ``optimizer.step()`` when it finds an inf/NaN and then halves its scale).
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision

from lightning_ppo_guard import PPOGuard, PPOMonitor
from lightning_ppo_guard.reference import CartPolePPO, CartPolePPOAuto, PPOConfig

from .conftest import fit, guard_rows, read_csv

PER = PPOConfig().update_epochs * PPOConfig().num_minibatches


def _cfg(iterations=1):
    cfg = PPOConfig(seed=0)
    cfg.total_timesteps = iterations * cfg.batch_size
    return cfg


def _fp16():
    return [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]


def _actor_norm(module) -> float:
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in module.actor.parameters() if p.grad is not None))


class NaiveManual(CartPolePPO):
    """Records the actor's gradient norm after each backward, unscaled by hand; can plant an inf gradient."""

    def __init__(self, cfg, plant_inf=lambda step: False):
        super().__init__(cfg)
        self.naive, self.plant_inf, self._backwards = [], plant_inf, 0

    def on_after_backward(self):  # runs after the callbacks' on_after_backward, before the scaler unscales
        scaler = self.trainer.precision_plugin.scaler if hasattr(self.trainer.precision_plugin, "scaler") else None
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        self.naive.append(_actor_norm(self) / scale)
        if self.plant_inf(self._backwards):
            self.actor.net[0].weight.grad[0, 0] = math.inf  # the scaler finds it and skips this step
            self.naive[-1] = math.inf
        self._backwards += 1


class NaiveAuto(CartPolePPOAuto):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.naive = []

    def on_before_optimizer_step(self, optimizer):  # automatic optimization: Lightning has unscaled already
        self.naive.append(_actor_norm(self))


def _rows(module, tmp_path, callback, **overrides):
    logger = CSVLogger(tmp_path, name="run", version=0)
    fit(module, [callback], logger=logger, **overrides)
    return guard_rows(read_csv(logger.log_dir))


def _dense():
    return PPOMonitor(log_every_n_steps=1, dense_steps=0, measure_every_n_steps=1)


@pytest.mark.parametrize("cls", [NaiveManual, NaiveAuto])
def test_bf16_mixed_logged_grad_norms_equal_the_naive_ones(tmp_path, cls):
    module = cls(_cfg())
    rows = _rows(module, tmp_path, _dense(), precision="bf16-mixed")
    assert len(rows) == len(module.naive) == PER
    for row, naive in zip(rows, module.naive, strict=True):
        assert row["ppo_guard/actor/grad_norm"] == pytest.approx(naive, rel=1e-5)
        assert row["ppo_guard/actor/update_norm"] > 0


def test_fp16_manual_grad_norm_is_unscaled_and_skipped_steps_are_not_logged(tmp_path):
    module = NaiveManual(_cfg())
    rows = _rows(module, tmp_path, _dense(), plugins=_fp16())
    assert len(module.naive) == PER
    applied = [i for i, g in enumerate(module.naive) if math.isfinite(g)]
    # the first step overflows at the initial scale 65536 and is skipped: it leaves no row (no update, no KL)
    assert 0 < len(applied) < PER and not math.isfinite(module.naive[0])
    assert [int(r["step"]) for r in rows] == applied
    for row in rows:
        assert row["ppo_guard/actor/grad_norm"] == pytest.approx(module.naive[int(row["step"])], rel=1e-4)
        assert row["ppo_guard/actor/update_norm"] > 0 and row["ppo_guard/actor/grad_nonfinite"] == 0


def test_fp16_automatic_grad_norm_is_unscaled_once(tmp_path):
    module = NaiveAuto(_cfg())
    rows = _rows(module, tmp_path, _dense(), plugins=_fp16())
    assert rows
    for row in rows:
        assert row["ppo_guard/actor/grad_norm"] == pytest.approx(module.naive[int(row["step"])], rel=1e-4)


def test_steps_skipped_by_the_grad_scaler_are_no_false_alarm():
    """Steps 3..10 have an inf gradient and the scaler skips them (8 in a row, more than any streak a rule needs):
    no PPG203 (unchanged), PPG202 (cleared) or PPG901 (non-finite). (An inf on every other step would halve the
    scale 40 times, until fp16 gradients underflow to exactly 0: PPG201 then, rightly.)"""
    module = NaiveManual(_cfg(2), plant_inf=lambda step: 3 <= step <= 10)
    guard = PPOGuard(dense_steps=0, measure_every_n_steps=1)
    fit(module, [guard], plugins=_fp16())
    assert guard.findings == [], guard.summary()
    applied = sum(math.isfinite(g) for g in module.naive)
    assert guard.optimizer_steps == applied < 2 * PER  # the optimizer hooks saw only the steps that ran
    assert guard.steps_skipped["actor"] == 2 * PER - applied  # counted, each one, and no finding


def test_every_step_skipped_by_the_grad_scaler_is_named():
    module = NaiveManual(_cfg(2), plant_inf=lambda step: True)
    guard = PPOGuard(dense_steps=0, measure_every_n_steps=1)
    fit(module, [guard], plugins=_fp16())
    assert guard.optimizer_steps == 0  # the actor never changed
    assert guard.codes() == {"PPG203"}, guard.summary()
    finding = guard.findings[0]
    assert finding.role == "actor" and finding.evidence["skipped"] == 25  # named at the 25th skip in a row
    assert guard.steps_skipped["actor"] == 2 * PER


@pytest.mark.parametrize("precision", ["bf16-true", "64-true"])
@pytest.mark.parametrize("cls", ["CartPolePPO", "CartPolePPOAuto", "MultiCartPoleMAPPO"])
def test_the_reference_modules_train_in_true_precisions_without_a_finding(precision, cls):
    """Issue 23's leftover: the reference modules crashed under "bf16-true" / "64-true" (observations, and the
    automatic module's DataLoader-side rollout, were float32 beside converted weights). Now they run in the module's
    dtype, and the guard, measuring in that dtype, names nothing on a healthy run."""
    from lightning_ppo_guard import PPOGuard
    from lightning_ppo_guard import reference as ref

    module_cls = getattr(ref, cls)
    cfg = (ref.MAPPOConfig if cls == "MultiCartPoleMAPPO" else ref.PPOConfig)(seed=0)
    cfg.total_timesteps = 3 * (cfg.num_envs * cfg.num_steps)
    guard = PPOGuard()
    fit(module_cls(cfg), [guard], precision=precision)
    assert guard.findings == [] and guard.optimizer_steps > 0, guard.summary()
