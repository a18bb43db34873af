"""Checkpoint attention as one masked softmax over the full key set: the test oracle, written for clarity not speed."""

from __future__ import annotations

import torch

from seqzoo.ops.core import compute_dtype
from seqzoo.ops.utils import default_scale


def checkpoint_mask(seq: int, num_ckpt: int, segment_len: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean ``[seq, num_ckpt + seq]`` mask of one sequence (True = attend) over the keys ``[checkpoints ‖ tokens]``.

    Query ``i`` sees checkpoint ``m`` iff segment ``m`` (positions ``mL … mL+L−1``) ended strictly before it,
    ``(m + 1)·L <= i``, and among the tokens only itself.
    """
    i = torch.arange(seq, device=device)[:, None]
    m = torch.arange(num_ckpt, device=device)[None, :]
    ckpt = (m + 1) * segment_len <= i
    own = torch.arange(seq, device=device)[None, :] == i
    return torch.cat([ckpt, own], dim=1)


def _one_sequence(q, k, v, k_ckpt, v_ckpt, segment_len: int, scale: float) -> torch.Tensor:
    """``q [T, H, K]``, ``k [T, Hkv, K]``, ``v [T, Hkv, V]``, checkpoints ``[M, Hkv, ·]`` → ``o [T, H, V]``."""
    group = q.shape[1] // k.shape[1]
    keys = torch.cat([k_ckpt, k]).repeat_interleave(group, dim=1)  # query head h reads kv head h // group
    values = torch.cat([v_ckpt, v]).repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,jhd->htj", q, keys) * scale
    mask = checkpoint_mask(q.shape[0], k_ckpt.shape[0], segment_len, q.device)
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("htj,jhd->thd", weights, values)


def checkpoint_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_ckpt: torch.Tensor,
    v_ckpt: torch.Tensor,
    *,
    segment_len: int,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, None]:
    """Materialise every sequence's masked ``[seq, num_ckpt + seq]`` score matrix and take one softmax per row.

    Shapes and contract as :func:`seqzoo.ops.checkpoint_attention.checkpoint_attention`; computes in fp32
    (float64 for float64 inputs) and returns ``(o [batch, seq, heads, value_dim] in q.dtype, None)``.
    """
    out_dtype, acc = q.dtype, compute_dtype(q, k, v, k_ckpt, v_ckpt)
    scale = default_scale(scale, q.shape[-1])
    q, k, v, k_ckpt, v_ckpt = (t.to(acc) for t in (q, k, v, k_ckpt, v_ckpt))
    if cu_seqlens is None:
        o = torch.stack([_one_sequence(q[b], k[b], v[b], k_ckpt[b], v_ckpt[b], segment_len, scale) for b in range(q.shape[0])])
        return o.to(out_dtype), None
    offsets = [int(x) for x in cu_seqlens.tolist()]
    pieces, first = [], 0
    for bos, eos in zip(offsets[:-1], offsets[1:]):
        count = (eos - bos) // segment_len  # each document's own complete segments, packed in order
        ckpts = slice(first, first + count)
        pieces.append(_one_sequence(q[0, bos:eos], k[0, bos:eos], v[0, bos:eos], k_ckpt[0, ckpts], v_ckpt[0, ckpts], segment_len, scale))
        first += count
    return torch.cat(pieces)[None].to(out_dtype), None
