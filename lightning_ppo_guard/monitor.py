"""``PPOMonitor``: measure every optimizer step of the actor(s) and critic, and log it.

What is measured, per role (actor, ``agent_i``, critic):

* gradient after backward and before any clipping the user does (``on_after_backward`` in manual
  optimization; ``on_before_optimizer_step`` in automatic optimization, where Lightning clips after that
  hook), unscaled under AMP;
* gradient as the optimizer stepped with it (a step post-hook registered on the unwrapped
  ``torch.optim.Optimizer``: after every clip, in both optimization modes; the pre-hook cannot read it, as
  in automatic optimization it runs before the closure's backward);
* the exact parameter update across the step (snapshot in preallocated buffers in the pre-hook, fused
  difference in the post-hook; Trainer callbacks have no after-step hook);
* steps announced by ``on_before_optimizer_step`` that never ran (AMP's GradScaler skipped them);
* optimizer binding: which share of the role's trainable tensors some param group holds, by identity,
  and at which learning rate;
* per minibatch, from :func:`~lightning_ppo_guard.observe`: KL, clip fraction, ratio, entropy, advantage
  and value statistics.

The Lightning hooks are thin: each calls one method of the engine below (the Fabric adapter calls the same
methods). A measured step is a fixed handful of fused multi-tensor ops for all roles together
(:class:`~lightning_ppo_guard._plan.StepPlan`); numbers stay on the device in a
:class:`~lightning_ppo_guard.metrics.RowBuffer` and reach the host once per logged row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_ppo_guard._binding import Binding, RoleCache, StepGroups, step_groups
from lightning_ppo_guard._cadence import Cadence
from lightning_ppo_guard._inputs import PolicyTerm
from lightning_ppo_guard._plan import PreClip, transfer
from lightning_ppo_guard._protocols import ModuleLike, TrainerLike
from lightning_ppo_guard._warnings import PPOGuardWarning
from lightning_ppo_guard.metrics import Layout, RowBuffer, host_values, stack
from lightning_ppo_guard.roles import PartsSpec, Role, RoleSpec, actor_role, announcement, resolve_roles

__all__ = ["Binding", "ObserveRecord", "PPOMonitor", "Progress", "StepRecord"]


@dataclass
class Progress:
    """The monitor's progress through a fit: saved in checkpoints and restored on resume."""

    optimizer_steps: int = 0
    observes: int = 0
    entropy0: dict[str, Any] = field(default_factory=dict)  # entropy at each actor's first observe (0-d tensor)
    rollout: dict[str, int | None] = field(default_factory=dict)  # each actor's current rollout id
    rollout_steps: dict[str, int] = field(default_factory=dict)  # its optimizer steps in that rollout so far
    rollout_observes: dict[str, int] = field(default_factory=dict)  # its observe calls in that rollout so far
    updates_per_rollout: dict[str, int] = field(default_factory=dict)  # ... in its last finished rollout
    steps_skipped: dict[str, int] = field(default_factory=dict)

    def count_step(self, actors: list[Role]) -> None:
        self.optimizer_steps += 1
        for role in actors:
            self.rollout_steps[role.name] = self.rollout_steps.get(role.name, 0) + 1

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
        state = {name: (dict(value) if isinstance(value, dict) else value) for name, value in vars(self).items()}
        state["entropy0"] = {k: float(v) for k, v in self.entropy0.items()}  # one host read, at checkpoints only
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Progress:
        return cls(**{name: state[name] for name in cls.__dataclass_fields__ if name in state})


@dataclass
class _InFlight:
    """What one optimizer step hands from one hook to the next; empty between steps."""

    pre_clip: PreClip | None = None  # every role's gradient norms after the last backward
    param_sq: dict[int, Tensor] = field(default_factory=dict)  # id(optimizer) -> actors' squared norms before it
    groups: dict[int, list[StepGroups]] = field(default_factory=dict)  # ... its roles' param groups then
    awaiting: set[int] = field(default_factory=set)  # optimizers past on_before_optimizer_step, step not run yet


