"""Chunked-parallel simple GLA in PyTorch: the default backend off CUDA.

Within a chunk of ``C`` tokens the output is a masked ``C×C`` product computed for all chunks at once
as batched matmuls; only the ``num_chunks``-long state recurrence between chunks is a Python loop.
Gradients come from autograd through this form: it saves the chunk-boundary states and ``C×C``
intra-chunk tensors, so memory grows with ``seq / C`` states, never one state per token.

The packing helpers here (:class:`ChunkLayout`) are shared with :mod:`seqzoo.ops.gla.chunk`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

from seqzoo.ops.utils import default_scale


@dataclass
class ChunkLayout:
    """How ``[batch, seq]`` tokens map onto ``[rows, num_chunks, chunk]`` slots.

    Without ``cu_seqlens`` each batch row is one sequence, zero-padded at its end. With ``cu_seqlens``
    (batch 1) every packed sequence starts a new chunk and is zero-padded to a chunk multiple, so no
    chunk straddles two sequences; ``gather`` picks tokens into slots (index ``seq`` is a zero row)
    and ``scatter`` picks outputs back.
    """

    chunk: int
    num_chunks: int
    seq: int
    # chunk index -> sequence index for every chunk that starts a sequence.
    starts: dict[int, int]
    gather: torch.Tensor | None = None
    scatter: torch.Tensor | None = None

    @classmethod
    def build(cls, seq: int, chunk: int, cu_seqlens: torch.Tensor | None, device: torch.device) -> ChunkLayout:
        if cu_seqlens is None:
            return cls(chunk, max(1, -(-seq // chunk)), seq, {0: 0})
        offsets = cu_seqlens.tolist()
        gather, scatter, starts, n = [], [], {}, 0
        for i, (bos, eos) in enumerate(zip(offsets[:-1], offsets[1:])):
            starts[n] = i
            length = eos - bos
            chunks = -(-length // chunk)
            scatter.extend(range(n * chunk, n * chunk + length))
            gather.extend(range(bos, eos))
            gather.extend([seq] * (chunks * chunk - length))
            n += chunks
        as_index = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
        return cls(chunk, n, seq, starts, as_index(gather), as_index(scatter))

    def to_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, seq, heads, *d]`` → ``[rows, heads, num_chunks, chunk, *d]`` (zero padding)."""
        if self.gather is None:
            pad = self.num_chunks * self.chunk - self.seq
            if pad:
                x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
            return rearrange(x, "b (n c) h ... -> b h n c ...", c=self.chunk)
        flat = torch.cat([x[0], x.new_zeros(1, *x.shape[2:])], dim=0)
        return rearrange(flat[self.gather], "(n c) h ... -> 1 h n c ...", c=self.chunk)

    def from_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """``[rows, heads, num_chunks, chunk, *d]`` → ``[batch, seq, heads, *d]`` (padding dropped)."""
        x = rearrange(x, "b h n c ... -> b (n c) h ...")
        if self.gather is None:
            return x[:, : self.seq]
        return x[:, self.scatter]

    def initial_states(self, initial_state: torch.Tensor | None, num_seqs: int) -> list[torch.Tensor | None]:
        """The initial state each sequence start loads, shaped ``[rows, heads, K, V]`` (or ``None``)."""
        if self.gather is None:
            return [initial_state]
        return [None if initial_state is None else initial_state[i : i + 1] for i in range(num_seqs)]


def scan_chunk_states(
    kv: torch.Tensor,
    decay: torch.Tensor | None,
    layout: ChunkLayout,
    initial_state: torch.Tensor | None,
    num_seqs: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequential part: ``S_{n+1} = decay_n ⊙ S_n + kv_n``, restarted at every sequence start.

    Args:
        kv: each chunk's own contribution ``[rows, heads, num_chunks, K, V]``.
        decay: each chunk's total decay, broadcastable to ``kv`` (``None``: no decay).
        initial_state: ``[batch or num_seqs, heads, K, V]`` or ``None``.

    Returns:
        the state entering each chunk ``[rows, heads, num_chunks, K, V]`` and the final states
        ``[batch or num_seqs, heads, K, V]``.
    """
    h0 = layout.initial_states(initial_state, num_seqs)
    states, finals, state = [], [], None
    for n in range(layout.num_chunks):
        seq_index = layout.starts.get(n)
        if seq_index is not None:
            if state is not None:
                finals.append(state)
            start = h0[seq_index]
            state = kv.new_zeros(kv[:, :, 0].shape) if start is None else start.to(kv.dtype)
        states.append(state)
        state = kv[:, :, n] + (state if decay is None else state * decay[:, :, n])
    finals.append(state)
    return torch.stack(states, dim=2), torch.cat(finals, dim=0)


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
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = default_scale(scale, key_dim)
    num_seqs = batch if cu_seqlens is None else cu_seqlens.numel() - 1
    layout = ChunkLayout.build(seq, chunk_size, cu_seqlens, q.device)

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
    states, finals = scan_chunk_states(kv, decay, layout, initial_state, num_seqs)
    o = q_in @ states + scores @ vc
    o = layout.from_chunks(o).to(q.dtype)
    return o, (finals if output_final_state else None)
