"""A MAPPO fit with the guard, in one process or under CPU DDP (gloo): run by ``tests/test_ddp.py``.

Run as a script (Lightning's ``"ddp"`` launcher starts rank 1 by running this same command again)::

    python tests/ddp_fit.py OUT_DIR DEVICES [--ignore-on-rank R]

Each rank writes ``OUT_DIR/rank<r>.json`` (global step, stop flag, findings, the guard warnings it emitted);
rank zero's CSVLogger writes ``OUT_DIR/run/version_0/metrics.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy

from lightning_ppo_guard import PPOGuard, PPOGuardWarning
from lightning_ppo_guard.reference import MAPPOConfig, MultiCartPoleMAPPO, trainer_kwargs

#: PPO iterations the fit would run without the stop (the guard stops it after the first).
ITERATIONS = 3


def run(out_dir: str | Path, devices: int, ignore_on_rank: int | None = None) -> dict[str, Any]:
    """Fit MAPPO with agent 2 left out of the optimizer, ``PPOGuard(on_stall="stop")`` measuring every step."""
    torch.set_num_threads(1)
    rank = int(os.environ.get("LOCAL_RANK", 0))  # set by the launcher for rank >= 1 before this line runs
    L.seed_everything(0, verbose=False)
    # minibatches trimmed to an even size: under 2 ranks both halves are equal, so DDP's mean of the two
    # per-rank gradients is the one-process gradient of the whole minibatch
    cfg = MAPPOConfig(seed=0, fault="agent_unbound", minibatch_multiple=2)
    cfg.total_timesteps = ITERATIONS * cfg.num_envs * cfg.num_steps
    module = MultiCartPoleMAPPO(cfg)
    guard = PPOGuard(on_stall="stop", log_every_n_steps=1, dense_steps=0, measure_every_n_steps=1,
                     ignore=["PPG001"] if rank == ignore_on_rank else ())
    kwargs = {**trainer_kwargs(module), "devices": devices}
    if devices > 1:
        kwargs["strategy"] = DDPStrategy(process_group_backend="gloo")
    trainer = L.Trainer(**kwargs, logger=CSVLogger(out_dir, name="run", version=0), callbacks=[guard],
                        enable_checkpointing=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PPOGuardWarning)
        trainer.fit(module)
    return write_result(out_dir, trainer, guard, caught)


def write_result(out_dir: str | Path, trainer: L.Trainer, guard: PPOGuard, caught: list[Any],
                 **extra: Any) -> dict[str, Any]:
    """Write this rank's ``OUT_DIR/rank<r>.json``: steps, stop flag, findings and the guard warnings it emitted."""
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "should_stop": bool(trainer.should_stop),
        "optimizer_steps": guard.optimizer_steps,
        "findings": [[f.code, f.role] for f in guard.findings],
        "warnings": [str(w.message) for w in caught if issubclass(w.category, PPOGuardWarning)],
        **extra,
    }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    return result


def fit_and_write(out_dir: str | Path, trainer: L.Trainer, module: L.LightningModule,
                  guard: PPOGuard) -> dict[str, Any]:
    """Fit, recording the guard's warnings, and write this rank's result with whether the parameters are FSDP2
    shards (``DTensor``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PPOGuardWarning)
        trainer.fit(module)
    sharded = any(type(p).__name__ == "DTensor" for p in module.parameters())
    return write_result(out_dir, trainer, guard, caught, sharded=sharded)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("devices", type=int)
    parser.add_argument("--ignore-on-rank", type=int, default=None)
    args = parser.parse_args()
    run(args.out_dir, args.devices, args.ignore_on_rank)
    sys.exit(0)
