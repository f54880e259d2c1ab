"""``PPOGuard``: the monitor plus the rules, warning (or stopping) with a coded diagnosis when the actor stalls."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_ppo_guard._inputs import PolicyTerm
from lightning_ppo_guard._plan import COLUMNS
from lightning_ppo_guard._sharded import global_norms
from lightning_ppo_guard._warnings import PPOGuardWarning
from lightning_ppo_guard.config import GuardConfig
from lightning_ppo_guard.diagnoses import Finding, get
from lightning_ppo_guard.graph import logp_by_hand, reached_leaves
from lightning_ppo_guard.monitor import ObserveRecord, PPOMonitor, StepRecord
from lightning_ppo_guard.roles import PartsSpec, Role, RoleSpec
from lightning_ppo_guard.rules import CriticFacts, Diagnoser, ObserveFacts, StepFacts, WiringFacts
from lightning_ppo_guard.summary import Style, findings_table

__all__ = ["PPOGuard", "PPOGuardError"]

_GRAPH_WALK_ROLLOUTS = 8
_MAX_PENDING = 64  # records read in one transfer at the latest (bounds the delay of a finding and the memory)
OnStall = Literal["warn", "raise", "stop"]


@dataclass
class _GradCheck:
    """The gradient norms, at one step, of a role's tensors that new_logp's graph did not reach."""

    role: str
    step: int
    params: list[nn.Parameter]
    trainable: int
    norms: Tensor

    @classmethod
    def of(cls, record: StepRecord, params: list[nn.Parameter], trainable: int) -> _GradCheck:
        grads = [p.grad.coalesce().values() if p.grad is not None and p.grad.is_sparse else p.grad for p in params]
        with torch.no_grad():  # sharded (FSDP2) gradients: the global norm of each, not the local shard's
            norms = global_norms(grads, record.values.device)
        return cls(record.role, record.step, params, trainable, norms)


@dataclass
class _GradientSign:
    """A number the coming backward writes, by a hook on a tensor handed to ``observe`` (NaN until then, and if it
    never does: the loss does not use that tensor): ``kind="entropy"``, d loss / d entropy summed over the
    minibatch (PPG502); ``kind="policy"``, sum of d loss / d new_logp times the advantages (PPG107)."""

    kind: str
    role: str
    step: int
    value: Tensor
    weights: Tensor | None = None  # the advantages (policy kind), dropped once read

    @classmethod
    def hook(cls, kind: str, role: str, step: int, tensor: Tensor, weights: Tensor | None = None) -> _GradientSign:
        item = cls(kind, role, step, torch.full((), math.nan, device=tensor.device),
                   None if weights is None else weights.detach().reshape(-1).float())
        tensor.register_hook(item._read)
        return item

    def _read(self, grad: Tensor) -> None:
        g = grad.detach().float()
        self.value.copy_(g.sum() if self.weights is None else torch.dot(g.reshape(-1), self.weights))
        self.weights = None


_Pending = ObserveRecord | list[StepRecord] | _GradCheck | _GradientSign


def _tensors(item: _Pending) -> list[Tensor]:
    if isinstance(item, ObserveRecord):
        return [item.values] if item.values is not None else []
    if isinstance(item, _GradCheck):
        return [item.norms]
    if isinstance(item, _GradientSign):
        return [item.value.reshape(1)]
    return [record.values for record in item]


def _broadcast(term: PolicyTerm) -> tuple[str, tuple[int, ...], str, tuple[int, ...], tuple[int, ...]] | None:
    """The first pair of loss terms that a PPO loss combines and whose shapes broadcast into more elements:
    new_logp with old_logp and with the advantages (the ratio times the advantages), values with returns."""
    pairs = (("old_logp", term.old_logp, "new_logp", term.new_logp),
             ("advantages", term.advantages, "new_logp", term.new_logp),
             ("values", term.values, "returns", term.returns))
    for name, a, other, b in pairs:
        if a is None or b is None or a.shape == b.shape:
            continue
        try:
            shape = tuple(torch.broadcast_shapes(a.shape, b.shape))
        except RuntimeError:
            continue
        if math.prod(shape) > max(a.numel(), b.numel()):
            return name, tuple(a.shape), other, tuple(b.shape), shape
    return None


def _train_mode_layers(fit: Any, role: Role) -> str:
    """The role's layers that make its output differ between two forwards of the same input in train mode (dropout
    with p > 0, batch norm updating its statistics): a first ratio != 1 suspect, checked where it is observable."""
    found = []
    root = getattr(fit, "module", None)
    if not isinstance(root, nn.Module):
        return ""
    for part in role.modules(root):
        for name, m in part.named_modules():
            if not m.training:
                continue
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
                found.append(f"{name or type(part).__name__} ({type(m).__name__} p={m.p:g})")
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                found.append(f"{name or type(part).__name__} ({type(m).__name__} in train mode)")
    return ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")


def _head_ratio(v: dict[str, float]) -> float:
    """The critic head's gradient into a shared trunk over the actor head's (nan when not measured)."""
    policy, value = v.get("head_grad_policy", math.nan), v.get("head_grad_value", math.nan)
    if not (math.isfinite(policy) and math.isfinite(value)):
        return math.nan
    return value / policy if policy > 0 else (math.inf if value > 0 else math.nan)


class PPOGuardError(RuntimeError):
    """Raised by ``PPOGuard(on_stall="raise")`` when a run stalls; carries the findings."""

    def __init__(self, findings: list[Finding]) -> None:
        self.findings = findings
        super().__init__("PPO actor stalled:\n" + "\n".join(str(f) for f in findings))


@dataclass
class _Verdict:
    """What the guard concluded so far: saved in checkpoints, so a resumed run keeps its findings and decision."""

    findings: list[Finding] = field(default_factory=list)
    stall: bool = False  # an error-severity finding was named (on_stall acts on it at the batch end)
    rollouts_started: dict[str, int] = field(default_factory=dict)


class PPOGuard(PPOMonitor):
    r"""Measure like :class:`PPOMonitor`, and diagnose a PPO/MAPPO actor that is not learning.

    Each finding has a stable code (``PPG###``, see :data:`lightning_ppo_guard.CATALOG`), the role, the step,
    the numbers that support it, and the fix. Each code is reported once per role, on rank zero, as a
    :class:`PPOGuardWarning`; all findings are in :attr:`findings`, written to
    ``<log_dir>/ppo_guard_findings.json`` and summarised at the end of fit.

    Args:
        actors: the actor role(s), see :class:`PPOMonitor`.
        critic: the critic role, see :class:`PPOMonitor`.
        shared: a trunk both heads use, see :class:`PPOMonitor`; diagnosed with the actor's codes under role
            ``shared``, plus PPG404 when the value term's gradient swamps it.
        on_stall: what an error-severity finding does besides the warning: ``"warn"`` (nothing more),
            ``"stop"`` (the Trainer stops at the end of the batch; all ranks agree) or ``"raise"``
            (:class:`PPOGuardError` at the end of the batch, on every rank).
        ignore: codes or symbols never reported (e.g. ``["PPG106"]``).
        config: thresholds, see :class:`GuardConfig`.
        verbose: log the summary table of findings at the end of fit (rank zero).
        log_every_n_steps, dense_steps, measure_every_n_steps, prefix: see :class:`PPOMonitor`.
    """

    def __init__(
        self,
        actors: RoleSpec = None,
        critic: PartsSpec = None,
        *,
        shared: PartsSpec = None,
        on_stall: OnStall = "warn",
        ignore: Iterable[str] = (),
        config: GuardConfig | None = None,
        verbose: bool = True,
        log_every_n_steps: int | None = None,
        dense_steps: int = 16,
        measure_every_n_steps: int = 64,
        prefix: str = "ppo_guard",
    ) -> None:
        super().__init__(actors, critic, shared=shared, log_every_n_steps=log_every_n_steps, dense_steps=dense_steps,
                         measure_every_n_steps=measure_every_n_steps, prefix=prefix)
        if on_stall not in ("warn", "raise", "stop"):
            raise ValueError(f"on_stall must be 'warn', 'raise' or 'stop', got {on_stall!r}.")
        if config is not None and not isinstance(config, GuardConfig):
            raise TypeError(f"config must be a GuardConfig, got {type(config).__name__}.")
        if isinstance(ignore, str):
            ignore = [ignore]
        for item in ignore:
            if not isinstance(item, str):
                raise TypeError(f"ignore must hold codes or symbols (str), e.g. ['PPG106'], got {item!r}.")
        self.on_stall = on_stall
        self.verbose = verbose
        self.ignore = frozenset(get(item).code for item in ignore)
        self.config = config or GuardConfig()
        self.diagnoser = Diagnoser(self.config)
        self.verdict = _Verdict()
        self._pending: list[_Pending] = []  # waiting for the next host read
        self._walks: dict[str, int] = {}  # graph walks per role in this fit
        self._unreached: dict[str, list[nn.Parameter]] = {}  # role -> tensors new_logp's graph did not reach

    # ------------------------------------------------------------------ results
    @property
    def findings(self) -> list[Finding]:
        return self.verdict.findings

    def codes(self, role: str | None = None) -> set[str]:
        """The codes found so far (for one role, if given)."""
        return {f.code for f in self.findings if role is None or f.role == role}

    def summary(self, style: Style = "auto", width: int | None = None) -> str:
        """A readable table of the findings of this fit, one row per finding (see
        :func:`lightning_ppo_guard.summary.findings_table`)."""
        return findings_table(self.findings, optimizer_steps=self.optimizer_steps, observes=self.observes,
                              style=style, width=width)

    def _report(self, findings: list[Finding]) -> None:
        for finding in findings:
            if finding.code in self.ignore:
                continue
            if finding.rollout is None:  # a critic or trunk counts the rollouts of the actors it serves
                started = self.verdict.rollouts_started
                count = started.get(finding.role, max(started.values(), default=0))
                finding.rollout = max(count - 1, 0)
            self.verdict.findings.append(finding)
            rank_zero_warn(str(finding), category=PPOGuardWarning)
            if finding.severity == "error":
                self.verdict.stall = True

    # ------------------------------------------------------------------ engine overrides
    @override
    def _reset(self) -> None:
        super()._reset()
        self.diagnoser, self.verdict, self._pending, self._walks = Diagnoser(self.config), _Verdict(), [], {}
        self._unreached = {}

    @override
    def _detach(self) -> None:
        super()._detach()
        self._pending, self._unreached = [], {}

    @override
    def refresh(self) -> None:
        super().refresh()
        if self._fit is None:
            return
        step = self.current_step
        for role in self.roles:
            b = self.bindings.get(role.name)
            if b is not None:
                self._report(self.diagnoser.check_setup(
                    role.name, role.kind, step, binding=b.fraction, lr=b.lr, trainable=len(role.params),
                    frozen=len(role.frozen), stale_tensors=b.stale_tensors, frozen_parts=role.frozen_parts))

    @override
    def _roles_changed(self, roles: list[Role]) -> None:
        for role in roles:
            self._walks.pop(role.name, None)  # check the wiring again at its next observe

    @override
    def _observed(self, record: ObserveRecord, term: PolicyTerm | None, role: Role) -> None:
        if record.first_in_rollout:
            self.verdict.rollouts_started[role.name] = self.verdict.rollouts_started.get(role.name, 0) + 1
        if term is None:  # a rollout boundary only
            self._pending.append(record)
            if len(self._pending) > 1:
                self._process()
            return
        if len(self._pending) >= _MAX_PENDING:
            self._process()  # bounded: before this minibatch's backward, not inside an optimizer step
        new_logp, old_logp = term.new_logp, term.old_logp
        broadcast = _broadcast(term)
        # The graph walk runs at a role's first observe and again at the start of its first rollouts (a loop
        # that changes path after warm-up); a new_logp without grad is seen at every observe the guard keeps.
        walks = self._walks.get(role.name)
        check_graph = walks is None or (record.first_in_rollout and walks < _GRAPH_WALK_ROLLOUTS)
        if check_graph or old_logp.requires_grad or not new_logp.requires_grad or broadcast is not None:
            by_hand = ""
            if new_logp.requires_grad and check_graph:
                # the actor's tensors, and a shared trunk's: the policy term should reach both
                trunk = [r for r in self.roles if r.kind == "shared"]
                reached = reached_leaves(new_logp, role.ids.union(*(r.ids for r in trunk)))
                for r in (role, *trunk):
                    unreached = [p for p in r.params if id(p) not in reached]
                    if unreached:  # named only if they get no gradient at the step either (see _GradCheck)
                        self._unreached[r.name] = unreached
                by_hand = logp_by_hand(new_logp)
            facts = WiringFacts(logp_requires_grad=bool(new_logp.requires_grad),
                                old_requires_grad=bool(old_logp.requires_grad), by_hand=by_hand, broadcast=broadcast,
                                train_mode_layers=_train_mode_layers(self._fit, role) if check_graph else None)
            self._report(self.diagnoser.check_wiring(role.name, record.step, facts))
            if check_graph:
                self._walks[role.name] = (walks or 0) + 1
        self._pending.append(record)
        if record.first_in_rollout and len(self._pending) > 1:
            self._process()  # a rollout boundary: the previous rollout's rules run now
        if record.measured and (self._fit is None or self._fit.cadence.sampled_segment()):
            # the signs of the policy and entropy terms in the loss, read in the coming backward: wiring facts, so
            # at the measured observes of the rollouts whose first ratio is read too
            entropy, advantages = term.entropy, term.advantages
            if advantages is not None and new_logp.requires_grad and new_logp.numel() == advantages.numel():
                self._pending.append(_GradientSign.hook("policy", role.name, record.step, new_logp, advantages))
            if entropy is not None and entropy.requires_grad:
                self._pending.append(_GradientSign.hook("entropy", role.name, record.step, entropy))

    @override
    def _step_skipped(self, roles: list[str]) -> None:
        for role in self.actor_roles:
            if role.name in roles:
                self._report(self.diagnoser.check_skipped(role.name, self.current_step))

    @override
    def _stepped(self, records: list[StepRecord]) -> None:
        for record in records:
            unreached = self._unreached.pop(record.role, None)
            if unreached:
                self._pending.append(_GradCheck.of(record, unreached, len(self._role(record.role).params)))
        self._pending.append(records)  # read later, never inside the optimizer step (see _observed)

    def _maximizes(self, role: str) -> bool:
        binding, fit = self.bindings.get(role), self._fit
        if binding is None or fit is None:
            return False
        optimizers = fit.trainer.optimizers
        return any(optimizers[i].param_groups[j].get("maximize", False) for i, j in binding.groups)

    def _role(self, name: str) -> Role:
        return next(r for r in self.roles if r.name == name)

    def _process(self, extra: list[Tensor] | None = None) -> list[float]:
        """Read every pending record to the host in one transfer (with ``extra``, whose values it returns) and
        run their rules, in the order they came.

        Called at rollout boundaries, batch ends in manual optimization, logged rows (riding on the row's own
        transfer), the end of training and every 64 pending records: never once per optimizer step, so a GPU is
        not stalled at each step.
        """
        pending, self._pending = self._pending, []
        if not pending:
            return super()._to_host(extra) if extra else []
        parts = [t for item in pending for t in _tensors(item)]
        flat = super()._to_host(parts + (extra or []))
        extra_values = flat[sum(t.numel() for t in parts):]
        names = self.layout.observe_names if self.layout is not None else ()
        at = 0
        for item in pending:
            if isinstance(item, ObserveRecord) and item.values is None:
                self._check_observe(item, {}, boundary_only=True)
            elif isinstance(item, ObserveRecord):
                self._check_observe(item, dict(zip(names, flat[at:at + len(names)], strict=True)))
                at += len(names)
            elif isinstance(item, _GradientSign):
                d = self.diagnoser
                check = d.check_entropy_sign if item.kind == "entropy" else d.check_gradient_sign
                # an optimizer built with maximize=True ascends the loss: the signs are the other way round
                self._report(check(item.role, item.step, -flat[at] if self._maximizes(item.role) else flat[at]))
                at += 1
            elif isinstance(item, _GradCheck):
                norms = flat[at:at + len(item.params)]
                at += len(item.params)
                missing = sum(1 for n in norms if n == 0.0)
                self._report(self.diagnoser.check_unreached(item.role, item.step, missing=missing,
                                                            unreached=len(norms), trainable=item.trainable))
            else:
                steps = {}
                for record in item:
                    steps[record.role] = dict(zip(COLUMNS, flat[at:at + len(COLUMNS)], strict=True))
                    at += len(COLUMNS)
                self._check_steps(item, steps)
        return extra_values

    def _check_steps(self, records: list[StepRecord], steps: dict[str, dict[str, float]]) -> None:
        critic = next((r.name for r in self.roles if r.kind == "critic"), None)
        critic_vals = steps.get(critic) if critic else None
        for record in records:
            role = self._role(record.role)
            v, b = steps[record.role], self.bindings[record.role]
            if not role.moves:
                self._report(self.diagnoser.check_critic_step(record.role, record.step, CriticFacts(
                    grad_norm=v["grad_norm"], binding=b.fraction, lr_max=record.groups.lr_max,
                    segment=record.segment)))
                continue
            critic_norm = math.nan  # the critic's norm, when it shares the clip (same coefficient)
            if critic_vals is not None and abs(critic_vals["clip_coef"] - v["clip_coef"]) <= 1e-3 * max(
                    abs(v["clip_coef"]), 1e-12):
                critic_norm = critic_vals["grad_norm"]
            facts = StepFacts(
                grad_norm=v["grad_norm"], grad_norm_clipped=v["grad_norm_clipped"], clip_coef=v["clip_coef"],
                nonzero_frac=v["grad_nonzero_frac"], grad_none=record.grad_none, trainable_tensors=len(role.params),
                nonfinite=v["grad_nonfinite"], update_norm=v["update_norm"], update_ratio=v["update_ratio"],
                binding=b.fraction, lr=record.groups.lr, critic_grad_norm=critic_norm, lr_max=record.groups.lr_max,
                segment=record.segment, fraction=record.fraction, opt_eps=record.groups.eps,
                trainable_numel=role.numel, policy=role.kind == "actor", head_ratio=_head_ratio(v),
            )
            self._report(self.diagnoser.check_step(record.role, record.step, facts))

    def _check_observe(self, record: ObserveRecord, v: dict[str, float], boundary_only: bool = False) -> None:
        nan = math.nan
        facts = ObserveFacts(
            approx_kl=v.get("approx_kl", nan), ratio_dev=v.get("ratio_dev", nan), adv_mean=v.get("adv_mean", nan),
            adv_std=v.get("adv_std", nan), entropy_norm=v.get("entropy_norm", nan),
            entropy_drift=v.get("entropy_drift", nan), boundary_only=boundary_only,
            first_in_rollout=record.first_in_rollout, rollout=record.rollout, target_kl=record.target_kl,
            prev_updates=record.prev_updates, samples=record.samples, adv_given=record.adv_given,
            precision_eps=record.precision_eps, clip_fraction=v.get("clip_fraction", nan), inferred=record.inferred,
            log_std=v.get("log_std", nan),
            prev_observes=record.prev_observes,
        )
        self._report(self.diagnoser.check_observe(record.role, record.step, facts))

    @override
    def _to_host(self, parts: list[Tensor]) -> list[float]:
        """A logged row's transfer carries the pending records too (one read for both)."""
        return self._process(parts)

    @override
    def _write_row(self) -> None:
        super()._write_row()
        self._process()  # a row with nothing measured made no transfer: a read point all the same

    # ------------------------------------------------------------------ decisions, agreed across ranks
    @override
    def _batch_end(self) -> None:
        super()._batch_end()  # skipped steps, the row
        fit = self._fit
        if fit is None:
            return
        if fit.manual:
            self._process()  # a manual-optimization batch is usually a whole PPO iteration
        if self.on_stall == "warn":
            return
        # Every rank calls this collective at every batch end, so no rank waits on another.
        if not fit.trainer.strategy.reduce_boolean_decision(self.verdict.stall, all=False):
            return
        errors = [f for f in self.findings if f.severity == "error"]
        if self.on_stall == "stop":
            fit.trainer.should_stop = True
            rank_zero_info(f"PPOGuard stopped the run: {', '.join(f'{f.code}[{f.role}]' for f in errors)}")
        else:
            raise PPOGuardError(errors)

    @override
    def _train_end(self) -> None:
        self._process()
        fit = self._fit
        super()._train_end()
        if fit is None:
            return
        trainer = fit.trainer
        # trainer.log_dir broadcasts from rank zero under DDP: every rank must read it, not rank zero alone.
        log_dir = trainer.log_dir if trainer.loggers else None
        if trainer.is_global_zero:
            if self.verbose:
                rank_zero_info(self.summary())
            # Next to the first logger's files; with logger=False nothing is written to the working directory.
            if log_dir:
                os.makedirs(log_dir, exist_ok=True)
                with open(os.path.join(log_dir, "ppo_guard_findings.json"), "w") as fh:
                    json.dump([f.as_dict() for f in self.findings], fh, indent=2, default=str)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "diagnoser": self.diagnoser.state_dict(),
            "findings": [{"code": f.code, "role": f.role, "step": f.step, "evidence": f.evidence,
                          "rollout": f.rollout} for f in self.findings],
            "stall": self.verdict.stall,
            "rollouts_started": dict(self.verdict.rollouts_started),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.diagnoser.load_state_dict(state_dict.get("diagnoser", {}))
        findings = [Finding(**f) for f in state_dict.get("findings", [])]
        stall = bool(state_dict.get("stall", any(f.severity == "error" for f in findings)))
        self.verdict = _Verdict(findings, stall, dict(state_dict.get("rollouts_started", {})))
