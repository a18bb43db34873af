"""Triton GLA: the shared chunked kernels of :mod:`seqzoo.ops.simple_gla.triton` with per-key gates
(``G_MODE = 2``), plus the two kernels per-key gates need for the intra-chunk part. Layout, packing and
flags follow :mod:`seqzoo.ops.core.triton_host`; the launchers run inside that module's ``torch.library``
ops (``seqzoo::gla_triton_fwd`` / ``_bwd``), which call them for ``g_mode == 2``.

Secondary chunking (as in :mod:`seqzoo.ops.gla.chunk`): a 64-token chunk is cut into ``BC = 16`` row
sub-chunks. An off-diagonal block (query sub-chunk ``I`` after key sub-chunk ``J``) is one dot of
``q_I ⊙ exp(b_I − r)`` and ``k_J ⊙ exp(r − b_J)`` with ``r`` the cumulative gate at ``I``'s first row
(for ``dk``, the last row of the key's own sub-chunk), so both factors are ``<= 1``. Diagonal blocks
are summed exactly, one key column at a time, with the exponent masked before ``exp``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from seqzoo.ops.core.triton_host import BT, ChunkMeta, chunk_coords, tile
from seqzoo.ops.simple_gla.triton import chunk_gla, fused_gla

BC = 16  # sub-chunk rows: the smallest tl.dot tile


@triton.jit(do_not_specialize=["T"])
def _gla_intra_A_kernel(
    q,
    k,
    gc,
    A,
    cu_seqlens,
    chunk_indices,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One ``BC×BC`` block ``(I, J)``, ``J <= I``, of ``A_ij = scale·Σ_k q_ik k_jk exp(b_ik − b_jk)``."""
    i_c, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NC: tl.constexpr = BT // BC
    i_i, i_j = i_c // NC, i_c % NC
    if i_j > i_i:
        return  # A is zero-initialised above the block diagonal
    i_b, i_h = i_bh // H, i_bh % H
    bos, seq_len, i_ch = chunk_coords(i_t, i_b, T, cu_seqlens, chunk_indices, IS_VARLEN)
    start_i = i_ch * BT + i_i * BC
    if start_i >= seq_len:
        return
    o_c = tl.arange(0, BC)
    o_i = start_i + o_c
    m_i = o_i < seq_len
    o_j = i_ch * BT + i_j * BC + o_c
    m_j = o_j < seq_len
    b_A = tl.zeros([BC, BC], dtype=ACC)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        ptr_i = (bos + o_i)[:, None] * (H * K) + i_h * K + o_k[None, :]
        m_ik = m_i[:, None] & m_k[None, :]
        b_q = tl.load(q + ptr_i, mask=m_ik, other=0).to(ACC)
        b_gq = tl.load(gc + ptr_i, mask=m_ik, other=0).to(ACC)
        if i_i > i_j:
            b_ref = tl.load(gc + (bos + start_i) * (H * K) + i_h * K + o_k, mask=m_k, other=0).to(ACC)
            ptr_j = (bos + o_j)[None, :] * (H * K) + i_h * K + o_k[:, None]  # keys transposed [BK, BC]
            m_kj = m_k[:, None] & m_j[None, :]
            b_kt = tl.load(k + ptr_j, mask=m_kj, other=0).to(ACC)
            b_gkt = tl.load(gc + ptr_j, mask=m_kj, other=0).to(ACC)
            b_qg = b_q * tl.exp(tl.where(m_ik, b_gq - b_ref[None, :], float("-inf")))
            b_kg = b_kt * tl.exp(tl.where(m_kj, b_ref[:, None] - b_gkt, float("-inf")))
            b_A += tl.dot(b_qg, b_kg, input_precision=PRECISION)
        else:
            for j in range(0, BC):
                row_j = (bos + start_i + j) * (H * K) + i_h * K + o_k
                # Block-shaped comparison: a scalar bool mask breaks the interpreter when T == 1.
                m_kj = m_k & ((start_i + j + o_k * 0) < seq_len)
                b_kj = tl.load(k + row_j, mask=m_kj, other=0).to(ACC)
                b_gj = tl.load(gc + row_j, mask=m_kj, other=0).to(ACC)
                keep = (o_c[:, None] >= j) & m_ik
                col = tl.sum(b_q * b_kj[None, :] * tl.exp(tl.where(keep, b_gq - b_gj[None, :], float("-inf"))), axis=1)
                b_A = tl.where(o_c[None, :] == j, b_A + col[:, None], b_A)
    ptr_A = A + (bos + o_i)[:, None] * (H * BT) + i_h * BT + (i_j * BC + o_c)[None, :]
    tl.store(ptr_A, (b_A * scale).to(A.dtype.element_ty), mask=m_i[:, None])


