"""``PPOMonitor``: measure every optimizer step of the actor(s) and critic, and log it.

A Trainer callback over :class:`~lightning_ppo_guard.engine.MonitorEngine`: each Lightning hook calls one public
method of the engine (the Fabric adapter calls the same ones), and what the engine measured is published as named
records to one listener (the guard's diagnostics). See :mod:`lightning_ppo_guard.engine` for what is measured,
where, and at which cost.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_ppo_guard._binding import Binding
from lightning_ppo_guard._protocols import TrainerLike
from lightning_ppo_guard._warnings import PPOGuardWarning
from lightning_ppo_guard.engine import Listener, MonitorEngine, ObserveRecord, Progress, StepRecord, validate
from lightning_ppo_guard.metrics import Layout
from lightning_ppo_guard.observe import observe
from lightning_ppo_guard.roles import PartsSpec, Role, RoleSpec

__all__ = ["Binding", "ObserveRecord", "PPOMonitor", "Progress", "StepRecord"]


def warn(message: str) -> None:
    """A warning of ours, once, from rank zero (what the Lightning adapters give their engine)."""
    rank_zero_warn(message, category=PPOGuardWarning)


def _warn_shared_prefix(callbacks: list[Any], monitor: PPOMonitor) -> None:
    ours = [cb for cb in callbacks if isinstance(cb, PPOMonitor) and cb.prefix == monitor.prefix]
    if len(ours) > 1 and ours[-1] is monitor:
        warn(f"{len(ours)} PPOMonitor/PPOGuard callbacks log under the same prefix {monitor.prefix!r}, so their "
             "rows mix; give each its own, e.g. PPOGuard(prefix='guard2').")


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
        dense_steps: measure every step of each optimizer for this many steps from the start of fit (8: the
            longest run of measured steps a step rule needs, PPG204's; without rollouts, a learning rate of 0 at
            the start gets 16, PPG003's), ...
        measure_every_n_steps: ... then each rollout's (predicted) last step, and one step in n inside longer
            rollouts (see ``lightning_ppo_guard._cadence``). ``1`` measures every step for the whole run.
        overhead_budget: the share of a rollout's time the measurements may take after the first 5 rollouts
            (default 0.5%: with the dense start, the first 5 rollouts and the unmeasured steps' bookkeeping, the
            whole fit stays under 2%). Where a measured rollout costs the guard more than that (short rollouts of a
            small model), it measures 1 rollout in ``k`` from then on, ``k`` chosen once from the timed rollouts and
            announced; the first 5 rollouts are always measured, and so are the 4 after any learning rate dropped
            100x or to 0. A rollout left out is no evidence either way, so a fault that starts later is named up
            to ``k`` rollouts later. ``None`` measures every rollout. Off under a process group (every rank must measure
            the same steps).
        prefix: first component of every logged key; give each monitor of one Trainer its own.
        listener: who receives the engine's records (:class:`~lightning_ppo_guard.engine.Listener`);
            :class:`~lightning_ppo_guard.PPOGuard` passes its :class:`~lightning_ppo_guard.diagnostics.Diagnostics`.

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
        dense_steps: int = 8,
        measure_every_n_steps: int = 64,
        overhead_budget: float | None = 0.005,
        prefix: str = "ppo_guard",
        listener: Listener | None = None,
    ) -> None:
        super().__init__()
        validate(log_every_n_steps, dense_steps, measure_every_n_steps, prefix, overhead_budget)
        self.engine = MonitorEngine(actors, critic, shared=shared, log_every_n_steps=log_every_n_steps,
                                    dense_steps=dense_steps, measure_every_n_steps=measure_every_n_steps,
                                    overhead_budget=overhead_budget, prefix=prefix, name=type(self).__name__,
                                    warn=warn, info=rank_zero_info, listener=listener)
        self._state_key = self._generate_state_key(prefix=prefix)  # Lightning reads it at every hook: built once

    # ------------------------------------------------------------------ public reads (the engine's)
    dense_steps = property(lambda self: self.engine.dense_steps, doc="Steps measured densely from the start.")
    measure_every_n_steps = property(lambda self: self.engine.measure_every_n_steps,
                                     doc="One step in n measured inside long rollouts after the dense start.")
    overhead_budget = property(lambda self: self.engine.overhead_budget,
                               doc="The share of the training time the measurements may take (None: no limit).")
    thinning = property(lambda self: self.engine.thinning,
                        doc="``(k, first)`` when the overhead budget measured 1 rollout in k from rollout ``first`` "
                            "on; None when every rollout was measured.")
    prefix = property(lambda self: self.engine.prefix, doc="First component of every logged key.")
    roles = property(lambda self: self.engine.roles, doc="The resolved roles (after ``on_fit_start``).")
    bindings = property(lambda self: self.engine.bindings, doc="Per role, its optimizer binding at the last read.")
    last_logged = property(lambda self: self.engine.last_logged, doc="The last row logged (key -> value).")
    snapshot_bytes = property(lambda self: self.engine.snapshot_bytes,
                              doc="The only persistent allocation: the moving roles' snapshot buffers.")
    optimizer_steps = property(lambda self: self.engine.tally().optimizer_steps,
                               doc="Optimizer steps counted so far.")
    observes = property(lambda self: self.engine.progress.observes, doc="observe() calls kept so far.")
    updates_per_rollout = property(lambda self: self.engine.progress.updates_per_rollout,
                                   doc="Per actor role, the optimizer steps of its last finished rollout.")
    steps_skipped = property(lambda self: self.engine.progress.steps_skipped,
                             doc="Per role, the optimizer steps announced but skipped (AMP's GradScaler).")

    @property
    def progress(self) -> Progress:
        """The engine's progress through the fit (checkpointed), its step counts up to date."""
        return self.engine.tally()

    @progress.setter
    def progress(self, value: Progress) -> None:
        self.engine.progress = value

    @property
    def actor_roles(self) -> list[Role]:
        return self.engine.actor_roles

    @property
    def layout(self) -> Layout | None:
        return self.engine.fit.layout if self.engine.fit is not None else None

    @property
    def current_step(self) -> int:
        """The optimizer step findings and rows are filed under: the Trainer's ``global_step`` during a fit."""
        return self.engine.current_step

    def refresh(self) -> None:
        """Re-read the roles' tensors and the optimizers' param groups (see :meth:`MonitorEngine.refresh`)."""
        self.engine.refresh()

    def observe(self, **inputs: Any) -> None:
        """Record one minibatch of the policy term: ``observe(self, **inputs)`` (the monitor is one of the keys its
        engine attaches to); the arguments are those of :func:`lightning_ppo_guard.observe`."""
        observe(self, **inputs)

    def decide(self, host: TrainerLike) -> None:
        """At a batch end, after the engine's: act on what was concluded (the monitor concludes nothing)."""

    def finish(self, host: TrainerLike) -> None:
        """Training ends: the engine reads what is pending, writes its last row and detaches."""
        self.engine.train_end()

    @property
    @override
    def state_key(self) -> str:
        return self._state_key

    # ------------------------------------------------------------------ Lightning hooks (thin)
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.engine.reset()  # before a checkpoint's state is loaded: a reused callback starts afresh

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.engine.resolve(pl_module)
        _warn_shared_prefix(getattr(trainer, "callbacks", []), self)  # set by the Trainer at init

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # observe(self, ...) in a LightningModule, and observe(guard, ...) anywhere, reach the engine
        self.engine.attach(trainer, pl_module, keys=(pl_module, self))

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.engine.batch_start(batch_idx)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.engine.after_backward()

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.engine.before_optimizer_step(optimizer)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.engine.training = False  # a loss helper reached from validation_step is not trained on

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.engine.training = True

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.engine.batch_end()
        self.decide(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.finish(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.engine.detach()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.engine.detach()

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.engine.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.engine.load_state_dict(state_dict)
