"""``StepPlan``: the fused measurement of one optimizer step, for every role that optimizer holds.

Each pass over the roles' tensors is one multi-tensor call for all roles together (``_foreach_norm``,
``_foreach_copy_``, ``_foreach_sub_``); per-tensor results are summed into roles with one ``index_add_``
(a NaN or an Inf stays in its own role). A measured step is ~50 small ops whatever the number of roles
and tensors, nothing is allocated in proportion to the model, and nothing is copied to the host.

Pure torch, no Lightning: :class:`~lightning_ppo_guard.PPOMonitor` builds one plan per optimizer at each
refresh that changed the tensors, and calls :meth:`StepPlan.before` / :meth:`StepPlan.after` from the
optimizer's step hooks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_ppo_guard._sharded import Shards, local
from lightning_ppo_guard._trunk import POLICY, VALUE, TrunkProbe
from lightning_ppo_guard.functional import flat
from lightning_ppo_guard.metrics import STEP_METRICS, Layout
from lightning_ppo_guard.roles import Role

__all__ = ["COLUMNS", "ClipInference", "PreClip", "StepPlan", "transfer"]

#: The columns of every role (gradients), then of the roles that move (actors, a shared trunk: the snapshot and
#: the nonzero count), then of the shared trunk alone (the heads' gradients): each group named by
#: ``MetricSpec.roles`` in :data:`~lightning_ppo_guard.metrics.STEP_METRICS`. Blocks are built from named
#: columns (:func:`_stack`), so this grouping is the one order there is; readers map by these names.
COMMON_COLUMNS = tuple(s.name for s in STEP_METRICS if s.roles == "all")
ACTOR_COLUMNS = tuple(s.name for s in STEP_METRICS if s.roles == "actor")
SHARED_COLUMNS = tuple(s.name for s in STEP_METRICS if s.roles == "shared")
COLUMNS = COMMON_COLUMNS + ACTOR_COLUMNS + SHARED_COLUMNS


def _stack(names: tuple[str, ...], **columns: Tensor) -> Tensor:
    """A ``[rows, len(names)]`` block from one tensor per named column (every name given, no other)."""
    if columns.keys() != set(names):
        raise RuntimeError(f"a step block needs exactly the columns {names}, got {tuple(columns)}")
    return torch.stack([columns[name] for name in names], dim=1)


_LOW_PRECISION = (torch.float16, torch.bfloat16)
# Above this many actor elements ``count_nonzero`` per tensor (one memory pass, ~2x faster per element on
# CPU) beats the single fused ``_foreach_norm(ord=0)`` call (one op: cheaper for small tensors).
_PER_TENSOR_COUNT = 1 << 20
# From this many elements a pass over the tensors costs more than ~15 small ops: the post-clip norms are inferred
# (when measurements show it exact) and the actors' parameter norm is re-read every 8th measured step only.
_LARGE = 1 << 17
_PARAM_NORM_EVERY = 8


def _norms(tensors: list[Tensor], ord: float, low_precision: bool) -> Tensor:
    """Per-tensor norms as one float32 vector (one fused call; accumulated in float32 for half tensors)."""
    out = torch._foreach_norm(tensors, ord, dtype=torch.float32) if low_precision else torch._foreach_norm(
        tensors, ord)
    return torch.stack(out).float()


def _by_role(per_tensor: Tensor, owner: Tensor, n_roles: int) -> Tensor:
    """Sum per-tensor rows into their roles (``index_add_``: a NaN or an Inf stays in its own role)."""
    return per_tensor.new_zeros((n_roles, *per_tensor.shape[1:])).index_add_(0, owner, per_tensor)


class StepPlan:
    """The roles one optimizer steps, fused: actors first, then the rest (``roles`` order = ``block`` rows).

    Args:
        roles: the roles measured at this optimizer's steps.
        snapshots: preallocated buffers per actor role (same shapes as its trainable tensors).
        layout: where each role's step metrics live in the fit's ``VectorStats`` (by name).
        device: where the measurements live.
    """

    def __init__(self, roles: Sequence[Role], snapshots: dict[str, list[Tensor]], layout: Layout,
                 device: torch.device) -> None:
        self.roles = sorted(roles, key=lambda r: not r.moves)  # stable: actors and a shared trunk, then the critic
        self.actors = [r for r in self.roles if r.moves]  # the roles whose update is measured
        self.params: list[Tensor] = [p for r in self.roles for p in r.params]
        self._owner = [i for i, r in enumerate(self.roles) for _ in r.params]
        n_roles, n_actors = len(self.roles), len(self.actors)
        self.actor_params = self.params[:sum(len(r.params) for r in self.actors)]
        self.seg = torch.tensor(self._owner, dtype=torch.long, device=device)
        self.actor_seg = self.seg[:len(self.actor_params)]
        self.snap = [b for r in self.actors for b in snapshots.get(r.name, [])]
        self.numel = torch.tensor([max(r.numel, 1) for r in self.actors], dtype=torch.float32, device=device)
        self.low_precision = any(p.dtype in _LOW_PRECISION for p in self.params)
        # FSDP2: DTensor parameters are measured on their local shards and summed over the ranks (_sharded.py)
        self.shards = Shards.of(self.params, device)
        self._actors_index = slice(0, len(self.actor_params))
        self.per_tensor_count = sum(r.numel for r in self.actors) > _PER_TENSOR_COUNT
        self.device = device
        self._zero = torch.zeros((), device=device)
        self._ones = torch.ones(n_roles, device=device)
        self._nan_actors = torch.full((n_actors,), math.nan, device=device)
        self._pad = torch.full((n_roles - n_actors, len(ACTOR_COLUMNS)), math.nan, device=device)
        self._nan_shared = torch.full((n_roles, len(SHARED_COLUMNS)), math.nan, device=device)
        shared = [i for i, r in enumerate(self.roles) if r.kind == "shared" and r.params]
        self.shared_row = shared[0] if shared else None
        self._shared_rows = (torch.arange(n_roles, device=device) == (shared[0] if shared else -1)).unsqueeze(1)
        self.trunk: TrunkProbe | None = None  # set by the roles' cache when the trunk's heads are hooked
        self._none: dict[tuple[int, ...], Tensor] = {}
        # where each entry of the flattened block goes in VectorStats, and which entries hold a measurement
        self.slots = torch.tensor([layout.step_slot(r.name, c) for r in self.roles for c in COLUMNS],
                                  dtype=torch.long, device=device)
        mask = torch.tensor([[(c not in ACTOR_COLUMNS or (r.moves and bool(r.params))) and c not in SHARED_COLUMNS
                              for c in COLUMNS] for r in self.roles], dtype=torch.bool, device=device)
        # (nonzero counted, heads' shares measured) -> which entries of the flattened block hold a measurement
        self.masks: dict[tuple[bool, bool], Tensor] = {}
        for counted in (True, False):
            for heads in (False, True):
                m = mask.clone()
                m[:, COLUMNS.index("grad_nonzero_frac")] &= counted
                if heads and self.shared_row is not None:
                    m[self.shared_row, len(COMMON_COLUMNS) + len(ACTOR_COLUMNS):] = True
                self.masks[counted, heads] = m.reshape(-1)
        self.mask = self.masks[True, False]
        self._heads = False  # whether the last block holds the shared trunk's heads' gradients
        self.names = [r.name for r in self.roles]
        self.actor_names = [r.name for r in self.actors]  # the roles whose steps count for their rollout
        # Probes: each role's small tensors (at most 1/256 of its elements; at least its smallest one). Their
        # norms after the clip give each role's clip coefficient, from which the other tensors' norms follow
        # when the clip scaled the role uniformly (see :meth:`inferred_norms`).
        probe: list[int] = []
        start = 0
        for r in self.roles:
            sizes = [p.numel() for p in r.params]
            if sizes:
                limit = max(min(sizes), r.numel // 256)
                probe += [start + k for k, n in enumerate(sizes) if n <= limit]
            start += len(sizes)
        self.probe = probe
        self.probe_idx = torch.tensor(probe, dtype=torch.long, device=device)
        self.probe_seg = self.seg[self.probe_idx]
        self.large = sum(r.numel for r in self.roles) >= _LARGE
        # post-clip norms may be inferred on large models only (a pass costs less than the inference elsewhere)
        self.clip = ClipInference(self.large and not self.low_precision and bool(probe))
        self._param_sq: Tensor | None = None  # the actors' last squared parameter norms, and measured steps since
        self._param_age = 0

    def _norms(self, tensors: list[Tensor], ord: float, index: Sequence[int] | slice | Tensor | None = None) -> Tensor:
        """Per-tensor norms of ``tensors`` (which are ``self.params[index]`` or their gradients, snapshots...):
        one fused call; with sharded parameters, of the local shards, then summed over the ranks (squares for
        ``ord=2``, counts for ``ord=0``; one ``all_reduce``)."""
        if self.shards is None:
            return _norms(tensors, ord, self.low_precision)
        n = _norms([local(t) for t in tensors], ord, self.low_precision)
        weights = self.shards.weights if index is None else self.shards.weights[index]
        summed = Shards.all_reduce((n.square() if ord == 2 else n) * weights)
        return summed.sqrt() if ord == 2 else summed

    def _local_actor_params(self) -> list[Tensor]:
        return self.actor_params if self.shards is None else [local(p) for p in self.actor_params]

    def grads(self) -> tuple[list[Tensor], list[int]]:
        """Every tensor's gradient (a zero scalar where ``.grad is None``; the stored values of a sparse one,
        whose norms and nonzero count they share) and the ``None`` count per role."""
        raw = [p.grad for p in self.params]
        nones = [0] * len(self.roles)
        if not any(g is None or g.is_sparse for g in raw):
            return raw, nones  # type: ignore[return-value]  # no None among them
        grads: list[Tensor] = []
        for k, g in enumerate(raw):
            if g is None:
                nones[self._owner[k]] += 1
                grads.append(self._zero)
            elif g.is_sparse:  # nn.Embedding(sparse=True): no fused kernel takes sparse tensors
                grads.append(g.coalesce().values())
            else:
                grads.append(g)
        return grads, nones

    def grad_state(self) -> tuple[tuple[int, int], ...]:
        """Identity and version counter of every gradient: equal twice means nothing wrote them in between."""
        return tuple((id(p.grad), p.grad._version) if p.grad is not None else (0, 0) for p in self.params)

    @torch.no_grad()
    def grad_norms(self) -> tuple[Tensor, Tensor | None]:
        """Each role's gradient L2 norm, and the per-tensor norms (one fused call for all roles)."""
        grads, _ = self.grads()
        if not grads:
            return torch.zeros(len(self.roles), device=self.device), None
        norms = self._norms(grads, 2)
        return _by_role(norms.square(), self.seg, len(self.roles)).sqrt(), norms

    @torch.no_grad()
    def post_norms(self) -> Tensor:
        """Per-tensor norms of the gradients as they are now (one fused pass over every role's tensors)."""
        grads = self.grads()[0]
        return self._norms(grads, 2) if grads else torch.zeros(0, device=self.device)

    def _coef(self, post_probe: Tensor, pre: Tensor) -> Tensor:
        """Each role's clip coefficient, sqrt(sum post^2 / sum pre^2) over its probes (1 where they are 0)."""
        sums = _by_role(torch.stack([post_probe.square(), pre[self.probe_idx].square()], dim=1), self.probe_seg,
                        len(self.roles))
        return torch.where(sums[:, 1] > 0, (sums[:, 0] / sums[:, 1]).sqrt(), self._ones)

    @torch.no_grad()
    def inferred_norms(self, pre: Tensor) -> Tensor:
        """Per-tensor norms after a clip that scaled each role by one coefficient: ``pre`` times the coefficient
        read from the role's probes (a pass over the probes only, ~1/256 of the elements).

        Exact up to rounding when the clip multiplies every gradient of a role by one number, as
        ``clip_grad_norm_`` (Lightning's ``gradient_clip_algorithm="norm"``) does; the monitor uses it only
        after full measurements of this plan's clipped steps agreed with it, and keeps checking.
        """
        grads = self.grads()[0]
        post_probe = self._norms([grads[i] for i in self.probe], 2, self.probe_idx)
        return pre * self._coef(post_probe, pre)[self.seg]

    @torch.no_grad()
    def deviation(self, measured: Tensor, pre: Tensor) -> Tensor:
        """Largest relative gap between measured post-clip norms and the ones :meth:`inferred_norms` would give
        (NaN when a norm is not finite: it counts as a disagreement)."""
        inferred = pre * self._coef(measured[self.probe_idx], pre)[self.seg]
        return ((measured - inferred).abs() / torch.maximum(measured, inferred).clamp_min(1e-30)).amax()

    @torch.no_grad()
    def before(self) -> Tensor:
        """At the optimizer's step pre-hook: snapshot the actors; returns their squared parameter norms.

        In automatic optimization this hook runs before the closure (forward and backward) inside
        ``optimizer.step``, so it reads parameters only: the gradients are read at :meth:`after`.

        On large models (:data:`_LARGE` elements) the parameter norm, a full pass, is re-read on every 8th
        call only; between, the last one is returned. It is then at most 7 measured steps old, and by the
        triangle inequality off by at most the sum of those steps' ``update_norm`` (relative error below the
        sum of their ``update_ratio``: ~1e-3 per step in healthy PPO, so ``update_ratio`` and ``param_norm`` are
        within ~1% there). ``update_norm`` itself is always exact.
        """
        if not self.actor_params:
            return torch.zeros(len(self.actors), device=self.device)
        torch._foreach_copy_(self.snap, self._local_actor_params())
        if self._param_sq is None or not self.large or self._param_age >= _PARAM_NORM_EVERY - 1:
            norms = self._norms(self.actor_params, 2, self._actors_index)
            self._param_sq = _by_role(norms.square(), self.actor_seg, len(self.actors))
            self._param_age = 0
        else:
            self._param_age += 1
        return self._param_sq

    def measure(self, param_sq: Tensor, pre: PreClip | None, count_nonzero: bool
                ) -> tuple[Tensor, list[int], Tensor]:
        """At the step post-hook of a measured step: :meth:`after`, with the pre-clip norms taken from ``pre``
        (once) and the post-clip norms reused, inferred or measured by :attr:`clip`; and the block's mask."""
        post = self.clip.post_norms(self, pre)
        norms, inv_scale = (pre.take(self), pre.inv_scale) if pre is not None else (None, 1.0)
        block, nones = self.after(param_sq, norms, inv_scale if norms is not None else 1.0, count_nonzero, post)
        return block, nones, self.masks[count_nonzero, self._heads]

    def _shared_columns(self) -> Tensor:
        """The shared trunk's row of heads' gradients (policy, value, value share), NaN elsewhere."""
        self._heads = False
        if self.trunk is None or self.shared_row is None:
            return self._nan_shared
        norms, both = self.trunk.read()
        if not both:
            return self._nan_shared
        self._heads = True
        policy, value = norms[POLICY], norms[VALUE]
        row = _stack(SHARED_COLUMNS, head_grad_policy=policy.reshape(1), head_grad_value=value.reshape(1),
                     value_grad_share=(value / norms.sum().clamp_min(1e-30)).reshape(1)).reshape(-1)
        return torch.where(self._shared_rows, row, self._nan_shared)

    @torch.no_grad()
    def after(self, param_sq: Tensor, pre: Tensor | None, inv_scale: float, count_nonzero: bool = True,
              norms: Tensor | None = None) -> tuple[Tensor, list[int]]:
        """At the step post-hook: the ``[roles, STEP_METRICS]`` block of this step (still on the device), and
        the ``None`` gradient count per role (host).

        The gradients are the ones the optimizer stepped with (after every clip; an optimizer does not write
        them). ``pre`` is each role's gradient norm before clipping (AMP-scaled by ``1 / inv_scale``), if
        measured; ``norms`` the per-tensor norms of these very gradients if nothing wrote them since (no
        clipping): reused instead of a second pass. ``count_nonzero=False`` skips the nonzero count (a full
        pass over the actor's gradients, the costliest part on large actors) and gives NaN there.
        """
        grads, nones = self.grads()
        n_roles, n_actors = len(self.roles), len(self.actors)
        if grads:
            if norms is None:
                norms = self._norms(grads, 2)
            per = _by_role(torch.stack([norms.square(), (~torch.isfinite(norms)).float()], dim=1), self.seg, n_roles)
        else:
            per = torch.zeros(n_roles, 2, device=self.device)
        post = per[:, 0].sqrt()
        grad_norm = post if pre is None else pre * inv_scale
        clip_coef = torch.where(grad_norm > 0, post / grad_norm, self._ones)
        key = tuple(nones)
        none = self._none.get(key)
        if none is None:
            none = self._none[key] = torch.tensor(key, dtype=torch.float32, device=self.device)
        block = _stack(COMMON_COLUMNS, grad_norm=grad_norm, grad_norm_clipped=post, clip_coef=clip_coef,
                       grad_none=none, grad_nonfinite=per[:, 1])
        if not self.actors:
            return torch.cat([block, self._pad, self._nan_shared], dim=1), nones
        nonzero = self._nan_actors
        if not self.actor_params:  # parameterless actors: nothing moved
            update = self._nan_actors.new_zeros(n_actors)
        else:
            if count_nonzero:
                actor_grads = grads[:len(self.actor_params)]
                if self.per_tensor_count and self.shards is None:
                    counts = torch.stack([g.count_nonzero() for g in actor_grads]).float()
                else:
                    counts = self._norms(actor_grads, 0, self._actors_index)
                nonzero = _by_role(counts, self.actor_seg, n_actors)
            torch._foreach_sub_(self.snap, self._local_actor_params())
            update = _by_role(self._norms(self.snap, 2, self._actors_index).square(), self.actor_seg,
                              n_actors).sqrt()
        param_norm = param_sq.sqrt()
        actor = _stack(ACTOR_COLUMNS, grad_nonzero_frac=nonzero / self.numel, update_norm=update,
                       update_ratio=update / param_norm.clamp_min(1e-12), param_norm=param_norm)
        return torch.cat([block, torch.cat([actor, self._pad]) if len(self._pad) else actor, self._shared_columns()],
                         dim=1), nones


