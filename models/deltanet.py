"""DeltaNet (Schlag et al. 2021; Yang et al. 2024) and Gated DeltaNet (Yang et al. 2025): delta-rule fast weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from seqzoo.models.base import Call, head_dim_for
from seqzoo.models.cache import LayerCache
from seqzoo.models.linear_common import LinearMixer, init_a_log, init_dt_bias, merge_heads, require, split_heads
from seqzoo.models.modules import GatedRMSNorm, RMSNorm, upcast
from seqzoo.models.registry import register_mixer
from seqzoo.ops import delta_rule, gated_delta_rule


class _DeltaRuleMixer(LinearMixer):
    """What DeltaNet and Gated DeltaNet share: ``q, k, v`` projections through SiLU short convs (or a
    plain SiLU without them), ``q, k`` L2-normalised inside the op, ``β = σ(W_β x)`` (``2σ`` with
    negative eigenvalues), a per-head output norm (gated by ``swish(g_proj(x))`` when there is an
    output gate) and ``o_proj``. Subclasses add the decay gate and pick the op.
    """

    def __init__(
        self,
        *,
        name: str,
        hidden_size: int,
        layer_idx: int,
        num_heads: int,
        head_dim: int | None,
        expand_v: float,
        use_output_gate: bool,
        use_short_conv: bool,
        conv_size: int,
        allow_neg_eigval: bool,
        norm_eps: float,
        op: str,
        backend: str,
    ) -> None:
        super().__init__()
        self.set_op(op, backend)
        head_dim = head_dim_for(name, hidden_size, num_heads, head_dim)
        head_v_dim = int(head_dim * expand_v)
        require(name, head_dim >= 1 and head_v_dim >= 1, f"head_dim and head_dim·expand_v must be >= 1, got {head_dim}, {head_v_dim}")
        self.hidden_size, self.layer_idx, self.num_heads = hidden_size, layer_idx, num_heads
        self.head_k_dim, self.head_v_dim = head_dim, head_v_dim
        self.allow_neg_eigval = allow_neg_eigval
        key_dim, value_dim = num_heads * head_dim, num_heads * head_v_dim
        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.g_proj = nn.Linear(hidden_size, value_dim, bias=False) if use_output_gate else None
        self.o_norm = GatedRMSNorm(head_v_dim, norm_eps, "silu") if use_output_gate else RMSNorm(head_v_dim, norm_eps)
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)
        if use_short_conv:
            require(name, conv_size >= 1, f"conv_size must be >= 1, got {conv_size}")
            for conv_name, channels in (("q", key_dim), ("k", key_dim), ("v", value_dim)):
                self.add_conv(conv_name, channels, conv_size, "silu")
        self.set_state_shape(num_heads, head_dim, head_v_dim)

    def beta(self, x: torch.Tensor) -> torch.Tensor:
        """Write strengths ``[batch, seq, heads]`` in ``(0, 1)``, or ``(0, 2)`` with ``allow_neg_eigval``."""
        beta = torch.sigmoid(self.b_proj(x))
        return 2.0 * beta if self.allow_neg_eigval else beta

    def qkv(self, x: torch.Tensor, cache: LayerCache | None, call: Call) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q, k: [batch, seq, heads, head_k_dim]``, ``v: [batch, seq, heads, head_v_dim]`` after the SiLU convs."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.convs:
            q, k, v = self.conv("q", q, cache, call), self.conv("k", k, cache, call), self.conv("v", v, cache, call)
        else:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        return split_heads(q, self.head_k_dim), split_heads(k, self.head_k_dim), split_heads(v, self.head_v_dim)

    def output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``o_proj`` of the normed (and gated) op output ``o: [batch, seq, heads, head_v_dim]``."""
        if self.g_proj is not None:
            o = self.o_norm(o, split_heads(self.g_proj(x), self.head_v_dim))
        else:
            o = self.o_norm(o)
        return self.o_proj(merge_heads(o))


