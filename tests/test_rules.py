"""The rule engine on evidence streams, without Lightning: each cause gives its code, healthy gives none."""

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_ppo_guard import GuardConfig
from lightning_ppo_guard.rules import Diagnoser, ObserveFacts, StepFacts, WiringFacts


def step(**kw):
    base = dict(grad_norm=0.2, grad_norm_clipped=0.2, clip_coef=1.0, nonzero_frac=1.0, grad_none=0,
                trainable_tensors=6, nonfinite=0.0, update_norm=0.01, update_ratio=2e-3, binding=1.0, lr=3e-4,
                lr_max=3e-4)
    base.update(kw)
    return StepFacts(**base)


def obs(first=False, rollout=0, **kw):
    base = dict(approx_kl=3e-4, ratio_dev=0.1, adv_mean=0.0, adv_std=1.0, entropy_norm=0.95, entropy_drift=-0.01)
    base.update(kw)
    return ObserveFacts(first_in_rollout=first, rollout=rollout, **base)


def run(diag, rollouts, updates=16, step_kw=None, obs_kw=None, target_kl=None):
    """Feed ``rollouts`` rollouts of ``updates`` minibatch updates; return all findings. ``step_kw`` may be a
    function of (rollout, update), like ``obs_kw``."""
    out, n = [], 0
    for r in range(rollouts):
        for u in range(updates):
            first = u == 0
            kw = dict(obs_kw(r, u) if callable(obs_kw) else (obs_kw or {}))
            if first:
                kw.update(approx_kl=0.0, ratio_dev=0.0)
            o = obs(first=first, rollout=r, **kw)
            o.target_kl = target_kl
            o.prev_updates = updates if first and r else None
            out += diag.check_observe("actor", n, o)
            skw = step_kw(r, u) if callable(step_kw) else (step_kw or {})
            out += diag.check_step("actor", n, step(segment=r, **skw))
            n += 1
    return out


def codes(findings):
    return sorted({f.code for f in findings})


def test_healthy_stream_raises_nothing_even_with_small_kl_and_zero_clip_fraction():
    rng = random.Random(0)
    findings = run(Diagnoser(), 200, obs_kw=lambda r, u: dict(
        approx_kl=10 ** rng.uniform(-4.2, -2), ratio_dev=rng.uniform(0.02, 0.4),
        entropy_norm=1.0 - r / 400, entropy_drift=-r / 400))
    assert findings == []


def test_setup_rules():
    d = Diagnoser()
    assert codes(d.check_setup("actor", "actor", 0, binding=0.0, lr=math.nan, trainable=6, frozen=0,
                               stale_tensors=0)) == ["PPG001"]
    assert codes(d.check_setup("a2", "actor", 0, binding=0.0, lr=math.nan, trainable=6, frozen=0,
                               stale_tensors=6)) == ["PPG002"]
    # an lr of 0 at set-up is no finding by itself (a warm-up starts there): see test_lr_zero_waits_for_evidence
    assert d.check_setup("a3", "actor", 0, binding=1.0, lr=0.0, trainable=6, frozen=0, stale_tensors=0) == []
    assert codes(d.check_setup("a4", "actor", 0, binding=1.0, lr=0.0, trainable=0, frozen=6,
                               stale_tensors=0)) == ["PPG005"]
    # a critic or shared trunk left out of the optimizer never learns either: the same code under its role
    assert codes(d.check_setup("critic", "critic", 0, binding=0.0, lr=1e-3, trainable=6, frozen=0,
                               stale_tensors=0)) == ["PPG001"]
    assert codes(d.check_setup("shared", "shared", 0, binding=0.5, lr=1e-3, trainable=6, frozen=0,
                               stale_tensors=0)) == ["PPG001"]
    # frozen: an actor cannot learn (error); a trunk, a critic or a named part may be frozen on purpose (warning)
    f = d.check_setup("s2", "shared", 0, binding=1.0, lr=1e-3, trainable=0, frozen=4, stale_tensors=0)
    assert codes(f) == ["PPG006"] and f[0].severity == "warning"
    f = d.check_setup("a5", "actor", 0, binding=1.0, lr=1e-3, trainable=4, frozen=1, stale_tensors=0,
                      frozen_parts=("agent.actor_logstd",))
    assert codes(f) == ["PPG006"] and f[0].evidence["part"] == "agent.actor_logstd"
    # once per code and role
    assert d.check_setup("actor", "actor", 5, binding=0.0, lr=math.nan, trainable=6, frozen=0, stale_tensors=0) == []


def test_wiring_rules():
    d = Diagnoser()
    f = d.check_wiring("actor", 0, WiringFacts(logp_requires_grad=False, old_requires_grad=False))
    assert codes(f) == ["PPG101"] and f[0].evidence
    f = d.check_wiring("b", 0, WiringFacts(logp_requires_grad=True, old_requires_grad=True,
                                           by_hand="LogBackward0 <- GatherBackward0 <- SoftmaxBackward0"))
    assert codes(f) == ["PPG103", "PPG106"]


