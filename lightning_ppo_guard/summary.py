"""The end-of-fit table of findings (beside :mod:`~lightning_ppo_guard.report`, which draws a run's logs).

:func:`findings_table` is what ``PPOGuard.summary()`` returns: one row per finding with code, severity, role,
optimizer step, rollout (1 = first, as in the findings file), symbol, message and fix; a ``rich`` table when
rich is importable, else aligned plain columns. The string holds no colour codes, so it reads the same in a log.
"""

from __future__ import annotations

import io
import shutil
import textwrap
from collections.abc import Iterable, Sequence
from typing import Literal

from lightning_ppo_guard.diagnoses import Finding

__all__ = ["findings_table"]

Style = Literal["auto", "rich", "plain"]
_HEADER = ("code", "severity", "role", "step", "rollout")


def findings_table(findings: Sequence[Finding], *, optimizer_steps: int, observes: int, style: Style = "auto",
                   width: int | None = None) -> str:
    """A readable table of ``findings`` (see the module docstring); ``width`` defaults to the terminal's
    (80..140 columns)."""
    if style not in ("auto", "rich", "plain"):
        raise ValueError(f"style must be 'auto', 'rich' or 'plain', got {style!r}.")
    if not findings:
        return f"PPOGuard: no finding in {optimizer_steps} optimizer steps ({observes} observes)."
    width = width or min(max(shutil.get_terminal_size((120, 24)).columns, 80), 140)
    title = f"PPOGuard: {len(findings)} finding(s) in {optimizer_steps} optimizer steps"
    rows = [(f.code, f.severity, f.role, str(f.step), "-" if f.rollout is None else str(f.rollout + 1),
             f.symbol, f.message, f.diagnosis.fix) for f in findings]
    if style != "plain":
        try:
            return _rich(title, rows, width)
        except ImportError:
            if style == "rich":
                raise
    return _plain(title, rows, width)


def _rich(title: str, rows: Sequence[tuple[str, ...]], width: int) -> str:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(title), title_justify="left", show_lines=True, expand=True)
    for name in _HEADER:
        table.add_column(name, no_wrap=True, justify="right" if name in ("step", "rollout") else "left")
    table.add_column("symbol: message / fix", ratio=1)
    for *cells, symbol, message, fix in rows:
        # Text, not markup: messages and fixes hold brackets such as [len(g['params']) ...]
        table.add_row(*(Text(c) for c in cells[:5]), Text(f"{symbol}: {message}\nfix: {fix}"))
    # force_jupyter=False: in a notebook rich would otherwise display the table, not write it
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, highlight=False, emoji=False,
                      soft_wrap=False, force_jupyter=False, force_terminal=False)
    console.print(table)
    return "\n".join(line.rstrip() for line in buffer.getvalue().rstrip().splitlines())


def _plain(title: str, rows: Sequence[tuple[str, ...]], width: int) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(_HEADER)]

    def cols(cells: Iterable[str]) -> str:
        return "  " + "  ".join(c.rjust(w) if i >= 3 else c.ljust(w)
                                for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    indent = " " * (len(cols([""] * len(_HEADER))) + 2)
    width = max(width, len(indent) + 40)
    message = textwrap.TextWrapper(width=width, subsequent_indent=indent)
    fix = textwrap.TextWrapper(width=width, initial_indent=indent + "fix: ", subsequent_indent=indent + "     ")
    lines = [title, cols(_HEADER) + "  symbol: message / fix"]
    for row in rows:
        lines.append(message.fill(cols(row[:5]) + "  " + f"{row[5]}: {row[6]}"))
        lines.append(fix.fill(row[7]))
    return "\n".join(lines)
