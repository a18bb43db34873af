"""SCOUT (Jafari et al., arXiv 2509.00935): a local mixer for recent context, checkpoint attention for the long range.

One SCOUT block is four pre-norm residual sub-layers (the official code's decoder layer):

    x ← x + Mixer(RMSNorm(x));  x ← x + MLP₁(RMSNorm(x));  x ← x + CkptAttn(RMSNorm(x));  x ← x + MLP₂(RMSNorm(x))

with the mixer a causal sliding-window attention (explicit window, RoPE) or Mamba-2, SwiGLU MLPs, and
:class:`~seqzoo.models.checkpoint_attention.CheckpointAttention` (one checkpoint per completed segment of
``segment_len`` tokens). There are no full-attention layers.

How it sits in a :class:`~seqzoo.models.LanguageModel`: the block is registered as the mixer ``scout`` with
``owns_norm = True``, so the model's block hands it the raw residual stream ``x`` (no outer norm) and adds
its output, the sum of the four sub-layers' updates; the configs set ``mlp: null`` so the outer block adds
nothing else. A SCOUT model is then exactly the stack of the paper's decoder layers.

Where this port differs from the released code, on purpose:

* the sliding-window mixer is causal, with its window forced on every path (the released SWA variant trains
  its window attention unmasked, i.e. bidirectionally, and whether the window applies depends on the
  attention backend); ``tests/test_scout.py`` perturbs later tokens of the whole block to check it;
* the local mixer is Mamba-2 (our ``mamba2``) where the paper's Mamba variant uses Mamba-1;
* the compression is pluggable (``stride``, the code's choice, ``mean`` or ``gated``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from seqzoo.configs import ConfigError
from seqzoo.models.base import Call, StateShapes, TokenMixer
from seqzoo.models.cache import LayerCache
from seqzoo.models.checkpoint_attention import CheckpointAttention
from seqzoo.models.modules import RMSNorm, SwiGLU
from seqzoo.models.registry import build_mixer, register_mixer

LOCAL_MIXERS = ("attention", "mamba2")
DEFAULT_WINDOW = 32


@register_mixer("scout")
class Scout(TokenMixer):
    """A SCOUT block: local mixer → MLP → checkpoint attention → MLP, each a pre-norm residual sub-layer.

    Args:
        hidden_size: model width.
        layer_idx: position in the stack (passed to the local mixer).
        mixer: the local mixer, ``"attention"`` (sliding window) or ``"mamba2"``.
        mixer_options: options of the local mixer (those of the ``attention`` or ``mamba2`` mixer). The
            attention mixer needs an integer ``window_size`` (a window is part of SCOUT, never left to a
            backend); ``num_heads`` defaults to this layer's. Default: ``{"window_size": 32}`` for attention,
            ``{}`` for Mamba-2.
        num_heads, num_kv_heads, head_dim: heads of the checkpoint attention (grouped KV heads allowed).
        segment_len: ``L``, tokens per segment (the paper's ``selection_window_size``, 10).
        compression: ``"stride"`` (last token of a segment), ``"mean"`` or ``"gated"`` (learned pool).
        rope_theta: RoPE base of the checkpoint attention; ``None`` disables it there (the local mixer keeps its
            own). With RoPE the checkpoints sit at absolute positions, so a longer prompt shows the queries distances
            they never met in training; on the passkey probe at width 64 (``benchmarks/RESULTS.md``), ``None``
            kept 0.3-0.7 accuracy at 2-8x the training length where ``1e4`` and ``1e6`` fell to 0.
        intermediate_size: SwiGLU width of both MLPs (default ``8/3 · hidden`` rounded up to 32).
        norm_eps: epsilon of the four RMSNorms.
        backend: the checkpoint-attention op's backend (``auto | reference | torch | triton``).

    Shapes: ``[batch, seq, hidden] -> [batch, seq, hidden]``, the block's residual update (``owns_norm``).

    Cache: the local mixer's state under ``local_`` (a rolling window of ``window_size − 1`` keys and values, or
    the Mamba-2 SSM state and conv tail) and the checkpoint attention's under ``ckpt_``: ``⌊n/L⌋`` checkpoint
    keys and values after ``n`` tokens, plus a fixed-size summary of the segment in progress for ``mean`` and
    ``gated``. **The state grows as n / L**: ``state_size`` needs ``seq_len``. The checkpoint list has a per-row
    length, so rows at different positions decode one by one (``ragged_rows = False``).
    """

    owns_norm = True
    ragged_rows = False

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int = 0,
        mixer: str = "attention",
        mixer_options: Mapping[str, Any] | None = None,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        segment_len: int = 10,
        compression: str = "stride",
        rope_theta: float | None = 10000.0,
        intermediate_size: int | None = None,
        norm_eps: float = 1e-6,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if mixer not in LOCAL_MIXERS:
            raise ConfigError(f"scout: mixer must be one of {', '.join(LOCAL_MIXERS)}, got {mixer!r}")
        options = dict(mixer_options) if mixer_options is not None else ({"window_size": DEFAULT_WINDOW} if mixer == "attention" else {})
        if mixer == "attention":
            window = options.get("window_size")
            if isinstance(window, bool) or not isinstance(window, int) or window < 1:
                raise ConfigError(f"scout: the sliding-window mixer needs an integer mixer_options.window_size >= 1, got {window!r}")
            options.setdefault("num_heads", num_heads)
        self.hidden_size, self.layer_idx = hidden_size, layer_idx
        self.local_norm = RMSNorm(hidden_size, norm_eps)
        try:
            self.local: TokenMixer = build_mixer(mixer, hidden_size, layer_idx, options)
        except (ConfigError, TypeError) as err:
            raise ConfigError(f"scout: mixer_options: {err}") from None
        self.mlp_norm = RMSNorm(hidden_size, norm_eps)
        self.mlp = SwiGLU(hidden_size, intermediate_size)
        self.ckpt_norm = RMSNorm(hidden_size, norm_eps)
        self.ckpt = CheckpointAttention(
            hidden_size, num_heads, num_kv_heads, head_dim, segment_len, compression, rope_theta, backend, layer="scout"
        )
        self.mlp2_norm = RMSNorm(hidden_size, norm_eps)
        self.mlp2 = SwiGLU(hidden_size, intermediate_size)

    def mix(self, x: torch.Tensor, cache: LayerCache | None, call: Call) -> torch.Tensor:
        """``x``, the residual stream ``[batch, seq, hidden]`` → the block's update (``x_out − x``)."""
        local_cache = None if cache is None else cache.scope("local_")
        ckpt_cache = None if cache is None else cache.scope("ckpt_")
        d_local = self.local.mix(self.local_norm(x), local_cache, call)
        h = x + d_local
        d_mlp = self.mlp(self.mlp_norm(h))
        h = h + d_mlp
        d_ckpt = self.ckpt(self.ckpt_norm(h), ckpt_cache, call)
        h = h + d_ckpt
        return d_local + d_mlp + d_ckpt + self.mlp2(self.mlp2_norm(h))

    def state_shapes(self, seq_len: int | None = None) -> StateShapes:
        """The local mixer's state (``local_*``) and the checkpoint list (``ckpt_*``) after ``seq_len`` tokens."""
        shapes = {f"local_{name}": shape for name, shape in self.local.state_shapes(seq_len).items()}
        shapes.update({f"ckpt_{name}": shape for name, shape in self.ckpt.state_shapes(seq_len, layer="scout").items()})
        return shapes
