"""Shared helpers: real Trainer fits of the reference PPO with real loggers."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_ppo_guard import PPOGuardWarning
from lightning_ppo_guard.reference import trainer_kwargs


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # small MLPs: one thread is faster, and CI has 2 cores


def fit(module, callbacks, *, logger=False, quiet=True, **overrides):
    """``Trainer.fit`` of a reference module with its own Trainer kwargs plus ``overrides``."""
    L.seed_everything(module.cfg.seed, verbose=False)
    kwargs = {**trainer_kwargs(module), "enable_checkpointing": False, **overrides}
    trainer = L.Trainer(**kwargs, logger=logger, callbacks=callbacks)
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore", PPOGuardWarning)
        trainer.fit(module)
    return trainer


def read_csv(log_dir: str | Path) -> list[dict[str, float]]:
    """The rows of a CSVLogger's metrics.csv, empty cells dropped, numbers as floats."""
    with open(Path(log_dir) / "metrics.csv", newline="") as fh:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]


def guard_rows(rows, role="actor", metric="grad_norm"):
    key = f"ppo_guard/{role}/{metric}"
    return [r for r in rows if key in r]


def pytest_configure(config):
    config.addinivalue_line("markers", "ddp: 2-process CPU DDP (gloo) fits in a subprocess (~20 s)")


def launch_two_ranks(script: Path, out: Path, *args: str, timeout: int = 120) -> list[dict]:
    """Run ``script OUT 2 *args`` (a fit Lightning's launcher starts again for rank 1, so not under pytest);
    return each rank's ``rank<r>.json``. A hang is a test failure, not a stuck suite."""
    env = {**os.environ, "PYTHONPATH": str(script.parent.parent)}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(script), str(out), "2", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
