"""``ppo-guard report LOGDIR``: a PNG dashboard and an HTML page of what the guard logged and found.

Pure functions over a run's files, no Trainer needed:

* :func:`find_run` finds the run under a folder: a CSVLogger ``metrics.csv`` and/or TensorBoard event files
  (read with ``tensorboard``'s ``EventAccumulator`` when ``tensorboard`` is importable), and the
  ``ppo_guard_findings.json`` the guard writes into the logger's ``log_dir``;
* :func:`read_csv_metrics`, :func:`read_tensorboard_metrics` and :func:`read_findings` read them;
* :func:`plot_dashboard` draws approx_kl, the actors' update_ratio, grad_norm, entropy and the episode return
  (``train/episode_return``, as the reference modules log it), one line per role, with a vertical line at
  each finding's step;
* :func:`render_html` embeds the PNG (base64) and a table of the findings with the catalog's fix;
* :func:`make_report` does all of it and writes both files.

Problems with the input raise :class:`ReportError` with a one-line message (the CLI exits with code 2).
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_ppo_guard.diagnoses import CATALOG

__all__ = [
    "FINDINGS_FILE",
    "PANELS",
    "ReportError",
    "RunLogs",
    "find_run",
    "make_report",
    "plot_dashboard",
    "read_csv_metrics",
    "read_findings",
    "read_tensorboard_metrics",
    "render_html",
]

FINDINGS_FILE = "ppo_guard_findings.json"
#: (metric, title, roles it is plotted for: "actor" = actor roles only, "all" = every role, log-like y axis)
PANELS: tuple[tuple[str, str, str, bool], ...] = (
    ("approx_kl", "approx_kl (k3)", "actor", True),
    ("update_ratio", "update_ratio = ||dθ|| / ||θ||", "actor", True),
    ("grad_norm", "grad_norm (before clipping)", "all", True),
    ("entropy", "entropy", "actor", False),
)
#: The episode-return key the reference modules log (``self.log("train/episode_return", ...)``).
RETURN_KEY = "train/episode_return"

Series = list[tuple[int, float]]


class ReportError(ValueError):
    """The folder cannot be turned into a report; the message says why, on one line."""


@dataclass
class RunLogs:
    """What was found for one run: where, its scalar series ``key -> [(step, value), ...]``, its findings."""

    run_dir: Path
    sources: list[Path]
    metrics: dict[str, Series]
    findings: list[dict[str, Any]] = field(default_factory=list)
    findings_path: Path | None = None
    prefix: str = "ppo_guard"
    other_runs: list[Path] = field(default_factory=list)

    def roles(self) -> list[str]:
        """Roles with a ``<prefix>/<role>/<metric>`` key, actors first (in order of appearance), critic last."""
        seen: dict[str, None] = {}
        for key in self.metrics:
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == self.prefix:
                seen.setdefault(parts[1], None)
        roles = sorted(seen, key=lambda r: (r == "critic", _natural(r)))
        return roles

    def series(self, role: str, metric: str) -> Series:
        return self.metrics.get(f"{self.prefix}/{role}/{metric}", [])


def _natural(name: str) -> tuple[Any, ...]:
    head = name.rstrip("0123456789")
    tail = name[len(head):]
    return (head, int(tail) if tail else -1)


# ---------------------------------------------------------------------------------------------- finding files
def _is_event_file(name: str) -> bool:
    return name.startswith("events.out.tfevents.")


def find_run(logdir: str | os.PathLike[str], prefix: str = "ppo_guard") -> RunLogs:
    """Find and read the newest run under ``logdir`` (a logger's version folder, or any folder above it).

    A run is a folder holding a ``metrics.csv`` and/or TensorBoard event files. When several folders under
    ``logdir`` hold logs, the one written last is used (the others are listed in ``other_runs``).

    Raises:
        ReportError: ``logdir`` is missing or not a folder; it holds no logs; or its logs have no
            ``<prefix>/`` keys (logs of a run without PPOGuard/PPOMonitor).
    """
    root = Path(logdir)
    if not root.exists():
        raise ReportError(f"no such folder: {root}")
    if not root.is_dir():
        raise ReportError(f"not a folder: {root} (give the logger's folder, e.g. lightning_logs/version_0)")
    runs: dict[Path, float] = {}
    for dirpath, _dirs, files in os.walk(root):
        names = [f for f in files if f == "metrics.csv" or _is_event_file(f)]
        if names:
            runs[Path(dirpath)] = max(os.path.getmtime(os.path.join(dirpath, f)) for f in names)
    if not runs:
        raise ReportError(f"no logs under {root}: no CSVLogger metrics.csv and no TensorBoard event files")
    ordered = sorted(runs, key=lambda p: runs[p], reverse=True)
    run_dir = ordered[0]
    metrics: dict[str, Series] = {}
    sources: list[Path] = []
    csv_path = run_dir / "metrics.csv"
    if csv_path.is_file():
        _merge(metrics, read_csv_metrics(csv_path))
        sources.append(csv_path)
    events = sorted(p for p in run_dir.iterdir() if _is_event_file(p.name))
    if events:
        if not _have_tensorboard():
            if not sources:
                raise ReportError(f"{run_dir} holds TensorBoard event files but tensorboard is not installed "
                                  "(pip install tensorboard)")
        else:
            _merge(metrics, read_tensorboard_metrics(run_dir))
            sources.extend(events)
    if not any(k.startswith(f"{prefix}/") for k in metrics):
        raise ReportError(f"the logs in {run_dir} have no '{prefix}/' metrics: was PPOGuard (or PPOMonitor) "
                          "among the Trainer's callbacks?")
    findings_path: Path | None = run_dir / FINDINGS_FILE
    if findings_path is not None and not findings_path.is_file():
        # with several loggers, the findings sit in the first logger's folder: look next to this run
        near = [p / FINDINGS_FILE for p in ordered if (p / FINDINGS_FILE).is_file() and p.parent == run_dir.parent]
        findings_path = near[0] if near else None
    findings = read_findings(findings_path) if findings_path is not None else []
    return RunLogs(run_dir=run_dir, sources=sources, metrics=metrics, findings=findings,
                   findings_path=findings_path, prefix=prefix, other_runs=ordered[1:])


def _merge(into: dict[str, Series], new: dict[str, Series]) -> None:
    for key, values in new.items():
        if key not in into:  # CSV first; TensorBoard adds only the keys the CSV lacks
            into[key] = values


def _have_tensorboard() -> bool:
    try:
        import tensorboard.backend.event_processing.event_accumulator  # noqa: F401
    except ImportError:
        return False
    return True


def read_csv_metrics(path: str | os.PathLike[str]) -> dict[str, Series]:
    """A CSVLogger ``metrics.csv`` as ``key -> [(step, value), ...]`` (empty cells and non-numbers skipped)."""
    out: dict[str, Series] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            try:
                step = int(float(row.get("step") or "nan"))
            except ValueError:
                continue
            for key, cell in row.items():
                if key in ("step", "epoch") or key is None or cell in ("", None):
                    continue
                try:
                    out.setdefault(key, []).append((step, float(cell)))
                except ValueError:
                    continue
    return out


def read_tensorboard_metrics(run_dir: str | os.PathLike[str]) -> dict[str, Series]:
    """Every scalar of the TensorBoard event files in ``run_dir`` (needs ``tensorboard``)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={SCALARS: 0})
    acc.Reload()
    return {tag: [(int(e.step), float(e.value)) for e in acc.Scalars(tag)] for tag in acc.Tags()[SCALARS]}


