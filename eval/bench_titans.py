"""``seqzoo-eval bench titans``: our ``titans_lmm`` mixer against lucidrains' ``titans_pytorch.NeuralMemory``.

For every (memory, dim, chunk, seq) of the grid, both layers run forward+backward on the same random
input ``[batch, seq, dim]`` in one process, their timings interleaved repeat by repeat (so a busy
machine slows both alike); each row puts our figures beside one peer configuration:

* ``speedup`` = our fwd+bwd tokens/s ÷ the peer's (> 1: ours is faster), from the median repeats;
* ``speedup_best`` = the same from each side's fastest repeat: on a shared machine, where other jobs
  add seconds to some repeats, the least disturbed estimate (every repeat's seconds are in the JSON);
* ``mem_ratio`` = our peak fwd+bwd tensor memory ÷ the peer's (< 1: ours needs less).

The report gives ratios only; what counts as good enough is the reader's call.

The peer is built as close to ours as its API allows: the same ``dim``, ``heads``, ``dim_head = dim //
heads`` and ``chunk_size``; the same memory network (``linear``: ``MemoryMLP(dim_head, depth=1)``, one
``dim_head × dim_head`` matrix per head, without its LayerNorm-residual wrapper; ``mlp``: its default
2-layer GELU MLP with expansion 4 inside ``x + LN(MLP(x))``, like ours); learned per-head initial
weights; momentum (order 1) and decay on; the same inner step size (the peer's loss is a mean over the
head dim where ours is ½·sum, so its ``max_lr`` is ours × ``dim_head / 2``); SiLU on q/k/v (``activation``); no
RMSNorm of the input inside the layer (``pre_rmsnorm=False``: our mixer has none, the block norms);
per-head output RMSNorm (``post_rmsnorm=True``); q/k RMSNorm (``qk_rmsnorm=True``, its nearest option
to our L2 norm).

What cannot be matched:

* Retrieval: ours is per token, after the update that includes the token itself (dual form inside each
  chunk); the peer's is chunk-granular: token ``t`` reads the weights after ``⌊(t+1)/chunk⌋`` complete
  chunks, one weight set materialised per chunk. ``--retrieval chunk`` gives ours the same reads.
* Gates: ours are per token (θ, η, α); the peer has per-token θ but one η and α per chunk, from the
  chunk's mean-pooled input.
* Gradient base: ours takes every gradient of a chunk at that chunk's start weights. The peer's
  ``batch_size=chunk`` does the same (``peer = "batch_size=chunk"``), with a Python loop over chunks;
  its default ``batch_size=None`` (``peer = "batch_size=None"``) takes every gradient at the *initial*
  weights, which parallelises over all chunks at once but is a different (weaker) learning rule.
* Ours has depthwise short convs (4 taps) on q/k/v and a per-channel output gate ``σ(x W_g)``; the peer
  has no convs, a per-head scalar output gate and (``heads > 1``) a head-combining projection.
* Gate initialisation (ours: θ, η at sigmoid(0), α at sigmoid(−4), small weights; the peer: default
  ``nn.Linear`` init) and the MLP memory's LayerNorm (ours gain and bias, the peer's gain only). Neither
  changes the work done, so neither changes the timings.

Peak memory is the tensor memory allocated during one forward+backward above what was live before
(:func:`seqzoo.eval.measure.peak_memory`; on CPU replayed from the profiler's allocation records).

On a CPU shared with other jobs, run with ``OMP_NUM_THREADS=1``: with two intra-op threads and the other
core busy, every parallel region waits for a descheduled thread, and layers that loop over chunks
(ours, the peer's ``batch_size=chunk``) slow down by up to 250× while the peer's one-shot default does
not, so the ratios measure the scheduler. ``settings`` records the thread count and the load average.
"""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seqzoo.eval.measure import peak_memory, time_call
from seqzoo.eval.report import write_report
from seqzoo.models import build_mixer
from seqzoo.ops.neural_memory import RETRIEVALS

MEMORIES = ("linear", "mlp")
PEER_BATCH_SIZES = ("chunk", "none")

