"""Training runs: the Hydra run schema, the Lightning ``Trainer`` seqzoo builds, and :func:`run`.

``python train.py …`` (the checkout's Hydra entry point) and ``seqzoo-eval mqar-sweep`` both end in
:func:`run`; :func:`compose` builds the same run config from override strings without a command line,
from the config groups installed with the package (:mod:`seqzoo.configs`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import MISSING, DictConfig, OmegaConf

from seqzoo.configs import CONFIG_DIR, ConfigError
from seqzoo.training.callbacks import FinalCheckpoint, KeepLogOnResume, ResumableCSVLogger, ResumeProgressBar
from seqzoo.training.checkpoint import AtomicCheckpointIO, remove_stale_temporaries
from seqzoo.training.module import LanguageModelModule
from seqzoo.training.quiet import quiet_training


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
class TrainerSchema:
    """Types of the ``Trainer`` keyword arguments the ``trainer`` group sets (``configs/trainer/cpu.yaml``).

    ``trainer.max_steps=abc`` then fails at composition, naming the key and the value, instead of deep inside
    Lightning. Keys Lightning accepts in several types (``devices``, ``precision``, ``val_check_interval``,
    ``limit_*_batches``, ``deterministic``) stay ``Any``: OmegaConf has no unions. ``+trainer.<kwarg>=…`` still
    adds any other ``Trainer`` argument.
    """

    accelerator: str = "cpu"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: Any = "32-true"
    max_steps: int = -1
    max_epochs: int | None = None
    val_check_interval: Any = None
    check_val_every_n_epoch: int | None = 1
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    num_sanity_val_steps: int | None = None
    log_every_n_steps: int | None = None
    gradient_clip_val: float | None = None
    accumulate_grad_batches: int = 1
    deterministic: Any = None
    enable_progress_bar: bool = True
    use_distributed_sampler: bool = True


@dataclass
class RunSchema:
    """Top-level run keys; the model and data groups are validated where they are built."""

    model: Any = MISSING
    data: Any = MISSING
    trainer: TrainerSchema = field(default_factory=TrainerSchema)
    optim: OptimSchema = field(default_factory=OptimSchema)
    seed: int = 0
    ckpt_path: str | None = None
    checkpoint_every_n_steps: int = 100
    test_after_fit: bool = True
    progress_refresh_rate: int = 20
    compile: bool = False
    threads: int | None = None
    # Logger name -> options (configs/logger/): {csv: {}}, {tensorboard: {}}, {wandb: {project, offline}}; several at once.
    logger: Any = field(default_factory=lambda: {"csv": {}})


ConfigStore.instance().store(name="run_schema", node=RunSchema)


class LossHistory(Callback):
    """Keeps ``(global_step, train loss)`` after every optimizer step, and the thread count training ran with
    (used by tests and ``results.json``)."""

    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []
        self.threads: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.threads = torch.get_num_threads()

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
    re-creates its logger and would otherwise overwrite the training log with the test log. The training
    log survives a resume (:class:`ResumableCSVLogger`); the test log is rewritten by every test.
    """
    checkpoints = FinalCheckpoint(
        dirpath=output_dir / "checkpoints",
        filename="step={step}",
        auto_insert_metric_name=False,
        every_n_train_steps=cfg.checkpoint_every_n_steps,
        save_top_k=-1,
        save_last=True,
    )
    callbacks = [checkpoints, LearningRateMonitor(logging_interval="step"), KeepLogOnResume(), *callbacks]
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_args.get("enable_progress_bar", True):
        callbacks.append(ResumeProgressBar(refresh_rate=cfg.progress_refresh_rate))
    if stage != "fit":
        # A new test replaces the previous one's metrics (Lightning would warn, then delete them itself).
        (output_dir / stage / "metrics.csv").unlink(missing_ok=True)
    try:
        return pl.Trainer(
            **trainer_args,
            default_root_dir=str(output_dir),
            callbacks=callbacks,
            logger=build_loggers(cfg, output_dir, stage),
            plugins=[AtomicCheckpointIO()],
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"trainer config: {str(exc).splitlines()[0]}") from None
    except MisconfigurationException as exc:
        reason = str(exc).strip().splitlines()[0]
        if "gpu" in reason.lower() or "cuda" in reason.lower():
            accelerator = trainer_args.get("accelerator")
            raise ConfigError(
                f"trainer config: accelerator={accelerator} needs a GPU, and this machine has none usable ({reason}); "
                "train on the CPU with trainer=cpu or trainer=ddp"
            ) from None
        raise ConfigError(f"trainer config: {reason}") from None


