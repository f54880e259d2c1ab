"""The cadence's overhead budget: which segments are measured once the guard timed its own work.

Unit tests drive :class:`~lightning_ppo_guard._cadence.Cadence` with a fake clock (its decisions are pure Python);
one fit checks the choice end to end on the tiny GPT-2 GRPO of ``tests/zoo/lm_rl.py``, whose rollouts are four
12-ms steps: there the measured work of a rollout costs several percent, so the default budget thins it.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_ppo_guard import PPOGuard, PPOMonitor, _cadence
from lightning_ppo_guard._cadence import Cadence


class FakeTime:
    """Stands in for ``time`` in ``_cadence``: ``perf_counter`` returns a clock the test advances."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def run(cadence: Cadence, clock: FakeTime, segments: int, steps: int, work: float, step_time: float,
        ) -> list[list[bool]]:
    """Drive ``segments`` segments of ``steps`` steps of one optimizer; each measured step charges ``work`` seconds
    of guard time, each step takes ``step_time``. Returns which steps were measured, per segment."""
    key, measured = 1, []
    cadence.clock(key)
    for _ in range(segments):
        cadence.start_segment(("rollout", cadence.segments), rollout=True)  # a new id each time
        row = []
        for _ in range(steps):
            m = cadence.measuring(key)
            row.append(m)
            clock.now += step_time
            if m:
                t0 = clock.now
                clock.now += work
                cadence.charge(t0)
            cadence.stepped(key, measured=m)
        measured.append(row)
    return measured


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(_cadence, "time", fake)
    return fake


def test_a_cheap_measurement_keeps_every_segment(clock: FakeTime) -> None:
    """Measured work of 0.5% of a segment, budget 1%: nothing thinned; one measured step per sparse segment."""
    cadence = Cadence(dense_steps=8, every=64, budget=0.01, grace=8)
    measured = run(cadence, clock, segments=30, steps=8, work=0.002, step_time=0.05)
    assert cadence.chosen and cadence.thin == 1
    assert all(sum(row) >= 1 for row in measured)


def test_an_expensive_measurement_thins_the_segments_after_the_grace(clock: FakeTime) -> None:
    """Measured work of 5% of a segment (one 20-ms measurement per four 100-ms steps), budget 1%: ``thin`` is
    ceil(0.05 / 0.01) = 5 from the grace on; the first segments (dense start, grace) are all measured; a thinned
    segment measures nothing and the next measured one still measures only its predicted last step."""
    cadence = Cadence(dense_steps=16, every=64, budget=0.01, grace=8)
    measured = run(cadence, clock, segments=60, steps=4, work=0.02, step_time=0.1)
    assert cadence.thin == 5
    first = cadence.grace  # the segment (1-based) whose start chose ``thin``
    assert all(any(row) for row in measured[:first - 1])
    later = measured[first:]
    for i, row in enumerate(later, start=first + 1):  # segment numbers are 1-based
        if i % cadence.thin:
            assert not any(row), (i, row)
        else:
            assert row == [False, False, False, True], (i, row)  # the predicted last step only
    # the measured share of the later segments is the budget's (one segment in 5 at 5% each)
    assert sum(map(any, later)) == sum(1 for i in range(first + 1, first + 1 + len(later)) if i % cadence.thin == 0)


def test_the_choice_waits_for_enough_timed_segments(clock: FakeTime) -> None:
    """Segments of two steps: the dense start (16 steps) covers the first 8, so ``thin`` is chosen once 4 segments
    past it were timed (at the start of the 13th), not at the grace (8); work 5% of a segment, budget 1%: 5."""
    cadence = Cadence(dense_steps=16, every=64, budget=0.01, grace=8)
    run(cadence, clock, segments=12, steps=2, work=0.001, step_time=0.01)
    assert not cadence.chosen and cadence.thin == 1 and len(cadence.shares) == 3
    cadence.start_segment(("rollout", 12), rollout=True)
    assert cadence.chosen and cadence.thin == math.ceil(0.001 / 0.02 / 0.01 - 1e-9) == 5


def test_no_budget_and_the_exact_tier_never_thin(clock: FakeTime) -> None:
    for cadence in (Cadence(16, 64, budget=None), Cadence(16, 1, budget=0.01)):
        measured = run(cadence, clock, segments=40, steps=4, work=0.05, step_time=0.1)
        assert cadence.thin == 1 and all(any(row) for row in measured)


def test_sampled_segments_follow_the_thinning(clock: FakeTime) -> None:
    """The per-rollout wiring reads (first-minibatch ratio, signs) go with the measured segments once thinned."""
    cadence = Cadence(16, 64, budget=0.01, grace=8)
    run(cadence, clock, segments=40, steps=4, work=0.02, step_time=0.1)
    assert cadence.thin == 5
    cadence.start_segment(("rollout", 100), rollout=True)
    assert cadence.sampled_segment() == (cadence.segments % 5 == 0)


