"""Which optimizer param groups hold each role, at which learning rate (host only, no device work).

:func:`bind` is a pure function of the roles' tensors and the optimizers' param groups, testable without a
Trainer; :class:`RoleCache` keeps, for one fit, the bindings and the fused step plans built from them, and
decides when the roles' tensors must be read again (a walk of their modules costs more than the rest).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ppo_guard._cadence import Cadence
from lightning_ppo_guard._plan import StepPlan
from lightning_ppo_guard._sharded import local
from lightning_ppo_guard._trunk import POLICY, VALUE, TrunkProbe
from lightning_ppo_guard.metrics import Layout
from lightning_ppo_guard.roles import Role

__all__ = ["Binding", "RoleCache", "StepGroups", "bind", "group_lr", "role_lr", "step_groups"]

#: Optimizer steps between two walks of the roles' modules when nothing else changed.
SCAN_EVERY = 64


@dataclass(slots=True)
class Binding:
    """How a role's trainable tensors are held by the optimizers."""

    fraction: float  # share of the role's trainable elements held by some param group
    lr: float  # smallest lr among the groups holding the role (nan when unbound)
    optimizers: tuple[int, ...]  # indices of the optimizers holding part of the role
    stale_tensors: int  # tensors held by those optimizers that are no parameter of the model
    groups: tuple[tuple[int, int], ...] = ()  # (optimizer index, group index) of every group holding part of it
    lr_max: float = math.nan  # largest lr among those groups (0: no part of the role can move)


def group_lr(group: dict[str, Any]) -> float:
    lr = group.get("lr", math.nan)
    return float(lr.item() if isinstance(lr, Tensor) else lr)


def role_lr(binding: Binding, optimizers: Sequence[Any]) -> tuple[float, float]:
    """The smallest and the largest learning rate among the param groups holding the role, as they are now
    (schedulers write them); nan when unbound. A few dict reads: no parameter is visited."""
    lrs = [group_lr(optimizers[i].param_groups[j]) for i, j in binding.groups]
    return (min(lrs), max(lrs)) if lrs else (math.nan, math.nan)


@dataclass(slots=True)
class StepGroups:
    """What the param groups holding a role said at one optimizer step (host numbers, read in the pre-hook)."""

    lr: float  # smallest lr (nan when unbound)
    lr_max: float  # largest lr (0: no part of the role can move)
    eps: float  # largest ``eps`` (Adam, AdamW, RMSprop...: a gradient far below it barely moves the parameters);
    # nan for optimizers without one (SGD)


def step_groups(binding: Binding, optimizers: Sequence[Any]) -> StepGroups:
    groups = [optimizers[i].param_groups[j] for i, j in binding.groups]
    lrs = [group_lr(g) for g in groups]
    eps = [float(g["eps"]) for g in groups if isinstance(g.get("eps"), (int, float))]
    if not lrs:
        return StepGroups(math.nan, math.nan, math.nan)
    return StepGroups(min(lrs), max(lrs), max(eps) if eps else math.nan)


def bind(roles: Iterable[Role], optimizers: Sequence[Any], model_params: Iterable[nn.Parameter]) -> dict[str, Binding]:
    """Each role's :class:`Binding`: which share of its trainable elements some param group holds (by tensor
    identity), at which lr, in which optimizers, and how many tensors those optimizers hold that are no
    parameter of the model (an actor re-created after the optimizer was built)."""
    held: dict[int, tuple[int, int, float]] = {}
    for idx, opt in enumerate(optimizers):
        for g, group in enumerate(opt.param_groups):
            lr = group_lr(group)
            for p in group["params"]:
                held[id(p)] = (idx, g, lr)
    model_ids = {id(p) for p in model_params}
    stale_by_opt = [sum(1 for g in opt.param_groups for p in g["params"] if id(p) not in model_ids)
                    for opt in optimizers]
    out: dict[str, Binding] = {}
    for role in roles:
        bound, lrs, groups = 0, [], set()
        for p in role.params:
            hit = held.get(id(p))
            if hit is not None:
                bound += p.numel()
                groups.add(hit[:2])
                lrs.append(hit[2])
        fraction = bound / role.numel if role.numel else 0.0
        opts = sorted({i for i, _ in groups})
        stale = sum(stale_by_opt[i] for i in opts) if opts else sum(stale_by_opt)
        out[role.name] = Binding(fraction, min(lrs) if lrs else math.nan, tuple(opts), stale, tuple(sorted(groups)),
                                 max(lrs) if lrs else math.nan)
    return out


