"""A MAPPO fit with the guard, in one process or sharded with FSDP2 over 2 CPU processes: run by
``tests/test_fsdp.py``.

Run as a script (Lightning's launcher starts rank 1 by running this same command again)::

    python tests/fsdp_fit.py OUT_DIR DEVICES FAULT [--stop]

``DEVICES=2`` wraps every actor and the critic with ``fully_shard`` in ``configure_model`` under Lightning's
``ModelParallelStrategy`` (FSDP2 on a 2-rank ``gloo`` mesh: parameters and gradients become ``DTensor`` shards);
``DEVICES=1`` is the same module unsharded. ``FAULT`` is ``none``, ``agent_unbound`` or ``detached_logits``.
Each rank writes ``OUT_DIR/rank<r>.json``; rank zero's CSVLogger writes ``OUT_DIR/run/version_0/metrics.csv``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_ppo_guard import PPOGuard
from lightning_ppo_guard.reference import MAPPOConfig, ShardedMAPPO, trainer_kwargs
from tests.ddp_fit import fit_and_write

ITERATIONS = 3


def run(out_dir: str | Path, devices: int, fault: str, stop: bool = False) -> dict[str, Any]:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    # even minibatches: under 2 ranks both halves are equal, so FSDP's mean of the two per-rank gradients is the
    # one-process gradient of the whole minibatch
    cfg = MAPPOConfig(seed=0, fault=None if fault == "none" else fault, minibatch_multiple=2)
    cfg.total_timesteps = ITERATIONS * cfg.num_envs * cfg.num_steps
    module = ShardedMAPPO(cfg)
    guard = PPOGuard(on_stall="stop" if stop else "warn", log_every_n_steps=1, dense_steps=0,
                     measure_every_n_steps=1)
    # every rank runs every PPO iteration (the iterations are not data to split between ranks)
    kwargs = {**trainer_kwargs(module), "devices": devices, "use_distributed_sampler": False}
    if devices > 1:
        kwargs["strategy"] = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1,
                                                   process_group_backend="gloo")
    trainer = L.Trainer(**kwargs, logger=CSVLogger(out_dir, name="run", version=0), callbacks=[guard],
                        enable_checkpointing=False)
    return fit_and_write(out_dir, trainer, module, guard)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("devices", type=int)
    parser.add_argument("fault")
    parser.add_argument("--stop", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run(args.out_dir, args.devices, args.fault, args.stop)
    sys.exit(0)
