"""RAT (arXiv 2507.04416): a gated recurrence inside chunks, softmax attention across chunks.

Each document is cut into chunks of ``L`` tokens. Inside a chunk, keys and values run through a gated
exponential moving average that restarts at every chunk start::

    (k̃_t, ṽ_t) = g_t ⊙ (k̃_{t−1}, ṽ_{t−1}) + (1 − g_t) ⊙ (k_t, v_t),     g_t = σ(W_g x_t + b_g)

and a query attends, in one softmax, to its own running summary ``(k̃_t, ṽ_t)`` and to the *final* summaries of
every earlier chunk: :func:`seqzoo.ops.checkpoint_attention` with the running summaries as self terms and the
chunks' last summaries as checkpoints. ``L = 1`` is softmax attention over ``(1 − g) ⊙ k, (1 − g) ⊙ v``;
``L = T`` is a gated linear RNN.

The EMA is :func:`chunk_ema`: since no state crosses a chunk boundary it is ``L`` vectorised steps over all
chunks at once (the recurrence ``affine_scan`` solves, cut at every chunk start; ``tests/test_scout.py`` checks
the two agree), which keeps the layer compilable without a graph break.

As the RAT code: queries and keys are shared by groups of heads (``qk_heads``, its ``ngroups``), the gate is per
channel and shared by keys and values, its bias starts at ``log U(1, L − 1)`` (long memory inside a chunk),
RoPE runs on chunk indices (a token in chunk ``c`` has position ``c``: the running summary and the query
share one, a checkpoint sits ``c − c'`` chunks back), and the output is gated, ``out_proj(σ(z) ⊙ y)``. The
code's in-layer RMSNorm and residual are the language model's block here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from seqzoo.configs import ConfigError
from seqzoo.models.base import Call, StateShapes, TokenMixer, head_dim_for, op_backend
from seqzoo.models.cache import LayerCache
from seqzoo.models.checkpoint_attention import attend_checkpoints, checkpoint_state_shapes, segment_ends
from seqzoo.models.modules import RotaryEmbedding, upcast
from seqzoo.models.registry import register_mixer
from seqzoo.ops.checkpoint_attention import BACKENDS as CHECKPOINT_BACKENDS


def chunk_ema(a: torch.Tensor, b: torch.Tensor, call: Call, chunk_size: int, initial: torch.Tensor | None = None) -> torch.Tensor:
    """``h_t = a_t ⊙ h_{t−1} + b_t``, restarted (``h_{t−1} = 0``) at every token whose document position is a multiple of ``L``.

    Args:
        a, b: ``[batch, seq, *channels]``.
        call: the layout: packed documents (each from position 0) or a dense batch at position ``call.start[0]``.
        chunk_size: ``L``.
        initial: ``[batch, *channels]``, the state after the tokens before a dense call (used only when the call
            starts inside a chunk).

    Returns ``h [batch, seq, *channels]``.

    Since no state crosses a chunk boundary, the tokens are laid out on a grid of chunks ``[batch, chunks, L, …]``
    and the recurrence takes ``L`` vectorised steps over all chunks at once: ``O(seq)`` work, no scan across
    chunks, and (unlike a general scan) only plain tensor ops, so it compiles without a graph break. A dense
    call that starts ``lead`` tokens into a chunk gets ``lead`` padding slots in front, the last of which holds
    ``initial`` (with ``a = 0`` there, the slot's state is exactly ``initial``).
    """
    L, seq = chunk_size, b.shape[1]
    channels = b.shape[2:]
    flat_a, flat_b = a.flatten(2), b.flatten(2)
    if call.packed:
        # Chunk grid of every document, padded at its end; index ``seq`` is an appended zero row.
        slots = [
            bos + c * L + r if c * L + r < eos - bos else seq
            for bos, eos in zip(call.offsets[:-1], call.offsets[1:])
            for c in range(-(-(eos - bos) // L))
            for r in range(L)
        ]
        index = torch.tensor(slots, dtype=torch.long, device=b.device)
        grid_a = torch.cat([flat_a, flat_a.new_zeros(1, 1, flat_a.shape[2])], dim=1)[:, index].unflatten(1, (-1, L))
        grid_b = torch.cat([flat_b, flat_b.new_zeros(1, 1, flat_b.shape[2])], dim=1)[:, index].unflatten(1, (-1, L))
    else:
        lead = call.start[0] % L
        chunks = -(-(lead + seq) // L)
        tail = chunks * L - lead - seq
        front = flat_b.new_zeros(flat_b.shape[0], lead, flat_b.shape[2])
        if lead and initial is not None:
            front = torch.cat([front[:, :-1], initial.flatten(1).to(flat_b.dtype)[:, None]], dim=1)
        grid_a = F.pad(flat_a, (0, 0, lead, tail)).unflatten(1, (chunks, L))
        grid_b = torch.cat([front, F.pad(flat_b, (0, 0, 0, tail))], dim=1).unflatten(1, (chunks, L))
    state = grid_b[:, :, 0]
    steps = [state]
    for r in range(1, L):
        state = torch.addcmul(grid_b[:, :, r], grid_a[:, :, r], state)
        steps.append(state)
    h = torch.stack(steps, dim=2).flatten(1, 2)  # back to one token axis, grid order
    if call.packed:
        keep = torch.tensor([i for i, slot in enumerate(slots) if slot < seq], dtype=torch.long, device=b.device)
        h = h[:, keep]
    else:
        h = h[:, lead : lead + seq]
    return h.unflatten(2, channels)


@register_mixer("rat")
class RAT(TokenMixer):
    """RAT: chunk-local gated EMA of keys and values, checkpoint attention over the chunks' final summaries.

    Args:
        hidden_size: model width.
        layer_idx: position in the stack (unused; part of the mixer contract).
        num_heads: value heads (each with its own gates, so keys differ per head after the EMA). Default: 4.
        head_dim: per-head width. Default: ``hidden_size // num_heads``.
        qk_heads: query/key projections, each shared by ``num_heads / qk_heads`` heads. Default: 2.
        chunk_size: ``L``, tokens per chunk. Default: 16 (the paper's headline setting).
        rope_theta: RoPE base on chunk indices; ``None`` disables it.
        backend: the checkpoint-attention op's backend (``auto | reference | torch | triton``).

    Shapes: ``[batch, seq, hidden] -> [batch, seq, hidden]``.

    Cache: ``recurrent`` ``[batch, 2, heads·head_dim]`` (the running value and key summaries, fp32) and
    ``ckpt_key``/``ckpt_value`` ``[batch, ⌊n/L⌋, heads, head_dim]``, the final summaries of the ``⌊n/L⌋``
    chunks completed after ``n`` tokens (keys after RoPE). **The state grows as n / L**: ``state_size`` needs
    ``seq_len``; rows at different positions decode one by one (``ragged_rows = False``).
    """

    ragged_rows = False

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int = 0,
        num_heads: int = 4,
        head_dim: int | None = None,
        qk_heads: int = 2,
        chunk_size: int = 16,
        rope_theta: float | None = 10000.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        head_dim = head_dim_for("rat", hidden_size, num_heads, head_dim)
        if not isinstance(qk_heads, int) or qk_heads < 1 or num_heads % qk_heads:
            raise ConfigError(f"rat: qk_heads ({qk_heads}) must divide num_heads ({num_heads})")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ConfigError(f"rat: chunk_size must be an integer >= 1, got {chunk_size!r}")
        if rope_theta is not None and head_dim % 2:
            raise ConfigError(f"rat: RoPE needs an even head_dim, got {head_dim}")
        self.backend = op_backend("rat", "checkpoint_attention", backend, CHECKPOINT_BACKENDS)
        self.hidden_size, self.layer_idx = hidden_size, layer_idx
        self.num_heads, self.head_dim, self.qk_heads, self.chunk_size = num_heads, head_dim, qk_heads, chunk_size
        width = num_heads * head_dim
        self.split_sizes = [width, width, width, qk_heads * head_dim, qk_heads * head_dim]  # z, v, gate, q, k
        self.in_proj = nn.Linear(hidden_size, sum(self.split_sizes), bias=False)
        # σ(log u) = u / (1 + u) with u ~ U(1, L − 1): at init a chunk's summary remembers its first tokens.
        self.gate_bias = nn.Parameter(torch.empty(width).uniform_(1.0, max(1.0, chunk_size - 1.0)).log())
        self.out_proj = nn.Linear(width, hidden_size, bias=False)
        self.rotary = RotaryEmbedding(head_dim, rope_theta) if rope_theta is not None else None

    def summaries(
        self, k: torch.Tensor, v: torch.Tensor, gate_logits: torch.Tensor, cache: LayerCache | None, call: Call
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(positions [batch or 1, seq], k̃, ṽ [batch, seq, heads, head_dim])``: the running chunk summaries of
        the projected keys ``k [batch, seq, qk_heads·head_dim]``, values ``v`` and gate logits ``[batch, seq, heads·head_dim]``;
        a cached call continues from ``cache["recurrent"]`` in phase and leaves its last summaries there."""
        positions = call.positions(v.device)
        gate = torch.sigmoid(upcast(gate_logits) + upcast(self.gate_bias))  # [B, T, W]
        keys = rearrange(k, "b t (g d) -> b t g d", d=self.head_dim).repeat_interleave(self.num_heads // self.qk_heads, dim=2)
        b = (1.0 - gate)[:, :, None] * torch.stack([upcast(v), upcast(keys).flatten(2)], dim=2).to(gate.dtype)  # [B, T, 2, W]
        initial = None if cache is None else cache.get("recurrent")
        h = chunk_ema(gate[:, :, None].expand_as(b), b, call, self.chunk_size, initial)
        if cache is not None:
            cache.set("recurrent", h[:, -1].to(self.state_dtype()))
        v_sum, k_sum = (rearrange(t, "b t (h d) -> b t h d", d=self.head_dim).to(v.dtype) for t in h.unbind(2))
        return positions, k_sum, v_sum

    def mix(self, x: torch.Tensor, cache: LayerCache | None, call: Call) -> torch.Tensor:
        z, v, gate_logits, q, k = torch.split(self.in_proj(x), self.split_sizes, dim=-1)
        positions, k_sum, v_sum = self.summaries(k, v, gate_logits, cache, call)
        q = rearrange(q, "b t (g d) -> b t g d", d=self.head_dim)
        if self.rotary is not None:
            chunk_index = torch.div(positions, self.chunk_size, rounding_mode="floor")
            q, k_sum = self.rotary(q, chunk_index), self.rotary(k_sum, chunk_index)
        q = q.repeat_interleave(self.num_heads // self.qk_heads, dim=2)
        L = self.chunk_size
        k_ckpt, v_ckpt = segment_ends(k_sum, call, L), segment_ends(v_sum, call, L)
        ckpt_cache = None if cache is None else cache.scope("ckpt_")
        y = attend_checkpoints(q, k_sum, v_sum, k_ckpt, v_ckpt, ckpt_cache, call, L, self.backend)
        return self.out_proj(torch.sigmoid(z) * rearrange(y, "b t h d -> b t (h d)"))

    def state_shapes(self, seq_len: int | None = None) -> StateShapes:
        """The EMA state and the ``⌊seq_len / L⌋`` chunk summaries (they grow with the prompt)."""
        width = self.num_heads * self.head_dim
        shapes = {"recurrent": ((2, width), self.state_dtype())}
        ckpt = checkpoint_state_shapes(
            "rat", seq_len, self.chunk_size, self.num_heads, self.head_dim, self.head_dim, self.in_proj.weight.dtype
        )
        shapes.update({f"ckpt_{name}": shape for name, shape in ckpt.items()})
        return shapes
