"""What the guard costs under FSDP2: the reference MAPPO sharded over 2 CPU processes (gloo), with and without
``PPOGuard()``, arms alternated, medians printed.

    python benchmarks/sharded.py [--repeats 3] [--iterations 10]

Each fit is a child process (Lightning's launcher starts rank 1 by running the same command again); rank zero
times ``Trainer.fit`` itself (process start-up excluded) and the time spent inside the guard's hooks (a run of its
own, so the timing wrappers stay out of the wall-time arms). The sharded path measures local shards and adds one
``all_reduce`` per measurement, so the guard's cost there is its cost in one process plus those collectives.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_after_backward", "on_before_optimizer_step",
         "_optimizer_pre_step", "_optimizer_post_step", "observe")


def child(out: str, arm: str, iterations: int) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_ppo_guard import PPOGuard
    from lightning_ppo_guard.reference import MAPPOConfig, ShardedMAPPO, mappo, trainer_kwargs

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    cfg = MAPPOConfig(seed=0, minibatch_multiple=2)
    cfg.total_timesteps = iterations * cfg.num_envs * cfg.num_steps
    module = ShardedMAPPO(cfg)
    guard = PPOGuard(verbose=False) if arm != "none" else None
    spent = [0.0]
    if arm == "hooks" and guard is not None:
        for name in HOOKS:
            owner = mappo if name == "observe" else guard
            method = getattr(owner, name)

            def timed(*args, _method=method, **kwargs):
                t0 = time.perf_counter()
                try:
                    return _method(*args, **kwargs)
                finally:
                    spent[0] += time.perf_counter() - t0

            setattr(owner, name, timed)
    trainer = L.Trainer(**{**trainer_kwargs(module), "devices": 2, "use_distributed_sampler": False,
                           "strategy": ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                                             process_group_backend="gloo")},
                        logger=False, callbacks=[guard] if guard is not None else [], enable_checkpointing=False)
    t0 = time.perf_counter()
    trainer.fit(module)
    elapsed = time.perf_counter() - t0
    if trainer.global_rank == 0:
        Path(out).write_text(json.dumps({"fit": elapsed, "hooks": spent[0], "steps": trainer.global_step}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--child", nargs=2, metavar=("OUT", "ARM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.iterations)
        return
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("LOCAL_RANK", None)
    results: dict[str, list[dict[str, float]]] = {"none": [], "guard": [], "hooks": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for arm in results:
                out = os.path.join(tmp, f"{arm}{r}.json")
                subprocess.run([sys.executable, __file__, "--iterations", str(args.iterations), "--child", out, arm],
                               env=env, check=True, capture_output=True)
                results[arm].append(json.loads(Path(out).read_text()))
    base = statistics.median(x["fit"] for x in results["none"])
    guarded = statistics.median(x["fit"] for x in results["guard"])
    hooks = statistics.median(x["hooks"] for x in results["hooks"])
    print(f"FSDP2 (ModelParallelStrategy + fully_shard, 2 CPU processes, gloo), reference MAPPO, "
          f"{results['none'][0]['steps']} optimizer steps, PPOGuard(), median of {args.repeats} alternated fits:")
    runs = {arm: [round(x["fit"], 2) for x in results[arm]] for arm in ("none", "guard")}
    print(f"    without guard {base:6.2f} s   with PPOGuard() {guarded:6.2f} s   "
          f"overhead {100 * (guarded / base - 1):+.2f}%   (runs: {runs['none']} vs {runs['guard']})")
    print(f"    time inside the guard's hooks on rank zero: {hooks:.3f} s per fit, "
          f"{100 * hooks / base:.2f}% of the fit")


if __name__ == "__main__":
    main()
