"""The measuring engine under every adapter: a Lightning-free object driven by a loop's events.

:class:`MonitorEngine` is what :class:`~lightning_ppo_guard.PPOMonitor` (a Trainer callback), the guard and
:class:`~lightning_ppo_guard.FabricGuard` (a Fabric loop) drive. Each adapter translates its loop's events into the
engine's public methods and nothing else:

============================  =====================================================================
event                         engine method
============================  =====================================================================
fit set-up / start            :meth:`~MonitorEngine.reset`, :meth:`~MonitorEngine.resolve`,
                              :meth:`~MonitorEngine.attach` (registers the optimizer step hooks)
training batch start / end    :meth:`~MonitorEngine.batch_start`, :meth:`~MonitorEngine.batch_end`
backward done                 :meth:`~MonitorEngine.after_backward`
optimizer step announced      :meth:`~MonitorEngine.before_optimizer_step` (Lightning's hook, before the update)
optimizer step ran            :meth:`~MonitorEngine.post_step` (a hook on the unwrapped ``torch.optim.Optimizer``,
                              registered by ``attach``); :meth:`~MonitorEngine.pre_step` (its pre-hook) only for
                              an optimizer whose steps are not announced (a Fabric loop, a raw optimizer)
``observe(...)``              :meth:`~MonitorEngine.keep`, then :meth:`~MonitorEngine.record` or
                              :meth:`~MonitorEngine.boundary`
validation in the fit         :attr:`MonitorEngine.training`
fit end / error               :meth:`~MonitorEngine.train_end`, :meth:`~MonitorEngine.detach`
============================  =====================================================================

The engine publishes what it measured as named records (:class:`StepRecord`, :class:`ObserveRecord`) to one
optional :class:`Listener` (the guard's :class:`~lightning_ppo_guard.diagnostics.Diagnostics`), which owns the
host reads of its pending records (:meth:`Listener.read`) so that one transfer serves both.

What is measured, per role (actor, ``agent_i``, critic, shared):

* gradient after backward and before any clipping the user does (:meth:`after_backward` in manual optimization;
  :meth:`before_optimizer_step` in automatic optimization, where Lightning clips after that hook), unscaled under
  AMP;
* gradient as the optimizer stepped with it (the step post-hook: after every clip, in both optimization modes; the
  pre-hook cannot read it, as in automatic optimization it runs before the closure's backward);
* the exact parameter update across the step (snapshot in preallocated buffers where the step is announced, or in
  the step pre-hook of an optimizer whose steps are not, fused difference in the post-hook);
* steps announced by ``before_optimizer_step`` that never ran (AMP's GradScaler skipped them);
* optimizer binding: which share of the role's trainable tensors some param group holds, by identity, and at which
  learning rate;
* per minibatch, from :func:`~lightning_ppo_guard.observe`: KL, clip fraction, ratio, entropy, advantage and value
  statistics.

A measured step is a fixed handful of fused multi-tensor ops for all roles together
(:class:`~lightning_ppo_guard._plan.StepPlan`); numbers stay on the device in a
:class:`~lightning_ppo_guard.metrics.RowBuffer` and reach the host once per logged row. An unmeasured step costs a
few attribute reads per event: :meth:`keep` decides once per ``observe`` whether anything is read.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, is_grad_enabled, nn
from torch.utils.hooks import RemovableHandle

from lightning_ppo_guard._binding import Binding, RoleCache, StepGroups, step_groups
from lightning_ppo_guard._cadence import Cadence, Clock
from lightning_ppo_guard._inputs import PolicyTerm
from lightning_ppo_guard._plan import PreClip, transfer
from lightning_ppo_guard._protocols import ModuleLike, TrainerLike
from lightning_ppo_guard._warnings import PPOGuardWarning
from lightning_ppo_guard.metrics import Layout, RowBuffer, arrange, host_values
from lightning_ppo_guard.observe import attach_monitor, detach_monitor
from lightning_ppo_guard.roles import PartsSpec, Role, RoleSpec, actor_role, announcement, resolve_roles

__all__ = ["FitState", "Listener", "MonitorEngine", "ObserveRecord", "Progress", "StepRecord", "Stepping", "Ticket"]

_log = logging.getLogger("lightning_ppo_guard")


def _warn(message: str) -> None:
    warnings.warn(message, PPOGuardWarning, stacklevel=3)


@dataclass(slots=True)
class Progress:
    """The engine's progress through a fit: saved in checkpoints and restored on resume. The step counts are
    kept on the cadence's clocks during a fit and added here where they are read (:meth:`MonitorEngine.tally`)."""

    optimizer_steps: int = 0
    observes: int = 0
    entropy0: dict[str, Any] = field(default_factory=dict)  # entropy at each actor's first observe (1-element tensor)
    rollout: dict[str, int | None] = field(default_factory=dict)  # each actor's current rollout id
    rollout_steps: dict[str, int] = field(default_factory=dict)  # its optimizer steps in that rollout so far
    rollout_observes: dict[str, int] = field(default_factory=dict)  # its observe calls in that rollout so far
    updates_per_rollout: dict[str, int] = field(default_factory=dict)  # ... in its last finished rollout
    steps_skipped: dict[str, int] = field(default_factory=dict)

    def count_skipped(self, roles: list[str]) -> None:
        for name in roles:
            self.steps_skipped[name] = self.steps_skipped.get(name, 0) + 1

    def enter_rollout(self, role: str, rollout: int | None) -> tuple[bool, int | None, int | None]:
        """Note ``role``'s rollout id: whether this starts a new rollout, and the steps and observe calls of the one
        it ends."""
        if rollout is None or self.rollout.get(role) == rollout:
            return False, None, None
        ended = observed = None
        if self.rollout.get(role) is not None:
            ended = self.updates_per_rollout[role] = self.rollout_steps.get(role, 0)
            observed = self.rollout_observes.get(role, 0)
        self.rollout[role], self.rollout_steps[role], self.rollout_observes[role] = rollout, 0, 0
        return True, ended, observed

    def state_dict(self) -> dict[str, Any]:
        state = {name: (dict(value) if isinstance(value, dict) else value)
                 for name, value in ((name, getattr(self, name)) for name in self.__dataclass_fields__)}
        state["entropy0"] = {k: float(v) for k, v in self.entropy0.items()}  # one host read, at checkpoints only
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Progress:
        """Restore tolerantly: unknown keys are ignored, missing ones keep their defaults."""
        return cls(**{name: state[name] for name in cls.__dataclass_fields__ if name in state})


