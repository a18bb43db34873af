"""Mamba-2 (Dao & Gu 2024): the selective SSM in its state-space-dual form, run as scalar-gated linear attention."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from seqzoo.models.base import Call
from seqzoo.models.cache import LayerCache
from seqzoo.models.linear_common import LinearMixer, init_a_log, init_dt_bias, no_weight_decay, require, split_heads
from seqzoo.models.modules import GatedRMSNorm, upcast
from seqzoo.models.registry import register_mixer
from seqzoo.ops import simple_gla


@register_mixer("mamba2")
class Mamba2(LinearMixer):
    """Mamba-2 / SSD: ``h_t = exp(Δ_t A) h_{t−1} + B_t (Δ_t x_t)ᵀ``, ``y_t = h_tᵀ C_t + D ⊙ x_t`` per head.

    As linear attention (SSD): ``q = C``, ``k = B``, ``v = Δ·x`` and the scalar log decay ``g = Δ·A``, so the
    op is :func:`seqzoo.ops.simple_gla` with ``scale = 1`` and state ``h ∈ R^{d_state × head_dim}``.
    One ``in_proj`` gives ``z`` (the gate), ``xBC`` and the step logits; ``xBC`` passes a SiLU causal
    conv (with bias); ``Δ = softplus(W_Δ x + dt_bias)``, ``A = −exp(A_log)`` is a scalar per head.
    ``B, C`` are shared by the ``n_groups`` groups of heads. Output ``out_proj(RMSNorm(y ⊙ silu(z)))``
    (Mamba-2's gated norm, gate before norm, normalised per group).

    Inits (Mamba-2's, which Gated DeltaNet and MoM copy): ``A ~ U(a_init_range)`` (``A_log = log A``); ``dt ~ logU(dt_range)`` floored at
    ``dt_floor``, ``dt_bias = softplus⁻¹(dt)``; ``D = 1``. ``A_log``, ``dt_bias`` and ``D`` get no weight decay.

    Args:
        hidden_size: model width.
        layer_idx: position in the stack (unused; part of the mixer contract).
        head_dim: width ``P`` of each head's ``x``. Default: 16.
        d_state: SSM state width ``N`` per head (the key width of ``B, C``). Default: 16.
        expand: inner width ``d_inner = expand · hidden_size``; heads ``= d_inner / head_dim``. Default: 2.
        n_groups: groups of heads sharing ``B, C`` (must divide the heads). Default: 1.
        conv_size: taps of the ``xBC`` conv. Default: 4.
        a_init_range: ``(low, high)`` of the uniform init of ``A``. Default: ``(1, 16)``.
        dt_range: ``(dt_min, dt_max)`` of the log-uniform init of ``Δ``. Default: ``(1e-3, 1e-1)``.
        dt_floor: smallest initial ``Δ``. Default: 1e-4.
        norm_eps: epsilon of the gated RMSNorm. Default: 1e-5.
        backend: the op's backend (``"auto"``, ``"reference"``, ``"torch"``, ``"triton"``, ``"fused"``; see
            :mod:`seqzoo.ops.core.dispatch`). Default: ``"auto"``.

    Deviation: with ``n_groups > 1`` the gated norm's weight (``d_inner / n_groups``) is shared by the
    groups, where Mamba-2 has one weight per channel; identical for ``n_groups = 1``.

    Shapes: ``[batch, seq, hidden] -> [batch, seq, hidden]``.
    Cache: ``recurrent`` ``[batch, heads, d_state, head_dim]`` fp32 (the SSM state) and ``conv_xBC``
    ``[batch, conv_size − 1, d_inner + 2·n_groups·d_state]`` (the conv tail).
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int = 0,
        head_dim: int = 16,
        d_state: int = 16,
        expand: int = 2,
        n_groups: int = 1,
        conv_size: int = 4,
        a_init_range: Sequence[float] = (1.0, 16.0),
        dt_range: Sequence[float] = (1e-3, 1e-1),
        dt_floor: float = 1e-4,
        norm_eps: float = 1e-5,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.set_op("simple_gla", backend)
        name = "mamba2"
        d_inner = expand * hidden_size
        require(name, min(head_dim, d_state, expand) >= 1, f"head_dim, d_state, expand must be >= 1, got {head_dim}, {d_state}, {expand}")
        require(name, d_inner % head_dim == 0, f"head_dim ({head_dim}) must divide expand·hidden_size = {d_inner}")
        num_heads = d_inner // head_dim
        require(name, n_groups >= 1 and num_heads % n_groups == 0, f"n_groups ({n_groups}) must divide the {num_heads} heads")
        low, high = a_init_range
        require(name, 0 < low < high, f"a_init_range must be [low, high] with 0 < low < high, got {list(a_init_range)}")
        dt_min, dt_max = dt_range
        require(name, 0 < dt_min <= dt_max, f"dt_range must be [min, max] with 0 < min <= max, got {list(dt_range)}")
        self.hidden_size, self.layer_idx = hidden_size, layer_idx
        self.num_heads, self.head_dim, self.d_state, self.n_groups, self.d_inner = num_heads, head_dim, d_state, n_groups, d_inner
        conv_dim = d_inner + 2 * n_groups * d_state
        self.in_proj_split = [d_inner, conv_dim, num_heads]  # z, xBC, dt logits
        self.in_proj = nn.Linear(hidden_size, d_inner + conv_dim + num_heads, bias=False)
        self.add_conv("xBC", conv_dim, conv_size, "silu", bias=True)
        self.A_log = init_a_log(num_heads, *a_init_range)
        self.dt_bias = init_dt_bias(num_heads, *dt_range, dt_floor)
        self.D = no_weight_decay(nn.Parameter(torch.ones(num_heads)))
        self.norm = GatedRMSNorm(d_inner // n_groups, norm_eps, "silu", norm_before_gate=False)
        self.out_proj = nn.Linear(d_inner, hidden_size, bias=False)
        self.set_state_shape(num_heads, d_state, head_dim)

    def step_size(self, dt_logits: torch.Tensor) -> torch.Tensor:
        """``Δ = softplus(dt_logits + dt_bias)`` in fp32, ``[batch, seq, heads]``."""
        return F.softplus(upcast(dt_logits) + upcast(self.dt_bias))

    def mix(self, x: torch.Tensor, cache: LayerCache | None, call: Call) -> torch.Tensor:
        z, xbc, dt_logits = torch.split(self.in_proj(x), self.in_proj_split, dim=-1)
        xbc = self.conv("xBC", xbc, cache, call)
        xs, b, c = torch.split(xbc, [self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)
        dt = self.step_size(dt_logits)
        g = dt * -upcast(self.A_log).exp()
        xs = split_heads(xs, self.head_dim)
        per_group = self.num_heads // self.n_groups
        b, c = (rearrange(t, "b t (g n) -> b t g n", g=self.n_groups).repeat_interleave(per_group, dim=2) for t in (b, c))
        v = (xs * dt[..., None]).to(xs.dtype)
        y = self.run_op(simple_gla, c, b, v, g, scale=1.0, cache=cache, call=call)
        y = y + self.D.to(y.dtype)[:, None] * xs
        y = rearrange(y, "b t (g r) p -> b t g (r p)", g=self.n_groups)
        y = self.norm(y, rearrange(z, "b t (g d) -> b t g d", g=self.n_groups))
        return self.out_proj(rearrange(y, "b t g d -> b t (g d)"))
