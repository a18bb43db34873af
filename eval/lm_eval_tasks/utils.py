"""Loaders of the local task data (lm-eval's ``custom_dataset`` hook: the YAML names these functions)."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def _local(name: str, **kwargs):
    import datasets

    # lm-eval passes the task's metadata and dataset_kwargs; the data is this folder's file whatever they say.
    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(HERE / name))})


def load_text(**kwargs):
    """``{"test": Dataset(text)}`` from ``text.jsonl``."""
    return _local("text.jsonl", **kwargs)


def load_choice(**kwargs):
    """``{"test": Dataset(question, choices, answer)}`` from ``choice.jsonl``."""
    return _local("choice.jsonl", **kwargs)
