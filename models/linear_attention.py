"""Linear attention (Katharopoulos et al. 2020) with a choice of feature map; Based's Taylor map included."""

from __future__ import annotations

import torch
from torch import nn

from seqzoo.models.base import Call, head_dim_for
from seqzoo.models.cache import LayerCache
from seqzoo.models.feature_maps import build_feature_map
from seqzoo.models.linear_common import LinearMixer, merge_heads, require, split_heads
from seqzoo.models.modules import RMSNorm
from seqzoo.models.registry import register_mixer
from seqzoo.ops import simple_gla


@register_mixer("linear_attention")
class LinearAttention(LinearMixer):
    """Causal linear attention ``o_t = Σ_{s≤t} (φ(q_t)·φ(k_s)) v_s`` on :func:`seqzoo.ops.simple_gla` with ``g=None``.

    Normalisation (papers and libraries disagree on whether "linear attention" divides by a normaliser), one
    switch, ``normalize``:
      * ``False`` (default, as fla's ``LinearAttention`` layer and TransNormer): no denominator; each
        head's output goes through an RMSNorm. Works with any feature map, including ``identity``, whose
        kernel can be negative or zero, where a denominator would blow up.
      * ``True`` (Katharopoulos, and Based): ``o_t = φ(q_t)ᵀS_t / (φ(q_t)·z_t + eps)`` with
        ``z_t = Σ_{s≤t} φ(k_s)``. The normaliser comes from the same op call: the values get an extra
        column of ones, so the state ``[feature, head_dim + 1]`` carries ``S`` and ``z`` side by side
        (its last column is ``z``). Needs a positive feature map (``elu`` or ``taylor``); no output norm.

    Args:
        hidden_size: model width.
        layer_idx: position in the stack (unused; part of the mixer contract).
        num_heads: heads. Default: 4.
        head_dim: value width per head. Default: ``hidden_size // num_heads``.
        feature_dim: per-head width of ``q, k`` before the feature map (Based's ``d'``, 16 in the paper).
            Default: ``head_dim``.
        feature_map: ``"identity"``, ``"elu"`` (elu + 1) or ``"taylor"`` (Based's 2nd-order Taylor
            approximation of ``exp(q·k/√d')``; it carries its own temperature, so ``scale = 1``).
            Default: ``"elu"``.
        normalize: divide by ``φ(q)·Σφ(k)`` instead of the output RMSNorm (see above). Default: False.
        norm_eps: epsilon of the output RMSNorm, and added to the denominator when ``normalize``. Default: 1e-5.
        backend: the op's backend (``"auto"``, ``"reference"``, ``"torch"``, ``"triton"``, ``"fused"``; see
            :mod:`seqzoo.ops.core.dispatch`). Default: ``"auto"``.

    Shapes: ``[batch, seq, hidden] -> [batch, seq, hidden]``.
    Cache: ``recurrent`` ``[batch, heads, feature_size, head_dim (+1 if normalize)]`` fp32.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int = 0,
        num_heads: int = 4,
        head_dim: int | None = None,
        feature_dim: int | None = None,
        feature_map: str = "elu",
        normalize: bool = False,
        norm_eps: float = 1e-5,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.set_op("simple_gla", backend)
        name = "linear_attention"
        head_dim = head_dim_for(name, hidden_size, num_heads, head_dim)
        feature_dim = head_dim if feature_dim is None else feature_dim
        require(name, head_dim >= 1 and feature_dim >= 1, f"head_dim and feature_dim must be >= 1, got {head_dim}, {feature_dim}")
        self.hidden_size, self.layer_idx = hidden_size, layer_idx
        self.num_heads, self.head_dim, self.feature_dim = num_heads, head_dim, feature_dim
        self.normalize, self.eps = normalize, norm_eps
        self.feature_map = build_feature_map(feature_map, feature_dim)
        require(
            name,
            not normalize or self.feature_map.positive,
            f"normalize=True needs a positive feature map (elu or taylor), got {feature_map!r}",
        )
        self.q_proj = nn.Linear(hidden_size, num_heads * feature_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_heads * feature_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.o_norm = None if normalize else RMSNorm(head_dim, norm_eps)
        self.scale = 1.0 if self.feature_map.kernel_scaled else None
        self.set_state_shape(num_heads, self.feature_map.feature_size(), head_dim + int(normalize))

    def mix(self, x: torch.Tensor, cache: LayerCache | None, call: Call) -> torch.Tensor:
        q = self.feature_map(split_heads(self.q_proj(x), self.feature_dim))
        k = self.feature_map(split_heads(self.k_proj(x), self.feature_dim))
        v = split_heads(self.v_proj(x), self.head_dim)
        if self.normalize:
            v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        o = self.run_op(simple_gla, q, k, v, None, scale=self.scale, cache=cache, call=call)
        if self.normalize:
            o = o[..., :-1] / (o[..., -1:] + self.eps)
        else:
            o = self.o_norm(o)
        return self.o_proj(merge_heads(o))