LOGGERS = ("csv", "tensorboard", "wandb")


def build_loggers(cfg: DictConfig, output_dir: Path, stage: str) -> list[Any]:
    """The loggers ``cfg.logger`` names (``configs/logger/``), each writing ``stage``'s metrics into ``output_dir``:

    * ``csv``: ``<run>/<stage>/metrics.csv`` (:class:`ResumableCSVLogger`, rows kept across a resume);
    * ``tensorboard``: event files in ``<run>/tensorboard/<stage>/``;
    * ``wandb``: a W&B run per stage in ``<run>/wandb/`` (``offline: true`` by default: nothing leaves the machine).

    An unknown name, or a logger whose package is missing, is a one-line :class:`ConfigError`.
    """
    chosen = OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") is not None else {}
    unknown = sorted(set(chosen) - set(LOGGERS))
    if unknown:
        raise ConfigError(f"logger: unknown logger(s) {', '.join(unknown)}; choose from {', '.join(LOGGERS)}")
    loggers: list[Any] = []
    for name, options in chosen.items():
        options = dict(options or {})
        if name == "csv":
            loggers.append(ResumableCSVLogger(output_dir, version=stage))
        elif name == "tensorboard":
            from lightning.pytorch.loggers import TensorBoardLogger

            try:
                loggers.append(
                    TensorBoardLogger(save_dir=str(output_dir), name="tensorboard", version=stage, default_hp_metric=False, **options)
                )
            except ModuleNotFoundError:
                raise ConfigError("logger=tensorboard needs the tensorboard package (pip install tensorboard)") from None
        else:
            from lightning.pytorch.loggers import WandbLogger

            try:
                import wandb  # noqa: F401
            except ImportError:
                raise ConfigError("logger=wandb needs the wandb package (pip install wandb)") from None
            os.environ.setdefault("WANDB_SILENT", "true")
            options.setdefault("offline", True)
            options.setdefault("project", "seqzoo")
            loggers.append(WandbLogger(save_dir=str(output_dir), name=f"{output_dir.name}-{stage}", **options))
    return loggers


def finish_wandb(trainer: pl.Trainer) -> None:
    """End the W&B run of a finished stage, so the next stage (the test) starts its own instead of reusing it."""
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger" and trainer.global_rank == 0:
            logger.experiment.finish()


def resolve_checkpoint(ckpt_path: str | None, output_dir: Path) -> str | None:
    """The checkpoint ``fit`` resumes from: ``None`` (fresh), a file, ``"last"`` or ``"auto"``.

    ``"last"`` is ``output_dir/checkpoints/last.ckpt`` and must exist: asking to resume a run that left no
    checkpoint (a misspelt ``hydra.run.dir``, an empty folder) is an error, never a silent fresh start.
    ``"auto"`` resumes from it when it exists and starts fresh otherwise (a job that is simply rerun).
    """
    if ckpt_path is None:
        return None
    last = output_dir / "checkpoints" / "last.ckpt"
    if ckpt_path == "auto":
        if last.is_file():
            return str(last)
        rank_zero_print(f"ckpt_path=auto: no {last}; training from scratch")
        return None
    if ckpt_path == "last":
        if not last.is_file():
            raise FileNotFoundError(
                f"ckpt_path=last: no checkpoint to resume in {output_dir} ({last} does not exist; is hydra.run.dir the "
                "interrupted run's folder?); ckpt_path=auto starts from scratch when there is none"
            )
        return str(last)
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {ckpt_path}")
    return ckpt_path


@rank_zero_only
def rank_zero_print(message: str) -> None:
    """``print`` on the process of global rank 0 only (DDP runs every line once)."""
    print(message, flush=True)


