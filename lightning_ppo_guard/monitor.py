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

A measured step is a fixed handful of fused multi-tensor ops for all roles together
(:class:`~lightning_ppo_guard._plan.StepPlan`). Numbers stay on the device: each measurement is queued as
it is and folded into :class:`~lightning_ppo_guard.metrics.VectorStats` (reduced over the interval and
across ranks) when a row is logged; one transfer to the host per logging interval.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.distributions import Distribution
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_ppo_guard import functional as F
from lightning_ppo_guard._plan import StepPlan
from lightning_ppo_guard._warnings import PPOGuardWarning
from lightning_ppo_guard.metrics import (
    OBSERVE_METRICS,
    STEP_METRICS,
    VectorStats,
    metric_key,
)
from lightning_ppo_guard.roles import Role, RoleSpec, resolve_roles

__all__ = ["Binding", "ObserveRecord", "PPOMonitor", "StepRecord"]


class Binding:
    """How a role's trainable tensors are held by the optimizers (host values, read at each refresh)."""

    __slots__ = ("fraction", "lr", "optimizers", "stale_tensors")

    def __init__(self, fraction: float, lr: float, optimizers: tuple[int, ...], stale_tensors: int) -> None:
        self.fraction = fraction  # share of trainable elements held by some param group
        self.lr = lr  # smallest lr among the groups holding the role (nan when unbound)
        self.optimizers = optimizers  # indices of the optimizers holding part of the role
        self.stale_tensors = stale_tensors  # tensors held by those optimizers that are no model parameter


class _PreClip:
    """The gradient norms every role had after backward, waiting for the optimizer step(s) that use them."""

    __slots__ = ("inv_scale", "norms", "per_tensor", "state", "unused")

    def __init__(self, norms: Tensor, per_tensor: Tensor | None, inv_scale: float,
                 state: tuple[tuple[int, int], ...], unused: set[str]) -> None:
        self.norms, self.per_tensor = norms, per_tensor  # per role (all-roles plan order), per tensor
        self.inv_scale = inv_scale  # 1 / AMP scale of the gradients they were taken from
        self.state = state  # identity and version of each gradient then (StepPlan.grad_state)
        self.unused = unused  # roles whose step has not used them yet


class StepRecord:
    """One optimizer step of one role, still on the device (``values`` follows ``STEP_METRICS``)."""

    __slots__ = ("grad_none", "role", "step", "values")

    def __init__(self, role: str, step: int, values: Tensor, grad_none: int) -> None:
        self.role, self.step, self.values, self.grad_none = role, step, values, grad_none


class ObserveRecord:
    """One ``observe`` call of one actor role, still on the device (``values`` follows ``OBSERVE_METRICS``)."""

    __slots__ = ("first_in_rollout", "mask", "prev_updates", "role", "rollout", "step", "target_kl", "values")

    def __init__(self, role: str, step: int, rollout: int | None, first_in_rollout: bool,
                 target_kl: float | None, values: Tensor, mask: tuple[bool, ...], prev_updates: int | None) -> None:
        self.role, self.step, self.rollout, self.first_in_rollout = role, step, rollout, first_in_rollout
        self.target_kl, self.values, self.mask = target_kl, values, mask
        self.prev_updates = prev_updates  # actor steps of the rollout this one's first observe ends


# The light vector of an off-cadence first minibatch: [approx_kl, ratio_dev, NaN...] permuted to OBSERVE_METRICS.
_FIRST_PATTERN = tuple(spec.name in ("approx_kl", "ratio_dev") for spec in OBSERVE_METRICS)
_FIRST_ORDER = [0 if spec.name == "approx_kl" else 1 if spec.name == "ratio_dev" else 2 for spec in OBSERVE_METRICS]


def _lr(group: dict[str, Any]) -> float:
    lr = group.get("lr", math.nan)
    return float(lr.item() if isinstance(lr, Tensor) else lr)


def _check_logp(name: str, t: Any) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"observe(): {name} must be a torch.Tensor of log-probabilities, got {type(t).__name__}.")
    if not t.is_floating_point():
        raise TypeError(
            f"observe(): {name} has dtype {t.dtype}; log-probabilities are floating point. "
            "Pass dist.log_prob(actions), not the actions or their indices."
        )
    return t


