"""Issue 4: the guard in a Lightning Fabric loop (``FabricGuard``, hooks through ``fabric.call``)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from lightning.fabric.loggers import CSVLogger as FabricCSVLogger
from lightning.pytorch.loggers import CSVLogger

from lightning_ppo_guard import PPOGuard, PPOGuardWarning, PPOMonitor, observe
from lightning_ppo_guard.fabric import FabricGuard
from lightning_ppo_guard.reference import CartPolePPO, PPOConfig
from lightning_ppo_guard.reference.fabric_ppo import train_fabric

from .conftest import fit, guard_rows, read_csv

PER = PPOConfig().update_epochs * PPOConfig().num_minibatches


def _cfg(iterations, **kw):
    cfg = PPOConfig(seed=0, **kw)
    cfg.total_timesteps = iterations * cfg.batch_size
    return cfg


def _train(cfg, guard, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PPOGuardWarning)
        return train_fabric(cfg, callbacks=[guard], **kw)


@pytest.mark.parametrize(("fault", "code"), [("detached_logits", "PPG101"), ("actor_not_in_optimizer", "PPG001"),
                                             ("zero_grad_before_step", "PPG202"), ("lr_zero", "PPG003")])
def test_fabric_loop_names_the_planted_fault(fault, code):
    guard = FabricGuard()
    _train(_cfg(2, fault=fault), guard)
    assert [(f.code, f.role) for f in guard.findings] == [(code, "actor")]
    assert guard.guard.optimizer_steps == 2 * PER


def test_fabric_healthy_loop_finds_nothing_and_logs_the_trainer_numbers(tmp_path):
    """The same PPO through Fabric and through the Trainer: same rows, to float rounding; no finding."""
    settings = {"dense_steps": 0, "measure_every_n_steps": 1, "log_every_n_steps": 1}
    fabric_guard = FabricGuard(PPOGuard(**settings))
    _train(_cfg(2), fabric_guard, loggers=FabricCSVLogger(tmp_path, name="fabric", version=0))
    assert fabric_guard.findings == [] and not fabric_guard.should_stop
    trainer_guard = PPOGuard(**settings)
    logger = CSVLogger(tmp_path, name="trainer", version=0)
    fit(CartPolePPO(_cfg(2)), [trainer_guard], logger=logger)
    assert trainer_guard.findings == []

    by_fabric = guard_rows(read_csv(tmp_path / "fabric" / "version_0"))
    by_trainer = guard_rows(read_csv(logger.log_dir))
    assert len(by_fabric) == len(by_trainer) == 2 * PER
    for i, (a, b) in enumerate(zip(by_fabric, by_trainer, strict=True)):
        keys = {k for k in b if k.startswith("ppo_guard/")}
        assert keys == {k for k in a if k.startswith("ppo_guard/")}, keys ^ set(a)
        assert a["step"] == b["step"] == i
        for key in keys:
            if not (math.isnan(a[key]) and math.isnan(b[key])):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-8), (i, key)
    assert by_fabric[-1]["ppo_guard/actor/updates_per_rollout"] == PER
    findings = json.loads((tmp_path / "fabric" / "version_0" / "ppo_guard_findings.json").read_text())
    assert findings == []


def test_fabric_on_stall_stop_ends_the_loop_after_the_first_iteration():
    guard = FabricGuard(PPOGuard(on_stall="stop"))
    _train(_cfg(5, fault="actor_not_in_optimizer"), guard)
    assert guard.should_stop and guard.codes() == {"PPG001"}
    assert guard.guard.optimizer_steps == PER


def test_fabric_monitor_only_and_no_guard(tmp_path):
    monitor = FabricGuard(PPOMonitor(measure_every_n_steps=1))
    _train(_cfg(1, fault="detached_logits"), monitor, loggers=FabricCSVLogger(tmp_path, name="m", version=0))
    assert monitor.findings == [] and monitor.codes() == set()
    rows = guard_rows(read_csv(tmp_path / "m" / "version_0"))
    assert len(rows) == 1 and rows[0]["ppo_guard/actor/grad_norm"] == 0.0  # measured, not diagnosed
    assert rows[0]["ppo_guard/critic/grad_norm"] > 0
    module = train_fabric(_cfg(1))  # observe() with nothing attached is a no-op
    assert len(module.recent_returns) > 0


def test_observe_is_detached_after_the_loop_and_accepts_the_monitor_itself():
    guard = FabricGuard()
    module = _train(_cfg(1), guard)
    observes = guard.guard.observes
    logp = torch.zeros(4)
    observe(module, new_logp=logp, old_logp=logp)  # the loop ended: no guard is reached
    assert guard.guard.observes == observes
    with pytest.raises(TypeError, match="guard must be a PPOGuard or PPOMonitor"):
        FabricGuard(object())  # type: ignore[arg-type]
