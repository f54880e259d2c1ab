"""Whole-fit cost of the default ``PPOGuard()`` on the token-level fits of ``tests/zoo/lm_rl.py`` (tiny GPT-2, CPU).

    PYTHONPATH=. python benchmarks/lm_overhead.py [--repeats 7] [--iterations 150]

150 rollouts by default: the length of the zoo's healthy fits (``benchmarks/lm_zoo.py``: trained until the reward is
reached, at least 150 rollouts), the fits issue 22's overhead target is about. ``--iterations 40`` times a 2-second
fit that never reaches the reward, where the always-measured start (8 steps, then 5 rollouts) weighs most.

Each repeat fits the same module (same seed) without a callback and with ``PPOGuard()``, alternated, with the full
``observe`` call in both (a no-op without the guard). Printed per loss (GRPO in manual optimization, PPO with a
value head in automatic): the median whole-fit seconds of each arm and their difference (as noisy as the machine:
single fits of 2 s vary by 10-20% here), and the time spent inside the guard's hooks and ``observe`` (timed where
they are called, in fits of their own, as ``benchmarks/overhead.py`` does) as a share of the median fit without
it: the guard's cost, with far less noise. Tensor hooks run inside backward are not in it (a few small ops).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # the hook clock of benchmarks/overhead.py

import tests.zoo.lm_rl as zoo
from lightning_ppo_guard import PPOGuard
from tests.zoo.lm_rl import LMArgs, fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--budget", default="default",
                        help="PPOGuard(overhead_budget=...): 'default' (the guard's), 'none', or a share such as 0.01")
    args = parser.parse_args()
    guard_kwargs: dict[str, Any] = {} if args.budget == "default" else {
        "overhead_budget": None if args.budget == "none" else float(args.budget)}
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, 1 thread, CPU; {args.iterations} rollouts per fit, median of {args.repeats}; "
          f"PPOGuard({', '.join(f'{k}={v}' for k, v in guard_kwargs.items())})")
    for name, kw in (("grpo (manual)", dict(algo="grpo")), ("ppo + value head (automatic)", dict(algo="ppo"))):
        times: dict[str, list[float]] = {"none": [], "guard": [], "hooks": []}
        thin: list[str] = []
        for _ in range(args.repeats):
            for arm in ("none", "guard", "hooks"):
                callbacks = [PPOGuard(verbose=False, **guard_kwargs)] if arm != "none" else []
                clock = overhead.HookClock()
                restore = lambda: None  # noqa: E731
                if arm == "hooks":
                    overhead.wrap_arm(clock, callbacks[0], "default")
                    restore = clock.wrap_function(zoo, "observe")
                t0 = time.perf_counter()
                try:
                    fit(LMArgs(iterations=args.iterations, observe="full", **kw), callbacks)
                finally:
                    restore()
                times[arm].append(clock.total if arm == "hooks" else time.perf_counter() - t0)
                if arm == "guard":
                    k = callbacks[0].thinning
                    thin.append(f"1 rollout in {k[0]} from rollout {k[1]}" if k else "every rollout")
        none, guard, hooks = (statistics.median(times[a]) for a in ("none", "guard", "hooks"))
        print(f"{name:>30}: none {none:6.2f} s  guard {guard:6.2f} s ({100 * (guard - none) / none:+5.2f}%)  "
              f"in the guard's hooks {hooks:5.3f} s = {100 * hooks / none:4.2f}% of the fit; measured: {thin[-1]}")


if __name__ == "__main__":
    main()