@triton.jit(do_not_specialize=["T"])
def _gla_intra_bwd_kernel(
    q,
    k,
    gc,
    dA,
    dq,
    dk,
    cu_seqlens,
    chunk_indices,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Add the intra-chunk ``dq_i = Σ_j dA_ij k_j e^{b_i−b_j}`` and ``dk_j = Σ_i dA_ij q_i e^{b_i−b_j}``
    of one sub-chunk to ``dq, dk`` (which hold the inter-chunk part). ``dA`` already carries ``scale``."""
    i_k, i_tc, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NC: tl.constexpr = BT // BC
    i_t, i_i = i_tc // NC, i_tc % NC
    i_b, i_h = i_bh // H, i_bh % H
    bos, seq_len, i_ch = chunk_coords(i_t, i_b, T, cu_seqlens, chunk_indices, IS_VARLEN)
    start_i = i_ch * BT + i_i * BC
    if start_i >= seq_len:
        return
    o_c = tl.arange(0, BC)
    o_i = start_i + o_c
    m_i = o_i < seq_len
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    ptr_i = (bos + o_i)[:, None] * (H * K) + i_h * K + o_k[None, :]
    m_ik = m_i[:, None] & m_k[None, :]
    b_g = tl.load(gc + ptr_i, mask=m_ik, other=0).to(ACC)
    row_dA = (bos + o_i)[:, None] * (H * BT) + i_h * BT

    # dq from earlier sub-chunks, relative to this sub-chunk's first row.
    b_dq = tl.zeros([BC, BK], dtype=ACC)
    b_ref = tl.load(gc + (bos + start_i) * (H * K) + i_h * K + o_k, mask=m_k, other=0).to(ACC)
    for i_j in range(0, i_i):
        o_j = i_ch * BT + i_j * BC + o_c
        ptr_j = (bos + o_j)[:, None] * (H * K) + i_h * K + o_k[None, :]
        b_kj = tl.load(k + ptr_j, mask=m_k[None, :], other=0).to(ACC)
        b_gj = tl.load(gc + ptr_j, mask=m_k[None, :], other=0).to(ACC)
        b_dA = tl.load(dA + row_dA + (i_j * BC + o_c)[None, :], mask=m_i[:, None], other=0).to(ACC)
        b_dq += tl.dot(b_dA, b_kj * tl.exp(b_ref[None, :] - b_gj), input_precision=PRECISION)
    b_dq *= tl.exp(tl.where(m_ik, b_g - b_ref[None, :], float("-inf")))

    # dk from later sub-chunks, relative to this sub-chunk's last row.
    b_dk = tl.zeros([BC, BK], dtype=ACC)
    last_i = start_i + BC - 1
    if last_i < seq_len - 1:
        b_ref2 = tl.load(gc + (bos + last_i) * (H * K) + i_h * K + o_k, mask=m_k, other=0).to(ACC)
        for i_j in range(i_i + 1, NC):
            o_j = i_ch * BT + i_j * BC + o_c
            m_j = o_j < seq_len
            ptr_j = (bos + o_j)[:, None] * (H * K) + i_h * K + o_k[None, :]
            m_jk = m_j[:, None] & m_k[None, :]
            b_qj = tl.load(q + ptr_j, mask=m_jk, other=0).to(ACC)
            b_gj = tl.load(gc + ptr_j, mask=m_jk, other=0).to(ACC)
            # dAᵀ block [BC (this sub-chunk's keys), BC (later queries)] by swapped indexing.
            b_dAt = tl.load(dA + (bos + o_j)[None, :] * (H * BT) + i_h * BT + (i_i * BC + o_c)[:, None], mask=m_j[None, :], other=0).to(ACC)
            b_dk += tl.dot(b_dAt, b_qj * tl.exp(tl.where(m_jk, b_gj - b_ref2[None, :], float("-inf"))), input_precision=PRECISION)
        b_dk *= tl.exp(tl.where(m_ik, b_ref2[None, :] - b_g, float("-inf")))

    # Diagonal block exactly: one row/column of dA at a time.
    for j in range(0, BC):
        # Block-shaped comparisons: a scalar bool mask breaks the interpreter when T == 1.
        valid_j = (start_i + j + o_c * 0) < seq_len
        row_j = (bos + start_i + j) * (H * K) + i_h * K + o_k
        m_kj = m_k & ((start_i + j + o_k * 0) < seq_len)
        b_kj = tl.load(k + row_j, mask=m_kj, other=0).to(ACC)
        b_qj = tl.load(q + row_j, mask=m_kj, other=0).to(ACC)
        b_gj = tl.load(gc + row_j, mask=m_kj, other=0).to(ACC)
        # Column j of dA (queries i >= j of this sub-chunk) feeds dq; row j (keys r <= j) feeds dk.
        b_col = tl.load(dA + (bos + o_i) * (H * BT) + i_h * BT + i_i * BC + j, mask=m_i, other=0).to(ACC)
        b_row = tl.load(dA + (bos + start_i + j) * (H * BT) + i_h * BT + i_i * BC + o_c, mask=valid_j, other=0).to(ACC)
        keep_q = (o_c[:, None] >= j) & m_ik & valid_j[:, None]
        b_dq += b_col[:, None] * b_kj[None, :] * tl.exp(tl.where(keep_q, b_g - b_gj[None, :], float("-inf")))
        keep_k = (o_c[:, None] <= j) & m_ik & valid_j[:, None]
        b_dk += b_row[:, None] * b_qj[None, :] * tl.exp(tl.where(keep_k, b_gj[None, :] - b_g, float("-inf")))
    b_dq += tl.load(dq + ptr_i, mask=m_ik, other=0).to(ACC)
    b_dk += tl.load(dk + ptr_i, mask=m_ik, other=0).to(ACC)
    tl.store(dq + ptr_i, b_dq.to(dq.dtype.element_ty), mask=m_ik)
    tl.store(dk + ptr_i, b_dk.to(dk.dtype.element_ty), mask=m_ik)


def gla_intra_A(q: torch.Tensor, k: torch.Tensor, gc: torch.Tensor, m: ChunkMeta, scale: float) -> torch.Tensor:
    """Intra-chunk scores ``[B, T, H, BT]`` (zero above the diagonal, ``scale`` included) for per-key gates."""
    A = q.new_zeros(m.B, m.T, m.H, BT, dtype=m.acc)
    NC = BT // BC
    wrap_triton(_gla_intra_A_kernel)[(NC * NC, m.NT, m.B * m.H)](
        q, k, gc, A, m.cu_seqlens, m.chunk_indices, scale, m.T,
        H=m.H, K=m.K, BT=BT, BC=BC, BK=tile(m.K), IS_VARLEN=m.varlen, ACC=m.ACC, PRECISION=m.precision,
    )  # fmt: skip
    return A


def gla_intra_bwd(q, k, gc, dA, dq, dk, m: ChunkMeta) -> None:
    """Add the intra-chunk parts of ``dq, dk`` in place (both ``[B, T, H, K]``, accumulator dtype)."""
    BK = tile(m.K)
    grid = (triton.cdiv(m.K, BK), m.NT * (BT // BC), m.B * m.H)
    wrap_triton(_gla_intra_bwd_kernel)[grid](
        q, k, gc, dA, dq, dk, m.cu_seqlens, m.chunk_indices, m.T,
        H=m.H, K=m.K, BT=BT, BC=BC, BK=BK, IS_VARLEN=m.varlen, ACC=m.ACC, PRECISION=m.precision,
    )  # fmt: skip


def gla_triton(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Chunked Triton GLA (differentiable). Shapes as :func:`seqzoo.ops.gla.gla`."""
    return chunk_gla(
        q, k, v, g, 2,
        scale=scale, initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens, op="gla",
    )  # fmt: skip


def gla_fused(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Fused recurrent Triton GLA, forward only. Shapes as :func:`seqzoo.ops.gla.gla`."""
    return fused_gla(q, k, v, g, 2, scale=scale, initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens)
