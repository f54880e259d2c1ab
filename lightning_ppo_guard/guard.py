"""``PPOGuard``: the monitor plus the rules, warning (or stopping) with a coded diagnosis when the actor stalls.

A thin Trainer callback: the measuring is :class:`~lightning_ppo_guard.PPOMonitor`'s engine, the diagnosing its
listener, :class:`~lightning_ppo_guard.diagnostics.Diagnostics`; this adds the arguments, the results, the decision
on ``on_stall`` (agreed by all ranks) and the findings file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any, Literal

from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_ppo_guard._protocols import TrainerLike
from lightning_ppo_guard.config import GuardConfig
from lightning_ppo_guard.diagnoses import Finding, get
from lightning_ppo_guard.diagnostics import Diagnostics, Verdict
from lightning_ppo_guard.monitor import PPOMonitor, warn
from lightning_ppo_guard.roles import PartsSpec, RoleSpec
from lightning_ppo_guard.rules import Diagnoser
from lightning_ppo_guard.summary import Style, findings_table

__all__ = ["PPOGuard", "PPOGuardError"]

OnStall = Literal["warn", "raise", "stop"]


class PPOGuardError(RuntimeError):
    """Raised by ``PPOGuard(on_stall="raise")`` when a run stalls; carries the findings."""

    def __init__(self, findings: list[Finding]) -> None:
        self.findings = findings
        super().__init__("PPO actor stalled:\n" + "\n".join(str(f) for f in findings))


class PPOGuard(PPOMonitor):
    r"""Measure like :class:`PPOMonitor`, and diagnose a PPO/MAPPO actor that is not learning.

    Each finding has a stable code (``PPG###``, see :data:`lightning_ppo_guard.CATALOG`), the role, the step,
    the numbers that support it, and the fix. Each code is reported once per role, on rank zero, as a
    :class:`PPOGuardWarning`; all findings are in :attr:`findings`, written to
    ``<log_dir>/ppo_guard_findings.json`` and summarised at the end of fit.

    Args:
        actors: the actor role(s), see :class:`PPOMonitor`.
        critic: the critic role, see :class:`PPOMonitor`.
        shared: a trunk both heads use, see :class:`PPOMonitor`; diagnosed with the actor's codes under role
            ``shared``, plus PPG404 when the value term's gradient swamps it.
        on_stall: what an error-severity finding does besides the warning: ``"warn"`` (nothing more),
            ``"stop"`` (the Trainer stops at the end of the batch; all ranks agree) or ``"raise"``
            (:class:`PPOGuardError` at the end of the batch, on every rank).
        ignore: codes or symbols never reported (e.g. ``["PPG106"]``).
        config: thresholds, see :class:`GuardConfig`.
        verbose: log the summary table of findings at the end of fit (rank zero).
        log_every_n_steps, dense_steps, measure_every_n_steps, overhead_budget, prefix: see :class:`PPOMonitor`.
    """

    def __init__(
        self,
        actors: RoleSpec = None,
        critic: PartsSpec = None,
        *,
        shared: PartsSpec = None,
        on_stall: OnStall = "warn",
        ignore: Iterable[str] = (),
        config: GuardConfig | None = None,
        verbose: bool = True,
        log_every_n_steps: int | None = None,
        dense_steps: int = 8,
        measure_every_n_steps: int = 64,
        overhead_budget: float | None = 0.005,
        prefix: str = "ppo_guard",
    ) -> None:
        if on_stall not in ("warn", "raise", "stop"):
            raise ValueError(f"on_stall must be 'warn', 'raise' or 'stop', got {on_stall!r}.")
        if config is not None and not isinstance(config, GuardConfig):
            raise TypeError(f"config must be a GuardConfig, got {type(config).__name__}.")
        if isinstance(ignore, str):
            ignore = [ignore]
        for item in ignore:
            if not isinstance(item, str):
                raise TypeError(f"ignore must hold codes or symbols (str), e.g. ['PPG106'], got {item!r}.")
        self.on_stall = on_stall
        self.verbose = verbose
        self.ignore = frozenset(get(item).code for item in ignore)
        self.config = config or GuardConfig()
        self.diagnostics = Diagnostics(self.config, self.ignore, warn)
        super().__init__(actors, critic, shared=shared, log_every_n_steps=log_every_n_steps, dense_steps=dense_steps,
                         measure_every_n_steps=measure_every_n_steps, overhead_budget=overhead_budget, prefix=prefix,
                         listener=self.diagnostics)
        self.diagnostics.bind(self.engine)

    # ------------------------------------------------------------------ results
    @property
    def findings(self) -> list[Finding]:
        return self.diagnostics.findings

    @property
    def notices(self) -> list[dict[str, Any]]:
        """What the guard could not read ("cannot tell"), once per role and rule: ``{"role", "rule", "step",
        "message"}`` (the message names what to pass). Warned like a finding, but no finding: a healthy run may
        have one."""
        return self.diagnostics.verdict.notices

    @property
    def diagnoser(self) -> Diagnoser:
        """The rules' state (per role)."""
        return self.diagnostics.diagnoser

    @property
    def verdict(self) -> Verdict:
        """The findings, whether a stall was named, and the rollouts started per role."""
        return self.diagnostics.verdict

    def codes(self, role: str | None = None) -> set[str]:
        """The codes found so far (for one role, if given)."""
        return {f.code for f in self.findings if role is None or f.role == role}

    def summary(self, style: Style = "auto", width: int | None = None) -> str:
        """A readable table of the findings of this fit, one row per finding (see
        :func:`lightning_ppo_guard.summary.findings_table`)."""
        table = findings_table(self.findings, optimizer_steps=self.optimizer_steps, observes=self.observes,
                               style=style, width=width)
        blind = [f"cannot tell [{n['rule']}, {n['role']}]: {n['message']}" for n in self.notices]
        if self.thinning is not None:
            k, first = self.thinning
            blind.append(f"measured 1 rollout in {k} from rollout {first} on (overhead_budget={self.overhead_budget}; "
                         "None measures every rollout)")
        return "\n".join([table, *blind])

    # ------------------------------------------------------------------ decisions, agreed across ranks
    @override
    def decide(self, host: TrainerLike) -> None:
        """At every batch end (every rank calls it, so no rank waits on another): with ``on_stall="stop"`` set
        ``host.should_stop``, with ``"raise"`` raise :class:`PPOGuardError`, once any rank named an error."""
        if self.on_stall == "warn" or self.engine.fit is None:
            return
        if not self.diagnostics.agreed_stall(host.strategy):
            return
        errors = self.diagnostics.errors  # this rank's; another rank's stall stops this one too
        if self.on_stall == "stop":
            host.should_stop = True
            named = ", ".join(f"{f.code}[{f.role}]" for f in errors) or "a stall another rank named"
            rank_zero_info(f"PPOGuard stopped the run: {named}")
        else:
            raise PPOGuardError(errors)

    @override
    def finish(self, host: TrainerLike) -> None:
        """Training ends: read what is pending, write the last row, then the summary and the findings file."""
        attached = self.engine.fit is not None
        super().finish(host)
        if not attached:
            return
        # trainer.log_dir broadcasts from rank zero under DDP: every rank must read it, not rank zero alone.
        log_dir = host.log_dir if host.loggers else None
        if host.is_global_zero:
            if self.verbose:
                rank_zero_info(self.summary())
            # Next to the first logger's files; with logger=False nothing is written to the working directory.
            if log_dir:
                os.makedirs(log_dir, exist_ok=True)
                with open(os.path.join(log_dir, "ppo_guard_findings.json"), "w") as fh:
                    json.dump([f.as_dict() for f in self.findings], fh, indent=2, default=str)
                if self.notices:
                    with open(os.path.join(log_dir, "ppo_guard_notices.json"), "w") as fh:
                        json.dump(self.notices, fh, indent=2, default=str)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **self.diagnostics.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.diagnostics.load_state_dict(state_dict)