@pytest.mark.parametrize("budget", [0, -0.1, 1.5, "1%", True])
def test_a_bad_budget_is_refused_with_the_fix(budget: object) -> None:
    with pytest.raises(ValueError, match="overhead_budget must be a share"):
        PPOGuard(overhead_budget=budget)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="overhead_budget"):
        PPOMonitor(overhead_budget=budget)  # type: ignore[arg-type]


def test_the_budget_thins_a_tiny_language_model_fit_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """A real fit: tiny GPT-2 GRPO, 40 rollouts of 4 steps (12 ms each on a CPU). The guard's measured work is
    several percent of such a rollout (~7%), so a budget of 1% measures 1 rollout in k > 1 after the first 5,
    announces it once, and reads fewer observes than ``overhead_budget=None``, which measures every rollout; both
    stay quiet (a healthy run)."""
    pytest.importorskip("transformers")
    from tests.zoo.lm_rl import LMArgs, fit

    steps: dict[str, int] = {}
    for name, budget in (("thinned", 0.01), ("none", None)):
        guard = PPOGuard(overhead_budget=budget, verbose=False)
        with caplog.at_level(logging.INFO):
            caplog.clear()
            fit(LMArgs(iterations=40, observe="full"), [guard])
        said = [r.getMessage() for r in caplog.records if "overhead_budget=" in r.getMessage()]
        assert guard.findings == [] and guard.notices == []
        if budget is None:
            assert said == [] and guard.thinning is None
        else:
            assert guard.thinning is not None, said
            k, first = guard.thinning
            assert k > 1 and first > 5 and len(said) == 1 and f"1 rollout in {k} from rollout {first}" in said[0]
            assert f"measured 1 rollout in {k} from rollout {first} on" in guard.summary()
        assert guard.optimizer_steps == 160
        steps[name] = guard.observes  # the observes read (measured or a first minibatch's ratio)
    assert steps["thinned"] < 0.75 * steps["none"], steps


def test_a_learning_rate_that_drops_while_thinned_is_measured_in_full(clock: FakeTime) -> None:
    """Thinned to 1 segment in 5, the actor's lr drops 1000x (a decay typo) at segment 30: the next 4 segments are
    measured in full, then the thinning resumes with the new rate as the reference; a decay of 20% per segment
    attends once per 100x, never at every segment (a halving alone can name nothing)."""
    cadence = Cadence(16, 64, budget=0.01, grace=8)
    lr = [1e-3]
    cadence.read_lrs = lambda: (lr[0],)
    run(cadence, clock, segments=30, steps=4, work=0.02, step_time=0.1)
    assert cadence.thin == 5
    lr[0] = 1e-6
    measured = run(cadence, clock, segments=10, steps=4, work=0.02, step_time=0.1)
    assert [any(row) for row in measured[:4]] == [True] * 4
    assert [any(row) for row in measured[4:]] == [(31 + 4 + i) % 5 == 0 for i in range(6)]
    attended = 0
    for _ in range(30):
        lr[0] *= 0.8
        run(cadence, clock, segments=1, steps=4, work=0.02, step_time=0.1)
        attended += cadence.attend == 3  # set to 4 at the segment's start, which it counts
    assert attended == 1  # 0.8**21 < 1/100 < 0.8**20: one 100x drop in 30 segments


def test_without_segments_a_learning_rate_move_measures_the_next_16_steps(clock: FakeTime) -> None:
    """Automatic optimization without rollout ids: one step in 16 after the dense start until step 256, then one in
    64, but the learning rates are read every 8 steps, and a drop to 0 gets the next 16 steps of each optimizer
    measured (PPG003 counts 16 consecutive measured steps at lr 0 where no rollout is known)."""
    cadence = Cadence(16, 64, budget=0.01)
    lr = [1e-3]
    cadence.read_lrs = lambda: (lr[0],)
    cadence.clock(1)
    measured = []
    for n in range(600):
        if n == 300:
            lr[0] = 0.0
        m = cadence.measuring(1)
        measured.append(m)
        cadence.stepped(1, measured=m)
    assert all(measured[:16]) and 240 // 16 - 1 <= sum(measured[16:256]) <= 240 // 16 + 1
    assert sum(measured[256:296]) <= 1
    assert all(measured[304:320])  # read at step 304 (every 8 steps), then 16 steps
    assert sum(measured[320:600]) <= 280 // 64 + 1


