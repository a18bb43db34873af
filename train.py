"""Train a seqzoo language model from Hydra configs with Lightning (a thin entry point to :mod:`seqzoo.training`).

    python train.py                                  # 2-layer attention on MQAR, CPU, a few minutes
    python train.py model=transformer data=text      # byte-level LM on the standard-library corpus
    python train.py trainer=ddp                      # Lightning DDP (gloo on CPU)
    python train.py ckpt_path=last hydra.run.dir=outputs/run1   # resume a run exactly

Every run writes ``config.resolved.yaml``, ``checkpoints/`` (``last.ckpt`` included),
``fit/metrics.csv``, ``test/metrics.csv`` and ``results.json`` into its run folder.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from seqzoo import training  # registers the run schema with Hydra's ConfigStore


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: compose the config, then :func:`seqzoo.training.run` in Hydra's run folder."""
    from hydra.core.hydra_config import HydraConfig

    training.main(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