def test_a_broadcast_is_named_from_the_gradient_never_from_shapes_alone():
    """PPG104 needs the backward to show that each sample's gradient follows the other term's mean (a loss broadcast
    to (B, B)), on consecutive observes: shapes that could broadcast, with a per-sample gradient (TorchRL's (B, 1)
    advantages and an unsqueezed log-ratio), are no finding."""
    pair = ("advantages", (8, 1), "new_logp", (8,), (8, 8))
    d = Diagnoser()
    assert all(d.check_broadcast("actor", n, pair, own=0.97, shared=0.05) == [] for n in range(20))
    # unnormalised advantages (mean >> std): a constant fits a per-sample gradient well, its own advantages better
    assert all(d.check_broadcast("actor", n, pair, own=1.0, shared=0.95) == [] for n in range(20))
    # a policy term upside down (PPG107) still follows each sample's own advantage
    assert all(d.check_broadcast("actor", n, pair, own=-0.97, shared=0.05) == [] for n in range(20))
    assert d.check_broadcast("actor", 20, pair, own=0.02, shared=0.999) == []  # one observe is not enough
    f = d.check_broadcast("actor", 21, pair, own=0.01, shared=0.998)
    assert codes(f) == ["PPG104"] and "advantages has shape (8, 1) but new_logp has shape (8,)" in f[0].message
    assert "{" not in f[0].message
    # values against returns: only an exact fit to values - mean(returns) (a broadcast MSE), never a saturated Huber
    pair = ("values", (8, 1), "returns", (8,), (8, 8))
    d = Diagnoser()
    assert all(d.check_broadcast("critic", n, pair, own=0.9, shared=0.99999, spread=0.0) == [] for n in range(9))
    assert all(d.check_broadcast("critic", n, pair, own=0.9, shared=0.99998, spread=0.4) == [] for n in range(9))
    assert all(d.check_broadcast("critic", n, pair, own=1.0, shared=0.6, spread=0.4) == [] for n in range(9))
    assert codes(d.check_broadcast("critic", 9, pair, own=0.3, shared=1.0, spread=0.4)
                 + d.check_broadcast("critic", 10, pair, own=0.3, shared=1.0, spread=0.4)) == ["PPG104"]


def test_unreached_tensors_are_missing_only_when_they_get_no_gradient_either():
    d = Diagnoser()
    # an auxiliary head or a checkpointed block: not in new_logp's graph, but trained by its own term
    assert d.check_unreached("actor", 0, missing=0, unreached=2, trainable=6) == []
    f = d.check_unreached("actor", 0, missing=2, unreached=2, trainable=6)
    assert codes(f) == ["PPG102"] and f[0].evidence["reached"] == 4
    # a log-prob without grad already explains it
    d.check_wiring("c", 0, WiringFacts(logp_requires_grad=False, old_requires_grad=False))
    assert d.check_unreached("c", 1, missing=6, unreached=6, trainable=6) == []


def test_lr_zero_waits_for_evidence():
    """lr 0 is named once the role has not moved over several steps spanning two rollouts; a warm-up from 0 for
    one rollout, one layer at lr 0 (the role moves) and a schedule that ends at 0 are not."""
    frozen = dict(update_norm=0.0, update_ratio=0.0, lr=0.0, lr_max=0.0)
    found = run(Diagnoser(), 3, step_kw=frozen)
    assert codes(found) == ["PPG003"] and found[0].step == 16 and found[0].evidence["rollouts"] == 2
    warmup = run(Diagnoser(), 4, step_kw=lambda r, u: frozen if r == 0 else {})
    assert warmup == []
    assert run(Diagnoser(), 4, step_kw=dict(lr=0.0)) == []  # one group at 0, the role moves
    # a schedule that reaches 0 in the last tenth of the fit, after a positive peak
    ending = run(Diagnoser(), 10, step_kw=lambda r, u: dict(frozen, fraction=0.95) if r >= 8 else dict(
        fraction=r / 10))
    assert ending == []
    # the same zero lr halfway through training is named
    assert codes(run(Diagnoser(), 10, step_kw=lambda r, u: dict(frozen, fraction=0.5) if r >= 4 else dict(
        fraction=r / 10))) == ["PPG003"]
    # without rollouts, 16 measured steps at lr 0 without a move
    d, out = Diagnoser(), []
    for n in range(16):
        out += d.check_step("actor", n, step(segment=None, **frozen))
    assert codes(out) == ["PPG003"] and out[0].step == 15


def test_positive_lr_with_no_change_is_params_unchanged_with_the_lr_of_that_step():
    found = run(Diagnoser(), 1, step_kw=dict(update_norm=0.0, update_ratio=0.0, lr=2e-4, lr_max=2e-4))
    assert codes(found) == ["PPG203"] and found[0].evidence["lr"] == 2e-4


