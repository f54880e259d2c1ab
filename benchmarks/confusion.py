"""Confusion matrices: each planted fault of both zoos x the codes the guard named, with the first step.

    python benchmarks/confusion.py [--seed 0] [--zoo reference,second]

Every fault is fitted twice: with the README's full ``observe`` call and with a minimal one
(``observe(new_logp, old_logp, advantages)``, what a loss has). A cell reads ``full / minimal``: the optimizer step
at which the guard first named that code for the fault's role (``.`` = not named); the expected cell is in bold.
``(cannot tell)`` marks a fault whose evidence the minimal call does not carry (README: which rules need which
arguments). Zoo 1 is the reference PPO the guard was first tuned on (40 steps per rollout, manual optimization);
zoo 2 is code in other styles: CleanRL's ``ppo.py`` / ``ppo_continuous_action.py`` / ``ppo_atari.py`` layouts and an
SB3-like ``ActorCriticPolicy`` module (:mod:`tests.zoo`).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test zoo: tests/zoo (not installed)
from fault_detection import run_fault

from tests.zoo import all_variants, run_variant
from tests.zoo.expected import EXPECTED, EXPECTED_MINIMAL

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

#: The second zoo: every variant here takes ``observe="minimal"``.
SECOND_ZOO = ("cleanrl-4x4", "cleanrl-continuous", "cleanrl-trunk", "cleanrl-4x4-detached",
              "cleanrl-4x4-old-logp-not-detached", "cleanrl-4x4-target-kl-tiny", "cleanrl-4x4-entropy-sign",
              "cleanrl-4x4-dropout", "cleanrl-4x4-ratio-inverted", "cleanrl-4x4-value-clip-unscaled",
              "cleanrl-4x4-adv-scale-1e-6", "cleanrl-4x4-late-lr-zero", "cleanrl-4x4-late-lr-tiny",
              "cleanrl-continuous-detached-mean", "cleanrl-continuous-logstd-unbound", "cleanrl-trunk-unbound",
              "cleanrl-trunk-unscaled-rewards", "styles-sb3-lr-huge")


@dataclass
class Row:
    fault: str
    expect: dict[str, tuple[tuple[str, str], ...] | None]  # mode -> expected (code, role)s; None: cannot tell
    named: dict[str, dict[str, int]]  # mode -> code[role] -> first step
    ok: dict[str, bool]


def _first(findings: list) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in findings:
        out.setdefault(f"{f.code}[{f.role}]", f.step)
    return out


def reference_rows(seed: int, iterations: int = 8) -> list[Row]:
    rows = []
    for fault in [None, *EXPECTED]:
        row = Row(fault or "healthy", {}, {}, {})
        for mode in ("full", "minimal"):
            exp = (EXPECTED if mode == "full" else EXPECTED_MINIMAL).get(fault or "")
            guard, _ = run_fault(fault, iterations, seed, mode)
            named = row.named[mode] = _first(guard.findings)
            if fault is None:
                row.expect[mode], row.ok[mode] = (), not named
            elif exp is None:
                row.expect[mode], row.ok[mode] = None, True
            else:
                role, code, last_rollout = exp
                row.expect[mode] = ((code, role),)
                hit = [f for f in guard.findings if (f.code, f.role) == (code, role)]
                row.ok[mode] = bool(hit) and hit[0].rollout is not None and hit[0].rollout <= last_rollout
        rows.append(row)
    return rows


def second_rows(seed: int) -> list[Row]:
    rows = []
    variants = {v.name: v for v in all_variants()}
    for name in SECOND_ZOO:
        v = variants[name]
        row = Row(name, {}, {}, {})
        for mode in ("full", "minimal"):
            expect = v.expect if mode == "full" or v.minimal is None else v.minimal
            guard, trainer, _ = run_variant(_Observe(v, mode), seed)
            findings = guard.findings
            row.named[mode] = _first(findings)
            if v.expect and not expect:
                row.expect[mode], row.ok[mode] = None, True
                continue
            row.expect[mode] = tuple(sorted(expect))
            allowed = {c for c, _ in expect} | set(v.allowed)
            ok = all(f.code in allowed for f in findings)
            deadline = v.deadline if v.deadline is not None else trainer.global_step
            for code, role in expect:
                steps = [f.step for f in findings if (f.code, f.role) == (code, role)]
                ok &= bool(steps) and min(steps) <= deadline
            row.ok[mode] = ok
        rows.append(row)
    return rows


class _Observe:
    """A variant whose ``make`` is called with the given observe style."""

    def __init__(self, variant: object, mode: str) -> None:
        self._v, self._mode = variant, mode

    def __getattr__(self, name: str) -> object:
        return getattr(self._v, name)

    def make(self, seed: int) -> object:
        return self._v.make(seed, observe=self._mode)


def table(title: str, rows: list[Row]) -> str:
    codes = sorted({c for r in rows for m in r.named.values() for c in m}
                   | {f"{c}[{role}]" for r in rows for e in r.expect.values() if e for c, role in e})
    lines = [f"**{title}** (cell: first step named, full / minimal observe; `.` not named; expected in bold)", "",
             "| planted fault | " + " | ".join(codes) + " | right (full / minimal) |",
             "|---|" + "---|" * (len(codes) + 1)]
    for r in rows:
        cells = []
        for c in codes:
            full, mini = (r.named[m].get(c) for m in ("full", "minimal"))
            text = f"{'.' if full is None else full} / {'.' if mini is None else mini}"
            expected = any(e and c in {f'{k}[{role}]' for k, role in e} for e in r.expect.values())
            cells.append(f"**{text}**" if expected else ("" if full is None and mini is None else text))
        verdict = " / ".join("(cannot tell)" if r.expect[m] is None else ("yes" if r.ok[m] else "**NO**")
                             for m in ("full", "minimal"))
        lines.append(f"| {r.fault} | " + " | ".join(cells) + f" | {verdict} |")
    right = sum(r.ok[m] for r in rows for m in r.ok if r.expect[m] is not None)
    total = sum(1 for r in rows for m in r.ok if r.expect[m] is not None)
    blind = sum(1 for r in rows for m in r.ok if r.expect[m] is None)
    lines.append(f"\n{right}/{total} fits right; {blind} marked cannot tell (minimal observe)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zoo", default="reference,second")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if "reference" in args.zoo:
        print(table("Zoo 1: reference PPO (manual optimization, 40 steps per rollout, 8 rollouts)",
                    reference_rows(args.seed)), flush=True)
        print()
    if "second" in args.zoo:
        print(table("Zoo 2: CleanRL-style and SB3-like PPO", second_rows(args.seed)), flush=True)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
