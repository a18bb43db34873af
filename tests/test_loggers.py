"""Loggers chosen from the config (``configs/logger/``): CSV (default), TensorBoard, W&B offline, several at once."""

from __future__ import annotations

import csv

import pytest

import seqzoo.training as training
from seqzoo.configs import ConfigError

TINY = [
    "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
    "data.train_segments.0.num_examples=16", "data.test_segments.0.num_examples=16", "data.batch_size=8", "data.eval_batch_size=16",
    "model.hidden_size=16",
]  # fmt: skip


def test_every_logger_writes_its_files(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = training.compose(["logger=all", *TINY, "data.train_segments=[{seq_len: 32, num_kv_pairs: 4, num_examples: 16}]",
                            "data.test_segments=[{seq_len: 32, num_kv_pairs: 4, num_examples: 16}]"])  # fmt: skip
    assert set(cfg.logger) == {"csv", "tensorboard", "wandb"} and cfg.logger.wandb.offline
    training.run(cfg, tmp_path)
    with open(tmp_path / "fit" / "metrics.csv") as handle:
        assert [row["step"] for row in csv.DictReader(handle) if row.get("train/loss")] == ["0", "1"]
    assert (tmp_path / "test" / "metrics.csv").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for stage, tag in (("fit", "train/loss"), ("test", "test/acc")):
        (events,) = (tmp_path / "tensorboard" / stage).glob("events.out.tfevents.*")
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        assert tag in accumulator.Tags()["scalars"], (stage, accumulator.Tags()["scalars"])
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(list(run.glob("run-*.wandb")) for run in runs)  # fit and test, each its own run


def test_logger_choice_composes_and_checks():
    assert set(training.compose(["logger=[csv,tensorboard]"]).logger) == {"csv", "tensorboard"}
    assert set(training.compose([]).logger) == {"csv"}
    with pytest.raises(ConfigError, match="logger"):
        training.compose(["logger=nope"])
    cfg = training.compose(["+logger.mlflow={}"])
    with pytest.raises(ConfigError, match="unknown logger"):
        training.build_loggers(cfg, __import__("pathlib").Path("/tmp/x"), "fit")
