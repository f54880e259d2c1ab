"""``PPOGuard``: the monitor plus the rules, warning (or stopping) with a coded diagnosis when the actor stalls."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_ppo_guard._warnings import PPOGuardWarning
from lightning_ppo_guard.config import GuardConfig
from lightning_ppo_guard.diagnoses import CATALOG, Finding, get
from lightning_ppo_guard.graph import logp_by_hand, reached_leaves
from lightning_ppo_guard.metrics import OBSERVE_METRICS, STEP_METRICS
from lightning_ppo_guard.monitor import ObserveRecord, PPOMonitor, StepRecord
from lightning_ppo_guard.roles import Role, RoleSpec
from lightning_ppo_guard.rules import Diagnoser, ObserveFacts, StepFacts, WiringFacts

__all__ = ["PPOGuard", "PPOGuardError"]

_S = {spec.name: i for i, spec in enumerate(STEP_METRICS)}
_O = {spec.name: i for i, spec in enumerate(OBSERVE_METRICS)}
_GRAPH_WALK_ROLLOUTS = 8
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
        on_stall: what an error-severity finding does besides the warning: ``"warn"`` (nothing more),
            ``"stop"`` (the Trainer stops at the end of the batch; all ranks agree) or ``"raise"``
            (:class:`PPOGuardError` at the end of the batch, on every rank).
        ignore: codes or symbols never reported (e.g. ``["PPG106"]``).
        config: thresholds, see :class:`GuardConfig`.
        verbose: log the summary table of findings at the end of fit (rank zero).
        log_every_n_steps, dense_steps, measure_every_n_steps, prefix: see :class:`PPOMonitor`.
    """

    def __init__(
        self,
        actors: RoleSpec = None,
        critic: str | nn.Module | None = None,
        *,
        on_stall: OnStall = "warn",
        ignore: Iterable[str] = (),
        config: GuardConfig | None = None,
        verbose: bool = True,
        log_every_n_steps: int | None = None,
        dense_steps: int = 128,
        measure_every_n_steps: int = 64,
        prefix: str = "ppo_guard",
    ) -> None:
        super().__init__(actors, critic, log_every_n_steps=log_every_n_steps, dense_steps=dense_steps,
                         measure_every_n_steps=measure_every_n_steps, prefix=prefix)
        if on_stall not in ("warn", "raise", "stop"):
            raise ValueError(f"on_stall must be 'warn', 'raise' or 'stop', got {on_stall!r}.")
        if config is not None and not isinstance(config, GuardConfig):
            raise TypeError(f"config must be a GuardConfig, got {type(config).__name__}.")
        if isinstance(ignore, str):
            ignore = [ignore]
        codes = {get(item).code for item in ignore}
        self.on_stall = on_stall
        self.verbose = verbose
        self.ignore = frozenset(codes)
        self.config = config or GuardConfig()
        self.diagnoser = Diagnoser(self.config)
        self.findings: list[Finding] = []
        self._stall = False
        self._pending: list[ObserveRecord] = []
        self._wired: set[str] = set()
        self._walks: dict[str, int] = {}
        self._rollouts_started: dict[str, int] = {}

    # ------------------------------------------------------------------ findings
    def _report(self, findings: list[Finding]) -> None:
        for finding in findings:
            if finding.code in self.ignore:
                continue
            if finding.rollout is None:
                finding.rollout = max(self._rollouts_started.get(finding.role, 0) - 1, 0)
            self.findings.append(finding)
            rank_zero_warn(str(finding), category=PPOGuardWarning)
            if finding.severity == "error":
                self._stall = True

    @override
    def refresh(self) -> None:
        super().refresh()
        if self._module is None:
            return
        step = self._trainer.global_step if self._trainer is not None else 0
        for role in self.roles:
            b = self.bindings.get(role.name)
            if b is None:
                continue
            self._report(self.diagnoser.check_setup(
                role.name, role.kind, step, binding=b.fraction, lr=b.lr, trainable=len(role.params),
                frozen=len(role.frozen), stale_tensors=b.stale_tensors))

    @override
    def _on_roles_changed(self, roles: list[Role]) -> None:
        for role in roles:
            self._wired.discard(role.name)  # check the wiring again at its next observe

    # ------------------------------------------------------------------ wiring, at observe
    @override
    def _on_observe(self, record: ObserveRecord, role: Role, **tensors: Any) -> None:
        if record.first_in_rollout:
            self._rollouts_started[role.name] = self._rollouts_started.get(role.name, 0) + 1
        new_logp: Tensor = tensors["new_logp"]
        old_logp: Tensor = tensors["old_logp"]
        broadcast = None
        for name, other in (("old_logp", old_logp), ("advantages", tensors.get("advantages")),
                            ("values", tensors.get("values")), ("returns", tensors.get("returns"))):
            if other is None or other.shape == new_logp.shape:
                continue
            try:
                shape = tuple(torch.broadcast_shapes(other.shape, new_logp.shape))
            except RuntimeError:
                continue
            if math.prod(shape) != new_logp.numel():
                broadcast = (name, tuple(other.shape), tuple(new_logp.shape), shape)
                break
        old_rg = bool(old_logp.requires_grad)
        # The graph walk runs at a role's first observe and again at the start of its first rollouts (a loop
        # that changes path after warm-up); later, a cut graph still shows in the step rules (zero gradient).
        walks = self._walks.get(role.name, 0)
        check_graph = role.name not in self._wired or (record.first_in_rollout and walks < _GRAPH_WALK_ROLLOUTS)
        if check_graph or old_rg or broadcast is not None:
            reached = trainable = 0
            by_hand = ""
            if new_logp.requires_grad and check_graph:
                trainable = len(role.params)
                reached = len(reached_leaves(new_logp, role.ids))
                by_hand = logp_by_hand(new_logp)
            facts = WiringFacts(
                logp_requires_grad=bool(new_logp.requires_grad), old_requires_grad=old_rg, reached=reached,
                trainable=trainable, by_hand=by_hand, broadcast=broadcast,
            )
            self._report(self.diagnoser.check_wiring(role.name, record.step, facts))
            self._wired.add(role.name)
            if check_graph:
                self._walks[role.name] = walks + 1
        self._pending.append(record)
        if record.first_in_rollout and not self.measuring():
            self._process([])  # a rollout ended: run its rules now, not at the next measured step

    # ------------------------------------------------------------------ runtime, at each step
    @override
    def _on_skipped(self, roles: list[str]) -> None:
        step = self._trainer.global_step if self._trainer is not None else self.optimizer_steps
        for role in self.actor_roles:
            if role.name in roles:
                self._report(self.diagnoser.check_skipped(role.name, step))

    @override
    def _on_step(self, records: list[StepRecord]) -> None:
        self._process(records)

    def _process(self, records: list[StepRecord]) -> None:
        tensors = [r.values.float() for r in self._pending] + [r.values.float() for r in records]
        if not tensors:
            return
        plans, gaps = self._take_comparisons()
        # One device-to-host transfer for everything this step produced (and the post-clip inference checks).
        rows = torch.cat([t.reshape(-1) for t in tensors] + [g.to(tensors[0].device) for g in gaps]).cpu().tolist()
        if gaps:
            self._read_comparisons(plans, rows[len(rows) - len(gaps):])
        offset = 0
        for record in self._pending:
            vals = rows[offset:offset + len(OBSERVE_METRICS)]
            offset += len(OBSERVE_METRICS)
            self._check_observe(record, vals)
        self._pending.clear()
        by_role: dict[str, list[float]] = {}
        for record in records:
            by_role[record.role] = rows[offset:offset + len(STEP_METRICS)]
            offset += len(STEP_METRICS)
        critic = next((r.name for r in self.roles if r.kind == "critic"), None)
        critic_vals = by_role.get(critic) if critic else None
        for record in records:
            role = next(r for r in self.roles if r.name == record.role)
            if role.kind != "actor":
                continue
            v = by_role[record.role]
            b = self.bindings[record.role]
            critic_norm = math.nan
            if critic_vals is not None and abs(critic_vals[_S["clip_coef"]] - v[_S["clip_coef"]]) <= 1e-3 * max(
                    abs(v[_S["clip_coef"]]), 1e-12):
                critic_norm = critic_vals[_S["grad_norm"]]
            facts = StepFacts(
                grad_norm=v[_S["grad_norm"]], grad_norm_clipped=v[_S["grad_norm_clipped"]],
                clip_coef=v[_S["clip_coef"]], nonzero_frac=v[_S["grad_nonzero_frac"]],
                grad_none=record.grad_none, trainable_tensors=len(role.params), nonfinite=v[_S["grad_nonfinite"]],
                update_norm=v[_S["update_norm"]], update_ratio=v[_S["update_ratio"]], binding=b.fraction,
                lr=b.lr, critic_grad_norm=critic_norm,
            )
            self._report(self.diagnoser.check_step(record.role, record.step, facts))

    def _check_observe(self, record: ObserveRecord, vals: list[float]) -> None:
        role = record.role
        facts = ObserveFacts(
            approx_kl=vals[_O["approx_kl"]], ratio_dev=vals[_O["ratio_dev"]], adv_mean=vals[_O["adv_mean"]],
            adv_std=vals[_O["adv_std"]], entropy_norm=vals[_O["entropy_norm"]],
            entropy_drift=vals[_O["entropy_drift"]], first_in_rollout=record.first_in_rollout,
            rollout=record.rollout, target_kl=record.target_kl,
            prev_updates=record.prev_updates,
        )
        self._report(self.diagnoser.check_observe(role, record.step, facts))

    # ------------------------------------------------------------------ decisions, agreed across ranks
    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # skipped steps, the row
        if self.on_stall == "warn":
            return
        # Every rank calls this collective at every batch end, so no rank waits on another.
        stall = trainer.strategy.reduce_boolean_decision(self._stall, all=False)
        if not stall:
            return
        errors = [f for f in self.findings if f.severity == "error"]
        if self.on_stall == "stop":
            trainer.should_stop = True
            rank_zero_info(f"PPOGuard stopped the run: {', '.join(f'{f.code}[{f.role}]' for f in errors)}")
        else:
            raise PPOGuardError(errors)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._process([])
        super().on_train_end(trainer, pl_module)
        # trainer.log_dir broadcasts from rank zero under DDP: every rank must read it, not rank zero alone.
        log_dir = trainer.log_dir if trainer.loggers else None
        if trainer.is_global_zero:
            if self.verbose:
                rank_zero_info(self.summary())
            # Next to the first logger's files; with logger=False nothing is written to the working directory.
            if log_dir:
                os.makedirs(log_dir, exist_ok=True)
                with open(os.path.join(log_dir, "ppo_guard_findings.json"), "w") as fh:
                    json.dump([f.as_dict() for f in self.findings], fh, indent=2, default=str)

    def summary(self, style: Literal["auto", "rich", "plain"] = "auto", width: int | None = None) -> str:
        """A readable table of the findings of this fit, one row per finding.

        Columns: code, severity, role, optimizer step, rollout (1 = first), symbol, message and fix. With
        ``style="auto"`` it is a ``rich`` table when rich is importable, else plain text in aligned columns
        (``"rich"`` / ``"plain"`` force one). ``width`` defaults to the terminal's (80..140 columns). The
        string holds no colour codes, so it reads the same in a log file.
        """
        import io
        import shutil
        import textwrap

        if style not in ("auto", "rich", "plain"):
            raise ValueError(f"style must be 'auto', 'rich' or 'plain', got {style!r}.")
        if not self.findings:
            return f"PPOGuard: no finding in {self.optimizer_steps} optimizer steps ({self.observes} observes)."
        width = width or min(max(shutil.get_terminal_size((120, 24)).columns, 80), 140)
        title = f"PPOGuard: {len(self.findings)} finding(s) in {self.optimizer_steps} optimizer steps"
        header = ("code", "severity", "role", "step", "rollout")
        rows = [(f.code, f.severity, f.role, str(f.step), "-" if f.rollout is None else str(f.rollout + 1),
                 f.symbol, f.message, CATALOG[f.code].fix) for f in self.findings]
        if style != "plain":
            try:
                from rich.console import Console
                from rich.table import Table
                from rich.text import Text
            except ImportError:
                if style == "rich":
                    raise
            else:
                table = Table(title=Text(title), title_justify="left", show_lines=True, expand=True)
                for name in header:
                    table.add_column(name, no_wrap=True, justify="right" if name in ("step", "rollout") else "left")
                table.add_column("symbol: message / fix", ratio=1)
                for *cells, symbol, message, fix in rows:
                    # Text, not markup: messages and fixes hold brackets such as [len(g['params']) ...]
                    table.add_row(*(Text(c) for c in cells[:5]), Text(f"{symbol}: {message}\nfix: {fix}"))
                # force_jupyter=False: in a notebook rich would otherwise display the table, not write it
                console = Console(file=io.StringIO(), width=width, color_system=None, highlight=False,
                                  emoji=False, soft_wrap=False, force_jupyter=False, force_terminal=False)
                console.print(table)
                return "\n".join(line.rstrip() for line in console.file.getvalue().rstrip().splitlines())
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

        def cols(cells: Iterable[str]) -> str:
            return "  " + "  ".join(c.rjust(w) if i >= 3 else c.ljust(w)
                                    for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

        indent = " " * (len(cols([""] * len(header))) + 2)
        width = max(width, len(indent) + 40)
        message = textwrap.TextWrapper(width=width, subsequent_indent=indent)
        fix = textwrap.TextWrapper(width=width, initial_indent=indent + "fix: ", subsequent_indent=indent + "     ")
        lines = [title, cols(header) + "  symbol: message / fix"]
        for row in rows:
            lines.append(message.fill(cols(row[:5]) + "  " + f"{row[5]}: {row[6]}"))
            lines.append(fix.fill(row[7]))
        return "\n".join(lines)

    def codes(self, role: str | None = None) -> set[str]:
        """The codes found so far (for one role, if given)."""
        return {f.code for f in self.findings if role is None or f.role == role}

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            diagnoser=self.diagnoser.state_dict(),
            findings=[{"code": f.code, "role": f.role, "step": f.step, "evidence": f.evidence,
                       "rollout": f.rollout} for f in self.findings],
            rollouts_started=dict(self._rollouts_started),
        )
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.diagnoser.load_state_dict(state_dict.get("diagnoser", {}))
        self.findings = [Finding(**f) for f in state_dict.get("findings", [])]
        self._rollouts_started = dict(state_dict.get("rollouts_started", {}))
