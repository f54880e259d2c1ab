"""The guard's listener: turn what the engine measured into findings, with the rules of
:class:`~lightning_ppo_guard.rules.Diagnoser`.

:class:`Diagnostics` is a :class:`~lightning_ppo_guard.engine.Listener`: it holds the engine's records until a read
point (a rollout boundary, a logged row, a manual batch's end, training's end, or 64 pending records), reads them
to the host in one transfer (the row's own, when there is one), runs the rules on the named values and reports the
findings. It is Lightning-free: the adapters (:class:`~lightning_ppo_guard.PPOGuard`,
:class:`~lightning_ppo_guard.FabricGuard`) inject how a warning reaches the user and act on the verdict
(:meth:`Diagnostics.agreed_stall`).

Where a read happens, never inside an optimizer step: so a GPU is not stalled at each step.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ppo_guard._inputs import PolicyTerm
from lightning_ppo_guard._plan import COLUMNS
from lightning_ppo_guard._sharded import fingerprints, global_norms
from lightning_ppo_guard.config import GuardConfig
from lightning_ppo_guard.diagnoses import CATALOG, Finding
from lightning_ppo_guard.engine import MonitorEngine, ObserveRecord, StepRecord
from lightning_ppo_guard.functional import flat
from lightning_ppo_guard.graph import logp_by_hand, reached_leaves, watch_gradient
from lightning_ppo_guard.metrics import OBSERVE_METRICS
from lightning_ppo_guard.roles import Role
from lightning_ppo_guard.rules import CriticFacts, Diagnoser, ObserveFacts, StepFacts, WiringFacts, from_fields

__all__ = ["Diagnostics", "GradCheck", "GradientSign", "Verdict", "broadcast_pair", "head_ratio", "train_mode_layers"]

GRAPH_WALK_ROLLOUTS = 3  # the graph walk runs at a role's first observe and at its first rollouts' starts (a wiring
# fact: the path from the loss to the parameters; a loop that cuts it later is named by the step rules)
MAX_PENDING = 64  # records read in one transfer at the latest (bounds the delay of a finding and the memory)


@dataclass
class GradCheck:
    """The gradient norms, at one step, of a role's tensors that new_logp's graph did not reach, and the tensors'
    own fingerprints then (:func:`~lightning_ppo_guard._sharded.fingerprints`)."""

    role: str
    step: int
    params: list[nn.Parameter]
    trainable: int
    norms: Tensor
    weights: Tensor  # [2, n]: each tensor's norm and sum at that step
    segment: int | None = None
    # read back (``Diagnostics.process``): the tensors with no gradient at the step, and each tensor's (norm, sum)
    zero: list[int] | None = None
    before: list[tuple[float, float]] = field(default_factory=list)

    @classmethod
    def of(cls, record: StepRecord, params: list[nn.Parameter], trainable: int) -> GradCheck:
        grads = [p.grad.coalesce().values() if p.grad is not None and p.grad.is_sparse else p.grad for p in params]
        device = record.values.device
        with torch.no_grad():  # sharded (FSDP2) gradients: the global norm of each, not the local shard's
            norms = global_norms(grads, device)
            weights = fingerprints([p.coalesce().values() if p.is_sparse else p for p in params], device)
        return cls(record.role, record.step, params, trainable, norms, weights, record.segment)


@dataclass
class MoveCheck:
    """The second look at a :class:`GradCheck`'s tensors, at a measured step of a later rollout: their fingerprints
    now. PPG102 names those that got no gradient at the first step and did not move since either; an auxiliary
    head trained at other steps than the policy's (an auxiliary phase after each rollout, an aux loss stepped on its
    own) gets its gradient there, and moves. Taken at every second look whatever the first one read, so that the
    collective a sharded fingerprint needs runs on every rank at the same step."""

    check: GradCheck
    step: int
    weights: Tensor


def _moved(before: tuple[float, float], now: tuple[float, float], numel: int) -> bool:
    """Whether a tensor changed by more than a weight decay (which scales its norm and its sum by one factor)."""
    (n0, s0), (n1, s1) = before, now
    if n0 == n1 and s0 == s1:
        return False
    if numel == 1 or n0 <= 0.0:  # a scalar's change is always a scaling: any change counts
        return True
    scale = n1 / n0
    return abs(s1 - scale * s0) > 1e-5 * (abs(s1) + abs(scale * s0)) + 1e-12 * n1


#: What each kind of :class:`GradientSign` writes (its ``value``, in this order).
SIGN_FIELDS: dict[str, tuple[str, ...]] = {
    "entropy": ("slope",),
    "policy": ("alignment", "own", "shared", "kl_align"),
    "value": ("own", "shared", "spread"),
}


@dataclass
class GradientSign:
    """Numbers the coming backward writes, by a hook on a tensor handed to ``observe`` (NaN until then, and if it
    never does: the loss does not use that tensor). The kinds and their fields (:data:`SIGN_FIELDS`):

    * ``"entropy"``: ``slope``, d loss / d entropy summed over the minibatch (PPG502);
    * ``"policy"``: ``alignment``, sum of d loss / d new_logp times the advantages (PPG107); ``own``, the cosine of
      that gradient with -advantages (each sample's gradient follows its own advantage, as in every policy-gradient
      loss); ``shared``, its cosine with a constant (what a loss whose (B,) and (B, 1) terms broadcast to (B, B)
      gives: every sample's gradient is the ratio times the *mean* advantage) (PPG104); ``kl_align``, with a
      reference model's log-probs, its cosine with the gradient of a KL penalty to the reference
      (``1 - exp(ref_logp - new_logp)``, the k3 estimator's; k2's ``new_logp - ref_logp`` near the reference): near 1
      when the penalty, not the advantages, drives the update (PPG304);
    * ``"value"``: ``own``, the cosine of d loss / d values with values - returns (a per-sample value loss);
      ``shared``, with values - mean(returns) (a value loss broadcast to (B, B)); ``spread``, the relative spread of
      the gradient's magnitudes (0: a saturated Huber loss, whose sign-only gradient fits both) (PPG104).
    """

    kind: str
    role: str
    step: int
    value: Tensor | None = None  # what the backward wrote (None until then: NaN when read back)
    weights: Tensor | None = None  # the advantages (policy kind) or values - returns (value kind), dropped once read
    alt: Tensor | None = None  # values - mean(returns) (value kind); the KL penalty's gradient (policy kind)

    @classmethod
    def hook(cls, kind: str, role: str, step: int, tensor: Tensor, weights: Tensor | None = None,
             alt: Tensor | None = None) -> GradientSign:
        item = cls(kind, role, step, None, None if weights is None else flat(weights.detach()),
                   None if alt is None else flat(alt.detach()))
        watch_gradient(tensor, item.read)  # at the tensor the loss uses, for a view, selection or copy of it
        return item

    def read(self, grad: Tensor) -> None:
        """The tensor hook: write the numbers from the gradient the backward produced."""
        g = flat(grad.detach() if grad.requires_grad else grad)  # create_graph=True: a gradient with a graph
        if self.kind == "entropy":
            self.value = g.sum().reshape(1)
        elif self.kind == "policy" and self.weights is not None:
            w, g_norm = self.weights, g.norm()
            dot = torch.dot(g, w)
            kl = (torch.dot(g, self.alt) / (g_norm * self.alt.norm()) if self.alt is not None
                  else g_norm.new_full((), math.nan))
            self.value = torch.stack((dot, -dot / (g_norm * w.norm()), g.sum().abs() / (g_norm * g.numel() ** 0.5), kl))
        elif self.kind == "value" and self.weights is not None and self.alt is not None:
            g_norm, mag = g.norm(), g.abs()
            hi = mag.max()
            self.value = torch.stack((torch.dot(g, self.weights) / (g_norm * self.weights.norm()),
                                      torch.dot(g, self.alt) / (g_norm * self.alt.norm()), (hi - mag.min()) / hi))
        self.weights = self.alt = None

    def written(self) -> Tensor:
        """What the backward wrote, or NaN for each field where it never did (the loss does not use the tensor)."""
        if self.value is None:
            self.value = torch.full((len(SIGN_FIELDS[self.kind]),), math.nan)
        return self.value

    def fields(self, values: list[float]) -> dict[str, float]:
        return dict(zip(SIGN_FIELDS[self.kind], values, strict=True))


Pending = ObserveRecord | list[StepRecord] | GradCheck | MoveCheck | GradientSign


#: without rollouts, the optimizer steps after which untrained tensors are looked at again
UNTRAINED_STEPS = 64


def _later(check: GradCheck, record: StepRecord) -> bool:
    """Whether ``record`` comes late enough to look again at ``check``'s tensors: in a later rollout (an auxiliary
    phase runs between the policy phases), or ``UNTRAINED_STEPS`` steps later where rollouts are unknown."""
    if check.segment is not None and record.segment is not None:
        return record.segment != check.segment
    return record.step >= check.step + UNTRAINED_STEPS


def _tensors(item: Pending) -> list[Tensor]:
    if isinstance(item, ObserveRecord):
        return [item.values] if item.values is not None else []
    if isinstance(item, GradCheck):
        return [item.norms, item.weights.reshape(-1)]
    if isinstance(item, MoveCheck):
        return [item.weights.reshape(-1)]
    if isinstance(item, GradientSign):
        return [item.written()]
    return [record.values for record in item]


#: (name, its shape, the other name, its shape, the shape they broadcast to)
Broadcast = tuple[str, tuple[int, ...], str, tuple[int, ...], tuple[int, ...]]

_SHAPES_ONLY = ("{pair[0]} has shape {pair[1]} and {pair[2]} {pair[3]}, which would broadcast to {pair[4]} if the "
                "loss combined them as they are; shapes alone are no evidence (TorchRL keeps advantages (B, 1) and "
                "unsqueezes its log-ratio), and the gradient that would be cannot be read without advantages= and a "
                "new_logp that requires grad. Pass them, or reshape the inputs to one value per sample.")
_WINDOWS = ("observe() gets no rollout id, and the loop shows no rollout boundary (automatic optimization, or one "
            "minibatch per training batch): the rollout-level rules judge windows of 16 measured observes (at the "
            "default cadence 256 to 1,024 steps: named late), and PPG105 (the "
            "first ratio of a rollout), PPG108 (old log-probs from the current policy) and PPG302 (an early stop at "
            "its first check) cannot be judged. Pass rollout= (the PPO iteration number, e.g. "
            "rollout=int(batch['rollout'])).")
_UNREAD = {
    "policy": ("PPG107", "the new_logp handed to observe() got no gradient in {n} backward passes: the loss uses "
               "another tensor (a copy such as new_logp[mask], new_logp.float(), or a log-prob recomputed for "
               "observe), so the policy term's sign (PPG107) and whether the loss broadcasts (PPG104) cannot be "
               "read. Pass observe() the very tensor the loss uses (a slice or view of it is fine)."),
    "entropy": ("PPG502", "the entropy handed to observe() got no gradient in {n} backward passes: the loss has no "
                "entropy term (ent_coef 0: then nothing is wrong) or uses another tensor (a copy, or an entropy "
                "recomputed for observe), so the entropy term's sign (PPG502) cannot be read. Pass the entropy tensor "
                "the loss uses (a slice or view of it is fine), or leave entropy= out when there is no bonus."),
    "value": ("PPG104", "the values handed to observe() got no gradient in {n} backward passes: the value loss uses "
              "another tensor, so whether it broadcasts values against returns (PPG104) cannot be read. Pass the "
              "values tensor the value loss uses."),
}


#: The logged observe statistics the rules read: every field of ObserveFacts named as one (NaN when not measured).
_OBSERVE_FACTS = tuple(f.name for f in dataclasses.fields(ObserveFacts)
                       if f.name in {spec.name for spec in OBSERVE_METRICS})


def broadcast_pair(term: PolicyTerm) -> Broadcast | None:
    """The first pair of loss terms that a PPO loss combines and whose shapes broadcast into more elements:
    new_logp with old_logp and with the advantages (the ratio times the advantages), values with returns."""
    # a log_ratio handed over is the loss's own: it combined new_logp and old_logp already (TorchRL: (B, 1) and (B,))
    pairs = (("old_logp", term.old_logp if term.log_ratio is None else None, "new_logp", term.new_logp),
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


def train_mode_layers(root: Any, role: Role) -> str:
    """The role's layers that make its output differ between two forwards of the same input in train mode (dropout
    with p > 0, batch norm updating its statistics): a first ratio != 1 suspect, checked where it is observable."""
    found = []
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


def head_ratio(v: dict[str, float]) -> float:
    """The critic head's gradient into a shared trunk over the actor head's (nan when not measured)."""
    policy, value = v.get("head_grad_policy", math.nan), v.get("head_grad_value", math.nan)
    if not (math.isfinite(policy) and math.isfinite(value)):
        return math.nan
    return value / policy if policy > 0 else (math.inf if value > 0 else math.nan)


@dataclass
class Verdict:
    """What the guard concluded so far: saved in checkpoints, so a resumed run keeps its findings and decision."""

    findings: list[Finding] = field(default_factory=list)
    stall: bool = False  # an error-severity finding was named (on_stall acts on it at the batch end)
    rollouts_started: dict[str, int] = field(default_factory=dict)
    #: what the guard could not read ({"role", "rule", "step", "message"}): said once, no finding
    notices: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {
            "notices": [dict(n) for n in self.notices],
            "findings": [{"code": f.code, "role": f.role, "step": f.step, "evidence": f.evidence,
                          "rollout": f.rollout} for f in self.findings],
            "stall": self.stall,
            "rollouts_started": dict(self.rollouts_started),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Verdict:
        findings = [from_fields(Finding, f) for f in state.get("findings", []) if f.get("code") in CATALOG]
        stall = bool(state.get("stall", any(f.severity == "error" for f in findings)))
        notices = [dict(n) for n in state.get("notices", []) if isinstance(n, dict)]
        return cls(findings, stall, dict(state.get("rollouts_started", {})), notices)


class Diagnostics:
    """Run the rules on the engine's records and report the findings (a :class:`~lightning_ppo_guard.engine.Listener`).

    Args:
        config: the thresholds.
        ignore: codes never reported.
        warn: how a finding reaches the user (the Lightning adapters pass ``rank_zero_warn`` with
            :class:`~lightning_ppo_guard.PPOGuardWarning`).
    """

    def __init__(self, config: GuardConfig, ignore: frozenset[str], warn: Callable[[str], None]) -> None:
        self.config, self.ignore, self.warn = config, ignore, warn
        self.engine: MonitorEngine | None = None
        self.diagnoser = Diagnoser(config)
        self.verdict = Verdict()
        self.pending: list[Pending] = []  # waiting for the next host read
        self.walks: dict[str, int] = {}  # graph walks per role in this fit
        self.unreached: dict[str, list[nn.Parameter]] = {}  # role -> tensors new_logp's graph did not reach
        self.looks: dict[str, GradCheck] = {}  # role -> the check whose tensors are looked at again (MoveCheck)
        self.suspects: dict[str, Broadcast] = {}  # role -> a pair of observe's inputs whose shapes could broadcast
        self.readable: set[str] = set()  # "role:kind" of the hooks that fired at least once
        self.unread: dict[str, int] = {}  # ... and of those that never did: consecutive reads without a gradient

    def bind(self, engine: MonitorEngine) -> None:
        """The engine whose records this reads (it was built with this listener)."""
        self.engine = engine

    def _engine(self) -> MonitorEngine:
        if self.engine is None:
            raise RuntimeError("Diagnostics.bind(engine) was not called.")
        return self.engine

    # ------------------------------------------------------------------ results
    @property
    def findings(self) -> list[Finding]:
        return self.verdict.findings

    def report(self, findings: list[Finding]) -> None:
        for finding in findings:
            if finding.code in self.ignore:
                continue
            if finding.rollout is None:  # a critic or trunk counts the rollouts of the actors it serves
                started = self.verdict.rollouts_started
                count = started.get(finding.role, max(started.values(), default=0))
                finding.rollout = max(count - 1, 0)
            self.verdict.findings.append(finding)
            self.warn(str(finding))
            if finding.severity == "error":
                self.verdict.stall = True

    def agreed_stall(self, strategy: Any) -> bool:
        """Whether any rank named a stall (an error-severity finding): a collective (``reduce_boolean_decision``
        of the Trainer's or Fabric's strategy), so every rank must call it at the same point (each batch end).
        A rank that ignores the code, or saw nothing, still gets ``True`` when another rank named it."""
        return bool(strategy.reduce_boolean_decision(self.verdict.stall, all=False))

    @property
    def errors(self) -> list[Finding]:
        """This rank's error-severity findings (may be empty on a rank that agreed to another's stall)."""
        return [f for f in self.findings if f.severity == "error"]

    # ------------------------------------------------------------------ the listener
    def reset(self) -> None:
        self.diagnoser, self.verdict, self.pending, self.walks, self.unreached, self.looks = (
            Diagnoser(self.config), Verdict(), [], {}, {}, {})
        self.suspects, self.readable, self.unread = {}, set(), {}

    def detached(self) -> None:
        self.pending, self.unreached, self.looks = [], {}, {}

    def refreshed(self) -> None:
        engine = self._engine()
        if engine.fit is None:
            return
        step = engine.current_step
        for role in engine.roles:
            b = engine.bindings.get(role.name)
            if b is not None:
                self.report(self.diagnoser.check_setup(
                    role.name, role.kind, step, binding=b.fraction, lr=b.lr, trainable=len(role.params),
                    frozen=len(role.frozen), stale_tensors=b.stale_tensors, frozen_parts=role.frozen_parts,
                    lazy=role.lazy))

    def roles_changed(self, roles: list[Role]) -> None:
        for role in roles:
            self.walks.pop(role.name, None)  # check the wiring again at its next observe

    def observed(self, record: ObserveRecord, term: PolicyTerm | None, role: Role) -> None:
        engine = self._engine()
        if record.first_in_rollout:
            self.verdict.rollouts_started[role.name] = self.verdict.rollouts_started.get(role.name, 0) + 1
        if term is None:  # a rollout boundary only
            self.pending.append(record)
            if len(self.pending) > 1:
                self.process()
            return
        if record.rollout is None and not record.inferred:  # no rollout id, and no batch taken as a rollout
            self.notice(role.name, "rollout=", record.step, _WINDOWS)
        if len(self.pending) >= MAX_PENDING:
            self.process()  # bounded: before this minibatch's backward, not inside an optimizer step
        new_logp, old_logp = term.new_logp, term.old_logp
        broadcast = broadcast_pair(term)
        # The graph walk runs at a role's first observe and again at the start of its first rollouts (a loop
        # that changes path after warm-up); a new_logp without grad is seen at every observe the guard keeps.
        walks = self.walks.get(role.name)
        check_graph = walks is None or (record.first_in_rollout and walks < GRAPH_WALK_ROLLOUTS)
        if broadcast is not None:  # a pair of shapes that could broadcast: the gradient tells whether the loss does
            self.suspects[role.name] = broadcast
        if check_graph or old_logp.requires_grad or not new_logp.requires_grad:
            by_hand = ""
            if new_logp.requires_grad and check_graph:
                # the actor's tensors, and a shared trunk's: the policy term should reach both
                trunk = [r for r in engine.roles if r.kind == "shared"]
                reached = reached_leaves(new_logp, role.ids.union(*(r.ids for r in trunk)))
                for r in (role, *trunk):
                    unreached = [p for p in r.params if id(p) not in reached]
                    if unreached:  # named only if they get no gradient at the step either (see GradCheck)
                        self.unreached[r.name] = unreached
                by_hand = logp_by_hand(new_logp)
            root = engine.fit.module if engine.fit is not None else None
            facts = WiringFacts(logp_requires_grad=bool(new_logp.requires_grad),
                                old_requires_grad=bool(old_logp.requires_grad), by_hand=by_hand,
                                train_mode_layers=train_mode_layers(root, role) if check_graph else None)
            self.report(self.diagnoser.check_wiring(role.name, record.step, facts))
            if check_graph:
                self.walks[role.name] = (walks or 0) + 1
        self.pending.append(record)
        if record.first_in_rollout and len(self.pending) > 1:
            self.process()  # a rollout boundary: the previous rollout's rules run now
        if record.measured and (engine.fit is None or engine.fit.cadence.sampled_segment()):
            # the signs of the policy and entropy terms in the loss, read in the coming backward: wiring facts, so
            # at the measured observes of the rollouts whose first ratio is read too
            entropy, advantages, values, returns = term.entropy, term.advantages, term.values, term.returns
            if advantages is not None and new_logp.requires_grad and new_logp.numel() == advantages.numel():
                ref = term.ref_logp
                pull = (None if ref is None or ref.numel() != new_logp.numel() else
                        -torch.expm1(ref.detach().reshape(-1).float() - new_logp.detach().reshape(-1).float()))
                self.pending.append(GradientSign.hook("policy", role.name, record.step, new_logp, advantages, pull))
            if entropy is not None and entropy.requires_grad:
                self.pending.append(GradientSign.hook("entropy", role.name, record.step, entropy))
            if broadcast is not None and broadcast[0] == "values" and values is not None and returns is not None \
                    and values.requires_grad:
                v, ret = values.detach().reshape(-1).float(), returns.detach().reshape(-1).float()
                self.pending.append(GradientSign.hook("value", role.name, record.step, values, v - ret,
                                                      v - ret.mean()))
            elif broadcast is not None and (advantages is None or not new_logp.requires_grad):
                self.notice(role.name, "PPG104", record.step, _SHAPES_ONLY.format(pair=broadcast))

    def step_skipped(self, roles: list[str]) -> None:
        engine = self._engine()
        for role in engine.actor_roles:
            if role.name in roles:
                self.report(self.diagnoser.check_skipped(role.name, engine.current_step))

    def stepped(self, records: list[StepRecord]) -> None:
        engine = self._engine()
        for record in records:
            look = self.looks.get(record.role)
            if look is not None and _later(look, record):  # decided from step records alone: the same on every rank
                del self.looks[record.role]
                with torch.no_grad():
                    weights = fingerprints(look.params, record.values.device)
                self.pending.append(MoveCheck(look, record.step, weights))
            unreached = self.unreached.pop(record.role, None)
            if unreached:
                check = GradCheck.of(record, unreached, len(engine.role(record.role).params))
                self.pending.append(check)
                self.looks.setdefault(record.role, check)
        self.pending.append(records)  # read later, never inside the optimizer step (see observed)

    def read(self, parts: list[Tensor]) -> list[float]:
        """A logged row's transfer carries the pending records too (one read for both)."""
        return self.process(parts)

    def row_written(self) -> None:
        self.process()  # a row with nothing measured made no transfer: a read point all the same

    def batch_ended(self) -> None:
        if self.pending:  # a manual-optimization batch is usually a whole PPO iteration: a read point
            fit = self._engine().fit
            if fit is not None and fit.manual:
                t0 = time.perf_counter()
                self.process()
                fit.cadence.charge(t0)  # measured work, for the overhead budget

    def train_ended(self) -> None:
        self.process()

    # ------------------------------------------------------------------ reading and the rules
    def maximizes(self, role: str) -> bool:
        """Whether an optimizer of ``role`` is built with ``maximize=True`` (it ascends the loss)."""
        engine = self._engine()
        binding, fit = engine.bindings.get(role), engine.fit
        if binding is None or fit is None:
            return False
        optimizers = fit.trainer.optimizers
        return any(optimizers[i].param_groups[j].get("maximize", False) for i, j in binding.groups)

    def process(self, extra: list[Tensor] | None = None) -> list[float]:
        """Read every pending record to the host in one transfer (with ``extra``, whose values it returns) and
        run their rules, in the order they came.

        Called at rollout boundaries, batch ends in manual optimization, logged rows (riding on the row's own
        transfer), the end of training and every 64 pending records: never once per optimizer step, so a GPU is
        not stalled at each step.
        """
        engine = self._engine()
        pending, self.pending = self.pending, []
        if not pending:
            return engine.transfer(extra) if extra else []
        parts = [t for item in pending for t in _tensors(item)]
        flat = engine.transfer(parts + (extra or []))
        extra_values = flat[sum(t.numel() for t in parts):]
        names = engine.fit.layout.observe_names if engine.fit is not None else ()
        at = 0
        for item in pending:
            if isinstance(item, ObserveRecord) and item.values is None:
                self.check_observe(item, {}, boundary_only=True)
            elif isinstance(item, ObserveRecord):
                self.check_observe(item, dict(zip(names, flat[at:at + len(names)], strict=True)))
                at += len(names)
            elif isinstance(item, GradientSign):
                n = len(SIGN_FIELDS[item.kind])
                self.check_sign(item, flat[at:at + n])
                at += n
            elif isinstance(item, GradCheck):
                n = len(item.params)
                norms, weights = flat[at:at + n], flat[at + n:at + 3 * n]
                at += 3 * n
                # judged at the second look (MoveCheck): an auxiliary head trained at other steps moves in between
                item.zero = [k for k, g in enumerate(norms) if g == 0.0]
                item.before = [(weights[k], weights[n + k]) for k in range(n)]
            elif isinstance(item, MoveCheck):
                c, n = item.check, len(item.check.params)
                now = flat[at:at + 2 * n]
                at += 2 * n
                stuck = [k for k in (c.zero or [])
                         if not _moved(c.before[k], (now[k], now[n + k]), c.params[k].numel())]
                if stuck:  # no gradient at the step, and nothing moved them by a later rollout either
                    self.report(self.diagnoser.check_unreached(c.role, item.step, missing=len(stuck), unreached=n,
                                                               trainable=c.trainable))
            else:
                steps = {}
                for record in item:
                    steps[record.role] = dict(zip(COLUMNS, flat[at:at + len(COLUMNS)], strict=True))
                    at += len(COLUMNS)
                self.check_steps(item, steps)
        return extra_values

    def check_sign(self, item: GradientSign, values: list[float]) -> None:
        """The rules on what a backward wrote through a hook, and a one-time notice when it never writes."""
        v, d, role = item.fields(values), self.diagnoser, item.role
        key = f"{role}:{item.kind}"
        read = math.isfinite(next(iter(v.values())))
        if read:
            self.readable.add(key)
            self.unread.pop(key, None)
        elif key not in self.readable:
            self.unread[key] = self.unread.get(key, 0) + 1
            if self.unread[key] >= self.config.unreadable_observes and not d.rooted(role):
                rule, text = _UNREAD[item.kind]
                self.notice(role, rule, item.step, text.format(role=role, n=self.unread[key]))
            return
        # an optimizer built with maximize=True ascends the loss: the signs are the other way round
        sign = -1.0 if self.maximizes(role) else 1.0
        if item.kind == "entropy":
            self.report(d.check_entropy_sign(role, item.step, sign * v["slope"]))
            return
        if item.kind == "policy":
            # a KL penalty to the reference that outweighs the policy term drives the sign: it says nothing of PPG107
            pin, pinned = d.check_kl_pin(role, item.step, kl_align=sign * v["kl_align"], own=sign * v["own"])
            self.report(pin)
            if not pinned:
                self.report(d.check_gradient_sign(role, item.step, sign * v["alignment"], sign * v["own"]))
            own, shared, spread = sign * v["own"], v["shared"], math.nan
        else:
            own, shared, spread = sign * v["own"], sign * v["shared"], v["spread"]
        suspect = self.suspects.get(role)
        if suspect is not None and (suspect[0] == "values") == (item.kind == "value"):
            self.report(d.check_broadcast(role, item.step, suspect, own=own, shared=shared, spread=spread))

    def notice(self, role: str, rule: str, step: int, message: str) -> None:
        """Say once per role and rule that the rule cannot read its evidence (never silence): kept in
        :attr:`Verdict.notices`, warned like a finding, but no finding (a healthy run may have it)."""
        if any(n["role"] == role and n["rule"] == rule for n in self.verdict.notices):
            return
        self.verdict.notices.append({"role": role, "rule": rule, "step": step, "message": message})
        self.warn(f"cannot tell [{rule}, {role}, step {step}]: {message}")

    def check_steps(self, records: list[StepRecord], steps: dict[str, dict[str, float]]) -> None:
        engine = self._engine()
        critic = next((r.name for r in engine.roles if r.kind == "critic"), None)
        critic_vals = steps.get(critic) if critic else None
        for record in records:
            role = engine.role(record.role)
            v, b = steps[record.role], engine.bindings[record.role]
            if not role.moves:
                if not record.observed:  # a step of another phase (an auxiliary one): no value loss was built
                    continue
                self.report(self.diagnoser.check_critic_step(record.role, record.step, CriticFacts(
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
                trainable_numel=role.numel, policy=role.kind == "actor", head_ratio=head_ratio(v),
            )
            self.report(self.diagnoser.check_step(record.role, record.step, facts))

    def check_observe(self, record: ObserveRecord, v: dict[str, float], boundary_only: bool = False) -> None:
        nan = math.nan
        facts = ObserveFacts(
            **{name: v.get(name, nan) for name in _OBSERVE_FACTS}, boundary_only=boundary_only,
            first_in_rollout=record.first_in_rollout, rollout=record.rollout, target_kl=record.target_kl,
            prev_updates=record.prev_updates, samples=record.samples, adv_given=record.adv_given,
            precision_eps=record.precision_eps, inferred=record.inferred, prev_observes=record.prev_observes,
        )
        self.report(self.diagnoser.check_observe(record.role, record.step, facts))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"diagnoser": self.diagnoser.state_dict(), **self.verdict.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.diagnoser.load_state_dict(state.get("diagnoser", {}))
        self.verdict = Verdict.from_state(state)