def read_findings(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The guard's ``ppo_guard_findings.json`` (a list of ``Finding.as_dict()``)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, list) or not all(isinstance(d, dict) and "code" in d for d in data):
        raise ReportError(f"{path} is not a list of PPOGuard findings")
    return data


# ---------------------------------------------------------------------------------------------- drawing
def _finding_label(f: dict[str, Any]) -> str:
    return f"{f.get('code')} {f.get('symbol', '')} [{f.get('role')}] @ step {f.get('step')}"


def plot_dashboard(run: RunLogs, png_path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Draw the dashboard PNG: one panel per metric, one line per role, findings as vertical lines."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ReportError("the report needs matplotlib: pip install 'lightning_ppo_guard[report]'") from exc

    roles = run.roles()
    actors = [r for r in roles if r != "critic"]
    # (title, lines, log-like y, x label, mark findings): the guard logs at trainer.global_step (optimizer
    # steps); self.log uses Lightning's own step (batches; in manual optimization one per PPO iteration).
    panels: list[tuple[str, list[tuple[str, Series]], bool, str, bool]] = []
    for metric, name, which, loglike in PANELS:
        lines = [(role, run.series(role, metric)) for role in (actors if which == "actor" else roles)]
        lines = [(role, s) for role, s in lines if s]
        if lines:
            panels.append((name, lines, loglike, "optimizer step", True))
    returns = [("mean of finished episodes" if k == RETURN_KEY else k.split("/")[1], s)
               for k, s in sorted(run.metrics.items())
               if k == RETURN_KEY or (k.startswith("train/") and k.endswith("/episode_return") and k.count("/") == 2)]
    if returns:
        panels.append((f"episode return ({RETURN_KEY})", returns, False,
                       "Lightning logging step (manual optimization: PPO iteration)", False))

    ncols = 2
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(13, 3.6 * nrows + 0.9), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    finding_styles = [("#d62728", "--"), ("#9467bd", "-."), ("#8c564b", ":"), ("#e377c2", "--")]
    for ax, (name, lines, loglike, xlabel, mark) in zip(axes.flat, panels, strict=False):
        values = [v for _, s in lines for _, v in s if math.isfinite(v)]
        for i, (role, s) in enumerate(lines):
            steps, vals = zip(*s, strict=True)
            ax.plot(steps, vals, label=role, color=colors[i % len(colors)], lw=1.3,
                    marker="." if len(s) < 40 else None)
        positive = sorted(abs(v) for v in values if v != 0)
        if loglike and positive:
            # linear below a tenth of the 10% quantile: exact zeros (a frozen actor) stay visible, and a few
            # float-noise values (1e-15) do not stretch the axis over ten empty decades
            ax.set_yscale("symlog", linthresh=positive[len(positive) // 10] / 10)
        if loglike and values and min(values) >= 0:
            ax.set_ylim(bottom=0)
        if values and not positive:
            ax.text(0.5, 0.5, "exactly 0 at every logged step", transform=ax.transAxes, ha="center",
                    color="#d62728", fontsize=10)
        if not loglike:
            ax.ticklabel_format(axis="y", useOffset=False)
            scale = max((abs(v) for v in values), default=0.0)
            if values and scale > 0 and max(values) - min(values) <= 1e-4 * scale:
                # float32 noise around a constant would fill the axis and look like motion
                center = (max(values) + min(values)) / 2
                ax.set_ylim(center - 0.05 * scale, center + 0.05 * scale)
                ax.text(0.5, 0.3, f"flat at {center:.4g} (spread < 1e-4 relative)", transform=ax.transAxes,
                        ha="center", color="#d62728", fontsize=10)
        if mark:
            for j, f in enumerate(run.findings):
                color, style = finding_styles[j % len(finding_styles)]
                ax.axvline(float(f.get("step") or 0), color=color, ls=style, lw=1.6, label=_finding_label(f))
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    codes = ", ".join(f"{f.get('code')}[{f.get('role')}]" for f in run.findings) or "no finding"
    fig.suptitle(title or f"PPOGuard report: {run.run_dir}\nfindings: {codes}", fontsize=11)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def _fix(code: str, fallback: str) -> str:
    d = CATALOG.get(code)
    return d.fix if d is not None else fallback


def _last_values(run: RunLogs) -> list[tuple[str, list[str]]]:
    rows = []
    for role in run.roles():
        cells = []
        for metric, *_ in PANELS:
            s = run.series(role, metric)
            cells.append(f"{s[-1][1]:.4g}" if s else "–")
        rows.append((role, cells))
    return rows


def render_html(run: RunLogs, png: bytes) -> str:
    """The report page: the dashboard (embedded), the findings with their fix, and the last logged values."""
    e = html.escape
    findings_rows = "\n".join(
        "<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in (
            f.get("code"), f.get("symbol", ""), f.get("severity", ""), f.get("role"), f.get("step"),
            f.get("message", ""), _fix(str(f.get("code")), str(f.get("fix", ""))))) + "</tr>"
        for f in run.findings)
    if run.findings:
        findings = ("<table><tr><th>code</th><th>symbol</th><th>severity</th><th>role</th><th>step</th>"
                    f"<th>message</th><th>fix</th></tr>\n{findings_rows}\n</table>")
    elif run.findings_path is not None:
        findings = "<p class=ok>No finding: the guard saw nothing wrong.</p>"
    else:
        findings = (f"<p>No <code>{FINDINGS_FILE}</code> next to these logs (the fit did not reach its end, or "
                    "the guard was a PPOMonitor).</p>")
    last = "\n".join(f"<tr><td>{e(role)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
                     for role, cells in _last_values(run))
    head = "".join(f"<th>{e(m)}</th>" for m, *_ in PANELS)
    sources = "<br>".join(e(str(p)) for p in run.sources)
    others = (f"<p>Other runs under the folder (not shown): {e(', '.join(str(p) for p in run.other_runs))}</p>"
              if run.other_runs else "")
    img = base64.b64encode(png).decode("ascii")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>PPOGuard report: {e(str(run.run_dir))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1400px; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; font-size: 14px; }}
th {{ background: #f3f3f3; }} .ok {{ color: #2a7d2a; font-weight: bold; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>PPOGuard report</h1>
<p>Run: <code>{e(str(run.run_dir))}</code><br>Read from: {sources}</p>
{others}
<h2>Findings</h2>
{findings}
<h2>Dashboard</h2>
<img alt="PPOGuard dashboard" src="data:image/png;base64,{img}">
<h2>Last logged values</h2>
<table><tr><th>role</th>{head}</tr>
{last}
</table>
<p>Codes: <code>ppo-guard explain CODE</code> prints the explanation and the fix.</p>
</body></html>
"""


def make_report(logdir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                prefix: str = "ppo_guard") -> tuple[Path, Path, RunLogs]:
    """Write ``<out>`` (HTML, default ``<run_dir>/ppo_guard_report.html``) and the PNG next to it.

    Returns ``(html_path, png_path, run)``.
    """
    run = find_run(logdir, prefix=prefix)
    html_path = Path(out) if out is not None else run.run_dir / "ppo_guard_report.html"
    if html_path.suffix.lower() not in (".html", ".htm"):
        html_path = html_path.with_suffix(".html") if html_path.suffix else html_path / "ppo_guard_report.html"
    png_path = plot_dashboard(run, html_path.with_suffix(".png"))
    html_path.write_text(render_html(run, png_path.read_bytes()))
    return html_path, png_path, run

