"""``ppo-guard``: the demo, the diagnosis catalog, and the explanation of one code.

    ppo-guard demo [--fault NAME] [--seed N] [--iterations N] [--auto] [--logdir DIR]
    ppo-guard rules
    ppo-guard explain PPG001
    ppo-guard report LOGDIR [--out PATH]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import textwrap
import warnings
from collections.abc import Sequence

from lightning_ppo_guard.diagnoses import CATALOG, get

__all__ = ["main"]

_SHOWN = ("grad_norm", "update_ratio", "approx_kl", "clip_fraction", "entropy")


def catalog_markdown() -> str:
    """The catalog as one Markdown table (``ppo-guard rules --markdown``): README's and the docs' diagnoses table."""
    lines = ["| code | symbol | severity | checklist step | what it means | fix |", "|---|---|---|---|---|---|"]
    for d in CATALOG.values():
        cells = (f"`{d.code}`", f"`{d.symbol}`", d.severity, d.checklist or "-", d.explanation, d.fix)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _cmd_rules(args: argparse.Namespace) -> int:
    if args.markdown:
        print(catalog_markdown())
        return 0
    print(f"{'code':<7} {'severity':<8} symbol")
    for d in CATALOG.values():
        print(f"{d.code:<7} {d.severity:<8} {d.symbol}{'  (retired)' if d.retired else ''}")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    try:
        d = get(args.code)
    except KeyError as exc:
        print(f"ppo-guard explain: {exc.args[0]}", file=sys.stderr)
        return 2
    wrap = textwrap.TextWrapper(width=100, initial_indent="  ", subsequent_indent="  ")
    print(f"{d.code} {d.symbol} ({d.severity})\n")
    print("Message:\n" + wrap.fill(d.message) + "\n")
    print("Why:\n" + wrap.fill(d.explanation) + "\n")
    print("Fix:\n" + wrap.fill(d.fix))
    if d.checklist:
        print("\nChecklist:\n" + wrap.fill(d.checklist))
    print(f"\nDocs:\n  {d.url}")
    return 0


def _fault_names() -> list[str]:
    try:
        from lightning_ppo_guard.reference.faults import FAULTS, MANUAL_FAULTS
    except ImportError:  # pragma: no cover - the demo extra is missing
        return []
    return [name for name in FAULTS if name in MANUAL_FAULTS]


def _metrics_table(path: str, role: str, rows_shown: int = 12) -> str:
    with open(path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get(f"ppo_guard/{role}/grad_norm")]
    if not rows:
        return "(no rows)"
    picks = sorted({round(i * (len(rows) - 1) / max(rows_shown - 1, 1)) for i in range(rows_shown)})
    header = f"{'step':>6} " + " ".join(f"{m:>14}" for m in _SHOWN)
    lines = [header]
    for i in picks:
        r = rows[i]
        cells = []
        for m in _SHOWN:
            v = r.get(f"ppo_guard/{role}/{m}", "")
            cells.append(f"{float(v):>14.4g}" if v not in ("", None) else f"{'-':>14}")
        lines.append(f"{int(float(r['step'])):>6} " + " ".join(cells))
    return "\n".join(lines)


def _cmd_demo(args: argparse.Namespace) -> int:
    try:
        import lightning as L
        from lightning.pytorch.loggers import CSVLogger

        from lightning_ppo_guard import PPOGuard, PPOGuardWarning
        from lightning_ppo_guard.reference import FAULTS, CartPolePPO, CartPolePPOAuto, PPOConfig, trainer_kwargs
    except ImportError as exc:  # pragma: no cover - depends on the environment
        print(f"ppo-guard demo needs the demo extra (pip install 'lightning_ppo_guard[demo]'): {exc}",
              file=sys.stderr)
        return 2
    cls = CartPolePPOAuto if args.auto else CartPolePPO
    if args.fault is not None and args.fault not in cls.supported_faults:
        print(f"ppo-guard demo: unknown fault {args.fault!r}{' with --auto' if args.auto else ''}; choose from: "
              f"{', '.join(f for f in FAULTS if f in cls.supported_faults)}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)  # small MLPs: more threads only contend (7 min against 37 s on 2 busy cores)
    cfg = PPOConfig(seed=args.seed, fault=args.fault)
    if args.iterations is not None:
        cfg.total_timesteps = args.iterations * cfg.batch_size
    elif args.fault is not None:
        cfg.total_timesteps = 8 * cfg.batch_size  # a fault shows within the first rollouts
    L.seed_everything(args.seed, verbose=False)
    module = cls(cfg)
    name = f"{'auto' if args.auto else 'manual'}_{args.fault or 'healthy'}"
    logger = CSVLogger(args.logdir, name=name)
    guard = PPOGuard(log_every_n_steps=args.log_every, verbose=False)
    kwargs = {**trainer_kwargs(module), "enable_progress_bar": True}
    trainer = L.Trainer(**kwargs, logger=logger, callbacks=[guard], enable_checkpointing=False)
    print(f"Training the reference PPO on CartPole-v1 ({'automatic' if args.auto else 'manual'} optimization, "
          f"fault={args.fault}, {cfg.num_iterations} iterations x {cfg.batch_size} env steps) with PPOGuard")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PPOGuardWarning)  # the summary below lists every finding
        trainer.fit(module)
    returns = list(getattr(module, "recent_returns", []))[-20:]
    print()
    if returns:
        print(f"Mean return of the last {len(returns)} episodes: {sum(returns) / len(returns):.1f}")
    metrics_csv = os.path.join(logger.log_dir, "metrics.csv")
    print(f"\nWhat the guard logged for the actor (ppo_guard/actor/*, {metrics_csv}):")
    print(_metrics_table(metrics_csv, "actor"))
    print()
    print(guard.summary())
    print(f"\nFindings as JSON: {os.path.join(logger.log_dir, 'ppo_guard_findings.json')}")
    print(f"Dashboard and findings page: {_own_command()} report {logger.log_dir}")
    return 0


def _own_command() -> str:
    """How to call ``ppo-guard`` from here: the script next to this Python (a venv's bin/), else by name."""
    script = os.path.join(os.path.dirname(sys.executable), "ppo-guard")
    if not os.path.exists(script):
        return "ppo-guard"
    rel = os.path.relpath(script)
    return rel if not rel.startswith("..") else script


def _cmd_report(args: argparse.Namespace) -> int:
    from lightning_ppo_guard.report import ReportError, make_report

    try:
        html_path, png_path, run = make_report(args.logdir, args.out, prefix=args.prefix)
    except ReportError as exc:
        print(f"ppo-guard report: {exc}", file=sys.stderr)
        return 2
    found = ", ".join(f"{f.get('code')}[{f.get('role')}]" for f in run.findings) or "no finding"
    print(f"Run: {run.run_dir} ({', '.join(p.name for p in run.sources)}); findings: {found}")
    if run.other_runs:
        print(f"(newest of {len(run.other_runs) + 1} runs under {args.logdir}; give a version folder to pick "
              "another)")
    print(f"Dashboard: {png_path}")
    print(f"Report:    {html_path}")
    print(f"Open it:   python -m webbrowser {html_path.resolve().as_uri()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ppo-guard", description="Catch a PPO actor that is not learning.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train the reference CartPole PPO with the guard and show its findings")
    demo.add_argument("--fault", default=None, help="plant a fault: " + ", ".join(_fault_names()))
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--iterations", type=int, default=None, help="PPO iterations (default: full healthy run, "
                      "8 with a fault)")
    demo.add_argument("--auto", action="store_true", help="use the automatic-optimization reference")
    demo.add_argument("--logdir", default="ppo_guard_logs")
    demo.add_argument("--log-every", type=int, default=4, help="optimizer steps per logged row")
    demo.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these small MLPs)")
    demo.set_defaults(func=_cmd_demo)
    rules = sub.add_parser("rules", help="list the diagnosis catalog")
    rules.add_argument("--markdown", action="store_true", help="as README's table (code, symbol, severity, ...)")
    rules.set_defaults(func=_cmd_rules)
    explain = sub.add_parser("explain", help="explain one diagnosis code or symbol, with its fix")
    explain.add_argument("code")
    explain.set_defaults(func=_cmd_explain)
    report = sub.add_parser("report", help="draw a PNG dashboard and an HTML page of a run's guard metrics "
                            "and findings (needs matplotlib)")
    report.add_argument("logdir", help="the logger's folder (CSVLogger or TensorBoardLogger version_N), or one above")
    report.add_argument("--out", default=None, help="HTML file to write (default <run>/ppo_guard_report.html); "
                        "the PNG goes next to it")
    report.add_argument("--prefix", default="ppo_guard", help="the guard's metric prefix")
    report.set_defaults(func=_cmd_report)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