@pytest.mark.parametrize("lr0", [0.0, 1e-3])
def test_the_dense_start_is_8_steps_and_16_without_segments_at_lr_0(lr0: float) -> None:
    """The dense start holds PPG204's run of 8 measured steps; without segments a learning rate of 0 at the start gets
    16 (PPG003 counts 16 consecutive measured steps at lr 0 there). So does a first rollout, whose length is not
    known yet: until a segment ended, the cadence measures as without segments."""
    for segments in (False, True):
        cadence = Cadence(8, 64, budget=0.01)
        cadence.read_lrs = lambda: (lr0,)
        cadence.clock(1)
        measured = []
        for n in range(64):
            if segments and n % 32 == 0:
                cadence.start_segment(n // 32, rollout=True)
            m = cadence.measuring(1)
            measured.append(m)
            cadence.stepped(1, measured=m)
        dense = 16 if lr0 == 0.0 else 8
        assert all(measured[:dense]), (segments, measured)
        assert sum(measured[dense:32]) <= 2, (segments, measured)  # one in 16 without segments; the last with


def test_an_lr_schedule_that_reaches_zero_early_is_named_without_rollout_ids() -> None:
    """The seed's situation in automatic optimization with the minimal call (no rollout ids, so one step in 64 is
    measured): the actor's lr schedule reaches 0 at the 4th rollout (a LambdaLR whose horizon is 3 rollouts, not
    the run). PPG003 within 2 rollouts of it, not ~25 (16 measured steps at 1 in 64); a schedule that decays to 0 at
    the end of the run (annealing) is no finding."""
    import lightning as L

    from lightning_ppo_guard.reference import PPOConfig, trainer_kwargs
    from lightning_ppo_guard.reference.cartpole import CartPolePPOAuto

    class EarlyZero(CartPolePPOAuto):
        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            out = super().configure_optimizers()
            if not self.cfg.anneal_lr:
                optimizer = out
                scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: max(0.0, 1.0 - it / 3))
                return {"optimizer": optimizer, "lr_scheduler": self._scheduler_config(scheduler)}
            return out

    results = {}
    for anneal in (False, True):
        cfg = PPOConfig(seed=0, observe="minimal", anneal_lr=anneal)
        cfg.total_timesteps = 10 * cfg.batch_size
        L.seed_everything(0, verbose=False)
        module = EarlyZero(cfg)
        guard = PPOGuard(verbose=False)
        L.Trainer(**trainer_kwargs(module), logger=False, enable_checkpointing=False, callbacks=[guard]).fit(module)
        results[anneal] = {f.code: f.step for f in guard.findings}
        per_rollout = cfg.update_epochs * cfg.num_minibatches
    assert set(results[False]) == {"PPG003"} and results[False]["PPG003"] <= 5 * per_rollout, results
    assert results[True] == {}, results


def test_segments_of_one_step_are_measured_one_step_in_every(clock: FakeTime) -> None:
    """A manual loop with one minibatch per training batch makes segments of one step: after the dense start one
    step in ``every / 4`` until step ``4 * every``, then one in ``every`` (nothing at all was, before: no step of a
    one-step segment is its "last after the first")."""
    cadence = Cadence(16, 64, budget=None)
    measured = run(cadence, clock, segments=600, steps=1, work=0.0, step_time=0.01)
    early, later = [row[0] for row in measured[16:256]], [row[0] for row in measured[256:]]
    assert 240 // 16 - 1 <= sum(early) <= 240 // 16 + 1
    assert 344 // 64 - 1 <= sum(later) <= 344 // 64 + 1


@settings(max_examples=150, deadline=None)
@given(dense=st.sampled_from([0, 1, 8]), every=st.sampled_from([2, 4, 64]), optimizers=st.integers(1, 3),
       lengths=st.lists(st.integers(1, 40), min_size=1, max_size=25), fast=st.booleans())
def test_a_held_decision_is_the_decision_made_afresh(dense: int, every: int, optimizers: int, lengths: list[int],
                                                     fast: bool) -> None:
    """``Clock.quiet_until`` holds a False decision over the coming steps of a segment, and the engine's post-hook
    counts those steps inline (``fast``: as it does, ``steps``/``observes_at`` only). A twin cadence made to decide
    every step afresh (its cached decision and hold cleared before each) measures the very same steps, over
    segments of any lengths (one-step segments too) and several optimizers stepped in turn."""
    held, fresh = Cadence(dense, every), Cadence(dense, every)
    keys = list(range(1, optimizers + 1))
    for cadence in (held, fresh):
        for key in keys:
            cadence.clock(key)
    for segment, length in enumerate(lengths):
        for cadence in (held, fresh):
            cadence.start_segment(("rollout", segment), rollout=True)
        for _ in range(length):
            for key in keys:
                for cadence in (held, fresh):
                    cadence.observes += 1
                c = fresh.clocks[key]
                c.decision, c.quiet_until = None, 0
                assert held.measuring(key) == fresh.measuring(key)
                measured = fresh.measuring(key)
                clock = held.clocks[key]
                if fast and not measured and clock.steps + 1 < clock.quiet_until:
                    clock.steps += 1
                    clock.observes_at = held.observes
                else:
                    held.stepped(key, measured=measured)
                fresh.stepped(key, measured=measured)
                assert held.clocks[key].seen == fresh.clocks[key].seen
