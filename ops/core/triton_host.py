"""The one convention every chunked Triton kernel family follows: call metadata, dtypes, tiles, coordinates, names.

Imported only where Triton runs (it imports ``triton``); the rest of :mod:`seqzoo.ops.core` never needs it.

**Layout.** Token tensors are ``[B, T, H, D]`` and contiguous, so time steps are ``H·D`` elements apart and a
dense batch is the same memory as its flattened ``[1, B·T]`` view. Packed sequences (``cu_seqlens``, batch 1)
are cut into chunks by :class:`~seqzoo.ops.core.chunks.ChunkLayout`, the same object the PyTorch paths use;
:func:`packed_indices` turns it into the three index tensors of fla's packing convention:

* ``cu_seqlens [N + 1]`` (int64): first token of every sequence, then the total;
* ``chunk_indices [total_chunks, 2]`` (int32): (sequence, chunk within it) of every chunk;
* ``chunk_offsets [N + 1]`` (int64): first chunk of every sequence in the per-chunk state buffers.

They are built on the host, *outside* the ``torch.library`` ops, because building them reads the offsets
(a host sync); inside an op everything is derived from shapes (:class:`ChunkMeta`), so the ops trace under
``torch.compile`` and a dense batch needs no index tensor at all.

**Grids and flags.** Per-chunk kernels run on ``(…, NT, B·H)`` and state kernels on ``(…, N·H)``. With
``IS_VARLEN`` (a constexpr, set when ``cu_seqlens`` is given) a per-chunk program reads its sequence and
chunk from ``chunk_indices`` (``NT`` is then the total chunk count and ``B = 1``); without it, program
``(i_t, i_b)`` is chunk ``i_t`` of row ``i_b``. :func:`chunk_coords` and :func:`seq_coords` are that rule,
written once; every offset they return is int64 (fla #1080: int32 offsets wrap past ``B·T·H·D = 2³¹``).
Other flags: ``G_MODE`` (0 no gate, 1 a scalar log gate per head, 2 a per-key log gate), ``USE_H0``,
``STORE_HT``, ``USE_DHT``, ``STORE_DH0`` for optional tensors, ``ACC`` for the accumulator dtype
(:func:`tl_dtype`) and ``PRECISION`` for every ``tl.dot`` (:func:`~seqzoo.ops.core.precision.dot_precision`
of the caller's input dtype: ``"ieee"`` for fp32/fp64, ``"tf32"`` for bf16/fp16, the reasons are in
:mod:`seqzoo.ops.core.precision`).

**Names.** Kernels are module-private and end in ``_kernel`` (``_chunk_fwd_o_kernel``); the Python launcher
that sizes the grid and allocates outputs is named after the stage (``chunk_fwd_o``); jitted device helpers
shared between modules (this module, :mod:`.triton_stages`) are public plain names. Launches inside a
``torch.library.triton_op`` go through ``torch.library.wrap_triton``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from seqzoo.ops.core.chunks import ChunkLayout
from seqzoo.ops.utils import autotune_configs

BT = 64  # chunk length of every chunked kernel: a multiple of the 16-row sub-blocks (GLA's intra kernels, the blocked inverse)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulator (and state) dtype for inputs of ``dtype``: fp64 for fp64, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    """:func:`acc_dtype` as the ``ACC`` constexpr of a kernel."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def tile(dim: int, cap: int = 64) -> int:
    """Tile width for a head dimension: the next power of two, at least 16 (every ``tl.dot`` dimension must be,
    on NVIDIA) and at most ``cap``; masks cover the rest."""
    return max(16, min(cap, triton.next_power_of_2(dim)))


def kv_block_configs() -> list:
    """Autotune configs ``{BK, BV}`` of the key/value-blocked kernels; the first fits every shape (masks make
    64-wide tiles valid for any head size), which is all the interpreter and ``SEQZOO_AUTOTUNE=0`` run."""
    return autotune_configs(
        [triton.Config({"BK": bk, "BV": bv}, num_warps=w, num_stages=2) for bk, bv in ((64, 64), (64, 32), (32, 64)) for w in (4, 8)]
    )


