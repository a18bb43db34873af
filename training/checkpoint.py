"""Atomic checkpoint writing and one-line-error checkpoint loading."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from seqzoo.models.language_model import LanguageModel


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write ``NAME.tmp`` beside the target, fsync it, rename it over the target, fsync the folder.

    A run killed mid-save leaves only a ``.tmp`` file beside intact checkpoints (Lightning's own
    save goes through ``$TMPDIR`` and can leave a truncated checkpoint under its final name).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return read_checkpoint(path, map_location or "cpu")


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Delete ``*.tmp`` files a killed save left behind."""
    for tmp in Path(folder).glob("*.tmp"):
        tmp.unlink(missing_ok=True)


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(weights_only=True)`` a checkpoint; a missing or unreadable file fails with one line naming it.

    Raises :class:`FileNotFoundError` for a missing file and :class:`ValueError` ("… is not a seqzoo
    checkpoint …") for one that does not load as weights.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():
            # A foreign pickle also draws torch's "Detected pickle protocol 4" warning; the error below says it all.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises EOFError, OSError, KeyError, UnpicklingError… for damaged files
        # torch's own message suggests retrying with weights_only=False, i.e. unpickling arbitrary code from a
        # file that is not what it claims to be: never pass that on. Name the file and what went wrong only.
        raise ValueError(
            f"{path} is not a seqzoo checkpoint: torch.load cannot read it as weights ({type(exc).__name__}); "
            "the file is damaged, truncated or of another kind"
        ) from None


def load_language_model(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[LanguageModel, dict[str, Any]]:
    """Rebuild the :class:`LanguageModel` of a training checkpoint.

    Returns ``(model in eval mode, run config as a plain dict)``; the model config is taken from the
    checkpoint's hyperparameters, so no config file is needed.
    """
    checkpoint = read_checkpoint(path, map_location)
    config = checkpoint.get("hyper_parameters", {}).get("config")
    if not config or "model" not in config:
        raise ValueError(f"{path} is not a seqzoo checkpoint: it holds no seqzoo run config (train.py writes one into every checkpoint)")
    model = LanguageModel(config["model"])
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    return model.eval(), config
