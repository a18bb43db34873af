"""Checkpoint attention as a layer: what SCOUT and RAT share around :func:`seqzoo.ops.checkpoint_attention`.

Both cut each document into segments of ``L`` tokens (positions ``mL … mL+L−1`` of the document, so segments
restart at every packed document and keep their phase across cached calls) and let every token attend, in
one softmax, to itself and to one checkpoint per segment completed before it. This module holds

* the segment bookkeeping: which tokens of a call end a segment (:func:`segment_ends`), their positions
  (:func:`segment_end_positions`), and the softmax-weighted pooling of a segment's tokens with a summary of
  the part of the segment that earlier calls saw (:func:`pool_segments`);
* :func:`attend_checkpoints`: the op for fresh sequences, or, continuing a cache, the same computation for
  queries that start at the cache's position, with the cache's checkpoint list extended;
* :class:`CheckpointAttention`, SCOUT's sub-layer: q/k/v projections, RoPE on q and k before the checkpoints
  are chosen, a pluggable compression (``stride`` / ``mean`` / ``gated``), the op and an output projection.

The decode state grows as ``T / L``: one key and value per completed segment (plus, for ``mean`` and
``gated``, a fixed-size summary of the segment in progress).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from seqzoo.configs import ConfigError
from seqzoo.models.base import Call, StateShapes, head_dim_for, op_backend
from seqzoo.models.cache import LayerCache
from seqzoo.models.modules import RotaryEmbedding, upcast
from seqzoo.ops import checkpoint_attention
from seqzoo.ops.checkpoint_attention import BACKENDS as CHECKPOINT_BACKENDS
from seqzoo.ops.checkpoint_attention import checkpoint_attention_block

COMPRESSIONS = ("stride", "mean", "gated")


def _host_segments(call: Call, segment_len: int) -> list[tuple[int, int]]:
    """Packed call: ``(first token, count)`` of every document's complete segments, in document order."""
    return [(bos, (eos - bos) // segment_len) for bos, eos in zip(call.offsets[:-1], call.offsets[1:])]


def segment_ends(x: torch.Tensor, call: Call, segment_len: int) -> torch.Tensor:
    """The tokens of ``x [batch, seq, …]`` that complete a segment (document position ``(m+1)·L − 1``), in order.

    A dense call (all rows at position ``start``) takes every ``L``-th token from the first segment end at or
    after ``start``; a packed call (documents from position 0) each document's, packed in document order, as
    :func:`seqzoo.ops.checkpoint_attention` expects them.
    """
    if call.packed:
        index = [bos + (m + 1) * segment_len - 1 for bos, count in _host_segments(call, segment_len) for m in range(count)]
        return x[:, torch.tensor(index, dtype=torch.long, device=x.device)]
    start = call.start[0]
    return x[:, segment_len - 1 - start % segment_len :: segment_len]


def segment_end_positions(call: Call, segment_len: int, device: torch.device) -> torch.Tensor:
    """Document positions ``[1, S]`` of the segment ends :func:`segment_ends` picks (the checkpoints' RoPE positions)."""
    if call.packed:
        ends = [(m + 1) * segment_len - 1 for _, count in _host_segments(call, segment_len) for m in range(count)]
        return torch.tensor(ends, dtype=torch.long, device=device)[None]
    start, seq = call.start[0], call.seq
    first = start // segment_len  # index of the first segment that can end in this call
    count = (start + seq) // segment_len - first
    return ((first + 1 + torch.arange(count, device=device)) * segment_len - 1)[None]


class SegmentSummary:
    """The part of the segment in progress that a cached call has seen, as one softmax-pooled entry.

    Pooling with softmax weights is associative: a group of tokens with logits ``w_j`` acts in a later pool
    exactly as one entry with logit ``logsumexp_j w_j`` and value the group's weighted mean. So the cache keeps,
    per row and KV head, the weighted means of the keys (``key``) and values (``value``) and the log total
    weight (``weight``; ``log n`` for the plain mean) of the tokens so far, whatever their number.
    """

    def __init__(self, key: torch.Tensor, value: torch.Tensor, weight: torch.Tensor) -> None:
        self.key, self.value, self.weight = key, value, weight  # [B, H, D], [B, H, Dv], [B, H]


def pool_segments(
    k: torch.Tensor, v: torch.Tensor, logits: torch.Tensor, call: Call, segment_len: int, carry: SegmentSummary | None = None
) -> tuple[torch.Tensor, torch.Tensor, SegmentSummary | None]:
    """Softmax-pool each segment's keys and values with ``logits`` (all zero: the plain mean).

    Args:
        k: ``[batch, seq, heads, key_dim]`` (before RoPE), v: ``[batch, seq, heads, value_dim]``.
        logits: ``[batch, seq, heads]`` pooling logits.
        call: the layout: packed documents from position 0, or a dense batch at position ``call.start[0]``.
        carry: the summary of the segment in progress before this call (a dense call that starts inside a
            segment); ``None`` otherwise.

    Returns:
        ``(k_ckpt, v_ckpt, partial)``: the pooled keys and values of every segment that completes in this call,
        ``[batch, S, heads, ·]`` in order (packed: per document), and the summary of the segment still in
        progress at the end of a dense call (``None`` when the call ends on a segment boundary, and for packed
        calls, which are never continued). Computed in fp32 (float64 for float64 inputs).
    """
    k, v, logits = upcast(k), upcast(v), upcast(logits)
    L = segment_len
    if call.packed:
        rows = [bos + m * L for bos, count in _host_segments(call, L) for m in range(count)]
        index = torch.tensor(rows, dtype=torch.long, device=k.device)[:, None] + torch.arange(L, device=k.device)  # [S, L]
        weights = torch.softmax(logits[:, index], dim=2)  # [1, S, L, H]
        return torch.einsum("bslh,bslhd->bshd", weights, k[:, index]), torch.einsum("bslh,bslhd->bshd", weights, v[:, index]), None
    start, seq = call.start[0], k.shape[1]
    lead = start % L  # tokens of the first segment seen by earlier calls
    segments = -(-(lead + seq) // L)
    tail = segments * L - lead - seq
    # The call laid out on the segment grid: ``lead`` empty slots in front, the last segment padded at the end.
    grid_k = F.pad(k, (0, 0, 0, 0, lead, tail)).unflatten(1, (segments, L))
    grid_v = F.pad(v, (0, 0, 0, 0, lead, tail)).unflatten(1, (segments, L))
    grid_w = F.pad(logits, (0, 0, lead, tail), value=float("-inf")).unflatten(1, (segments, L))
    if lead:
        # One more slot per segment, used only by the first: the earlier part of that segment as one entry.
        def slot(first: torch.Tensor, empty: float) -> torch.Tensor:
            rest = first.new_full((first.shape[0], segments - 1, *first.shape[1:]), empty)
            return torch.cat([first[:, None], rest], dim=1)[:, :, None]

        grid_k = torch.cat([slot(carry.key.to(k.dtype), 0.0), grid_k], dim=2)
        grid_v = torch.cat([slot(carry.value.to(v.dtype), 0.0), grid_v], dim=2)
        grid_w = torch.cat([slot(carry.weight.to(logits.dtype), float("-inf")), grid_w], dim=2)
    # Every segment has at least one real slot (its carry or a token), so no softmax row is all -inf.
    weights = torch.softmax(grid_w, dim=2)
    pooled_k = torch.einsum("bslh,bslhd->bshd", weights, grid_k)
    pooled_v = torch.einsum("bslh,bslhd->bshd", weights, grid_v)
    complete = (lead + seq) // L
    partial = None
    if complete < segments:
        partial = SegmentSummary(pooled_k[:, complete], pooled_v[:, complete], torch.logsumexp(grid_w[:, complete], dim=1))
    return pooled_k[:, :complete], pooled_v[:, :complete], partial


def attend_checkpoints(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_ckpt: torch.Tensor,
    v_ckpt: torch.Tensor,
    cache: LayerCache | None,
    call: Call,
    segment_len: int,
    backend: str,
) -> torch.Tensor:
    """Checkpoint attention of this call's queries; with ``cache``, over the cached checkpoints too.

    ``q [batch, seq, heads, d]``, ``k, v [batch, seq, kv_heads, ·]`` (self terms), ``k_ckpt, v_ckpt`` the
    checkpoints of the segments that complete in this call. Without a cache this is the op (packed documents
    via ``call.cu_seqlens``). With one (a dense call at position ``s``: layers with a checkpoint list run
    ragged caches row by row), the new checkpoints are appended to the cache's ``key``/``value``
    ``[batch, ⌊(s + seq)/L⌋, kv_heads, ·]`` and the queries attend from position ``s`` on: the op itself for a
    fresh cache, its PyTorch building block (queries not starting at 0) otherwise.
    Returns ``o [batch, seq, heads, value_dim]``.
    """
    if cache is not None:
        past_k, past_v = cache.get("key"), cache.get("value")
        if past_k is not None:
            k_ckpt = torch.cat([past_k, k_ckpt.to(past_k.dtype)], dim=1)
            v_ckpt = torch.cat([past_v, v_ckpt.to(past_v.dtype)], dim=1)
        cache.set("key", k_ckpt)
        cache.set("value", v_ckpt)
        start = call.start[0]
        if start > 0:
            return checkpoint_attention_block(q, k, v, k_ckpt.to(k.dtype), v_ckpt.to(v.dtype), segment_len=segment_len, start=start)
    return checkpoint_attention(
        q, k, v, k_ckpt.to(k.dtype), v_ckpt.to(v.dtype), segment_len=segment_len, cu_seqlens=call.cu_seqlens, backend=backend
    )[0]


def checkpoint_state_shapes(
    layer: str, seq_len: int | None, segment_len: int, kv_heads: int, key_dim: int, value_dim: int, dtype: torch.dtype
) -> StateShapes:
    """The checkpoint list after ``seq_len`` tokens: ``⌊seq_len / L⌋`` keys and values (it grows with the prompt)."""
    if seq_len is None:
        raise ValueError(f"{layer}: state_size needs seq_len (the checkpoint cache grows as seq_len / segment_len)")
    n = seq_len // segment_len
    return {"key": ((n, kv_heads, key_dim), dtype), "value": ((n, kv_heads, value_dim), dtype)}


class CheckpointAttention(nn.Module):
    """SCOUT's checkpoint-attention sub-layer: each token attends to itself and one checkpoint per completed segment.

    ``q, k, v`` are linear projections of the input; RoPE rotates ``q`` and ``k`` at their document positions
    *before* the checkpoints are made, so a checkpoint keeps the absolute position of its segment's last token.
    The compression decides what a checkpoint is:

    * ``stride`` (the SCOUT code): the segment's last token's ``k`` and ``v``, i.e. a token that the mixer and
      MLP before this sub-layer have already enriched with its segment's context;
    * ``mean``: the mean of the segment's keys and values;
    * ``gated``: a learned softmax-weighted pool, weights ``softmax_j(x_j · w_h + b_h)`` within the segment, one
      set per KV head.

    The pools take the keys before RoPE and rotate the pooled key at the segment's last position, so that every
    checkpoint has one position, the same as ``stride``'s (a mean of keys rotated at different positions
    would wash out the fast RoPE frequencies).

    Args:
        hidden_size: model width.
        num_heads: query heads. num_kv_heads: key/value heads (divides ``num_heads``; default ``num_heads``).
        head_dim: per-head width (default ``hidden_size // num_heads``).
        segment_len: ``L``, tokens per segment.
        compression: ``"stride"``, ``"mean"`` or ``"gated"``.
        rope_theta: RoPE base; ``None`` disables RoPE.
        backend: the op's backend (``auto | reference | torch | triton``).
        layer: the owning mixer's name, for errors.

    Cache (``LayerCache`` entries, per row): ``key``/``value`` ``[⌊n/L⌋, kv_heads, head_dim]`` (keys after RoPE);
    for ``mean``/``gated`` also the :class:`SegmentSummary` of the segment in progress, ``pool_key``,
    ``pool_value`` ``[kv_heads, head_dim]`` and ``pool_weight`` ``[kv_heads]`` (fp32).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        segment_len: int = 10,
        compression: str = "stride",
        rope_theta: float | None = 10000.0,
        backend: str = "auto",
        layer: str = "checkpoint_attention",
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = head_dim_for(layer, hidden_size, num_heads, head_dim)
        if not isinstance(num_kv_heads, int) or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ConfigError(f"{layer}: num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
        if isinstance(segment_len, bool) or not isinstance(segment_len, int) or segment_len < 1:
            raise ConfigError(f"{layer}: segment_len must be an integer >= 1, got {segment_len!r}")
        if compression not in COMPRESSIONS:
            raise ConfigError(f"{layer}: compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
        if rope_theta is not None and head_dim % 2:
            raise ConfigError(f"{layer}: RoPE needs an even head_dim, got {head_dim}")
        self.backend = op_backend(layer, "checkpoint_attention", backend, CHECKPOINT_BACKENDS)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.segment_len, self.compression = segment_len, compression
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.pool_proj = nn.Linear(hidden_size, num_kv_heads) if compression == "gated" else None
        self.rotary = RotaryEmbedding(head_dim, rope_theta) if rope_theta is not None else None

    def _rotate(self, x: torch.Tensor, positions: int | torch.Tensor) -> torch.Tensor:
        return x if self.rotary is None else self.rotary(x, positions)

    def forward(self, x: torch.Tensor, cache: LayerCache | None, call: Call) -> torch.Tensor:
        """``x: [batch, seq, hidden] -> [batch, seq, hidden]`` laid out as ``call`` says; reads and extends ``cache``."""
        split = lambda t: rearrange(t, "b t (h d) -> b t h d", d=self.head_dim)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        # A dense call has one start for all rows (an int keeps the compiled graph free of position tensors).
        positions = call.positions(x.device) if call.packed else call.start[0]
        q, k_rot = self._rotate(q, positions), self._rotate(k, positions)
        L = self.segment_len
        if self.compression == "stride":
            k_ckpt, v_ckpt = segment_ends(k_rot, call, L), segment_ends(v, call, L)
        else:
            if self.pool_proj is None:
                logits = x.new_zeros(*x.shape[:2], self.num_kv_heads, dtype=upcast(x).dtype)
            else:
                logits = upcast(self.pool_proj(x))
            carry = None
            if cache is not None and call.start[0] % L:
                carry = SegmentSummary(cache.get("pool_key"), cache.get("pool_value"), cache.get("pool_weight"))
            k_ckpt, v_ckpt, partial = pool_segments(k, v, logits, call, L, carry)
            k_ckpt = self._rotate(k_ckpt.to(k.dtype), segment_end_positions(call, L, x.device)).to(k.dtype)
            v_ckpt = v_ckpt.to(v.dtype)
            if cache is not None:
                self._save_partial(cache, partial, x.shape[0])
        o = attend_checkpoints(q, k_rot, v, k_ckpt, v_ckpt, cache, call, L, self.backend)
        return self.o_proj(rearrange(o, "b t h d -> b t (h d)"))

    def _save_partial(self, cache: LayerCache, partial: SegmentSummary | None, batch: int) -> None:
        """Store the summary of the segment in progress (zeros when the call ended on a boundary: never read)."""
        dtype = self.state_dtype()
        if partial is None:
            w = self.k_proj.weight
            partial = SegmentSummary(
                w.new_zeros(batch, self.num_kv_heads, self.head_dim),
                w.new_zeros(batch, self.num_kv_heads, self.head_dim),
                w.new_zeros(batch, self.num_kv_heads),
            )
        cache.set("pool_key", partial.key.to(dtype))
        cache.set("pool_value", partial.value.to(dtype))
        cache.set("pool_weight", partial.weight.to(dtype))

    def state_dtype(self) -> torch.dtype:
        """fp32, or fp64 for a float64 layer (exact tests)."""
        return torch.float64 if self.q_proj.weight.dtype == torch.float64 else torch.float32

    def state_shapes(self, seq_len: int | None, layer: str = "checkpoint_attention") -> StateShapes:
        """The cache after ``seq_len`` tokens: ``⌊seq_len / L⌋`` checkpoints, plus the segment summary of a pool."""
        shapes = checkpoint_state_shapes(
            layer, seq_len, self.segment_len, self.num_kv_heads, self.head_dim, self.head_dim, self.k_proj.weight.dtype
        )
        if self.compression != "stride":
            dtype = self.state_dtype()
            shapes["pool_key"] = ((self.num_kv_heads, self.head_dim), dtype)
            shapes["pool_value"] = ((self.num_kv_heads, self.head_dim), dtype)
            shapes["pool_weight"] = ((self.num_kv_heads,), dtype)
        return shapes
