"""Training seqzoo language models with Lightning: the LightningModule, checkpoints and one run function.

``from seqzoo.training import compose, run`` trains exactly what ``python train.py <overrides>`` trains::

    cfg = compose(["model=gated_deltanet", "trainer.max_steps=200"])
    result = run(cfg, "outputs/gdn")  # {"losses", "test", "checkpoint", "threads"}
"""

import os

# Read by `datasets` when it is first imported: no hidden network call from a training run.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")

from seqzoo.training.checkpoint import AtomicCheckpointIO, load_language_model, read_checkpoint  # noqa: E402
from seqzoo.training.module import LanguageModelModule, warmup_cosine  # noqa: E402
from seqzoo.training.run import OptimSchema, RunSchema, build_datamodule, build_loggers, build_trainer, compose, main, run  # noqa: E402

__all__ = [
    "build_loggers",
    "AtomicCheckpointIO",
    "LanguageModelModule",
    "OptimSchema",
    "RunSchema",
    "build_datamodule",
    "build_trainer",
    "compose",
    "load_language_model",
    "main",
    "read_checkpoint",
    "run",
    "warmup_cosine",
]