class PackedIndices(NamedTuple):
    """The packing of a call as device tensors (see the module docstring)."""

    cu_seqlens: torch.Tensor  # [N + 1] int64
    chunk_indices: torch.Tensor  # [total_chunks, 2] int32
    chunk_offsets: torch.Tensor  # [N + 1] int64


def packed_indices(layout: ChunkLayout) -> PackedIndices:
    """The index tensors of ``layout``; a dense layout gives those of its flattened ``[1, B·T]`` view."""
    return PackedIndices(
        layout.cu_seqlens_tensor().to(torch.int64),
        layout.chunk_indices(),
        layout.chunk_offsets_tensor().to(torch.int64),
    )


def varlen_indices(
    cu_seqlens: torch.Tensor | None, batch: int, seq: int, device: torch.device, op: str, chunk: int = BT
) -> PackedIndices | None:
    """:func:`packed_indices` of a packed call (reads ``cu_seqlens`` on the host once); ``None`` for a dense
    batch, whose kernels run with ``IS_VARLEN=False`` and need no index tensor."""
    if cu_seqlens is None:
        return None
    return packed_indices(ChunkLayout.build(batch, seq, chunk, cu_seqlens, device, op))


@dataclass(frozen=True)
class ChunkMeta:
    """Sizes, packing and dtypes of one call of a chunked kernel family, shared by its launches.

    Built inside an op from shapes only (no host read), so fake-tensor tracing sees the same numbers.

    Attributes:
        B, T, H, K, V: batch (1 when packed), tokens per row, heads, key and value dims.
        cu_seqlens, chunk_indices, chunk_offsets: the :class:`PackedIndices` (``None`` for a dense batch).
        N: sequences (one initial/final state each): ``B``, or the packed count.
        NT: per-chunk programs along grid axis 1: chunks per row (dense) or all chunks (packed).
        total_chunks: rows of the per-chunk state buffers ``[total_chunks, H, K, V]``.
        acc: accumulator dtype (:func:`acc_dtype`); ``ACC`` is its ``tl`` form.
        precision: ``input_precision`` of every ``tl.dot`` (``PRECISION``).
        chunk: tokens per chunk (``BT``).
    """

    B: int
    T: int
    H: int
    K: int
    V: int
    cu_seqlens: torch.Tensor | None
    chunk_indices: torch.Tensor | None
    chunk_offsets: torch.Tensor | None
    N: int
    NT: int
    total_chunks: int
    acc: torch.dtype
    precision: str
    chunk: int = BT

    @classmethod
    def build(
        cls,
        q: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        chunk_indices: torch.Tensor | None,
        chunk_offsets: torch.Tensor | None,
        precision: str,
        chunk: int = BT,
    ) -> ChunkMeta:
        """From ``q [B, T, H, K]``, ``v [B, T, H, V]`` and the packing tensors (all ``None`` for a dense batch)."""
        B, T, H, K = q.shape
        if cu_seqlens is None:
            N, NT = B, triton.cdiv(T, chunk)
            total = B * NT
        else:
            N, NT = cu_seqlens.shape[0] - 1, chunk_indices.shape[0]
            total = NT
        return cls(B, T, H, K, v.shape[-1], cu_seqlens, chunk_indices, chunk_offsets, N, NT, total, acc_dtype(q.dtype), precision, chunk)

    @property
    def varlen(self) -> bool:
        """``IS_VARLEN``: whether the call packs sequences."""
        return self.cu_seqlens is not None

    @property
    def ACC(self) -> tl.dtype:
        """The accumulator dtype as the kernels' ``ACC`` constexpr."""
        return tl_dtype(self.acc)


# --------------------------------------------------------------------------------------------- device side


@triton.jit
def chunk_coords(i_t, i_b, T, cu_seqlens, chunk_indices, IS_VARLEN: tl.constexpr):
    """``(bos, seq_len, i_c)`` of per-chunk program ``(i_t, i_b)``: the sequence's first token in the flattened
    token axis, its length and the chunk's index inside it, all int64."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int64)
        i_c = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int64)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    else:
        bos = i_b.to(tl.int64) * T
        seq_len = T + bos * 0
        i_c = i_t.to(tl.int64)
    return bos, seq_len, i_c


@triton.jit
def global_chunk(i_t, i_b, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Row of per-chunk program ``(i_t, i_b)`` in the ``[total_chunks, H, K, V]`` state buffers (int64)."""
    if IS_VARLEN:
        i_tg = i_t.to(tl.int64)
    else:
        i_tg = i_b.to(tl.int64) * tl.cdiv(T, BT) + i_t
    return i_tg


