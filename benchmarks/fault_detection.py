"""Which code the guard names for each planted fault, and at which optimizer step / rollout.

    python benchmarks/fault_detection.py [--iterations 8] [--seed 0] [--faults a,b]

Trains the reference PPO (manual optimization; MAPPO for ``agent_unbound``) with each planted fault for a
few iterations under ``PPOGuard`` and prints one row per fault: the expected code, the codes found, the
optimizer step and rollout at which the expected code was first named, and the wall time.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch

from lightning_ppo_guard import PPOGuard, PPOGuardWarning
from lightning_ppo_guard.reference import (
    FAULTS,
    CartPolePPO,
    MAPPOConfig,
    MultiCartPoleMAPPO,
    PPOConfig,
    trainer_kwargs,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test zoo: tests/zoo (not installed)
from tests.zoo.expected import EXPECTED


def run_fault(fault: str | None, iterations: int, seed: int = 0, observe: str = "full",
              **guard_kwargs: object) -> tuple[PPOGuard, object]:
    """Train the reference module with ``fault`` for ``iterations`` PPO iterations under a PPOGuard."""
    L.seed_everything(seed, verbose=False)
    if fault == "agent_unbound":
        mcfg = MAPPOConfig(seed=seed, fault=fault, observe=observe)
        mcfg.total_timesteps = iterations * mcfg.num_envs * mcfg.num_steps
        module: L.LightningModule = MultiCartPoleMAPPO(mcfg)
    else:
        cfg = PPOConfig(seed=seed, fault=fault, observe=observe)
        cfg.total_timesteps = iterations * cfg.batch_size
        module = CartPolePPO(cfg)
    guard = PPOGuard(verbose=False, **guard_kwargs)  # type: ignore[arg-type]
    trainer = L.Trainer(**trainer_kwargs(module), logger=False, callbacks=[guard], enable_checkpointing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PPOGuardWarning)
        trainer.fit(module)
    return guard, module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faults", default=",".join(EXPECTED))
    parser.add_argument("--observe", default="full", choices=("full", "minimal"),
                        help="the module's observe call: the README's full one, or (new_logp, old_logp, advantages)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'fault':<24} {'expected':<8} {'named at step':>13} {'rollout':>7} {'ok':>3}  {'all codes':<28} {'s':>5}")
    print(f"{'':<24} {'':<8} {'(optimizer)':>13} {'(1st=1)':>7}")
    missed = 0
    for fault in args.faults.split(","):
        role, code, deadline = EXPECTED[fault]
        t0 = time.perf_counter()
        guard, _ = run_fault(fault, args.iterations, args.seed, args.observe)
        dt = time.perf_counter() - t0
        first = next((f for f in guard.findings if f.code == code and f.role == role), None)
        step = "-" if first is None else str(first.step)
        rollout = "-" if first is None or first.rollout is None else str(first.rollout + 1)
        ok = first is not None and first.rollout is not None and first.rollout <= deadline
        missed += not ok
        codes = ",".join(sorted({f"{f.code}[{f.role}]" for f in guard.findings}))
        print(f"{fault:<24} {code:<8} {step:>13} {rollout:>7} {'yes' if ok else 'NO':>3}  {codes:<28} {dt:>5.1f}")
    print(f"\n{len(args.faults.split(',')) - missed}/{len(args.faults.split(','))} faults named with the expected code "
          f"within {args.iterations} rollouts (unknown faults: {sorted(set(args.faults.split(',')) - set(FAULTS))})")


if __name__ == "__main__":
    main()
