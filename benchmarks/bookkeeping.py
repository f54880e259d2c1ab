"""What an unmeasured optimizer step costs with the guard: its per-step bookkeeping, net of a no-op callback.

    python benchmarks/bookkeeping.py [--steps 3000] [--repeats 5] [--modes manual,automatic]

After its dense start the default ``PPOGuard()`` measures one step in 64 (and each rollout's predicted last
step); every other step still runs its hooks and ``observe``: counting the step and the rollout's minibatches,
the cadence's decision, the logging interval. This is that cost, on a tiny PPO update (a 10k-parameter
actor-critic on fixed data, one ``observe`` per step, 16 steps per rollout id, CSV-free) so that nothing else
hides it. Arms, alternated within each repeat:

    none      no callback
    noop      a callback with the guard's per-step hooks (the 4 Lightning hooks it uses and an optimizer step
              pre/post hook pair), each doing nothing; ``observe`` with no engine attached
    guard     ``PPOGuard(dense_steps=0)`` (the default cadence, past its dense start)

Printed per mode (``manual``: the LightningModule steps the optimizer itself, as most PPO in Lightning does;
``automatic``: Lightning's loop does), medians over steps, then over repeats:

- *in hooks*: the time spent inside the arm's per-step callables (the 4 hooks, the optimizer pair, ``observe``),
  timed where they are called, over a whole step. ``guard - noop`` is the guard's bookkeeping net of the same
  calls doing nothing (the timing wrappers' own cost cancels); the target is <= 10 us.
- *whole step*: batch start to batch end; ``noop - none`` is Lightning's dispatch of one no-op callback,
  ``guard - noop`` the same bookkeeping seen end to end (noisier: it includes the machine's jitter).
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

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # the synthetic PPO update of benchmarks/overhead.py

from lightning_ppo_guard import PPOGuard, PPOGuardWarning

warnings.filterwarnings("ignore", category=PPOGuardWarning)
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


class AutomaticPPO(overhead.SyntheticPPO):
    """The same update with Lightning's automatic optimization (its loop calls backward and step)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.automatic_optimization = True

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return self.ppo_loss(batch_idx)


class StepClock(Callback):
    """First callback: marks each batch start (wall time and the hooks' clock). ``StepEnd`` is the last one."""

    def __init__(self, clock: overhead.HookClock) -> None:
        self.clock, self.t0, self.whole, self.hooks, self.mark = clock, 0.0, [], [], 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self.mark, self.t0 = self.clock.total, time.perf_counter()


class StepEnd(Callback):
    def __init__(self, start: StepClock) -> None:
        self.start = start

    def on_train_batch_end(self, *args: Any) -> None:
        s = self.start
        s.whole.append(time.perf_counter() - s.t0)
        s.hooks.append(s.clock.total - s.mark)  # batch end: the last hook of the step has run


def run(mode: str, arm: str, steps: int) -> tuple[float, float]:
    """One fit; median whole-step time and median time inside the arm's per-step callables (seconds)."""
    torch.manual_seed(0)
    obs, hidden, layers, batch = overhead.SIZES["10k"]
    module = (AutomaticPPO if mode == "automatic" else overhead.SyntheticPPO)(obs, hidden, layers, batch, steps)
    clock = overhead.HookClock()
    callbacks: list[Callback] = []
    if arm == "noop":
        callbacks.append(overhead.NoopHooks())  # the same hooks as the guard, doing nothing
    elif arm == "guard":
        callbacks.append(PPOGuard(dense_steps=0, verbose=False))
    for cb in callbacks:  # its Lightning hooks, and its optimizer step pair (the guard's: on its engine)
        overhead.wrap_arm(clock, cb, "default")
    restore = clock.wrap_function(overhead, "observe") if arm != "none" else lambda: None
    start = StepClock(clock)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=50,
                        callbacks=[start, *callbacks, StepEnd(start)])
    try:
        trainer.fit(module)
    finally:
        restore()
    warm = steps // 10
    return statistics.median(start.whole[warm:]), statistics.median(start.hooks[warm:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", default="manual,automatic")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, lightning {L.__version__}, 1 thread, CPU; {args.steps} steps per fit, "
          f"median of {args.repeats} alternated repeats (us per optimizer step)")
    arms = ("none", "noop", "guard")
    for mode in (m for m in args.modes.split(",") if m):
        whole: dict[str, list[float]] = {a: [] for a in arms}
        hooks: dict[str, list[float]] = {a: [] for a in arms}
        for _ in range(args.repeats):
            for arm in arms:
                w, h = run(mode, arm, args.steps)
                whole[arm].append(w)
                hooks[arm].append(h)
        med = {a: (statistics.median(whole[a]) * 1e6, statistics.median(hooks[a]) * 1e6) for a in arms}
        print(f"{mode:>9}: whole step none {med['none'][0]:7.1f}  noop {med['noop'][0]:7.1f}  guard "
              f"{med['guard'][0]:7.1f}   |  in hooks noop {med['noop'][1]:5.1f}  guard {med['guard'][1]:5.1f}")
        print(f"{'':>9}  Lightning's dispatch of a no-op callback (noop - none, whole step): "
              f"{med['noop'][0] - med['none'][0]:+6.1f} us")
        print(f"{'':>9}  guard bookkeeping net of the no-op callback: in hooks {med['guard'][1] - med['noop'][1]:+6.1f}"
              f" us (target <= 10), whole step {med['guard'][0] - med['noop'][0]:+6.1f} us")


if __name__ == "__main__":
    main()
