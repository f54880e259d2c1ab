"""Which optimizer steps are measured: dense at the start, then by rollouts, per optimizer. Pure Python.

The dense start (``dense_steps``, 8 by default) is as long as the longest run of consecutive measured steps a step
rule needs (PPG204's 8; the others 2 or 3), so that a fault present from the first update is named at its first
possible step. Without segments (and in a first segment, whose length is not known yet), a learning rate of 0 at
the start gets its first 16 steps measured (PPG003's run there: a warm-up from 0 rises sooner).

A cadence of "1 step in N" aliases with the steps per rollout (16, 32, 64 are common): it then sees only a
rollout's first minibatch, where the ratio is exactly 1, and a healthy run logs ``approx_kl`` 0. So after the
dense start each optimizer is measured **once per segment, at the step predicted to be the segment's last**
(where the policy has moved most since the rollout began), plus one step in ``every`` within long segments.
A segment is a rollout when ``observe(rollout=...)`` says where they start, else a training batch in manual
optimization (a batch is usually one PPO iteration). Without either (automatic optimization, no rollout ids),
one step in ``every`` is measured with a phase that shifts by one each period, so over the run the measured
steps fall on every position of any periodic structure; over the first ``4 * every`` steps, one in ``every / 4``
(the step rules count measured steps in a row: without rollouts they would otherwise wait a thousand steps for the
evidence the first rollouts hold, and faults are what the first updates show).

Each optimizer has its own counters, so two optimizers stepped in turn (critic first, then actor) are both
measured, whatever their order.

**The overhead budget.** On a small model the measured segment's work (the fused norms, the observe statistics,
the row and its rules: a fixed number of small ops, ~1-3 ms on a CPU) is not small against a short rollout (four
12-ms steps of a tiny language model, say). With ``budget`` set, the guard times that work (its rare branches
only, never an unmeasured step) and the segments' wall time over the segments after the dense start, and at
segment ``grace`` (or as soon after as 4 such segments were timed) sets ``thin``: from then on one segment in
``thin`` is measured and read, where ``thin = ceil(median(work share of a segment) / budget)``. Chosen once per fit,
so the cadence stays a deterministic function of the segment count from then on; the first ``grace`` segments
(where every fault of the zoos is named) are always measured. Under a process group the budget is off: every
rank must measure the same steps, and a time-based choice could differ between ranks.

A thinned cadence still watches the learning rates (host numbers, read at each segment start through
``read_lrs``): a schedule that drops the actor's lr by 100x or more (to 0, a decay typo) is the most common fault
that starts late, and its rules count measured steps, so the next ``_ATTEND`` segments are measured in full and the new
rates become the reference. Without segments (automatic optimization, no rollout ids: one step in ``every``) the
rates are read every 8 steps, and such a drop gets the next 16 steps of every optimizer measured: PPG003 and PPG204
count consecutive measured steps, which one step in 64 would take a thousand steps to give. The engine stops the
watch at 90% of the fit (a drop after it is a schedule's end, which no rule names).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

__all__ = ["Cadence", "Clock"]

#: segments timed before ``thin`` is chosen (after the dense start), and the largest ``thin``
_SAMPLES, _MAX_THIN = 4, 64
#: segments measured in full after a learning rate dropped by this factor or more while thinned; without segments,
#: the learning rates are read every ``_LR_EVERY`` steps and ``_ATTEND_STEPS`` steps are measured after a move
_ATTEND, _LR_FACTOR, _LR_EVERY, _ATTEND_STEPS = 4, 100.0, 8, 16
#: without segments, one step in ``every // _EARLY`` is measured until ``_EARLY * every`` steps (then one in ``every``)
_EARLY = 4
#: ``Clock.quiet_until`` when no step of the segment is measured any more
_NEVER = 1 << 62


def _moved(before: float, now: float) -> bool:
    """Whether a learning rate dropped by ``_LR_FACTOR`` or more (to 0 included), or rose from 0; NaN is no evidence.

    What the step rules can name: lr 0 (PPG003), and a step too small (PPG204: a relative update below 1e-6, where a
    healthy one is 1e-4 and more: only a drop of 100x or more gets there). A schedule that halves, or anneals to 0
    over the fit, is measured in full only near its end, not at every halving."""
    if not (math.isfinite(before) and math.isfinite(now)):
        return False
    if before <= 0.0:
        return now > 0.0
    return now <= before / _LR_FACTOR


class Clock:
    """One optimizer's steps: in the fit, and in the current and the previous segment."""

    __slots__ = ("attend_until", "decision", "late", "late_before", "measured", "observes_at", "previous",
                 "quiet_until", "seen", "start", "steps")

    def __init__(self) -> None:
        self.steps = 0  # optimizer steps taken in this fit
        self.measured = 0  # ... of which measured
        self.start = 0  # ``steps`` when the current segment began (``steps - start``: the coming step's position)
        self.previous: int | None = None  # steps in the last segment this optimizer stepped in
        self.late = False  # a step after the current segment's first was measured
        self.late_before = True  # ... and in the previous segment
        self.decision: bool | None = None  # whether the coming step is measured (None: not decided yet)
        # in a segment, the coming steps are unmeasured (``decision`` False) while ``steps`` is below this: the
        # next measured position, found when a decision came out False (a new segment sets it back to 0). Counting
        # an unmeasured step whose count stays below it changes ``steps`` and ``observes_at`` only: the engine's step
        # hook does that itself, on every such step (one call less), and calls :meth:`Cadence.stepped` otherwise
        self.quiet_until = 0
        self.attend_until = 0  # without segments: every step is measured until this many (a learning rate moved)
        self.observes_at = 0  # the cadence's observe count at this optimizer's last step
        self.seen = True  # at a measured step: an observe came since this optimizer's previous step


