"""The chunk layout every chunked op uses: how ``[batch, seq]`` tokens (or packed sequences) map onto chunks.

A chunked op cuts each sequence into chunks of ``chunk`` tokens; the last chunk of a sequence may be
partial and is zero-padded. With ``cu_seqlens`` (batch 1, sequences packed along ``seq``) every sequence
starts a new chunk, so no chunk ever straddles two sequences and each sequence has its own initial and
final state. One :class:`ChunkLayout` describes both cases to both kinds of code:

* the PyTorch paths move tensors into chunks (:meth:`ChunkLayout.to_chunks`), run their intra-chunk
  algebra for all chunks at once, then walk the chunk-to-chunk state recurrence with
  :func:`scan_chunks`, which restarts at every sequence;
* the Triton host code passes :meth:`ChunkLayout.chunk_indices` (``[total_chunks, 2]``: sequence,
  chunk within it) to per-chunk kernels and :meth:`ChunkLayout.chunk_offsets_tensor` (first chunk of
  each sequence) to the state kernels, fla's packing convention.

The packed offsets are read on the host once per call (the layout needs them); a dense batch needs no
host read, so the dense path traces cleanly under ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange

from seqzoo.ops.core.checks import check_offsets


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose gradient is handed back contiguous.

    The gradient a chunked path sends back to its inputs comes through the chunk permutation, so it is
    strided. Eager autograd does not mind, but ``torch.compile``'s traced backward can assume other strides
    than eager kernels produce for the elementwise op that receives it (``elu``'s or ``softplus``'s backward
    did), and then a ``view`` in the user's projection fails at run time. A contiguous gradient is the same
    in both, and the elementwise ops upstream run faster on it anyway.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad.contiguous()


@dataclass
class ChunkLayout:
    """Where every token of a call sits in a grid of chunks.

    Attributes:
        chunk: tokens per chunk.
        seq: tokens per row of the input (``[batch, seq]``; the packed total with ``cu_seqlens``).
        batch: rows of the input (1 with ``cu_seqlens``).
        offsets: host copy of ``cu_seqlens`` (``None`` for a dense batch).
        chunk_offsets: first chunk of every sequence plus the total, ``[num_seqs + 1]``; for a dense
            batch ``[0, num_chunks]`` (all rows advance through their chunks together).
        num_chunks: chunks per row (dense), or chunks in all (packed).
    """

    chunk: int
    seq: int
    batch: int
    offsets: list[int] | None
    chunk_offsets: list[int]
    num_chunks: int
    _gather: torch.Tensor | None = field(default=None, repr=False)
    _scatter: torch.Tensor | None = field(default=None, repr=False)
    _device: torch.device | None = field(default=None, repr=False)

    @classmethod
    def build(cls, batch: int, seq: int, chunk: int, cu_seqlens: torch.Tensor | None, device: torch.device, op: str = "op") -> ChunkLayout:
        """The layout of a ``[batch, seq]`` call (``cu_seqlens`` offsets ``[num_seqs + 1]`` for a packed one).

        Packed offsets are checked here (start at 0, end at ``seq``, strictly increasing) since they are
        read anyway; ``op`` names the caller in that one-line error.
        """
        if cu_seqlens is None:
            n = max(1, -(-seq // chunk))
            return cls(chunk, seq, batch, None, [0, n], n, _device=device)
        offsets = [int(o) for o in cu_seqlens.tolist()]
        check_offsets(op, offsets, seq)
        chunk_offsets = [0]
        for bos, eos in zip(offsets[:-1], offsets[1:]):
            chunk_offsets.append(chunk_offsets[-1] + -(-(eos - bos) // chunk))
        return cls(chunk, seq, batch, offsets, chunk_offsets, chunk_offsets[-1], _device=device)

    @property
    def packed(self) -> bool:
        """Whether the call packs several sequences along ``seq`` (``cu_seqlens`` given)."""
        return self.offsets is not None

    @property
    def num_seqs(self) -> int:
        """Sequences of the call: the batch, or the packed sequences; one initial/final state each."""
        return self.batch if self.offsets is None else len(self.offsets) - 1

    # ----------------------------------------------------------------------------- PyTorch paths

    def _indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed only: ``gather`` (token of every chunk slot, ``seq`` = a zero row for padding) and ``scatter``
        (slot of every token), built once per layout."""
        if self._gather is None:
            gather, scatter = [], []
            for i, (bos, eos) in enumerate(zip(self.offsets[:-1], self.offsets[1:])):
                first = self.chunk_offsets[i] * self.chunk
                slots = (self.chunk_offsets[i + 1] - self.chunk_offsets[i]) * self.chunk
                gather.extend(range(bos, eos))
                gather.extend([self.seq] * (slots - (eos - bos)))
                scatter.extend(range(first, first + eos - bos))
            self._gather = torch.tensor(gather, dtype=torch.long, device=self._device)
            self._scatter = torch.tensor(scatter, dtype=torch.long, device=self._device)
        return self._gather, self._scatter

    def to_chunks(self, x: torch.Tensor, chunk_major: bool = False) -> torch.Tensor:
        """``[batch, seq, heads, *d]`` (or ``[batch, seq, heads]``) → ``[rows, heads, num_chunks, chunk, *d]``,
        zero-padded; ``rows`` is the batch (1 when packed).

        ``chunk_major=True`` gives ``[num_chunks, rows, heads, chunk, *d]`` instead, so that each step of a
        sequential loop over chunks reads one contiguous block.
        """
        if x.requires_grad:
            x = _ContiguousGrad.apply(x)
        if self.offsets is None:
            pad = self.num_chunks * self.chunk - self.seq
            if pad:
                x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        else:
            gather, _ = self._indices()
            x = torch.cat([x, x.new_zeros(1, 1, *x.shape[2:])], dim=1)[:, gather]
        pattern = "b (n c) h ... -> n b h c ..." if chunk_major else "b (n c) h ... -> b h n c ..."
        return rearrange(x, pattern, c=self.chunk)

    def from_chunks(self, x: torch.Tensor, chunk_major: bool = False) -> torch.Tensor:
        """Inverse of :meth:`to_chunks`: back to ``[batch, seq, heads, *d]``, padding dropped."""
        pattern = "n b h c ... -> b (n c) h ..." if chunk_major else "b h n c ... -> b (n c) h ..."
        x = rearrange(x, pattern)
        if self.offsets is None:
            return x[:, : self.seq]
        _, scatter = self._indices()
        return x[:, scatter]

    # ------------------------------------------------------------------------------- Triton host

    def chunk_indices(self) -> torch.Tensor:
        """``[total_chunks, 2]`` int32 on the device: (sequence, chunk within it) of every chunk, for per-chunk grids.

        A dense batch is described as the packing of its flattened ``[1, batch·seq]`` view.
        """
        offsets = self._packed_chunk_offsets()
        pairs = [(i, c) for i in range(len(offsets) - 1) for c in range(offsets[i + 1] - offsets[i])]
        return torch.tensor(pairs, dtype=torch.int32, device=self._device).reshape(-1, 2)

    def chunk_offsets_tensor(self) -> torch.Tensor:
        """``[num_seqs + 1]`` int32 on the device: first chunk of every sequence (dense: of every batch row)."""
        return torch.tensor(self._packed_chunk_offsets(), dtype=torch.int32, device=self._device)

    def cu_seqlens_tensor(self) -> torch.Tensor:
        """``[num_seqs + 1]`` int32 on the device: the packing offsets (dense: ``[0, seq, 2·seq, …]``)."""
        offsets = self.offsets if self.offsets is not None else [i * self.seq for i in range(self.batch + 1)]
        return torch.tensor(offsets, dtype=torch.int32, device=self._device)

    def _packed_chunk_offsets(self) -> list[int]:
        if self.offsets is not None:
            return self.chunk_offsets
        return [i * self.num_chunks for i in range(self.batch + 1)]