NOTES = """\
Peer: `titans_pytorch.NeuralMemory(dim, chunk_size=chunk, heads=heads, dim_head=dim // heads, activation=SiLU, \
qk_rmsnorm=True, pre_rmsnorm=False, post_rmsnorm=True)`; linear memory = `model=MemoryMLP(dim_head, depth=1), \
mem_model_norm_add_residual=False`, mlp memory = its default (2-layer GELU MLP ×4 in `x + LN(MLP(x))`); \
`max_lr` = ours × dim_head / 2 (its loss is a mean over the head dim, ours ½·sum). `peer` names its `batch_size`: \
`chunk` takes gradients at each chunk's start weights like ours; `None` (its default) at the initial weights. \
Retrieval: the peer reads at chunk granularity; ours per token after the update unless `settings.retrieval` is \
`chunk`. Not matchable: the peer pools η and α per chunk (ours per token), has no q/k/v short convs and L2 q/k (RMSNorm instead), and a per-head scalar output gate (ours \
per channel). `speedup` = ours/peer fwd+bwd tokens/s (median repeats; `speedup_best`: fastest repeats), \
`mem_ratio` = ours/peer peak memory.
"""


class PeerUnavailableError(ValueError):
    """``titans_pytorch`` cannot be imported: the comparison is refused rather than run without the peer."""


def _import_peer():
    """``(NeuralMemory, MemoryMLP)`` from ``titans_pytorch`` (the ``bench`` extra); tests replace this."""
    from titans_pytorch import NeuralMemory
    from titans_pytorch.memory_models import MemoryMLP

    return NeuralMemory, MemoryMLP


def load_peer():
    """The peer classes, or :class:`PeerUnavailableError` with a one-line reason."""
    try:
        return _import_peer()
    except Exception as exc:  # not installed, a missing dependency, an incompatible version
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise PeerUnavailableError(
            f"bench titans needs titans-pytorch (pip install 'seqzoo[bench]'), which cannot be imported ({reason})"
        ) from None


def build_ours(dim: int, heads: int, chunk: int, memory: str, retrieval: str = "token") -> nn.Module:
    """Our ``titans_lmm`` mixer at width ``dim`` with ``heads`` heads of ``dim // heads``."""
    return build_mixer("titans_lmm", dim, 0, {"num_heads": heads, "chunk_size": chunk, "memory": memory, "retrieval": retrieval})


def build_peer(peer_classes, dim: int, heads: int, chunk: int, memory: str, batch_size: str, max_lr: float) -> nn.Module:
    """``NeuralMemory`` configured as close to :func:`build_ours` as its API allows (module docstring).

    ``max_lr`` is ours: the peer's MSE is a mean over ``dim_head`` (gradient ``2/dim_head`` of our
    ½‖·‖² one), so it gets ``max_lr · dim_head / 2`` for the same step.
    """
    neural_memory, memory_mlp = peer_classes
    dim_head = dim // heads
    kwargs: dict[str, Any] = {}
    if memory == "linear":
        kwargs.update(model=memory_mlp(dim_head, depth=1), mem_model_norm_add_residual=False)
    else:
        kwargs.update(default_model_kwargs={"depth": 2, "expansion_factor": 4.0}, mem_model_norm_add_residual=True)
    return neural_memory(
        dim=dim, chunk_size=chunk, batch_size=chunk if batch_size == "chunk" else None, heads=heads, dim_head=dim_head,
        activation=nn.SiLU(), qk_rmsnorm=True, pre_rmsnorm=False, post_rmsnorm=True, momentum=True,
        default_step_transform_max_lr=max_lr * dim_head / 2, per_head_learned_parameters=True, **kwargs,
    )  # fmt: skip


def _forward_backward(module: nn.Module, x: torch.Tensor, peer: bool) -> Callable[[], None]:
    def run() -> None:
        module.zero_grad(set_to_none=True)
        out = module(x)
        if peer:
            out = out[0]  # (retrieved, NeuralMemState)
        out.float().square().mean().backward()

    return run


