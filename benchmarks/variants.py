"""What the guard says on PPO code it was not tuned on: every variant of the zoo, one real fit each.

    python benchmarks/variants.py [--slow] [--seeds 0] [--only NAME,...] [--exact]

Prints one markdown row per fit: the variant, its family, what a correct guard must say (nothing, or the code
and role by a deadline), what this guard named (code[role]@step), whether that is right, and the wall time.
``--slow`` adds the full trainings; ``--exact`` runs every fit with ``PPOGuard(dense_steps=0,
measure_every_n_steps=1)`` (every step measured and checked) instead of the default cadence.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test zoo: tests/zoo (not installed)
from tests.zoo import Variant, all_variants, run_variant

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def verdict(variant: Variant, guard: object, steps: int) -> tuple[str, bool]:
    findings = getattr(guard, "findings", [])
    named = ", ".join(f"{f.code}[{f.role}]@{f.step}" for f in findings) or "nothing"
    if variant.healthy:
        return named, not findings
    ok = True
    for code, role in variant.expect:
        at = [f.step for f in findings if (f.code, f.role) == (code, role)]
        ok &= bool(at) and min(at) <= (variant.deadline if variant.deadline is not None else steps)
    allowed = {c for c, _ in variant.expect} | set(variant.allowed)
    ok &= all(f.code in allowed for f in findings)
    return named, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slow", action="store_true", help="include the full trainings")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--only", default="", help="comma-separated variant names")
    parser.add_argument("--exact", action="store_true", help="measure and check every step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    only = {n for n in args.only.split(",") if n}
    overrides = {"dense_steps": 0, "measure_every_n_steps": 1} if args.exact else {}
    print("| variant | family | must say | guard named (code[role]@step) | right | s |")
    print("|---|---|---|---|---|---|")
    right = total = 0
    for variant in all_variants():
        if (variant.slow and not args.slow) or (only and variant.name not in only):
            continue
        for seed in (int(s) for s in args.seeds.split(",")):
            t0 = time.perf_counter()
            guard, trainer, _ = run_variant(variant, seed, **overrides)
            named, ok = verdict(variant, guard, trainer.global_step)
            must = ("nothing" if variant.healthy else ", ".join(f"{c}[{r}]" for c, r in sorted(variant.expect))
                    + (f" by {variant.deadline}" if variant.deadline is not None else ""))
            name = variant.name + (f" (seed {seed})" if args.seeds != "0" else "")
            print(f"| {name} | {variant.family} | {must} | {named} | {'yes' if ok else '**NO**'} | "
                  f"{time.perf_counter() - t0:.1f} |", flush=True)
            right += ok
            total += 1
    print(f"\n{right}/{total} fits right ({'exact tier' if args.exact else 'default cadence'})")


if __name__ == "__main__":
    main()
