"""Every threshold the rules use, in one validated, documented place.

The defaults come from measurements, not taste (CartPole PPO, CPU; see README "Why these thresholds"):
healthy runs show approx_kl 1e-4..6e-4 per update, median clip_fraction 0, relative updates 1e-4..1e-2
per Adam step, max |r - 1| per rollout above 1e-2; the stalled runs sit at KL < 1e-10, |r - 1| < 1e-5,
relative updates < 1e-7. Each threshold sits orders of magnitude from both, and every runtime rule needs
its condition on several consecutive steps or rollouts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["GuardConfig"]


@dataclass(frozen=True)
class GuardConfig:
    """Thresholds of the guard's rules. All counts are consecutive steps/rollouts of one role."""

    #: PPG201: steps with an exactly-zero actor gradient after backward.
    zero_grad_steps: int = 3
    #: PPG202/PPG004: steps whose gradient vanished between backward and the optimizer step.
    cleared_steps: int = 2
    #: PPG203: steps with a gradient at the step but an exactly-zero parameter change (PPG003 when every param
    #: group holding the role had lr 0 at those steps, and they span two rollouts: a warm-up from 0 rises sooner).
    unchanged_steps: int = 3
    #: PPG003 when no rollout (or manual-optimization batch) boundary is known: this many unchanged steps at lr 0.
    lr_zero_steps: int = 16
    #: PPG203 also: consecutive optimizer steps skipped (AMP's GradScaler found inf/NaN). A few skips are
    #: normal while fp16's scale settles (each halves it); 25 in a row take 65536 below 1/256, so the
    #: gradients are non-finite at any scale.
    skipped_steps: int = 25
    #: PPG204: relative update ||dtheta||/||theta|| per step below this is "too small" ...
    tiny_update_ratio: float = 1e-6
    #: ... on this many consecutive steps.
    tiny_update_steps: int = 8
    #: PPG301/PPG501/PPG403: a rollout is frozen when its mean approx_kl is below this ...
    frozen_kl: float = 1e-7
    #: ... and its max |ratio - 1| below this ...
    frozen_ratio_dev: float = 1e-3
    #: ... for this many consecutive rollouts.
    frozen_rollouts: int = 3
    #: PPG108: a rollout whose max |ratio - 1| over every measured minibatch (after the actor stepped in it) is at
    #: most this: two float32 rounding steps of a log-prob near 1, what recomputing the same forward gives (exactly 0
    #: on the same minibatch). Healthy PPO: above 1e-2; a policy whose logits barely depend on its parameters
    #: (PPG301/PPG501, logits / 1e4): 6e-7..1e-5 ...
    exact_ratio_dev: float = 2.5e-7
    #: ... while the actor's relative update per step is at least this (a step that small moves float32 logits by
    #: well above ``exact_ratio_dev``) ...
    exact_ratio_update_ratio: float = 1e-5
    #: ... on this many consecutive rollouts: old_logp is recomputed from the current policy.
    exact_ratio_rollouts: int = 2
    #: PPG302: an update phase that ends with approx_kl above target_kl after as few actor steps as any rollout had
    #: (its first check: a minibatch in SB3, an epoch in CleanRL) in this many consecutive rollouts.
    early_stop_rollouts: int = 3
    #: PPG303: the largest approx_kl of a rollout's later minibatches above this (healthy PPO: 1e-4..3e-2, and a
    #: target_kl of 0.01..0.05 stops well below it) ...
    unstable_kl: float = 0.1
    #: ... on this many of the last ``unstable_window`` rollouts (an unstable policy oscillates: a jump, then a
    #: rollout or two of small steps).
    unstable_rollouts: int = 3
    unstable_window: int = 5
    #: PPG401: advantages with std below this (relative to their mean magnitude + 1) are degenerate.
    degenerate_adv_std: float = 1e-8
    #: PPG402: unnormalised advantages whose std stays below this (normalised ones have std 1; healthy
    #: unnormalised CartPole has > 1) on ``weak_rollouts`` consecutive rollouts.
    tiny_adv_std: float = 0.1
    #: PPG403: the critic ate the shared clip on at least half of a rollout's measured steps ("starved"): a shared
    #: clip coefficient below this ...
    starved_clip_coef: float = 0.05
    #: ... with the critic's pre-clip gradient this many times the actor's.
    critic_dominance: float = 20.0
    #: ... and, with an optimizer that has an eps (Adam...), the clipped actor gradient's RMS per element below
    #: this share of it (healthy CleanRL CartPole: clip coefficient ~0.02, RMS 2e-5..2e-3 against eps 1e-5, and
    #: Adam's step is unharmed; the reference fault: RMS 6e-8). Without an eps, update_ratio below 1e-5.
    below_eps: float = 0.1
    #: PPG402/PPG403 need this many consecutive such rollouts.
    weak_rollouts: int = 2
    #: PPG403 without rollout ids (automatic optimization, no ``rollout=``): the clip starved the actor on this many
    #: consecutive measured steps (without segments the cadence measures 1 step in 16 after the dense start) ...
    starved_steps: int = 4
    #: ... spanning at least this many optimizer steps (two to three rollouts of common sizes: a critic that only
    #: dominates while it fits its first targets is not a stalled actor).
    starved_span: int = 48
    #: PPG204 says "raise the lr" only below this lr for an optimizer with an eps (Adam-like steps are about lr per
    #: element; at a typical lr a tiny relative step has another cause).
    typical_adaptive_lr: float = 1e-5
    #: PPG406: the critic's gradient exactly 0 on most measured steps of this many consecutive rollouts.
    critic_rollouts: int = 3
    #: PPG404: the gradient the critic head sends into a shared trunk at least this many times the actor head's
    #: (healthy shared-trunk CartPole, returns up to ~50 and no value normalisation: at most ~110 in the first
    #: rollout, when the policy head starts at std 0.01, then 0.3..10; rewards x100: 2e3..2e4 throughout) ...
    trunk_value_dominance: float = 1000.0
    #: ... on most measured steps of this many consecutive rollouts (without rollout ids: measured steps x 2).
    trunk_rollouts: int = 5
    #: PPG501: normalised entropy above this counts as "at its maximum" ...
    entropy_at_max: float = 0.999
    #: ... and a normalised drift below this as "frozen".
    entropy_frozen_drift: float = 1e-4
    #: PPG504: a Gaussian policy's std this many times below its value at the end of the first rollout ...
    std_collapse: float = 100.0
    #: ... on this many consecutive rollouts.
    std_collapse_rollouts: int = 2
    #: PPG503: a frozen policy whose normalised entropy is below this has collapsed to a deterministic one.
    entropy_collapsed: float = 0.01
    #: PPG107: consecutive measured observes whose policy-term gradient pushed the advantages' way backwards ...
    gradient_sign_observes: int = 2
    #: ... with a cosine to -advantages below minus this (a healthy loss's is 0.6..1, an upside-down one's minus
    #: that; a KL penalty that outweighs the policy term leaves it at -0.3..0.4).
    backwards_cos: float = 0.5
    #: PPG502: consecutive measured observes whose entropy tensor got a positive gradient from the loss.
    entropy_sign_observes: int = 2
    #: PPG104: consecutive measured observes whose gradient follows a loss broadcast to (B, B) rather than a
    #: per-sample one (the shapes handed to observe only say which pair to check).
    broadcast_observes: int = 2
    #: PPG104 for values and returns: the value gradient must fit values - mean(returns) to within this (1 - cosine;
    #: a broadcast MSE fits it to float rounding, 1e-12) and its magnitudes spread more than this (a saturated Huber
    #: loss's gradient is a sign, spread 0).
    broadcast_fit: float = 1e-6
    #: "cannot tell" (a notice, no finding): a hook on a tensor handed to observe got no gradient in this many
    #: consecutive measured backward passes, and never did.
    unreadable_observes: int = 4
    #: PPG105 on rollouts inferred from manual-optimization batches: this many consecutive batches must start with
    #: a deviating ratio (and none ever with a ratio of 1).
    first_ratio_batches: int = 2
    #: PPG105 with rollout ids: this many consecutive rollouts (of those whose first ratio is read) must start with a
    #: deviating ratio (one sample's spike in one rollout is no systematic mismatch).
    first_ratio_rollouts: int = 2
    #: PPG105: max |ratio - 1| on a rollout's first minibatch above this (float32 log-probs) ...
    first_ratio_dev: float = 1e-3
    #: ... or above this many machine epsilons of the lowest precision new_logp was computed in (bf16 autocast:
    #: eps 7.8e-3, so 0.125: rounding alone moves a recomputed log-prob by a few eps).
    first_ratio_eps: float = 16.0
    #: "Annealed": the role's lr is at most this share of its peak ...
    annealed_lr: float = 0.1
    #: ... and this share of the planned fit is done. There the rules that say "too small" or "frozen" are quiet:
    #: a schedule that decays to 0 is meant to stop the actor.
    annealed_fraction: float = 0.9
    #: Rollout-level rules use pseudo-rollouts of this many observes when observe() gets no rollout id.
    window_observes: int = 16
    #: PPG401 without spread (not NaN): advantages with no spread on every measured minibatch of this many
    #: consecutive rollouts, none of the role's rollouts having had any (one minibatch of solved GRPO groups, or a
    #: solved task late in the fit, is no bug in the advantages).
    degenerate_rollouts: int = 2
    #: PPG407: the share of groups whose rewards have no spread and are not at the best reward (all failed) at least
    #: this, over a rollout's measured minibatches (healthy binary-reward GRPO learning prompt by prompt: 0..0.75 of
    #: a rollout's groups), ...
    zero_groups_share: float = 0.9
    #: ... on this many consecutive rollouts, ...
    zero_groups_rollouts: int = 2
    #: ... that measured this many groups in all (one minibatch of 4 groups, as the sparse cadence reads, is noise).
    zero_groups_min: int = 16
    #: PPG109: the correlation of the sequences' advantages with their rewards (within groups) below minus this on
    #: this many consecutive measured observes (GRPO's is +1 exactly; a GAE advantage's is positive but noisy).
    adv_against_corr: float = 0.5
    adv_against_observes: int = 2
    #: PPG304: the loss's gradient on new_logp is more aligned with the KL penalty's pull towards the reference than
    #: with the advantages, with a cosine above this (healthy LM RL, beta 0.04: |cos| <= 0.25; beta 50: 0.7..0.98) ...
    kl_pin_align: float = 0.5
    #: ... on this many consecutive measured observes.
    kl_pin_observes: int = 2

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int):
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ValueError(f"GuardConfig.{f.name} must be an int >= 1, got {value!r}.")
            elif not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"GuardConfig.{f.name} must be a positive number, got {value!r}.")
        for name in ("starved_clip_coef", "entropy_at_max", "frozen_ratio_dev", "exact_ratio_dev", "annealed_lr",
                     "annealed_fraction", "broadcast_fit", "backwards_cos", "zero_groups_share", "adv_against_corr",
                     "kl_pin_align"):
            if getattr(self, name) >= 1:
                raise ValueError(f"GuardConfig.{name} must be below 1, got {getattr(self, name)!r}.")

    def replace(self, **changes: float) -> GuardConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
