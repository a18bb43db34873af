"""Gated linear attention (Yang et al. 2023): data-dependent per-key decays from a low-rank gate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seqzoo.models.base import Call
from seqzoo.models.cache import LayerCache
from seqzoo.models.linear_common import LinearMixer, merge_heads, require, split_heads
from seqzoo.models.modules import GatedRMSNorm, RMSNorm, upcast
from seqzoo.models.registry import register_mixer
from seqzoo.ops import gla


@register_mixer("gla")
class GatedLinearAttention(LinearMixer):
    """GLA: ``S_t = diag(α_t) S_{t−1} + k_t v_tᵀ``, ``o_t = S_tᵀ q_t / √d_k``, on :func:`seqzoo.ops.gla`.

    The per-key log decay is ``log α_t = logsigmoid(W₂ W₁ x_t + b) / gate_logit_normalizer`` with a
    rank-``gate_low_rank_dim`` projection (fla's ``gk_proj``); dividing by 16 keeps ``α`` close to 1 so
    memories last. ``clamp_min`` optionally floors the log gate. The output is ``o_proj(RMSNorm(o) ⊙
    swish(g_proj(x)))`` per head (``use_output_gate=False``: ``o_proj(RMSNorm(o))``).

    Args:
        hidden_size: model width.
        layer_idx: position in the stack (unused; part of the mixer contract).
        num_heads: heads. Default: 4.
        expand_k: total key width ``= expand_k · hidden_size``. Default: 0.5 (GLA's).
        expand_v: total value width ``= expand_v · hidden_size``. Default: 1.0.
        gate_low_rank_dim: rank of the gate projection. Default: 16.
        gate_logit_normalizer: divides the log-sigmoid gate. Default: 16.
        clamp_min: lower bound on the log gate, or ``None``. Default: None.
        use_short_conv: SiLU short convs on ``q, k, v`` (off in GLA's paper). Default: False.
        conv_size: taps of those convs. Default: 4.
        use_output_gate: the swish output gate. Default: True.
        norm_eps: epsilon of the output RMSNorm. Default: 1e-5.
        backend: the op's backend (``"auto"``, ``"reference"``, ``"torch"``, ``"triton"``, ``"fused"``; see
            :mod:`seqzoo.ops.core.dispatch`). Default: ``"auto"``.

    Shapes: ``[batch, seq, hidden] -> [batch, seq, hidden]``.
    Cache: ``recurrent`` ``[batch, heads, key_dim/heads, value_dim/heads]`` fp32, plus ``conv_q/k/v`` with short convs.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int = 0,
        num_heads: int = 4,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        gate_low_rank_dim: int = 16,
        gate_logit_normalizer: float = 16.0,
        clamp_min: float | None = None,
        use_short_conv: bool = False,
        conv_size: int = 4,
        use_output_gate: bool = True,
        norm_eps: float = 1e-5,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.set_op("gla", backend)
        name = "gla"
        require(name, num_heads >= 1, f"num_heads must be >= 1, got {num_heads}")
        key_dim, value_dim = int(hidden_size * expand_k), int(hidden_size * expand_v)
        require(
            name,
            key_dim % num_heads == 0 and value_dim % num_heads == 0 and key_dim > 0 and value_dim > 0,
            f"num_heads ({num_heads}) must divide key width {key_dim} and value width {value_dim}",
        )
        require(name, gate_low_rank_dim >= 1, f"gate_low_rank_dim must be >= 1, got {gate_low_rank_dim}")
        require(name, gate_logit_normalizer > 0, f"gate_logit_normalizer must be > 0, got {gate_logit_normalizer}")
        require(name, clamp_min is None or clamp_min < 0, f"clamp_min must be a negative log gate or null, got {clamp_min}")
        self.hidden_size, self.layer_idx, self.num_heads = hidden_size, layer_idx, num_heads
        self.head_k_dim, self.head_v_dim = key_dim // num_heads, value_dim // num_heads
        self.gate_logit_normalizer, self.clamp_min = gate_logit_normalizer, clamp_min
        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.gk_proj = nn.Sequential(
            nn.Linear(hidden_size, gate_low_rank_dim, bias=False), nn.Linear(gate_low_rank_dim, key_dim, bias=True)
        )
        self.g_proj = nn.Linear(hidden_size, value_dim, bias=False) if use_output_gate else None
        self.g_norm = GatedRMSNorm(self.head_v_dim, norm_eps, "silu") if use_output_gate else RMSNorm(self.head_v_dim, norm_eps)
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)
        if use_short_conv:
            for conv_name, channels in (("q", key_dim), ("k", key_dim), ("v", value_dim)):
                self.add_conv(conv_name, channels, conv_size, "silu")
        self.set_state_shape(num_heads, self.head_k_dim, self.head_v_dim)

    def log_gate(self, x: torch.Tensor) -> torch.Tensor:
        """Per-key log decay ``[batch, seq, heads, head_k_dim]`` (``<= 0``) for ``x: [batch, seq, hidden]``."""
        g = F.logsigmoid(upcast(self.gk_proj(x))) / self.gate_logit_normalizer
        if self.clamp_min is not None:
            g = g.clamp_min(self.clamp_min)
        return split_heads(g, self.head_k_dim)

    def mix(self, x: torch.Tensor, cache: LayerCache | None, call: Call) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.convs:
            q, k, v = self.conv("q", q, cache, call), self.conv("k", k, cache, call), self.conv("v", v, cache, call)
        q, k, v = split_heads(q, self.head_k_dim), split_heads(k, self.head_k_dim), split_heads(v, self.head_v_dim)
        o = self.run_op(gla, q, k, v, self.log_gate(x), cache=cache, call=call)
        if self.g_proj is not None:
            o = self.g_norm(o, split_heads(self.g_proj(x), self.head_v_dim))
        else:
            o = self.g_norm(o)
        return self.o_proj(merge_heads(o))
