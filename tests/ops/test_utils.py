"""Backend and autotune selection in ``seqzoo.ops.utils`` (both read environment switches at import)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _autotune_count(**env: str) -> int:
    """How many of three configs ``autotune_configs`` keeps in a fresh interpreter with ``env``."""
    clean = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SEQZOO_AUTOTUNE")}
    code = "from seqzoo.ops.utils import autotune_configs; print(len(autotune_configs(['a', 'b', 'c'])))"
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.parametrize(
    ("env", "kept"),
    [({}, 3), ({"SEQZOO_AUTOTUNE": "0"}, 1), ({"TRITON_INTERPRET": "1"}, 1)],
    ids=["default", "off", "interpreter"],
)
def test_autotune_switch(env, kept):
    assert _autotune_count(**env) == kept


def test_empty_huge_advises_only_whole_huge_pages_of_large_cpu_buffers(monkeypatch):
    import torch

    from seqzoo.ops import utils

    calls = []
    monkeypatch.setattr(utils, "_MADVISE", lambda start, length, advice: calls.append((start, length, advice)))
    like = torch.zeros(1, dtype=torch.float32)
    big = utils.empty_huge(4, 1024, 1024, like=like)  # 16 MiB
    small = utils.empty_huge(3, 5, like=like)
    assert big.shape == (4, 1024, 1024) and big.dtype == torch.float32 and small.shape == (3, 5)
    assert len(calls) == 1, "only the large buffer is advised"
    start, length, advice = calls[0]
    page = 2 << 20
    assert advice == 14 and start % page == 0 and length % page == 0 and length > 0
    assert big.data_ptr() <= start and start + length <= big.data_ptr() + big.numel() * 4
