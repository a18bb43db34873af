"""The LightningModule that trains a :class:`LanguageModel`: loss, accuracy, AdamW, warmup + cosine."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torchmetrics import Metric

from seqzoo.models.language_model import LanguageModel


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1 over ``warmup_steps``, then cosine down to ``min_lr_ratio`` at ``total_steps``.

    A pure function of the step, so a resumed run follows the same schedule.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class EvalMetrics(Metric):
    """Evaluation sums over every rank (torchmetrics syncs them at ``compute``): argmax hits and labelled tokens per
    segment, and the token-weighted loss. Each example is counted once however the ranks split the data.

    ``compute() -> {"acc": [segments], "count": [segments], "loss": scalar}`` (fp64).
    """

    full_state_update = False

    def __init__(self, num_segments: int) -> None:
        super().__init__()
        self.add_state("correct", torch.zeros(num_segments, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(num_segments, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("loss_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, loss: torch.Tensor, correct: torch.Tensor, count: torch.Tensor, segment: int) -> None:  # type: ignore[override]
        self.correct[segment] += correct.detach().double()
        self.count[segment] += count.detach().double()
        self.loss_sum += loss.detach().double() * count.detach().double()
        self.tokens += count.detach().double()

    def compute(self) -> dict[str, torch.Tensor]:
        return {"hits": self.correct, "count": self.count, "loss": self.loss_sum / self.tokens.clamp(min=1)}


class LanguageModelModule(pl.LightningModule):
    """Trains a :class:`LanguageModel` on batches ``{"input_ids", "labels"[, "segment"]}``.

    Args:
        config: the whole run config as a plain dict (saved with every checkpoint); reads
            ``config["model"]``, ``config["optim"]``, ``config["seed"]`` and ``config.get("compile")``: compile the
            model's mixer stack (``LanguageModel.hidden_states``) with ``torch.compile(fullgraph=True)``; the loss
            around it (which keeps only labelled positions, a data-dependent shape) stays eager.
        segment_names: names of the evaluation segments (MQAR); per-segment accuracy is logged
            as ``val/acc/<name>`` and ``test/acc/<name>``.
    """

    def __init__(self, config: dict[str, Any], segment_names: list[str] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters({"config": config, "segment_names": segment_names})
        self.config = config
        self.optim = config["optim"]
        self.seed = int(config["seed"])
        self.model = LanguageModel(config["model"])
        if config.get("compile"):
            # An instance attribute shadowing the method: model.loss calls the compiled stack, and the state dict
            # keeps its plain names (no "_orig_mod." prefix), so checkpoints load with or without compile.
            self.model.hidden_states = torch.compile(self.model.hidden_states, fullgraph=True, dynamic=False)
        self.segment_names = list(segment_names or ["all"])
        self.eval_metrics = EvalMetrics(len(self.segment_names))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Reseeding from the step (not restoring RNG states) keeps dropout identical after a resume.
        torch.manual_seed(self.seed * 1_000_003 + self.trainer.global_step * 1009 + self.trainer.global_rank)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, correct, count = self.model.loss(batch["input_ids"], batch["labels"], batch.get("cu_seqlens"))
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", correct / count.clamp(min=1), prog_bar=True)
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor]) -> None:
        loss, correct, count = self.model.loss(batch["input_ids"], batch["labels"], batch.get("cu_seqlens"))
        self.eval_metrics.update(loss, correct, count, int(batch.get("segment", 0)))

    def _eval_epoch_end(self, stage: str) -> None:
        values = {k: v.cpu() for k, v in self.eval_metrics.compute().items()}  # summed over every rank
        self.eval_metrics.reset()
        hits, count = values["hits"], values["count"]
        # Every rank holds the same global numbers; sync_dist=True averages equal values (exact) and tells
        # Lightning the metric is global (it warned on every DDP run).
        self.log(f"{stage}/acc", (hits.sum() / count.sum().clamp(min=1)).item(), prog_bar=True, sync_dist=True)
        self.log(f"{stage}/loss", values["loss"].item(), prog_bar=stage == "val", sync_dist=True)
        if len(self.segment_names) > 1:
            for name, hit, n in zip(self.segment_names, hits, count):
                self.log(f"{stage}/acc/{name}", (hit / n.clamp(min=1)).item(), sync_dist=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self):
        no_decay = {f"model.{name}" for name in self.model.no_weight_decay_names()}
        decay_params, other_params = [], []
        for name, param in self.named_parameters():
            (other_params if name in no_decay else decay_params).append(param)
        groups = [
            {"params": decay_params, "weight_decay": self.optim["weight_decay"]},
            {"params": other_params, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.optim["lr"], betas=tuple(self.optim["betas"]), eps=self.optim["eps"])
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, self.optim["warmup_steps"], int(total), self.optim["min_lr_ratio"])
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