@triton.jit
def seq_span(i_n, T, cu_seqlens, IS_VARLEN: tl.constexpr):
    """``(bos, seq_len)`` of sequence ``i_n``: its first token in the flattened token axis and its length (int64)."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    else:
        bos = i_n.to(tl.int64) * T
        seq_len = T + bos * 0
    return bos, seq_len


@triton.jit
def seq_coords(i_n, T, cu_seqlens, chunk_offsets, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """``(bos, seq_len, boh)`` of sequence ``i_n``: :func:`seq_span` and the sequence's first row in the
    ``[total_chunks, H, K, V]`` state buffers (int64)."""
    bos, seq_len = seq_span(i_n, T, cu_seqlens, IS_VARLEN)
    if IS_VARLEN:
        boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        boh = i_n.to(tl.int64) * tl.cdiv(T, BT)
    return bos, seq_len, boh


@triton.jit
def load_rows(x, bos, o_t, m_t, o_d, m_d, H: tl.constexpr, D: tl.constexpr, i_h, ACC: tl.constexpr):
    """The ``[rows, cols]`` tile (tokens ``bos + o_t``, features ``o_d``) of a ``[tokens, H, D]`` tensor, in ``ACC``."""
    ptr = x + ((bos + o_t) * H + i_h)[:, None] * D + o_d[None, :]
    return tl.load(ptr, mask=m_t[:, None] & m_d[None, :], other=0.0).to(ACC)


@triton.jit
def load_cols(x, bos, o_t, m_t, o_d, m_d, H: tl.constexpr, D: tl.constexpr, i_h, ACC: tl.constexpr):
    """The transposed ``[cols, rows]`` tile of a ``[tokens, H, D]`` tensor, loaded as such (no ``tl.trans``)."""
    ptr = x + ((bos + o_t) * H + i_h)[None, :] * D + o_d[:, None]
    return tl.load(ptr, mask=m_t[None, :] & m_d[:, None], other=0.0).to(ACC)


@triton.jit
def store_rows(x, val, bos, o_t, m_t, o_d, m_d, H: tl.constexpr, D: tl.constexpr, i_h):
    """Store a ``[rows, cols]`` tile into a ``[tokens, H, D]`` tensor (cast to its dtype)."""
    ptr = x + ((bos + o_t) * H + i_h)[:, None] * D + o_d[None, :]
    tl.store(ptr, val.to(x.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])


@triton.jit
def load_token(x, bos, o_t, m_t, H: tl.constexpr, i_h, ACC: tl.constexpr):
    """The ``[rows]`` vector of a per-token, per-head ``[tokens, H]`` tensor (scalar gates, ``β``)."""
    return tl.load(x + (bos + o_t) * H + i_h, mask=m_t, other=0.0).to(ACC)


@triton.jit
def load_state(x, o_k, m_k, o_v, m_v, V: tl.constexpr, ACC: tl.constexpr):
    """The ``[BK, BV]`` tile of one ``[K, V]`` state matrix starting at ``x``."""
    return tl.load(x + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0).to(ACC)


@triton.jit
def load_state_t(x, o_k, m_k, o_v, m_v, V: tl.constexpr, ACC: tl.constexpr):
    """The same tile transposed, ``[BV, BK]``, loaded as such (no ``tl.trans``)."""
    return tl.load(x + o_k[None, :] * V + o_v[:, None], mask=m_k[None, :] & m_v[:, None], other=0.0).to(ACC)


@triton.jit
def store_state(x, val, o_k, m_k, o_v, m_v, V: tl.constexpr):
    """Store a ``[BK, BV]`` tile of one ``[K, V]`` state matrix starting at ``x``."""
    tl.store(x + o_k[:, None] * V + o_v[None, :], val.to(x.dtype.element_ty), mask=m_k[:, None] & m_v[None, :])