def test_tiny_updates_are_named_over_rollouts_when_few_steps_are_measured():
    """One measured step per rollout (the sparse cadence): three rollouts of tiny updates name PPG204."""
    d, out = Diagnoser(), []
    for r in range(5):
        out += d.check_step("actor", r * 16 + 15, step(update_ratio=1e-9, lr=1e-9, lr_max=1e-9, segment=r))
    assert codes(out) == ["PPG204"] and out[0].step == 2 * 16 + 15


def test_step_rules():
    assert codes(run(Diagnoser(), 1, step_kw=dict(grad_norm=0.0, grad_norm_clipped=0.0, update_norm=0.0,
                                                 update_ratio=0.0))) == ["PPG201"]
    assert codes(run(Diagnoser(), 1, step_kw=dict(grad_none=6, grad_norm_clipped=0.0, update_norm=0.0,
                                                 update_ratio=0.0))) == ["PPG202"]
    assert codes(run(Diagnoser(), 1, step_kw=dict(grad_norm_clipped=0.0, clip_coef=0.0, update_norm=0.0,
                                                 update_ratio=0.0))) == ["PPG004"]
    assert codes(run(Diagnoser(), 1, step_kw=dict(update_norm=0.0, update_ratio=0.0))) == ["PPG203"]
    assert codes(run(Diagnoser(), 2, step_kw=dict(update_norm=0.0, update_ratio=0.0, lr_max=0.0))) == ["PPG003"]
    # a shared trunk at lr 0 is a freeze (its head still learns): no finding, as for a frozen trunk's PPG006 warning
    assert run(Diagnoser(), 2, step_kw=dict(update_norm=0.0, update_ratio=0.0, lr_max=0.0, policy=False)) == []
    assert codes(run(Diagnoser(), 1, step_kw=dict(update_ratio=1e-8))) == ["PPG204"]
    assert codes(run(Diagnoser(), 1, step_kw=dict(nonfinite=1.0, grad_norm=float("nan")))) == ["PPG901"]
    # the same tiny update with a critic that eats a shared clip is attributed to the clip
    assert codes(run(Diagnoser(), 1, step_kw=dict(update_ratio=1e-8, clip_coef=1e-4,
                                                 critic_grad_norm=500.0))) == ["PPG403"]


def test_rollout_rules():
    frozen = dict(approx_kl=1e-12, ratio_dev=1e-6)
    assert codes(run(Diagnoser(), 5, obs_kw=frozen)) == ["PPG301"]
    assert codes(run(Diagnoser(), 5, obs_kw=dict(frozen, entropy_norm=0.99999, entropy_drift=1e-9))) == ["PPG501"]
    assert codes(run(Diagnoser(), 5, obs_kw=dict(adv_std=3e-2))) == ["PPG402"]
    assert run(Diagnoser(), 5, obs_kw=dict(adv_std=0.998)) == []  # normalised per minibatch (biased std)
    assert run(Diagnoser(), 5, obs_kw=dict(adv_std=4.0)) == []  # healthy unnormalised
    # the critic eats a shared clip and the clipped actor gradient falls far below Adam's eps: the actor stalls
    starved = dict(clip_coef=1e-5, critic_grad_norm=1e4, grad_norm_clipped=2e-6, opt_eps=1e-5, trainable_numel=4000)
    assert codes(run(Diagnoser(), 5, obs_kw=dict(approx_kl=1e-6), step_kw=starved)) == ["PPG403"]
    # healthy CleanRL CartPole: clip 0.02 with a critic 100x the actor, but an RMS gradient above eps: Adam's step
    # is unharmed, so a weak-KL rollout there is no clip starvation (a small lr is not either)
    eaten = dict(clip_coef=0.02, critic_grad_norm=20.0, grad_norm=0.15, grad_norm_clipped=3e-3, opt_eps=1e-5,
                 trainable_numel=4000, update_ratio=5e-5)
    assert run(Diagnoser(), 5, obs_kw=dict(approx_kl=1e-6), step_kw=eaten) == []
    assert codes(run(Diagnoser(), 5, obs_kw=dict(approx_kl=1e-9, ratio_dev=1e-6),
                     step_kw=dict(eaten, update_ratio=1e-9, lr=1e-9, lr_max=1e-9))) == ["PPG204"]
    # advantages x1e-6: the actor's own gradient, before any clip, is far below Adam's eps, at a typical lr. The
    # step is eps-bound: neither "raise the lr" (PPG204) nor "the critic eats the clip" (PPG403, although the
    # critic's gradient is 1e7x the actor's and the clip scales it), but PPG405 with the advantage scale
    eps_bound = dict(clip_coef=0.04, critic_grad_norm=12.0, grad_norm=2e-6, grad_norm_clipped=8e-8, opt_eps=1e-5,
                     trainable_numel=4000, update_ratio=3e-7, lr=2.5e-4, lr_max=2.5e-4)
    found = run(Diagnoser(), 5, obs_kw=dict(approx_kl=1e-7, ratio_dev=1e-4, adv_std=4e-6), step_kw=eps_bound)
    assert codes(found) == ["PPG402", "PPG405"], codes(found)
    ppg405 = next(f for f in found if f.code == "PPG405")
    assert ppg405.evidence["grad_rms"] < 1e-6 and ppg405.evidence["adv_std"] == pytest.approx(4e-6)
    # target_kl: each rollout's first minibatch steps, the second is observed with KL > target_kl and stops
    d, found = Diagnoser(), []
    for r in range(4):
        first = obs(first=True, rollout=r, approx_kl=0.0, ratio_dev=0.0)
        first.target_kl, first.prev_updates = 1e-6, (1 if r else None)
        found += d.check_observe("actor", 2 * r, first)
        found += d.check_step("actor", 2 * r, step())
        stop = obs(rollout=r, approx_kl=5e-6)
        stop.target_kl = 1e-6
        found += d.check_observe("actor", 2 * r + 1, stop)
    assert codes(found) == ["PPG302"] and found[0].evidence["updates"] == 1
    # ... but a run whose design is one update per rollout, without an early stop, is fine
    assert run(Diagnoser(), 4, updates=1) == []
    # a weak KL alone is not a finding
    assert run(Diagnoser(), 5, obs_kw=dict(approx_kl=2e-6)) == []


