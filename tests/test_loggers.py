"""Issue 5: the guard's keys reach real Lightning loggers (read back from their files), and the findings JSON
lands in the first logger's folder. MLflow and W&B run only where those packages are installed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lightning_ppo_guard import PPOGuard
from lightning_ppo_guard.reference import CartPolePPO, PPOConfig

from .conftest import fit, read_csv

KEYS = ("ppo_guard/actor/grad_norm", "ppo_guard/actor/update_ratio", "ppo_guard/actor/approx_kl",
        "ppo_guard/actor/entropy", "ppo_guard/critic/grad_norm")


def _module(fault=None, iterations=2):
    cfg = PPOConfig(seed=0, fault=fault)
    cfg.total_timesteps = iterations * cfg.batch_size
    return CartPolePPO(cfg)


def _findings(log_dir) -> list[str]:
    return [d["code"] for d in json.loads((Path(log_dir) / "ppo_guard_findings.json").read_text())]


def test_tensorboard_and_csv_loggers_get_the_same_guard_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    from lightning_ppo_guard.report import find_run

    tb = TensorBoardLogger(tmp_path, name="tb")
    csv_logger = CSVLogger(tmp_path, name="csv")
    guard = PPOGuard(log_every_n_steps=4, dense_steps=10**6)  # a row every 4 steps: enough rows to compare
    fit(_module("lr_zero"), [guard], logger=[tb, csv_logger])

    events = list(Path(tb.log_dir).glob("events.out.tfevents.*"))
    assert events, list(Path(tb.log_dir).iterdir())
    acc = EventAccumulator(tb.log_dir, size_guidance={SCALARS: 0})
    acc.Reload()
    tags = set(acc.Tags()[SCALARS])
    assert set(KEYS) <= tags, sorted(tags)
    tb_series = {k: [(e.step, e.value) for e in acc.Scalars(k)] for k in KEYS}
    for key, series in tb_series.items():
        assert len(series) >= 15 and all(math.isfinite(v) for _, v in series), key
    assert all(v > 0 for _, v in tb_series["ppo_guard/critic/grad_norm"])
    assert all(v == 0 for _, v in tb_series["ppo_guard/actor/update_ratio"])  # lr 0: the actor never moves

    # the CSV logger got the very same rows (same steps, same float32-rounded values)
    rows = read_csv(csv_logger.log_dir)
    for key in KEYS:
        csv_series = [(int(r["step"]), r[key]) for r in rows if key in r]
        assert [s for s, _ in csv_series] == [s for s, _ in tb_series[key]], key
        assert all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
                   for (_, a), (_, b) in zip(csv_series, tb_series[key], strict=True)), key

    # the findings JSON goes to the first logger's folder (Trainer.log_dir), and only there
    assert _findings(tb.log_dir) == ["PPG003"]
    assert not (Path(csv_logger.log_dir) / "ppo_guard_findings.json").exists()

    # the report reads TensorBoard event files alone
    run = find_run(tb.log_dir)
    assert run.sources == events and [f["code"] for f in run.findings] == ["PPG003"]
    assert run.series("actor", "grad_norm") == tb_series["ppo_guard/actor/grad_norm"]


def test_mlflow_logger_gets_the_guard_metrics(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow >= 3.x refuses file stores without it
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    uri = f"file:{tmp_path / 'mlruns'}"
    logger = MLFlowLogger(experiment_name="ppo_guard", tracking_uri=uri)
    fit(_module("detached_logits"), [PPOGuard(log_every_n_steps=4)], logger=logger)

    client = MlflowClient(tracking_uri=uri)
    for key in KEYS:
        history = client.get_metric_history(logger.run_id, key)
        assert len(history) >= 15 and all(math.isfinite(m.value) for m in history), key
    assert {m.value for m in client.get_metric_history(logger.run_id, "ppo_guard/actor/grad_norm")} == {0.0}
    assert _findings(logger.save_dir) == ["PPG101"]  # Trainer.log_dir of a non-file logger is its save_dir


def test_wandb_offline_logger_gets_the_guard_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(project="ppo_guard", save_dir=str(tmp_path), offline=True)
    try:
        fit(_module("detached_logits"), [PPOGuard(log_every_n_steps=4)], logger=logger)
        summary = dict(logger.experiment.summary)
        for key in KEYS:
            assert key in summary and math.isfinite(float(summary[key])), key
        assert float(summary["ppo_guard/actor/grad_norm"]) == 0.0
        assert _findings(logger.save_dir) == ["PPG101"]
    finally:
        wandb.finish()