class Cadence:
    """Measurement decisions for every optimizer of a fit (see the module docstring).

    Args:
        dense_steps: every step of an optimizer is measured until it took this many.
        every: in the sparse phase, one step per segment and one in ``every`` within longer segments; without
            segments, one step in ``every``.
        budget: the share of the segments' time the measured work may take after the first ``grace`` segments
            (None: every segment is measured).
        grace: segments always measured.
    """

    __slots__ = ("attend", "budget", "by_rollout", "chosen", "clocks", "dense_steps", "every", "grace", "lrs",
                 "observes", "quiet", "read_lrs", "segment_id", "segments", "shares", "skipping", "spent", "started_at",
                 "thin", "timed")

    def __init__(self, dense_steps: int, every: int, budget: float | None = None, grace: int = 5) -> None:
        self.dense_steps, self.every = dense_steps, every
        self.budget, self.grace = budget, grace
        self.thin = 1  # one segment in ``thin`` is measured (chosen once, see the module docstring)
        self.chosen = budget is None or every == 1  # whether ``thin`` is chosen (for good; the exact tier: 1)
        self.skipping = False  # the current segment is thinned out: nothing in it is measured or read
        self.spent = 0.0  # seconds of measured work charged to the current segment
        self.shares: list[float] = []  # work / (wall - work) of the timed segments
        self.started_at: float | None = None  # perf_counter at the current segment's start (while choosing)
        self.timed = False  # the current segment is timed (past the dense start when it began)
        # the learning rates of every param group, read at segment starts once thinned (set by the engine)
        self.read_lrs: Callable[[], tuple[float, ...]] | None = None
        self.lrs: tuple[float, ...] | None = None  # ... as they were when ``thin`` was chosen or last moved
        self.attend = 0  # segments still measured in full after the learning rates moved
        self.clocks: dict[int, Clock] = {}
        self.segments = 0  # segments started so far
        self.observes = 0  # observe calls so far (counted by the engine: a step with none built no policy loss)
        self.segment_id: object = None  # what identifies the current segment (a rollout id, a batch count)
        self.by_rollout = False  # segments come from observe(rollout=...), not from batches
        # True once :meth:`any_measuring` found no optimizer's coming step measured, until a step or a segment
        # changes that: the one cached decision the hooks of an unmeasured step read (an attribute, no call)
        self.quiet = False

    def clock(self, key: int) -> Clock:
        clock = self.clocks.get(key)
        if clock is None:
            clock = self.clocks[key] = Clock()
            self.quiet = False
        return clock

    def start_segment(self, segment_id: object, *, rollout: bool) -> bool:
        """A rollout (``rollout=True``) or a training batch begins; returns whether it is a new segment.
        Once rollouts are known, batches no longer start segments."""
        if rollout:
            self.by_rollout = True
        elif self.by_rollout:
            return False
        if segment_id == self.segment_id:
            return False
        if not self.chosen:
            self._time_segment()
        self.segment_id = segment_id
        self.segments += 1
        self.quiet = False
        skipped, self.skipping = self.skipping, self.thin > 1 and self._thinned_out()
        for clock in self.clocks.values():
            if clock.steps > clock.start:  # an optimizer that did not step in the segment keeps its last length
                clock.previous = clock.steps - clock.start
                if not skipped:  # a thinned-out segment measured nothing by design: no early end seen
                    clock.late_before = clock.late
            clock.start, clock.late, clock.decision, clock.quiet_until = clock.steps, False, None, 0
        return True

    def lrs_moved(self) -> bool:
        """Read the learning rates (``read_lrs``): whether one dropped by 100x or more (or rose from 0) since the
        reference, which then becomes the rates read now."""
        if self.read_lrs is None:
            return False
        lrs = self.read_lrs()
        if self.lrs is None or len(lrs) != len(self.lrs):
            self.lrs = lrs
            return False
        if any(_moved(a, b) for a, b in zip(self.lrs, lrs, strict=True)):
            self.lrs = lrs
            return True
        return False

    def _thinned_out(self) -> bool:
        """Whether the segment just started is left out (``thin`` > 1): not its turn, and no learning rate moved."""
        if self.lrs_moved():
            self.attend = _ATTEND
        if self.attend:
            self.attend -= 1
            return False
        return self.segments % self.thin != 0

    def charge(self, started: float) -> None:
        """Add the measured work begun at ``started`` (``time.perf_counter()``) to the current segment."""
        if not self.chosen:
            self.spent += time.perf_counter() - started

    def uncharge(self, started: float) -> None:
        """Take the time since ``started`` out of the current segment's work (a device-to-host read inside a
        charged section: it waits for the queued training work)."""
        if not self.chosen:
            self.spent -= time.perf_counter() - started

    def _time_segment(self) -> None:
        """A segment ends (before the next one's start is counted): keep its work share, choose ``thin`` once
        enough segments were timed."""
        now = time.perf_counter()
        if self.timed and self.started_at is not None:
            spent = max(self.spent, 0.0)
            wall = now - self.started_at - spent
            if wall > 0:
                self.shares.append(spent / wall)
        if self.segments >= self.grace and len(self.shares) >= _SAMPLES:
            assert self.budget is not None
            self.thin = min(_MAX_THIN, max(1, math.ceil(statistics.median(self.shares) / self.budget)))
            self.chosen = True
            return
        # timed: the segments after every optimizer's dense start (their cadence is the one thinned)
        stepping = [c for c in self.clocks.values() if c.steps]  # an optimizer that never steps does not count
        self.timed = bool(stepping) and all(c.steps >= self.dense_steps for c in stepping)
        self.started_at, self.spent = time.perf_counter(), 0.0

    def any_measuring(self) -> bool:
        """Whether the coming step of some optimizer is measured (every hook of an unmeasured step asks: flat)."""
        for clock in self.clocks.values():
            decision = clock.decision
            if decision is None:
                decision = clock.decision = bool(self._decide(clock))
            if decision:
                self.quiet = False
                return True
        self.quiet = True
        return False

    def measuring(self, key: int) -> bool:
        """Whether the coming step of optimizer ``key`` is measured (decided once per step: every hook of the
        step asks, and the answer must not change between them)."""
        clock = self.clocks.get(key) or self.clock(key)
        decision = clock.decision
        if decision is None:
            decision = clock.decision = bool(self._decide(clock))
        return decision

    def _decide(self, clock: Clock, early: bool = False) -> bool | None:
        """Whether ``clock``'s coming step is measured. ``early`` (at the step before): None where the decision
        reads the learning rates, which is left to the step itself (a scheduler steps after the optimizer)."""
        if clock.steps < self.dense_steps or self.every == 1:
            if self.lrs is None and self.read_lrs is not None:  # the reference: the rates the fit starts with
                if early:
                    return None
                self.lrs = self.read_lrs()
                if any(lr == 0.0 for lr in self.lrs):  # without segments, PPG003 counts 16 steps at lr 0
                    self._attend_steps()
            return True
        # no segment known, or segments of one step (a manual loop with one minibatch per batch: a last step that
        # is also the first never comes as "the step after the first"): one step in ``every``, the phase shifting
        if clock.previous is None or clock.previous <= 1:
            n = clock.steps
            if n % _LR_EVERY == 0:
                if early:
                    return None
                if self.lrs_moved():  # a schedule's drop (to 0): its step rules need a streak
                    self._attend_steps()
            every = self.every if n >= _EARLY * self.every else max(1, self.every // _EARLY)  # denser early on
            return n < clock.attend_until or (n + n // every) % every == 0
        # in a segment: its predicted last step, one in ``every`` before it, and the step after the first when the
        # last segment ended early; a False holds until the next of those positions (``quiet_until``)
        if self.skipping:
            clock.quiet_until = _NEVER
            return False
        every, last, pos = self.every, max(clock.previous - 1, 1), clock.steps - clock.start
        if pos == last or (pos < last and pos % every == every - 1) or (pos == 1 and not clock.late_before):
            return True
        ahead = [min(last, pos - pos % every + every - 1)] if pos < last else []
        if pos < 1 and not clock.late_before:
            ahead.append(1)
        clock.quiet_until = clock.steps + min(ahead) - pos if ahead else _NEVER
        return False

    def _attend_steps(self) -> None:
        """Without segments: every optimizer's next ``_ATTEND_STEPS`` steps are measured (an lr at or to 0)."""
        for c in self.clocks.values():
            c.attend_until = c.steps + _ATTEND_STEPS

    def stepped(self, key: int, measured: bool = False) -> None:
        """Count a step of optimizer ``key`` (``measured``: whether it was). With one optimizer, its coming step is
        decided here already (unless that needs a read of the learning rates, which waits for the step itself):
        the hooks of an unmeasured step then read one cached flag, :attr:`quiet`."""
        clock = self.clocks.get(key) or self.clock(key)
        if measured:
            clock.measured += 1
            clock.late = clock.late or clock.steps > clock.start
            clock.seen = self.observes != clock.observes_at
        clock.observes_at = self.observes
        clock.steps += 1
        if clock.steps < clock.quiet_until:  # decided already: unmeasured (see ``Clock.quiet_until``)
            return
        decision = self._decide(clock, early=True) if len(self.clocks) == 1 else None
        clock.decision, self.quiet = decision, decision is False

    def sampled_segment(self) -> bool:
        """Whether the current segment gets the per-rollout wiring reads (the first minibatch's ratio, the backward
        signs): each of the first 16 segments, then 1 in 4; once segments are thinned, each measured one. Without
        segments (0 started), always."""
        if self.thin > 1:
            return not self.skipping
        return self.segments <= 16 or self.segments % 4 == 0

    def counting_nonzero(self, key: int) -> bool:
        """Whether a measured step counts nonzero gradients (a full pass): each dense step, then 1 in 8."""
        clock = self.clock(key)
        return clock.steps < self.dense_steps or clock.measured % 8 == 0
