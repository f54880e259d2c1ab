"""Issue 4: ``observe(..., action_mask=mask)`` normalises entropy per sample by log(number of valid actions)."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

import lightning_ppo_guard.reference.cartpole as cartpole
from lightning_ppo_guard import PPOMonitor, observe
from lightning_ppo_guard.reference import CartPolePPO, PPOConfig

from .conftest import fit, guard_rows, read_csv


def _fit_with(monkeypatch, tmp_path, change):
    """One rollout of the reference PPO, its observe() arguments changed by ``change``; the logged rows."""
    expected = []

    def patched(pl_module, **kwargs):
        observe(pl_module, **change(kwargs, expected))

    monkeypatch.setattr(cartpole, "observe", patched)
    cfg = PPOConfig(seed=0)
    cfg.total_timesteps = cfg.batch_size
    logger = CSVLogger(tmp_path, name="run", version=0)
    fit(CartPolePPO(cfg), [PPOMonitor(log_every_n_steps=1, dense_steps=0, measure_every_n_steps=1)], logger=logger)
    return guard_rows(read_csv(logger.log_dir), metric="entropy_norm"), expected


def test_entropy_is_normalised_by_each_samples_valid_actions(monkeypatch, tmp_path):
    def masked(kw, expected):
        n = kw["new_logp"].numel()
        mask = torch.ones(n, 4, dtype=torch.bool)  # valid actions per sample: 1, 2, 4, 1, 2, 4, ...
        mask[0::3, 1:] = False  # one valid action: the sample's normalised entropy counts as 1.0
        mask[1::3, 2:] = False
        ent = kw["dist"].entropy().detach().double().tolist()
        valid = [1, 2, 4]
        per = [1.0 if valid[i % 3] == 1 else e / math.log(valid[i % 3]) for i, e in enumerate(ent)]
        expected.append(sum(per) / n)
        return {**kw, "action_mask": mask}

    rows, expected = _fit_with(monkeypatch, tmp_path, masked)
    assert len(rows) == len(expected) == 40
    for row, want in zip(rows, expected, strict=True):
        assert row["ppo_guard/actor/entropy_norm"] == pytest.approx(want, rel=1e-5)
    # not the unmasked value (entropy / ln 2 of the 2-action distribution, about 1.0 here)
    assert all(abs(r["ppo_guard/actor/entropy_norm"] - r["ppo_guard/actor/entropy"] / math.log(2)) > 0.1
               for r in rows)


def test_an_all_valid_mask_gives_the_unmasked_value(monkeypatch, tmp_path):
    rows, _ = _fit_with(monkeypatch, tmp_path, lambda kw, _: {
        **kw, "action_mask": torch.ones(kw["new_logp"].numel(), 2, dtype=torch.bool)})
    for r in rows:
        assert r["ppo_guard/actor/entropy_norm"] == pytest.approx(r["ppo_guard/actor/entropy"] / math.log(2), rel=1e-5)


def test_bad_masks_name_the_fix(monkeypatch, tmp_path):
    with pytest.raises(TypeError, match=r"action_mask has dtype torch.int64; pass booleans"):
        _fit_with(monkeypatch, tmp_path, lambda kw, _: {
            **kw, "action_mask": torch.ones(kw["new_logp"].numel(), 2, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"action_mask has shape \(3, 2\); pass one row"):
        _fit_with(monkeypatch, tmp_path, lambda kw, _: {**kw, "action_mask": torch.ones(3, 2, dtype=torch.bool)})
