"""Reference PPO on CartPole in a Lightning Fabric loop, with the guard's hooks called through ``fabric.call``.

The networks, rollout, GAE, minibatches and loss are those of :class:`CartPolePPO` (a LightningModule is a
fine container for a Fabric loop); the loop itself replaces ``Trainer.fit`` and ``CartPolePPO.update``, and
runs the same operations in the same order, so a healthy run logs the numbers the Trainer run logs.
Planted faults: every :data:`MANUAL_FAULTS` entry except ``actor_replaced`` (which needs the Trainer's
``on_fit_start``).
"""

from __future__ import annotations

from typing import Any

from lightning.fabric import Fabric

from lightning_ppo_guard.reference.cartpole import CartPolePPO, PPOConfig
from lightning_ppo_guard.reference.faults import MANUAL_FAULTS, validate_fault

__all__ = ["FABRIC_FAULTS", "train_fabric"]

#: Faults the Fabric loop supports.
FABRIC_FAULTS: frozenset[str] = MANUAL_FAULTS - {"actor_replaced"}


def train_fabric(cfg: PPOConfig, callbacks: list[Any] | None = None, **fabric_kwargs: Any) -> CartPolePPO:
    """Train :class:`CartPolePPO`'s networks for ``cfg.num_iterations`` PPO iterations in a Fabric loop.

    ``fabric_kwargs`` go to ``Fabric(...)`` (default: one CPU process), e.g. ``loggers=CSVLogger(...)``,
    ``precision="bf16-mixed"``. ``callbacks`` (e.g. ``[FabricGuard()]``) get
    ``on_train_start(fabric, module, optimizers)``, ``on_train_batch_start``/``on_train_batch_end`` around each
    PPO iteration, ``on_after_backward`` after each backward and ``on_train_end``; a callback with
    ``should_stop`` set ends the loop after the iteration.
    """
    validate_fault(cfg.fault, FABRIC_FAULTS)
    callbacks = list(callbacks or [])
    fabric = Fabric(**{"accelerator": "cpu", "devices": 1, **fabric_kwargs}, callbacks=callbacks)
    fabric.launch()
    module = CartPolePPO(cfg)
    optimizer = module.configure_optimizers()
    model, optimizer = fabric.setup(module, optimizer)
    model.mark_forward_method("ppo_losses")  # the loss forward goes through the strategy (DDP, precision)
    cfg = module.cfg  # with the config-level fault applied
    fabric.call("on_train_start", fabric=fabric, module=model, optimizers=[optimizer])
    try:
        for iteration in range(cfg.num_iterations):
            fabric.call("on_train_batch_start", batch=None, batch_idx=iteration)
            data = module.collect_rollout()
            _update(fabric, model, module, optimizer, data, iteration)
            fabric.call("on_train_batch_end", outputs=None, batch=None, batch_idx=iteration)
            if any(getattr(cb, "should_stop", False) for cb in callbacks):
                break
    finally:
        fabric.call("on_train_end")
        for logger in fabric.loggers:
            logger.finalize("success")  # Fabric's CSVLogger writes its buffered rows here
        module.on_fit_end()  # closes the environment
    return module


def _update(fabric: Fabric, model: Any, module: CartPolePPO, optimizer: Any, data: dict[str, Any],
            iteration: int) -> None:
    """One PPO update phase: :meth:`CartPolePPO.update` with Fabric's backward and clipping."""
    cfg = module.cfg
    for _epoch in range(cfg.update_epochs):
        for idx in module.minibatch_indices(len(data["obs"])):
            terms = model.ppo_losses({k: v[idx] for k, v in data.items()}, rollout=iteration)
            if cfg.target_kl is not None and terms.approx_kl.item() > cfg.target_kl:
                return
            fabric.backward(terms.loss)
            fabric.call("on_after_backward")
            if module.fault == "zero_grad_before_step":
                optimizer.zero_grad()
            fabric.clip_gradients(model, optimizer, max_norm=cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()

