"""Rules: pure functions from collected evidence (host numbers) to findings. No Lightning import.

Three kinds of evidence reach the rules, all per role:

* set-up facts (binding, frozen tensors) and wiring facts (what ``observe`` saw of the autograd graph),
  checked once and again when the model changes;
* one :class:`StepFacts` per measured optimizer step;
* one :class:`ObserveFacts` per ``observe``; they are folded into per-rollout aggregates and the
  rollout-level rules run when a rollout ends;
* one :class:`CriticFacts` per measured critic step, and two signs read in the backward of the tensors
  ``observe`` was handed (the policy term's against the advantages, the entropy term's).

A stall is attributed to one cause from evidence that separates them (see DESIGN section 4): a root cause
already named for a role (set-up, wiring, gradient) silences the later symptom rules for that role.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lightning_ppo_guard.config import GuardConfig
from lightning_ppo_guard.diagnoses import Finding

__all__ = ["EXPLAINED_BY", "CriticFacts", "Diagnoser", "ObserveFacts", "RoleState", "StepFacts", "WiringFacts",
           "from_fields"]

#: A finding of these families for a role explains any later stall of that role.
_ROOT_FAMILIES = ("PPG0", "PPG1", "PPG2", "PPG9")

#: Precedence, declared once: a code is not named for a role once one of the codes it maps to was (the earlier
#: finding is the cause, this one would be its consequence). Root causes (families 0, 1, 2, 9) are checked by the
#: rules that follow them; this table holds the orderings among the step-size, signal and entropy codes.
EXPLAINED_BY: dict[str, frozenset[str]] = {
    # a policy that stopped moving: an early stop, tiny advantages, a starved clip or an entropy penalty say why
    "PPG301": frozenset({"PPG302", "PPG402", "PPG403", "PPG502", "PPG304"}),
    "PPG501": frozenset({"PPG302", "PPG402", "PPG403", "PPG502", "PPG304"}),
    "PPG503": frozenset({"PPG302", "PPG402", "PPG403", "PPG502", "PPG304"}),
    # groups that all fail because a KL penalty pins the policy to the reference: the penalty is the cause
    "PPG407": frozenset({"PPG304"}),
    "PPG401": frozenset({"PPG407"}),
    # advantages without any spread are not "tiny": the degenerate (or wasted-group) finding is the cause
    "PPG402": frozenset({"PPG401", "PPG407"}),
}


@dataclass
class StepFacts:
    grad_norm: float  # pre-clip, after backward
    grad_norm_clipped: float  # at the optimizer step
    clip_coef: float
    nonzero_frac: float
    grad_none: int
    trainable_tensors: int
    nonfinite: float
    update_norm: float
    update_ratio: float
    binding: float
    lr: float  # smallest lr of the groups holding the role, read at this step
    critic_grad_norm: float = math.nan  # critic's pre-clip norm at the same step, when it shares the clip
    lr_max: float = math.nan  # largest lr of those groups at this step (0: no part of the role can move)
    segment: int | None = None  # index of the rollout (or batch) of this step; None when not known
    fraction: float | None = None  # share of the planned fit done; None when not known
    opt_eps: float = math.nan  # the optimizer's eps for the role (Adam...); nan for optimizers without one
    trainable_numel: int = 0  # trainable elements of the role
    policy: bool = True  # an actor (False: a shared trunk, whose step size the policy rules do not judge)
    head_ratio: float = math.nan  # shared trunk: the critic head's gradient into it / the actor head's (nan: unknown)


@dataclass
class ObserveFacts:
    approx_kl: float
    ratio_dev: float
    adv_mean: float = math.nan
    logp_mean: float = math.nan  # mean new_logp: exactly 0 for a deterministic (saturated) policy
    adv_std: float = math.nan
    entropy_norm: float = math.nan
    entropy_drift: float = math.nan
    first_in_rollout: bool = False
    rollout: int | None = None
    target_kl: float | None = None
    prev_updates: int | None = None  # actor steps in the rollout that this observe's first_in_rollout ends
    samples: int = 2  # minibatch size
    adv_given: bool = True  # advantages were passed (so a NaN adv_std is data, not absence)
    precision_eps: float = 1.2e-7  # machine eps of the lowest precision new_logp was computed in (autocast)
    boundary_only: bool = False  # a rollout's first minibatch whose ratio was not read: it only ends the last one
    clip_fraction: float = math.nan
    log_std: float = math.nan  # a Gaussian policy's mean log std
    inferred: bool = False  # the rollout is a manual-optimization batch (observe got no rollout id)
    prev_observes: int | None = None  # observe calls in the rollout that this observe's first_in_rollout ends
    adv_zero_frac: float = math.nan  # share of the advantages exactly 0
    ref_kl: float = math.nan  # KL(pi_new || pi_ref) to a frozen reference model
    reward_min: float = math.nan  # the minibatch's sequences' rewards
    reward_max: float = math.nan
    groups: float = math.nan  # groups (prompts) in the minibatch
    zero_adv_groups: float = math.nan  # share of groups whose rewards have no spread
    zero_adv_groups_top: float = math.nan  # ... of which at the minibatch's best reward
    zero_group_reward: float = math.nan  # ... and their mean reward
    adv_reward_corr: float = math.nan  # correlation of the sequences' advantages with their rewards, within groups


@dataclass
class CriticFacts:
    """One measured optimizer step of the critic."""

    grad_norm: float  # pre-clip, after backward
    binding: float
    lr_max: float = math.nan
    segment: int | None = None


@dataclass
class WiringFacts:
    logp_requires_grad: bool
    old_requires_grad: bool
    by_hand: str = ""  # graph pattern when log() of gathered probabilities was found
    #: the role's dropout / batch-norm layers in train mode when observed (None: not looked at this time)
    train_mode_layers: str | None = None


T = TypeVar("T")


def from_fields(cls: type[T], values: dict[str, Any]) -> T:
    """A dataclass restored from a checkpoint tolerantly: keys it no longer has are ignored, fields the checkpoint
    lacks keep their defaults (a renamed or added field never fails a resume; that field restarts)."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in values.items() if k in names})


