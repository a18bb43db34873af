"""HGRN-2 (Qin et al. 2024): gated linear RNN with state expansion, tied input/forget gates and layer-wise lower bounds."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqzoo.models.base import Call
from seqzoo.models.cache import LayerCache
from seqzoo.models.linear_common import LinearMixer, merge_heads, no_weight_decay, require, split_heads
from seqzoo.models.modules import RMSNorm, upcast
from seqzoo.models.registry import register_mixer
from seqzoo.ops import gla


@register_mixer("hgrn2")
class HGRN2(LinearMixer):
    """HGRN-2: ``S_t = diag(f_t) S_{t−1} + (1 − f_t) i_tᵀ``, ``o_t = S_tᵀ swish(q_t) / √d_f``, on :func:`seqzoo.ops.gla`.

    The key is tied to the forget gate, ``k = 1 − f``, and ``f`` has a lower bound ``lb`` per layer and
    channel: ``f = lb + (1 − lb)·σ(W_f x)``, computed in log space as
    ``log f = logaddexp(log lb, log(1 − lb) + logσ(W_f x))``. The output is ``o_proj(RMSNorm(o))``.

    Lower bounds. In HGRN-2 they come from one model-level ``(L, D)`` tensor ``P``:
    ``lb = cumsum(softmax_L(P)) − softmax_L(P)[0]``, which makes them grow with depth, from 0 at the
    first layer. A mixer only sees its own ``layer_idx``, so here each layer ``ℓ > 0`` owns a learnable
    per-channel logit ``lower_bound_logit`` (no weight decay), ``lb_ℓ = σ(logit)``, initialised to
    ``lb_ℓ = ℓ / num_layers``. That is exactly the paper's value at init (``P = 0`` gives a uniform
    softmax, so ``lb_ℓ = (ℓ + 1)/L − 1/L``); unlike the shared cumsum, training may move the layers'
    bounds independently, so their monotone order in depth is not enforced. Layer 0 has no lower bound
    (``lb = 0``), as in fla. ``num_layers`` is the model's depth; configs set it with
    ``${model.num_layers}``. ``num_layers=None`` turns lower bounds off in every layer.

    Args:
        hidden_size: model width (also the total value width, HGRN-2's input dim).
        layer_idx: position in the stack; sets this layer's initial lower bound.
        num_heads: heads. Default: ``hidden_size // expand_ratio``.
        expand_ratio: forget/key width per head (the state expansion; 128 in the paper). Default: 16.
        num_layers: model depth for the lower-bound schedule, or ``None`` for no lower bounds. Default: None.
        use_short_conv: short convs (no activation, as fla) on ``q, f, i``. Default: False.
        conv_size: taps of those convs. Default: 4.
        norm_eps: epsilon of the output RMSNorm. Default: 1e-5.
        backend: the op's backend (``"auto"``, ``"reference"``, ``"torch"``, ``"triton"``, ``"fused"``; see
            :mod:`seqzoo.ops.core.dispatch`). Default: ``"auto"``.

    Shapes: ``[batch, seq, hidden] -> [batch, seq, hidden]``.
    Cache: ``recurrent`` ``[batch, heads, expand_ratio, hidden/heads]`` fp32, plus ``conv_q/f/i`` with short convs.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int = 0,
        num_heads: int | None = None,
        expand_ratio: int | None = 16,
        num_layers: int | None = None,
        use_short_conv: bool = False,
        conv_size: int = 4,
        norm_eps: float = 1e-5,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.set_op("gla", backend)
        name = "hgrn2"
        require(name, num_heads is not None or expand_ratio is not None, "set num_heads or expand_ratio")
        if expand_ratio is None:
            require(name, num_heads >= 1 and hidden_size % num_heads == 0, f"num_heads ({num_heads}) must divide hidden_size {hidden_size}")
            expand_ratio = hidden_size // num_heads
        if num_heads is None:
            ok = expand_ratio >= 1 and hidden_size % expand_ratio == 0
            require(name, ok, f"expand_ratio ({expand_ratio}) must divide hidden_size {hidden_size}")
            num_heads = hidden_size // expand_ratio
        require(name, num_heads >= 1 and expand_ratio >= 1, f"num_heads, expand_ratio must be >= 1, got {num_heads}, {expand_ratio}")
        require(name, hidden_size % num_heads == 0, f"num_heads ({num_heads}) must divide hidden_size {hidden_size}")
        ok = num_layers is None or 0 <= layer_idx < num_layers
        require(name, ok, f"layer_idx {layer_idx} must lie in [0, num_layers={num_layers})")
        self.hidden_size, self.layer_idx, self.num_heads = hidden_size, layer_idx, num_heads
        self.forget_dim, self.head_f_dim, self.head_i_dim = num_heads * expand_ratio, expand_ratio, hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, self.forget_dim, bias=False)
        self.f_proj = nn.Linear(hidden_size, self.forget_dim, bias=False)
        self.i_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.g_norm = RMSNorm(hidden_size, norm_eps)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.lower_bound_logit = None
        if num_layers is not None and layer_idx > 0:
            lb = layer_idx / num_layers
            self.lower_bound_logit = no_weight_decay(nn.Parameter(torch.full((self.forget_dim,), math.log(lb / (1 - lb)))))
        if use_short_conv:
            for conv_name, channels in (("q", self.forget_dim), ("f", self.forget_dim), ("i", hidden_size)):
                self.add_conv(conv_name, channels, conv_size, None)
        self.set_state_shape(num_heads, self.head_f_dim, self.head_i_dim)

    def lower_bound(self) -> torch.Tensor | None:
        """This layer's forget-gate lower bound ``[forget_dim]`` in ``(0, 1)``, or ``None`` (no bound)."""
        return None if self.lower_bound_logit is None else torch.sigmoid(self.lower_bound_logit)

    def key_and_log_forget(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """From forget pre-activations ``f: [..., forget_dim]``, the tied key ``1 − f_gate`` and ``log f_gate`` (fp32)."""
        log_f = F.logsigmoid(upcast(f))
        if self.lower_bound_logit is not None:
            logit = upcast(self.lower_bound_logit)
            # log lb = logσ(logit), log(1 − lb) = logσ(−logit): no log of a rounded sigmoid. The clamp
            # catches rounding in logaddexp landing a hair above the exact bound log 1 = 0.
            log_f = torch.logaddexp(F.logsigmoid(logit), F.logsigmoid(-logit) + log_f).clamp_max(0.0)
        return -torch.expm1(log_f), log_f

    def mix(self, x: torch.Tensor, cache: LayerCache | None, call: Call) -> torch.Tensor:
        q, f, i = self.q_proj(x), self.f_proj(x), self.i_proj(x)
        if self.convs:
            q, f, i = self.conv("q", q, cache, call), self.conv("f", f, cache, call), self.conv("i", i, cache, call)
        k, g = self.key_and_log_forget(f)
        q, k, g = (split_heads(t, self.head_f_dim) for t in (F.silu(q), k.to(q.dtype), g))
        o = self.run_op(gla, q, k, split_heads(i, self.head_i_dim), g, cache=cache, call=call)
        return self.o_proj(self.g_norm(merge_heads(o)))
