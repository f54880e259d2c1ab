"""``observe``: the one call a user adds where the PPO loss is computed.

It hands the per-minibatch tensors of the policy term to every :class:`~lightning_ppo_guard.PPOMonitor` (or
:class:`~lightning_ppo_guard.PPOGuard`, or :class:`~lightning_ppo_guard.FabricGuard`) whose engine is attached to
the object it is given: each monitor attaches its :class:`~lightning_ppo_guard.engine.MonitorEngine` to the
LightningModule (and to itself) when training starts, and detaches at the end of the fit. Without one it does
nothing, so the call can stay in the code for good.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor

from lightning_ppo_guard._inputs import PolicyTerm

if TYPE_CHECKING:
    from torch.distributions import Distribution

__all__ = ["attach_monitor", "attached", "detach_monitor", "observe"]

# id(key) -> (a weak reference to the key, the engines attached to it in attach order): a plain dict looked up once
# per minibatch. A key is what the training code hands ``observe``: the LightningModule (attached by every monitor
# of its Trainer at train start), the callback itself, or a Fabric loop's model. The engines detach at the end of
# the fit (and on error or teardown), so an entry lives exactly as long as a fit that observes through it.
_REGISTRY: dict[int, tuple[Callable[[], Any], tuple[Engine, ...]]] = {}


class Engine(Protocol):
    """What ``observe`` calls on an attached engine (:class:`~lightning_ppo_guard.engine.MonitorEngine`)."""

    def keep(self, role: str, rollout: int | None) -> Any: ...

    def boundary(self, ticket: Any) -> None: ...

    def record(self, term: PolicyTerm, ticket: Any) -> None: ...


def _ref(key: Any) -> Callable[[], Any]:
    """A weak reference to ``key`` whose entry goes with it (a fit that never detached holds nothing alive)."""
    slot = id(key)

    def gone(ref: Any) -> None:
        entry = _REGISTRY.get(slot)
        if entry is not None and entry[0] is ref:
            del _REGISTRY[slot]

    try:
        return weakref.ref(key, gone)
    except TypeError:  # not weak-referenceable: held until detached
        return lambda: key


def attach_monitor(key: Any, engine: Engine) -> None:
    """Make ``observe(key, ...)`` reach ``engine`` (after any engine attached to ``key`` before it)."""
    entry = _REGISTRY.get(id(key))
    if entry is None or entry[0]() is not key:
        entry = (_ref(key), ())
    if engine not in entry[1]:
        _REGISTRY[id(key)] = (entry[0], (*entry[1], engine))


def detach_monitor(key: Any, engine: Engine) -> None:
    """Undo :func:`attach_monitor`; with no engine left, ``observe(key, ...)`` is a no-op again."""
    entry = _REGISTRY.get(id(key))
    if entry is None:
        return
    engines = tuple(e for e in entry[1] if e is not engine) if entry[0]() is key else ()
    if engines:
        _REGISTRY[id(key)] = (entry[0], engines)
    else:
        del _REGISTRY[id(key)]


def attached(key: Any) -> tuple[Engine, ...]:
    """The engines ``observe(key, ...)`` reaches now (empty outside a fit)."""
    entry = _REGISTRY.get(id(key))
    return entry[1] if entry is not None and entry[0]() is key else ()


def observe(
    pl_module: Any,
    *,
    new_logp: Tensor | None = None,
    old_logp: Tensor,
    log_ratio: Tensor | None = None,
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
    action_mask: Tensor | None = None,
    mask: Tensor | None = None,
    ref_logp: Tensor | None = None,
    rewards: Tensor | None = None,
    group: Tensor | None = None,
) -> None:
    """Hand one minibatch of the PPO policy term to the attached guard; a no-op without one.

    Call it once per minibatch update, after the loss terms are built and before ``backward``
    (the guard inspects the live autograd graph of ``new_logp``), in automatic or manual optimization.

    Args:
        pl_module: the LightningModule whose Trainer holds the guard; in a Fabric loop, the model given to
            ``FabricGuard``'s ``on_train_start`` (or the guard itself).
        new_logp: log pi_theta(a|s) of the taken actions, built from the live logits (requires grad).
        old_logp: log-probs recorded at rollout time (detached).
        log_ratio: the loss's own ``new_logp - old_logp``, where the loss computes it inside (a library loss such
            as TorchRL's ``ClipPPOLoss``: see :mod:`lightning_ppo_guard.integrations.torchrl`); then ``new_logp``
            may be left out, and the guard reads the ratio, the gradient signs and the graph from this tensor.
        advantages: the advantages exactly as they enter the policy loss (after any normalisation). With them the
            guard also reads, in the coming backward, whether the loss's gradient raises the log-prob of the
            better actions (PPG107).
        clip_eps: the PPO clip range, for ``clip_fraction``.
        dist: the ``torch.distributions.Distribution`` that produced ``new_logp``; gives entropy and the
            number of actions.
        entropy: per-sample entropy; pass the very tensor the loss's entropy term uses (also with ``dist``): the
            guard reads the sign of that term from its gradient in the coming backward (PPG502).
        num_actions: size of the discrete action space, to normalise entropy by ``log(num_actions)``; or a
            per-sample tensor of valid-action counts.
        action_mask: ``(batch, num_actions)`` booleans, True where an action is valid (masked / invalid-action
            PPO): ``entropy_norm`` divides each sample's entropy by ``log`` of its own number of valid actions
            (samples with one valid action count as 1.0). Overrides ``num_actions``.
        values: critic predictions for the minibatch, for ``explained_variance``.
        returns: the critic's regression targets, for ``explained_variance``.
        rollout: an integer that changes when a new rollout starts (e.g. the iteration number); enables
            ``updates_per_rollout`` and the first-minibatch ratio check. Without it, in manual optimization each
            training batch is taken as one rollout (see README, "Which rules need which arguments").
        target_kl: the KL limit the training loop stops an update phase at, if any.
        role: which actor role this policy term belongs to (``"actor"``, ``"agent_2"``, ...).
        mask: token-level PPO/GRPO (language models): the response mask, ``(batch, tokens)`` booleans (or 0/1) of
            ``new_logp``'s shape, True on the tokens the loss trains on. Pass the per-token tensors the loss uses
            (``new_logp``, ``old_logp``, ``entropy``, ``values``, ``returns`` of that shape; ``advantages`` per
            token or one per sequence): every statistic is then over the valid tokens (padding never dilutes
            it), and the hooks read the tensors the loss uses. Handing ``t[mask]`` instead works too.
        ref_logp: a frozen reference model's log-probs of the same tokens (LM RL's KL penalty): gives ``ref_kl``
            and lets the guard tell a KL coefficient that pins the policy to the reference (PPG304).
        rewards: one reward per sequence (per sample without ``mask``): ``reward_*``, and with per-sequence (or
            per-token, with ``mask``) advantages ``adv_reward_corr``, so advantages computed with the wrong sign
            are seen (PPG109).
        group: one group id per sequence (GRPO, RLOO: the index of the prompt its samples share): the share of
            groups with no reward spread, ``zero_adv_groups`` (PPG407), judged per rollout, never on one minibatch.

    Every monitor and guard of the Trainer (or Fabric loop) receives the call. It is ignored outside training
    (``validation_step``, sanity checks) and under ``torch.no_grad()``: such a loss is never trained on.
    Only detached numbers are kept; the graph and the batch are never held.
    """
    entry = _REGISTRY.get(id(pl_module))  # the hot path: once per minibatch
    if entry is None or entry[0]() is not pl_module:
        return
    monitors = entry[1]
    # Every observe counts for the rollout bookkeeping; only kept ones (measured, or a rollout's first minibatch)
    # are checked and read. None is kept outside training (validation, sanity check) or under torch.no_grad().
    rollout_id = rollout if rollout is None or type(rollout) is int else PolicyTerm.rollout_id(rollout)
    kept = None
    for monitor in monitors:
        note = monitor.keep(role, rollout_id)
        if note is not None:
            kept = [*(kept or []), (monitor, note)]
    if not kept:
        return
    if not any(note.measured or note.light for _, note in kept):  # rollout boundaries only: nothing to read
        for monitor, note in kept:
            monitor.boundary(note)
        return
    term = PolicyTerm.build(
        new_logp=new_logp, old_logp=old_logp, log_ratio=log_ratio, advantages=advantages, clip_eps=clip_eps, dist=dist,
        entropy=entropy,
        num_actions=num_actions, values=values, returns=returns, rollout=rollout_id, target_kl=target_kl, role=role,
        action_mask=action_mask, mask=mask, ref_logp=ref_logp, rewards=rewards, group=group,
    )
    for monitor, note in kept:
        monitor.record(term, note)