@dataclass
class SegmentVote:
    """Consecutive rollouts in which most measured steps showed a condition. Without rollout (segment) ids each
    measured step counts half a rollout, so ``n`` rollouts need ``2 n`` consecutive hits."""

    segment: int | None = None
    n: int = 0  # measured steps of the current segment ...
    hits: int = 0  # ... that showed the condition
    streak: int = 0  # finished segments in a row where most did

    def add(self, hit: bool, segment: int | None, rollouts: int) -> bool:
        """Count one measured step; whether the condition now holds over ``rollouts`` (the segment in progress counts
        once most of its steps so far hit, and only at a step that hits)."""
        if segment is None:
            self.streak = self.streak + 1 if hit else 0
            return self.streak >= 2 * rollouts
        if self.segment is not None and segment != self.segment and self.n:
            self.streak = self.streak + 1 if 2 * self.hits > self.n else 0
            self.n = self.hits = 0
        self.segment = segment
        self.n += 1
        self.hits += hit
        return hit and self.streak + (2 * self.hits > self.n) >= rollouts

    def rollouts(self, segment: int | None) -> int:
        """Rollouts the condition has held over (with the one in progress)."""
        return self.streak + (segment is not None)


@dataclass
class RoleState:
    """Per-role counters the rules keep between calls (saved in the guard's checkpoint state)."""

    # consecutive-step streaks (over measured steps), and the segment (rollout) each one started in
    zero_grad: int = 0
    cleared: int = 0
    clipped_zero: int = 0
    unchanged: int = 0
    lr_zero: int = 0
    lr_zero_from: int | None = None
    tiny_update: int = 0
    tiny_from: int | None = None
    starved: int = 0  # without rollout ids: consecutive measured steps the shared clip starved (PPG403) ...
    starved_since: int | None = None  # ... and the optimizer step the streak began at
    skipped: int = 0
    lr_peak: float = 0.0  # the largest lr seen for the role
    annealed: bool = False  # an lr schedule has taken the lr far below its peak near the end of the fit
    # current rollout aggregates
    r_observes: int = 0
    r_kl_sum: float = 0.0
    r_kl_n: int = 0
    r_ratio_dev: float = 0.0
    r_adv_std_sum: float = 0.0
    r_adv_mean_sum: float = 0.0
    r_ent_norm: float = math.nan
    r_ent_drift: float = math.nan
    r_upd_sum: float = 0.0
    r_upd_n: int = 0
    r_clip_sum: float = 0.0
    r_critic_ratio_sum: float = 0.0
    r_clip_n: int = 0
    r_starved_n: int = 0
    r_steps: int = 0
    r_last_kl: float = math.nan
    r_target_kl: float | None = None
    r_kl_max: float = 0.0
    r_clip_frac_sum: float = 0.0
    r_clip_frac_n: int = 0
    r_first_dev: float = math.nan  # max |r - 1| of the rollout's first minibatch (inferred rollouts: judged at its end)
    r_first_tol: float = math.nan  # ... and its tolerance
    r_log_std: float = math.nan  # a Gaussian's mean log std, at the rollout's last measured observe
    r_logp_max: float = -math.inf  # the largest minibatch mean of new_logp (0: the policy is deterministic)
    r_known: bool = False  # the rollout's start is known (a rollout id, or an inferred manual batch): not a window
    r_adv_flat_n: int = 0  # measured minibatches whose advantages had no spread
    r_adv_spread_n: int = 0  # ... and those that had some (their std is summed in r_adv_std_sum)
    r_flat_std: float = math.nan  # ... the last one's std, mean and size
    r_flat_mean: float = math.nan
    r_flat_samples: int = 0
    r_zero_groups_sum: float = 0.0  # groups without reward spread that are not at the best reward (PPG407) ...
    r_groups_sum: float = 0.0  # ... of the groups of the rollout's measured minibatches
    r_zero_reward: float = math.nan  # the mean reward of those groups, at the last observe that had some
    # consecutive-rollout streaks
    flat_adv_rollouts: int = 0  # PPG401: rollouts whose every measured minibatch had advantages without spread
    adv_spread_seen: bool = False  # ... and whether any minibatch of the role ever had spread
    zero_group_rollouts: int = 0  # PPG407: consecutive rollouts most of whose groups were wasted ...
    zero_group_wasted: float = 0.0  # ... the wasted groups over the streak, and all its groups
    zero_group_seen: float = 0.0
    reward_best: float = -math.inf  # the best and worst sequence reward seen (a solved group sits at the best)
    reward_worst: float = math.inf
    against: int = 0  # PPG109: consecutive observes whose advantages fell as the rewards rose
    kl_pinned: int = 0  # PPG304: consecutive reads whose gradient followed the KL penalty, not the advantages
    last_ref_kl: float = math.nan
    frozen_rollouts: int = 0
    exact_rollouts: int = 0  # PPG108: rollouts whose ratio stayed exactly 1 while the actor moved
    early_stop_rollouts: int = 0
    min_updates: int | None = None  # fewest actor steps any finished rollout had
    max_updates: int = 0  # ... and most
    tiny_adv_rollouts: int = 0
    starved_rollouts: int = 0
    last_adv_std: float = math.nan  # mean advantage std of the last finished rollout that measured it
    log_std0: float = math.nan  # ... at the end of its first rollout that measured it
    collapse_rollouts: int = 0
    unstable_recent: list[bool] = field(default_factory=list)  # PPG303: the last rollouts, unstable or not
    # PPG107: consecutive measured observes whose loss gradient raised the log-prob of negative-advantage actions
    backwards: int = 0
    # PPG105 on inferred rollouts (manual batches): consecutive batches whose first ratio deviated, and whether
    # any batch's first ratio was 1 (then a batch is not always a rollout, and inferred boundaries prove nothing)
    first_bad: int = 0
    first_bad_rollouts: int = 0  # PPG105 with rollout ids: consecutive read rollouts whose first ratio deviated
    first_ok: bool = False
    # PPG502: consecutive measured observes whose entropy term had a positive gradient in the loss
    entropy_penalised: int = 0
    # PPG104: consecutive measured observes whose gradient followed a broadcast loss, not a per-sample one
    broadcast_reads: int = 0
    critic: SegmentVote = field(default_factory=SegmentVote)  # PPG406: rollouts of an exactly-zero critic gradient
    trunk: SegmentVote = field(default_factory=SegmentVote)  # PPG404: rollouts the value term owned the trunk
    train_mode_layers: str = ""  # PPG105's suspects seen in the role's modules (see WiringFacts)
    raised: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:  # restored from a checkpoint (dataclasses.asdict): votes come back as dicts
        for name in ("trunk", "critic"):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, from_fields(SegmentVote, value))

    def reset_rollout(self) -> None:
        for name, value in _ROLLOUT_DEFAULTS:
            setattr(self, name, value)


