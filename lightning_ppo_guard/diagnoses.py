"""The diagnosis catalog: every finding the guard can report, with a stable code.

Like ruff's and pylint's rules, each diagnosis has a code (``PPG###``, never reused; families by hundreds),
a kebab-case symbol, a one-line message template, an explanation and the fix. Codes that are retired keep
their number and stay listed with ``retired=True``.

Families: 0xx set-up and optimizer binding, 1xx autograd wiring of the policy term, 2xx gradient and
update, 3xx policy movement, 4xx learning signal, 5xx entropy, 9xx numerics.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["CATALOG", "DOCS_URL", "Diagnosis", "Finding", "get"]

#: Base of the docs site; each code has a page at ``{DOCS_URL}codes/PPG###/`` (``Diagnosis.url``).
DOCS_URL = "https://lightning-ppo-guard.readthedocs.io/en/latest/"

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Diagnosis:
    code: str
    symbol: str
    severity: Severity
    message: str  # str.format template over the finding's evidence (and ``role``, ``step``)
    explanation: str
    fix: str
    checklist: str = ""  # which step of the seed checklist this automates
    retired: bool = False

    @property
    def url(self) -> str:
        """This code's page on the docs site (``ppo-guard explain`` prints it, every warning ends with it)."""
        return f"{DOCS_URL}codes/{self.code}/"

    @property
    def fields(self) -> frozenset[str]:
        """The evidence names the message template needs (``role`` and ``step`` come from the finding)."""
        return frozenset(name.split(".")[0].split("[")[0] for _, name, _, _ in string.Formatter().parse(self.message)
                         if name) - {"role", "step"}

    def render(self, role: str, step: int, evidence: dict[str, Any], strict: bool = True) -> str:
        """The message for one finding. ``strict`` raises a ``KeyError`` naming the code and the missing evidence
        (the catalog test renders every code with what its rule emits); otherwise a missing field reads ``?`` and
        a value its format spec does not fit is written plainly, so a report never loses the rest of the line."""
        missing = self.fields - evidence.keys()
        if missing and strict:
            raise KeyError(f"{self.code}'s message needs evidence {sorted(missing)}; got {sorted(evidence)}.")
        values = {**{name: _Unknown() for name in missing}, **evidence, "role": role, "step": step}
        try:
            return self.message.format_map(values)
        except (ValueError, TypeError, IndexError, AttributeError):  # a spec such as {x:.1%} given a str
            if strict:
                raise
            plain = string.Formatter()
            return "".join(text + ("" if name is None else str(values.get(name.split(".")[0], "?")))
                           for text, name, _, _ in plain.parse(self.message))


class _Unknown:
    """A missing evidence field: formats as ``?`` under any format spec."""

    def __format__(self, spec: str) -> str:
        return "?"


@dataclass
class Finding:
    """One diagnosis raised for one role, with the numbers that support it."""

    code: str
    role: str
    step: int
    evidence: dict[str, Any] = field(default_factory=dict)
    rollout: int | None = None  # 0-based index of the role's rollout in which it was named (files and tables: 1-based)

    @property
    def diagnosis(self) -> Diagnosis:
        return CATALOG[self.code]

    @property
    def symbol(self) -> str:
        return self.diagnosis.symbol

    @property
    def severity(self) -> Severity:
        return self.diagnosis.severity

    @property
    def message(self) -> str:
        """The rendered message (never raises: a missing field reads ``?``; the catalog test keeps it complete)."""
        return self.diagnosis.render(self.role, self.step, self.evidence, strict=False)

    def __str__(self) -> str:
        numbers = ", ".join(f"{k}={_fmt(v)}" for k, v in self.evidence.items())
        evidence = f"  evidence: {numbers}\n" if numbers else ""
        return (f"{self.code} {self.symbol} [{self.role}] at step {self.step}: {self.message}\n"
                f"{evidence}  fix: {self.diagnosis.fix}\n  docs: {self.diagnosis.url}")

    def as_dict(self) -> dict[str, Any]:
        """The finding as written to ``ppo_guard_findings.json``: ``rollout`` counts from 1, as the summary does."""
        return {"code": self.code, "symbol": self.symbol, "role": self.role, "step": self.step,
                "rollout": None if self.rollout is None else self.rollout + 1,
                "severity": self.severity, "message": self.message, "evidence": dict(self.evidence),
                "fix": self.diagnosis.fix}


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