class PreClip:
    """The gradient norms every role had after backward, waiting for the optimizer step(s) that use them.

    Taken by the all-roles plan; each optimizer's step takes its own roles' norms once (:meth:`take`).
    """

    __slots__ = ("inv_scale", "norms", "per_tensor", "plan", "state", "unused")

    def __init__(self, plan: StepPlan, inv_scale: float) -> None:
        self.plan = plan  # the all-roles plan the norms were taken with (its role and tensor order)
        self.norms, self.per_tensor = plan.grad_norms()
        self.inv_scale = inv_scale  # 1 / AMP scale of the gradients they were taken from
        self.state = plan.grad_state()  # identity and version of each gradient then
        self.unused = set(plan.names)  # roles whose step has not used them yet

    def take(self, plan: StepPlan) -> Tensor | None:
        """``plan``'s roles' norms (AMP-scaled by ``1 / inv_scale``), once; None when already taken or missing."""
        if not self.unused.issuperset(plan.names):
            return None
        self.unused.difference_update(plan.names)
        if plan is self.plan:
            return self.norms
        return self.norms[[self.plan.names.index(n) for n in plan.names]]


class ClipInference:
    """Whether a plan's post-clip norms can be inferred from the clip coefficient instead of measured.

    States: ``"learning"`` (every clipped step is measured and compared with the inference), ``"trusted"``
    (after :data:`AGREEMENTS` comparisons agreed to :data:`TOLERANCE`: the norms are inferred, and 1 clipped step
    in :data:`CHECK_EVERY` is still measured and compared), ``"off"`` (for good, after one disagreement, or from
    the start for half-precision gradients and small models). Comparisons stay on the device until the
    monitor's next transfer to the host, which hands them back to :meth:`settle`.
    """

    AGREEMENTS = 4
    CHECK_EVERY = 8
    TOLERANCE = 1e-4

    __slots__ = ("agreed", "checks", "clipped_steps", "state")

    def __init__(self, enabled: bool) -> None:
        self.state = "learning" if enabled else "off"
        self.agreed = 0  # comparisons read back that agreed
        self.clipped_steps = 0  # steps whose gradients were rewritten after backward, with a pre-clip record
        self.checks: list[Tensor] = []  # deviations waiting for the next transfer

    def post_norms(self, plan: StepPlan, pre: PreClip | None) -> Tensor:
        """Per-tensor norms of the gradients ``plan``'s optimizer steps with: reused, inferred or measured.

        Reused when nothing wrote the gradients since the norms taken after backward (same tensors, same
        version counters: no clipping). When a clip rewrote the same tensors, the norms are inferred once
        trusted, else measured (and compared while learning, and on 1 such step in 8 once trusted).
        """
        # A DTensor's in-place ops may swap its local tensor, so neither versions nor identities show a clip:
        # sharded plans always measure.
        if (pre is None or pre.per_tensor is None or pre.inv_scale != 1.0 or plan is not pre.plan
                or plan.shards is not None):
            return plan.post_norms()
        state = plan.grad_state()
        if state == pre.state:
            return pre.per_tensor
        if self.state == "off" or any(a[0] != b[0] or a[0] == 0 for a, b in zip(state, pre.state, strict=True)):
            return plan.post_norms()  # inference ruled out, or other gradient tensors (or none): nothing to scale
        self.clipped_steps += 1
        if self.state == "trusted" and self.clipped_steps % self.CHECK_EVERY != 0:
            return plan.inferred_norms(pre.per_tensor)
        measured = plan.post_norms()
        self.checks.append(plan.deviation(measured, pre.per_tensor).reshape(1).float())
        return measured

    def take_checks(self) -> list[Tensor]:
        checks, self.checks = self.checks, []
        return checks

    def settle(self, gaps: Sequence[float]) -> None:
        """Read back the deviations :meth:`take_checks` handed out (in order)."""
        for gap in gaps:
            if not gap <= self.TOLERANCE:  # NaN disagrees too
                self.state = "off"
            elif self.state == "learning":
                self.agreed += 1
                if self.agreed >= self.AGREEMENTS:
                    self.state = "trusted"


def transfer(parts: Sequence[Tensor], plans: Sequence[StepPlan]) -> list[float]:
    """One device-to-host transfer of ``parts`` (flattened, in order) and of every clip-inference check the
    ``plans`` hold, which it settles; returns the values of ``parts``."""
    checks = [(plan, plan.clip.take_checks()) for plan in plans if plan.clip.checks]
    tensors = [flat(t) for t in parts]  # most are flat float32 already (step rows, observe vectors): no op for them
    tensors += [c for _, cs in checks for c in cs]
    if not tensors:
        return []
    device = tensors[0].device
    values = torch.cat([t if t.device == device else t.to(device) for t in tensors]).cpu().tolist()
    at = n = len(values) - sum(len(cs) for _, cs in checks)
    for plan, cs in checks:
        plan.clip.settle(values[at:at + len(cs)])
        at += len(cs)
    return values[:n]
