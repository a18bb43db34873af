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
