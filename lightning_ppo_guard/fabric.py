"""``FabricGuard``: the guard (or the monitor) in a Lightning Fabric training loop.

A Fabric loop has no Trainer, so nothing calls the guard's hooks; the loop calls them through Fabric's own
callback mechanism, :meth:`lightning.fabric.Fabric.call`::

    guard = FabricGuard(PPOGuard(on_stall="stop"))
    fabric = Fabric(accelerator="cpu", loggers=CSVLogger("logs"), callbacks=[guard])
    model, optimizer = fabric.setup(model, optimizer)
    fabric.call("on_train_start", fabric=fabric, module=model, optimizers=[optimizer])
    for iteration in range(num_iterations):            # one PPO iteration = one "batch" of the guard
        fabric.call("on_train_batch_start", batch=None, batch_idx=iteration)
        rollout = collect(...)
        for mb in minibatches(rollout):
            ...
            observe(model, new_logp=new_logp, old_logp=mb_logp, ..., rollout=iteration)
            fabric.backward(loss)
            fabric.call("on_after_backward")           # the gradient before any clipping
            fabric.clip_gradients(model, optimizer, max_norm=0.5)
            optimizer.step()
            optimizer.zero_grad()
        fabric.call("on_train_batch_end", outputs=None, batch=None, batch_idx=iteration)
        if guard.should_stop:
            break
    fabric.call("on_train_end")

Only public Fabric API is used: ``Fabric.call``, ``loggers``, ``strategy.reduce_boolean_decision``,
``is_global_zero``, ``device``, the ``.module`` / ``.optimizer`` of what ``fabric.setup`` returns, and the
precision plugin's ``scaler``. The optimizer step is measured by hooks on the unwrapped
``torch.optim.Optimizer`` (as under the Trainer), so ``optimizer.step()`` needs no extra call.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_ppo_guard.guard import PPOGuard
from lightning_ppo_guard.monitor import PPOMonitor

__all__ = ["FabricGuard"]


class _FabricLoop:
    """A Fabric loop as the guard's engine sees a Trainer (:class:`~lightning_ppo_guard._protocols.TrainerLike`)."""

    training = True  # the loop calls the guard's hooks from its training loop only

    def __init__(self, fabric: Any, optimizers: list[Any], monitor: PPOMonitor, log_every_n_steps: int) -> None:
        self.fabric = fabric
        self.optimizers = optimizers  # unwrapped torch optimizers: the step hooks are registered on these
        self.log_every_n_steps = log_every_n_steps
        self.should_stop = False
        self.global_step = monitor.optimizer_steps  # as Trainer.global_step: counts finished optimizer steps
        self._handles: list[Any] = []

    def count_steps(self) -> None:
        """Count each optimizer step after every other step hook ran (the Trainer counts after ``step()``)."""
        for opt in self.optimizers:
            self._handles.append(opt.register_step_post_hook(self._count))

    def _count(self, *_: Any) -> None:
        self.global_step += 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def loggers(self) -> list[Any]:
        return list(self.fabric.loggers)

    @property
    def is_global_zero(self) -> bool:
        return bool(self.fabric.is_global_zero)

    @property
    def strategy(self) -> Any:  # Fabric strategies have reduce_boolean_decision, like the Trainer's
        return self.fabric.strategy

    @property
    def log_dir(self) -> str | None:
        loggers = self.loggers
        return getattr(loggers[0], "log_dir", None) if loggers else None

    @property
    def scaler(self) -> Any:  # the AMP GradScaler of 16-mixed precision, else None
        return getattr(self.fabric.strategy.precision, "scaler", None)


class _ModuleView:
    """The user's module as the engine sees a LightningModule (:class:`~lightning_ppo_guard._protocols.ModuleLike`):
    its own submodules and parameters, Fabric's device, and manual optimization (the loop steps itself)."""

    automatic_optimization = False

    def __init__(self, module: nn.Module, device: Any) -> None:
        self.module, self.device = module, device
        self.get_submodule, self.parameters, self.named_modules = (module.get_submodule, module.parameters,
                                                                   module.named_modules)