def test_nonfinite_logp_and_first_ratio():
    d = Diagnoser()
    assert codes(d.check_observe("actor", 0, obs(approx_kl=float("nan")))) == ["PPG902"]
    # a deviating first ratio on two consecutive rollouts; one rollout's spike (one sample) is not enough
    assert d.check_observe("actor", 1, obs(first=True, rollout=1, ratio_dev=0.2)) == []
    assert d.check_observe("actor", 2, obs(first=True, rollout=2, ratio_dev=1e-6)) == []
    assert d.check_observe("actor", 3, obs(first=True, rollout=3, ratio_dev=0.2)) == []
    assert codes(d.check_observe("actor", 4, obs(first=True, rollout=4, ratio_dev=0.2))) == ["PPG105"]
    # bf16 autocast: rounding alone moves a recomputed log-prob by a few eps (7.8e-3)
    assert all(d.check_observe("b", r, obs(first=True, rollout=r, ratio_dev=2.5e-3, precision_eps=7.8e-3)) == []
               for r in range(4))
    bf16 = dict(first=True, ratio_dev=0.4, precision_eps=7.8e-3)
    assert codes(d.check_observe("b", 5, obs(rollout=5, **bf16))
                 + d.check_observe("b", 6, obs(rollout=6, **bf16))) == ["PPG105"]


def test_advantages_nan_or_without_spread_but_not_one_sample():
    d = Diagnoser()
    assert d.check_observe("a", 0, obs(adv_std=0.0, adv_mean=0.3, samples=1)) == []  # a remainder of one
    # no spread in one minibatch is no finding (GRPO: a minibatch of solved groups); on every minibatch of two
    # rollouts, from the start, it is
    assert d.check_observe("a", 1, obs(adv_std=0.0, adv_mean=0.3, samples=64)) == []
    assert codes(run(Diagnoser(), 3, obs_kw=dict(adv_std=0.0, adv_mean=0.3, samples=64))) == ["PPG401"]
    assert codes(d.check_observe("b", 0, obs(adv_std=math.nan, adv_mean=math.nan, samples=1))) == ["PPG401"]
    # absent advantages are NaN too, and are no finding
    assert d.check_observe("c", 0, obs(adv_std=math.nan, adv_mean=math.nan, adv_given=False)) == []


def test_config_is_validated():
    import pytest

    with pytest.raises(ValueError, match="zero_grad_steps"):
        GuardConfig(zero_grad_steps=0)
    with pytest.raises(ValueError, match="entropy_at_max"):
        GuardConfig(entropy_at_max=1.5)
    with pytest.raises(ValueError, match="frozen_kl"):
        GuardConfig(frozen_kl=-1.0)


_num = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just(0.0), st.floats(0, 1e-6))


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(_num, _num, _num, _num, _num, st.booleans(), st.integers(0, 6)), min_size=1, max_size=80))
def test_random_evidence_never_raises_and_never_reports_a_code_twice_per_role(stream):
    d = Diagnoser()
    seen = []
    for i, (g, u, kl, dev, adv, first, none) in enumerate(stream):
        seen += d.check_step("actor", i, step(grad_norm=g, grad_norm_clipped=g, update_norm=u, update_ratio=u,
                                              grad_none=none, critic_grad_norm=u, clip_coef=dev))
        seen += d.check_observe("actor", i, obs(first=first, rollout=i // 4, approx_kl=kl, ratio_dev=dev,
                                                adv_std=adv))
    keys = [(f.code, f.role) for f in seen]
    assert len(keys) == len(set(keys))


