"""Softmax attention: causal, RoPE, optional sliding window, grouped KV heads and learned persistent K/V, with a KV cache.

The mask (:func:`causal_mask`) and the SDPA call with persistent slots (:func:`persistent_attention`) are
module-level so that layers with their own context layout (``titans_mac``) share them with :class:`Attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from seqzoo.configs import ConfigError
from seqzoo.models.base import Call, StateShapes, TokenMixer, head_dim_for
from seqzoo.models.cache import LayerCache
from seqzoo.models.modules import RotaryEmbedding
from seqzoo.models.registry import register_mixer
from seqzoo.ops.core import packed_to_padded, padded_to_packed


def causal_mask(num_queries: int, past: int, window_size: int | None = None, device: torch.device | None = None) -> torch.Tensor:
    """Boolean ``[num_queries, past + num_queries]`` mask (True = attend) for queries that follow ``past`` keys.

    Query ``i`` sits at key position ``past + i`` and sees key ``j`` iff ``0 <= past + i − j < window_size``
    (no upper bound when ``window_size`` is ``None``). Only relative positions matter, so the absolute
    offset of the first query is not an argument.
    """
    delta = torch.arange(past, past + num_queries, device=device)[:, None] - torch.arange(past + num_queries, device=device)[None, :]
    mask = delta >= 0
    if window_size is not None:
        mask &= delta < window_size
    return mask


def persistent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    persistent: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Softmax attention through ``scaled_dot_product_attention``, with learned persistent K/V seen by every query.

    Args:
        q: ``[batch, n, heads, d]`` queries.
        k, v: ``[batch, L, kv_heads, d]`` keys and values; ``kv_heads`` divides ``heads`` (grouped-query).
        mask: ``[n, L]`` or per row ``[batch, n, L]`` boolean (True = attend), or ``None`` for no mask (or SDPA's
            own causal mask).
        persistent: ``[2, kv_heads, P, d]`` persistent keys then values, prepended to ``k``/``v`` and
            visible to every query; ``None`` or ``P = 0`` for none.
        is_causal: with ``mask=None`` and ``L = n``, query ``i`` sees keys ``j <= i``; SDPA's own causal flag
            (no mask tensor) lets it pick a fused kernel.
        dropout_p: attention-probability dropout.

    Returns:
        ``[batch, n, heads·d]``.
    """
    batch, n = q.shape[:2]
    grouped = q.shape[2] != k.shape[2]
    k, v = rearrange(k, "b l h d -> b h l d"), rearrange(v, "b l h d -> b h l d")
    if persistent is not None and persistent.shape[2]:
        num_p = persistent.shape[2]
        if is_causal:  # SDPA's causal flag would mask the prepended slots too; spell the mask out instead
            mask, is_causal = causal_mask(n, k.shape[2] - n, device=q.device), False
        pk, pv = (p.to(q.dtype).expand(batch, -1, -1, -1) for p in persistent)
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        if mask is not None:
            mask = torch.cat([mask.new_ones(*mask.shape[:-1], num_p), mask], dim=-1)
    if mask is not None and mask.dim() == 3:  # one mask per row: broadcast over the heads
        mask = mask[:, None]
    o = F.scaled_dot_product_attention(
        rearrange(q, "b n h d -> b h n d"),
        k,
        v,
        attn_mask=mask,
        is_causal=is_causal,
        dropout_p=dropout_p,
        enable_gqa=grouped,
    )
    return rearrange(o, "b h n d -> b n (h d)")


