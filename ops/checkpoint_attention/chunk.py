"""Checkpoint attention in PyTorch: gathered checkpoints, the self term merged into the same softmax, chunked over queries.

A query at position ``p`` scores its own key and the checkpoints ``m < ⌊p/L⌋``; both parts share one
normaliser. Writing ``μ = max(s_self, max_m s_m)``, the output is

    o = (e^{s_self − μ} v_self + Σ_m e^{s_m − μ} v_m) / (e^{s_self − μ} + Σ_m e^{s_m − μ}),

the log-sum-exp merge of the two partial softmaxes, with ``μ`` finite for every query (its own score is
always there), so a query before the first checkpoint needs no special case and no ``−inf − (−inf)``.
A query chunk of ``C`` tokens holds a ``C × M`` score block (``M`` = checkpoints it may see), so the
whole call costs ``O(T · T/L)`` time and never more than one chunk's scores in memory; with gradients
and several chunks each chunk is recomputed in the backward (activation checkpointing), so autograd keeps
only the inputs, not the ``T × T/L`` probabilities.

Packed sequences are moved to a zero-padded batch (one row per document, checkpoints likewise) and back:
padding comes after each document, so it changes none of its outputs.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from seqzoo.ops.core import autocast_off, compute_dtype, packed_to_padded, padded_to_packed
from seqzoo.ops.utils import default_scale

# Score elements of one query chunk: 2^24 fp32 values are 64 MiB, so 32K tokens at L = 10 with 4 heads run
# in chunks of ~1K queries and a laptop never holds more than a few hundred MiB of scores.
SCORE_BUDGET = 1 << 24
MIN_QUERY_CHUNK = 64
# Queries per chunk at most: a chunk scores every checkpoint its last query sees, so shorter chunks skip more of
# the invisible (future) checkpoints. One chunk for all 4K queries at L = 10 took 4x as long as chunks of 1K
# (2-core CPU); below ~512 the per-chunk overhead starts to show.
MAX_QUERY_CHUNK = 1024


def checkpoint_offsets(offsets: list[int], segment_len: int) -> list[int]:
    """Where each packed document's checkpoints start in ``k_ckpt``: the running sum of ``⌊len_d / L⌋``, ``[num_seqs + 1]``."""
    out = [0]
    for bos, eos in zip(offsets[:-1], offsets[1:]):
        out.append(out[-1] + (eos - bos) // segment_len)
    return out


def query_chunk(batch: int, heads: int, seq: int, num_ckpt: int) -> int:
    """Queries per chunk: at most :data:`MAX_QUERY_CHUNK`, and few enough that one chunk's ``[batch, heads, chunk,
    num_ckpt]`` scores stay within :data:`SCORE_BUDGET` (never below :data:`MIN_QUERY_CHUNK`)."""
    return min(seq, MAX_QUERY_CHUNK, max(MIN_QUERY_CHUNK, SCORE_BUDGET // (batch * heads * max(1, num_ckpt))))


@autocast_off
def checkpoint_attention_block(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_ckpt: torch.Tensor,
    v_ckpt: torch.Tensor,
    *,
    segment_len: int,
    start: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Checkpoint attention of queries at positions ``start … start+T−1`` of their sequences (a dense batch).

    The building block of the PyTorch backend (one query chunk, ``start`` its first position) and of the
    layers' cached calls (a prompt continuing a cache, or one decoding step, ``start`` = tokens seen).

    Args:
        q: ``[batch, T, heads, key_dim]``; query head ``h`` reads key/value head ``h // (heads / kv_heads)``.
        k, v: ``[batch, T, kv_heads, key_dim / value_dim]``: each query's own key and value (the self term).
        k_ckpt, v_ckpt: ``[batch, M, kv_heads, ·]``: checkpoints ``0 … M−1`` of the sequence; query ``p`` sees
            those with ``m < ⌊p / L⌋`` (``M`` may exceed what any query sees; extra ones are masked).
        segment_len: ``L``.
        start: position of the first query.
        scale: score scale, ``key_dim ** -0.5`` by default.

    Returns:
        ``o [batch, T, heads, value_dim]`` in ``q.dtype`` (computed in fp32, float64 for float64 inputs).
    """
    batch, seq, heads, key_dim = q.shape
    kv_heads, num_ckpt = k.shape[2], k_ckpt.shape[1]
    group = heads // kv_heads
    acc = compute_dtype(q, k, v, k_ckpt, v_ckpt)
    scale = default_scale(scale, key_dim)
    qf = (q.to(acc) * scale).unflatten(2, (kv_heads, group))  # [B, T, Hkv, G, K]
    vf = v.to(acc).permute(0, 2, 1, 3)[:, :, None]  # [B, Hkv, 1, T, V]
    s_self = torch.einsum("btngk,btnk->bngt", qf, k.to(acc))  # [B, Hkv, G, T]
    if num_ckpt == 0:
        # No checkpoint exists yet: every query attends to itself alone, with weight softmax([s_self]) = 1. Spelled
        # as a softmax so q and k stay in the graph (with their exact zero gradient) like on every other path.
        o = torch.softmax(s_self[..., None], dim=-1) * vf
    else:
        s_ckpt = torch.einsum("btngk,bmnk->bngtm", qf, k_ckpt.to(acc))  # [B, Hkv, G, T, M]
        position = start + torch.arange(seq, device=q.device)
        visible = torch.arange(num_ckpt, device=q.device)[None, :] < torch.div(position, segment_len, rounding_mode="floor")[:, None]
        s_ckpt = s_ckpt.masked_fill(~visible, float("-inf"))
        # The shift only keeps exp() in range; the softmax does not depend on it, so it carries no gradient.
        mu = torch.maximum(s_self, s_ckpt.amax(-1)).detach()
        e_self = torch.exp(s_self - mu)
        e_ckpt = torch.exp(s_ckpt - mu[..., None])
        numerator = e_self[..., None] * vf + e_ckpt @ v_ckpt.to(acc).permute(0, 2, 1, 3)[:, :, None]
        o = numerator / (e_self + e_ckpt.sum(-1))[..., None]
    return o.permute(0, 3, 1, 2, 4).reshape(batch, seq, heads, v.shape[-1]).to(q.dtype)


def _dense(q, k, v, k_ckpt, v_ckpt, segment_len: int, scale: float, chunk: int | None) -> torch.Tensor:
    """The dense-batch path: query chunks, each against the checkpoints its last query may see."""
    batch, seq, heads, _ = q.shape
    chunk = chunk or query_chunk(batch, heads, seq, k_ckpt.shape[1])
    starts = list(range(0, seq, chunk))
    recompute = len(starts) > 1 and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, k_ckpt, v_ckpt))
    # split(), not a slice per chunk: a slice's backward writes its gradient into a zero tensor of the whole input,
    # one per chunk (that zero-filling took a third of the backward at 4K tokens); split's backward is one cat.
    pieces = []
    for i0, qc, kc, vc in zip(starts, q.split(chunk, dim=1), k.split(chunk, dim=1), v.split(chunk, dim=1)):
        i1 = i0 + qc.shape[1]
        n = min(k_ckpt.shape[1], (i1 - 1) // segment_len)  # checkpoints the chunk's last query sees
        args = (qc, kc, vc, k_ckpt[:, :n], v_ckpt[:, :n])
        kwargs = dict(segment_len=segment_len, start=i0, scale=scale)
        if recompute:
            pieces.append(checkpoint(checkpoint_attention_block, *args, use_reentrant=False, **kwargs))
        else:
            pieces.append(checkpoint_attention_block(*args, **kwargs))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


def _pad_checkpoints(x: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """Packed checkpoints ``[1, M_total, …]`` at ``offsets`` (possibly repeated: a document shorter than ``L``
    has none) → ``[num_seqs, max_count, …]``, zero-padded."""
    if offsets[-1] == 0:
        return x.new_zeros(len(offsets) - 1, 0, *x.shape[2:])
    return packed_to_padded(x, offsets)


def checkpoint_attention_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_ckpt: torch.Tensor,
    v_ckpt: torch.Tensor,
    *,
    segment_len: int,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, None]:
    """The PyTorch backend; contract as :func:`seqzoo.ops.checkpoint_attention.checkpoint_attention`.

    ``chunk_size``: queries per chunk (default: as many as fit :data:`SCORE_BUDGET`). Returns ``(o, None)``.
    """
    scale = default_scale(scale, q.shape[-1])
    if cu_seqlens is None:
        return _dense(q, k, v, k_ckpt, v_ckpt, segment_len, scale, chunk_size), None
    offsets = [int(x) for x in cu_seqlens.tolist()]
    ckpt_offsets = checkpoint_offsets(offsets, segment_len)
    rows = [packed_to_padded(t, offsets) for t in (q, k, v)]
    ckpts = [_pad_checkpoints(t, ckpt_offsets) for t in (k_ckpt, v_ckpt)]
    o = _dense(*rows, *ckpts, segment_len, scale, chunk_size)
    return padded_to_packed(o, offsets), None
