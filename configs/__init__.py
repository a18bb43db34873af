"""seqzoo's Hydra config groups (``model/``, ``data/``, ``trainer/``, ``optim/``) and the error every config check raises.

The YAML files install with the package (``seqzoo.configs``), so :func:`seqzoo.training.compose` and
``seqzoo-eval mqar-sweep`` find them outside a checkout. This module imports nothing heavy: layers,
data modules, training and eval all raise :class:`ConfigError` from here.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A one-line error for a bad model or run configuration."""


def config_names(group: str) -> list[str]:
    """Names of the configs in ``group`` (``"model"``, ``"data"``, …), sorted, without ``.yaml``."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


__all__ = ["CONFIG_DIR", "ConfigError", "config_names"]
