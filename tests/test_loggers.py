"""The guard's keys reach all four kinds of Lightning logger (TensorBoard, CSV, MLflow, W&B), read back from the
files each one writes, and the findings JSON lands in the first logger's folder. MLflow (mlflow-skinny, a local
file store) and W&B (offline mode) are in the ``dev`` extra: these tests import them and never skip."""

from __future__ import annotations

import json
import math
import struct
import time
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


def _same_rows(series: dict[str, list[tuple[int, float]]], csv_log_dir) -> None:
    """Each logger's series holds the very rows the CSV logger next to it got (steps and float32-rounded values)."""
    rows = read_csv(csv_log_dir)
    for key, got in series.items():
        want = [(int(r["step"]), r[key]) for r in rows if key in r]
        assert len(want) >= 15 and [s for s, _ in got] == [s for s, _ in want], key
        assert all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
                   for (_, a), (_, b) in zip(got, want, strict=True)), key


def test_mlflow_logger_gets_the_guard_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow >= 3.x refuses file stores without it
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger
    from mlflow.tracking import MlflowClient

    uri = f"file:{tmp_path / 'mlruns'}"
    logger = MLFlowLogger(experiment_name="ppo_guard", tracking_uri=uri)
    csv_logger = CSVLogger(tmp_path, name="csv")
    fit(_module("detached_logits"), [PPOGuard(log_every_n_steps=4, dense_steps=10**6)], logger=[logger, csv_logger])

    # the file store on disk: <save_dir>/<experiment>/<run>/metrics/<key>, one "timestamp value step" line per row
    metrics_dir = Path(logger.save_dir) / logger.experiment_id / logger.run_id / "metrics"
    on_disk = {}
    for key in KEYS:
        lines = (metrics_dir / key).read_text().split()
        on_disk[key] = [(int(lines[i + 2]), float(lines[i + 1])) for i in range(0, len(lines), 3)]
        assert all(math.isfinite(v) for _, v in on_disk[key]), key
    _same_rows(on_disk, csv_logger.log_dir)
    assert {v for _, v in on_disk["ppo_guard/actor/grad_norm"]} == {0.0}  # detached logits: no actor gradient
    assert all(v > 0 for _, v in on_disk["ppo_guard/critic/grad_norm"])

    # and MLflow's own client reads the same history back
    client = MlflowClient(tracking_uri=uri)
    for key in KEYS:
        history = sorted((m.step, m.value) for m in client.get_metric_history(logger.run_id, key))
        assert history == on_disk[key], key
    assert _findings(logger.save_dir) == ["PPG101"]  # Trainer.log_dir of a non-file logger is its save_dir
    assert not (Path(csv_logger.log_dir) / "ppo_guard_findings.json").exists()


def _wandb_series(run_file: Path) -> dict[str, list[tuple[int, float]]]:
    """Per guard key, the ``(global_step, value)`` rows of the history records in a W&B offline run file."""
    series: dict[str, list[tuple[int, float]]] = {key: [] for key in KEYS}
    for record in _wandb_records(run_file):
        if record.WhichOneof("record_type") != "history":
            continue
        items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        for key in KEYS:
            if key in items:
                series[key].append((int(items["trainer/global_step"]), float(items[key])))
    return series


def _wandb_records(path: Path) -> list:
    """The records of a W&B offline run file (``run-<id>.wandb``): a 7-byte header, then LevelDB-log style blocks
    of 32 KiB holding chunks (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last) of protobuf
    ``Record`` messages. ``wandb sync`` uploads this file; read here without a server."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, block, pos, chunks, records = path.read_bytes(), 32768, 7, b"", []
    assert raw[:4] == b":W&B", raw[:7]
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        chunks += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def test_wandb_offline_logger_gets_the_guard_metrics(tmp_path, monkeypatch):
    import wandb
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(project="ppo_guard", save_dir=str(tmp_path), offline=True)
    csv_logger = CSVLogger(tmp_path, name="csv")
    try:
        fit(_module("detached_logits"), [PPOGuard(log_every_n_steps=4, dense_steps=10**6)],
            logger=[logger, csv_logger])
        summary = dict(logger.experiment.summary)
        run_file = Path(logger.experiment.dir).parent / f"run-{logger.experiment.id}.wandb"
    finally:
        wandb.finish()  # flushes the run file
    for key in KEYS:
        assert key in summary and math.isfinite(float(summary[key])), key
    assert float(summary["ppo_guard/actor/grad_norm"]) == 0.0

    # the offline run file on disk holds every row the guard logged. W&B's writer process may still be appending
    # its last blocks when finish() returns (seen on a loaded 2-core machine: 20 of 30 rows): read it again until
    # it holds as many rows as the CSV logger got, for up to 30 s; the comparison below stays exact.
    wanted = sum(1 for r in read_csv(csv_logger.log_dir) if KEYS[0] in r)
    for _ in range(150):
        series = _wandb_series(run_file)
        if len(series[KEYS[0]]) >= wanted:
            break
        time.sleep(0.2)
    _same_rows(series, csv_logger.log_dir)
    assert {v for _, v in series["ppo_guard/actor/grad_norm"]} == {0.0}
    assert _findings(logger.save_dir) == ["PPG101"]