@register_mixer("deltanet")
class DeltaNet(_DeltaRuleMixer):
    """DeltaNet: ``S_t = (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ``, ``o_t = S_tᵀ q_t / √d_k``, on :func:`seqzoo.ops.delta_rule`.

    ``q, k, v`` pass SiLU short convs; ``q, k`` are L2-normalised in the op (``use_qk_l2norm=True``), so
    with ``β = 1`` a write makes ``Sᵀk = v`` exactly; ``β = σ(W_β x)``. Output ``o_proj(RMSNorm(o))`` per
    head, or ``o_proj(RMSNorm(o) ⊙ swish(g_proj(x)))`` with ``use_output_gate``.

    Args:
        hidden_size: model width.
        layer_idx: position in the stack (unused; part of the mixer contract).
        num_heads: heads. Default: 4.
        head_dim: key width per head. Default: ``hidden_size // num_heads``.
        expand_v: value width per head ``= expand_v · head_dim``. Default: 1.0.
        use_output_gate: swish output gate before ``o_proj``. Default: False (fla's DeltaNet).
        use_short_conv: SiLU short convs on ``q, k, v`` (without them: a plain SiLU). Default: True.
        conv_size: taps of the convs. Default: 4.
        allow_neg_eigval: ``β ∈ (0, 2)``, letting ``I − βkkᵀ`` have a negative eigenvalue. Default: False.
        norm_eps: epsilon of the output norm. Default: 1e-5.
        backend: the op's backend (``"auto"``, ``"reference"``, ``"torch"``, ``"triton"``, ``"fused"``; see
            :mod:`seqzoo.ops.core.dispatch`). Default: ``"auto"``.

    Shapes: ``[batch, seq, hidden] -> [batch, seq, hidden]``.
    Cache: ``recurrent`` ``[batch, heads, head_dim, head_v_dim]`` fp32; ``conv_q/k/v`` ``[batch, conv_size − 1, width]``.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int = 0,
        num_heads: int = 4,
        head_dim: int | None = None,
        expand_v: float = 1.0,
        use_output_gate: bool = False,
        use_short_conv: bool = True,
        conv_size: int = 4,
        allow_neg_eigval: bool = False,
        norm_eps: float = 1e-5,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            name="deltanet", hidden_size=hidden_size, layer_idx=layer_idx, num_heads=num_heads, head_dim=head_dim,
            expand_v=expand_v, use_output_gate=use_output_gate, use_short_conv=use_short_conv, conv_size=conv_size,
            allow_neg_eigval=allow_neg_eigval, norm_eps=norm_eps, op="delta_rule", backend=backend,
        )  # fmt: skip

    def mix(self, x: torch.Tensor, cache: LayerCache | None, call: Call) -> torch.Tensor:
        q, k, v = self.qkv(x, cache, call)
        o = self.run_op(delta_rule, q, k, v, self.beta(x), use_qk_l2norm=True, cache=cache, call=call)
        return self.output(o, x)


@register_mixer("gated_deltanet")
class GatedDeltaNet(_DeltaRuleMixer):
    """Gated DeltaNet: ``S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ`` on :func:`seqzoo.ops.gated_delta_rule`.

    The decay is Mamba-2's, scalar per head: ``log α_t = g_t = −exp(A_log)·softplus(W_a x_t + dt_bias) ≤ 0``,
    with ``A ~ U(a_init_range)`` (``A_log = log A``) and ``dt ~ logU(dt_range)``, ``dt_bias = softplus⁻¹(dt)``;
    both are exempt from weight decay. Everything else is DeltaNet (SiLU short convs, L2-normed
    ``q, k`` in the op, ``β = σ(W_β x)``), with the gated RMSNorm output
    ``o_proj(RMSNorm(o) ⊙ swish(g_proj(x)))`` per head (plain ``RMSNorm`` with ``use_output_gate=False``).

    Args:
        hidden_size: model width.
        layer_idx: position in the stack (unused; part of the mixer contract).
        num_heads: heads. Default: 4.
        head_dim: key width per head. Default: ``hidden_size // num_heads``.
        expand_v: value width per head ``= expand_v · head_dim``. Default: 2.0 (GDN's).
        use_output_gate: the swish output gate (fla's ``use_gate``); without it the output is
            ``o_proj(RMSNorm(o))`` as DeltaNet's. Default: True (the paper's).
        use_short_conv: SiLU short convs on ``q, k, v``. Default: True.
        conv_size: taps of the convs. Default: 4.
        allow_neg_eigval: ``β ∈ (0, 2)``. Default: False.
        a_init_range: ``(low, high)`` of the uniform init of ``A``. Default: ``(0, 16)``.
        dt_range: ``(dt_min, dt_max)`` of the log-uniform init of the step size. Default: ``(1e-3, 1e-1)``.
        norm_eps: epsilon of the gated output norm. Default: 1e-5.
        backend: the op's backend (``"auto"``, ``"reference"``, ``"torch"``, ``"triton"``, ``"fused"``; see
            :mod:`seqzoo.ops.core.dispatch`). Default: ``"auto"``.

    Shapes: ``[batch, seq, hidden] -> [batch, seq, hidden]``.
    Cache: ``recurrent`` ``[batch, heads, head_dim, head_v_dim]`` fp32; ``conv_q/k/v`` ``[batch, conv_size − 1, width]``.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int = 0,
        num_heads: int = 4,
        head_dim: int | None = None,
        expand_v: float = 2.0,
        use_output_gate: bool = True,
        use_short_conv: bool = True,
        conv_size: int = 4,
        allow_neg_eigval: bool = False,
        a_init_range: Sequence[float] = (0.0, 16.0),
        dt_range: Sequence[float] = (1e-3, 1e-1),
        norm_eps: float = 1e-5,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            name="gated_deltanet", hidden_size=hidden_size, layer_idx=layer_idx, num_heads=num_heads, head_dim=head_dim,
            expand_v=expand_v, use_output_gate=use_output_gate, use_short_conv=use_short_conv, conv_size=conv_size,
            allow_neg_eigval=allow_neg_eigval, norm_eps=norm_eps, op="gated_delta_rule", backend=backend,
        )  # fmt: skip
        low, high = a_init_range
        require("gated_deltanet", 0 <= low < high, f"a_init_range must be [low, high] with 0 <= low < high, got {list(a_init_range)}")
        dt_min, dt_max = dt_range
        require("gated_deltanet", 0 < dt_min <= dt_max, f"dt_range must be [min, max] with 0 < min <= max, got {list(dt_range)}")
        self.a_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.A_log = init_a_log(num_heads, *a_init_range)
        self.dt_bias = init_dt_bias(num_heads, *dt_range)

    def log_gate(self, x: torch.Tensor) -> torch.Tensor:
        """Per-head log decay ``g = −exp(A_log)·softplus(W_a x + dt_bias)``, ``[batch, seq, heads]``, fp32, ``<= 0``."""
        return -upcast(self.A_log).exp() * F.softplus(upcast(self.a_proj(x)) + upcast(self.dt_bias))

    def mix(self, x: torch.Tensor, cache: LayerCache | None, call: Call) -> torch.Tensor:
        q, k, v = self.qkv(x, cache, call)
        beta, g = self.beta(x), self.log_gate(x)
        o = self.run_op(gated_delta_rule, q, k, v, beta, g, use_qk_l2norm=True, cache=cache, call=call)
        return self.output(o, x)
