"""Whole-fit cost of the default ``PPOGuard()`` on the token-level fits of ``tests/zoo/lm_rl.py`` (tiny GPT-2, CPU).

    PYTHONPATH=. python benchmarks/lm_overhead.py [--repeats 7] [--iterations 40]

Each repeat fits the same module (same seed) without a callback and with ``PPOGuard()``, alternated, with the full
``observe`` call in both (a no-op without the guard). Printed: median whole-fit seconds of each arm and the
overhead ``(guard - none) / none``, per loss (GRPO in manual optimization, PPO with a value head in automatic).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import torch

from lightning_ppo_guard import PPOGuard
from tests.zoo.lm_rl import LMArgs, fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, 1 thread, CPU; {args.iterations} rollouts per fit, median of {args.repeats}")
    for name, kw in (("grpo (manual)", dict(algo="grpo")), ("ppo + value head (automatic)", dict(algo="ppo"))):
        times: dict[str, list[float]] = {"none": [], "guard": []}
        for _ in range(args.repeats):
            for arm in times:
                callbacks = [PPOGuard(verbose=False)] if arm == "guard" else []
                t0 = time.perf_counter()
                fit(LMArgs(iterations=args.iterations, observe="full", **kw), callbacks)
                times[arm].append(time.perf_counter() - t0)
        none, guard = statistics.median(times["none"]), statistics.median(times["guard"])
        print(f"{name:>30}: none {none:6.2f} s  guard {guard:6.2f} s  overhead {100 * (guard - none) / none:+5.2f}%")


if __name__ == "__main__":
    main()