@dataclass
class _Fit:
    """Everything bound to the fit in progress (built at train start, dropped at its end)."""

    trainer: TrainerLike
    module: ModuleLike
    layout: Layout
    rows: RowBuffer
    observe_slots: dict[str, Tensor]
    cache: RoleCache
    cadence: Cadence
    hooks: list[RemovableHandle] = field(default_factory=list)
    batches: int = 0  # training batches started
    training: bool = True  # False while a validation loop runs inside the fit
    manual: bool = False  # manual optimization (read once: a LightningModule property)
    infer_rollouts: bool = True  # without rollout ids, a manual batch is taken as a rollout until batches of one
    # observe show it is not (a loop with one minibatch per batch: then windows of observes, as in automatic)
    one_minibatch_batches: int = 0
    fraction: float | None = None  # share of the fit's planned batches (or steps) done; None when unknown

    @classmethod
    def start(cls, trainer: TrainerLike, module: ModuleLike, prefix: str, roles: list[Role], cadence: Cadence) -> _Fit:
        layout = Layout.build(prefix, [(r.name, r.kind) for r in roles])
        device = module.device
        slots = {name: torch.arange(o, o + len(layout.observe_names), device=device)
                 for name, o in layout.observe_offset.items()}
        fit = cls(trainer, module, layout, RowBuffer(layout, device), slots, RoleCache(layout, device), cadence)
        fit.manual = not module.automatic_optimization
        # the trunk probe hooks the heads' inputs only in training forwards of measured steps
        fit.cache.armed = lambda: fit.training and fit.cadence.measuring(fit.cache.keys.get("shared", 0))
        return fit
    steps_since_row: int = 0
    batches_since_row: int = 0


@dataclass(slots=True)
class _Kept:
    """Why an ``observe`` is kept, decided before its inputs are checked and read."""

    role: Role
    first: bool  # the first minibatch of a rollout
    prev_updates: int | None  # optimizer steps of the rollout it ends
    measured: bool  # its optimizer step is measured (else only the first-minibatch ratio is read ...)
    light: bool  # ... if this is a rollout whose first ratio is checked; else it only marks the rollout boundary
    rollout: int | None = None  # the rollout id: given to observe, or a manual-optimization batch's (inferred)
    inferred: bool = False
    prev_observes: int | None = None  # observe calls of the rollout it ends


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
    def of(cls, term: PolicyTerm, kept: _Kept, step: int, values: Tensor | None) -> ObserveRecord:
        return cls(kept.role.name, step, kept.rollout, kept.first, term.target_kl, values, kept.prev_updates,
                   term.new_logp.numel(), kept.measured and term.advantages is not None,
                   term.precision_eps() if kept.first else 1.2e-7, kept.measured, kept.inferred, kept.prev_observes)


def _warn_shared_prefix(callbacks: list[Any], monitor: PPOMonitor) -> None:
    ours = [cb for cb in callbacks if isinstance(cb, PPOMonitor) and cb.prefix == monitor.prefix]
    if len(ours) > 1 and ours[-1] is monitor:
        rank_zero_warn(f"{len(ours)} PPOMonitor/PPOGuard callbacks log under the same prefix {monitor.prefix!r}, so "
                       "their rows mix; give each its own, e.g. PPOGuard(prefix='guard2').", category=PPOGuardWarning)


def _fit_fraction(trainer: TrainerLike, batch_idx: int) -> float | None:
    """How much of the planned fit is done, from the Trainer's public limits (None when it cannot tell)."""
    max_steps = getattr(trainer, "max_steps", -1)
    if isinstance(max_steps, int) and max_steps > 0:
        return trainer.global_step / max_steps
    batches, epochs = getattr(trainer, "num_training_batches", math.inf), getattr(trainer, "max_epochs", None)
    if not isinstance(epochs, int) or epochs <= 0 or not math.isfinite(batches) or batches <= 0:
        return None
    return (trainer.current_epoch * batches + batch_idx + 1) / (epochs * batches)


def _validate(log_every_n_steps: Any, dense_steps: Any, measure_every_n_steps: Any, prefix: Any) -> None:
    if log_every_n_steps is not None and (not isinstance(log_every_n_steps, int) or log_every_n_steps < 1):
        raise ValueError(f"log_every_n_steps must be a positive int or None, got {log_every_n_steps!r}.")
    if not isinstance(dense_steps, int) or dense_steps < 0:
        raise ValueError(f"dense_steps must be an int >= 0, got {dense_steps!r}.")
    if not isinstance(measure_every_n_steps, int) or measure_every_n_steps < 1:
        raise ValueError(f"measure_every_n_steps must be an int >= 1, got {measure_every_n_steps!r}.")
    if not isinstance(prefix, str) or not prefix or "/" in prefix:
        raise ValueError(f"prefix must be a non-empty string without '/', got {prefix!r}.")


