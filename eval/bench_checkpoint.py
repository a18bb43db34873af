"""``seqzoo-eval bench checkpoint_attention``: checkpoint attention against causal softmax attention (SDPA), side by side.

For every length ``T`` both run on the same random ``q, k, v [batch, T, heads, head_dim]``; checkpoint attention
takes every ``L``-th key and value as its checkpoints (SCOUT's ``stride``), for each segment length ``L``. Each row
is one (``T``, implementation, ``L``) with

* ``fwd_ms`` / ``fwd_bwd_ms``: median wall time of a forward without autograd (a prefill) and of a forward and
  backward; the repeats of all implementations at one ``T`` are interleaved, so a busy machine slows them alike;
* ``fwd_peak_mib`` / ``fwd_bwd_peak_mib``: peak tensor memory above what was live before
  (:func:`seqzoo.eval.measure.peak_memory`; on the CPU replayed from the profiler's allocation records);
* ``fwd_vs_sdpa``, ``fwd_bwd_vs_sdpa``, ``mem_vs_sdpa``: the checkpoint row's figure ÷ SDPA's at the same ``T``
  (< 1: cheaper), ``fwd_bwd_vs_sdpa_best`` the same from each side's fastest repeat (the least disturbed
  estimate on a shared machine), and ``ideal`` = ``1/L``, the ratio of the score counts (``T²/2L`` against ``T²/2``).

SDPA is ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``, PyTorch's fused kernel where the
device has one (a flash-attention kernel on the CPU as well as on CUDA). The checkpoint backends are the
device's (``torch`` on the CPU; ``triton`` and ``torch`` on CUDA) unless ``--backends`` names them.
The report gives ratios; what is good enough is the reader's call.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from seqzoo.eval.measure import peak_memory, sync
from seqzoo.eval.report import progress, write_report
from seqzoo.ops import checkpoint_attention
from seqzoo.ops.checkpoint_attention import BACKENDS

_CMD = "bench checkpoint_attention"


def _interleaved(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, list[float]]:
    """Seconds of every repeat of each ``fn``, one warm-up each, the repeats taken in turns."""
    for fn in fns.values():
        fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def bench_checkpoint_attention(
    out_dir: str | Path,
    seq_lens: Sequence[int] = (4096, 8192, 16384, 32768),
    segment_lens: Sequence[int] = (10, 64),
    batch: int = 1,
    heads: int = 4,
    head_dim: int = 64,
    backends: Sequence[str] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    repeats: int = 3,
) -> list[dict[str, Any]]:
    """Time and peak memory of checkpoint attention and SDPA causal attention; one row per (T, impl, L).

    Writes ``bench_checkpoint_attention.{json,md,png}`` into ``out_dir`` and returns the rows.
    """
    if not seq_lens or any(t < 1 for t in seq_lens):
        raise ValueError(f"{_CMD}: --seq-lens must be positive, got {list(seq_lens)}")
    if not segment_lens or any(s < 1 for s in segment_lens):
        raise ValueError(f"{_CMD}: --segment-lens must be positive, got {list(segment_lens)}")
    if min(batch, heads, head_dim, repeats) < 1:
        raise ValueError(f"{_CMD}: --batch, --heads, --head-dim and --repeats must be >= 1")
    dev, dt = torch.device(device), getattr(torch, dtype)
    if backends is None:
        backends = ["triton", "torch"] if dev.type == "cuda" else ["torch"]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"{_CMD}: unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    rows: list[dict[str, Any]] = []
    grid = [(seq, L) for seq in seq_lens for L in segment_lens]
    for seq in progress(list(seq_lens), f"{_CMD} (length)"):
        gen = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(batch, seq, heads, head_dim, generator=gen, device=dev, dtype=dt) for _ in range(3))
        do = torch.randn(batch, seq, heads, head_dim, generator=gen, device=dev, dtype=dt)
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]

        def sdpa(q, k, v, *_):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)

        impls: dict[tuple[str, int | None], Callable[..., torch.Tensor]] = {("sdpa causal", None): sdpa}
        for L in (L for s, L in grid if s == seq):
            for backend in backends:

                def ckpt(q, k, v, L=L, backend=backend):
                    ends = slice(L - 1, None, L)
                    return checkpoint_attention(q, k, v, k[:, ends], v[:, ends], segment_len=L, backend=backend)[0]

                impls[(f"checkpoint {backend}", L)] = ckpt

        def forward(fn=None):
            with torch.no_grad():
                fn(q, k, v)

        def forward_backward(fn=None):
            for leaf in leaves:
                leaf.grad = None
            (fn(*leaves) * do).sum().backward()

        fwd = _interleaved({key: (lambda fn=fn: forward(fn)) for key, fn in impls.items()}, dev, repeats)
        fwd_bwd = _interleaved({key: (lambda fn=fn: forward_backward(fn)) for key, fn in impls.items()}, dev, repeats)
        for key, fn in impls.items():
            name, L = key
            rows.append(
                {
                    "seq_len": seq,
                    "impl": name,
                    "segment_len": L,
                    "fwd_ms": 1e3 * statistics.median(fwd[key]),
                    "fwd_bwd_ms": 1e3 * statistics.median(fwd_bwd[key]),
                    "fwd_bwd_best_ms": 1e3 * min(fwd_bwd[key]),
                    "fwd_peak_mib": peak_memory(lambda fn=fn: forward(fn), dev) / 2**20,
                    "fwd_bwd_peak_mib": peak_memory(lambda fn=fn: forward_backward(fn), dev) / 2**20,
                    "fwd_s_repeats": fwd[key],
                    "fwd_bwd_s_repeats": fwd_bwd[key],
                }
            )
    for r in rows:
        base = next(x for x in rows if x["seq_len"] == r["seq_len"] and x["segment_len"] is None)
        ours = r["segment_len"] is not None
        r["fwd_vs_sdpa"] = r["fwd_ms"] / base["fwd_ms"] if ours else None
        r["fwd_bwd_vs_sdpa"] = r["fwd_bwd_ms"] / base["fwd_bwd_ms"] if ours else None
        r["fwd_bwd_vs_sdpa_best"] = r["fwd_bwd_best_ms"] / base["fwd_bwd_best_ms"] if ours else None
        r["mem_vs_sdpa"] = r["fwd_bwd_peak_mib"] / base["fwd_bwd_peak_mib"] if ours and base["fwd_bwd_peak_mib"] else None
        r["ideal"] = 1 / r["segment_len"] if ours else None

    def plot(ax):
        for name, L in sorted({(r["impl"], r["segment_len"]) for r in rows}, key=lambda key: (key[1] or 0, key[0])):
            pts = [(r["seq_len"], r["fwd_bwd_ms"]) for r in rows if r["impl"] == name and r["segment_len"] == L]
            ax.plot(*zip(*pts), marker="o", label=name if L is None else f"{name}, L={L}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("fwd+bwd ms (median)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")

    settings = {
        "batch": batch,
        "heads": heads,
        "head_dim": head_dim,
        "backends": list(backends),
        "device": device,
        "dtype": dtype,
        "repeats": repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "checkpoints": "stride: every L-th key and value",
    }
    columns = [
        "seq_len", "impl", "segment_len", "fwd_ms", "fwd_bwd_ms", "fwd_peak_mib", "fwd_bwd_peak_mib",
        "fwd_vs_sdpa", "fwd_bwd_vs_sdpa", "fwd_bwd_vs_sdpa_best", "mem_vs_sdpa", "ideal",
    ]  # fmt: skip
    title = f"checkpoint attention vs SDPA causal ({device}, {dtype}, B={batch}, H={heads}, D={head_dim})"
    write_report(out_dir, "bench_checkpoint_attention", {"settings": settings}, rows, columns, plot, title=title)
    return rows