def _check_optional(name: str, t: Any, like: Tensor) -> Tensor | None:
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"observe(): {name} must be a torch.Tensor or None, got {type(t).__name__}.")
    if not t.is_floating_point():
        raise TypeError(f"observe(): {name} has dtype {t.dtype}; pass floating-point values (e.g. .float()).")
    if t.device != like.device:
        raise ValueError(f"observe(): {name} is on {t.device} but new_logp is on {like.device}; move it first.")
    if t.numel() != like.numel():
        raise ValueError(
            f"observe(): {name} has shape {tuple(t.shape)} ({t.numel()} values) but new_logp has shape "
            f"{tuple(like.shape)}; pass one value per sample of the minibatch."
        )
    return t


class PPOMonitor(Callback):
    r"""Measure the actor's (and critic's) gradients, updates and policy movement at every optimizer step,
    and log them to the Trainer's loggers under ``ppo_guard/<role>/<metric>``.

    Add it to ``Trainer(callbacks=[...])`` and call :func:`~lightning_ppo_guard.observe` once per minibatch
    update where the PPO loss is built. :class:`~lightning_ppo_guard.PPOGuard` extends it with diagnoses.

    Args:
        actors: the actor role(s): an attribute path (``"actor"``, ``"model.policy"``), a module, a
            ``ModuleList``/``ModuleDict`` path (one role per agent: ``agent_0``, ...), or a list/dict of
            paths or modules. ``None`` auto-detects ``actors``, ``actor``, ``policies``, ``policy``, ``pi``.
        critic: the critic's path or module; ``None`` auto-detects ``critic``, ``value``, ``vf``; a module
            without one has no critic role.
        log_every_n_steps: optimizer steps per logged row; ``None`` logs when Lightning logs: every
            ``Trainer(log_every_n_steps=...)`` training batches (a manual-optimization PPO batch may hold many
            optimizer steps; the row then holds their reduction).
        dense_steps: measure every optimizer step for this many steps from the start of fit (where stalls are
            found), ...
        measure_every_n_steps: ... then every n-th step. ``1`` measures every step for the whole run. The
            first minibatch of each rollout is always observed, so rollout counts stay exact.
        prefix: first component of every logged key.

    Example::

        trainer = Trainer(callbacks=[PPOMonitor()])
        # in training_step, once per minibatch, before backward:
        observe(self, new_logp=new_logp, old_logp=b_logp, advantages=adv, clip_eps=0.2, dist=dist)
    """

    def __init__(
        self,
        actors: RoleSpec = None,
        critic: str | nn.Module | None = None,
        *,
        log_every_n_steps: int | None = None,
        dense_steps: int = 128,
        measure_every_n_steps: int = 64,
        prefix: str = "ppo_guard",
    ) -> None:
        super().__init__()
        if log_every_n_steps is not None and (not isinstance(log_every_n_steps, int) or log_every_n_steps < 1):
            raise ValueError(f"log_every_n_steps must be a positive int or None, got {log_every_n_steps!r}.")
        if not isinstance(dense_steps, int) or dense_steps < 0:
            raise ValueError(f"dense_steps must be an int >= 0, got {dense_steps!r}.")
        if not isinstance(measure_every_n_steps, int) or measure_every_n_steps < 1:
            raise ValueError(f"measure_every_n_steps must be an int >= 1, got {measure_every_n_steps!r}.")
        self.dense_steps = dense_steps
        self.measure_every_n_steps = measure_every_n_steps
        if not isinstance(prefix, str) or not prefix or "/" in prefix:
            raise ValueError(f"prefix must be a non-empty string without '/', got {prefix!r}.")
        self._actors_spec = actors
        self._critic_spec = critic
        self._log_every = log_every_n_steps
        self._log_every_batches = 1
        self._batches_since_flush = 0
        self.prefix = prefix

        self.roles: list[Role] = []
        self.bindings: dict[str, Binding] = {}
        self._trainer: pl.Trainer | None = None
        self._module: pl.LightningModule | None = None
        self._active = False
        self._hooks: list[RemovableHandle] = []
        self._plans: dict[int, StepPlan] = {}  # id(optimizer) -> the fused measurement of its roles
        self._all_plan: StepPlan | None = None  # every role: the pre-clip norms
        self._fingerprint: tuple[Any, ...] = ()
        self._role_modules: tuple[int, ...] = ()
        self._next_role_scan = 0
        self._pre_clip: _PreClip | None = None
        self._at_step: dict[int, Tensor] = {}  # the actors' squared parameter norms before the step
        self._comparisons: list[tuple[StepPlan, Tensor]] = []  # post-clip inference checks, read at the next transfer
        self._snapshots: dict[str, list[Tensor]] = {}
        self.snapshot_bytes = 0  # the guard's only persistent allocation: actor snapshot buffers
        self._stats: VectorStats | None = None
        self._queued: list[tuple[Tensor, Tensor, Tensor]] = []  # (values, mask, slots) not yet in _stats
        self._step_offset: dict[str, int] = {}
        self._obs_offset: dict[str, int] = {}
        self._obs_slots: dict[str, Tensor] = {}
        self._masks: dict[tuple[bool, ...], Tensor] = {}
        self._first_order: dict[torch.device, Tensor] = {}
        self._steps_since_flush = 0
        self.last_logged: dict[str, float] = {}
        self._keys: list[tuple[str, str, int]] = []
        self._last_host: dict[str, float] = {}
        # progress, kept in state_dict
        self.optimizer_steps = 0
        self.observes = 0
        self._entropy0: dict[str, float | Tensor] = {}
        self._rollout: dict[str, int | None] = {}
        self._rollout_steps: dict[str, int] = {}
        self.updates_per_rollout: dict[str, int] = {}
        self.steps_skipped: dict[str, int] = {}
        self._awaiting: set[int] = set()  # optimizers past on_before_optimizer_step whose step has not run

    # ------------------------------------------------------------------ set-up
    @property
    def actor_roles(self) -> list[Role]:
        return [r for r in self.roles if r.kind == "actor"]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Resolve early so that a wrong path fails before any training; tensors are re-read at train start.
        self.roles = resolve_roles(pl_module, self._actors_spec, self._critic_spec)
        self._log_every_batches = max(1, int(trainer.log_every_n_steps))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer, self._module = trainer, pl_module
        # One Metric for every role's step and observe statistics: one update per measured role, one compute.
        offset = 0
        for role in self.roles:
            self._step_offset[role.name] = offset
            offset += len(STEP_METRICS)
        for role in self.actor_roles:
            self._obs_offset[role.name] = offset
            offset += len(OBSERVE_METRICS)
        self._stats = VectorStats(offset).to(pl_module.device)
        self._obs_slots = {name: torch.arange(o, o + len(OBSERVE_METRICS), device=pl_module.device)
                           for name, o in self._obs_offset.items()}
        # (logged key, reduction, slot) of every statistic, in the order rows are written
        self._keys = [(metric_key(self.prefix, role.name, spec.name), spec.reduce, offset + j)
                      for role in self.roles
                      for specs, offset in ([(STEP_METRICS, self._step_offset[role.name])]
                                            + ([(OBSERVE_METRICS, self._obs_offset[role.name])]
                                               if role.kind == "actor" else []))
                      for j, spec in enumerate(specs) if spec.roles == "all" or role.kind == "actor"]
        self._last_host = {}
        self._fingerprint = self._role_modules = ()
        self._next_role_scan = 0
        for opt in trainer.optimizers:
            self._hooks.append(opt.register_step_pre_hook(self._optimizer_pre_step))
            self._hooks.append(opt.register_step_post_hook(self._optimizer_post_step))
        self.refresh()
        self._active = True

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush()
        self._detach_hooks()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._detach_hooks()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach_hooks()

    def _detach_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._active = False
        self._snapshots.clear()
        self._plans.clear()
        self._all_plan = None
        self._fingerprint = self._role_modules = ()
        self._next_role_scan = 0
        self._pre_clip = None
        self._at_step.clear()
        self._comparisons.clear()
        self._awaiting.clear()

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.measuring():  # binding and lr are re-read on the cadence of the measurements
            self.refresh()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        for opt_id in list(self._awaiting):  # a batch ended with a step announced but never run
            self._skipped(opt_id)
        if self._log_every is None and self._active:
            self._batches_since_flush += 1
            if self._batches_since_flush >= self._log_every_batches:
                self._flush()

    def measuring(self) -> bool:
        """Whether the coming optimizer step is measured (dense at the start, then every n-th step)."""
        n = self.optimizer_steps
        return n < self.dense_steps or n % self.measure_every_n_steps == 0

    def refresh(self) -> None:
        """Re-read the roles' tensors and the optimizers' param groups (host-only work, no device sync).

        Cheap when nothing changed (the learning rates are re-read); bindings and the fused step plans are
        rebuilt when a role's tensors or an optimizer's param groups differ from the last refresh.
        """
        if self._module is None or self._trainer is None:
            return
        # Walking a role's modules costs more than the rest: do it when the module at a role's path is another
        # object (a replaced actor), when the param groups changed, and every 64 optimizer steps.
        optimizers = self._trainer.optimizers
        fingerprint = tuple(id(p) for opt in optimizers for g in opt.param_groups for p in g["params"])
        modules = tuple(id(self._module.get_submodule(r.path)) if r.path else id(self._module) for r in self.roles)
        changed: list[Role] = []
        if (fingerprint != self._fingerprint or modules != self._role_modules
                or self.optimizer_steps >= self._next_role_scan):
            changed = [r for r in self.roles if r.refresh(self._module) or r.name not in self._snapshots]
            self._role_modules, self._next_role_scan = modules, self.optimizer_steps + 64
        if not changed and fingerprint == self._fingerprint:
            for role in self.roles:  # schedulers move the learning rate: re-read it
                binding = self.bindings[role.name]
                if binding.optimizers:
                    binding.lr = min(_lr(g) for i in binding.optimizers for g in optimizers[i].param_groups
                                     if any(id(p) in role.ids for p in g["params"]))
            return
        self._fingerprint = fingerprint
        held: dict[int, tuple[int, float]] = {}
        for idx, opt in enumerate(optimizers):
            for group in opt.param_groups:
                lr = _lr(group)
                for p in group["params"]:
                    held[id(p)] = (idx, lr)
        model_ids = {id(p) for p in self._module.parameters()}
        stale_by_opt = [
            sum(1 for g in opt.param_groups for p in g["params"] if id(p) not in model_ids) for opt in optimizers
        ]
        opt_roles: dict[int, list[Role]] = {i: [] for i in range(len(optimizers))}
        unbound: list[Role] = []
        for role in self.roles:
            bound_elems, lrs, opts = 0, [], set()
            for p in role.params:
                hit = held.get(id(p))
                if hit is not None:
                    bound_elems += p.numel()
                    opts.add(hit[0])
                    lrs.append(hit[1])
            fraction = bound_elems / role.numel if role.numel else 0.0
            stale = sum(stale_by_opt[i] for i in opts) if opts else sum(stale_by_opt)
            self.bindings[role.name] = Binding(fraction, min(lrs) if lrs else math.nan, tuple(sorted(opts)), stale)
            for i in opts:
                opt_roles[i].append(role)
            if not opts:
                unbound.append(role)
        for role in changed:
            # Preallocated once per set of tensors: the step hooks never allocate snapshot memory.
            self._snapshots[role.name] = (
                [torch.empty_like(p, memory_format=torch.preserve_format) for p in role.params]
                if role.kind == "actor" else []
            )
        self.snapshot_bytes = sum(b.numel() * b.element_size() for bufs in self._snapshots.values() for b in bufs)
        # A role no optimizer holds is measured across every optimizer step: its update must be 0.
        device = self._device()
        self._plans = {
            id(opt): StepPlan(opt_roles[i] + unbound, self._snapshots, self._step_offset, device)
            for i, opt in enumerate(optimizers)
        }
        # Every role's pre-clip norms: the one optimizer's own plan when it steps every role (the usual case).
        every = sorted(r.name for r in self.roles)
        self._all_plan = next((p for p in self._plans.values() if sorted(p.names) == every), None) or StepPlan(
            self.roles, self._snapshots, self._step_offset, device)
        self._pre_clip = None
        if changed:
            self._on_roles_changed(changed)

    def _on_roles_changed(self, roles: list[Role]) -> None:
        """Called after a refresh found different tensors in some role (hook for the guard)."""

    # ------------------------------------------------------------------ gradients
    def _grad_scale(self) -> float:
        scaler = self._trainer.scaler if self._trainer is not None else None
        if scaler is None or not scaler.is_enabled():
            return 1.0
        return float(scaler.get_scale())

    def _measure_pre_clip(self, inv_scale: float) -> None:
        plan = self._all_plan
        if plan is not None:
            norms, per_tensor = plan.grad_norms()
            self._pre_clip = _PreClip(norms, per_tensor, inv_scale, plan.grad_state(), set(plan.names))

    def counting_nonzero(self, n: int) -> bool:
        """Whether measured step ``n`` counts nonzero gradients: each dense step, then 1 measured step in 8."""
        return n < self.dense_steps or (n // self.measure_every_n_steps) % 8 == 0

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Manual optimization: the user clips between backward and step, so measure here (AMP-scaled:
        # undone with the scaler's current scale). With accumulation, the last backward before the step wins.
        if self._active and not pl_module.automatic_optimization and self.measuring():
            self._measure_pre_clip(1.0 / self._grad_scale())

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if not self._active:
            return
        # A step that never ran since this optimizer's last on_before_optimizer_step was skipped (GradScaler).
        if id(optimizer) in self._awaiting:
            self._skipped(id(optimizer))
        self._awaiting.add(id(optimizer))
        # Automatic optimization: Lightning has unscaled the gradients already (AMP) and clips right after this hook.
        if pl_module.automatic_optimization and self.measuring():
            self._measure_pre_clip(1.0)

    def _optimizer_pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._active and self.measuring():
            plan = self._plans.get(id(optimizer))
            if plan is not None:
                self._at_step[id(optimizer)] = plan.before()

    def _post_clip_norms(self, plan: StepPlan) -> Tensor:
        """Per-tensor norms of the gradients the optimizer steps with: reused, inferred or measured.

        Reused when nothing wrote the gradients since the norms taken after backward (same tensors, same
        version counters: no clipping). When a clip rewrote the same tensors, every such step is measured and
        compared with the inference from the roles' probes (``StepPlan.inferred_norms``, large models only)
        until 4 comparisons agreed to 1e-4; from then on the norms are inferred and 1 such step in 8 is still
        measured and compared. One disagreement (a clip by value, a mask, a per-tensor rescale) ends the
        inference for this plan. Comparisons are read back with the next transfer to the host, never with a
        transfer of their own.
        """
        pre = self._pre_clip
        if pre is None or pre.per_tensor is None or pre.inv_scale != 1.0 or plan is not self._all_plan:
            return plan.post_norms()
        state = plan.grad_state()
        if state == pre.state:
            return pre.per_tensor
        if plan.inferring is False or any(a[0] != b[0] or a[0] == 0 for a, b in zip(state, pre.state, strict=True)):
            return plan.post_norms()  # inference ruled out, or other gradient tensors (or none): nothing to scale
        plan.clipped_steps += 1
        if plan.inferring and plan.clipped_steps % 8 != 0:
            return plan.inferred_norms(pre.per_tensor)
        measured = plan.post_norms()
        self._comparisons.append((plan, plan.deviation(measured, pre.per_tensor)))
        return measured

    def _take_comparisons(self) -> tuple[list[StepPlan], list[Tensor]]:
        """The inference checks waiting for a transfer to the host (the caller adds them to its own)."""
        pending, self._comparisons = self._comparisons, []
        return [p for p, _ in pending], [d.reshape(1).float() for _, d in pending]

    @staticmethod
    def _read_comparisons(plans: list[StepPlan], gaps: list[float]) -> None:
        for plan, gap in zip(plans, gaps, strict=True):
            if not gap <= 1e-4:  # NaN disagrees too
                plan.inferring = False
            elif plan.inferring is None:
                plan.agreed += 1
                if plan.agreed >= 4:
                    plan.inferring = True

    def _pre_clip_for(self, plan: StepPlan) -> tuple[Tensor | None, float]:
        """The pre-clip norms of ``plan``'s roles from the last backward, each used by one step only."""
        pre = self._pre_clip
        if pre is None or self._all_plan is None or not pre.unused.issuperset(plan.names):
            return None, 1.0
        pre.unused.difference_update(plan.names)
        if not pre.unused:
            self._pre_clip = None
        if plan is self._all_plan:
            return pre.norms, pre.inv_scale
        return pre.norms[[self._all_plan.names.index(n) for n in plan.names]], pre.inv_scale

    def _optimizer_post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._active:
            return
        self._awaiting.discard(id(optimizer))
        plan = self._plans.get(id(optimizer))
        if plan is None:
            return
        for role in plan.actors:
            self._rollout_steps[role.name] = self._rollout_steps.get(role.name, 0) + 1
        self.optimizer_steps += 1
        self._steps_since_flush += 1
        param_sq = self._at_step.pop(id(optimizer), None)
        if param_sq is not None:
            counted = self.counting_nonzero(self.optimizer_steps - 1)
            post = self._post_clip_norms(plan)
            pre, inv_scale = self._pre_clip_for(plan)
            block, nones = plan.after(param_sq, pre, inv_scale, counted, post)
            self._queue(block.reshape(-1), plan.mask if counted else plan.mask_without_nonzero, plan.slots)
            step = self._trainer.global_step if self._trainer is not None else self.optimizer_steps - 1
            self._on_step([StepRecord(name, step, block[i], nones[i]) for i, name in enumerate(plan.names)])
        if self._log_every is not None and self._steps_since_flush >= self._log_every:
            self._flush()

    def _skipped(self, opt_id: int) -> None:
        self._awaiting.discard(opt_id)
        self._at_step.pop(opt_id, None)
        plan = self._plans.get(opt_id)
        if plan is None:
            return
        for name in plan.names:
            self.steps_skipped[name] = self.steps_skipped.get(name, 0) + 1
        self._on_skipped(plan.names)

    def _on_skipped(self, roles: list[str]) -> None:
        """Called when an optimizer step of these roles was skipped (hook for the guard)."""

    def _on_step(self, records: list[StepRecord]) -> None:
        """Called after each optimizer step with the device-side records (hook for the guard)."""

    def _device(self) -> torch.device:
        return self._module.device if self._module is not None else torch.device("cpu")

    def _mask(self, pattern: tuple[bool, ...], device: torch.device) -> Tensor:
        key = (*pattern, str(device))
        mask = self._masks.get(key)  # type: ignore[arg-type]
        if mask is None:
            mask = torch.tensor(pattern, dtype=torch.bool, device=device)
            self._masks[key] = mask  # type: ignore[index]
        return mask

    # ------------------------------------------------------------------ observe
    def observe(
        self,
        *,
        new_logp: Tensor,
        old_logp: Tensor,
        advantages: Tensor | None = None,
        clip_eps: float | None = None,
        dist: Distribution | None = None,
        entropy: Tensor | None = None,
        num_actions: int | Tensor | None = None,
        values: Tensor | None = None,
        returns: Tensor | None = None,
        rollout: int | None = None,
        target_kl: float | None = None,
        role: str = "actor",
    ) -> None:
        """Record one minibatch of the policy term; see :func:`lightning_ppo_guard.observe`."""
        if not self._active:
            return
        actor = self._actor(role)
        name = actor.name
        first_in_rollout = rollout is not None and self._rollout.get(name) != rollout
        prev_updates = None
        if first_in_rollout:
            if self._rollout.get(name) is not None:
                prev_updates = self.updates_per_rollout[name] = self._rollout_steps.get(name, 0)
            self._rollout[name] = rollout
            self._rollout_steps[name] = 0
        if not (first_in_rollout or self.measuring()):
            return  # between measured steps: only the rollout bookkeeping above (inputs are checked when measured)

        new_logp = _check_logp("new_logp", new_logp)
        old_logp = _check_logp("old_logp", old_logp)
        if new_logp.device != old_logp.device:
            raise ValueError(f"observe(): old_logp is on {old_logp.device} but new_logp on {new_logp.device}.")
        if new_logp.numel() == 0 or old_logp.numel() == 0:
            rank_zero_warn("observe() got an empty new_logp/old_logp and skipped it; pass the minibatch's "
                           "log-probs.", category=PPOGuardWarning)
            return
        if new_logp.numel() != old_logp.numel():
            raise ValueError(
                f"observe(): new_logp has shape {tuple(new_logp.shape)} but old_logp has shape "
                f"{tuple(old_logp.shape)}; they must hold one log-prob per sample of the same minibatch."
            )
        advantages = _check_optional("advantages", advantages, new_logp)
        values = _check_optional("values", values, new_logp)
        returns = _check_optional("returns", returns, new_logp)
        entropy = _check_optional("entropy", entropy, new_logp) if entropy is not None else None
        if clip_eps is not None and not (isinstance(clip_eps, (int, float)) and clip_eps > 0):
            raise ValueError(f"observe(): clip_eps must be a positive number, got {clip_eps!r}.")
        if dist is not None and not isinstance(dist, Distribution):
            raise TypeError(f"observe(): dist must be a torch.distributions.Distribution, got {type(dist).__name__}.")

        measured = self.measuring()
        with torch.no_grad():
            if measured:
                vec, pattern = self._observe_stats(new_logp, old_logp, advantages, clip_eps, dist, entropy,
                                                   num_actions, values, returns, name)
            else:  # an off-cadence first minibatch feeds the first-minibatch rules only, and is not logged
                vec, pattern = self._first_minibatch_stats(new_logp, old_logp)
        if self._stats is not None and measured:
            self._queue(vec, self._mask(pattern, vec.device), self._obs_slots[name])
        self.observes += 1
        step = self._trainer.global_step if self._trainer is not None else self.optimizer_steps
        record = ObserveRecord(name, step, rollout, first_in_rollout, target_kl, vec, pattern, prev_updates)
        self._on_observe(record, actor, new_logp=new_logp, old_logp=old_logp, advantages=advantages,
                         values=values, returns=returns, dist=dist)

    def _first_minibatch_stats(self, new_logp: Tensor, old_logp: Tensor) -> tuple[Tensor, tuple[bool, ...]]:
        """``approx_kl`` and ``ratio_dev`` only (NaN elsewhere): the ratio must be 1 on a rollout's first minibatch."""
        log_ratio = new_logp.detach().reshape(-1).float() - old_logp.detach().reshape(-1).float()
        ratio_m1 = torch.expm1(log_ratio)
        order = self._first_order.get(log_ratio.device)
        if order is None:
            order = self._first_order[log_ratio.device] = torch.tensor(_FIRST_ORDER, device=log_ratio.device)
        kl = (ratio_m1 - log_ratio).mean()
        # [approx_kl, ratio_dev, NaN] gathered into OBSERVE_METRICS order
        return torch.stack([kl, ratio_m1.abs().max(), kl.new_full((), math.nan)])[order], _FIRST_PATTERN

    def _observe_stats(self, new_logp: Tensor, old_logp: Tensor, advantages: Tensor | None, clip_eps: float | None,
                       dist: Distribution | None, entropy: Tensor | None, num_actions: int | Tensor | None,
                       values: Tensor | None, returns: Tensor | None, name: str) -> tuple[Tensor, tuple[bool, ...]]:
        """The ``OBSERVE_METRICS`` vector of one minibatch, in few fused ops, and which entries it holds.

        Every per-sample series goes into one stacked tensor whose row means and variances are one
        ``var_mean`` call: KL estimators, clip indicator, ratio, advantages, value residuals, entropy.
        Called under ``torch.no_grad()``, so none of it is recorded by autograd (no ``.detach()`` needed).
        """
        log_ratio = new_logp.reshape(-1).float() - old_logp.reshape(-1).float()
        ratio_m1 = torch.expm1(log_ratio)  # r - 1 without cancellation: k3 stays >= 0 for tiny log-ratios
        eps = float(clip_eps) if clip_eps is not None else math.inf
        if entropy is None and dist is not None:
            try:
                entropy = dist.entropy()
            except NotImplementedError:
                entropy = None
        n_actions = num_actions
        if n_actions is None and dist is not None and getattr(dist, "_num_events", None) is not None:
            n_actions = int(dist.param_shape[-1])
        # rows: 0 k3, 1 k1 (negated), 2 clipped, 3 r - 1, then optional advantages, residual, returns, entropy
        rows = [ratio_m1 - log_ratio, log_ratio, (ratio_m1.abs() > eps).float(), ratio_m1]
        has_adv, has_ev = advantages is not None, values is not None and returns is not None
        if has_adv:
            rows.append(advantages.reshape(-1).float())
        if has_ev:
            ret = returns.reshape(-1).float()
            rows += [ret - values.reshape(-1).float(), ret]
        ent_row = entropy is not None and entropy.numel() == log_ratio.numel()
        if ent_row:
            rows.append(entropy.reshape(-1).float())
        var, mean = torch.var_mean(torch.stack(rows), dim=1, correction=0)
        lo, hi = torch.aminmax(ratio_m1)
        m, v = mean.unbind(), var.unbind()
        nan = mean.new_full((), math.nan)
        adv_mean, adv_std = (m[4], v[4].sqrt()) if has_adv else (nan, nan)
        ev = nan
        if has_ev:
            k = 4 + has_adv
            ev = torch.where(v[k + 1] > 0, 1.0 - v[k] / v[k + 1], nan)
        ent = ent_norm = drift = nan
        if entropy is not None:
            ent = m[-1] if ent_row else entropy.detach().float().mean()
            if n_actions is not None:
                ent_norm = (F.normalized_entropy(entropy, n_actions) if isinstance(n_actions, Tensor)
                            else ent / math.log(n_actions) if n_actions > 1 else ent.new_ones(()))
            drift = ent - self._entropy0.setdefault(name, ent)
        vec = torch.stack([m[0], -m[1], m[2] if clip_eps is not None else nan, m[3] + 1.0, lo + 1.0, hi + 1.0,
                           torch.maximum(-lo, hi), ent, ent_norm, drift, adv_mean, adv_std, ev])
        given = (clip_eps is not None, entropy is not None, entropy is not None and n_actions is not None,
                 has_adv, has_ev)
        pattern = (True, True, given[0], True, True, True, True, given[1], given[2], given[1],
                   given[3], given[3], given[4])
        return vec, pattern

    def _actor(self, name: str) -> Role:
        for role in self.roles:
            if role.name == name and role.kind == "actor":
                return role
        actors = self.actor_roles
        if name == "actor" and len(actors) == 1:
            return actors[0]
        raise ValueError(
            f"observe(role={name!r}): no actor role has that name; the actor roles are "
            f"{[r.name for r in actors]}. Pass role= one of them (MAPPO: one observe per agent)."
        )

    def _on_observe(self, record: ObserveRecord, role: Role, **tensors: Any) -> None:
        """Called after each observe with the live tensors (hook for the guard; must not keep them)."""

    # ------------------------------------------------------------------ logging
    def _queue(self, values: Tensor, mask: Tensor, slots: Tensor) -> None:
        """Keep one measurement on the device until the next row (folded in batches: a few ops per row)."""
        self._queued.append((values, mask, slots))
        if len(self._queued) >= 256:  # bounded, whatever the logging interval
            self._fold()

    def _fold(self) -> None:
        """Add the queued measurements to ``_stats``: one update for all of them (three concatenations)."""
        queued, self._queued = self._queued, []
        if self._stats is not None and queued:
            values, masks, slots = (torch.cat(part) for part in zip(*queued, strict=True))
            self._stats.update(values, masks, slots)

    def _flush(self) -> None:
        """Reduce the interval's statistics (over ranks too) and log them: one host transfer."""
        self._batches_since_flush = self._steps_since_flush = 0
        if self._trainer is None or self._stats is None:
            return
        self._fold()
        host: dict[str, float] = {}
        for role in self.roles:
            binding = self.bindings.get(role.name)
            if binding is not None:
                host[metric_key(self.prefix, role.name, "binding")] = binding.fraction
                if not math.isnan(binding.lr):
                    host[metric_key(self.prefix, role.name, "lr")] = binding.lr
            if role.name in self.steps_skipped:
                host[metric_key(self.prefix, role.name, "steps_skipped")] = float(self.steps_skipped[role.name])
            if role.name in self.updates_per_rollout:
                host[metric_key(self.prefix, role.name, "updates_per_rollout")] = float(
                    self.updates_per_rollout[role.name])
        # Every rank updates the same slots at the same steps, so the syncing compute() is collective.
        if self._stats.update_count == 0 and host == self._last_host:
            return  # nothing measured in the interval and no host value changed: no row (nothing is lost)
        self._last_host = host
        metrics: dict[str, float] = {}
        plans, gaps = self._take_comparisons()
        n_stats = len(self._stats.total) if self._stats.update_count > 0 else 0
        parts = [self._stats.compute().float().reshape(-1)] if n_stats else []
        if parts or gaps:  # one transfer for the row and the inference checks
            flat = torch.cat(parts + [g.to(self._stats.device) for g in gaps]).cpu().tolist()
            self._read_comparisons(plans, flat[5 * n_stats:])
        if n_stats:
            mean, low, high, total, count = (flat[i * n_stats:(i + 1) * n_stats] for i in range(5))
            rows = {"mean": mean, "min": low, "max": high, "sum": total}
            for key, reduce, slot in self._keys:
                if count[slot] > 0:
                    metrics[key] = rows[reduce][slot]
            self._stats.reset()
        metrics.update(host)
        self.last_logged = metrics
        if metrics and self._trainer.is_global_zero:
            step = self._trainer.global_step
            for logger in self._trainer.loggers:
                logger.log_metrics(metrics, step=step)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer_steps": self.optimizer_steps,
            "observes": self.observes,
            "entropy0": {k: float(v) for k, v in self._entropy0.items()},
            "rollout": dict(self._rollout),
            "rollout_steps": dict(self._rollout_steps),
            "updates_per_rollout": dict(self.updates_per_rollout),
            "steps_skipped": dict(self.steps_skipped),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer_steps = int(state_dict.get("optimizer_steps", 0))
        self.observes = int(state_dict.get("observes", 0))
        self._entropy0 = dict(state_dict.get("entropy0", {}))
        self._rollout = dict(state_dict.get("rollout", {}))
        self._rollout_steps = dict(state_dict.get("rollout_steps", {}))
        self.updates_per_rollout = dict(state_dict.get("updates_per_rollout", {}))
        self.steps_skipped = dict(state_dict.get("steps_skipped", {}))