_facts = st.one_of(
    st.tuples(st.just("setup"), st.floats(0, 1), st.sampled_from([0.0, 1e-3, math.nan]), st.integers(0, 6),
              st.integers(0, 6), st.integers(0, 6)),
    st.tuples(st.just("wiring"), st.booleans(), st.booleans(), st.integers(0, 6), st.integers(0, 6),
              st.sampled_from(["", "LogBackward0"])),
    st.tuples(st.just("step"), _num, _num, _num, st.integers(0, 6), _num),
    st.tuples(st.just("observe"), _num, _num, _num, st.booleans(), st.one_of(st.none(), st.integers(1, 4))),
)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["actor", "agent_1", "critic"]), _facts), min_size=1, max_size=120))
def test_random_mixed_evidence_over_roles_never_raises_nor_repeats_a_code_per_role(stream):
    d = Diagnoser()
    seen = []
    for i, (role, (kind, *f)) in enumerate(stream):
        if kind == "setup":
            seen += d.check_setup(role, "critic" if role == "critic" else "actor", i, binding=f[0], lr=f[1],
                                  trainable=f[2], frozen=f[3], stale_tensors=f[4])
        elif kind == "wiring":
            seen += d.check_wiring(role, i, WiringFacts(logp_requires_grad=f[0], old_requires_grad=f[1], by_hand=f[4]))
            seen += d.check_unreached(role, i, missing=f[2], unreached=f[3], trainable=6)
        elif kind == "step":
            seen += d.check_step(role, i, step(grad_norm=f[0], grad_norm_clipped=f[1], update_ratio=f[2],
                                               update_norm=f[2], grad_none=f[3], clip_coef=f[4], critic_grad_norm=f[0]))
        else:
            o = obs(first=f[3], rollout=i // 5, approx_kl=f[0], ratio_dev=f[1], adv_std=f[2])
            o.prev_updates = f[4]
            seen += d.check_observe(role, i, o)
    keys = [(x.code, x.role) for x in seen]
    assert len(keys) == len(set(keys))
    assert all(x.role in ("actor", "agent_1", "critic") and x.code.startswith("PPG") for x in seen)
    # a critic is never "frozen" or "at lr 0" by the actor's codes (it may be left out of the optimizer: PPG001/2)
    assert not any(x.role == "critic" and x.code in ("PPG003", "PPG005") for x in seen)
    d.load_state_dict(d.state_dict())  # the state round-trips whatever the stream left in it


def _phases(diag, lengths, last_kl, target_kl):
    """Rollouts of the given numbers of updates, each ending with an observe of ``last_kl``."""
    out, n = [], 0
    for r, length in enumerate(lengths):
        for u in range(length):
            o = obs(first=u == 0, rollout=r, approx_kl=0.0 if u == 0 else last_kl, ratio_dev=0.0 if u == 0 else 0.1)
            o.target_kl, o.prev_updates = target_kl, (lengths[r - 1] if u == 0 and r else None)
            out += diag.check_observe("actor", n, o)
            out += diag.check_step("actor", n, step(segment=r))
            n += 1
    return out


def test_target_kl_stopping_at_its_first_check_is_named_whatever_the_check_interval():
    # CleanRL checks after each epoch: a 1e-7 target stops every phase after its first epoch of 4 minibatches
    found = _phases(Diagnoser(), [4] * 6, last_kl=1e-4, target_kl=1e-7)
    assert codes(found) == ["PPG302"] and found[0].evidence["updates"] == 4
    # a tight but sane target stops some phases part-way (just over the target) and lets others finish
    assert _phases(Diagnoser(), [16, 8, 8, 8, 16, 12, 8, 8, 8], last_kl=6e-4, target_kl=5e-4) == []


# ---------------------------------------------------------------------------------------------- Diagnosis v2
def test_policy_unstable_on_most_recent_rollouts_not_on_one_jump():
    d = Diagnoser()
    # one jump is not instability: healthy PPO stays far below 0.1 and a single spike passes
    kls = [0.02, 0.3, 0.01, 0.02, 0.01, 0.02]
    assert "PPG303" not in codes(run(d, len(kls), obs_kw=lambda r, u: {"approx_kl": kls[r]}))
    d = Diagnoser()  # oscillating: 3 of the last 5 rollouts far above
    kls = [0.16, 0.74, 0.03, 0.06, 0.15, 0.3, 0.2]
    found = run(d, len(kls), obs_kw=lambda r, u: {"approx_kl": kls[r], "clip_fraction": 0.6})
    first = next(f for f in found if f.code == "PPG303")
    assert first.evidence["rollouts"] == 3 and first.evidence["approx_kl"] == 0.15
    assert "0.6" in first.message


def test_critic_grad_zero_needs_most_steps_of_consecutive_rollouts_and_respects_a_freeze():
    from lightning_ppo_guard.rules import CriticFacts

    def feed(d, pattern, **kw):
        out = []
        for seg, grads in enumerate(pattern):
            for g in grads:
                out += d.check_critic_step("critic", seg * 10, CriticFacts(grad_norm=g, binding=1.0, segment=seg, **kw))
        return out

    clipped = [[5.0, 0.0, 0.0, 0.0]] * 3  # value clipping: only each rollout's first minibatch has a gradient
    assert codes(feed(Diagnoser(), clipped)) == ["PPG406"]
    assert codes(feed(Diagnoser(), [[5.0, 0.0, 0.0, 0.0]] * 2)) == []  # two rollouts are not enough
    assert codes(feed(Diagnoser(), [[5.0, 1.0, 0.0, 0.0]] * 3)) == []  # half the steps have a gradient
    assert codes(feed(Diagnoser(), clipped, lr_max=0.0)) == []  # a critic at lr 0: a freeze, not PPG406
    d = Diagnoser()
    out = []
    for i in range(6):  # no rollout ids: measured steps x 2
        out += d.check_critic_step("critic", i, CriticFacts(grad_norm=0.0, binding=1.0))
    assert codes(out) == ["PPG406"] and out[0].step == 5


def test_signs_of_the_policy_and_entropy_terms_are_named_after_consecutive_observes():
    d = Diagnoser()
    assert d.check_entropy_sign("actor", 0, -0.01) == []  # a bonus
    assert d.check_entropy_sign("actor", 1, 0.0) == []  # no entropy term
    assert d.check_entropy_sign("actor", 2, math.nan) == []  # the backward never reached the tensor
    assert d.check_entropy_sign("actor", 3, 0.01) == []
    assert d.check_entropy_sign("actor", 4, -0.01) == []  # the streak restarts
    assert d.check_entropy_sign("actor", 5, 0.01) == []
    found = d.check_entropy_sign("actor", 6, 0.01)
    assert codes(found) == ["PPG502"] and found[0].evidence == {"slope": 0.01, "observes": 2}
    d = Diagnoser()
    assert d.check_gradient_sign("actor", 0, -3.0) == [] and d.check_gradient_sign("actor", 1, 2.0) == []
    assert codes(d.check_gradient_sign("actor", 2, 2.0)) == ["PPG107"]
    # a positive dot product without a reversed policy term (a KL penalty outweighing it): no streak
    d = Diagnoser()
    assert all(d.check_gradient_sign("actor", i, 1.0, own=-0.26) == [] for i in range(5))
    assert codes(d.check_gradient_sign("actor", 5, 1.0, own=-0.8) + d.check_gradient_sign("actor", 6, 1.0, own=-0.9)) \
        == ["PPG107"]


def test_early_stop_without_target_kl_is_one_update_and_a_dropped_minibatch_per_rollout():
    def feed(updates, observes, n=4):
        d, out = Diagnoser(), []
        for r in range(n):
            for u in range(observes):
                o = obs(first=u == 0, rollout=r, approx_kl=0.0 if u == 0 else 3e-4, ratio_dev=0.0 if u == 0 else 0.1)
                o.prev_updates, o.prev_observes = (updates, observes) if u == 0 and r else (None, None)
                out += d.check_observe("actor", r * 10 + u, o)
        return out

    assert codes(feed(1, 2)) == ["PPG302"]  # SB3-style: the 2nd minibatch's loss computed, then the loop broke
    assert codes(feed(1, 1)) == []  # one epoch of one minibatch, by design: nothing dropped
    assert codes(feed(4, 4)) == []


def test_first_ratio_on_inferred_rollouts_waits_for_two_batches_and_never_after_a_batch_starting_at_one():
    def feed(first_devs):
        d, out = Diagnoser(), []
        for r, dev in enumerate(first_devs):
            for u in range(4):
                o = obs(first=u == 0, rollout=r, ratio_dev=dev if u == 0 else 0.1)
                o.inferred = True
                o.prev_updates, o.prev_observes = (4, 4) if u == 0 and r else (None, None)
                out += d.check_observe("actor", r * 4 + u, o)
        return out

    found = feed([0.2, 0.2, 0.2])
    assert codes(found) == ["PPG105"] and "2 training batches" in found[0].message
    assert codes(feed([0.0, 0.2, 0.2, 0.2, 0.2])) == []  # a batch started at ratio 1: a batch is no rollout here
    assert codes(feed([0.2, 0.0, 0.2])) == []


def test_no_raise_the_lr_at_a_typical_adaptive_lr_and_a_deterministic_frozen_policy_is_a_collapse():
    d = Diagnoser()
    # Adam at 3e-4, gradient well above eps, yet a tiny relative step (a huge table): PPG204 would be a guess
    tiny = dict(update_ratio=1e-8, opt_eps=1e-8, trainable_numel=100, grad_norm=1.0, lr=3e-4, lr_max=3e-4)
    assert "PPG204" not in codes(run(d, 2, step_kw=tiny))
    d = Diagnoser()
    assert "PPG204" in codes(run(d, 2, step_kw={**tiny, "lr": 1e-9, "lr_max": 1e-9}))
    d = Diagnoser()
    frozen = dict(approx_kl=0.0, ratio_dev=0.0, entropy_norm=0.002)
    found = run(d, 4, obs_kw=frozen)
    assert codes(found) == ["PPG503"]


def test_gaussian_std_collapse_is_relative_to_its_start_and_needs_consecutive_rollouts():
    d = Diagnoser()
    stds = [0.0, -1.0, -3.0, -4.7, -2.0, -4.8, -5.5]  # one dip below 100x (-4.6) then a recovery: not yet
    found = run(d, len(stds) + 1, obs_kw=lambda r, u: {"log_std": stds[min(r, len(stds) - 1)]})
    first = next(f for f in found if f.code == "PPG504")
    assert first.evidence["rollouts"] == 2 and first.evidence["log_std"] == -5.5
    assert first.evidence["std_ratio"] == pytest.approx(math.exp(-5.5))
    d = Diagnoser()  # a healthy slow fall (std 0.2 after a long run) says nothing
    assert "PPG504" not in codes(run(d, 8, obs_kw=lambda r, u: {"log_std": -0.2 * r}))


def test_a_ratio_exactly_one_while_the_actor_moves_is_old_logp_recomputed_not_a_frozen_policy():
    """PPG108: old_logp recomputed from the current policy gives a ratio of exactly 1 on every minibatch, later ones
    included, while the parameters move at a healthy rate: named as such, never as PPG301 (larger steps)."""
    exact = dict(approx_kl=0.0, ratio_dev=0.0, entropy_norm=0.9, entropy_drift=-0.02)
    found = run(Diagnoser(), 5, obs_kw=exact)
    assert codes(found) == ["PPG108"] and found[0].evidence["rollouts"] == 2
    assert "{" not in found[0].message and "nan" not in found[0].message
    # float32 rounding of a recompute on another batch shape (2 ulps) is still "exactly 1"
    assert codes(run(Diagnoser(), 5, obs_kw=dict(exact, ratio_dev=2e-7))) == ["PPG108"]
    # a policy whose logits barely depend on its parameters moves a little: PPG301, not PPG108
    assert codes(run(Diagnoser(), 5, obs_kw=dict(exact, approx_kl=1e-12, ratio_dev=7e-7))) == ["PPG301"]
    # parameters that do not move: a ratio of 1 proves nothing about old_logp (PPG204 names the step size)
    assert "PPG108" not in codes(run(Diagnoser(), 5, obs_kw=exact, step_kw=dict(update_ratio=1e-8)))
    # a deterministic policy: every log-prob is 0 in float32 and the ratio 1 by saturation (PPG503's case)
    assert "PPG108" not in codes(run(Diagnoser(), 5, obs_kw=dict(exact, logp_mean=0.0)))
    assert "PPG108" not in codes(run(Diagnoser(), 5, obs_kw=dict(exact, entropy_norm=1e-4)))
    # one update per rollout (A2C-like): every minibatch is a rollout's first, whose ratio is 1 by right
    assert run(Diagnoser(), 5, updates=1, obs_kw=exact) == []


def test_exact_ratio_in_windows_of_observes_is_no_evidence():
    """Without rollout ids (automatic optimization, windows of observes) a ratio of 1 may be a loop of one minibatch
    per rollout: PPG108 cannot be told there."""
    diag, out = Diagnoser(), []
    for n in range(200):
        out += diag.check_observe("actor", n, obs(rollout=None, approx_kl=0.0, ratio_dev=0.0))
        out += diag.check_step("actor", n, step(segment=None))
    assert "PPG108" not in codes(out)


def test_zero_spread_after_a_spread_is_no_bug_in_the_advantages():
    """A task learnt late in the fit (GRPO: every group solved) gives zeros after rollouts with spread."""
    findings = run(Diagnoser(), 8, obs_kw=lambda r, u: dict(adv_std=1.0 if r < 3 else 0.0, adv_mean=0.0, samples=64))
    assert findings == []


def _grpo(corr=1.0, zero=0.2, top=0.0, reward_max=1.0, reward_min=0.0):
    return lambda r, u: dict(adv_reward_corr=corr, zero_adv_groups=zero, zero_adv_groups_top=top,
                             zero_group_reward=0.0, reward_max=reward_max, reward_min=reward_min, adv_zero_frac=zero)


def test_zero_advantage_groups_are_a_rollout_rate_of_unsolved_groups():
    # most groups failed on every sample, two rollouts: PPG407 (and never PPG401, which it explains)
    assert codes(run(Diagnoser(), 3, obs_kw=_grpo(zero=1.0, reward_max=0.0))) == ["PPG407"]
    assert codes(run(Diagnoser(), 3, obs_kw=_grpo(zero=0.95, reward_max=1.0))) == ["PPG407"]
    # solved groups (at the best reward seen) teach nothing either, but the task is learnt: no finding; solved and
    # failed ones mixed count the failed ones only
    assert run(Diagnoser(), 6, obs_kw=_grpo(zero=0.95, top=0.95)) == []
    assert run(Diagnoser(), 6, obs_kw=_grpo(zero=0.95, top=0.5)) == []
    assert codes(run(Diagnoser(), 6, obs_kw=_grpo(zero=1.0, top=0.05))) == ["PPG407"]
    # three of four groups wasted, rollout after rollout: a healthy binary-reward GRPO learning prompt by prompt
    assert run(Diagnoser(), 6, obs_kw=_grpo(zero=0.75)) == []
    # too few groups read (one minibatch of 4 groups per rollout): not before 16 groups
    few = run(Diagnoser(), 6, updates=1, obs_kw=lambda r, u: {**_grpo(zero=1.0, reward_max=0.0)(r, u), "groups": 4.0})
    assert [f.code for f in few] == ["PPG407"] and few[0].step >= 3
    # a minibatch whose best is below the best seen: its top groups failed too
    assert codes(run(Diagnoser(), 6, obs_kw=lambda r, u: _grpo(zero=1.0, top=1.0, reward_max=1.0 if r == 0 and u == 0
                                                                  else 0.0)(r, u))) == ["PPG407"]
    # a minority of failed groups: learning
    assert run(Diagnoser(), 6, obs_kw=_grpo(zero=0.4)) == []
    # one rollout of it only
    assert run(Diagnoser(), 6, obs_kw=lambda r, u: _grpo(zero=1.0 if r == 2 else 0.1)(r, u)) == []


def test_advantages_that_fall_with_the_rewards_are_named_on_consecutive_observes():
    assert codes(run(Diagnoser(), 2, obs_kw=_grpo(corr=-1.0))) == ["PPG109"]
    rng = random.Random(0)
    assert run(Diagnoser(), 20, obs_kw=lambda r, u: _grpo(corr=rng.uniform(-0.45, 1.0))(r, u)) == []
    alternating = run(Diagnoser(), 4, obs_kw=lambda r, u: _grpo(corr=-0.9 if u % 2 else 0.8)(r, u))
    assert alternating == []


def test_kl_penalty_pinning_the_policy_from_the_backward_and_it_mutes_the_sign_rule():
    d = Diagnoser()
    found, pinned = d.check_kl_pin("a", 1, kl_align=0.95, own=-0.26)
    assert found == [] and pinned
    found, pinned = d.check_kl_pin("a", 2, kl_align=0.9, own=0.1)
    assert codes(found) == ["PPG304"] and pinned
    healthy = Diagnoser()
    rng = random.Random(1)
    assert all(healthy.check_kl_pin("a", i, kl_align=rng.uniform(-0.25, 0.25), own=rng.uniform(0.6, 1.0)) ==
               ([], False) for i in range(50))
    # an unread penalty (no ref_logp) is no evidence
    assert Diagnoser().check_kl_pin("a", 1, kl_align=math.nan, own=0.1) == ([], False)


def test_precedence_table_names_one_code_per_cause():
    from lightning_ppo_guard.diagnoses import CATALOG
    from lightning_ppo_guard.rules import EXPLAINED_BY

    for code, causes in EXPLAINED_BY.items():
        assert code in CATALOG and causes and all(c in CATALOG and c != code for c in causes)
    d = Diagnoser()
    d.state("a").raised.append("PPG304")
    assert d._emit("a", "PPG407", 3, share=1.0, reward=0.0, rollouts=2) == []


def test_a_window_of_exact_ratios_without_rollout_ids_is_no_frozen_policy():
    """Without rollout boundaries (windows of observes) a ratio of exactly 1 on every measured minibatch while the
    actor moves is one update per rollout (PPO with 1 epoch x 1 minibatch: each minibatch is a rollout's first) or
    old log-probs recomputed (PPG108, which needs rollout=): neither is PPG301's "take larger steps" (the false
    alarm a healthy 1x1 run got at step ~1,400). A policy that barely moves (ratio 7e-7) still is PPG301."""
    def windows(ratio_dev: float) -> list:
        d, out = Diagnoser(), []
        for n in range(16 * 6):
            out += d.check_observe("actor", n, obs(rollout=None, approx_kl=0.0, ratio_dev=ratio_dev))
            out += d.check_step("actor", n, step(segment=None))
        return out

    assert windows(0.0) == [] and windows(2e-7) == []
    assert codes(windows(7e-7)) == ["PPG301"]