def _summary(cfg: DictConfig, module: LanguageModelModule, datamodule: pl.LightningDataModule, world_size: int, output_dir: Path) -> str:
    """One line naming what this run trains, on what, for how long, where (printed before the model table)."""
    model = module.model.config
    layers = model.layer_mixers()
    mixers = ", ".join(f"{name} ×{layers.count(name)}" for name in dict.fromkeys(layers))
    trainer = cfg.trainer
    # Without threads=N, Lightning gives each DDP process cores / processes threads after this line is printed.
    threads = f"{torch.get_num_threads()} threads" if world_size == 1 or cfg.threads else "threads: cores / processes"
    return (
        f"seqzoo: {mixers} (hidden {model.hidden_size}, vocab {model.vocab_size}, {module.model.num_parameters():,} parameters) "
        f"on {type(datamodule).__name__}, {trainer.max_steps} steps, {trainer.accelerator} × {trainer.devices} ({trainer.strategy}), "
        f"{threads} -> {output_dir}"
    )


def run(cfg: DictConfig, output_dir: str | os.PathLike) -> dict[str, Any]:
    """Train (and test) as ``cfg`` says, writing everything into ``output_dir``.

    Returns ``{"losses": [(step, loss), …], "test": {metric: value}, "checkpoint": path of last.ckpt, "threads": n}``.
    The known noise of the training stack (deprecation warnings of torchdata and Lightning on this torch,
    Lightning's GPU/TPU lines and tips) is filtered while it runs (:func:`seqzoo.training.quiet.quiet_training`).
    """
    output_dir = Path(output_dir)
    if cfg.compile and cfg.data.get("varlen", False):
        # A packed layout is read on the host each batch: a compiled graph would break or recompile on it.
        raise ConfigError("compile=true needs data.varlen=false (packed documents are laid out on the host per batch)")
    ckpt_path = resolve_checkpoint(cfg.ckpt_path, output_dir)
    with quiet_training(), torch_threads(cfg.threads):
        return _run(cfg, output_dir, ckpt_path)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` intra-op threads (``None``: torch's default, one per core), restored afterwards.

    ``OMP_NUM_THREADS`` is set too, so Lightning's DDP launch keeps the count instead of dividing the cores
    between processes. On a machine shared with another busy process, fewer threads than cores avoid the
    waits that slowed runs 7–74× on two cores.
    """
    if threads is None:
        yield
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be an integer >= 1 or null (torch's default), got {threads!r}")
    before, env_before = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if env_before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_before


def _run(cfg: DictConfig, output_dir: Path, ckpt_path: str | None) -> dict[str, Any]:
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
        print(_summary(cfg, module, datamodule, trainer.world_size, output_dir), flush=True)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finish_wandb(trainer)
    results: dict[str, Any] = {
        "losses": history.losses,
        "checkpoint": str(output_dir / "checkpoints" / "last.ckpt"),
        "threads": history.threads,
    }
    if cfg.test_after_fit:
        tester = build_trainer(cfg, output_dir, [], stage="test")
        metrics = tester.test(module, datamodule=datamodule, verbose=False)
        finish_wandb(tester)
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
        raise ConfigError(_one_line(exc)) from None


def _one_line(exc: BaseException) -> str:
    """A Hydra composition error in one line: the override and OmegaConf's reason.

    ``Error merging override trainer.max_steps=abc`` (caused by ``Value 'abc' of type 'str' could not be
    converted to Integer``) becomes ``trainer.max_steps=abc: Value 'abc' … Integer``; the ``full_key`` and
    type lines that follow only repeat them.
    """
    first = (str(exc).strip().splitlines() or ["invalid configuration"])[0].strip()
    cause = str(exc.__cause__).strip().splitlines()[0].strip() if exc.__cause__ is not None and str(exc.__cause__).strip() else ""
    first = first.removeprefix("Error merging override ")
    if not cause:
        return first
    return f"{first} {cause}" if first.endswith(".") else f"{first}: {cause}"


def main(cfg: DictConfig, output_dir: str | os.PathLike) -> None:
    """Command-line wrapper of :func:`run`: a configuration or file error prints one line and exits with status 1."""
    try:
        run(cfg, output_dir)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