@register_mixer("attention")
class Attention(TokenMixer):
    """Multi-head causal softmax attention through ``scaled_dot_product_attention``.

    Args:
        hidden_size: model width.
        layer_idx: position in the stack (unused; part of the mixer contract).
        num_heads: query heads. Default: 1 (Zoology's MQAR attention).
        num_kv_heads: key/value heads (grouped-query attention); must divide ``num_heads``. Default: ``num_heads``.
        head_dim: per-head width. Default: ``hidden_size // num_heads``.
        window_size: if set, each query sees only the ``window_size`` most recent positions (itself
            included) and the decode cache keeps just the last ``window_size - 1`` keys and values.
        rope_theta: RoPE base; ``None`` disables RoPE (which needs an even ``head_dim``).
        dropout: attention-probability dropout during training.
        qkv_bias: biases on the q/k/v projections.
        num_persistent: learned persistent K/V slots per KV head, visible to every query and never
            windowed out (Titans' persistent memory, ``docs/titans.md``); parameter ``persistent``
            ``[2, num_kv_heads, num_persistent, head_dim]``, zero-initialised. Default: 0 (none).
        project_output: apply the output projection ``o_proj``; ``False`` (for use inside another layer
            that projects itself) returns ``[batch, seq, num_heads·head_dim]``. Default: True.

    Cache: ``key``/``value`` ``[batch, cached, num_kv_heads, head_dim]`` (after RoPE).
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int = 0,
        num_heads: int = 1,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        window_size: int | None = None,
        rope_theta: float | None = 10000.0,
        dropout: float = 0.0,
        qkv_bias: bool = False,
        num_persistent: int = 0,
        project_output: bool = True,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = head_dim_for("attention", hidden_size, num_heads, head_dim)
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ConfigError(f"attention: num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads}), both >= 1")
        if head_dim < 1:
            raise ConfigError(f"attention: head_dim must be >= 1, got {head_dim}")
        if rope_theta is not None and head_dim % 2:
            raise ConfigError(f"attention: RoPE needs an even head_dim, got {head_dim}")
        if window_size is not None and window_size < 1:
            raise ConfigError(f"attention: window_size must be >= 1 or null, got {window_size}")
        if num_persistent < 0:
            raise ConfigError(f"attention: num_persistent must be >= 0, got {num_persistent}")
        self.hidden_size, self.layer_idx = hidden_size, layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.window_size = window_size
        self.dropout = dropout
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False) if project_output else None
        self.rotary = RotaryEmbedding(head_dim, rope_theta) if rope_theta is not None else None
        # Only created when used, so plain attention keeps its state_dict keys. Zero-initialised like
        # titans-pytorch: a fresh persistent slot is a neutral attention sink (score 0, value 0).
        self.persistent = nn.Parameter(torch.zeros(2, num_kv_heads, num_persistent, head_dim)) if num_persistent else None

    def attend(
        self,
        x: torch.Tensor,
        call: Call,
        past_key: torch.Tensor | None = None,
        past_value: torch.Tensor | None = None,
        cached: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attention of new tokens over the past keys/values and themselves, before the output projection.

        Args:
            x: ``[batch, seq, hidden]`` new tokens, laid out as ``call`` says (a dense batch, or documents
                packed along ``seq``; each document attends only to itself, its RoPE positions restart at 0).
            call: the layout, and each row's tokens seen before (``call.start``).
            past_key, past_value: ``[rows, L, num_kv_heads, head_dim]`` (after RoPE): each row's last
                ``min(seen, window_size − 1)`` keys (all seen keys without a window), right-aligned, so a
                row that has seen fewer has left padding. ``None``: nothing before.
            cached: the caller keeps the returned keys and values (a decode cache); without it a packed call
                returns none.

        Returns:
            ``(o [batch, seq, num_heads·head_dim], key, value)``: ``key``/``value`` ``[rows, kept, …]`` are what a
            decode cache keeps for the next call, right-aligned the same way.
        """
        q = rearrange(self.q_proj(x), "b t (h d) -> b t h d", d=self.head_dim)
        k = rearrange(self.k_proj(x), "b t (h d) -> b t h d", d=self.head_dim)
        v = rearrange(self.v_proj(x), "b t (h d) -> b t h d", d=self.head_dim)
        if self.rotary is not None:
            positions = call.positions(x.device) if call.uniform_start is None or call.packed else call.uniform_start
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        dropout = self.dropout if self.training else 0.0
        if call.packed and not cached:
            # Training on packed documents. Either the documents as a right-padded batch with the plain causal
            # (windowed) mask: padding sits after every real query, so it is never attended, and SDPA may take a
            # fused kernel; or one block-diagonal mask over the whole row. The first costs num_docs·longest², the
            # second seq²: take the cheaper.
            lengths = call.lengths
            if len(lengths) * max(lengths) ** 2 <= call.seq**2:
                rows = [packed_to_padded(t, call.offsets) for t in (q, k, v)]
                mask = None if self.window_size is None else causal_mask(max(lengths), 0, self.window_size, x.device)
                o = persistent_attention(*rows, mask, self.persistent, is_causal=mask is None and max(lengths) > 1, dropout_p=dropout)
                return padded_to_packed(o, call.offsets), k[:, :0], v[:, :0]
            doc = call.sequence_ids(x.device)
            mask = (doc[:, None] == doc[None, :]) & causal_mask(call.seq, 0, self.window_size, x.device)
            o = persistent_attention(q, k, v, mask, self.persistent, dropout_p=dropout)
            return o, k[:, :0], v[:, :0]
        if call.packed:
            # A packed prefill continuing a cache: the documents as a right-padded batch, one per cache row.
            rows = [packed_to_padded(t, call.offsets) for t in (q, k, v)]
            o, key, value = self._attend_rows(*rows, call, past_key, past_value, dropout)
            return padded_to_packed(o, call.offsets), key, value
        return self._attend_rows(q, k, v, call, past_key, past_value, dropout)

    def _attend_rows(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        call: Call,
        past_key: torch.Tensor | None,
        past_value: torch.Tensor | None,
        dropout: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`attend` for rows ``[rows, T, heads, d]`` whose first ``call.lengths[r]`` tokens are real."""
        rows, num_queries = q.shape[:2]
        lengths, seen = call.lengths, call.start
        window = self.window_size
        held = [s if window is None else min(s, window - 1) for s in seen]
        past = 0 if past_key is None else past_key.shape[1]
        if past:
            k, v = torch.cat([past_key, k], dim=1), torch.cat([past_value, v], dim=1)
        uniform = len(set(held)) == 1 and len(set(lengths)) == 1 and lengths[0] == num_queries
        if uniform:
            # Every row alike (training, a plain prefill, decoding prompts of equal length): one shared mask,
            # and none at all for a fresh causal block without a window, so SDPA may take a fused kernel.
            mask = None
            if window is not None or (past > 0 and num_queries > 1):
                mask = causal_mask(num_queries, past, window, q.device)
            o = persistent_attention(
                q, k, v, mask, self.persistent, is_causal=mask is None and past == 0 and num_queries > 1, dropout_p=dropout
            )
            keep = k.shape[1] if window is None else min(k.shape[1], window - 1)
            return o, k[:, k.shape[1] - keep :], v[:, v.shape[1] - keep :]
        # Rows at different positions: key j of row r is real if it is one of the row's held past keys (the
        # last held[r] of the past block) or one of its own new tokens; its position follows from that.
        device = q.device
        j = torch.arange(past + num_queries, device=device)
        held_t = torch.tensor(held, device=device)[:, None]
        seen_t = torch.tensor(seen, device=device)[:, None]
        len_t = torch.tensor(lengths, device=device)[:, None]
        real = torch.where(j < past, j >= past - held_t, j - past < len_t)  # [rows, keys]
        key_pos = torch.where(j < past, seen_t - past + j, seen_t + j - past)
        query_pos = seen_t + torch.arange(num_queries, device=device)  # [rows, queries]
        delta = query_pos[:, :, None] - key_pos[:, None, :]
        mask = real[:, None, :] & (delta >= 0)
        if window is not None:
            mask &= delta < window
        # Padding queries (beyond a row's length) see every key: their outputs are dropped, but a query with no
        # key at all would make NaN.
        mask |= (torch.arange(num_queries, device=device)[None, :] >= len_t)[..., None]
        o = persistent_attention(q, k, v, mask, self.persistent, dropout_p=dropout)
        # The cache keeps each row's last kept keys, right-aligned (left padding for shorter rows).
        kept = [h + n if window is None else min(h + n, window - 1) for h, n in zip(held, lengths)]
        width = max(kept)
        last = past + len_t - 1  # index of each row's last real key
        index = (last - width + 1 + torch.arange(width, device=device)[None, :]).clamp_min(0)
        pad = torch.arange(width, device=device)[None, :] < (width - torch.tensor(kept, device=device)[:, None])
        gather = index[..., None, None].expand(-1, -1, *k.shape[2:])
        key = torch.gather(k, 1, gather).masked_fill(pad[..., None, None], 0.0)
        value = torch.gather(v, 1, gather).masked_fill(pad[..., None, None], 0.0)
        return o, key, value

    def mix(self, x: torch.Tensor, cache: LayerCache | None, call: Call) -> torch.Tensor:
        """``x: [batch, seq, hidden] -> [batch, seq, hidden]`` (``num_heads·head_dim`` without ``o_proj``)."""
        if cache is None:
            o = self.attend(x, call)[0]
        else:
            o, key, value = self.attend(x, call, cache.get("key"), cache.get("value"), cached=True)
            cache.set("key", key)
            cache.set("value", value)
        return o if self.o_proj is None else self.o_proj(o)

    def state_shapes(self, seq_len: int | None = None) -> StateShapes:
        """The KV cache after ``seq_len`` tokens (the window caps it); ``None``: the most it ever holds, which
        needs a window."""
        if seq_len is None and self.window_size is None:
            raise ValueError("attention: state_size needs seq_len without a window (the KV cache grows with the prompt)")
        held = self.window_size - 1 if seq_len is None else seq_len if self.window_size is None else min(seq_len, self.window_size - 1)
        shape = (held, self.num_kv_heads, self.head_dim)
        return {"key": (shape, self.k_proj.weight.dtype), "value": (shape, self.k_proj.weight.dtype)}
