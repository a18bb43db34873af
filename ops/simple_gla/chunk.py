"""Chunked-parallel simple GLA in PyTorch: the default backend off CUDA.

Within a chunk of ``C`` tokens the output is a masked ``C×C`` product computed for all chunks at once
as batched matmuls; only the ``num_chunks``-long state recurrence between chunks is a Python loop.
Gradients come from autograd through this form: it saves the chunk-boundary states and ``C×C``
intra-chunk tensors, so memory grows with ``seq / C`` states, never one state per token.

Chunks and packed sequences follow :class:`seqzoo.ops.core.ChunkLayout`; the chunk-to-chunk loop is
:func:`seqzoo.ops.core.scan_chunks`.
"""

from __future__ import annotations

import torch

from seqzoo.ops.core import ChunkLayout, compute_dtype, scan_chunks
from seqzoo.ops.utils import default_scale


def scan_gated_states(
    kv: torch.Tensor, decay: torch.Tensor | None, layout: ChunkLayout, initial_state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequential part of (simple) GLA: ``S_{n+1} = decay_n ⊙ S_n + kv_n``, restarted at every sequence start.

    Args:
        kv: each chunk's own contribution ``[rows, heads, num_chunks, K, V]``.
        decay: each chunk's total decay, broadcastable to ``kv`` (``None``: no decay).
        initial_state: ``[batch or num_seqs, heads, K, V]`` or ``None``.

    Returns:
        the state entering each chunk ``[rows, heads, num_chunks, K, V]`` and the final states
        ``[batch or num_seqs, heads, K, V]``.
    """
    if initial_state is not None:
        initial_state = initial_state.to(kv.dtype)

    def step(n: int, state: torch.Tensor) -> torch.Tensor:
        return kv[:, :, n] + (state if decay is None else state * decay[:, :, n])

    entering, finals = scan_chunks(layout, step, initial_state, lambda: kv.new_zeros(kv[:, :, 0].shape))
    return torch.stack(entering, dim=2), finals


def reverse_exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``y_i = Σ_{s>i} x_s`` along ``dim``; the last entry is an exact 0 that does not depend on ``x``."""
    shifted = torch.cat([x.narrow(dim, 1, x.shape[dim] - 1), torch.zeros_like(x.narrow(dim, 0, 1))], dim=dim)
    return shifted.flip(dim).cumsum(dim).flip(dim)


def simple_gla_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked simple GLA; same contract as :func:`seqzoo.ops.simple_gla.simple_gla`.

    Shapes: ``q, k [batch, seq, heads, K]``, ``v [batch, seq, heads, V]``, ``g [batch, seq, heads]`` or
    ``None``, states ``[batch or num_seqs, heads, K, V]``. Computes in fp32 (float64 for float64 inputs);
    returns ``o`` in ``q.dtype`` and the final state in the compute dtype (or ``None``).
    """
    batch, seq, heads, key_dim = q.shape
    acc = compute_dtype(q)
    scale = default_scale(scale, key_dim)
    layout = ChunkLayout.build(batch, seq, chunk_size, cu_seqlens, q.device, op="simple_gla")

    qc = layout.to_chunks(q.to(acc) * scale)
    kc = layout.to_chunks(k.to(acc))
    vc = layout.to_chunks(v.to(acc))
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    scores = qc @ kc.transpose(-1, -2)
    if g is None:
        scores = scores.masked_fill(~causal, 0.0)
        kv = kc.transpose(-1, -2) @ vc
        decay = None
        q_in = qc
    else:
        # Inclusive chunk-local cumsum of log gates: every factor below is exp(b_i - b_j) with i >= j
        # (or exp of the chunk total), so no exponent is positive and nothing can overflow.
        gc = layout.to_chunks(g.to(acc))
        b = torch.cumsum(gc, dim=-1)
        # The diagonal factor exp(b_i - b_i) is the constant 1: building it from b would add two
        # large, opposite gate-gradient terms whose rounding swamps a tiny true gradient (g → −30).
        diag = torch.eye(chunk_size, dtype=torch.bool, device=q.device)
        diff = (b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf")).masked_fill(diag, 0.0)
        scores = scores * diff.exp()
        # b_last - b_i as the exclusive reverse cumsum Σ_{s>i} g_s, for the same reason (exact 0 at the end).
        to_end = reverse_exclusive_cumsum(gc, dim=-1)
        kv = (kc * to_end.exp()[..., None]).transpose(-1, -2) @ vc
        decay = b[..., -1:].exp()[..., None]
        q_in = qc * b.exp()[..., None]
    states, finals = scan_gated_states(kv, decay, layout, initial_state)
    o = q_in @ states + scores @ vc
    o = layout.from_chunks(o).to(q.dtype)
    return o, (finals if output_final_state else None)