class RoleCache:
    """The roles' tensors as the optimizers hold them, and the fused plans that measure them, for one fit.

    :meth:`refresh` walks the roles' modules only when the param groups changed, when the module at a role's
    path is another object (a replaced actor), every :data:`SCAN_EVERY` optimizer steps (a ``requires_grad``
    flip), and while lazy parameters wait for their first forward; bindings, snapshot buffers and plans are
    rebuilt only when something changed. Otherwise it re-reads the learning rates, which schedulers move.
    """

    def __init__(self, layout: Layout, device: torch.device) -> None:
        self.layout, self.device = layout, device
        self.bindings: dict[str, Binding] = {}
        self.plans: dict[int, StepPlan] = {}  # id(optimizer) -> the fused measurement of its roles
        self.all_plan: StepPlan | None = None  # every role: the pre-clip norms after backward
        self.snapshots: dict[str, list[Tensor]] = {}  # actor role -> preallocated buffers, one per tensor
        self.keys: dict[str, int] = {}  # role -> id of the first optimizer holding it (its cadence)
        self.lazy = False  # some role has lazy parameters not materialised yet: walk the roles at every refresh
        self._groups: tuple[int, ...] = ()
        self._modules: tuple[int, ...] = ()
        self._next_scan = 0
        self.armed: Callable[[], bool] = lambda: False  # the coming step is measured (set by the monitor)
        self.trunk: TrunkProbe | None = None  # the heads' gradients into a shared trunk

    def close(self) -> None:
        """Remove the trunk probe's module hooks (the fit ends)."""
        if self.trunk is not None:
            self.trunk.close()
            self.trunk = None

    def hook_trunk(self, cadence: Cadence) -> None:
        """After each step: the trunk probe's module hooks stay only while the coming step is measured."""
        if self.trunk is not None:
            self.trunk.hook(cadence.measuring(self.keys.get("shared", 0)))

    def _probe(self, roles: Sequence[Role], module: Any) -> None:
        """Hook the shared trunk's modules and the heads' (every module part of the actors and the critic)."""
        self.close()
        trunk = [m for r in roles if r.kind == "shared" for m in r.modules(module)]
        heads = [(POLICY if r.kind == "actor" else VALUE, m) for r in roles if r.kind != "shared"
                 for m in r.modules(module)]
        if trunk and any(k == POLICY for k, _ in heads) and any(k == VALUE for k, _ in heads):
            self.trunk = TrunkProbe(trunk, heads, self.armed, self.device)

    @property
    def snapshot_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for bufs in self.snapshots.values() for b in bufs)

    def refresh(self, roles: Sequence[Role], optimizers: Sequence[Any], module: Any, step: int) -> list[Role] | None:
        """Re-read; returns the roles whose tensors changed ([] when only the param groups did), or None when
        nothing was rebuilt."""
        groups = tuple(id(p) for opt in optimizers for g in opt.param_groups for p in g["params"])
        modules = tuple(i for r in roles for i in r.targets(module))
        changed: list[Role] = []
        if groups != self._groups or modules != self._modules or step >= self._next_scan or self.lazy:
            changed = [r for r in roles if r.refresh(module) or r.name not in self.snapshots]
            if modules != self._modules:
                self._probe(roles, module)
            self._modules, self._next_scan = modules, step + SCAN_EVERY
            self.lazy = any(r.lazy for r in roles)
        if not changed and groups == self._groups:
            for binding in self.bindings.values():
                binding.lr, binding.lr_max = role_lr(binding, optimizers)
            return None
        self._groups = groups
        self.bindings = bind(roles, optimizers, module.parameters())
        for role in changed:  # preallocated once per set of tensors: the step hooks never allocate snapshots
            self.snapshots[role.name] = ([torch.empty_like(local(p), memory_format=torch.preserve_format)
                                          for p in role.params] if role.moves else [])
        # A role no optimizer holds is measured across every optimizer step: its update must be 0.
        unbound = [r for r in roles if not self.bindings[r.name].optimizers]
        self.plans = {id(opt): StepPlan([r for r in roles if i in self.bindings[r.name].optimizers] + unbound,
                                        self.snapshots, self.layout, self.device)
                      for i, opt in enumerate(optimizers)}
        ids = list(self.plans)
        self.keys = {name: ids[b.optimizers[0]] if b.optimizers else ids[0] for name, b in self.bindings.items()
                     if ids}
        # Every role's pre-clip norms: the one optimizer's own plan when it steps every role (the usual case).
        every = sorted(r.name for r in roles)
        self.all_plan = next((p for p in self.plans.values() if sorted(p.names) == every), None) or StepPlan(
            roles, self.snapshots, self.layout, self.device)
        for plan in self.plans.values():  # the plan that steps the trunk reads the heads' gradients
            plan.trunk = self.trunk
        return changed

    def key(self, role: str) -> int:
        """The optimizer (``id``) whose cadence an actor role's observes follow: the first holding it."""
        return self.keys.get(role, 0)

    def every_plan(self) -> list[StepPlan]:
        return [p for p in {*self.plans.values(), self.all_plan} if p is not None]