@dataclass(slots=True)
class Stepping:
    """One optimizer of the fit as its step hooks see it: its clock, and what one of its steps hands from one hook
    to the next (empty between steps)."""

    clock: Clock  # its cadence clock (counts its steps)
    announced: bool = False  # past before_optimizer_step, its step not run yet
    param_sq: Tensor | None = None  # a measured step's snapshot: the actors' squared norms before it
    groups: list[StepGroups] | None = None  # ... and its roles' param groups then
    pre_hook: RemovableHandle | None = None  # its step pre-hook, kept while its steps are not announced
    tallied: int = 0  # its steps already added to the engine's progress (:meth:`MonitorEngine.tally`)


@dataclass(slots=True)
class FitState:
    """Everything bound to the fit in progress (built at :meth:`MonitorEngine.attach`, dropped at its end)."""

    trainer: TrainerLike
    module: ModuleLike
    layout: Layout
    rows: RowBuffer
    observe_slots: dict[str, Tensor]
    cache: RoleCache
    cadence: Cadence
    hooks: list[RemovableHandle] = field(default_factory=list)  # the step post-hooks
    steppings: dict[int, Stepping] = field(default_factory=dict)  # id(optimizer) -> its step in flight, its clock
    announced: int = 0  # optimizers past before_optimizer_step whose step has not run yet
    pre_clip: PreClip | None = None  # every role's gradient norms after the last backward (of a measured step)
    trunk: bool = False  # a shared trunk is probed (the post-hook keeps its module hooks on the measured steps)
    batches: int = 0  # training batches started
    training: bool = True  # False while a validation loop runs inside the fit
    manual: bool = False  # manual optimization (read once: a LightningModule property)
    infer_rollouts: bool = True  # without rollout ids, a manual batch is taken as a rollout until batches of one
    # observe show it is not (a loop with one minibatch per batch: then windows of observes, as in automatic)
    one_minibatch_batches: int = 0
    batch_idx: int = 0  # the current training batch's index in its epoch
    log_every_batches: int = 1  # the host's log_every_n_steps (read once: a Trainer argument)
    steps_since_row: int = 0
    batches_since_row: int = 0
    thin_said: bool = False  # the thinned cadence was announced
    published: bool = False  # a record went to the listener since the last batch end (which is then a read point)

    @property
    def fraction(self) -> float | None:
        """The share of the fit's planned batches (or steps) done; None when unknown. Read at measured steps only
        (the Trainer's progress properties cost microseconds each)."""
        return fit_fraction(self.trainer, self.batch_idx)

    @classmethod
    def start(cls, trainer: TrainerLike, module: ModuleLike, prefix: str, roles: list[Role],
              cadence: Cadence) -> FitState:
        layout = Layout.build(prefix, [(r.name, r.kind) for r in roles])
        device = module.device
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            cadence.budget, cadence.chosen = None, True  # every rank must measure the same steps: no time-based choice
        slots = {name: torch.arange(o, o + len(layout.observe_names), device=device)
                 for name, o in layout.observe_offset.items()}
        fit = cls(trainer, module, layout, RowBuffer(layout, device), slots, RoleCache(layout, device), cadence)

        def read_lrs() -> tuple[float, ...]:
            # past LR_WATCH_UNTIL of the fit a drop is the end of a schedule, which no rule names: not read then
            done = fit.fraction
            if done is not None and done >= LR_WATCH_UNTIL and cadence.lrs is not None:
                return cadence.lrs
            return learning_rates(trainer.optimizers)

        cadence.read_lrs = read_lrs
        fit.manual = not module.automatic_optimization
        fit.log_every_batches = max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1))
        # the trunk probe hooks the heads' inputs only in training forwards of measured steps
        fit.cache.armed = lambda: fit.training and fit.cadence.measuring(fit.cache.keys.get("shared", 0))
        return fit


