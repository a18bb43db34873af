"""RetNet's multi-scale retention (Sun et al. 2023): fixed per-head decays, RoPE, per-head norm, swish gate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import repeat
from torch import nn

from seqzoo.models.base import Call
from seqzoo.models.cache import LayerCache
from seqzoo.models.linear_common import LinearMixer, merge_heads, require, split_heads
from seqzoo.models.modules import RMSNorm, RotaryEmbedding
from seqzoo.models.registry import register_mixer
from seqzoo.ops import simple_gla


def retention_decays(num_heads: int) -> torch.Tensor:
    """RetNet's per-head decays ``γ_h = 1 − 2^(−5−h)``, ``h = 0 … num_heads−1`` (fp64 ``[num_heads]``)."""
    return 1.0 - torch.pow(2.0, -5.0 - torch.arange(num_heads, dtype=torch.float64))


@register_mixer("retnet")
class MultiScaleRetention(LinearMixer):
    """Multi-scale retention: ``S_t = γ_h S_{t−1} + k_t v_tᵀ``, ``o_t = S_tᵀ q_t / √d_k``, per head ``h``.

    Runs on :func:`seqzoo.ops.simple_gla` with the constant log gate ``log γ_h`` at every step. As in fla's
    ``MultiScaleRetention``: RoPE on ``q, k`` (in place of xPos), a per-head RMSNorm of the retention
    output (RetNet's GroupNorm with one group per head), then a swish output gate
    ``o_proj(swish(g_proj(x)) ⊙ norm(o))``. The decays are a fixed buffer, not parameters.

    Args:
        hidden_size: model width.
        layer_idx: position in the stack (unused; part of the mixer contract).
        num_heads: heads; head ``h`` decays with ``1 − 2^(−5−h)``. Default: 4.
        expand_k: total key width ``= expand_k · hidden_size``. Default: 1.0.
        expand_v: total value width ``= expand_v · hidden_size``. Default: 2.0 (RetNet's).
        rope_theta: RoPE base for ``q, k``; ``None`` disables it. Default: 10000.
        norm_eps: epsilon of the per-head RMSNorm. Default: 1e-5.
        backend: the op's backend (``"auto"``, ``"reference"``, ``"torch"``, ``"triton"``, ``"fused"``; see
            :mod:`seqzoo.ops.core.dispatch`). Default: ``"auto"``.

    Shapes: ``[batch, seq, hidden] -> [batch, seq, hidden]``.
    Cache: ``recurrent`` ``[batch, heads, key_dim/heads, value_dim/heads]`` fp32; the cache's positions per row give RoPE positions.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int = 0,
        num_heads: int = 4,
        expand_k: float = 1.0,
        expand_v: float = 2.0,
        rope_theta: float | None = 10000.0,
        norm_eps: float = 1e-5,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.set_op("simple_gla", backend)
        name = "retnet"
        require(name, num_heads >= 1, f"num_heads must be >= 1, got {num_heads}")
        key_dim, value_dim = int(hidden_size * expand_k), int(hidden_size * expand_v)
        require(
            name,
            key_dim % num_heads == 0 and value_dim % num_heads == 0 and key_dim > 0 and value_dim > 0,
            f"num_heads ({num_heads}) must divide key width {key_dim} and value width {value_dim}",
        )
        self.hidden_size, self.layer_idx, self.num_heads = hidden_size, layer_idx, num_heads
        self.head_k_dim, self.head_v_dim = key_dim // num_heads, value_dim // num_heads
        require(name, rope_theta is None or self.head_k_dim % 2 == 0, f"RoPE needs an even head key width, got {self.head_k_dim}")
        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.g_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)
        self.g_norm = RMSNorm(self.head_v_dim, norm_eps)
        self.rotary = RotaryEmbedding(self.head_k_dim, rope_theta) if rope_theta is not None else None
        self.register_buffer("log_decay", retention_decays(num_heads).log().float(), persistent=False)
        self.set_state_shape(num_heads, self.head_k_dim, self.head_v_dim)

    def reset_buffers(self) -> None:
        """Recompute the non-persistent decays (a model built on the meta device, as HF's loader does, has none)."""
        self.log_decay = retention_decays(self.num_heads).log().float().to(self.log_decay.device)

    def mix(self, x: torch.Tensor, cache: LayerCache | None, call: Call) -> torch.Tensor:
        positions = call.positions(x.device)
        q = split_heads(self.q_proj(x), self.head_k_dim)
        k = split_heads(self.k_proj(x), self.head_k_dim)
        v = split_heads(self.v_proj(x), self.head_v_dim)
        if self.rotary is not None:
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        g = repeat(self.log_decay, "h -> b t h", b=x.shape[0], t=x.shape[1])
        o = self.g_norm(self.run_op(simple_gla, q, k, v, g, cache=cache, call=call))
        return self.o_proj(F.silu(self.g_proj(x)) * merge_heads(o))