#: The per-rollout aggregates of :class:`RoleState` and their starting values.
_ROLLOUT_DEFAULTS = tuple((f.name, f.default) for f in dataclasses.fields(RoleState) if f.name.startswith("r_"))


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _streak(hit: bool, count: int, start: int | None, segment: int | None) -> tuple[int, int | None]:
    """A streak of consecutive measured steps: its new length, and the segment (rollout) it began in."""
    if not hit:
        return 0, None
    return count + 1, (start if count else segment)


def _span(start: int | None, now: int | None) -> int:
    """How many segments (rollouts) a streak begun in ``start`` covers at ``now`` (0 when not known)."""
    return now - start + 1 if start is not None and now is not None else 0


class Diagnoser:
    """Feeds evidence to the rules and keeps their per-role state. Pure Python: table-testable."""

    def __init__(self, config: GuardConfig | None = None) -> None:
        self.config = config or GuardConfig()
        self.states: dict[str, RoleState] = {}

    def state(self, role: str) -> RoleState:
        state = self.states.get(role)
        if state is None:  # not setdefault: a RoleState (50-odd fields) built on every call costs ~40 us
            state = self.states[role] = RoleState()
        return state

    def _emit(self, role: str, code: str, step: int, **evidence: Any) -> list[Finding]:
        state = self.state(role)
        if code in state.raised or not EXPLAINED_BY.get(code, frozenset()).isdisjoint(state.raised):
            return []
        state.raised.append(code)
        return [Finding(code, role, step, evidence)]

    def rooted(self, role: str) -> bool:
        """Whether a root cause (set-up, wiring, gradient, numerics) is named for ``role``: it explains the rest."""
        return any(code.startswith(_ROOT_FAMILIES) for code in self.state(role).raised)

    # ------------------------------------------------------------------ set-up
    def check_setup(self, role: str, kind: str, step: int, *, binding: float, lr: float, trainable: int,
                    frozen: int, stale_tensors: int, frozen_parts: tuple[str, ...] = (), lazy: int = 0
                    ) -> list[Finding]:
        """Set-up facts of a role of ``kind`` (actor, critic or shared). A frozen actor cannot learn (PPG005);
        a frozen trunk, critic or named part of a role (a Gaussian's ``log_std``) may be frozen on purpose, so it
        is a warning (PPG006). A role left out of the optimizer is an error whatever its kind. A role whose
        tensors are all lazy (``nn.LazyLinear`` before its first forward) is judged once they exist."""
        out: list[Finding] = []
        if trainable == 0 and lazy:
            return out
        if trainable == 0:
            if kind == "actor":
                return self._emit(role, "PPG005", step, frozen=frozen)
            return self._emit(role, "PPG006", step, part=role, frozen=frozen)
        if frozen_parts:  # one finding per role: the first frozen part (the evidence counts every frozen tensor)
            out += self._emit(role, "PPG006", step, part=frozen_parts[0], frozen=frozen)
        # An lr of 0 here is no finding: a warm-up starts at 0. PPG003 waits for a role that does not move
        # (check_step).
        if binding < 1.0:
            if stale_tensors > 0:
                out += self._emit(role, "PPG002", step, binding=binding, stale_tensors=stale_tensors)
            else:
                out += self._emit(role, "PPG001", step, binding=binding)
        return out

    # ------------------------------------------------------------------ wiring
    def check_wiring(self, role: str, step: int, facts: WiringFacts) -> list[Finding]:
        out: list[Finding] = []
        if facts.train_mode_layers is not None:
            self.state(role).train_mode_layers = facts.train_mode_layers
        if facts.old_requires_grad:
            out += self._emit(role, "PPG103", step, old_logp_requires_grad=True)
        if "PPG005" in self.state(role).raised:
            pass  # a frozen actor explains a log-prob without grad
        elif not facts.logp_requires_grad:
            out += self._emit(role, "PPG101", step, new_logp_requires_grad=False)
        if facts.by_hand:
            out += self._emit(role, "PPG106", step, pattern=facts.by_hand)
        return out

    def check_unreached(self, role: str, step: int, *, missing: int, unreached: int, trainable: int) -> list[Finding]:
        """PPG102: of ``trainable`` tensors, ``unreached`` are not in new_logp's graph, and ``missing`` of those got
        no gradient at the step either (an auxiliary head, a value head or a checkpointed block gets one from
        its own term or through an opaque node: not missing)."""
        s = self.state(role)
        if missing <= 0 or {"PPG005", "PPG101"} & set(s.raised):
            return []
        return self._emit(role, "PPG102", step, reached=trainable - missing, trainable=trainable,
                          unreached=unreached)

    # ------------------------------------------------------------------ steps
    def check_step(self, role: str, step: int, f: StepFacts) -> list[Finding]:
        cfg, s = self.config, self.state(role)
        out: list[Finding] = []
        s.skipped = 0
        if f.nonfinite > 0 or not _finite(f.grad_norm):
            out += self._emit(role, "PPG901", step, tensors=int(f.nonfinite), grad_norm=f.grad_norm)
            return out
        all_none = f.trainable_tensors > 0 and f.grad_none >= f.trainable_tensors
        s.zero_grad = s.zero_grad + 1 if f.grad_norm == 0.0 else 0
        s.cleared = s.cleared + 1 if f.grad_norm > 0 and all_none else 0
        s.clipped_zero = s.clipped_zero + 1 if f.grad_norm > 0 and not all_none and f.grad_norm_clipped == 0 else 0
        bound = f.binding >= 1.0
        moving_grad = f.grad_norm_clipped > 0 and bound
        if _finite(f.lr_max):
            s.lr_peak = max(s.lr_peak, f.lr_max)
        # The end of a decaying schedule (cosine or linear to 0): the actor is meant to stop moving there.
        s.annealed = (s.lr_peak > 0 and _finite(f.lr_max) and f.lr_max <= cfg.annealed_lr * s.lr_peak
                      and f.fraction is not None and f.fraction >= cfg.annealed_fraction)
        unchanged = moving_grad and f.update_norm == 0.0
        s.unchanged = s.unchanged + 1 if unchanged else 0
        # lr 0 on a whole shared trunk fixes its features, as a freeze does (often deliberate: a pretrained encoder);
        # the policy still learns through its head, so only an actor at lr 0 is PPG003
        at_lr_zero = _finite(f.lr_max) and f.lr_max == 0.0
        lr_zero = unchanged and at_lr_zero and f.policy
        s.lr_zero, s.lr_zero_from = _streak(lr_zero, s.lr_zero, s.lr_zero_from, f.segment)
        tiny = f.policy and moving_grad and 0.0 < f.update_ratio < cfg.tiny_update_ratio
        s.tiny_update, s.tiny_from = _streak(tiny, s.tiny_update, s.tiny_from, f.segment)
        if _finite(f.update_ratio):
            s.r_upd_sum += f.update_ratio
            s.r_upd_n += 1
        starved = f.policy and self._starved(f)
        s.r_steps += 1
        s.r_starved_n += starved
        if f.segment is None:  # no rollouts to judge by: a streak of measured steps, over a span of the fit
            s.starved, s.starved_since = _streak(starved, s.starved, s.starved_since, step)
        if _finite(f.critic_grad_norm) and _finite(f.clip_coef):
            s.r_clip_sum += f.clip_coef
            s.r_critic_ratio_sum += f.critic_grad_norm / max(f.grad_norm, 1e-30)
            s.r_clip_n += 1

        if _finite(f.head_ratio) or f.head_ratio == math.inf:
            out += self._trunk(role, step, f)
        if s.cleared >= cfg.cleared_steps:
            out += self._emit(role, "PPG202", step, grad_norm=f.grad_norm, steps=s.cleared)
        if s.clipped_zero >= cfg.cleared_steps:
            out += self._emit(role, "PPG004", step, grad_norm=f.grad_norm, steps=s.clipped_zero)
        if s.zero_grad >= cfg.zero_grad_steps and not self.rooted(role):
            out += self._emit(role, "PPG201", step, steps=s.zero_grad, grad_none=f.grad_none)
        # lr 0 is a finding once the role has not moved over several steps, in more than one rollout (a warm-up
        # from 0 rises within its first rollout or step), and not at the end of a schedule that decays to 0.
        rollouts = _span(s.lr_zero_from, f.segment)
        long_enough = rollouts >= 2 or (f.segment is None and s.lr_zero >= cfg.lr_zero_steps)
        if s.lr_zero >= cfg.unchanged_steps and long_enough and not s.annealed and not self.rooted(role):
            out += self._emit(role, "PPG003", step, lr=f.lr_max, steps=s.lr_zero, rollouts=rollouts)
        if s.unchanged >= cfg.unchanged_steps and not at_lr_zero and not self.rooted(role):
            out += self._emit(role, "PPG203", step, grad_norm_clipped=f.grad_norm_clipped, steps=s.unchanged,
                              lr=f.lr)
        if (s.starved >= cfg.starved_steps and step - (s.starved_since or 0) >= cfg.starved_span
                and not s.annealed and not self.rooted(role)):
            out += self._emit(role, "PPG403", step, clip_coef=f.clip_coef, update_ratio=f.update_ratio,
                              critic_ratio=f.critic_grad_norm / max(f.grad_norm, 1e-30))
        tiny_rollouts = _span(s.tiny_from, f.segment)
        if ((s.tiny_update >= cfg.tiny_update_steps or (s.tiny_update >= 3 and tiny_rollouts >= cfg.frozen_rollouts))
                and not s.annealed and not self.rooted(role)):
            if starved:
                out += self._emit(role, "PPG403", step, clip_coef=f.clip_coef, update_ratio=f.update_ratio,
                                  critic_ratio=f.critic_grad_norm / max(f.grad_norm, 1e-30))
            elif self._below_eps(f):  # the step is eps-bound: a typical lr would not help (advantage scale)
                out += self._emit(role, "PPG405", step, grad_rms=f.grad_norm / math.sqrt(f.trainable_numel),
                                  eps=f.opt_eps, update_ratio=f.update_ratio, lr=f.lr_max,
                                  adv_std=s.r_adv_std_sum / s.r_adv_spread_n if s.r_adv_spread_n else s.last_adv_std)
            elif not self._typical_adaptive_lr(f):
                out += self._emit(role, "PPG204", step, update_ratio=f.update_ratio, lr=f.lr_max,
                                  steps=s.tiny_update)
            # else: an adaptive optimizer at a typical lr whose gradient is not below eps, and still a tiny relative
            # step (huge weights, a sparse table): "raise the lr" would be a guess. PPG301 names a policy that
            # does not move.
        return out

    def _trunk(self, role: str, step: int, f: StepFacts) -> list[Finding]:
        """PPG404: the value term's gradient owns a shared trunk, rollout after rollout (each rollout judged by most
        of its measured steps; without rollout ids, each measured step counts half a rollout)."""
        cfg, s = self.config, self.state(role)
        if not s.trunk.add(f.head_ratio >= cfg.trunk_value_dominance, f.segment, cfg.trunk_rollouts):
            return []
        share = 1.0 if f.head_ratio == math.inf else f.head_ratio / (1.0 + f.head_ratio)
        return self._emit(role, "PPG404", step, value_to_policy=f.head_ratio, value_grad_share=share,
                          rollouts=s.trunk.rollouts(f.segment), threshold=cfg.trunk_value_dominance)

    def check_skipped(self, role: str, step: int) -> list[Finding]:
        """An optimizer step of ``role`` that was skipped (``on_before_optimizer_step`` ran, ``step`` did not)."""
        s = self.state(role)
        s.skipped += 1
        if s.skipped >= self.config.skipped_steps and not self.rooted(role):
            return self._emit(role, "PPG203", step, grad_norm_clipped=math.inf, steps=s.skipped,
                              skipped=s.skipped)
        return []

    def _typical_adaptive_lr(self, f: StepFacts) -> bool:
        """An optimizer with an eps (Adam-like: its step is about lr per element) at an lr in the usual range."""
        return _finite(f.opt_eps) and _finite(f.lr_max) and f.lr_max >= self.config.typical_adaptive_lr

    def check_critic_step(self, role: str, step: int, f: CriticFacts) -> list[Finding]:
        """PPG406: a trainable, bound critic whose gradient after backward is exactly 0 on most measured steps of
        several consecutive rollouts (without rollout ids: measured steps x 2). A critic at lr 0 is a freeze."""
        cfg, s = self.config, self.state(role)
        if f.binding < 1.0 or not _finite(f.grad_norm) or (_finite(f.lr_max) and f.lr_max == 0.0):
            return []
        vote = s.critic
        if not vote.add(f.grad_norm == 0.0, f.segment, cfg.critic_rollouts) or self.rooted(role):
            return []
        known = f.segment is not None
        return self._emit(role, "PPG406", step, rollouts=vote.rollouts(f.segment),
                          zero_steps=vote.hits if known else vote.streak, steps=vote.n if known else vote.streak)

    def check_entropy_sign(self, role: str, step: int, slope: float) -> list[Finding]:
        """PPG502: ``slope`` is d loss / d entropy summed over a minibatch's samples, read in the backward of the
        entropy tensor handed to ``observe``: negative for a bonus (``loss = ... - ent_coef * entropy.mean()``),
        0 without an entropy term, positive when the loss *penalises* entropy. Named after consecutive observes."""
        return self._positive(role, step, "PPG502", "entropy_penalised", slope, "slope",
                              self.config.entropy_sign_observes)

    def check_gradient_sign(self, role: str, step: int, alignment: float, own: float = math.nan) -> list[Finding]:
        """PPG107: ``alignment`` is sum_i (d loss / d new_logp_i) * advantage_i over a minibatch, read in the backward
        of new_logp: negative when minimising the loss raises the log-prob of better-than-average actions (every
        PPO, PG and A2C loss), positive when the policy term is upside down. ``own`` is that gradient's cosine with
        -advantages: an upside-down policy term gives about minus a healthy one's (-0.6..-1), while another term
        of the loss that outweighs it (a KL penalty to a reference model) leaves it near 0 whatever its sign; only a
        clear reversal counts. Named after consecutive observes."""
        if _finite(own) and alignment > 0 and own > -self.config.backwards_cos:
            alignment = 0.0  # a positive dot product, but no reversed policy term: breaks the streak
        return self._positive(role, step, "PPG107", "backwards", alignment, "alignment",
                              self.config.gradient_sign_observes)

    def check_broadcast(self, role: str, step: int, pair: tuple[Any, ...], *, own: float, shared: float,
                        spread: float = math.nan) -> list[Finding]:
        """PPG104 from the gradient, never from shapes alone. ``pair`` is two inputs of observe whose shapes would
        broadcast ((B,) and (B, 1)); the backward tells whether the loss did. A per-sample loss gives each sample's
        gradient from its own term (``own``: the cosine of d loss / d new_logp with -advantages, or of d loss /
        d values with values - returns, near 1); a loss broadcast to (B, B) gives each the *mean* of the other's
        (``shared``: the cosine with a constant, or with values - mean(returns), near 1). Named when the gradient
        follows the shared model better than the own one on consecutive measured observes; for values only where it
        fits it exactly (a saturated Huber loss's sign-only gradient, ``spread`` 0, fits both approximately). A
        gradient the wrong way round (``own`` near -1, PPG107's case) is per-sample too."""
        cfg, s = self.config, self.state(role)
        if not (_finite(own) and _finite(shared)):
            return []
        own = abs(own)  # a term upside down (PPG107) still follows its own samples: the sign is not this rule's
        if pair[0] == "values":
            hit = shared >= 1.0 - cfg.broadcast_fit and own < shared and _finite(spread) and spread > cfg.broadcast_fit
        else:
            hit = shared > own
        s.broadcast_reads = s.broadcast_reads + 1 if hit else 0
        if s.broadcast_reads < cfg.broadcast_observes:
            return []
        name, shape, other, other_shape, broadcast = pair
        return self._emit(role, "PPG104", step, name=name, shape=tuple(shape), other=other,
                          other_shape=tuple(other_shape), broadcast=tuple(broadcast), own=own, shared=shared,
                          observes=s.broadcast_reads)

    def _positive(self, role: str, step: int, code: str, counter: str, value: float, name: str,
                  needed: int) -> list[Finding]:
        """A sign read in the backward, positive on ``needed`` consecutive reads (NaN: the backward never reached the
        tensor, so no evidence either way); ``counter`` is the streak's field of :class:`RoleState`."""
        s = self.state(role)
        if not _finite(value):
            return []
        streak = getattr(s, counter) + 1 if value > 0 else 0
        setattr(s, counter, streak)
        if streak < needed:
            return []
        return self._emit(role, code, step, **{name: value, "observes": streak})

    def _below_eps(self, f: StepFacts) -> bool:
        """The role's gradient before any clip is far below its optimizer's eps (Adam-like): its step is eps-bound
        and shrinks with the gradient, whatever the lr."""
        return (_finite(f.opt_eps) and f.trainable_numel > 0 and _finite(f.grad_norm)
                and f.grad_norm / math.sqrt(f.trainable_numel) < self.config.below_eps * f.opt_eps)

    def _starved(self, f: StepFacts) -> bool:
        """The critic ate a shared clip *and* that starved the actor's step. With Adam-like optimizers a small
        clip coefficient alone does not (they rescale the step): only a clipped gradient far below the
        optimizer's eps does, since eps then dominates the step's denominator. Without an eps (SGD) the clip
        scales the step itself, which must then be tiny."""
        cfg = self.config
        if not (_finite(f.critic_grad_norm) and _finite(f.clip_coef) and f.clip_coef < cfg.starved_clip_coef
                and f.critic_grad_norm > cfg.critic_dominance * f.grad_norm):
            return False
        if _finite(f.opt_eps) and f.trainable_numel > 0:
            # the clip starved it only if the actor's own gradient, before the clip, was not below eps already
            return (f.grad_norm_clipped / math.sqrt(f.trainable_numel) < cfg.below_eps * f.opt_eps
                    and not self._below_eps(f))
        return 0.0 <= f.update_ratio < 10 * cfg.tiny_update_ratio

    # ------------------------------------------------------------------ observes and rollouts
    def check_observe(self, role: str, step: int, f: ObserveFacts) -> list[Finding]:
        cfg, s = self.config, self.state(role)
        out: list[Finding] = []
        if (f.first_in_rollout and s.r_observes) or (f.rollout is None and s.r_observes >= cfg.window_observes):
            out += self.end_rollout(role, step, f.prev_updates, f.prev_observes)
        if f.boundary_only:
            return out
        if not (_finite(f.approx_kl) and _finite(f.ratio_dev)):
            return out + self._emit(role, "PPG902", step, approx_kl=f.approx_kl)
        # Recomputing the log-probs in a lower precision (bf16 autocast) moves the first ratio by rounding alone.
        tolerance = max(cfg.first_ratio_dev, cfg.first_ratio_eps * f.precision_eps)
        if f.first_in_rollout and f.inferred:
            s.r_first_dev, s.r_first_tol = f.ratio_dev, tolerance  # judged when the batch ends (see end_rollout)
        elif f.first_in_rollout:
            # on consecutive rollouts whose first ratio was read: one sample's spike in one rollout (a squashed
            # Gaussian's saturated action, recomputed through atanh) is no mismatch of the rollout and the update
            s.first_bad_rollouts = s.first_bad_rollouts + 1 if f.ratio_dev > tolerance else 0
            if s.first_bad_rollouts >= cfg.first_ratio_rollouts:
                out += self._emit(role, "PPG105", step, where=f"rollout {f.rollout}", ratio_dev=f.ratio_dev,
                                  tolerance=tolerance, rollout=f.rollout, rollouts=s.first_bad_rollouts,
                                  **self._suspects(role))
        s.r_observes += 1
        s.r_known = s.r_known or f.rollout is not None or f.inferred
        if _finite(f.logp_mean):
            s.r_logp_max = max(s.r_logp_max, f.logp_mean)
        if not f.first_in_rollout:
            s.r_kl_sum += f.approx_kl
            s.r_kl_n += 1
            s.r_kl_max = max(s.r_kl_max, f.approx_kl)
            if _finite(f.clip_fraction):
                s.r_clip_frac_sum += f.clip_fraction
                s.r_clip_frac_n += 1
        s.r_ratio_dev = max(s.r_ratio_dev, f.ratio_dev)
        if f.adv_given and not (_finite(f.adv_std) and _finite(f.adv_mean)):  # a NaN: numerics, one is enough
            out += self._emit(role, "PPG401", step, adv_std=f.adv_std, adv_mean=f.adv_mean, samples=f.samples,
                              where="")
        elif _finite(f.adv_std) and f.samples > 1:  # one sample has no spread (a remainder minibatch of one)
            # no spread in one minibatch is judged per rollout (GRPO: a minibatch of solved groups is all 0)
            if f.adv_std < cfg.degenerate_adv_std * (1.0 + abs(f.adv_mean)):
                s.r_adv_flat_n += 1
                s.r_flat_std, s.r_flat_mean, s.r_flat_samples = f.adv_std, f.adv_mean, f.samples
            else:  # PPG402 reads the spread the policy term is taught with, where there is some
                s.adv_spread_seen = True
                s.r_adv_std_sum += self._live_adv_std(f)
                s.r_adv_mean_sum += abs(f.adv_mean) if _finite(f.adv_mean) else 0.0
                s.r_adv_spread_n += 1
        out += self._groups(role, step, f)
        s.r_ent_norm, s.r_ent_drift = f.entropy_norm, f.entropy_drift
        if _finite(f.log_std) or f.log_std == -math.inf:
            s.r_log_std = f.log_std
        s.r_last_kl, s.r_target_kl = f.approx_kl, f.target_kl
        if _finite(f.ref_kl):
            s.last_ref_kl = f.ref_kl
        return out

    def _live_adv_std(self, f: ObserveFacts) -> float:
        """The advantages' std over those not exactly 0 (GRPO's groups with one reward have 0): the spread the
        policy term is taught with. The whole minibatch's when none is 0."""
        z = f.adv_zero_frac
        if not (_finite(z) and 0.0 < z < 1.0 and _finite(f.adv_mean)):
            return f.adv_std
        second = (f.adv_std ** 2 + f.adv_mean ** 2) / (1.0 - z)  # E[a^2 | a != 0]
        mean = f.adv_mean / (1.0 - z)
        return math.sqrt(max(second - mean ** 2, 0.0))

    def _groups(self, role: str, step: int, f: ObserveFacts) -> list[Finding]:
        """Per-sequence evidence (LM RL): PPG109 on advantages that fall as the rewards rise; the groups without
        reward spread that are not solved, for PPG407 at the rollout's end."""
        cfg, s = self.config, self.state(role)
        if _finite(f.reward_max):
            s.reward_best = max(s.reward_best, f.reward_max)
        if _finite(f.reward_min):
            s.reward_worst = min(s.reward_worst, f.reward_min)
        if _finite(f.zero_adv_groups):
            # a group at the best reward seen is solved (the task is learnt), not wasted; while no reward has ever
            # differed from another, every group is wasted
            top = f.zero_adv_groups_top if _finite(f.zero_adv_groups_top) else 0.0
            solved = top if s.reward_best > s.reward_worst and f.reward_max >= s.reward_best else 0.0
            groups = f.groups if _finite(f.groups) else 1.0
            s.r_zero_groups_sum += max(f.zero_adv_groups - solved, 0.0) * groups
            s.r_groups_sum += groups
            if _finite(f.zero_group_reward):
                s.r_zero_reward = f.zero_group_reward
        if not _finite(f.adv_reward_corr):
            return []
        s.against = s.against + 1 if f.adv_reward_corr < -cfg.adv_against_corr else 0
        if s.against < cfg.adv_against_observes:
            return []
        return self._emit(role, "PPG109", step, corr=f.adv_reward_corr, observes=s.against)

    def check_kl_pin(self, role: str, step: int, *, kl_align: float, own: float) -> tuple[list[Finding], bool]:
        """PPG304, from the backward's gradient on new_logp: more aligned with the KL penalty's pull towards the
        reference than with the advantages. Returns whether this read is the penalty's (then its sign says nothing
        of the policy term's: PPG107 is not judged on it)."""
        cfg, s = self.config, self.state(role)
        if not (_finite(kl_align) and _finite(own)):
            return [], False
        pinned = kl_align > max(cfg.kl_pin_align, abs(own))
        s.kl_pinned = s.kl_pinned + 1 if pinned else 0
        if s.kl_pinned < cfg.kl_pin_observes or self.rooted(role):
            return [], pinned
        return self._emit(role, "PPG304", step, kl_align=kl_align, own=own, observes=s.kl_pinned,
                          ref_kl=s.last_ref_kl), pinned

    def end_rollout(self, role: str, step: int, updates: int | None = None,
                    observes: int | None = None) -> list[Finding]:
        """Rollout-level rules; ``updates`` is the number of actor optimizer steps in the rollout and ``observes``
        the number of ``observe`` calls (None when not known)."""
        cfg, s = self.config, self.state(role)
        out: list[Finding] = []
        if updates is not None:
            s.min_updates = updates if s.min_updates is None else min(s.min_updates, updates)
            s.max_updates = max(s.max_updates, updates)
        out += self._first_ratio_inferred(role, step, updates)
        out += self._early_stop(role, step, updates, observes)
        out += self._zero_groups(role, step)
        if s.r_kl_n == 0:
            # No measured minibatch after the first (sparse cadence): this rollout is no evidence either way.
            s.reset_rollout()
            return out
        kl = s.r_kl_sum / s.r_kl_n if s.r_kl_n else math.nan
        upd = s.r_upd_sum / s.r_upd_n if s.r_upd_n else math.nan
        adv_std = s.r_adv_std_sum / s.r_adv_spread_n if s.r_adv_spread_n else math.nan
        if _finite(adv_std):
            s.last_adv_std = adv_std

        out += self._unstable(role, step) + self._std_collapse(role, step) + self._flat_advantages(role, step)
        exact = self._exact_ratio(role, step, upd, updates)
        out += exact
        frozen = _finite(kl) and kl < cfg.frozen_kl and s.r_ratio_dev < cfg.frozen_ratio_dev
        if frozen and not s.r_known and s.r_ratio_dev <= cfg.exact_ratio_dev:
            # a window of observes (no rollout boundary known) whose every ratio is exactly 1: one update per rollout
            # (no minibatch comes after a step of its rollout) or old log-probs from the current policy (PPG108,
            # which needs rollout boundaries). Neither is a policy that does not move: no evidence either way.
            frozen = False
        s.frozen_rollouts = s.frozen_rollouts + 1 if frozen else 0
        # PPG402: tiny advantages that are not normalised (normalised ones have std 1 per minibatch).
        tiny = _finite(adv_std) and adv_std < cfg.tiny_adv_std and abs(adv_std - 1.0) > 0.05
        s.tiny_adv_rollouts = s.tiny_adv_rollouts + 1 if tiny else 0
        # PPG403: on most measured steps of the rollout the shared clip starved the actor's step (see _starved:
        # the evidence is the step itself, not the KL, which the sparse cadence reads at a rollout's last minibatch)
        starved = s.r_steps > 0 and s.r_starved_n >= 0.5 * s.r_steps
        s.starved_rollouts = s.starved_rollouts + 1 if starved else 0
        clip = s.r_clip_sum / s.r_clip_n if s.r_clip_n else math.nan
        critic_ratio = s.r_critic_ratio_sum / s.r_clip_n if s.r_clip_n else math.nan
        if s.annealed:  # the schedule is ending: a policy that stops moving is what it was built to do
            s.starved_rollouts = s.frozen_rollouts = s.tiny_adv_rollouts = 0
        if not self.rooted(role):
            if s.starved_rollouts >= cfg.weak_rollouts:
                out += self._emit(role, "PPG403", step, clip_coef=clip, critic_ratio=critic_ratio,
                                  update_ratio=upd, starved_steps=s.r_starved_n, steps=s.r_steps)
            elif s.tiny_adv_rollouts >= cfg.weak_rollouts:
                out += self._emit(role, "PPG402", step, adv_std=adv_std, approx_kl=kl,
                                  rollouts=s.tiny_adv_rollouts)
        if s.frozen_rollouts >= cfg.frozen_rollouts and not self.rooted(role) and not s.exact_rollouts:
            moving = _finite(upd) and upd >= cfg.tiny_update_ratio
            if (_finite(s.r_ent_norm) and s.r_ent_norm > cfg.entropy_at_max
                    and abs(s.r_ent_drift) < cfg.entropy_frozen_drift):
                out += self._emit(role, "PPG501", step, entropy_norm=s.r_ent_norm, entropy_drift=s.r_ent_drift,
                                  rollouts=s.frozen_rollouts)
            elif _finite(s.r_ent_norm) and s.r_ent_norm < cfg.entropy_collapsed:
                # deterministic: the log-prob's gradient (onehot - p) vanishes, whatever the step size
                out += self._emit(role, "PPG503", step, entropy_norm=s.r_ent_norm, entropy_drift=s.r_ent_drift,
                                  rollouts=s.frozen_rollouts)
            elif moving:
                out += self._emit(role, "PPG301", step, rollouts=s.frozen_rollouts, approx_kl=kl,
                                  ratio_dev=s.r_ratio_dev, update_ratio=upd)
        s.reset_rollout()
        return out

    def _flat_advantages(self, role: str, step: int) -> list[Finding]:
        """PPG401 without NaN: every measured minibatch of the rollout had advantages without spread, on consecutive
        rollouts, and no minibatch of the role ever had spread (a broken advantage computation shows from the start;
        GRPO's solved groups, or a task learnt late in the fit, give zeros after a spread)."""
        cfg, s = self.config, self.state(role)
        flat = s.r_adv_flat_n > 0 and s.r_adv_spread_n == 0
        s.flat_adv_rollouts = s.flat_adv_rollouts + 1 if flat else 0
        if s.flat_adv_rollouts < cfg.degenerate_rollouts or s.adv_spread_seen or self.rooted(role):
            return []
        return self._emit(role, "PPG401", step, adv_std=s.r_flat_std, adv_mean=s.r_flat_mean,
                          samples=s.r_flat_samples,
                          where=f", on every measured minibatch of {s.flat_adv_rollouts} consecutive rollouts")

    def _zero_groups(self, role: str, step: int) -> list[Finding]:
        """PPG407: most groups of the rollout got one reward for every sample, not the best one (see _groups)."""
        cfg, s = self.config, self.state(role)
        if s.r_groups_sum == 0:
            return []
        if s.r_zero_groups_sum >= cfg.zero_groups_share * s.r_groups_sum:
            s.zero_group_rollouts += 1
            s.zero_group_wasted += s.r_zero_groups_sum
            s.zero_group_seen += s.r_groups_sum
        else:
            s.zero_group_rollouts, s.zero_group_wasted, s.zero_group_seen = 0, 0.0, 0.0
        # over enough groups: the sparse cadence reads one minibatch of a rollout, a few groups, a noisy share
        if (s.zero_group_rollouts < cfg.zero_groups_rollouts or s.zero_group_seen < cfg.zero_groups_min
                or self.rooted(role)):
            return []
        return self._emit(role, "PPG407", step, share=s.zero_group_wasted / s.zero_group_seen, reward=s.r_zero_reward,
                          rollouts=s.zero_group_rollouts)

    def _exact_ratio(self, role: str, step: int, upd: float, updates: int | None) -> list[Finding]:
        """PPG108: the ratio stayed exactly 1 (to float32 rounding) on every measured minibatch of a rollout, later
        ones included, while the actor's parameters moved at a healthy rate: old_logp follows the current policy.
        Only where the rollout's start is known (a window of observes may be one minibatch per rollout, whose
        ratio is 1 by right) and a minibatch after the first was measured."""
        cfg, s = self.config, self.state(role)
        # a deterministic policy (log-probs of 0, entropy collapsed) has a ratio of 1 by saturation: PPG503's case
        saturated = s.r_logp_max >= -cfg.exact_ratio_dev or (
            _finite(s.r_ent_norm) and s.r_ent_norm < cfg.entropy_collapsed)
        exact = (s.r_known and s.r_kl_n > 0 and s.r_ratio_dev <= cfg.exact_ratio_dev and s.r_upd_n > 0
                 and _finite(upd) and upd >= cfg.exact_ratio_update_ratio and not saturated)
        s.exact_rollouts = s.exact_rollouts + 1 if exact else 0
        if s.exact_rollouts < cfg.exact_ratio_rollouts or self.rooted(role):
            return []
        return self._emit(role, "PPG108", step, rollouts=s.exact_rollouts, ratio_dev=s.r_ratio_dev,
                          update_ratio=upd, updates=updates if updates is not None else s.r_upd_n)

    def _unstable(self, role: str, step: int) -> list[Finding]:
        """PPG303: the policy moves too far per rollout, on most recent rollouts (judged on the largest KL of a later
        minibatch: the end of the update phase, which every cadence measures; one spike passes)."""
        cfg, s = self.config, self.state(role)
        s.unstable_recent = [*s.unstable_recent, s.r_kl_max > cfg.unstable_kl][-cfg.unstable_window:]
        if not (s.unstable_recent[-1] and sum(s.unstable_recent) >= cfg.unstable_rollouts) or self.rooted(role):
            return []  # a root cause (a backwards policy term...) explains the jumps
        clip_frac = s.r_clip_frac_sum / s.r_clip_frac_n if s.r_clip_frac_n else math.nan
        return self._emit(role, "PPG303", step, approx_kl=s.r_kl_max, clip_fraction=clip_frac,
                          ratio_dev=s.r_ratio_dev, rollouts=sum(s.unstable_recent), window=len(s.unstable_recent))

    def _std_collapse(self, role: str, step: int) -> list[Finding]:
        """PPG504: a Gaussian policy's std fell ``std_collapse`` times below its start, on consecutive rollouts."""
        cfg, s = self.config, self.state(role)
        now = s.r_log_std
        if math.isnan(now):
            return []
        if math.isnan(s.log_std0):
            s.log_std0 = now
            return []
        collapsed = now < s.log_std0 - math.log(cfg.std_collapse)
        s.collapse_rollouts = s.collapse_rollouts + 1 if collapsed else 0
        if s.collapse_rollouts < cfg.std_collapse_rollouts or s.annealed:
            return []
        return self._emit(role, "PPG504", step, std_ratio=math.exp(now - s.log_std0), log_std=now,
                          log_std0=s.log_std0, rollouts=s.collapse_rollouts)

    def _first_ratio_inferred(self, role: str, step: int, updates: int | None) -> list[Finding]:
        """PPG105 when rollouts are inferred from manual-optimization batches (observe without ``rollout=``). A batch
        of one optimizer step is no rollout; and once any batch started with a ratio of 1, a batch is not always a
        rollout (a loop with one epoch per batch), so a deviating batch start proves nothing: cannot tell."""
        cfg, s = self.config, self.state(role)
        dev = s.r_first_dev
        if not _finite(dev) or updates is None or updates < 2:
            return []
        if dev <= s.r_first_tol:
            s.first_ok, s.first_bad = True, 0
            return []
        s.first_bad += 1
        if s.first_ok or s.first_bad < cfg.first_ratio_batches:
            return []
        return self._emit(role, "PPG105", step, where=f"{s.first_bad} training batches in a row (each taken as a "
                          "rollout: observe got no rollout id)", ratio_dev=dev, tolerance=s.r_first_tol, rollout=None,
                          **self._suspects(role))

    def _suspects(self, role: str) -> dict[str, str]:
        layers = self.state(role).train_mode_layers
        return {"train_mode_layers": layers} if layers else {}

    def _early_stop(self, role: str, step: int, updates: int | None, observes: int | None) -> list[Finding]:
        """PPG302: the update phase stopped at its first check, rollout after rollout.

        With ``target_kl`` given: the phase ended with approx_kl above it after as few updates as any rollout had
        (SB3 checks each minibatch, CleanRL each epoch), and either no rollout ever ran longer (so this is the
        first check), one update was all, or the KL overshot the target tenfold. A tight but sane target_kl stops
        some rollouts part-way and lets others finish. Without it: one update per rollout and a second minibatch
        observed but never stepped (its loss was computed, then the loop broke), every rollout. A per-epoch check
        that stops after the first epoch leaves nothing to tell it from a shorter schedule: it needs target_kl."""
        cfg, s = self.config, self.state(role)
        if updates is None:
            return []
        if s.r_target_kl is not None:
            if s.r_kl_n == 0:
                return []  # the rollout's KL was not measured: no evidence either way
            over = _finite(s.r_last_kl) and s.r_last_kl > s.r_target_kl
            stopped = over and updates <= (s.min_updates or 0) and (
                s.max_updates == s.min_updates or updates <= 1 or s.r_last_kl > 10 * s.r_target_kl)
        else:
            stopped = updates == 1 and observes == 2
        s.early_stop_rollouts = s.early_stop_rollouts + 1 if stopped else 0
        if s.early_stop_rollouts < cfg.early_stop_rollouts:
            return []
        return self._emit(role, "PPG302", step, updates=updates, rollouts=s.early_stop_rollouts,
                          approx_kl=s.r_last_kl, target_kl=s.r_target_kl, observes=observes)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"states": {role: dataclasses.asdict(s) for role, s in self.states.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.states = {role: from_fields(RoleState, values) for role, values in state.get("states", {}).items()}