def _unwrap(obj: Any, attr: str) -> Any:
    """The object ``fabric.setup`` wrapped (its ``.module`` / ``.optimizer``), or ``obj`` itself."""
    from lightning.fabric.wrappers import is_wrapped

    return getattr(obj, attr) if is_wrapped(obj) else obj


class FabricGuard:
    """Run a :class:`PPOGuard` (default) or a :class:`PPOMonitor` in a Lightning Fabric loop.

    Pass it to ``Fabric(callbacks=[...])`` and trigger its hooks with ``fabric.call`` (see the module
    docstring); ``observe(model, ...)`` finds it through the model given to ``on_train_start``.

    Args:
        guard: the guard or monitor to run; ``None`` gives ``PPOGuard()``.
        log_every_n_batches: log one row every this many ``on_train_batch_end`` calls (when the guard has no
            ``log_every_n_steps`` of its own).
    """

    def __init__(self, guard: PPOMonitor | None = None, *, log_every_n_batches: int = 1) -> None:
        if guard is not None and not isinstance(guard, PPOMonitor):
            raise TypeError(f"guard must be a PPOGuard or PPOMonitor, got {type(guard).__name__}.")
        if not isinstance(log_every_n_batches, int) or log_every_n_batches < 1:
            raise ValueError(f"log_every_n_batches must be a positive int, got {log_every_n_batches!r}.")
        self.guard: PPOMonitor = guard if guard is not None else PPOGuard()
        self.log_every_n_batches = log_every_n_batches
        self._loop: _FabricLoop | None = None

    # ------------------------------------------------------------------ results
    @property
    def findings(self) -> list[Any]:
        return list(getattr(self.guard, "findings", []))

    @property
    def notices(self) -> list[dict[str, Any]]:
        """What the guard could not read (see :attr:`PPOGuard.notices`)."""
        return list(getattr(self.guard, "notices", []))

    def codes(self, role: str | None = None) -> set[str]:
        return self.guard.codes(role) if isinstance(self.guard, PPOGuard) else set()

    @property
    def should_stop(self) -> bool:
        """True once ``PPOGuard(on_stall="stop")`` decided (on all ranks) that the loop should end."""
        return self._loop is not None and self._loop.should_stop

    # ------------------------------------------------------------------ hooks, called through fabric.call
    def on_train_start(self, fabric: Any, module: nn.Module, optimizers: Any) -> None:
        """Resolve the roles in ``module``, hook the optimizers and read their param groups (``attach``)."""
        if isinstance(optimizers, (list, tuple)):
            opts = [_unwrap(o, "optimizer") for o in optimizers]
        else:
            opts = [_unwrap(optimizers, "optimizer")]
        raw = _unwrap(module, "module")
        self._loop = _FabricLoop(fabric, opts, self.guard, self.log_every_n_batches)
        engine = self.guard.engine
        engine.reset()
        engine.resolve(raw)
        # observe(model, ...) reaches the engine through the model given here, what fabric.setup wrapped, or the guard
        keys = (raw, self.guard) if raw is module else (raw, module, self.guard)
        engine.attach(self._loop, _ModuleView(raw, fabric.device), keys=keys)
        self._loop.count_steps()  # registered after the engine's hooks, so it runs after them

    attach = on_train_start

    def on_train_batch_start(self, batch: Any = None, batch_idx: int = 0) -> None:
        if self._loop is not None:
            self.guard.engine.batch_start(batch_idx)

    def on_after_backward(self) -> None:
        """After ``fabric.backward`` and before any clipping: the gradient the loss produced."""
        if self._loop is not None:
            self.guard.engine.after_backward()

    def on_train_batch_end(self, outputs: Any = None, batch: Any = None, batch_idx: int = 0) -> None:
        """End of one PPO iteration: log on the cadence; with ``on_stall`` stop or raise (agreed by all ranks)."""
        if self._loop is not None:
            self.guard.engine.batch_end()
            self.guard.decide(self._loop)

    def on_train_end(self) -> None:
        """Flush the last row, remove the optimizer hooks, write the findings (rank zero)."""
        if self._loop is None:
            return
        try:
            self.guard.finish(self._loop)
        finally:
            self._loop.remove()
            self.guard.engine.detach()