_ALL = (
    # ---------------------------------------------------------------- 0xx set-up and binding
    Diagnosis(
        "PPG001", "actor-not-in-optimizer", "error",
        "only {binding:.0%} of {role}'s trainable parameters are in any optimizer param group",
        "The optimizer steps only the tensors in its param groups. Tensors left out keep their initial "
        "values (and keep accumulating .grad, since zero_grad never clears them), so the policy never "
        "changes however large its gradient. Common when moving from a shared actor-critic to one actor per "
        "MAPPO agent.",
        "Pass every actor's parameters to the optimizer in configure_optimizers, e.g. "
        "Adam([{'params': self.actors.parameters(), 'lr': lr_actor}, {'params': self.critic.parameters()}]); "
        "check with [len(g['params']) for g in optimizer.param_groups].",
        checklist="step 1 (grad > 0 but no change) and step 4 (param groups)",
    ),
    Diagnosis(
        "PPG002", "optimizer-holds-stale-tensors", "error",
        "the optimizer holds {stale_tensors} tensors that are no longer parameters of the model, and not "
        "{role}'s current ones",
        "The actor module was re-created (or its parameters replaced) after configure_optimizers built the "
        "optimizer, e.g. in setup()/on_fit_start() or by loading a new module. The optimizer keeps stepping the "
        "old tensors; the module used in the loss is never updated.",
        "Build the actor in __init__ (or configure_model) and never replace it afterwards; if you must, "
        "re-create the optimizer (or load weights in place with load_state_dict).",
        checklist="step 4 (param groups)",
    ),
    Diagnosis(
        "PPG003", "actor-lr-zero", "error",
        "every param group holding {role} has learning rate {lr:g}, and {role} did not move for {steps} measured "
        "steps",
        "With lr 0 the optimizer step leaves the actor unchanged (Adam still bumps its state). Often a "
        "scheduler that decays to 0 far too early, a warm-up that starts at 0 and never rises, or a per-group lr "
        "left at 0. Named only once the actor has not moved over several steps in more than one rollout, so a "
        "warm-up from 0, one layer frozen at lr 0 and a schedule that reaches 0 at the end of training are not.",
        "Give the actor's param group a positive lr (1e-4..3e-4 with Adam is typical for PPO); check the "
        "scheduler's lambda and warm-up.",
        checklist="step 1 (lr ~ 0) and step 2",
    ),
    Diagnosis(
        "PPG004", "grad-clipped-to-zero", "error",
        "{role}'s gradient was {grad_norm:.3g} after backward but exactly 0 at the optimizer step",
        "Gradient clipping with max_norm <= 0 (or a zero_grad(set_to_none=False) between backward and step) "
        "leaves an all-zero gradient, so nothing is updated.",
        "Use a positive max_grad_norm (0.5 is the PPO default) or gradient_clip_val=None, and call "
        "zero_grad() before backward, not after.",
        checklist="step 2 (max_grad_norm)",
    ),
    Diagnosis(
        "PPG005", "actor-frozen", "error",
        "{role} has no trainable parameter: all {frozen} of its tensors have requires_grad=False",
        "A frozen actor (requires_grad_(False), a freeze() left over from pre-training, or weights loaded as "
        "buffers) gets no gradient and cannot learn.",
        "Call actor.requires_grad_(True) (or unfreeze the layers meant to learn) before the optimizer is built.",
        checklist="step 1",
    ),
    Diagnosis(
        "PPG006", "part-frozen", "warning",
        "{part} ({role}) has no trainable tensor: all of it is requires_grad=False, so it never learns",
        "A named part of a role (a Gaussian's log_std, one of a role's modules) or a whole shared trunk or critic "
        "is frozen. The rest of the role still learns, so this is no stall, and it may be deliberate (a pretrained "
        "encoder, a fixed exploration std); left over from a freeze() or a checkpoint load, it caps what the policy "
        "or value function can learn (a frozen log_std keeps exploration at its initial std forever).",
        "If it should learn, call requires_grad_(True) on it before the optimizer is built (and pass it to the "
        "optimizer); if it is frozen on purpose, PPOGuard(ignore=['PPG006']).",
        checklist="step 1",
    ),
    # ---------------------------------------------------------------- 1xx wiring of the policy term
    Diagnosis(
        "PPG101", "logp-no-grad", "error",
        "new_logp for {role} does not require grad: the policy term cannot reach the actor",
        "new_logp was built from detached logits (actor(x).detach()), under torch.no_grad() / "
        "torch.inference_mode(), or from a tensor recorded at rollout time. The PPO surrogate then has no "
        "gradient with respect to the actor; only the entropy bonus (if built from live logits) moves it.",
        "Recompute the logits in the update with gradients: dist = Categorical(logits=self.actor(obs)); "
        "new_logp = dist.log_prob(actions). No .detach() and no torch.no_grad() around the actor's forward.",
        checklist="step 1 (grad ~ 0) and step 3",
    ),
    Diagnosis(
        "PPG102", "logp-graph-misses-actor", "error",
        "new_logp's autograd graph reaches only {reached}/{trainable} of {role}'s trainable tensors, and the "
        "others get no gradient at the step either",
        "The log-probs are computed through some other module (a copy of the actor, a target network, another "
        "agent's actor), part of the actor is bypassed, or its output is detached while another tensor keeps "
        "new_logp's graph alive (a Gaussian's mean detached next to a learnt log_std), so those actor tensors get "
        "no policy gradient. Tensors outside the graph that are trained by another loss term (an auxiliary head) "
        "or reached through an opaque node (reentrant checkpointing) get a gradient and are not counted; those "
        "trained at other steps (an auxiliary phase between rollouts) move by the next rollout and are not named.",
        "Build the Distribution from this role's own live output, without .detach(): "
        "Categorical(logits=self.actor(obs)) or Normal(self.actor_mean(obs), self.log_std.exp()); for MAPPO pass "
        "role=f'agent_{{i}}' with that agent's log-probs.",
        checklist="step 1 and step 3",
    ),
    Diagnosis(
        "PPG103", "old-logp-requires-grad", "error",
        "old_logp for {role} requires grad: it is not the constant the ratio needs",
        "old_logp must be a constant. If it is recomputed from the current network without detach, "
        "ratio = exp(new - old) is identically 1 and its gradient cancels: the clipped surrogate gives the actor "
        "zero policy gradient. If it comes from the rollout's graph, backward also runs through the old graph.",
        "Record old_logp under torch.no_grad() at rollout time (or call .detach()), and store it in the buffer: "
        "ratio = (new_logp - old_logp.detach()).exp().",
        checklist="step 3",
    ),
    Diagnosis(
        "PPG104", "loss-broadcast", "error",
        "{name} has shape {shape} but {other} has shape {other_shape}, and the loss's gradient shows they broadcast to "
        "{broadcast}: each sample's gradient follows the mean of the other term, not its own (fit {shared:.3f} "
        "against {own:.3f}, {observes} observes)",
        "A (B,) tensor times a (B, 1) tensor broadcasts to (B, B): every advantage multiplies every ratio (or "
        "every value meets every return), the loss averages over the wrong pairs and its gradient is mostly "
        "noise: each sample's policy gradient is its ratio times the mean advantage (about 0 when normalised). "
        "Named from the backward, not from shapes: TorchRL keeps advantages (B, 1) and unsqueezes its log-ratio, "
        "which is fine. The shapes handed to observe say which pair to check (new_logp with old_logp and with the "
        "advantages, values with returns); the gradient of new_logp (or of the values) says whether the loss "
        "combined them per sample (own) or all against all (shared).",
        "Give the terms the same shape: advantages.reshape(-1), values.squeeze(-1), or new_logp.view_as(...).",
        checklist="step 3",
    ),
    Diagnosis(
        "PPG105", "first-ratio-not-one", "warning",
        "max |ratio - 1| = {ratio_dev:.3g} for {role} on the first minibatch of {where} (expected 0 before any "
        "update; tolerance {tolerance:.2g})",
        "Before the first update of a rollout the update policy equals the rollout policy, so the ratio must "
        "be exactly 1 (up to the rounding of the precision the log-probs are computed in). A deviation means "
        "old_logp and new_logp were computed from different inputs or a different network: dropout or "
        "batch-norm in train mode in the update and eval mode in the rollout; an observation normaliser updated "
        "during the rollout (the stored observations were normalised with older statistics); a recurrent "
        "hidden state not carried into the update; the clipped (or otherwise post-processed) action stored "
        "instead of the sampled one; different action masks; or a prefetching data loader that collected the "
        "next rollout one optimizer step early. Language models: a sampling temperature (or top-k/top-p "
        "filtering) applied to the logits the rollout's log-probs come from but not in the update, a sampler "
        "(vLLM) whose weights lag the policy, another padding side or chat template in the update. The evidence "
        "lists the role's dropout and batch-norm layers that were in train mode (train_mode_layers), the one "
        "cause visible in the model itself.",
        "Compute old_logp and new_logp the same way: same mode (eval() or no dropout), same normalisation "
        "statistics (store the normalised observations), the stored hidden state, the sampled action (clip "
        "only what the env gets), the same mask; collect the next rollout only after the last update. LM RL: "
        "score both with the same temperature, sync the sampler's weights after every update, keep padding "
        "and template identical. A sampler in lower precision is tolerated when its log-probs reach observe in "
        "its dtype (old_logp.bfloat16()); else raise GuardConfig(first_ratio_dev=...).",
        checklist="step 3",
    ),
    Diagnosis(
        "PPG106", "logp-by-hand", "warning",
        "new_logp for {role} is log() of gathered probabilities (graph: {pattern})",
        "log(softmax(x)[a]) computed by hand underflows to -inf for unlikely actions and loses precision; its "
        "gradient vanishes where the probability saturates. Distributions compute log_softmax stably.",
        "Use dist = Categorical(logits=logits); new_logp = dist.log_prob(actions).",
        checklist="step 3",
    ),
    Diagnosis(
        "PPG107", "policy-gradient-backwards", "error",
        "minimising the loss raises the log-prob of {role}'s worse-than-average actions: sum(d loss / d new_logp * "
        "advantages) = +{alignment:.3g} on {observes} consecutive observes (it must be < 0)",
        "In every policy-gradient loss (PPO's clipped surrogate, A2C, REINFORCE) the gradient of the loss with "
        "respect to new_logp is -advantage * ratio / N: a descent step raises the log-prob of actions with positive "
        "advantages. Here it is the other way round, so the policy learns backwards and returns fall while "
        "approx_kl looks normal. Usually the ratio upside down (exp(old_logp - new_logp)), the advantages negated "
        "(returns - values taken the other way, or -adv twice), the surrogate maximised by a minimiser "
        "(loss = +(ratio * adv).mean()), or torch.max where torch.min belongs on the unnegated objective. Read from "
        "the backward of the new_logp handed to observe, with the advantages handed with it.",
        "Write the surrogate as CleanRL does: ratio = (new_logp - old_logp).exp(); pg_loss = torch.max(-adv * ratio, "
        "-adv * ratio.clamp(1 - clip, 1 + clip)).mean(), with adv = returns - values (then normalised).",
        checklist="step 3",
    ),
    Diagnosis(
        "PPG108", "old-logp-from-current-policy", "warning",
        "{role}'s ratio is exactly 1 on every measured minibatch of {rollouts} rollouts (max |r-1| {ratio_dev:.2g} "
        "after {updates} updates) while its parameters move (update_ratio {update_ratio:.2g}): old_logp is not the "
        "rollout's",
        "After the first optimizer step of an update phase the policy is no longer the one that collected the "
        "rollout, so the later minibatches must have a ratio != 1. A ratio of exactly 1 throughout, while the actor's "
        "parameters move at a healthy rate, means old_logp is recomputed from the current policy at update time: a "
        "detached recompute in the update loop, a buffer whose log-probs are refreshed before each epoch, or "
        "TorchRL's ClipPPOLoss computing action_log_prob itself because the collector did not store it. The loss is "
        "then a plain policy gradient on stale data: clipping never acts, the trust region is gone, and approx_kl "
        "and clip_fraction read 0 however far the policy moves. Not 'steps too small' (PPG301): the parameters "
        "move.",
        "Store the log-prob at rollout time, under torch.no_grad(), from the policy that sampled the action, and use "
        "that stored value as old_logp in every epoch (TorchRL: a ProbabilisticActor with return_log_prob=True in "
        "the collector; SB3-style buffers: the log_prob saved with the action).",
        checklist="step 3",
    ),
    # ---------------------------------------------------------------- 2xx gradient and update
    Diagnosis(
        "PPG109", "advantages-against-rewards", "error",
        "{role}'s advantages fall as the rewards rise: correlation {corr:.2f} within groups, on {observes} "
        "consecutive observes",
        "Each sequence's advantage should rise with its reward (GRPO's group-normalised advantage is an increasing "
        "function of it; a value baseline keeps the order on average). Here they point the other way: the policy "
        "is taught to prefer its worst samples, the reward falls, and the loss and the gradient's sign look "
        "healthy because they follow the advantages they are given.",
        "Compute advantages as reward - baseline ((r - mean_group) / (std_group + eps) for GRPO/RLOO), not "
        "baseline - reward; check a reward model's sign and any 'cost' passed as a reward.",
        checklist="3. loss wiring: advantages",
    ),
    Diagnosis(
        "PPG201", "actor-grad-zero", "error",
        "{role}'s gradient after backward is exactly 0 for {steps} optimizer steps",
        "new_logp is wired, but the loss that is back-propagated carries no gradient to the actor: the policy "
        "term is left out of the loss, multiplied by zero (advantages all zero, a zero coefficient), or "
        "backward runs on another loss.",
        "Back-propagate policy_loss + vf_coef * value_loss - ent_coef * entropy, with non-zero advantages.",
        checklist="step 1 (grad ~ 0)",
    ),
    Diagnosis(
        "PPG202", "grad-cleared-before-step", "error",
        "{role}'s gradient was {grad_norm:.3g} after backward but gone (.grad is None) at the optimizer step",
        "zero_grad() runs between backward() and step(), so the optimizer sees no gradient and skips the "
        "parameters.",
        "Order the calls: optimizer.zero_grad(); manual_backward(loss); clip; optimizer.step().",
        checklist="step 1 (grad > 0 but no change)",
    ),
    Diagnosis(
        "PPG203", "params-unchanged", "error",
        "{role} has gradient {grad_norm_clipped:.3g} at the step but its parameters did not change "
        "(update 0 over {steps} steps)",
        "The optimizer holds the actor and sees a gradient, yet the step leaves it unchanged: the step is "
        "skipped (AMP found inf/NaN every time, a closure that returns None), the lr is 0 inside the "
        "optimizer's own state, or the parameters are restored after the step.",
        "Check that optimizer.step() really runs for this optimizer, that the lr the optimizer uses is "
        "positive, and that nothing re-loads the actor's weights after the step.",
        checklist="step 1 (grad > 0 but no change)",
    ),
    Diagnosis(
        "PPG204", "update-too-small", "error",
        "{role}'s relative update per step is {update_ratio:.2g} (lr {lr:g}) over {steps} steps",
        "The parameters move, but by less than one part in a million per step: the policy cannot change in any "
        "useful number of updates, and the lr is the cause: for an Adam-like optimizer this is named only below "
        "lr 1e-5 and when the gradient is not below its eps (that is PPG405, whatever the lr), nor starved by a "
        "shared clip (PPG403). Almost always a learning rate many orders too small, a scheduler's typo included.",
        "Raise the actor's lr (Adam: 1e-4..3e-4 for PPO) and check the scheduler; aim for update_ratio 1e-5..1e-2.",
        checklist="step 2 (lr)",
    ),
    # ---------------------------------------------------------------- 3xx policy movement
    Diagnosis(
        "PPG301", "policy-frozen", "error",
        "{role}'s policy did not move for {rollouts} rollouts: approx_kl {approx_kl:.2g}, max |r-1| "
        "{ratio_dev:.2g}, while its parameters change (update_ratio {update_ratio:.2g})",
        "Gradient flows and the optimizer updates the actor, yet the action distribution stays put: the steps "
        "are too small for this policy (too few epochs or minibatches, a tiny lr for this architecture) or "
        "the logits barely depend on the parameters.",
        "Try one run with larger steps (the checklist's step 2): actor lr 1e-4..3e-4, 4 epochs, clip 0.2, "
        "target_kl off; approx_kl should rise to 0.01..0.03 and clip_fraction to 0.1..0.3.",
        checklist="step 2",
    ),
    Diagnosis(
        "PPG302", "target-kl-stops-early", "error",
        "the update phase stopped at its first check in {rollouts} consecutive rollouts: {updates} update(s) per "
        "rollout (last approx_kl {approx_kl:.2g}, target_kl {target_kl})",
        "An early-stop guard with a target_kl that small ends every update phase at its first check (after the "
        "first minibatch when it checks each minibatch, as SB3 does; after the first epoch when it checks each "
        "epoch, as CleanRL does), so the actor takes a fraction of its planned steps per rollout. Without "
        "target_kl passed to observe, the pattern named is one update per rollout with a second minibatch whose "
        "loss was computed (observed) but never stepped; a per-epoch check needs target_kl= to be told from a "
        "shorter schedule.",
        "Raise target_kl to 0.01..0.05 (or set it to None), and compare it with approx_kl, not with the "
        "k1 estimate.",
        checklist="step 2 (target_kl)",
    ),
    Diagnosis(
        "PPG303", "policy-unstable", "warning",
        "{role}'s policy moves too far per rollout: approx_kl up to {approx_kl:.3g} (clip_fraction "
        "{clip_fraction:.2g}, max |r-1| {ratio_dev:.3g}) in {rollouts} of the last {window} rollouts",
        "PPO keeps each update phase close to the rollout policy (approx_kl 1e-4..3e-2, clip_fraction 0.1..0.3). "
        "Far above that, rollout after rollout, the clipped surrogate no longer bounds the step: the policy jumps, "
        "its entropy collapses and returns oscillate or crash. Causes: an lr far too large for the actor (or a "
        "Gaussian log_std with its own large lr), too many epochs over a small batch, advantages not normalised "
        "with large returns, a ratio computed with the wrong sign (exp(old - new)), or clip_eps far too wide.",
        "Lower the actor's lr (Adam 1e-4..3e-4) or the epochs, normalise advantages, check ratio = exp(new_logp - "
        "old_logp) and clip_eps 0.1..0.3; a target_kl of 0.01..0.05 stops an update phase that drifts too far.",
        checklist="step 2 (the other side: steps too large)",
    ),
    # ---------------------------------------------------------------- 4xx learning signal
    Diagnosis(
        "PPG304", "kl-penalty-pins-policy", "error",
        "the KL penalty to the reference drives {role}'s update, not the advantages: the gradient on the "
        "log-probs is aligned {kl_align:.2f} with the penalty's pull and {own:.2f} with the advantages, on "
        "{observes} consecutive observes (ref_kl {ref_kl:.3g})",
        "With a large KL coefficient, every step the policy takes away from the reference model is pulled "
        "back by the penalty's gradient, which outweighs the policy term as soon as the policy moves: the "
        "policy jitters around the reference and the reward does not rise, though every step is a healthy size.",
        "Lower the KL coefficient (beta / kl_coef: 0.001..0.1 is usual for PPO/GRPO on language models), or use "
        "an adaptive KL controller with a target KL; check that the coefficient is not applied twice (in the "
        "rewards and in the loss).",
        checklist="'if still stuck': step size",
    ),
    Diagnosis(
        "PPG401", "advantages-degenerate", "error",
        "{role}'s advantages are degenerate: std {adv_std:.3g}, mean {adv_mean:.3g} over {samples} samples"
        "{where}",
        "Advantages with no spread (all equal, all zero) or NaN carry no information about which actions were "
        "better; the policy gradient is zero or noise, and a NaN reaches every weight at the next step. A "
        "common NaN: normalising a minibatch of one sample by its unbiased std (0/0).",
        "Check the GAE computation (dones, bootstrapping, value shapes), that the rewards reach the buffer, and "
        "normalise advantages only over minibatches of 2 or more samples (or with the biased std plus eps). "
        "Group-relative advantages (GRPO) with no spread at all: every sample got one reward; pass "
        "observe(rewards=..., group=...) and see PPG407.",
        checklist="'if still stuck': advantage signal",
    ),
    Diagnosis(
        "PPG402", "advantages-tiny", "warning",
        "{role}'s advantages are tiny and not normalised (std {adv_std:.2g}) for {rollouts} rollouts",
        "The policy term scales with the advantages; at this size the entropy bonus (and the critic's noise) "
        "swamp the reward signal, and the policy drifts instead of following the reward.",
        "Normalise advantages per minibatch ((adv - mean) / (std + 1e-8)) or fix the reward scale.",
        checklist="'if still stuck': scale the advantages",
    ),
    Diagnosis(
        "PPG403", "critic-eats-clip-budget", "error",
        "the shared clip scales {role}'s gradient by {clip_coef:.2g} because the critic's gradient is "
        "{critic_ratio:.3g}x larger, and the actor stalls (update_ratio {update_ratio:.2g})",
        "actor and critic share one clip_grad_norm budget; the critic's gradient (large value loss, unscaled "
        "returns) dominates the joint norm, so the actor's share is clipped to almost nothing.",
        "Clip actor and critic separately (two clip calls or two optimizers), scale/normalise the returns or "
        "lower vf_coef.",
        checklist="step 2 (max_grad_norm) and the 'value_loss 700+' signal",
    ),
    Diagnosis(
        "PPG404", "value-owns-trunk", "warning",
        "the critic head sends {value_to_policy:.3g}x the actor head's gradient into the shared trunk ({role}), "
        "rollout after rollout ({rollouts} rollouts)",
        "In a network whose trunk feeds both heads, the trunk follows the sum of the two heads' gradients. With "
        "unscaled returns the value loss (700+ is typical) sends back thousands of times the policy term's gradient, "
        "so the trunk learns value features alone and keeps moving them under the policy head: the actor barely "
        "improves while the value loss stays large. The shares are measured at the heads' inputs "
        "(ppo_guard/shared/head_grad_policy, head_grad_value).",
        "Scale the value target: normalise returns (or rewards, e.g. gymnasium's NormalizeReward) or the value "
        "head's output; lower vf_coef; or give the actor and critic separate trunks (or clip each head's gradient "
        "separately).",
        checklist="value loss large, actor not moving",
    ),
    Diagnosis(
        "PPG405", "policy-gradient-below-eps", "error",
        "{role}'s gradient RMS is {grad_rms:.2g} per element, far below the optimizer's eps {eps:g}, so its steps "
        "are tiny (update_ratio {update_ratio:.2g}) whatever the lr (now {lr:g}); advantage std {adv_std:.2g}",
        "Adam-like optimizers divide the step by sqrt(v) + eps. When the gradient itself is far below eps, eps "
        "dominates and the step shrinks with the gradient, whatever the lr: raising the lr is not the fix. A "
        "gradient that small comes from the policy term's scale: advantages that are tiny and not normalised "
        "(rewards scaled far down, a stray factor like 1e-6), a policy loss multiplied by a tiny coefficient, or a "
        "loss averaged over a huge dimension. The checklist's test: scale the advantages x2-4 and the update "
        "scales with them.",
        "Normalise the advantages per minibatch ((adv - mean) / (std + 1e-8)) or find the factor that shrinks them "
        "(reward scale, loss coefficient); keep the optimizer's eps at 1e-8..1e-5.",
        checklist="step 2 (advantage scale)",
    ),
    Diagnosis(
        "PPG406", "critic-grad-zero", "error",
        "{role}'s gradient after backward is exactly 0 on {zero_steps} of {steps} measured steps, in {rollouts} "
        "consecutive rollouts: the value function does not learn",
        "A trainable critic held by the optimizer gets no gradient, so its values stay where they started and the "
        "advantages (GAE) carry its errors: the value loss stays large. Most often value clipping measured in "
        "unscaled return units: CleanRL's clip_vloss takes max(unclipped, clipped) with the clipped value held "
        "within clip_coef (0.2) of the rollout's value, so once returns are far from the values (rewards x100, "
        "returns in the hundreds) the clipped branch wins on every sample and its gradient is 0; the critic moves "
        "by clip_coef per rollout at most. Also: the value loss left out of the loss, vf_coef 0, or the critic's "
        "output detached.",
        "Normalise or scale the rewards/returns (gymnasium's NormalizeReward), or turn value clipping off "
        "(clip_vloss=False, as SB3's default) or widen it to the return scale; check that vf_coef * value_loss is "
        "in the loss that is back-propagated.",
        checklist="the 'value_loss 700+' signal",
    ),
    # ---------------------------------------------------------------- 5xx entropy
    Diagnosis(
        "PPG407", "zero-advantage-groups", "warning",
        "{share:.0%} of {role}'s groups got one reward for every sample (mean reward {reward:.3g}, not the best "
        "seen), on {rollouts} consecutive rollouts: their group-relative advantages are 0",
        "GRPO/RLOO advantages compare the samples of one prompt; when every sample of a group gets the same "
        "reward (all fail), the group's advantages are exactly 0 and it teaches nothing. Most of the rollout is "
        "wasted compute, and the policy learns from the few groups left, or not at all.",
        "Make the reward denser (partial credit) or the prompts easier for the current policy, sample more "
        "responses per prompt (a larger group), or drop the zero-spread groups and resample (DAPO's dynamic "
        "sampling); check that the reward function can reach its maximum.",
        checklist="'if still stuck': advantage signal",
    ),
    Diagnosis(
        "PPG501", "entropy-frozen-at-max", "error",
        "{role}'s entropy stays at {entropy_norm:.4f} of its maximum (drift {entropy_drift:.2g}) for "
        "{rollouts} rollouts while its parameters change",
        "The action distribution stays uniform although the parameters move: the logits are scaled towards 0 "
        "(a huge temperature, a multiplied-away head), or the distribution is built from something that "
        "does not depend on the parameters. The seed's 'entropy pinned at 3.698 = ln 40'.",
        "Build the Distribution from the actor's raw logits (no extra scaling) and check the head's output "
        "scale; watch dist.entropy().mean() move.",
        checklist="'if still stuck': entropy never changes",
    ),
    Diagnosis(
        "PPG502", "entropy-bonus-sign", "error",
        "the loss grows with {role}'s entropy (d loss / d entropy = +{slope:.3g}, summed over the minibatch, on "
        "{observes} consecutive observes): the entropy term is a penalty, not a bonus",
        "An entropy bonus is subtracted from the loss (loss = policy_loss - ent_coef * entropy.mean() + vf_coef * "
        "value_loss), so minimising the loss raises the entropy. Here the entropy tensor handed to observe gets a "
        "positive gradient in the backward: the loss penalises entropy, pushing the policy to determinism faster "
        "than the reward does (entropy keeps falling, exploration stops, a Gaussian's log_std heads towards -inf). "
        "Usually two sign conventions mixed: SB3's entropy_loss = -entropy.mean() with loss = ... - ent_coef * "
        "entropy_loss, or + ent_coef * entropy.mean(), or a negative ent_coef. Read from the graph, not from the "
        "entropy's trend: it needs observe(entropy=...) with the tensor the loss uses.",
        "Subtract the bonus once: loss = policy_loss - ent_coef * entropy.mean() + vf_coef * value_loss (or "
        "entropy_loss = -entropy.mean(); loss = policy_loss + ent_coef * entropy_loss), with ent_coef >= 0.",
        checklist="'if still stuck': entropy",
    ),
    Diagnosis(
        "PPG503", "entropy-collapsed", "warning",
        "{role}'s policy is deterministic and stopped moving: entropy {entropy_norm:.2g} of its maximum for "
        "{rollouts} rollouts (drift {entropy_drift:.2g})",
        "A categorical policy that puts all its mass on one action has a log-prob gradient (onehot - p) of ~0: "
        "the ratio stays 1 and approx_kl 0 however large the step, and nothing is explored again. Reached early, "
        "it is a collapse, not convergence: an lr or step far too large (often after approx_kl blew up, PPG303), "
        "an entropy penalty (PPG502) or logits scaled up, advantages not normalised with large returns.",
        "Lower the actor's lr / epochs, keep an entropy bonus (ent_coef 0.01) with the right sign, normalise "
        "advantages; restart from a checkpoint taken before the entropy fell.",
        checklist="'if still stuck': entropy",
    ),
    Diagnosis(
        "PPG504", "log-std-collapse", "error",
        "{role}'s Gaussian std fell to {std_ratio:.2g}x its start (mean log_std {log_std:.3g}, was {log_std0:.3g}) "
        "for {rollouts} rollouts",
        "A Gaussian policy explores through its std. A std 100x below its start has stopped exploring, and as it "
        "heads to 0 the log-prob of the stored actions grows without bound (-(a - mu)^2 / 2 std^2): ratios and "
        "gradients overflow and the run ends in NaN. Causes: an entropy penalty (the bonus's sign flipped, "
        "PPG502, or a negative ent_coef), a state-dependent log_std head without a clamp and a large lr, or "
        "advantages that reward shrinking the std (large unnormalised returns).",
        "Keep the entropy term a bonus (loss = ... - ent_coef * entropy.mean()), clamp a state-dependent log_std "
        "(e.g. to [-5, 2]) or use a state-independent parameter, normalise advantages; a lower lr for the log_std.",
        checklist="'if still stuck': entropy",
    ),
    # ---------------------------------------------------------------- 9xx numerics
    Diagnosis(
        "PPG901", "nonfinite-gradient", "error",
        "{role} has {tensors} parameter tensor(s) with NaN/Inf gradient at step {step}",
        "A NaN/Inf in the gradient poisons Adam's moments and then the weights.",
        "Find the first non-finite loss term (log of 0, division by a zero std, exploding value loss); clamp "
        "log-probs, add eps to std, clip gradients.",
    ),
    Diagnosis(
        "PPG902", "nonfinite-logp", "error",
        "{role}'s ratio/KL is not finite: approx_kl {approx_kl}",
        "new_logp or old_logp holds NaN/Inf (log of a zero probability, NaN logits), so the surrogate and its "
        "gradient are NaN.",
        "Use Categorical(logits=...) rather than log(probs); check the observations and logits for NaN.",
    ),
)

#: code -> Diagnosis, in catalog order.
CATALOG: dict[str, Diagnosis] = {d.code: d for d in _ALL}


def get(code_or_symbol: str) -> Diagnosis:
    """Look a diagnosis up by code (``PPG001``, case-insensitive) or symbol (``actor-not-in-optimizer``)."""
    key = code_or_symbol.strip()
    if key.upper() in CATALOG:
        return CATALOG[key.upper()]
    for diagnosis in CATALOG.values():
        if diagnosis.symbol == key.lower():
            return diagnosis
    raise KeyError(f"Unknown diagnosis {code_or_symbol!r}; known codes: {', '.join(CATALOG)}.")
