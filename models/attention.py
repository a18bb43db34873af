"""Softmax attention: causal, RoPE, optional sliding window and grouped KV heads, with a KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from seqzoo.models.base import TokenMixer, check_hidden
from seqzoo.models.cache import LayerCache
from seqzoo.models.modules import RotaryEmbedding
from seqzoo.models.registry import ConfigError, register_mixer


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
        rope_theta: RoPE base; ``None`` disables RoPE.
        dropout: attention-probability dropout during training.
        qkv_bias: biases on the q/k/v projections.

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
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = hidden_size // num_heads if head_dim is None else head_dim
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ConfigError(f"attention: num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads}), both >= 1")
        if head_dim < 1:
            raise ConfigError(f"attention: head_dim must be >= 1, got {head_dim}")
        if window_size is not None and window_size < 1:
            raise ConfigError(f"attention: window_size must be >= 1 or null, got {window_size}")
        self.hidden_size, self.layer_idx = hidden_size, layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.window_size = window_size
        self.dropout = dropout
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.rotary = RotaryEmbedding(head_dim, rope_theta) if rope_theta is not None else None

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """``x: [batch, seq, hidden] -> [batch, seq, hidden]``; with ``cache``, continue after its tokens."""
        check_hidden("attention", x, self.hidden_size)
        offset = cache.seen_tokens if cache is not None else 0
        q = rearrange(self.q_proj(x), "b t (h d) -> b t h d", d=self.head_dim)
        k = rearrange(self.k_proj(x), "b t (h d) -> b t h d", d=self.head_dim)
        v = rearrange(self.v_proj(x), "b t (h d) -> b t h d", d=self.head_dim)
        if self.rotary is not None:
            q, k = self.rotary(q, offset), self.rotary(k, offset)
        past = 0
        if cache is not None and cache.get("key") is not None:
            past = cache.get("key").shape[1]
            k = torch.cat([cache.get("key"), k], dim=1)
            v = torch.cat([cache.get("value"), v], dim=1)
        mask = self._mask(x.shape[1], past, offset, x.device)
        o = F.scaled_dot_product_attention(
            rearrange(q, "b t h d -> b h t d"),
            rearrange(k, "b t h d -> b h t d"),
            rearrange(v, "b t h d -> b h t d"),
            attn_mask=mask,
            is_causal=mask is None and past == 0 and x.shape[1] > 1,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        if cache is not None:
            keep = k.shape[1] if self.window_size is None else min(k.shape[1], self.window_size - 1)
            cache.set("key", k[:, k.shape[1] - keep :])
            cache.set("value", v[:, v.shape[1] - keep :])
            cache.seen_tokens += x.shape[1]
        return self.o_proj(rearrange(o, "b h t d -> b t (h d)"))

    def _mask(self, num_queries: int, past: int, offset: int, device: torch.device) -> torch.Tensor | None:
        """Boolean ``[queries, keys]`` mask (True = attend), or ``None`` when plain causal masking suffices."""
        if self.window_size is None and (past == 0 or num_queries == 1):
            return None
        q_pos = torch.arange(offset, offset + num_queries, device=device)
        k_pos = torch.arange(offset - past, offset + num_queries, device=device)
        delta = q_pos[:, None] - k_pos[None, :]
        mask = delta >= 0
        if self.window_size is not None:
            mask &= delta < self.window_size
        return mask

    def state_size(self, batch: int = 1, seq_len: int | None = None) -> int:
        """Bytes of the KV cache after ``seq_len`` tokens (the window caps it for sliding attention)."""
        if seq_len is None:
            raise ValueError("attention: state_size needs seq_len (the KV cache grows with the prompt)")
        held = seq_len if self.window_size is None else min(seq_len, self.window_size - 1)
        return 2 * batch * held * self.num_kv_heads * self.head_dim * self.k_proj.weight.element_size()
