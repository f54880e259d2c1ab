"""Logged metric keys, and their reduction over a logging interval and across ranks.

Keys follow one scheme, ``ppo_guard/<role>/<metric>``. Each metric is declared once here, with how it is
reduced over the steps of a logging interval (and across DDP ranks), its meaning and its healthy range;
README's metric table is checked against this table by the tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["OBSERVE_METRICS", "STEP_METRICS", "Layout", "MetricSpec", "RowBuffer", "VectorStats", "arrange",
           "metric_key"]

Reduce = Literal["mean", "min", "max", "sum"]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    reduce: Reduce
    meaning: str
    healthy: str
    roles: Literal["all", "actor", "shared"] = "all"  # "actor": roles whose update is measured (actors, a
    # shared trunk); "shared": the shared trunk alone


#: Measured at every measured optimizer step, for each role the optimizer holds (or every role not held).
STEP_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("grad_norm", "mean", "L2 norm of the role's gradient after backward, before any clipping "
               "(unscaled under AMP)", "> 0; actor typically 1e-3..1e1"),
    MetricSpec("grad_norm_clipped", "mean", "L2 norm of the gradient the optimizer steps with (after clipping)",
               "> 0"),
    MetricSpec("clip_coef", "mean", "grad_norm_clipped / grad_norm: the factor gradient clipping applied",
               "0.1..1; << 0.01 means the clip budget is spent elsewhere"),
    MetricSpec("grad_none", "max", "trainable parameters of the role whose .grad is None at the step", "0"),
    MetricSpec("grad_nonfinite", "sum", "parameter tensors of the role with a NaN/Inf gradient", "0"),
    MetricSpec("grad_nonzero_frac", "mean", "fraction of the role's trainable elements with a nonzero gradient "
               "at the step", "close to 1 (ReLU nets: 0.5..1)", roles="actor"),
    MetricSpec("update_norm", "mean", "exact ||theta_after - theta_before|| over the optimizer step", "> 0",
               roles="actor"),
    MetricSpec("update_ratio", "mean", "update_norm / ||theta_before||: relative size of the step",
               "1e-5..1e-2 (Adam, lr 1e-4..1e-3)", roles="actor"),
    MetricSpec("param_norm", "mean",
               "||theta|| of the role's trainable parameters before the step (large models: re-read every 8th "
               "measured step)", "finite", roles="actor"),
    MetricSpec("head_grad_policy", "mean", "shared trunk: L2 norm of the gradient the actor head(s) send into the "
               "trunk's output (the policy term's share; hooked at the heads' inputs)", "same order as "
               "head_grad_value", roles="shared"),
    MetricSpec("head_grad_value", "mean", "shared trunk: L2 norm of the gradient the critic head sends into the "
               "trunk's output (the value term's share)", "same order as head_grad_policy", roles="shared"),
    MetricSpec("value_grad_share", "mean", "head_grad_value / (head_grad_policy + head_grad_value)",
               "0.2..0.8; > 0.99 means the value term owns the trunk", roles="shared"),
)

#: Measured at each ``observe`` call (one per minibatch update of an actor role).
OBSERVE_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("approx_kl", "mean", "k3 estimate of KL(pi_old||pi_new), mean((r-1) - log r)",
               "1e-4..3e-2 (healthy CartPole: 1e-4..6e-4); exactly 0 means the policy is frozen", roles="actor"),
    MetricSpec("approx_kl_k1", "mean", "k1 estimate mean(-log r) (noisy, may be negative)", "|x| < 0.05",
               roles="actor"),
    MetricSpec("clip_fraction", "mean", "fraction of samples with |r - 1| > clip_eps (needs clip_eps)",
               "0..0.3 (median 0 is normal early)", roles="actor"),
    MetricSpec("ratio_mean", "mean", "mean importance ratio r = exp(new_logp - old_logp)", "about 1",
               roles="actor"),
    MetricSpec("ratio_min", "min", "smallest ratio in the interval", "0.5..1", roles="actor"),
    MetricSpec("ratio_max", "max", "largest ratio in the interval", "1..2", roles="actor"),
    MetricSpec("ratio_dev", "max", "largest |r - 1| in the interval", "< 1; exactly 0 on every minibatch "
               "of a rollout means the policy never moved, or old_logp is recomputed from it (PPG108)", roles="actor"),
    MetricSpec("logp_mean", "mean", "mean log-prob of the minibatch's actions under the update policy (needs "
               "new_logp; not with log_ratio alone)", "< 0; exactly 0 is a deterministic policy", roles="actor"),
    MetricSpec("entropy", "mean", "mean per-sample policy entropy, of the whole action (summed over a Gaussian's "
               "dimensions or a multi-categorical's heads; needs dist or entropy)", "below log(num_actions), "
               "decreasing slowly", roles="actor"),
    MetricSpec("entropy_norm", "mean", "entropy / log(num_actions) (needs dist or num_actions)", "0.1..1, "
               "falling over training", roles="actor"),
    MetricSpec("entropy_drift", "mean", "entropy minus the entropy at the role's first observe",
               "moves away from 0 as the policy learns", roles="actor"),
    MetricSpec("adv_mean", "mean", "mean of the advantages as used in the loss", "about 0 if normalised",
               roles="actor"),
    MetricSpec("adv_std", "mean", "std of the advantages as used in the loss", "about 1 if normalised; "
               "not << 1e-3", roles="actor"),
    MetricSpec("adv_zero_frac", "mean", "share of the advantages that are exactly 0", "about 0 with GAE; GRPO: the "
               "share of samples in groups with one reward", roles="actor"),
    MetricSpec("log_std", "mean", "mean log of a Gaussian policy's std over samples and action dims (needs a "
               "Normal, Independent(Normal) or MultivariateNormal dist)", "falls slowly from its start; 100x below "
               "it (-4.6) is a collapse", roles="actor"),
    MetricSpec("explained_variance", "mean", "1 - Var[returns - values] / Var[returns] (needs values and "
               "returns)", "rising towards 1", roles="actor"),
    MetricSpec("ref_kl", "mean", "k3 estimate of KL(pi_new||pi_ref) to a frozen reference model, per token (needs "
               "new_logp and ref_logp)", "grows slowly from 0 (LM RL: ~1e-3..1e-1); flat at ~0 while the policy "
               "moves means the KL term pins it (PPG304)", roles="actor"),
    MetricSpec("reward_mean", "mean", "mean reward of the minibatch's sequences (needs rewards)", "rising",
               roles="actor"),
    MetricSpec("reward_min", "min", "smallest reward of a sequence in the interval (needs rewards)", "-",
               roles="actor"),
    MetricSpec("reward_max", "max", "largest reward of a sequence in the interval (needs rewards)", "-",
               roles="actor"),
    MetricSpec("groups", "mean", "number of groups (prompts) in the minibatch (needs group)", "minibatch size / "
               "group size", roles="actor"),
    MetricSpec("zero_adv_groups", "mean", "share of groups whose rewards (else advantages) have no spread, so their "
               "group-relative advantages are 0 (needs group)", "< 0.5 while learning; near 1 once the task is "
               "solved", roles="actor"),
    MetricSpec("zero_adv_groups_top", "mean", "share of groups without reward spread at the minibatch's best reward "
               "(needs group and rewards)", "rises to zero_adv_groups as the task is solved", roles="actor"),
    MetricSpec("zero_group_reward", "mean", "mean reward of those groups (needs group and rewards)", "at the best "
               "reward once the task is solved; at the worst, every sample of the prompt failed", roles="actor"),
    MetricSpec("adv_reward_corr", "mean", "correlation of each sequence's advantage with its reward, within groups "
               "(needs rewards and per-sequence advantages, or mask= with per-token ones)", "> 0 (exactly 1 for "
               "GRPO); < 0 means the advantages point against the rewards (PPG109)", roles="actor"),
)

#: Logged once per rollout (needs ``rollout=`` in ``observe``).
ROLLOUT_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("updates_per_rollout", "mean", "optimizer steps of the actor during the last finished rollout",
               "epochs x minibatches; 1 every rollout means target_kl stops at once", roles="actor"),
)

#: Read from the optimizers at each refresh (host values, no reduction needed).
BINDING_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("binding", "min", "fraction of the role's trainable elements held by some optimizer "
               "param group (by tensor identity)", "1.0"),
    MetricSpec("steps_skipped", "max", "optimizer steps of the role skipped so far: on_before_optimizer_step ran "
               "but the step did not (AMP GradScaler found inf/NaN; automatic optimization with a None loss)",
               "a few while fp16's scale settles, then no new ones"),
    MetricSpec("lr", "mean", "smallest learning rate among the param groups holding the role", "> 0"),
)


def metric_key(prefix: str, role: str, metric: str) -> str:
    return f"{prefix}/{role}/{metric}"


def host_values(prefix: str, bindings: Mapping[str, Any], steps_skipped: Mapping[str, int],
                updates_per_rollout: Mapping[str, int]) -> dict[str, float]:
    """A row's values that live on the host, by key: ``BINDING_METRICS`` and ``ROLLOUT_METRICS``."""
    host: dict[str, float] = {}
    for name, binding in bindings.items():
        host[metric_key(prefix, name, "binding")] = binding.fraction
        if not math.isnan(binding.lr):
            host[metric_key(prefix, name, "lr")] = binding.lr
    for name, count in steps_skipped.items():
        host[metric_key(prefix, name, "steps_skipped")] = float(count)
    for name, count in updates_per_rollout.items():
        host[metric_key(prefix, name, "updates_per_rollout")] = float(count)
    return host


