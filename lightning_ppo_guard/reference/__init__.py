"""Reference PPO / MAPPO LightningModules on CartPole, healthy or with a planted fault.

They are what the guard is tested against: each module calls :func:`lightning_ppo_guard.observe` once per
minibatch update, and ``cfg.fault`` (see :data:`FAULTS`) plants a realistic bug. Needs ``gymnasium``
(the ``demo`` extra)::

    from lightning import Trainer
    from lightning_ppo_guard.reference import CartPolePPO, PPOConfig, trainer_kwargs

    module = CartPolePPO(PPOConfig(seed=0, fault="detached_logits"))
    Trainer(**trainer_kwargs(module), logger=False, enable_checkpointing=False).fit(module)
"""

from lightning_ppo_guard.reference._common import trainer_kwargs
from lightning_ppo_guard.reference.cartpole import (
    Actor,
    CartPolePPO,
    CartPolePPOAuto,
    Critic,
    PPOConfig,
    RolloutDataset,
)
from lightning_ppo_guard.reference.faults import (
    AUTO_FAULTS,
    FAULTS,
    MANUAL_FAULTS,
    MAPPO_FAULTS,
    validate_fault,
)
from lightning_ppo_guard.reference.mappo import CentralCritic, MAPPOConfig, MultiCartPoleMAPPO, ShardedMAPPO

__all__ = [
    "AUTO_FAULTS",
    "FAULTS",
    "MANUAL_FAULTS",
    "MAPPO_FAULTS",
    "Actor",
    "CartPolePPO",
    "CartPolePPOAuto",
    "CentralCritic",
    "Critic",
    "MAPPOConfig",
    "MultiCartPoleMAPPO",
    "PPOConfig",
    "RolloutDataset",
    "ShardedMAPPO",
    "trainer_kwargs",
    "validate_fault",
]