@dataclass(slots=True)
class Ticket:
    """Why an ``observe`` is kept (:meth:`MonitorEngine.keep`), decided before its inputs are checked and read."""

    role: Role
    first: bool  # the first minibatch of a rollout
    prev_updates: int | None  # optimizer steps of the rollout it ends
    measured: bool  # its optimizer step is measured (else only the first-minibatch ratio is read ...)
    light: bool  # ... if this is a rollout whose first ratio is checked; else it only marks the rollout boundary
    rollout: int | None = None  # the rollout id: given to observe, or a manual-optimization batch's (inferred)
    inferred: bool = False
    prev_observes: int | None = None  # observe calls of the rollout it ends
    started: float = 0.0  # time.perf_counter() when it was kept: the work from here on is the measured work

    @property
    def reads(self) -> bool:
        """Whether the minibatch's tensors are read at all (else it only marks a rollout boundary)."""
        return self.measured or self.light


@dataclass(slots=True)
class StepRecord:
    """One measured optimizer step of one role: ``values`` (following ``_plan.COLUMNS``) still on the device,
    and the host facts read at that very step."""

    role: str
    step: int
    values: Tensor
    grad_none: int
    groups: StepGroups  # lr (smallest, largest) and optimizer eps of the groups holding the role, at this step
    segment: int | None  # index of the rollout (or batch) this step belongs to; None when unknown
    fraction: float | None  # share of the fit done (None when the Trainer cannot tell)
    observed: bool = True  # an observe came since this optimizer's previous step (a policy loss was built for it);
    # False at a step of another phase (an auxiliary phase, a critic-only warm-up) of a fit that observes


@dataclass(slots=True)
class ObserveRecord:
    """One ``observe`` of one actor role, still on the device (``values`` follows ``Layout.observe_names``)."""

    role: str
    step: int
    rollout: int | None
    first_in_rollout: bool
    target_kl: float | None
    values: Tensor | None  # None: a rollout boundary whose minibatch was not read
    prev_updates: int | None  # actor steps of the rollout this one's first observe ends
    samples: int = 0  # minibatch size
    adv_given: bool = False
    precision_eps: float = 1.2e-7  # of the lowest precision new_logp was computed in (first minibatches only)
    measured: bool = False  # logged and checked in full (else only the first minibatch's ratio was read)
    inferred: bool = False  # the rollout is a manual-optimization batch (observe got no rollout id)
    prev_observes: int | None = None  # observe calls of the rollout this one's first observe ends

    @classmethod
    def of(cls, term: PolicyTerm, ticket: Ticket, step: int, values: Tensor | None) -> ObserveRecord:
        return cls(ticket.role.name, step, ticket.rollout, ticket.first, term.target_kl, values, ticket.prev_updates,
                   term.new_logp.numel(), ticket.measured and term.advantages is not None,
                   term.precision_eps() if ticket.first else 1.2e-7, ticket.measured, ticket.inferred,
                   ticket.prev_observes)

    @classmethod
    def boundary(cls, ticket: Ticket, step: int) -> ObserveRecord:
        """A rollout's first minibatch whose ratio is not read: it only ends the previous rollout."""
        return cls(ticket.role.name, step, ticket.rollout, True, None, None, ticket.prev_updates,
                   inferred=ticket.inferred, prev_observes=ticket.prev_observes)


class Listener(Protocol):
    """What the engine publishes, to the one listener it was built with (the guard's diagnostics).

    Every method is called with the engine's state already updated; the live tensors of ``observed`` must not be
    kept past the call (hooks on them may be registered).
    """

    def reset(self) -> None:
        """A fresh fit (before a checkpoint's state is loaded)."""

    def detached(self) -> None:
        """The fit's bindings are dropped (end, error, teardown)."""

    def refreshed(self) -> None:
        """The roles' tensors and the optimizers' param groups were re-read (:attr:`MonitorEngine.bindings`)."""

    def roles_changed(self, roles: list[Role]) -> None:
        """A refresh found other tensors in these roles."""

    def observed(self, record: ObserveRecord, term: PolicyTerm | None, role: Role) -> None:
        """After each kept ``observe``, with its live inputs (``None`` at a rollout boundary that read nothing)."""

    def stepped(self, records: list[StepRecord]) -> None:
        """After each measured optimizer step, with its device-side records (one per role of the optimizer)."""

    def step_skipped(self, roles: list[str]) -> None:
        """An optimizer step of these roles was announced but never ran (AMP's GradScaler skipped it)."""

    def read(self, parts: list[Tensor]) -> list[float]:
        """Read ``parts`` to the host (with :meth:`MonitorEngine.transfer`), with whatever the listener has pending
        in the same transfer; returns the values of ``parts``."""
        ...

    def row_written(self) -> None:
        """A logged row was written (or had nothing to write): a read point."""

    def batch_ended(self) -> None:
        """A training batch ended in which records were published (observed, stepped or step_skipped): a read
        point."""

    def train_ended(self) -> None:
        """Training ends: read everything pending (the engine writes its last row after this)."""


