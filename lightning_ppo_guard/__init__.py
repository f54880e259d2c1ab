"""lightning_ppo_guard: catch a PPO/MAPPO actor that is not learning, on the first updates, and say why."""

from lightning_ppo_guard import functional
from lightning_ppo_guard._warnings import PPOGuardWarning
from lightning_ppo_guard.config import GuardConfig
from lightning_ppo_guard.diagnoses import CATALOG, Diagnosis, Finding
from lightning_ppo_guard.fabric import FabricGuard
from lightning_ppo_guard.guard import PPOGuard, PPOGuardError
from lightning_ppo_guard.metrics import OBSERVE_METRICS, STEP_METRICS, MetricSpec
from lightning_ppo_guard.monitor import PPOMonitor
from lightning_ppo_guard.observe import observe
from lightning_ppo_guard.roles import Role, resolve_roles

__all__ = [
    "CATALOG",
    "OBSERVE_METRICS",
    "STEP_METRICS",
    "Diagnosis",
    "FabricGuard",
    "Finding",
    "GuardConfig",
    "MetricSpec",
    "PPOGuard",
    "PPOGuardError",
    "PPOGuardWarning",
    "PPOMonitor",
    "Role",
    "functional",
    "observe",
    "resolve_roles",
]
__version__ = "0.1.0"
