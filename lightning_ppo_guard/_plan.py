"""``StepPlan``: the fused measurement of one optimizer step, for every role that optimizer holds.

Each pass over the roles' tensors is one multi-tensor call for all roles together (``_foreach_norm``,
``_foreach_copy_``, ``_foreach_sub_``). The per-tensor norms of a step (after backward, after the clip, of the
update, of the parameters before it) and its nonzero counts are summed into roles with one ``index_add_`` (a NaN or
an Inf stays in its own role), and the ``[roles, STEP_METRICS]`` block is laid out from those sums by one cached
gather and one ``addcdiv`` (:meth:`StepPlan.after`). A measured step is ~30 small ops whatever the number of roles
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
#: ``MetricSpec.roles`` in :data:`~lightning_ppo_guard.metrics.STEP_METRICS`. Blocks are laid out by column name
#: (:meth:`StepPlan._layout`), so this grouping is the one order there is; readers map by these names.
COMMON_COLUMNS = tuple(s.name for s in STEP_METRICS if s.roles == "all")
ACTOR_COLUMNS = tuple(s.name for s in STEP_METRICS if s.roles == "actor")
SHARED_COLUMNS = tuple(s.name for s in STEP_METRICS if s.roles == "shared")
COLUMNS = COMMON_COLUMNS + ACTOR_COLUMNS + SHARED_COLUMNS
# the trunk probe reads [policy, value] norms: the order of the first two shared columns
assert (POLICY, VALUE) == (0, 1) and SHARED_COLUMNS[:2] == ("head_grad_policy", "head_grad_value")


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
    out = torch.stack(torch._foreach_norm(tensors, ord, dtype=torch.float32) if low_precision else
                      torch._foreach_norm(tensors, ord))
    return out if out.dtype == torch.float32 else out.float()


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
        n_roles = len(self.roles)
        self.actor_params = self.params[:sum(len(r.params) for r in self.actors)]
        self.seg = torch.tensor(self._owner, dtype=torch.long, device=device)
        self.snap = [b for r in self.actors for b in snapshots.get(r.name, [])]
        self.low_precision = any(p.dtype in _LOW_PRECISION for p in self.params)
        # FSDP2: DTensor parameters are measured on their local shards and summed over the ranks (_sharded.py)
        self.shards = Shards.of(self.params, device)
        self._actors_index = slice(0, len(self.actor_params))
        self.per_tensor_count = sum(r.numel for r in self.actors) > _PER_TENSOR_COUNT
        self.device = device
        f32 = torch.float32  # explicit: a fit in true half or double precision changes the default dtype
        self._zero = torch.zeros((), dtype=f32, device=device)
        self._ones = torch.ones(n_roles, dtype=f32, device=device)
        # the heads' values when not measured, and the NaN every empty entry of a block is gathered from
        self._nan = torch.full((len(SHARED_COLUMNS) + 1,), math.nan, dtype=f32, device=device)
        shared = [i for i, r in enumerate(self.roles) if r.kind == "shared" and r.params]
        self.shared_row = shared[0] if shared else None
        self.trunk: TrunkProbe | None = None  # set by the roles' cache when the trunk's heads are hooked
        self._none: dict[tuple[int, ...], Tensor] = {}
        # (pre-clip norms given, nonzero counted) -> index of each summed entry; (counted, heads) -> the block's layout
        self._sum_index: dict[tuple[bool, bool], Tensor] = {}
        self._layouts: dict[tuple[bool, bool], tuple[Tensor, Tensor, Tensor]] = {}
        self._within: dict[int, Tensor | None] = {}  # id(another plan) -> where this plan's tensors sit in its order
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
        self._param_norms: Tensor | None = None  # the actors' last per-tensor parameter norms, and measured steps since
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
    def grad_norms(self) -> Tensor | None:
        """Every tensor's gradient L2 norm (one fused call for all roles; None without tensors)."""
        grads, _ = self.grads()
        return self._norms(grads, 2) if grads else None

    def within(self, other: StepPlan) -> Tensor | None:
        """Where this plan's tensors sit in ``other``'s tensor order (None when one is not there)."""
        index = self._within.get(id(other), self)
        if index is self:
            at = {id(p): k for k, p in enumerate(other.params)}
            index = self._within[id(other)] = (
                torch.tensor([at[id(p)] for p in self.params], dtype=torch.long, device=self.device)
                if all(id(p) in at for p in self.params) else None)
        return index  # type: ignore[return-value]

    @torch.no_grad()
    def post_norms(self) -> Tensor:
        """Per-tensor norms of the gradients as they are now (one fused pass over every role's tensors)."""
        grads = self.grads()[0]
        return self._norms(grads, 2) if grads else self._zero.new_zeros(0)

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
        """At the optimizer's step pre-hook: snapshot the actors; returns their per-tensor parameter norms.

        In automatic optimization this hook runs before the closure (forward and backward) inside
        ``optimizer.step``, so it reads parameters only: the gradients are read at :meth:`after`.

        On large models (:data:`_LARGE` elements) the parameter norms, a full pass, are re-read on every 8th
        call only; between, the last ones are returned. They are then at most 7 measured steps old, and by the
        triangle inequality off by at most the sum of those steps' ``update_norm`` (relative error below the
        sum of their ``update_ratio``: ~1e-3 per step in healthy PPO, so ``update_ratio`` and ``param_norm`` are
        within ~1% there). ``update_norm`` itself is always exact.
        """
        if not self.actor_params:
            return self._zero.new_zeros(0)
        torch._foreach_copy_(self.snap, self._local_actor_params())
        if self._param_norms is None or not self.large or self._param_age >= _PARAM_NORM_EVERY - 1:
            self._param_norms = self._norms(self.actor_params, 2, self._actors_index)
            self._param_age = 0
        else:
            self._param_age += 1
        return self._param_norms

    def measure(self, params_before: Tensor, pre: PreClip | None, count_nonzero: bool
                ) -> tuple[Tensor, list[int], Tensor]:
        """At the step post-hook of a measured step: :meth:`after`, with the pre-clip norms taken from ``pre``
        (once) and the post-clip norms reused, inferred or measured by :attr:`clip`; and the block's mask."""
        post = self.clip.post_norms(self, pre)
        norms, inv_scale = (pre.take(self), pre.inv_scale) if pre is not None else (None, 1.0)
        block, nones = self.after(params_before, norms, inv_scale if norms is not None else 1.0, count_nonzero, post)
        return block, nones, self.masks[count_nonzero, self._heads]

    def _shared_values(self) -> Tensor:
        """The shared trunk's heads' gradients ``[policy, value, value share]``, and a NaN (NaN throughout when
        they were not both measured)."""
        self._heads = False
        if self.trunk is None or self.shared_row is None:
            return self._nan
        norms, both = self.trunk.read()
        if not both:
            return self._nan
        self._heads = True
        return torch.cat([norms, norms[VALUE:] / norms.sum().clamp_min(1e-30), self._nan[:1]])

    def _index(self, pre: bool, counted: bool) -> Tensor:
        """Where each entry :meth:`after` sums goes (see :meth:`_slots`): per-tensor squared norms after the clip,
        (before it), of the update and of the parameters, then each gradient's finiteness and (the nonzero counts)."""
        key = (pre, counted)
        index = self._sum_index.get(key)
        if index is None:
            post, before, update, param, finite, nonzero = self._slots()
            seg, actor_seg = self._owner, self._owner[:len(self.actor_params)]
            entries = [post + k for k in seg] + ([before + k for k in seg] if pre else [])
            entries += [update + k for k in actor_seg] + [param + k for k in actor_seg] + [finite + k for k in seg]
            entries += [nonzero + k for k in actor_seg] if counted else []
            index = self._sum_index[key] = torch.tensor(entries, dtype=torch.long, device=self.device)
        return index

    def _slots(self) -> tuple[int, int, int, int, int, int]:
        """Offsets of the sums :meth:`after` keeps per role (R) or per actor (A): post-clip squared norm (R),
        pre-clip (R), update (A), parameters (A), finite gradient tensors (R), nonzero gradient elements (A)."""
        n, a = len(self.roles), len(self.actors)
        return 0, n, 2 * n, 2 * n + a, 2 * n + 2 * a, 3 * n + 2 * a

    def _layout(self, counted: bool, heads: bool) -> tuple[Tensor, Tensor, Tensor]:
        """The block as ``offset + source[gather] / divisor``, where the source is :meth:`after`'s
        ``[sums, roots, grad_norm, clip_coef, update_ratio, grad_none, heads' values, NaN]``: each column named.
        ``counted``: the sums hold nonzero counts (:meth:`after` never counts for parameterless actors)."""
        key = (counted, heads)
        layout = self._layouts.get(key)
        if layout is None:
            n, a = len(self.roles), len(self.actors)
            post, _, update, param, finite, nonzero = self._slots()
            k = 3 * n + 3 * a
            roots, norm_at, coef_at, ratio_at, none_at = k, 2 * k, 2 * k + n, 2 * k + 2 * n, 2 * k + 2 * n + a
            heads_at = none_at + n
            nan_at = heads_at + len(SHARED_COLUMNS)
            gather, divisor, offset = [], [], []
            for i, role in enumerate(self.roles):
                actor = i < a  # actors first
                where: dict[str, tuple[int, float, float]] = {
                    "grad_norm": (norm_at + i, 1.0, 0.0), "grad_norm_clipped": (roots + post + i, 1.0, 0.0),
                    "clip_coef": (coef_at + i, 1.0, 0.0), "grad_none": (none_at + i, 1.0, 0.0),
                    # tensors with a NaN/Inf gradient: the role's tensors less its finite ones
                    "grad_nonfinite": (finite + i, -1.0, float(len(role.params))),
                    "grad_nonzero_frac": ((nonzero + i, float(max(role.numel, 1)), 0.0) if actor and counted
                                          else (nan_at, 1.0, 0.0)),
                    "update_norm": (roots + update + i, 1.0, 0.0) if actor else (nan_at, 1.0, 0.0),
                    "update_ratio": (ratio_at + i, 1.0, 0.0) if actor else (nan_at, 1.0, 0.0),
                    "param_norm": (roots + param + i, 1.0, 0.0) if actor else (nan_at, 1.0, 0.0),
                }
                for j, column in enumerate(SHARED_COLUMNS):
                    where[column] = (heads_at + j, 1.0, 0.0) if heads and i == self.shared_row else (nan_at, 1.0, 0.0)
                for column in COLUMNS:
                    at, div, off = where[column]
                    gather.append(at)
                    divisor.append(div)
                    offset.append(off)
            layout = self._layouts[key] = (torch.tensor(gather, dtype=torch.long, device=self.device),
                                           torch.tensor(divisor, dtype=torch.float32, device=self.device),
                                           torch.tensor(offset, dtype=torch.float32, device=self.device))
        return layout

    @torch.no_grad()
    def after(self, params_before: Tensor, pre: Tensor | None, inv_scale: float, count_nonzero: bool = True,
              norms: Tensor | None = None) -> tuple[Tensor, list[int]]:
        """At the step post-hook: the ``[roles, STEP_METRICS]`` block of this step (still on the device), and
        the ``None`` gradient count per role (host).

        The gradients are the ones the optimizer stepped with (after every clip; an optimizer does not write
        them). ``params_before`` are :meth:`before`'s per-tensor parameter norms; ``pre`` each tensor's gradient norm
        before clipping (AMP-scaled by ``1 / inv_scale``), if measured; ``norms`` the per-tensor norms of these very
        gradients if known (nothing wrote them since, or inferred): reused instead of a second pass.
        ``count_nonzero=False`` skips the nonzero count (a full pass over the actor's gradients, the costliest part
        on large actors) and gives NaN there. Every per-tensor number is summed into its role by one ``index_add_``,
        and the block laid out by one gather (:meth:`_layout`).
        """
        grads, nones = self.grads()
        n_roles = len(self.roles)
        counted = count_nonzero and bool(self.actor_params)
        squares: list[Tensor] = []
        finite: Tensor | None = None
        counts: list[Tensor] = []
        if grads:
            if norms is None:
                norms = self._norms(grads, 2)
            squares.append(norms)
            if pre is not None:
                squares.append(pre)
            finite = norms.isfinite()
        if self.actor_params:
            if counted:
                actor_grads = grads[:len(self.actor_params)]
                counts.append(torch.stack([g.count_nonzero() for g in actor_grads]).float()
                              if self.per_tensor_count and self.shards is None else
                              self._norms(actor_grads, 0, self._actors_index))
            torch._foreach_sub_(self.snap, self._local_actor_params())
            squares += [self._norms(self.snap, 2, self._actors_index), params_before]
        post_at, pre_at, update_at, param_at, _, _ = self._slots()
        size = 3 * n_roles + 3 * len(self.actors)
        if squares:
            values = torch.cat([torch.cat(squares).square(), *([finite] if finite is not None else []), *counts])
            sums = torch.zeros(size, dtype=torch.float32, device=self.device).index_add_(
                0, self._index(pre is not None and bool(grads), counted), values)
        else:
            sums = torch.zeros(size, dtype=torch.float32, device=self.device)
        roots = sums.sqrt()
        post = roots[post_at:post_at + n_roles]
        if pre is not None and grads:
            grad_norm = roots[pre_at:pre_at + n_roles]
            if inv_scale != 1.0:
                grad_norm = grad_norm * inv_scale
        else:
            grad_norm = post
        clip_coef = torch.where(grad_norm > 0, post / grad_norm, self._ones)
        n_actors = len(self.actors)
        ratio = roots[update_at:update_at + n_actors] / roots[param_at:param_at + n_actors].clamp_min(1e-12)
        key = tuple(nones)
        none = self._none.get(key)
        if none is None:
            none = self._none[key] = torch.tensor(key, dtype=torch.float32, device=self.device)
        source = torch.cat([sums, roots, grad_norm, clip_coef, ratio, none, self._shared_values()])
        gather, divisor, offset = self._layout(counted, self._heads)
        return torch.addcdiv(offset, source[gather], divisor).view(n_roles, len(COLUMNS)), nones


class PreClip:
    """The gradient norms every tensor had after backward, waiting for the optimizer step(s) that use them.

    Taken by the all-roles plan; each optimizer's step takes its own tensors' norms once (:meth:`take`).
    """

    __slots__ = ("inv_scale", "per_tensor", "plan", "state", "unused")

    def __init__(self, plan: StepPlan, inv_scale: float) -> None:
        self.plan = plan  # the all-roles plan the norms were taken with (its tensor order)
        self.per_tensor = plan.grad_norms()
        self.inv_scale = inv_scale  # 1 / AMP scale of the gradients they were taken from
        self.state = plan.grad_state()  # identity and version of each gradient then
        self.unused = set(plan.names)  # roles whose step has not used them yet

    def take(self, plan: StepPlan) -> Tensor | None:
        """``plan``'s tensors' norms (AMP-scaled by ``1 / inv_scale``), once; None when already taken or missing."""
        if self.per_tensor is None or not self.unused.issuperset(plan.names):
            return None
        self.unused.difference_update(plan.names)
        if plan is self.plan:
            return self.per_tensor
        index = plan.within(self.plan)
        return None if index is None else self.per_tensor[index]


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