def scan_chunks(
    layout: ChunkLayout,
    step: Callable[[int, torch.Tensor], torch.Tensor],
    initial_state: torch.Tensor | None,
    zero_state: Callable[[], torch.Tensor],
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The sequential part of every chunked op: walk the chunks in order, restarting at each sequence.

    Args:
        layout: the call's :class:`ChunkLayout`.
        step: ``step(n, S)`` → the state leaving chunk ``n`` given the state ``S`` entering it
            (``[rows, …]``; rows = batch, or 1 when packed).
        initial_state: ``[num_seqs, …]`` or ``None``.
        zero_state: builds the ``[rows, …]`` zero state of a sequence without an initial state.

    Returns:
        ``(entering, finals)``: the state entering every chunk, in chunk order (a list of ``[rows, …]``),
        and the state leaving every sequence, ``[num_seqs, …]``.
    """
    entering, finals = [], []
    groups = len(layout.chunk_offsets) - 1
    for i in range(groups):
        if initial_state is None:
            state = zero_state()
        else:
            state = initial_state if not layout.packed else initial_state[i : i + 1]
        for n in range(layout.chunk_offsets[i], layout.chunk_offsets[i + 1]):
            entering.append(state)
            state = step(n, state)
        finals.append(state)
    return entering, (finals[0] if len(finals) == 1 else torch.cat(finals, dim=0))


def packed_to_padded(x: torch.Tensor, offsets: tuple[int, ...] | list[int]) -> torch.Tensor:
    """``[1, total, *d]`` sequences packed at ``offsets`` → ``[num_seqs, max_len, *d]``, zero-padded at the end.

    For ops whose kernels take a dense batch and whose outputs at a position depend only on earlier
    positions: the padding comes after each sequence, so it changes none of its outputs.
    """
    lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    width = max(lengths)
    index = torch.tensor([[a + j if j < n else offsets[-1] for j in range(width)] for a, n in zip(offsets[:-1], lengths)], device=x.device)
    source = torch.cat([x[0], x.new_zeros(1, *x.shape[2:])])  # row ``total`` is the zero padding
    return source[index]


def padded_to_packed(y: torch.Tensor, offsets: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Inverse of :func:`packed_to_padded`: ``[num_seqs, max_len, *d]`` → ``[1, total, *d]``, padding dropped."""
    lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    rows = torch.tensor([i for i, n in enumerate(lengths) for _ in range(n)], device=y.device)
    cols = torch.tensor([j for n in lengths for j in range(n)], device=y.device)
    return y[rows, cols][None]
