"""Lightning pieces that let a resumed run continue the interrupted one: its metrics log, its progress bar
and a ``last.ckpt`` that holds the final step.

* :class:`ResumableCSVLogger`: Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts, so a
  resumed run lost every row written before the crash. This logger keeps the file, writes every row as it is
  logged (a killed run loses none), and at the start of training drops the rows at or after the step the run
  restarts from, which the resumed run logs again: each step appears once.
* :class:`ResumeProgressBar`: after a mid-epoch resume Lightning skips ``on_train_epoch_start``, so its bar
  showed "Training" without the epoch and counted the restored batches as done in no time (an inflated it/s).
* :class:`FinalCheckpoint`: Lightning writes ``last.ckpt`` at the end of training only if it never wrote one,
  so after ``max_steps=150`` with a checkpoint every 100 steps ``last.ckpt`` held step 100.
"""

from __future__ import annotations

import csv
import os
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer without the deletion of an existing ``metrics.csv``; it appends to it instead."""

    def _check_log_dir_exists(self) -> None:
        # Lightning deletes metrics.csv here. Keep it, and take over its columns so appended rows line up
        # (a new metric later rewrites the file with the wider header, as Lightning does).
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.metrics_keys = next(csv.reader(handle), [])

    def drop_rows_from(self, step: int) -> None:
        """Remove every row (written or pending) whose ``step`` is ``>= step``."""
        self.metrics = [row for row in self.metrics if int(row["step"]) < step]
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
            rows = list(csv.DictReader(handle))
        kept = [row for row in rows if row.get("step") not in (None, "") and int(float(row["step"])) < step]
        if len(kept) == len(rows):
            return
        tmp = self.metrics_file_path + ".tmp"
        with self._fs.open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, self.metrics_file_path)


class ResumableCSVLogger(CSVLogger):
    """A :class:`CSVLogger` (``<save_dir>/<version>/metrics.csv``) that keeps the rows of an interrupted run.

    Every logged row goes to disk at once (``flush_logs_every_n_steps=1``: a SIGKILL loses nothing the resumed
    run will not log again); :meth:`drop_rows_from` is called by :class:`KeepLogOnResume` with the step the run
    starts from.
    """

    def __init__(self, save_dir: str | os.PathLike, version: str) -> None:
        super().__init__(str(save_dir), name="", version=version, flush_logs_every_n_steps=1)

    @property
    @rank_zero_experiment
    def experiment(self) -> _KeepingWriter:
        """The (appending) writer; created on first use, on rank 0 only."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def drop_rows_from(self, step: int) -> None:
        """Forget the rows at or after ``step`` (a resumed run logs them again; a fresh run, ``step=0``, starts empty)."""
        self.experiment.drop_rows_from(step)


class KeepLogOnResume(Callback):
    """At the start of training, drops the log rows the run is about to write again (see :class:`ResumableCSVLogger`)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, ResumableCSVLogger):
                logger.drop_rows_from(trainer.global_step)


class ResumeProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, which also labels the epoch and rates only new batches after a resume."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._epoch_bar_ready = False

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._epoch_bar_ready = True

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if getattr(self, "_epoch_bar_ready", True):
            return
        self._epoch_bar_ready = True
        bar = self.train_progress_bar
        if bar.disable:
            return
        # Resumed (mid-epoch or on an epoch boundary): Lightning skipped on_train_epoch_start. Label the epoch,
        # start the count at the restored position and let tqdm rate only the batches of this process.
        bar.reset(total=convert_inf(self.total_train_batches))
        bar.initial = bar.n = batch_idx
        bar.set_description(f"Epoch {trainer.current_epoch}")
        bar.refresh()


class FinalCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also writes ``last.ckpt`` at the end of training when the final step has none yet."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_last and self._last_checkpoint_saved and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_train_end(trainer, pl_module)