class PPOMonitor(Callback):
    r"""Measure the actor's (and critic's) gradients, updates and policy movement at every optimizer step,
    and log them to the Trainer's loggers under ``ppo_guard/<role>/<metric>``.

    Add it to ``Trainer(callbacks=[...])`` and call :func:`~lightning_ppo_guard.observe` once per minibatch
    update where the PPO loss is built. :class:`~lightning_ppo_guard.PPOGuard` extends it with diagnoses.

    Args:
        actors: the actor role(s): a path (``"agent.actor"``), a module, a ``ModuleList``/``ModuleDict`` path or a
            list (one role per agent), or ``{name: part or list of parts}`` (a part is a submodule or a parameter
            path). ``None`` auto-detects every role (:func:`lightning_ppo_guard.roles.detect`) and logs the choice.
        critic: the critic's part(s); ``None`` detects it; ``[]`` means none.
        shared: a trunk both heads use, measured like an actor; ``None`` detects it with ``actors=None``.
        log_every_n_steps: optimizer steps per logged row; ``None`` logs when Lightning logs: every
            ``Trainer(log_every_n_steps=...)`` training batches (a manual-optimization PPO batch may hold many
            optimizer steps; the row then holds their reduction).
        dense_steps: measure every step of each optimizer for this many steps from the start of fit, ...
        measure_every_n_steps: ... then each rollout's (predicted) last step, and one step in n inside longer
            rollouts (see ``lightning_ppo_guard._cadence``). ``1`` measures every step for the whole run.
        prefix: first component of every logged key; give each monitor of one Trainer its own.

    Example::

        trainer = Trainer(callbacks=[PPOMonitor()])
        # in training_step, once per minibatch, before backward:
        observe(self, new_logp=new_logp, old_logp=b_logp, advantages=adv, clip_eps=0.2, dist=dist)
    """

    def __init__(
        self,
        actors: RoleSpec = None,
        critic: PartsSpec = None,
        *,
        shared: PartsSpec = None,
        log_every_n_steps: int | None = None,
        dense_steps: int = 16,
        measure_every_n_steps: int = 64,
        prefix: str = "ppo_guard",
    ) -> None:
        super().__init__()
        _validate(log_every_n_steps, dense_steps, measure_every_n_steps, prefix)
        self.dense_steps = dense_steps
        self.measure_every_n_steps = measure_every_n_steps
        self.prefix = prefix
        self._state_key: tuple[str | None, str] = (None, "")
        self._specs = (actors, critic, shared)
        self._announced = False  # the auto-detected roles are logged once
        self._log_every = log_every_n_steps
        self.roles: list[Role] = []
        self.bindings: dict[str, Binding] = {}
        self.last_logged: dict[str, float] = {}
        self.snapshot_bytes = 0  # the guard's only persistent allocation: actor snapshot buffers
        self.progress = Progress()
        self._flight = _InFlight()
        self._fit: _Fit | None = None
        self._actors: dict[str, Role] = {}

    # ------------------------------------------------------------------ public reads
    @property
    def actor_roles(self) -> list[Role]:
        return [r for r in self.roles if r.kind == "actor"]

    optimizer_steps = property(lambda self: self.progress.optimizer_steps, doc="Optimizer steps counted so far.")
    observes = property(lambda self: self.progress.observes, doc="observe() calls kept so far.")
    updates_per_rollout = property(lambda self: self.progress.updates_per_rollout,
                                   doc="Per actor role, the optimizer steps of its last finished rollout.")
    steps_skipped = property(lambda self: self.progress.steps_skipped,
                             doc="Per role, the optimizer steps announced but skipped (AMP's GradScaler).")

    @property
    def layout(self) -> Layout | None:
        return self._fit.layout if self._fit is not None else None

    @property
    def current_step(self) -> int:
        """The optimizer step findings and rows are filed under: the Trainer's ``global_step`` during a fit."""
        return self._fit.trainer.global_step if self._fit is not None else self.progress.optimizer_steps

    @property
    @override
    def state_key(self) -> str:
        if self._state_key[0] != self.prefix:  # Lightning reads it at every hook (a profiler label): cached
            self._state_key = (self.prefix, self._generate_state_key(prefix=self.prefix))
        return self._state_key[1]

    # ------------------------------------------------------------------ Lightning hooks (thin)
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._reset()  # before a checkpoint's state is loaded: a reused callback starts afresh

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resolve(pl_module)
        _warn_shared_prefix(trainer.callbacks, self)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._attach(trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch_start(batch_idx)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._after_backward()

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._before_optimizer_step(optimizer)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fit is not None:
            self._fit.training = False  # a loss helper reached from validation_step is not trained on

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fit is not None:
            self._fit.training = True

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._batch_end()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_end()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._detach()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach()

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.progress.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.progress = Progress.from_state(state_dict)

    # ------------------------------------------------------------------ the engine: set-up and tear-down
    def _reset(self) -> None:
        """A fresh start: progress, the step in flight and the fit's bindings (subclasses add their own)."""
        self._detach()
        self.progress, self._flight, self.last_logged = Progress(), _InFlight(), {}

    def _resolve(self, module: ModuleLike) -> None:
        # Resolve early so that a wrong path fails before any training; tensors are re-read at train start.
        self.roles = resolve_roles(module, *self._specs)
        self._actors = {r.name: r for r in self.roles if r.kind == "actor"}
        if self._specs[0] is None and not self._announced and isinstance(module, nn.Module):
            self._announced = True  # once per callback, on rank zero
            rank_zero_info(announcement(module, self.roles, type(self).__name__))

    def _attach(self, trainer: TrainerLike, module: ModuleLike) -> None:
        """Bind to a fit that is starting to train: the logging layout, the optimizers' step hooks, the roles."""
        self._detach()
        fit = self._fit = _Fit.start(trainer, module, self.prefix, self.roles,
                                     Cadence(self.dense_steps, self.measure_every_n_steps))
        for opt in trainer.optimizers:
            fit.cadence.clock(id(opt))
            fit.hooks.append(opt.register_step_pre_hook(self._optimizer_pre_step))
            fit.hooks.append(opt.register_step_post_hook(self._optimizer_post_step))
        self.refresh()

    def _detach(self) -> None:
        """Remove the optimizer hooks and drop everything bound to the fit (idempotent)."""
        fit, self._fit = self._fit, None
        if fit is not None:
            for handle in fit.hooks:
                handle.remove()
            fit.cache.close()
        self._flight = _InFlight()

    def _train_end(self) -> None:
        self._write_row()
        self._detach()

    def refresh(self) -> None:
        """Re-read the roles' tensors and the optimizers' param groups (host only); bindings and the fused step
        plans are rebuilt when they changed (see :class:`~lightning_ppo_guard._binding.RoleCache`)."""
        fit = self._fit
        if fit is None:
            return
        changed = fit.cache.refresh(self.roles, fit.trainer.optimizers, fit.module, self.progress.optimizer_steps)
        self.bindings = fit.cache.bindings
        if changed is not None:
            self.snapshot_bytes = fit.cache.snapshot_bytes
            self._flight.pre_clip = None
            if changed:
                self._roles_changed(changed)

    # ------------------------------------------------------------------ the engine: steps
    def _batch_start(self, batch_idx: int = 0) -> None:
        fit = self._fit
        if fit is None:
            return
        fit.batches += 1
        fit.fraction = _fit_fraction(fit.trainer, batch_idx)
        if fit.manual:  # a manual-optimization batch is usually one PPO iteration
            fit.cadence.start_segment(("batch", fit.batches), rollout=False)
        if fit.cadence.any_measuring():  # binding and lr are re-read on the cadence of the measurements
            self.refresh()

    def _after_backward(self) -> None:
        # Manual optimization: the user clips between backward and step, so measure here (AMP-scaled: undone
        # with the scaler's current scale). With accumulation, the last backward before the step wins.
        fit = self._fit
        if fit is not None and fit.manual and fit.cache.all_plan is not None and fit.cadence.any_measuring():
            scaler = fit.trainer.scaler
            scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
            self._flight.pre_clip = PreClip(fit.cache.all_plan, 1.0 / scale)

    def _before_optimizer_step(self, optimizer: Any) -> None:
        fit = self._fit
        if fit is None:
            return
        # A step that never ran since this optimizer's last on_before_optimizer_step was skipped (GradScaler).
        if id(optimizer) in self._flight.awaiting:
            self._skipped(id(optimizer))
        self._flight.awaiting.add(id(optimizer))
        # Automatic optimization: Lightning has unscaled the gradients already (AMP) and clips right after this hook.
        if not fit.manual and fit.cache.all_plan is not None and fit.cadence.measuring(id(optimizer)):
            self._flight.pre_clip = PreClip(fit.cache.all_plan, 1.0)

    def _optimizer_pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        fit = self._fit
        if fit is None or not fit.cadence.measuring(id(optimizer)):
            return
        if fit.cache.lazy:  # lazy parameters materialise at the first forward: measure them from now on
            self.refresh()
        plan = fit.cache.plans.get(id(optimizer))
        if plan is not None:
            self._flight.param_sq[id(optimizer)] = plan.before()
            self._flight.groups[id(optimizer)] = [step_groups(self.bindings[r.name], fit.trainer.optimizers)
                                                  for r in plan.roles]

    def _optimizer_post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # every step of every optimizer runs this: the unmeasured path is kept to a few dict operations
        fit, flight, key = self._fit, self._flight, id(optimizer)
        if fit is None:
            return
        flight.awaiting.discard(key)
        plan = fit.cache.plans.get(key)
        if plan is None:
            return
        self.progress.count_step(plan.actors)
        fit.steps_since_row += 1
        param_sq = flight.param_sq.pop(key, None) if flight.param_sq else None
        cadence = fit.cadence
        counted = param_sq is not None and cadence.counting_nonzero(key)
        cadence.stepped(key, measured=param_sq is not None)
        if fit.cache.trunk is not None:
            fit.cache.hook_trunk(cadence)
        if param_sq is not None:
            pre = flight.pre_clip
            block, nones, mask = plan.measure(param_sq, pre, counted)
            if pre is not None and not pre.unused:
                flight.pre_clip = None
            fit.rows.queue(block, mask, plan.slots)
            step, groups = self.current_step, flight.groups.pop(key)
            segment = fit.cadence.segments if fit.cadence.segment_id is not None else None
            self._stepped([StepRecord(name, step, block[i], nones[i], groups[i], segment, fit.fraction)
                           for i, name in enumerate(plan.names)])
        if self._log_every is not None and fit.steps_since_row >= self._log_every:
            self._write_row()

    def _skipped(self, opt_id: int) -> None:
        self._flight.awaiting.discard(opt_id)
        self._flight.param_sq.pop(opt_id, None)
        plan = self._fit.cache.plans.get(opt_id) if self._fit is not None else None
        if plan is None:
            return
        self.progress.count_skipped(plan.names)
        self._step_skipped(plan.names)

    def _batch_end(self) -> None:
        fit = self._fit
        if fit is None:
            return
        for opt_id in list(self._flight.awaiting):  # a batch ended with a step announced but never run
            self._skipped(opt_id)
        if self._log_every is None:
            fit.batches_since_row += 1
            if fit.batches_since_row >= max(1, int(fit.trainer.log_every_n_steps)):
                self._write_row()

    # ------------------------------------------------------------------ the engine: observe
    def observe(self, **inputs: Any) -> None:
        """Record one minibatch of the policy term; the arguments are those of :func:`lightning_ppo_guard.observe`."""
        kept = self._keep(inputs.get("role", "actor"), PolicyTerm.rollout_id(inputs.get("rollout")))
        if kept is not None:
            self._observe(PolicyTerm.build(**inputs), kept)

    def _keep(self, role: str, rollout: int | None) -> _Kept | None:
        """The bookkeeping every ``observe`` gets (its rollout), and whether this one is kept: measured, or a
        rollout's first minibatch. None outside training (validation) or under ``torch.no_grad()``."""
        # The hot path (every minibatch, most not kept) is written flat: few calls, no allocation.
        fit = self._fit
        if fit is None or not fit.training or not torch.is_grad_enabled():
            return None
        actor = self._actors.get(role) or actor_role(self._actors, role)
        name, progress = actor.name, self.progress
        first_in_rollout, prev_updates, prev_observes = False, None, None
        inferred = rollout is None and fit.manual and fit.infer_rollouts  # no rollout id: a manual batch is one
        if inferred:
            rollout = fit.batches
        if rollout is not None and progress.rollout.get(name) != rollout:
            first_in_rollout, prev_updates, prev_observes = progress.enter_rollout(name, rollout)
            if not inferred:  # manual batches are segments already
                fit.cadence.start_segment(("rollout", rollout), rollout=True)
            elif prev_observes is not None and prev_observes <= 1:
                fit.one_minibatch_batches += 1
                if fit.one_minibatch_batches >= 2:  # two batches of one minibatch each: batches are minibatches
                    fit.infer_rollouts = False
                    progress.updates_per_rollout.pop(name, None)
        counts = progress.rollout_observes
        counts[name] = counts.get(name, 0) + 1
        key = fit.cache.keys.get(name, 0)
        measured = fit.cadence.measuring(key)
        if not (first_in_rollout or measured):
            return None
        # the first minibatch's ratio (PPG105) is read at the first 16 rollouts, then at 1 in 4
        light = first_in_rollout and fit.cadence.sampled_segment()
        return _Kept(actor, first_in_rollout, prev_updates, measured, light, rollout, inferred, prev_observes)

    def _boundary(self, kept: _Kept) -> None:
        """A rollout's first minibatch whose ratio is not read: it only ends the previous rollout."""
        self._observed(ObserveRecord(kept.role.name, self.current_step, kept.rollout, True, None, None,
                                     kept.prev_updates, inferred=kept.inferred, prev_observes=kept.prev_observes),
                       None, kept.role)

    def _observe(self, term: PolicyTerm, kept: _Kept) -> None:
        fit = self._fit
        if fit is None:
            return
        role, measured, progress = kept.role, kept.measured, self.progress
        name = role.name
        if term.empty:
            rank_zero_warn("observe() got an empty new_logp/old_logp and skipped it; pass the minibatch's "
                           "log-probs.", category=PPOGuardWarning)
            return
        if not (measured or kept.light):
            self._boundary(kept)
            return
        # an off-cadence first minibatch feeds the first-minibatch rules only (its ratio), and is not logged
        stats = term.statistics(full=measured)
        if "entropy" in stats:
            stats["entropy_drift"] = stats["entropy"] - progress.entropy0.setdefault(name, stats["entropy"])
        values, present = stack(stats, fit.layout.observe_names)
        if measured:
            fit.rows.queue(values, fit.rows.mask(present), fit.observe_slots[name])
        progress.observes += 1
        self._observed(ObserveRecord.of(term, kept, self.current_step, values), term, role)

    # ------------------------------------------------------------------ the engine: rows and host reads
    def _to_host(self, parts: list[Tensor]) -> list[float]:
        """One device-to-host transfer for ``parts``, settling the pending clip-inference checks with it."""
        return transfer(parts, self._fit.cache.every_plan() if self._fit is not None else [])

    def _write_row(self) -> None:
        """Reduce the interval's statistics (over ranks too) and log them: one host transfer."""
        fit = self._fit
        if fit is None:
            return
        fit.steps_since_row = fit.batches_since_row = 0
        host = host_values(self.prefix, self.bindings, self.progress.steps_skipped, self.progress.updates_per_rollout)
        metrics = fit.rows.row(host, self._to_host)
        if metrics is None:
            return
        self.last_logged = metrics
        if metrics and fit.trainer.is_global_zero:
            for logger in fit.trainer.loggers:
                logger.log_metrics(metrics, step=fit.trainer.global_step)

    # ------------------------------------------------------------------ extension points (PPOGuard overrides)
    def _roles_changed(self, roles: list[Role]) -> None:
        """A refresh found other tensors in these roles."""

    def _observed(self, record: ObserveRecord, term: PolicyTerm | None, role: Role) -> None:
        """After each kept ``observe``, with the live inputs (which must not be kept; None at a rollout boundary
        whose minibatch was not read)."""

    def _stepped(self, records: list[StepRecord]) -> None:
        """After each measured optimizer step, with its device-side records (one per role of the optimizer)."""

    def _step_skipped(self, roles: list[str]) -> None:
        """An optimizer step of these roles was announced but never ran (AMP's GradScaler skipped it)."""