def _check_tables() -> None:
    """The observe table and :func:`~lightning_ppo_guard.functional.policy_stats` name the same quantities."""
    from lightning_ppo_guard.functional import POLICY_STATS, SEQUENCE_STATS

    names = [spec.name for spec in OBSERVE_METRICS]
    if sorted(names) != sorted((*POLICY_STATS, *SEQUENCE_STATS, "entropy_drift")):
        raise RuntimeError(f"OBSERVE_METRICS {names} must list policy_stats' and sequence_stats' names plus "
                           "entropy_drift.")
    for table in (STEP_METRICS, OBSERVE_METRICS, ROLLOUT_METRICS, BINDING_METRICS):
        if len({spec.name for spec in table}) != len(table):
            raise RuntimeError("metric names must be unique within a table")


#: (names of a vector, the names wanted, device) -> where each wanted name sits (the last index: NaN), presence
_ARRANGE: dict[tuple[object, ...], tuple[Tensor, tuple[bool, ...]]] = {}


def arrange(vector: Tensor, names: tuple[str, ...], wanted: tuple[str, ...]) -> tuple[Tensor, tuple[bool, ...]]:
    """A vector of named statistics (``vector[i]`` is ``names[i]``) in the order of ``wanted`` (NaN where absent),
    and which are present: one concatenation and one gather, the index cached per pair of name tuples.

    The one place a vector of named statistics is laid out; its reader maps it back with the same ``wanted``.
    """
    key = (names, wanted, vector.device)
    hit = _ARRANGE.get(key)
    if hit is None:
        if len(_ARRANGE) >= 64:  # a handful of patterns per fit; bounded all the same
            _ARRANGE.clear()
        at = {name: i for i, name in enumerate(names)}
        nan = len(names)
        hit = _ARRANGE[key] = (torch.tensor([at.get(name, nan) for name in wanted], dtype=torch.long,
                                            device=vector.device), tuple(name in at for name in wanted))
    index, present = hit
    return torch.cat([vector, vector.new_full((1,), math.nan)])[index], present


