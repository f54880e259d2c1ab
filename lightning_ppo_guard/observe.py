"""``observe``: the one call a user adds where the PPO loss is computed.

It hands the per-minibatch tensors of the policy term to the :class:`~lightning_ppo_guard.PPOMonitor`
(or :class:`~lightning_ppo_guard.PPOGuard`) attached to the module's Trainer. Without one it does nothing,
so the call can stay in the code for good.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import TYPE_CHECKING, Any

from torch import Tensor

from lightning_ppo_guard._inputs import PolicyTerm

if TYPE_CHECKING:
    from torch.distributions import Distribution

__all__ = ["attach_monitor", "detach_monitor", "observe"]

# id(module) -> (weak refs to the module and its Trainer, the monitors found in that Trainer's callbacks): a plain
# dict, as observe() runs once per minibatch; an entry whose module or Trainer is gone is simply not matched
_CACHE: dict[int, tuple[Any, Any, tuple[Any, ...]]] = {}
# module -> monitor, for loops without a Trainer (Lightning Fabric): see lightning_ppo_guard.fabric.FabricGuard
_ATTACHED: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def attach_monitor(module: Any, monitor: Any) -> None:
    """Make ``observe(module, ...)`` reach ``monitor`` without a Trainer (``FabricGuard`` does this)."""
    _ATTACHED[module] = monitor


def detach_monitor(module: Any) -> None:
    """Undo :func:`attach_monitor`; ``observe(module, ...)`` is a no-op again."""
    _ATTACHED.pop(module, None)


def _find_monitors(pl_module: Any) -> tuple[Any, ...]:
    """Every monitor ``observe(pl_module, ...)`` reaches: those in its Trainer's callbacks, else an attached one."""
    trainer = getattr(pl_module, "_trainer", None)
    from lightning_ppo_guard.monitor import PPOMonitor

    if isinstance(pl_module, PPOMonitor):
        return (pl_module,)  # observe(guard, ...): the monitor itself, in any loop
    if trainer is None:
        try:
            found = _ATTACHED.get(pl_module)  # a Fabric loop (or none: observe is a no-op)
        except TypeError:  # not weak-referenceable
            return ()
        return (found,) if found is not None else ()
    monitors = tuple(cb for cb in trainer.callbacks if isinstance(cb, PPOMonitor))
    key = id(pl_module)
    with contextlib.suppress(TypeError):  # not weak-referenceable: no cache
        # the entry goes with the module, so the monitors it holds are not kept alive by it
        _CACHE[key] = (weakref.ref(pl_module, lambda _: _CACHE.pop(key, None)), weakref.ref(trainer), monitors)
    return monitors


def observe(
    pl_module: Any,
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
    action_mask: Tensor | None = None,
) -> None:
    """Hand one minibatch of the PPO policy term to the attached guard; a no-op without one.

    Call it once per minibatch update, after the loss terms are built and before ``backward``
    (the guard inspects the live autograd graph of ``new_logp``), in automatic or manual optimization.

    Args:
        pl_module: the LightningModule whose Trainer holds the guard; in a Fabric loop, the model given to
            ``FabricGuard``'s ``on_train_start`` (or the guard itself).
        new_logp: log pi_theta(a|s) of the taken actions, built from the live logits (requires grad).
        old_logp: log-probs recorded at rollout time (detached).
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

    Every monitor and guard attached to the Trainer receives the call. It is ignored outside training
    (``validation_step``, sanity checks) and under ``torch.no_grad()``: such a loss is never trained on.
    Only detached numbers are kept; the graph and the batch are never held.
    """
    cached = _CACHE.get(id(pl_module))
    if (cached is not None and cached[0]() is pl_module
            and cached[1]() is getattr(pl_module, "_trainer", None)):  # the hot path: once per minibatch
        monitors = cached[2]
    else:
        monitors = _find_monitors(pl_module)
    if not monitors:
        return
    # Every observe counts for the rollout bookkeeping; only kept ones (measured, or a rollout's first minibatch)
    # are checked and read. None is kept outside training (validation, sanity check) or under torch.no_grad().
    rollout_id = rollout if rollout is None or type(rollout) is int else PolicyTerm.rollout_id(rollout)
    kept = None
    for monitor in monitors:
        note = monitor._keep(role, rollout_id)
        if note is not None:
            kept = [*(kept or []), (monitor, note)]
    if not kept:
        return
    if not any(note.measured or note.light for _, note in kept):  # rollout boundaries only: nothing to read
        for monitor, note in kept:
            monitor._boundary(note)
        return
    term = PolicyTerm.build(
        new_logp=new_logp, old_logp=old_logp, advantages=advantages, clip_eps=clip_eps, dist=dist, entropy=entropy,
        num_actions=num_actions, values=values, returns=returns, rollout=rollout_id, target_kl=target_kl, role=role,
        action_mask=action_mask,
    )
    for monitor, note in kept:
        monitor._observe(term, note)
