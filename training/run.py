"""Training runs: the Hydra run schema, the Lightning ``Trainer`` seqzoo builds, and :func:`run`.

``python train.py …`` (the checkout's Hydra entry point) and ``seqzoo-eval mqar-sweep`` both end in
:func:`run`; :func:`compose` builds the same run config from override strings without a command line,
from the config groups installed with the package (:mod:`seqzoo.configs`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from omegaconf import MISSING, DictConfig, OmegaConf

from seqzoo.configs import CONFIG_DIR, ConfigError
from seqzoo.training.checkpoint import AtomicCheckpointIO, remove_stale_temporaries
from seqzoo.training.module import LanguageModelModule


@dataclass
class OptimSchema:
    """AdamW and its warmup + cosine schedule (typos and wrong types fail at composition)."""

    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1


@dataclass
class RunSchema:
    """Top-level run keys; the model, data and trainer groups are validated where they are built."""

    model: Any = MISSING
    data: Any = MISSING
    trainer: Any = MISSING
    optim: OptimSchema = field(default_factory=OptimSchema)
    seed: int = 0
    ckpt_path: str | None = None
    checkpoint_every_n_steps: int = 100
    test_after_fit: bool = True
    progress_refresh_rate: int = 20
    compile: bool = False


ConfigStore.instance().store(name="run_schema", node=RunSchema)


class LossHistory(Callback):
    """Keeps ``(global_step, train loss)`` after every optimizer step (used by tests and ``results.json``)."""

    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append((trainer.global_step, float(outputs["loss"])))


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    """Instantiate ``cfg.data``; unknown keys or bad values give one line."""
    try:
        return instantiate(cfg.data)
    except Exception as exc:  # Hydra wraps constructor errors in InstantiationException
        cause = exc.__cause__ or exc
        raise ConfigError(f"data config: {str(cause).splitlines()[0]}") from None


def build_trainer(cfg: DictConfig, output_dir: Path, callbacks: list[Callback], stage: str = "fit") -> pl.Trainer:
    """``Trainer(**cfg.trainer)`` with seqzoo's checkpointing, logging and progress bar.

    Metrics go to ``output_dir/<stage>/metrics.csv``: one logger per stage, because a DDP launch
    re-creates its logger and would otherwise overwrite the training log with the test log.
    """
    checkpoints = ModelCheckpoint(
        dirpath=output_dir / "checkpoints",
        filename="step={step}",
        auto_insert_metric_name=False,
        every_n_train_steps=cfg.checkpoint_every_n_steps,
        save_top_k=-1,
        save_last=True,
    )
    callbacks = [checkpoints, LearningRateMonitor(logging_interval="step"), *callbacks]
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_args.get("enable_progress_bar", True):
        callbacks.append(TQDMProgressBar(refresh_rate=cfg.progress_refresh_rate))
    try:
        return pl.Trainer(
            **trainer_args,
            default_root_dir=str(output_dir),
            callbacks=callbacks,
            logger=CSVLogger(str(output_dir), name="", version=stage),
            plugins=[AtomicCheckpointIO()],
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"trainer config: {str(exc).splitlines()[0]}") from None


def run(cfg: DictConfig, output_dir: str | os.PathLike) -> dict[str, Any]:
    """Train (and test) as ``cfg`` says, writing everything into ``output_dir``.

    Returns ``{"losses": [(step, loss), …], "test": {metric: value}, "checkpoint": path of last.ckpt}``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output_dir / "checkpoints")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    config = OmegaConf.to_container(cfg, resolve=True)
    datamodule = build_datamodule(cfg)
    module = LanguageModelModule(
        {"model": config["model"], "optim": config["optim"], "seed": config["seed"], "data": config["data"], "compile": config["compile"]},
        segment_names=getattr(datamodule, "segment_names", None),
    )
    history = LossHistory()
    trainer = build_trainer(cfg, output_dir, [history])
    if trainer.global_rank == 0:
        OmegaConf.save(cfg, output_dir / "config.resolved.yaml", resolve=True)
    ckpt_path = cfg.ckpt_path
    if ckpt_path == "last":
        last = output_dir / "checkpoints" / "last.ckpt"
        ckpt_path = str(last) if last.is_file() else None
    elif ckpt_path is not None and not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {ckpt_path}")
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    results: dict[str, Any] = {"losses": history.losses, "checkpoint": str(output_dir / "checkpoints" / "last.ckpt")}
    if cfg.test_after_fit:
        metrics = build_trainer(cfg, output_dir, [], stage="test").test(module, datamodule=datamodule, verbose=False)
        results["test"] = {k: float(v) for k, v in metrics[0].items()} if metrics else {}
    if trainer.global_rank == 0:
        (output_dir / "results.json").write_text(json.dumps({k: v for k, v in results.items() if k != "losses"}, indent=2))
        if "test" in results:
            print("test: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(results["test"].items())))
    return results


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """The run config ``python train.py *overrides`` would build, composed from the installed config groups.

    A bad override (unknown group option or key) raises :class:`ConfigError` with Hydra's one-line reason.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except HydraException as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None


def main(cfg: DictConfig, output_dir: str | os.PathLike) -> None:
    """Command-line wrapper of :func:`run`: a configuration or file error prints one line and exits with status 1."""
    try:
        run(cfg, output_dir)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