@dataclass(frozen=True)
class Layout:
    """Where each role's statistics live in the fit's one :class:`VectorStats`, and the logged keys.

    Built once per fit from the roles and the metric tables *by name*: the producers of vectors
    (:class:`~lightning_ppo_guard._plan.StepPlan`'s columns, :func:`arrange` in ``observe_names`` order) and the
    readers of logged rows all go through :meth:`step_slot` / ``observe_names``, so the order of a table is
    never relied on anywhere else.
    """

    prefix: str
    roles: tuple[tuple[str, str], ...]  # (name, kind), in role order
    step_names: tuple[str, ...]
    observe_names: tuple[str, ...]
    step_offset: Mapping[str, int]
    observe_offset: Mapping[str, int]
    size: int
    keys: tuple[tuple[str, Reduce, int], ...]  # (logged key, reduction, slot), in the order rows are written

    @classmethod
    def build(cls, prefix: str, roles: Sequence[tuple[str, str]]) -> Layout:
        """``roles``: (name, kind) with kind ``actor`` (step and observe metrics), ``shared`` (step metrics with
        the update) or ``critic`` (the gradient's)."""
        step_offset: dict[str, int] = {}
        observe_offset: dict[str, int] = {}
        offset = 0
        for name, _ in roles:
            step_offset[name] = offset
            offset += len(STEP_METRICS)
        for name, kind in roles:
            if kind == "actor":
                observe_offset[name] = offset
                offset += len(OBSERVE_METRICS)
        keys = []
        for name, kind in roles:
            keys += [(metric_key(prefix, name, spec.name), spec.reduce, step_offset[name] + j)
                     for j, spec in enumerate(STEP_METRICS)
                     if spec.roles == "all" or (spec.roles == "actor" and kind != "critic") or spec.roles == kind]
            if kind == "actor":
                keys += [(metric_key(prefix, name, spec.name), spec.reduce, observe_offset[name] + j)
                         for j, spec in enumerate(OBSERVE_METRICS)]
        return cls(prefix, tuple(roles), tuple(spec.name for spec in STEP_METRICS),
                   tuple(spec.name for spec in OBSERVE_METRICS), step_offset, observe_offset, offset, tuple(keys))

    def step_slot(self, role: str, metric: str) -> int:
        return self.step_offset[role] + self.step_names.index(metric)

    def key(self, role: str, metric: str) -> str:
        return metric_key(self.prefix, role, metric)


