"""PPO LightningModules written in other styles than the reference, healthy or with a planted fault.

The reference zoo (:mod:`lightning_ppo_guard.reference`) is the code the guard was first tuned on. These are
the code it was *not* tuned on: other layouts (an ``Agent`` held as ``self.agent``, SB3's ``ActorCriticPolicy``,
shared trunks), other loops (CleanRL's epochs x minibatches with an lr annealed to 0 and a per-epoch
``target_kl`` break), other distributions (Gaussian, multi-categorical), schedules, precisions, optimizers and
Trainer features (validation loops, activation checkpointing, sparse and lazy parameters). Each
:class:`Variant` is one real ``Trainer.fit`` and what the guard must say about it: nothing on a healthy run,
the expected code(s) for the expected role on a faulty one.

Modules:

* :mod:`~tests.zoo.cleanrl`: CleanRL-style loops (discrete, continuous Gaussian,
  a shared ``network`` trunk), any number of steps per rollout, late stalls.
* :mod:`~tests.zoo.styles`: layouts, schedules, optimizers, precisions and
  Trainer features users have.

``python benchmarks/variants.py`` runs every variant and prints the table (codes named, first step).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Variant", "all_variants", "run_variant"]


@dataclass(frozen=True)
class Variant:
    """One realistic PPO fit and what the guard must report on it.

    Attributes:
        name: unique, kebab-case (``"cleanrl-4x4-anneal"``).
        family: the class of user code it stands for (``"schedule"``, ``"layout"``, ``"precision"``...).
        make: ``seed -> (module, trainer_kwargs)``; the kwargs are everything ``lightning.Trainer`` needs except
            ``callbacks``, ``logger`` and ``enable_checkpointing`` (which the runner sets).
        expect: ``(code, role)`` pairs that must be named; empty for a healthy variant (then nothing may be).
        deadline: optimizer step by which every expected code must be named (None: by the end of the fit).
        allowed: other codes that may be named too (as few as possible; say why in ``note``).
        guard_kwargs: the ``PPOGuard(...)`` arguments a user of this code would write (roles, ...).
        note: one line on what the variant does and why the expectation is right.
        slow: a full training run (minutes); the test suite runs it only with the slow marker.
        minimal: what must be named when the module calls ``observe(new_logp, old_logp, advantages)`` only (its
            ``make`` then takes ``observe="minimal"``); None: the same as ``expect``. An empty set on a faulty
            variant means the fault cannot be told from those inputs (documented, not a finding to expect).
    """

    name: str
    family: str
    make: Callable[[int], tuple[Any, dict[str, Any]]]
    expect: frozenset[tuple[str, str]] = frozenset()
    deadline: int | None = None
    allowed: frozenset[str] = frozenset()
    guard_kwargs: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""
    slow: bool = False
    minimal: frozenset[tuple[str, str]] | None = None

    @property
    def healthy(self) -> bool:
        return not self.expect


def all_variants() -> list[Variant]:
    """Every variant of every module, in a stable order (modules import lazily: they need gymnasium)."""
    from tests.zoo import cleanrl, styles

    return [*cleanrl.VARIANTS, *styles.VARIANTS]


def run_variant(variant: Variant, seed: int = 0, *, logger: Any = False, quiet: bool = True,
                **guard_overrides: Any) -> tuple[Any, Any, Any]:
    """Fit ``variant`` once under a :class:`~lightning_ppo_guard.PPOGuard`; returns ``(guard, trainer, module)``.

    ``guard_overrides`` are added to the variant's own ``guard_kwargs`` (e.g. ``dense_steps=0``). Guard warnings
    are silenced when ``quiet`` (the findings are in ``guard.findings``).
    """
    import warnings

    import lightning as L

    from lightning_ppo_guard import PPOGuard, PPOGuardWarning

    L.seed_everything(seed, verbose=False)
    module, trainer_kwargs = variant.make(seed)
    guard = PPOGuard(**{"verbose": False, **variant.guard_kwargs, **guard_overrides})
    trainer = L.Trainer(**{"enable_checkpointing": False, "enable_progress_bar": False,
                           "enable_model_summary": False, **trainer_kwargs}, logger=logger, callbacks=[guard])
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore", PPOGuardWarning)
        trainer.fit(module)
    return guard, trainer, module
