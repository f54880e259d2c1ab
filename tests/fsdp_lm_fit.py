"""GRPO on the tiny GPT-2 of ``tests/zoo/lm_rl.py`` with the guard, in one process or sharded with FSDP2 over 2 CPU
processes: run by ``tests/test_lm_rl.py``.

    python tests/fsdp_lm_fit.py OUT_DIR DEVICES FAULT

``DEVICES=2`` wraps every GPT-2 block and the whole policy with ``fully_shard`` in ``configure_model`` under
Lightning's ``ModelParallelStrategy`` (a 2-rank ``gloo`` mesh); the frozen reference stays whole on each rank. Both
ranks sample the same rollouts and train on the same minibatches, so FSDP's mean of their gradients is the
one-process gradient and every logged number must be the one-process number. ``FAULT`` is ``none`` or a fault of
the zoo. Each rank writes ``OUT_DIR/rank<r>.json``; rank zero's CSVLogger ``OUT_DIR/run/version_0/metrics.csv``.
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
from tests.ddp_fit import fit_and_write
from tests.zoo.lm_rl import LMRL, LMArgs

ITERATIONS = 4


class ShardedGRPO(LMRL):
    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.policy.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(self.policy, mesh=mesh)


def run(out_dir: str | Path, devices: int, fault: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    module = ShardedGRPO(LMArgs(iterations=ITERATIONS, observe="full", fault=None if fault == "none" else fault))
    guard = PPOGuard(log_every_n_steps=1, dense_steps=0, measure_every_n_steps=1, verbose=False)
    kwargs: dict[str, Any] = {"max_epochs": 1, "accelerator": "cpu", "devices": devices, "log_every_n_steps": 1,
                              "use_distributed_sampler": False, "enable_progress_bar": False,
                              "enable_model_summary": False, "enable_checkpointing": False}
    if devices > 1:
        kwargs["strategy"] = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1,
                                                   process_group_backend="gloo")
    trainer = L.Trainer(**kwargs, logger=CSVLogger(out_dir, name="run", version=0), callbacks=[guard])
    return fit_and_write(out_dir, trainer, module, guard)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("devices", type=int)
    parser.add_argument("fault")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run(args.out_dir, args.devices, args.fault)
    sys.exit(0)
