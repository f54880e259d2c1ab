"""The token-level zoo (``tests/zoo/lm_rl.py``): each planted fault x loss style x observe call, the codes named and
the step of the first; healthy fits on 3 seeds trained until the reward is reached (the 5-rollout mean score
past 0.5, then 30 rollouts more; at least ``--healthy-iterations``, at most twice that). Prints markdown tables.

    PYTHONPATH=. python benchmarks/lm_zoo.py [--workers 2] [--iterations 30] [--healthy-iterations 150]
"""

from __future__ import annotations

import argparse
import logging
import warnings
from multiprocessing import Pool
from typing import Any

#: (algo, style): GRPO with TRL's per-sequence mean and verl's token mean (manual optimization), PPO with a value
#: head (automatic optimization).
LOSSES = (("grpo", "trl"), ("grpo", "verl"), ("ppo", "trl"))
#: What each fault should be named as: per observe call (None: no call can tell, see the docs).
EXPECT: dict[str, dict[str, str | None]] = {
    "entropy_penalty": {"full": "PPG502", "masked": "PPG502", "minimal": None},
    "loss_negated": {"full": "PPG107", "masked": "PPG107", "minimal": "PPG107"},
    "adv_sign": {"full": "PPG109", "masked": None, "minimal": None},
    "kl_pin": {"full": "PPG304", "masked": None, "minimal": None},
    "old_logp_recomputed": {"full": "PPG108", "masked": "PPG108", "minimal": "PPG108"},
    "lr_tiny": {"full": "PPG204", "masked": "PPG204", "minimal": "PPG204"},
    "sparse_reward": {"full": "PPG407", "masked": "PPG401", "minimal": "PPG401"},
    "sampler_temperature": {"full": "PPG105", "masked": "PPG105", "minimal": "PPG105"},
    # without rollout ids the refreshed rollouts start at ratio 1: batches are then no proof of rollouts
    "stale_sampler": {"full": "PPG105", "masked": "PPG105", "minimal": None},
    "optimizer_over_ref": {"full": "PPG001", "masked": "PPG001", "minimal": "PPG001"},
}
#: Automatic optimization with the minimal call has no rollout id: the rollout-level rules say "cannot tell".
NO_ROLLOUT = {"old_logp_recomputed", "sampler_temperature", "stale_sampler"}


def one(job: tuple[str, str, str, str | None, int, int, str]) -> dict[str, Any]:
    algo, style, observe, fault, seed, iterations, reward = job
    import torch

    from lightning_ppo_guard import PPOGuard, PPOGuardWarning
    from tests.zoo.lm_rl import LMArgs, fit

    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    guard = PPOGuard(verbose=False)
    until: dict[str, Any] = {} if fault is not None else {
        "until_reward": 0.5, "min_iterations": iterations, "iterations": 2 * iterations}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PPOGuardWarning)
        module = fit(LMArgs(**{"algo": algo, "style": style, "observe": observe, "fault": fault, "seed": seed,
                               "iterations": iterations, "reward": reward, **until}), [guard])
    per = module.args.epochs * module.args.minibatches
    first = {}
    for f in guard.findings:
        first.setdefault(f.code, f.step)
    return {"job": job, "first": first, "per": per, "score": sum(module.scores[-5:]) / 5,
            "notices": sorted({n["rule"] for n in guard.notices}), "rollouts": len(module.scores),
            "reached": module.reached}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--healthy-iterations", type=int, default=150)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", choices=("faults", "healthy", "both"), default="both")
    args = parser.parse_args()
    faults = [(a, s, o, f, 0, args.iterations, "binary") for f in EXPECT for a, s in LOSSES
              for o in ("full", "masked", "minimal") if not (a == "ppo" and f == "sparse_reward")]
    healthy = [(a, s, o, None, seed, args.healthy_iterations, reward) for a, s in LOSSES
               for reward in ("binary", "graded") for o in ("full", "masked") for seed in range(args.seeds)]
    faults = faults if args.only != "healthy" else []
    healthy = healthy if args.only != "faults" else []
    with Pool(args.workers) as pool:
        results = pool.map(one, faults + healthy, chunksize=1)
    print("| fault | loss | observe | expected | named (step of the first; steps per rollout) | ok |")
    print("|---|---|---|---|---|---|")
    misses = 0
    for r in results[:len(faults)]:
        algo, style, observe, fault, *_ = r["job"]
        want = None if algo == "ppo" and observe == "minimal" and fault in NO_ROLLOUT else EXPECT[fault][observe]
        named = ", ".join(f"{c} ({s})" for c, s in sorted(r["first"].items(), key=lambda kv: kv[1])) or "-"
        ok = (want in r["first"] and min(r["first"].values()) == r["first"][want]
              and r["first"][want] < 2 * r["per"] + r["per"]) if want else not r["first"]
        misses += not ok
        print(f"| {fault} | {algo}/{style} | {observe} | {want or 'cannot tell'} | {named} (per rollout {r['per']}) "
              f"| {'yes' if ok else 'NO'} |")
    print()
    print("| healthy | reward | observe | seeds | findings | last-5 mean reward | reward 0.5 reached at / rollouts | "
          "notices |")
    print("|---|---|---|---|---|---|---|---|")
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in results[len(faults):]:
        algo, style, observe, _, _, _, reward = r["job"]
        groups.setdefault((f"{algo}/{style}", reward, observe), []).append(r)
    false_alarms = 0
    for (loss, reward, observe), rs in groups.items():
        found = sorted({c for r in rs for c in r["first"]})
        false_alarms += len(found)
        scores = ", ".join(f"{r['score']:.2f}" for r in rs)
        reached = ", ".join(f"{r['reached'] or 'not'} / {r['rollouts']}" for r in rs)
        notices = ", ".join(sorted({n for r in rs for n in r["notices"]})) or "-"
        print(f"| {loss} | {reward} | {observe} | {len(rs)} | {', '.join(found) or '0'} | {scores} | {reached} "
              f"| {notices} |")
    print(f"\nfaults named as expected: {len(faults) - misses}/{len(faults)}; healthy findings: {false_alarms}")


if __name__ == "__main__":
    main()
