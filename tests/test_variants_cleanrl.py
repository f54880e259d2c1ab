"""CleanRL-style PPO (code the guard was not tuned on): silent on healthy runs, planted faults named by the deadline.

Every variant of :mod:`tests.zoo.cleanrl` is one real ``Trainer.fit``. The short ones
(a few seconds each) run by default with seed 0; the full trainings are ``slow`` and run on seeds 0, 1 and 2.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger

from tests.zoo import Variant, run_variant
from tests.zoo.cleanrl import RETURN_TO_REACH, VARIANTS

BY_NAME = {v.name: v for v in VARIANTS}
CASES = [
    pytest.param(v, seed, id=f"{v.name}-seed{seed}", marks=[pytest.mark.slow] if v.slow else [])
    for v in VARIANTS
    for seed in ((0, 1, 2) if v.slow else (0,))
]


def _named(guard) -> list[tuple[str, str, int]]:
    return [(f.code, f.role, f.step) for f in guard.findings]


def _check(variant: Variant, guard) -> None:
    """A healthy variant: no finding at all. A faulty one: each expected (code, role) named by the deadline, and
    nothing but the expected and allowed codes."""
    if variant.healthy:
        assert guard.findings == [], f"{variant.name}: false alarm(s) {_named(guard)}\n{guard.summary()}"
        return
    for code, role in sorted(variant.expect):
        named = [f for f in guard.findings if (f.code, f.role) == (code, role)]
        assert named, f"{variant.name}: expected {code}[{role}] by step {variant.deadline}, got {_named(guard)}"
        if variant.deadline is not None:
            assert named[0].step <= variant.deadline, (
                f"{variant.name}: {code}[{role}] named at step {named[0].step}, after the deadline {variant.deadline}")
    codes = {code for code, _ in variant.expect} | set(variant.allowed)
    extra = [(f.code, f.role, f.step) for f in guard.findings if f.code not in codes]
    assert not extra, f"{variant.name}: unexpected finding(s) {extra}\n{guard.summary()}"


@pytest.mark.parametrize(("variant", "seed"), CASES)
def test_variant(variant: Variant, seed: int) -> None:
    guard, _, module = run_variant(variant, seed)
    _check(variant, guard)
    if variant.slow and variant.healthy:
        recent = module.recent_returns[-20:]
        mean_return = sum(recent) / len(recent)
        assert mean_return >= RETURN_TO_REACH[variant.name], f"{variant.name} seed {seed}: return {mean_return:.1f}"


def test_variant_names_are_unique_and_every_slow_variant_has_a_return_to_reach() -> None:
    assert len(BY_NAME) == len(VARIANTS)
    assert {v.name for v in VARIANTS if v.slow and v.healthy} == set(RETURN_TO_REACH)
    for v in VARIANTS:
        assert v.healthy or v.deadline is not None, v.name


def _read_csv(log_dir: str | Path) -> list[dict[str, float]]:
    with open(Path(log_dir) / "metrics.csv", newline="") as fh:
        return [{k: float(x) for k, x in row.items() if x not in ("", None)} for row in csv.DictReader(fh)]


def test_gaussian_entropy_is_logged_for_the_whole_action(tmp_path) -> None:
    """``observe(dist=Normal)`` with a 3-dim action: the logged entropy is the per-sample entropy of the whole
    action (``dist.entropy().sum(-1)``, as CleanRL computes it), not the mean over action dimensions."""
    variant = BY_NAME["cleanrl-continuous-3d"]
    logger = CSVLogger(tmp_path, name="run")
    _, _, module = run_variant(variant, 0, logger=logger, dense_steps=10**6)  # every minibatch measured
    # the module's own number: 3 dims x 0.5 * log(2 pi e) at std 1, drifting slowly
    assert module.entropy_log[0][1] == pytest.approx(3 * 0.5 * math.log(2 * math.pi * math.e), rel=1e-3)
    ours = [h for _, h in module.entropy_log]
    lo, hi = min(ours) * (1 - 1e-3), max(ours) * (1 + 1e-3)
    rows = [(int(r["step"]), r["ppo_guard/actor/entropy"]) for r in _read_csv(logger.log_dir)
            if "ppo_guard/actor/entropy" in r]
    assert rows, "no ppo_guard/actor/entropy row"
    assert all(lo <= x <= hi for _, x in rows), f"logged entropy {rows}, the module's {lo:.4f}..{hi:.4f}"
    # the first row (one rollout, every minibatch measured) is the mean over its minibatches
    first_step, first = rows[0]
    in_first = [h for step, h in module.entropy_log if step < first_step]
    assert first == pytest.approx(sum(in_first) / len(in_first), rel=1e-4), (first_step, first)


def test_approx_kl_rows_after_the_dense_phase_are_not_all_zero_with_16_steps_per_rollout(tmp_path) -> None:
    """CleanRL 4x4 (16 steps per rollout, healthy): past the dense phase (the first 16 steps) every logged approx_kl
    must still show the policy moving. A row that measured only a rollout's first minibatch (ratio exactly 1) would
    read 0, which a cadence of "1 step in 16 or 64" does on every row."""
    variant = BY_NAME["cleanrl-4x4"]
    logger = CSVLogger(tmp_path, name="run")
    run_variant(variant, 0, logger=logger)
    key = "ppo_guard/actor/approx_kl"
    late = [(int(r["step"]), r[key]) for r in _read_csv(logger.log_dir) if key in r and r["step"] > 16]
    assert len(late) >= 3, f"too few approx_kl rows after step 16: {late}"
    assert all(kl > 1e-7 for _, kl in late), f"approx_kl rows after step 16 read ~0: {late}"


def test_target_kl_breaks_after_an_epoch_as_in_cleanrl() -> None:
    """The planted ``target_kl_tiny`` stops every update phase after its first epoch (4 of 16 steps); the healthy
    ``target_kl=5e-4`` stops some phases after 2 or 3 epochs, never after the first."""
    _, _, tiny = run_variant(BY_NAME["cleanrl-4x4-target-kl-tiny"], 0)
    assert set(tiny.epochs_run) == {1}, tiny.epochs_run
    _, _, tight = run_variant(BY_NAME["cleanrl-4x4-target-kl"], 0)
    assert min(tight.epochs_run) >= 2 and any(n < 4 for n in tight.epochs_run), tight.epochs_run