#: The share of the fit after which the learning rates are no longer watched (``GuardConfig.annealed_fraction``'s
#: default: an lr that reaches 0 past it is a schedule's end, never named).
LR_WATCH_UNTIL = 0.9


def learning_rates(optimizers: Sequence[Any]) -> tuple[float, ...]:
    """Every param group's learning rate, as host numbers (an lr held in a tensor off the CPU reads NaN: no sync)."""
    out = []
    for opt in optimizers:
        for group in opt.param_groups:
            lr = group.get("lr", math.nan)
            if isinstance(lr, Tensor):
                lr = float(lr) if lr.device.type == "cpu" and lr.numel() == 1 else math.nan
            out.append(float(lr) if isinstance(lr, (int, float)) else math.nan)
    return tuple(out)


def fit_fraction(trainer: TrainerLike, batch_idx: int) -> float | None:
    """How much of the planned fit is done, from the Trainer's public limits (None when it cannot tell)."""
    max_steps = getattr(trainer, "max_steps", -1)
    if isinstance(max_steps, int) and max_steps > 0:
        return trainer.global_step / max_steps
    batches, epochs = getattr(trainer, "num_training_batches", math.inf), getattr(trainer, "max_epochs", None)
    if not isinstance(epochs, int) or epochs <= 0 or not math.isfinite(batches) or batches <= 0:
        return None
    return (getattr(trainer, "current_epoch", 0) * batches + batch_idx + 1) / (epochs * batches)


def validate(log_every_n_steps: Any, dense_steps: Any, measure_every_n_steps: Any, prefix: Any,
             overhead_budget: Any = None) -> None:
    """Check the engine's arguments (raised from the adapters' ``__init__``)."""
    share = isinstance(overhead_budget, (int, float)) and not isinstance(overhead_budget, bool)
    if overhead_budget is not None and not (share and 0 < overhead_budget <= 1):
        raise ValueError(f"overhead_budget must be a share in (0, 1] (0.01 is 1% of the training time) or None "
                         f"(measure every rollout), got {overhead_budget!r}.")
    if log_every_n_steps is not None and (not isinstance(log_every_n_steps, int) or log_every_n_steps < 1):
        raise ValueError(f"log_every_n_steps must be a positive int or None, got {log_every_n_steps!r}.")
    if not isinstance(dense_steps, int) or dense_steps < 0:
        raise ValueError(f"dense_steps must be an int >= 0, got {dense_steps!r}.")
    if not isinstance(measure_every_n_steps, int) or measure_every_n_steps < 1:
        raise ValueError(f"measure_every_n_steps must be an int >= 1, got {measure_every_n_steps!r}.")
    if not isinstance(prefix, str) or not prefix or "/" in prefix:
        raise ValueError(f"prefix must be a non-empty string without '/', got {prefix!r}.")