class VectorStats(Metric):
    """Sum, count, min and max of a fixed-length vector of measurements, with masked updates.

    One ``update`` adds a whole vector, or a stack of vectors, at once (entries outside ``mask`` were not
    measured that time). The states declare their own reduction, so a ``compute`` under DDP gives the statistics
    over all ranks; values are never silently dropped: a NaN measured inside the mask makes the mean NaN.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    total: Tensor
    count: Tensor
    low: Tensor
    high: Tensor

    def __init__(self, size: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.size = size
        # float32: a logging interval sums at most a few thousand values of the same scale.
        self.add_state("total", default=torch.zeros(size), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(size), dist_reduce_fx="sum")
        self.add_state("low", default=torch.full((size,), math.inf), dist_reduce_fx="min")
        self.add_state("high", default=torch.full((size,), -math.inf), dist_reduce_fx="max")

    def update(self, values: Tensor, mask: Tensor, index: Tensor | int = 0) -> None:  # type: ignore[override]
        """Add measurements (where ``mask``) to the slots ``index``.

        ``values``, ``mask`` and ``index`` have one shape (any; an index may repeat, each entry counts), or
        ``index`` is the first slot of the contiguous range ``values`` fills. Any number of measurements of any
        slots is a fixed handful of ops (``index_add_`` and ``scatter_reduce_`` accumulate repeats).
        """
        values = values.to(self.total.dtype).reshape(-1)
        if isinstance(index, int):
            index = torch.arange(index, index + values.numel(), device=self.total.device)
        index, mask = index.reshape(-1), mask.reshape(-1)
        self.total.index_add_(0, index, torch.where(mask, values, 0.0))
        self.count.index_add_(0, index, mask.to(self.count.dtype))
        # min/max skip NaN (amin/amax would propagate it); a NaN measurement still reaches the mean via ``total``.
        valid = mask & (values == values)
        self.low.scatter_reduce_(0, index, torch.where(valid, values, math.inf), "amin")
        self.high.scatter_reduce_(0, index, torch.where(valid, values, -math.inf), "amax")

    def clear(self) -> None:
        """What ``reset`` does to the states, in place (no new tensors): zero sums and counts, empty min and max."""
        self.total.zero_()
        self.count.zero_()
        self.low.fill_(math.inf)
        self.high.fill_(-math.inf)

    def compute(self) -> Tensor:  # type: ignore[override]
        """Rows: mean, min, max, sum, count (NaN where nothing was measured)."""
        nan = torch.full_like(self.total, float("nan"))
        measured = self.count > 0
        mean = torch.where(measured, self.total / self.count.clamp_min(1), nan)
        return torch.stack([
            mean,
            torch.where(measured, self.low, nan),
            torch.where(measured, self.high, nan),
            torch.where(measured, self.total, nan),
            self.count,
        ])



def reduce_rows(values: np.ndarray, mask: np.ndarray, slots: np.ndarray, size: int) -> list[float]:
    """:class:`VectorStats`' ``update`` then ``compute`` on the host, flat (mean, min, max, sum, count of every slot):
    the same numbers for the same measurements (a NaN inside the mask reaches the mean and the sum; min and max
    skip it; NaN where a slot got nothing). For an interval read in one piece by one process."""
    slots, values = slots[mask], values[mask].astype(np.float64)
    count = np.bincount(slots, minlength=size).astype(np.float64)
    total = np.bincount(slots, weights=values, minlength=size)
    valid = ~np.isnan(values)
    low, high = np.full(size, np.inf), np.full(size, -np.inf)
    np.minimum.at(low, slots[valid], values[valid])
    np.maximum.at(high, slots[valid], values[valid])
    measured = count > 0
    # float32 like the device states: the sums of one interval are within float32's range
    total = total.astype(np.float32).astype(np.float64)
    mean = np.where(measured, total / np.maximum(count, 1), np.nan)
    rows = [mean, np.where(measured, low, np.nan), np.where(measured, high, np.nan), np.where(measured, total, np.nan),
            count]
    return np.concatenate(rows).astype(np.float32).tolist()


class RowBuffer:
    """The measurements of one logging interval: queued on the device as they come, reduced into one
    :class:`VectorStats` (over the interval and across ranks) when a row is written.

    Queueing costs nothing but a list append; a fold is one ``VectorStats.update`` for every queued
    measurement (three concatenations), at each row and whenever ``max_queued`` measurements wait.

    Under a process group the states go through torchmetrics' ``update`` / ``compute`` / ``reset``, whose
    ``compute`` reduces them over the ranks with each state's declared reduction. In one process there is nothing
    to reduce, and the same ``VectorStats`` methods are called unwrapped (the wrappers' bookkeeping cost ~0.25 ms
    per row on a CPU, more than the arithmetic): the numbers are the same.
    """

    def __init__(self, layout: Layout, device: torch.device, max_queued: int = 256) -> None:
        self.layout = layout
        self.stats = VectorStats(layout.size).to(device)
        self.distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.folded = False  # measurements reached the states since the last row
        self.max_queued = max_queued
        self.queued: list[tuple[Tensor, Tensor, Tensor]] = []  # (values, mask, slots) not yet in ``stats``
        self.last_host: dict[str, float] = {}
        self._masks: dict[tuple[bool, ...], Tensor] = {}
        self._on_host: dict[int, tuple[Tensor, np.ndarray]] = {}  # id -> (a queued mask or slots tensor, its copy)

    def mask(self, pattern: tuple[bool, ...]) -> Tensor:
        """The device tensor of a presence pattern (cached: a handful of patterns per fit)."""
        mask = self._masks.get(pattern)
        if mask is None:
            mask = self._masks[pattern] = torch.tensor(pattern, dtype=torch.bool, device=self.stats.device)
        return mask

    def queue(self, values: Tensor, mask: Tensor, slots: Tensor) -> None:
        self.queued.append((values.reshape(-1), mask, slots))
        if len(self.queued) >= self.max_queued:  # bounded, whatever the logging interval
            self.fold()

    def fold(self) -> None:
        queued, self.queued = self.queued, []
        if queued:
            values, masks, slots = (torch.cat(part) for part in zip(*queued, strict=True))
            if self.distributed:
                self.stats.update(values, masks, slots)
            else:
                VectorStats.update(self.stats, values, masks, slots)
            self.folded = True

    @property
    def empty(self) -> bool:
        return not self.queued and not self.folded

    def compute(self) -> Tensor:
        """The interval's reduction, flat (synced across ranks: every rank must call it at the same row)."""
        self.fold()
        reduced = self.stats.compute() if self.distributed else VectorStats.compute(self.stats)
        return reduced.float().reshape(-1)

    def row(self, host: dict[str, float], to_host: Callable[[list[Tensor]], list[float]]) -> dict[str, float] | None:
        """The row to log: the interval's reduction (read with ``to_host``, one transfer) and the ``host`` values;
        None when nothing was measured and no host value changed since the last row (nothing is lost then).

        Every rank queues the same slots at the same steps, so the syncing ``compute`` is collective.
        """
        if self.empty and host == self.last_host:
            return None
        self.last_host = host
        if self.empty:
            metrics = {}
        elif self.distributed or self.folded:
            metrics = self.read(to_host([self.compute()]))
        else:  # one process, nothing folded yet: the raw measurements are read and reduced on the host (fewer ops)
            queued, self.queued = self.queued, []
            values = np.asarray(to_host([torch.cat([v for v, _, _ in queued])]), dtype=np.float32)
            mask = np.concatenate([self._host(m) for _, m, _ in queued])
            slots = np.concatenate([self._host(i) for _, _, i in queued])
            metrics = self.read(reduce_rows(values, mask, slots, self.layout.size))
        metrics.update(host)
        return metrics

    def _host(self, t: Tensor) -> np.ndarray:
        """A queued mask's or slots' host copy (a handful of distinct tensors per fit, each held while cached)."""
        hit = self._on_host.get(id(t))
        if hit is None or hit[0] is not t:
            if len(self._on_host) >= 64:  # the plans' tensors are rebuilt when the roles' tensors change
                self._on_host.clear()
            hit = self._on_host[id(t)] = (t, t.detach().cpu().reshape(-1).numpy())
        return hit[1]

    def read(self, flat: Sequence[float]) -> dict[str, float]:
        """The logged values of a computed row (host numbers), by key; resets the interval."""
        n = self.layout.size
        mean, low, high, total, count = (flat[i * n:(i + 1) * n] for i in range(5))
        rows = {"mean": mean, "min": low, "max": high, "sum": total}
        if self.distributed:
            self.stats.reset()
        elif self.folded:
            self.stats.clear()
        self.folded = False
        return {key: rows[reduce][slot] for key, reduce, slot in self.layout.keys if count[slot] > 0}


_check_tables()