def _check_grid(
    dims: Sequence[int],
    chunks: Sequence[int],
    seq_lens: Sequence[int],
    heads: int,
    memories: Sequence[str],
    peer_batch_sizes: Sequence[str],
) -> None:
    if heads < 1:
        raise ValueError(f"bench titans: heads must be >= 1, got {heads}")
    bad_dims = [d for d in dims if d < heads or d % heads]
    if bad_dims:
        raise ValueError(f"bench titans: every dim must be a multiple of heads ({heads}), got {bad_dims}")
    bad = [(c, s) for c in chunks for s in seq_lens if c < 1 or s < c or s % c]
    if bad:
        raise ValueError(f"bench titans: every seq_len must be a positive multiple of every chunk, got (chunk, seq) {bad}")
    for name, values, allowed in (("memory", memories, MEMORIES), ("peer batch size", peer_batch_sizes, PEER_BATCH_SIZES)):
        unknown = sorted(set(values) - set(allowed))
        if unknown or not values:
            raise ValueError(f"bench titans: {name} must be among {', '.join(allowed)}, got {list(values)}")


def bench_titans(
    out_dir: str | Path,
    dims: Sequence[int] = (64, 128, 256),
    chunks: Sequence[int] = (16, 64),
    seq_lens: Sequence[int] = (1024, 4096),
    batch: int = 1,
    heads: int = 2,
    memories: Sequence[str] = ("linear",),
    peer_batch_sizes: Sequence[str] = PEER_BATCH_SIZES,
    device: str = "cpu",
    dtype: str = "float32",
    repeats: int = 3,
    retrieval: str = "token",
) -> list[dict[str, Any]]:
    """Fwd+bwd tokens/s and peak memory of ``titans_lmm`` and ``NeuralMemory`` side by side, with ratios.

    ``retrieval`` is our mixer's: ``"token"`` (the paper's per-token reads, our default) or ``"chunk"``
    (the peer's chunk-granular reads, so that both read the same weights).

    Writes ``bench_titans.json`` (settings, notes, summary, rows with every repeat's seconds), ``bench_titans.md`` and
    ``bench_titans.png`` (speed-up against memory ratio, the target region shaded). Raises
    :class:`PeerUnavailableError` before measuring anything if ``titans_pytorch`` cannot be imported.
    """
    _check_grid(dims, chunks, seq_lens, heads, memories, peer_batch_sizes)
    if retrieval not in RETRIEVALS:
        raise ValueError(f"bench titans: retrieval must be one of {', '.join(RETRIEVALS)}, got {retrieval!r}")
    peer_classes = load_peer()
    dev, dt = torch.device(device), getattr(torch, dtype)
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    for memory in memories:
        for dim in dims:
            for chunk in chunks:
                for seq in seq_lens:
                    print(f"bench titans: memory {memory}, dim {dim}, chunk {chunk}, seq {seq}", file=sys.stderr, flush=True)
                    torch.manual_seed(0)
                    x = torch.randn(batch, seq, dim, device=dev, dtype=dt)
                    impls = {"ours": build_ours(dim, heads, chunk, memory, retrieval)}
                    for bs in peer_batch_sizes:
                        peer = build_peer(peer_classes, dim, heads, chunk, memory, bs, impls["ours"].memory.max_lr)
                        impls[f"batch_size={'chunk' if bs == 'chunk' else 'None'}"] = peer
                    runs = {name: _forward_backward(m.to(device=dev, dtype=dt), x, name != "ours") for name, m in impls.items()}
                    for run in runs.values():  # warm-up
                        run()
                    times: dict[str, list[float]] = {name: [] for name in runs}
                    for _ in range(repeats):  # interleaved: load on a shared machine hits every impl alike
                        for name, run in runs.items():
                            times[name].append(time_call(run, dev, warmup=0, repeats=1))
                    tok_s = {name: batch * seq / statistics.median(t) for name, t in times.items()}
                    peak_mb = {name: peak_memory(run, dev) / 2**20 for name, run in runs.items()}
                    for name in runs:
                        if name == "ours":
                            continue
                        speedup, mem_ratio = tok_s["ours"] / tok_s[name], peak_mb["ours"] / peak_mb[name]
                        rows.append(
                            {
                                "memory": memory,
                                "dim": dim,
                                "chunk": chunk,
                                "seq_len": seq,
                                "peer": name,
                                "ours_tok_s": tok_s["ours"],
                                "peer_tok_s": tok_s[name],
                                "speedup": speedup,
                                "speedup_best": min(times[name]) / min(times["ours"]),
                                "ours_peak_mb": peak_mb["ours"],
                                "peer_peak_mb": peak_mb[name],
                                "mem_ratio": mem_ratio,
                                "ours_times_s": times["ours"],
                                "peer_times_s": times[name],
                            }
                        )
                    del impls, runs

    # The worst case of each peer configuration and chunk size over the grid.
    summary: dict[str, dict[str, dict[str, float | int]]] = {}
    for peer in sorted({r["peer"] for r in rows}):
        for chunk in sorted({r["chunk"] for r in rows}):
            at = [r for r in rows if r["peer"] == peer and r["chunk"] == chunk]
            summary.setdefault(peer, {})[f"chunk{chunk}"] = {
                "rows": len(at),
                "min_speedup": min(r["speedup"] for r in at),
                "min_speedup_best": min(r["speedup_best"] for r in at),
                "max_mem_ratio": max(r["mem_ratio"] for r in at),
            }

    def plot(ax):
        markers = {c: m for c, m in zip(sorted(set(chunks)), "os^vD<>p")}
        colors = {p: f"C{i}" for i, p in enumerate(sorted({(r["memory"], r["peer"]) for r in rows}))}
        for key, color in colors.items():
            for chunk in sorted(set(chunks)):
                pts = [r for r in rows if (r["memory"], r["peer"]) == key and r["chunk"] == chunk]
                if pts:
                    ax.scatter(
                        [r["speedup"] for r in pts],
                        [r["mem_ratio"] for r in pts],
                        color=color,
                        marker=markers[chunk],
                        label=f"{key[0]} vs {key[1]}, chunk {chunk}",
                    )
                    for r in pts:
                        ax.annotate(
                            f"d{r['dim']}/{r['seq_len']}",
                            (r["speedup"], r["mem_ratio"]),
                            fontsize=5,
                            xytext=(2, 2),
                            textcoords="offset points",
                        )
        ax.set_xscale("log")
        ax.set_yscale("log")
        speedups, ratios = [r["speedup"] for r in rows], [r["mem_ratio"] for r in rows]
        xlim = (min(speedups + [0.5]) / 1.5, max(speedups + [2.0]) * 1.5)
        ylim = (min(ratios + [0.5]) / 1.5, max(ratios + [2.0]) * 1.5)
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        ax.axvline(1.0, color="gray", lw=0.6)
        ax.axhline(1.0, color="gray", lw=0.6)
        ax.set_xlabel("fwd+bwd speed-up, ours / titans-pytorch (median repeats)")
        ax.set_ylabel("peak memory, ours / titans-pytorch")
        ax.legend(fontsize=5)
        ax.grid(alpha=0.3, which="both")

    settings = {
        "batch": batch, "heads": heads, "dims": list(dims), "chunks": list(chunks), "seq_lens": list(seq_lens), "memories": list(memories),
        "peer_batch_sizes": list(peer_batch_sizes), "repeats": repeats, "device": device, "dtype": dtype, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "load_avg_1_5_15_min": {"start": load_before, "end": os.getloadavg()},
        "peer_version": _peer_version(), "retrieval": retrieval,
    }  # fmt: skip
    columns = [
        "memory",
        "dim",
        "chunk",
        "seq_len",
        "peer",
        "ours_tok_s",
        "peer_tok_s",
        "speedup",
        "speedup_best",
        "ours_peak_mb",
        "peer_peak_mb",
        "mem_ratio",
    ]
    paths = write_report(
        out_dir, "bench_titans", {"settings": settings, "notes": NOTES, "summary": summary}, rows, columns, plot,
        title=f"titans_lmm vs titans-pytorch NeuralMemory ({device}, {dtype}, B={batch}, H={heads})",
    )  # fmt: skip
    with open(paths["md"], "a") as f:
        f.write("\n" + NOTES)
    return rows


def _peer_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("titans-pytorch")
    except PackageNotFoundError:
        return None