class MonitorEngine:
    """Measure the roles of one fit at its optimizer steps and ``observe`` calls; log rows to the host's loggers.

    Args:
        actors, critic, shared: the role specs (see :class:`~lightning_ppo_guard.PPOMonitor`).
        log_every_n_steps: optimizer steps per logged row; ``None``: every ``host.log_every_n_steps`` batches.
        dense_steps, measure_every_n_steps, overhead_budget: the cadence
            (:class:`~lightning_ppo_guard._cadence.Cadence`).
        prefix: first component of every logged key.
        name: the adapter's name, in messages (``"PPOGuard"``).
        warn: how a warning reaches the user (the Lightning adapters pass ``rank_zero_warn``).
        info: how an announcement reaches the user (``rank_zero_info``).
        listener: who gets the records (the guard's diagnostics), if anyone.
    """

    def __init__(self, actors: RoleSpec = None, critic: PartsSpec = None, *, shared: PartsSpec = None,
                 log_every_n_steps: int | None = None, dense_steps: int = 8, measure_every_n_steps: int = 64,
                 overhead_budget: float | None = 0.005, prefix: str = "ppo_guard", name: str = "PPOMonitor",
                 warn: Callable[[str], None] = _warn, info: Callable[[str], None] = _log.info,
                 listener: Listener | None = None) -> None:
        validate(log_every_n_steps, dense_steps, measure_every_n_steps, prefix, overhead_budget)
        self.specs: tuple[RoleSpec, PartsSpec, PartsSpec] = (actors, critic, shared)
        self.dense_steps = dense_steps
        self.measure_every_n_steps = measure_every_n_steps
        self.overhead_budget = overhead_budget
        self.prefix = prefix
        self.log_every = log_every_n_steps
        self.name, self.warn, self.info, self.listener = name, warn, info, listener
        self.announced = False  # the auto-detected roles are logged once
        # (k, first): the overhead budget measured 1 rollout in k from rollout ``first`` on (None: every rollout)
        self.thinning: tuple[int, int] | None = None
        self.roles: list[Role] = []
        self.actors: dict[str, Role] = {}
        self.bindings: dict[str, Binding] = {}
        self.last_logged: dict[str, float] = {}
        self.snapshot_bytes = 0  # the only persistent allocation: the moving roles' snapshot buffers
        self.progress = Progress()
        self.fit: FitState | None = None
        self.keys: tuple[Any, ...] = ()  # what observe(key, ...) reaches this engine through, while attached

    # ------------------------------------------------------------------ reads
    @property
    def actor_roles(self) -> list[Role]:
        return [r for r in self.roles if r.kind == "actor"]

    @property
    def current_step(self) -> int:
        """The optimizer step findings and rows are filed under: the host's ``global_step`` during a fit."""
        return self.fit.trainer.global_step if self.fit is not None else self.progress.optimizer_steps

    def tally(self) -> Progress:
        """:attr:`progress` with its step counts up to date. The step post-hook counts each step on the optimizer's
        cadence clock only; the steps since the last tally are added here to ``optimizer_steps`` and to each actor's
        ``rollout_steps`` (an actor's: those of the optimizers whose plan steps it), wherever they are read."""
        fit, progress = self.fit, self.progress
        if fit is not None:
            counts = progress.rollout_steps
            for key, stepping in fit.steppings.items():
                new = stepping.clock.steps - stepping.tallied
                if new > 0:
                    stepping.tallied = stepping.clock.steps
                    progress.optimizer_steps += new
                    plan = fit.cache.plans.get(key)
                    for name in plan.actor_names if plan is not None else ():
                        counts[name] = counts.get(name, 0) + new
        return progress

    def role(self, name: str) -> Role:
        return next(r for r in self.roles if r.name == name)

    # ------------------------------------------------------------------ set-up and tear-down
    def reset(self) -> None:
        """A fresh start: progress, the fit's bindings (and its steps in flight), the listener's state."""
        self.detach()
        self.progress, self.last_logged, self.thinning = Progress(), {}, None
        if self.listener is not None:
            self.listener.reset()

    def resolve(self, module: Any) -> None:
        """Resolve the roles in ``module`` (early, so that a wrong path fails before any training; the tensors are
        re-read at :meth:`attach`); announce auto-detected roles once."""
        self.roles = resolve_roles(module, *self.specs)
        self.actors = {r.name: r for r in self.roles if r.kind == "actor"}
        if self.specs[0] is None and not self.announced and isinstance(module, nn.Module):
            self.announced = True
            self.info(announcement(module, self.roles, self.name))

    def attach(self, trainer: TrainerLike, module: ModuleLike, keys: tuple[Any, ...] = ()) -> None:
        """Bind to a fit that starts to train: the logging layout, the optimizers' step hooks, the roles; make
        ``observe(key, ...)`` reach this engine for each of ``keys`` (the LightningModule, a Fabric model)."""
        self.detach()
        fit = self.fit = FitState.start(trainer, module, self.prefix, self.roles,
                                        Cadence(self.dense_steps, self.measure_every_n_steps, self.overhead_budget))
        for opt in trainer.optimizers:  # the pre-hook stays until the optimizer's steps are announced
            fit.steppings[id(opt)] = Stepping(fit.cadence.clock(id(opt)), pre_hook=opt.register_step_pre_hook(
                self.pre_step))
            fit.hooks.append(opt.register_step_post_hook(self.post_step))
        self.keys = keys
        for key in keys:
            attach_monitor(key, self)
        self.refresh()

    def detach(self) -> None:
        """Remove the optimizer hooks, unregister from ``observe`` and drop everything bound to the fit
        (idempotent)."""
        self.tally()
        fit, self.fit = self.fit, None
        if fit is not None:
            for handle in [*fit.hooks, *(s.pre_hook for s in fit.steppings.values() if s.pre_hook is not None)]:
                handle.remove()
            fit.cache.close()
        for key in self.keys:
            detach_monitor(key, self)
        self.keys = ()
        if self.listener is not None:
            self.listener.detached()

    def train_end(self) -> None:
        """Read what is pending, write the last row, detach."""
        if self.listener is not None and self.fit is not None:
            self.listener.train_ended()
        self.write_row()
        self.detach()

    def refresh(self) -> None:
        """Re-read the roles' tensors and the optimizers' param groups (host only); bindings and the fused step
        plans are rebuilt when they changed (see :class:`~lightning_ppo_guard._binding.RoleCache`)."""
        fit = self.fit
        if fit is None:
            return
        steps = self.tally().optimizer_steps  # before the plans (which actors each optimizer steps) are rebuilt
        changed = fit.cache.refresh(self.roles, fit.trainer.optimizers, fit.module, steps)
        self.bindings, fit.trunk = fit.cache.bindings, fit.cache.trunk is not None
        if changed is not None:
            self.snapshot_bytes = fit.cache.snapshot_bytes
            fit.pre_clip = None
            if changed and self.listener is not None:
                self.listener.roles_changed(changed)
        if self.listener is not None:
            self.listener.refreshed()

    @property
    def training(self) -> bool:
        """False while a validation loop runs inside the fit (an ``observe`` there is not trained on)."""
        return self.fit is not None and self.fit.training

    @training.setter
    def training(self, value: bool) -> None:
        if self.fit is not None:
            self.fit.training = value

    # ------------------------------------------------------------------ steps
    def batch_start(self, batch_idx: int = 0) -> None:
        fit = self.fit
        if fit is None:
            return
        fit.batches += 1
        fit.batch_idx = batch_idx
        cadence = fit.cadence
        if fit.manual and not cadence.by_rollout:  # a manual-optimization batch is usually one PPO iteration
            self.start_segment(fit, ("batch", fit.batches), rollout=False)
        if not cadence.quiet and cadence.any_measuring():  # binding and lr: re-read on the measurements' cadence
            t0 = time.perf_counter()
            self.refresh()
            cadence.charge(t0)

    def after_backward(self) -> None:
        """Manual optimization: the user clips between backward and step, so the pre-clip gradient is read here
        (AMP-scaled: undone with the scaler's current scale). With accumulation, the last backward wins."""
        fit = self.fit
        if fit is None or not fit.manual or fit.cadence.quiet:
            return
        if fit.cache.all_plan is not None and fit.cadence.any_measuring():
            t0 = time.perf_counter()
            scaler = fit.trainer.scaler
            scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
            fit.pre_clip = PreClip(fit.cache.all_plan, 1.0 / scale)
            fit.cadence.charge(t0)

    def before_optimizer_step(self, optimizer: Any) -> None:
        """Lightning announces an optimizer step (after backward, before the update): snapshot a measured step's
        actors here; an optimizer announced this way needs no step pre-hook (removed at its first announcement)."""
        fit = self.fit
        if fit is None:
            return
        key = id(optimizer)
        stepping = fit.steppings.get(key)
        if stepping is None:  # not an optimizer of this fit
            return
        if stepping.announced:  # its step announced last time never ran (AMP's GradScaler skipped it)
            self.skipped(key, stepping)
        stepping.announced = True
        fit.announced += 1
        if stepping.pre_hook is not None:
            stepping.pre_hook.remove()
            stepping.pre_hook = None
        if fit.cadence.quiet or not fit.cadence.measuring(key):
            return
        t0 = time.perf_counter()
        # Automatic optimization: Lightning has unscaled the gradients already (AMP) and clips right after this hook.
        if not fit.manual and fit.cache.all_plan is not None:
            fit.pre_clip = PreClip(fit.cache.all_plan, 1.0)
        if stepping.param_sq is None:  # (in automatic optimization a first step's pre-hook ran before it)
            self.snapshot(fit, key, stepping)
        fit.cadence.charge(t0)

    def pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """The step pre-hook of an optimizer whose steps are not announced: snapshot a measured step's actors."""
        fit = self.fit
        if fit is None or fit.cadence.quiet or not fit.cadence.measuring(id(optimizer)):
            return
        stepping = fit.steppings.get(id(optimizer))
        if stepping is not None:
            t0 = time.perf_counter()
            self.snapshot(fit, id(optimizer), stepping)
            fit.cadence.charge(t0)

    def snapshot(self, fit: FitState, key: int, stepping: Stepping) -> None:
        """Before a measured step of optimizer ``key``: its actors' parameters (into the plan's buffers, for the
        update), their norms and the param groups' settings."""
        if fit.cache.lazy:  # lazy parameters materialise at the first forward: measure them from now on
            self.refresh()
        plan = fit.cache.plans.get(key)
        if plan is not None:
            stepping.param_sq = plan.before()
            stepping.groups = [step_groups(self.bindings[r.name], fit.trainer.optimizers) for r in plan.roles]

    def post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """The optimizer's step post-hook: count the step (on its cadence clock: :meth:`tally`); measure it if a
        snapshot was taken before it."""
        # every step of every optimizer runs this: the unmeasured path is kept to a few slot operations
        fit = self.fit
        if fit is None:
            return
        stepping = fit.steppings.get(id(optimizer))
        if stepping is None:  # not an optimizer of this fit
            return
        if stepping.announced:
            stepping.announced = False
            fit.announced -= 1
        elif stepping.pre_hook is None:  # a step not announced (a raw optimizer, a Fabric loop): hook its pre-step
            stepping.pre_hook = optimizer.register_step_pre_hook(self.pre_step)
        clock = stepping.clock
        if stepping.param_sq is not None:  # the snapshot of a measured step
            self.measured(fit, id(optimizer), stepping)
        elif clock.steps + 1 < clock.quiet_until:  # Cadence.stepped's quiet case, inline (see Clock.quiet_until)
            clock.steps += 1
            clock.observes_at = fit.cadence.observes
        else:
            fit.cadence.stepped(id(optimizer))
        if fit.trunk:
            fit.cache.hook_trunk(fit.cadence)
        if self.log_every is not None:
            fit.steps_since_row += 1
            if fit.steps_since_row >= self.log_every:
                self.write_row()

    def measured(self, fit: FitState, key: int, stepping: Stepping) -> None:
        """The measured step's work (the post-hook's rare branch)."""
        t0 = time.perf_counter()
        cadence, plan = fit.cadence, fit.cache.plans[key]  # a snapshot is taken only with a plan
        param_sq, groups, stepping.param_sq, stepping.groups = stepping.param_sq, stepping.groups, None, None
        assert param_sq is not None and groups is not None  # taken together by snapshot()
        counted = cadence.counting_nonzero(key)
        cadence.stepped(key, measured=True)
        pre = fit.pre_clip
        block, nones, mask = plan.measure(param_sq, pre, counted)
        if pre is not None and not pre.unused:
            fit.pre_clip = None
        fit.rows.queue(block, mask, plan.slots)
        step = self.current_step
        segment = cadence.segments if cadence.segment_id is not None else None
        # a step with no observe since this optimizer's last, of an optimizer holding the policy, is of another phase
        # (an auxiliary one); a critic's own optimizer steps on value losses alone (Spinning Up's train_v_iters)
        observed = stepping.clock.seen or cadence.observes == 0 or not plan.actors
        fit.published = True
        if self.listener is not None:
            self.listener.stepped([StepRecord(name, step, block[i], nones[i], groups[i], segment, fit.fraction,
                                              observed) for i, name in enumerate(plan.names)])
        cadence.charge(t0)

    def skipped(self, key: int, stepping: Stepping) -> None:
        """An optimizer step was announced (:meth:`before_optimizer_step`) and never ran."""
        fit = self.fit
        if fit is None:
            return
        stepping.announced, stepping.param_sq, stepping.groups = False, None, None
        fit.announced -= 1
        plan = fit.cache.plans.get(key)
        if plan is None:
            return
        self.progress.count_skipped(plan.names)
        fit.published = True
        if self.listener is not None:
            self.listener.step_skipped(plan.names)

    def batch_end(self) -> None:
        fit = self.fit
        if fit is None:
            return
        if fit.announced:  # a batch ended with a step announced but never run
            for key, stepping in fit.steppings.items():
                if stepping.announced:
                    self.skipped(key, stepping)
        if self.log_every is None:
            fit.batches_since_row += 1
            if fit.batches_since_row >= fit.log_every_batches:
                self.write_row()
        if fit.published:
            fit.published = False
            if self.listener is not None:
                self.listener.batch_ended()

    # ------------------------------------------------------------------ observe
    def keep(self, role: str, rollout: int | None) -> Ticket | None:
        """The bookkeeping every ``observe`` gets (its rollout), and whether this one is kept: measured, or a
        rollout's first minibatch. None outside training (validation) or under ``torch.no_grad()``."""
        # The hot path (every minibatch, most not kept) is written flat: few calls, no allocation.
        fit = self.fit
        if fit is None or not fit.training or not is_grad_enabled():
            return None
        cadence = fit.cadence
        cadence.observes += 1
        progress = self.progress
        if cadence.quiet and rollout is not None and progress.rollout.get(role) == rollout:
            # the common case: a minibatch inside a known rollout of an actor named as such, its step not measured
            counts = progress.rollout_observes
            counts[role] = counts.get(role, 0) + 1
            return None
        actor = self.actors.get(role) or actor_role(self.actors, role)
        name = actor.name
        first_in_rollout, prev_updates, prev_observes = False, None, None
        inferred = rollout is None and fit.manual and fit.infer_rollouts  # no rollout id: a manual batch is one
        if inferred:
            rollout = fit.batches
        if rollout is not None and progress.rollout.get(name) != rollout:
            first_in_rollout, prev_updates, prev_observes = self.tally().enter_rollout(name, rollout)
            if not inferred:  # manual batches are segments already
                self.start_segment(fit, ("rollout", rollout), rollout=True)
            elif prev_observes is not None and prev_observes <= 1:
                fit.one_minibatch_batches += 1
                if fit.one_minibatch_batches >= 2:  # two batches of one minibatch each: batches are minibatches
                    fit.infer_rollouts = False
                    progress.updates_per_rollout.pop(name, None)
        counts = progress.rollout_observes
        counts[name] = counts.get(name, 0) + 1
        measured = not cadence.quiet and cadence.measuring(fit.cache.keys.get(name, 0))
        if not (first_in_rollout or measured):
            return None
        # the first minibatch's ratio (PPG105) is read at the first 16 rollouts, then at 1 in 4
        light = first_in_rollout and cadence.sampled_segment()
        return Ticket(actor, first_in_rollout, prev_updates, measured, light, rollout, inferred, prev_observes,
                      time.perf_counter())

    def start_segment(self, fit: FitState, segment_id: object, *, rollout: bool) -> None:
        """A rollout (or a manual batch) may begin (:meth:`Cadence.start_segment`); once the overhead budget chose
        its thinning, say so once (nothing when it measures every rollout)."""
        cadence = fit.cadence
        if not cadence.start_segment(segment_id, rollout=rollout) or fit.thin_said or not cadence.chosen:
            return
        fit.thin_said = True
        if cadence.thin > 1:
            self.thinning = (cadence.thin, cadence.segments)
            self.info(f"{self.name}: measuring 1 rollout in {cadence.thin} from rollout {cadence.segments} on, to "
                      f"keep its measurements within overhead_budget={self.overhead_budget} of the training time on "
                      "this fit (short rollouts of a small model); overhead_budget=None measures every rollout.")

    def boundary(self, ticket: Ticket) -> None:
        """A kept ``observe`` whose tensors are not read: it only ends the previous rollout."""
        self._boundary(ticket)
        if self.fit is not None:
            self.fit.cadence.charge(ticket.started)

    def _boundary(self, ticket: Ticket) -> None:
        if self.fit is not None:
            self.fit.published = True
        if self.listener is not None:
            self.listener.observed(ObserveRecord.boundary(ticket, self.current_step), None, ticket.role)

    def record(self, term: PolicyTerm, ticket: Ticket) -> None:
        """Read a kept ``observe``'s statistics (on the device) and publish them."""
        fit = self.fit
        if fit is None:
            return
        try:
            self._record(fit, term, ticket)
        finally:
            fit.cadence.charge(ticket.started)  # from keep: the inputs' checks and statistics are measured work

    def _record(self, fit: FitState, term: PolicyTerm, ticket: Ticket) -> None:
        role, measured, progress = ticket.role, ticket.measured, self.progress
        name = role.name
        if term.empty:
            self.warn("observe() got an empty new_logp/old_logp and skipped it; pass the minibatch's log-probs.")
            return
        if not ticket.reads:
            self._boundary(ticket)
            return
        # an off-cadence first minibatch feeds the first-minibatch rules only (its ratio), and is not logged
        vector, names = term.vector(full=measured)
        if "entropy" in names:
            at = names.index("entropy")
            entropy = vector[at:at + 1]
            vector = torch.cat([vector, entropy - progress.entropy0.setdefault(name, entropy)])
            names += ("entropy_drift",)
        values, present = arrange(vector, names, fit.layout.observe_names)
        if measured:
            fit.rows.queue(values, fit.rows.mask(present), fit.observe_slots[name])
        progress.observes += 1
        fit.published = True
        if self.listener is not None:
            self.listener.observed(ObserveRecord.of(term, ticket, self.current_step, values), term, role)

    # ------------------------------------------------------------------ rows and host reads
    def transfer(self, parts: list[Tensor]) -> list[float]:
        """One device-to-host transfer for ``parts``, settling the pending clip-inference checks with it. Its time is
        taken out of the overhead budget's account: on an asynchronous device it is mostly the wait for the
        training work queued before it, not the guard's."""
        fit = self.fit
        if fit is None:
            return transfer(parts, [])
        t0 = time.perf_counter()
        try:
            return transfer(parts, fit.cache.every_plan())
        finally:
            fit.cadence.uncharge(t0)

    def write_row(self) -> None:
        """Reduce the interval's statistics (over ranks too) and log them: one host transfer (the listener's
        pending records ride on it)."""
        fit = self.fit
        if fit is None:
            return
        t0 = time.perf_counter()
        fit.steps_since_row = fit.batches_since_row = 0
        host = host_values(self.prefix, self.bindings, self.progress.steps_skipped, self.progress.updates_per_rollout)
        metrics = fit.rows.row(host, self.listener.read if self.listener is not None else self.transfer)
        if metrics is not None:
            self.last_logged = metrics
            if metrics and fit.trainer.is_global_zero:
                for logger in fit.trainer.loggers:
                    logger.log_metrics(metrics, step=fit.trainer.global_step)
        if self.listener is not None:
            self.listener.row_written()
        fit.cadence.charge(t0)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return self.tally().state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.progress = Progress.from_state(state)
