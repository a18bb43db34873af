"""Triton kernels for chunked gated linear attention, shared by ``simple_gla`` and ``gla``.

Layout follows ``specs/triton.md`` §2.1–2.5. Every kernel takes a ``G_MODE`` constexpr: 0 no gate,
1 a scalar log gate per head (simple GLA), 2 a per-key log gate (GLA). Forward:

1. ``chunk_cumsum_kernel``: chunk-local inclusive cumsum of the log gates (fp32).
2. ``chunk_fwd_h_kernel``: the state entering every chunk, sequential over chunks, grid ``(K/BK, V/BV, N·H)``.
3. intra-chunk scores ``A [B, T, H, BT]``: ``chunk_scalar_A_kernel`` here; GLA's per-key version
   (secondary chunking) lives in :mod:`seqzoo.ops.gla.triton`.
4. ``chunk_fwd_o_kernel``: ``o = scale·(q ⊙ e^b) h + A v``.

Backward recomputes the states (kernel 2), walks ``dh`` back over chunks (``chunk_bwd_dh_kernel``),
forms ``dA = scale·dO vᵀ`` (gated for scalar gates), then ``dv`` and ``dq, dk``. The gate gradient is
``dg = reverse_cumsum(q ⊙ dq − k ⊙ dk)`` per sequence, plus ``Σ_v ht ⊙ dht`` on every token of a
sequence with a final-state cotangent: the gate only moves ``q`` and ``k`` against each other (and
scales the final state), so this identity needs no per-chunk gate terms. It runs as two elementwise
torch ops and a cumsum, memory-bound and cheap next to the kernels. Its error is absolute, about
``eps·Σ|q ⊙ dq|``: where the true gate gradient is itself tiny (every gate near −30) it is only
correct to that absolute level, which the torch path (autograd with exact-zero diagonal exponents)
does better.

Accumulation is fp32 (fp64 for fp64 inputs, which ``gradcheck`` uses). The interpreter cannot do
bf16 math, so the wrapper runs bf16 inputs in fp32 when interpreting. Dots run in the accumulator
dtype (tf32 on NVIDIA by default for fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqzoo.ops.core import TRITON_INTERPRET
from seqzoo.ops.utils import autotune_configs, default_scale

BT = 64  # chunk length; a multiple of the 16-row sub-chunks GLA's intra kernels use


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _tile(dim: int, cap: int = 64) -> int:
    # tl.dot needs every dimension >= 16; masks cover the rest.
    return max(16, min(cap, triton.next_power_of_2(dim)))


def _state_configs() -> list:
    # The first config must fit every shape: masks make 64-wide tiles valid for any head size.
    return autotune_configs(
        [
            triton.Config({"BK": bk, "BV": bv}, num_warps=w, num_stages=s)
            for bk, bv in ((64, 64), (64, 32), (32, 64))
            for w in (4, 8)
            for s in (2,)
        ]
    )


@triton.jit
def _chunk_coords(i_t, i_b, T, cu_seqlens, chunk_indices, IS_VARLEN: tl.constexpr):
    """(first token of the sequence, sequence length, chunk index inside the sequence), all int64."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int64)
        i_c = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int64)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        seq_len = eos - bos
    else:
        bos = i_b.to(tl.int64) * T
        seq_len = T + bos * 0
        i_c = i_t.to(tl.int64)
    return bos, seq_len, i_c


@triton.jit
def _global_chunk(i_t, i_b, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Index of a chunk in the ``[total_chunks, H, K, V]`` state buffers."""
    if IS_VARLEN:
        i_tg = i_t.to(tl.int64)
    else:
        i_tg = i_b.to(tl.int64) * tl.cdiv(T, BT) + i_t
    return i_tg


@triton.jit
def chunk_cumsum_kernel(
    g,
    gc,
    cu_seqlens,
    chunk_indices,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    PER_KEY: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    ACC: tl.constexpr,
):
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    bos, seq_len, i_c = _chunk_coords(i_t, i_b, T, cu_seqlens, chunk_indices, IS_VARLEN)
    o_t = i_c * BT + tl.arange(0, BT)
    m_t = o_t < seq_len
    if PER_KEY:
        o_k = i_k * BK + tl.arange(0, BK)
        ptr = (bos + o_t)[:, None] * (H * K) + i_h * K + o_k[None, :]
        mask = m_t[:, None] & (o_k < K)[None, :]
        b_g = tl.load(g + ptr, mask=mask, other=0).to(ACC)
        tl.store(gc + ptr, tl.cumsum(b_g, axis=0).to(gc.dtype.element_ty), mask=mask)
    else:
        ptr = (bos + o_t) * H + i_h
        b_g = tl.load(g + ptr, mask=m_t, other=0).to(ACC)
        tl.store(gc + ptr, tl.cumsum(b_g, axis=0).to(gc.dtype.element_ty), mask=m_t)


@triton.autotune(configs=_state_configs(), key=["K", "V", "G_MODE"])
@triton.jit(do_not_specialize=["T"])
def chunk_fwd_h_kernel(
    k,
    v,
    gc,
    h,
    h0,
    ht,
    cu_seqlens,
    chunk_offsets,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    G_MODE: tl.constexpr,
    USE_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    ACC: tl.constexpr,
):
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
        boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        seq_len = T + bos * 0
        boh = i_n.to(tl.int64) * tl.cdiv(T, BT)
    NT = tl.cdiv(seq_len, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    o_kv = o_k[:, None] * V + o_v[None, :]
    m_kv = m_k[:, None] & m_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=ACC)
    if USE_H0:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * (K * V) + o_kv, mask=m_kv, other=0).to(ACC)
    for i_t in range(0, NT):
        tl.store(h + ((boh + i_t) * H + i_h) * (K * V) + o_kv, b_h.to(h.dtype.element_ty), mask=m_kv)
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < seq_len
        last = bos + tl.minimum(i_t * BT + BT, seq_len) - 1
        # k loaded transposed [BK, BT] so the update is one dot with v [BT, BV].
        b_k = tl.load(k + (bos + o_t)[None, :] * (H * K) + i_h * K + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0).to(ACC)
        b_v = tl.load(v + (bos + o_t)[:, None] * (H * V) + i_h * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0).to(ACC)
        if G_MODE == 1:
            b_g = tl.load(gc + (bos + o_t) * H + i_h, mask=m_t, other=0).to(ACC)
            g_last = tl.load(gc + last * H + i_h).to(ACC)
            b_h *= tl.exp(g_last)
            b_k *= tl.exp(g_last - b_g)[None, :]
        if G_MODE == 2:
            b_g = tl.load(gc + (bos + o_t)[None, :] * (H * K) + i_h * K + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0).to(ACC)
            g_last = tl.load(gc + last * (H * K) + i_h * K + o_k, mask=m_k, other=0).to(ACC)
            b_h *= tl.exp(g_last)[:, None]
            b_k *= tl.exp(g_last[:, None] - b_g)
        b_h += tl.dot(b_k, b_v)
    if STORE_HT:
        tl.store(ht + i_nh.to(tl.int64) * (K * V) + o_kv, b_h.to(ht.dtype.element_ty), mask=m_kv)


@triton.jit(do_not_specialize=["T"])
def chunk_scalar_A_kernel(
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
    BK: tl.constexpr,
    G_MODE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    ACC: tl.constexpr,
):
    """``A_ij = scale·(q_i·k_j)·exp(b_i − b_j)`` for ``j <= i`` inside a chunk (scalar or no gate)."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    bos, seq_len, i_c = _chunk_coords(i_t, i_b, T, cu_seqlens, chunk_indices, IS_VARLEN)
    o_i = tl.arange(0, BT)
    o_t = i_c * BT + o_i
    m_t = o_t < seq_len
    b_A = tl.zeros([BT, BT], dtype=ACC)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_q = tl.load(q + (bos + o_t)[:, None] * (H * K) + i_h * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0).to(ACC)
        b_k = tl.load(k + (bos + o_t)[None, :] * (H * K) + i_h * K + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0).to(ACC)
        b_A += tl.dot(b_q, b_k)
    # Mask the exponent, not the product: above the diagonal (and in padding) b_i − b_j may be large.
    valid = (o_i[:, None] >= o_i[None, :]) & m_t[:, None] & m_t[None, :]
    if G_MODE == 1:
        b_g = tl.load(gc + (bos + o_t) * H + i_h, mask=m_t, other=0).to(ACC)
        b_A *= tl.exp(tl.where(valid, b_g[:, None] - b_g[None, :], float("-inf")))
    else:
        b_A = tl.where(valid, b_A, 0)
    tl.store(A + (bos + o_t)[:, None] * (H * BT) + i_h * BT + o_i[None, :], (b_A * scale).to(A.dtype.element_ty), mask=m_t[:, None])


@triton.autotune(configs=_state_configs(), key=["K", "V", "G_MODE"])
@triton.jit(do_not_specialize=["T"])
def chunk_fwd_o_kernel(
    q,
    v,
    gc,
    h,
    A,
    o,
    cu_seqlens,
    chunk_indices,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    G_MODE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    ACC: tl.constexpr,
):
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    bos, seq_len, i_c = _chunk_coords(i_t, i_b, T, cu_seqlens, chunk_indices, IS_VARLEN)
    i_tg = _global_chunk(i_t, i_b, T, BT, IS_VARLEN)
    o_i = tl.arange(0, BT)
    o_t = i_c * BT + o_i
    m_t = o_t < seq_len
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_o = tl.zeros([BT, BV], dtype=ACC)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        ptr_qk = (bos + o_t)[:, None] * (H * K) + i_h * K + o_k[None, :]
        b_q = tl.load(q + ptr_qk, mask=m_t[:, None] & m_k[None, :], other=0).to(ACC)
        if G_MODE == 2:
            b_q *= tl.exp(tl.load(gc + ptr_qk, mask=m_t[:, None] & m_k[None, :], other=0).to(ACC))
        b_h = tl.load(h + (i_tg * H + i_h) * (K * V) + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0).to(ACC)
        b_o += tl.dot(b_q, b_h)
    if G_MODE == 1:
        b_o *= tl.exp(tl.load(gc + (bos + o_t) * H + i_h, mask=m_t, other=0).to(ACC))[:, None]
    b_A = tl.load(A + (bos + o_t)[:, None] * (H * BT) + i_h * BT + o_i[None, :], mask=m_t[:, None], other=0).to(ACC)
    ptr_v = (bos + o_t)[:, None] * (H * V) + i_h * V + o_v[None, :]
    b_v = tl.load(v + ptr_v, mask=m_t[:, None] & m_v[None, :], other=0).to(ACC)
    b_o = b_o * scale + tl.dot(b_A, b_v)
    tl.store(o + ptr_v, b_o.to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])


@triton.autotune(configs=_state_configs(), key=["K", "V", "G_MODE"])
@triton.jit(do_not_specialize=["T"])
def chunk_bwd_dh_kernel(
    q,
    do,
    gc,
    dh,
    dht,
    dh0,
    cu_seqlens,
    chunk_offsets,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    G_MODE: tl.constexpr,
    USE_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    ACC: tl.constexpr,
):
    """Walk chunks backwards; ``dh[n]`` is the gradient of the state *leaving* chunk ``n``."""
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
        boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        seq_len = T + bos * 0
        boh = i_n.to(tl.int64) * tl.cdiv(T, BT)
    NT = tl.cdiv(seq_len, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    o_kv = o_k[:, None] * V + o_v[None, :]
    m_kv = m_k[:, None] & m_v[None, :]
    b_dh = tl.zeros([BK, BV], dtype=ACC)
    if USE_DHT:
        b_dh += tl.load(dht + i_nh.to(tl.int64) * (K * V) + o_kv, mask=m_kv, other=0).to(ACC)
    for i_t in range(NT - 1, -1, -1):
        tl.store(dh + ((boh + i_t) * H + i_h) * (K * V) + o_kv, b_dh.to(dh.dtype.element_ty), mask=m_kv)
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < seq_len
        last = bos + tl.minimum(i_t * BT + BT, seq_len) - 1
        b_q = tl.load(q + (bos + o_t)[None, :] * (H * K) + i_h * K + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0).to(ACC)
        b_do = tl.load(do + (bos + o_t)[:, None] * (H * V) + i_h * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0).to(ACC)
        if G_MODE == 1:
            b_g = tl.load(gc + (bos + o_t) * H + i_h, mask=m_t, other=0).to(ACC)
            b_dh *= tl.exp(tl.load(gc + last * H + i_h).to(ACC))
            b_q *= tl.exp(b_g)[None, :]
        if G_MODE == 2:
            b_g = tl.load(gc + (bos + o_t)[None, :] * (H * K) + i_h * K + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0).to(ACC)
            b_dh *= tl.exp(tl.load(gc + last * (H * K) + i_h * K + o_k, mask=m_k, other=0).to(ACC))[:, None]
            b_q *= tl.exp(b_g)
        b_dh += tl.dot(b_q * scale, b_do)
    if STORE_DH0:
        tl.store(dh0 + i_nh.to(tl.int64) * (K * V) + o_kv, b_dh.to(dh0.dtype.element_ty), mask=m_kv)


@triton.jit(do_not_specialize=["T"])
def chunk_bwd_dA_kernel(
    v,
    do,
    gc,
    dA,
    cu_seqlens,
    chunk_indices,
    scale,
    T,
    H: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BV: tl.constexpr,
    G_MODE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    ACC: tl.constexpr,
):
    """``dA_ij = scale·(dO_i·v_j)`` for ``j <= i``; times ``exp(b_i − b_j)`` for a scalar gate."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    bos, seq_len, i_c = _chunk_coords(i_t, i_b, T, cu_seqlens, chunk_indices, IS_VARLEN)
    o_i = tl.arange(0, BT)
    o_t = i_c * BT + o_i
    m_t = o_t < seq_len
    b_dA = tl.zeros([BT, BT], dtype=ACC)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_do = tl.load(do + (bos + o_t)[:, None] * (H * V) + i_h * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0).to(ACC)
        b_v = tl.load(v + (bos + o_t)[None, :] * (H * V) + i_h * V + o_v[:, None], mask=m_v[:, None] & m_t[None, :], other=0).to(ACC)
        b_dA += tl.dot(b_do, b_v)
    valid = (o_i[:, None] >= o_i[None, :]) & m_t[:, None] & m_t[None, :]
    if G_MODE == 1:
        b_g = tl.load(gc + (bos + o_t) * H + i_h, mask=m_t, other=0).to(ACC)
        b_dA *= tl.exp(tl.where(valid, b_g[:, None] - b_g[None, :], float("-inf")))
    else:
        b_dA = tl.where(valid, b_dA, 0)
    tl.store(dA + (bos + o_t)[:, None] * (H * BT) + i_h * BT + o_i[None, :], (b_dA * scale).to(dA.dtype.element_ty), mask=m_t[:, None])


@triton.autotune(configs=_state_configs(), key=["K", "V", "G_MODE"])
@triton.jit(do_not_specialize=["T"])
def chunk_bwd_dv_kernel(
    k,
    do,
    gc,
    A,
    dh,
    dv,
    cu_seqlens,
    chunk_indices,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    G_MODE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    ACC: tl.constexpr,
):
    """``dv = Aᵀ dO + (k ⊙ e^{b_last − b}) dh``."""
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    bos, seq_len, i_c = _chunk_coords(i_t, i_b, T, cu_seqlens, chunk_indices, IS_VARLEN)
    i_tg = _global_chunk(i_t, i_b, T, BT, IS_VARLEN)
    o_i = tl.arange(0, BT)
    o_t = i_c * BT + o_i
    m_t = o_t < seq_len
    last = bos + tl.minimum(i_c * BT + BT, seq_len) - 1
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_dv = tl.zeros([BT, BV], dtype=ACC)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        ptr_k = (bos + o_t)[:, None] * (H * K) + i_h * K + o_k[None, :]
        b_k = tl.load(k + ptr_k, mask=m_t[:, None] & m_k[None, :], other=0).to(ACC)
        if G_MODE == 1:
            b_g = tl.load(gc + (bos + o_t) * H + i_h, mask=m_t, other=0).to(ACC)
            b_k *= tl.exp(tl.load(gc + last * H + i_h).to(ACC) - b_g)[:, None]
        if G_MODE == 2:
            b_g = tl.load(gc + ptr_k, mask=m_t[:, None] & m_k[None, :], other=0).to(ACC)
            g_last = tl.load(gc + last * (H * K) + i_h * K + o_k, mask=m_k, other=0).to(ACC)
            b_k *= tl.exp(g_last[None, :] - b_g)
        b_dh = tl.load(dh + (i_tg * H + i_h) * (K * V) + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0).to(ACC)
        b_dv += tl.dot(b_k, b_dh)
    # Aᵀ loaded directly by swapping the index roles (no tl.trans of a tile).
    b_At = tl.load(A + (bos + o_t)[None, :] * (H * BT) + i_h * BT + o_i[:, None], mask=m_t[None, :], other=0).to(ACC)
    ptr_v = (bos + o_t)[:, None] * (H * V) + i_h * V + o_v[None, :]
    b_do = tl.load(do + ptr_v, mask=m_t[:, None] & m_v[None, :], other=0).to(ACC)
    b_dv += tl.dot(b_At, b_do)
    tl.store(dv + ptr_v, b_dv.to(dv.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])


@triton.autotune(configs=_state_configs(), key=["K", "V", "G_MODE"])
@triton.jit(do_not_specialize=["T"])
def chunk_bwd_dqk_kernel(
    q,
    k,
    v,
    do,
    gc,
    h,
    dh,
    dA,
    dq,
    dk,
    cu_seqlens,
    chunk_indices,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    G_MODE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    ACC: tl.constexpr,
):
    """Inter-chunk ``dq, dk``; for ``G_MODE < 2`` also the intra-chunk part from the gated ``dA``."""
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    bos, seq_len, i_c = _chunk_coords(i_t, i_b, T, cu_seqlens, chunk_indices, IS_VARLEN)
    i_tg = _global_chunk(i_t, i_b, T, BT, IS_VARLEN)
    o_i = tl.arange(0, BT)
    o_t = i_c * BT + o_i
    m_t = o_t < seq_len
    last = bos + tl.minimum(i_c * BT + BT, seq_len) - 1
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    b_dq = tl.zeros([BT, BK], dtype=ACC)
    b_dk = tl.zeros([BT, BK], dtype=ACC)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        ptr_v = (bos + o_t)[:, None] * (H * V) + i_h * V + o_v[None, :]
        b_do = tl.load(do + ptr_v, mask=m_t[:, None] & m_v[None, :], other=0).to(ACC)
        b_v = tl.load(v + ptr_v, mask=m_t[:, None] & m_v[None, :], other=0).to(ACC)
        # States loaded transposed [BV, BK].
        ptr_h = (i_tg * H + i_h) * (K * V) + o_k[None, :] * V + o_v[:, None]
        b_ht = tl.load(h + ptr_h, mask=m_k[None, :] & m_v[:, None], other=0).to(ACC)
        b_dht = tl.load(dh + ptr_h, mask=m_k[None, :] & m_v[:, None], other=0).to(ACC)
        b_dq += tl.dot(b_do, b_ht)
        b_dk += tl.dot(b_v, b_dht)
    ptr_k = (bos + o_t)[:, None] * (H * K) + i_h * K + o_k[None, :]
    m_tk = m_t[:, None] & m_k[None, :]
    if G_MODE == 1:
        b_g = tl.load(gc + (bos + o_t) * H + i_h, mask=m_t, other=0).to(ACC)
        g_last = tl.load(gc + last * H + i_h).to(ACC)
        b_dq *= tl.exp(b_g)[:, None]
        b_dk *= tl.exp(g_last - b_g)[:, None]
    if G_MODE == 2:
        b_g = tl.load(gc + ptr_k, mask=m_tk, other=0).to(ACC)
        g_last = tl.load(gc + last * (H * K) + i_h * K + o_k, mask=m_k, other=0).to(ACC)
        b_dq *= tl.exp(b_g)
        b_dk *= tl.exp(g_last[None, :] - b_g)
    b_dq *= scale
    if G_MODE < 2:
        b_q = tl.load(q + ptr_k, mask=m_tk, other=0).to(ACC)
        b_k = tl.load(k + ptr_k, mask=m_tk, other=0).to(ACC)
        b_dA = tl.load(dA + (bos + o_t)[:, None] * (H * BT) + i_h * BT + o_i[None, :], mask=m_t[:, None], other=0).to(ACC)
        b_dAt = tl.load(dA + (bos + o_t)[None, :] * (H * BT) + i_h * BT + o_i[:, None], mask=m_t[None, :], other=0).to(ACC)
        b_dq += tl.dot(b_dA, b_k)
        b_dk += tl.dot(b_dAt, b_q)
    tl.store(dq + ptr_k, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + ptr_k, b_dk.to(dk.dtype.element_ty), mask=m_tk)


@triton.jit(do_not_specialize=["T"])
def fused_recurrent_kernel(
    q,
    k,
    v,
    g,
    o,
    h0,
    ht,
    cu_seqlens,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    G_MODE: tl.constexpr,
    USE_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    ACC: tl.constexpr,
):
    """Step-by-step recurrence with the ``[BK, BV]`` state in registers; ``o`` holds one partial per K-block."""
    i_v, i_k, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
        total = T
    else:
        bos = i_n.to(tl.int64) * T
        seq_len = T + bos * 0
        total = T * (tl.num_programs(2) // H)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    o_kv = o_k[:, None] * V + o_v[None, :]
    m_kv = m_k[:, None] & m_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=ACC)
    if USE_H0:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * (K * V) + o_kv, mask=m_kv, other=0).to(ACC)
    # Partial outputs of K-block i_k go to o[i_k]; the wrapper sums them.
    o_base = o + i_k * total.to(tl.int64) * (H * V)
    for t in range(0, seq_len):
        row = (bos + t) * H + i_h
        b_q = tl.load(q + row * K + o_k, mask=m_k, other=0).to(ACC) * scale
        b_k = tl.load(k + row * K + o_k, mask=m_k, other=0).to(ACC)
        b_v = tl.load(v + row * V + o_v, mask=m_v, other=0).to(ACC)
        if G_MODE == 1:
            b_h *= tl.exp(tl.load(g + row).to(ACC))
        if G_MODE == 2:
            b_h *= tl.exp(tl.load(g + row * K + o_k, mask=m_k, other=0).to(ACC))[:, None]
        b_h += b_k[:, None] * b_v[None, :]
        b_o = tl.sum(b_h * b_q[:, None], axis=0)
        tl.store(o_base + row * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    if STORE_HT:
        tl.store(ht + i_nh.to(tl.int64) * (K * V) + o_kv, b_h.to(ht.dtype.element_ty), mask=m_kv)


# ---------------------------------------------------------------------------------------------- host side


def prepare_chunks(cu_seqlens: torch.Tensor | None, chunk: int) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    """For packed sequences: ``chunk_indices [total_chunks, 2]`` (sequence, chunk in it), ``chunk_offsets
    [num_seqs + 1]`` (first chunk of each sequence) and the total chunk count. ``(None, None, 0)`` otherwise."""
    if cu_seqlens is None:
        return None, None, 0
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    counts = (lengths + chunk - 1) // chunk
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    seq_ids = torch.repeat_interleave(torch.arange(len(counts), device=cu_seqlens.device), counts)
    within = torch.arange(int(offsets[-1]), device=cu_seqlens.device) - offsets[:-1].repeat_interleave(counts)
    return torch.stack([seq_ids, within], 1).to(torch.int32).contiguous(), offsets.to(torch.int32), int(offsets[-1])


class Meta:
    """Sizes and packing indices of one call, shared by the forward and backward launches."""

    def __init__(self, q: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None, g_mode: int, scale: float):
        self.B, self.T, self.H, self.K = q.shape
        self.V = v.shape[-1]
        self.g_mode, self.scale = g_mode, scale
        self.cu_seqlens = None if cu_seqlens is None else cu_seqlens.to(torch.int32).contiguous()
        self.varlen = cu_seqlens is not None
        self.chunk_indices, self.chunk_offsets, total = prepare_chunks(self.cu_seqlens, BT)
        self.N = cu_seqlens.numel() - 1 if self.varlen else self.B
        # Per-chunk grids run over (chunks, B·H); with packing, B = 1 and chunks index chunk_indices.
        self.NT = total if self.varlen else triton.cdiv(self.T, BT)
        self.total_chunks = total if self.varlen else self.B * self.NT
        self.acc = _acc_dtype(q.dtype)


def chunk_cumsum(g: torch.Tensor, m: Meta) -> torch.Tensor:
    """Chunk-local inclusive cumsum of ``g`` (``[B, T, H]`` or ``[B, T, H, K]``) in the accumulator dtype."""
    per_key = g.dim() == 4
    dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
    gc = torch.empty(g.shape, dtype=dtype, device=g.device)
    BK = _tile(m.K) if per_key else 16
    grid = (triton.cdiv(m.K, BK) if per_key else 1, m.NT, m.B * m.H)
    chunk_cumsum_kernel[grid](
        g, gc, m.cu_seqlens, m.chunk_indices, m.T, H=m.H, K=m.K, BT=BT, BK=BK, PER_KEY=per_key, IS_VARLEN=m.varlen, ACC=m.acc
    )
    return gc


def chunk_fwd_h(k, v, gc, h0, store_ht: bool, m: Meta):
    """States entering every chunk ``[total_chunks, H, K, V]`` and the final states ``[N, H, K, V]``."""
    dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
    h = k.new_empty(m.total_chunks, m.H, m.K, m.V, dtype=dtype)
    ht = k.new_empty(m.N, m.H, m.K, m.V, dtype=dtype) if store_ht else None

    def grid(meta):
        return (triton.cdiv(m.K, meta["BK"]), triton.cdiv(m.V, meta["BV"]), m.N * m.H)

    chunk_fwd_h_kernel[grid](
        k,
        v,
        gc,
        h,
        h0,
        ht,
        m.cu_seqlens,
        m.chunk_offsets,
        m.T,
        H=m.H,
        K=m.K,
        V=m.V,
        BT=BT,
        G_MODE=m.g_mode,
        USE_H0=h0 is not None,
        STORE_HT=store_ht,
        IS_VARLEN=m.varlen,
        ACC=m.acc,
    )
    return h, ht


def chunk_scalar_A(q, k, gc, m: Meta) -> torch.Tensor:
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    A = q.new_empty(m.B, m.T, m.H, BT, dtype=dtype)
    chunk_scalar_A_kernel[(m.NT, m.B * m.H)](
        q,
        k,
        gc,
        A,
        m.cu_seqlens,
        m.chunk_indices,
        m.scale,
        m.T,
        H=m.H,
        K=m.K,
        BT=BT,
        BK=_tile(m.K),
        G_MODE=m.g_mode,
        IS_VARLEN=m.varlen,
        ACC=m.acc,
    )
    return A


def chunk_fwd_o(q, v, gc, h, A, m: Meta) -> torch.Tensor:
    o = torch.empty_like(v)

    def grid(meta):
        return (triton.cdiv(m.V, meta["BV"]), m.NT, m.B * m.H)

    chunk_fwd_o_kernel[grid](
        q,
        v,
        gc,
        h,
        A,
        o,
        m.cu_seqlens,
        m.chunk_indices,
        m.scale,
        m.T,
        H=m.H,
        K=m.K,
        V=m.V,
        BT=BT,
        G_MODE=m.g_mode,
        IS_VARLEN=m.varlen,
        ACC=m.acc,
    )
    return o


def gate_grad_from_qk(q, k, dq, dk, ht, dht, m: Meta, per_key: bool) -> torch.Tensor:
    """``dg = reverse_cumsum(q ⊙ dq − k ⊙ dk)`` within each sequence, plus ``Σ_v ht ⊙ dht`` on every token.

    Shapes: ``q, k, dq, dk [B, T, H, K]``; returns ``[B, T, H, K]`` (per key) or ``[B, T, H]``.
    """
    x = q * dq - k * dk
    if not per_key:
        x = x.sum(-1)
    rc = x.flip(1).cumsum(1).flip(1)
    final = None if dht is None else (ht * dht).sum(-1)  # [N, H, K]
    if final is not None and not per_key:
        final = final.sum(-1)
    if not m.varlen:
        return rc if final is None else rc + final[:, None]
    # Packed: remove what later sequences added, and add each sequence's own final-state term.
    offsets = m.cu_seqlens.long()
    lengths = offsets[1:] - offsets[:-1]
    tail = torch.cat([rc[0], torch.zeros_like(rc[0, :1])])[offsets[1:]]  # rc at each sequence's end
    out = rc[0] - tail.repeat_interleave(lengths, dim=0)
    if final is not None:
        out = out + final.repeat_interleave(lengths, dim=0)
    return out[None]


def chunk_backward(q, k, v, gc, h0, A, do, dht, m: Meta, intra_bwd=None):
    """``dq, dk, dv, dh0`` (accumulator dtype) of the chunked form; ``intra_bwd`` adds GLA's intra-chunk part."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    h, _ = chunk_fwd_h(k, v, gc, h0, False, m)
    dh = torch.empty_like(h)
    dh0 = torch.empty_like(h0, dtype=dtype) if h0 is not None else None

    def state_grid(meta):
        return (triton.cdiv(m.K, meta["BK"]), triton.cdiv(m.V, meta["BV"]), m.N * m.H)

    chunk_bwd_dh_kernel[state_grid](
        q,
        do,
        gc,
        dh,
        dht,
        dh0,
        m.cu_seqlens,
        m.chunk_offsets,
        m.scale,
        m.T,
        H=m.H,
        K=m.K,
        V=m.V,
        BT=BT,
        G_MODE=m.g_mode,
        USE_DHT=dht is not None,
        STORE_DH0=h0 is not None,
        IS_VARLEN=m.varlen,
        ACC=m.acc,
    )
    dA = q.new_empty(m.B, m.T, m.H, BT, dtype=dtype)
    chunk_bwd_dA_kernel[(m.NT, m.B * m.H)](
        v,
        do,
        gc,
        dA,
        m.cu_seqlens,
        m.chunk_indices,
        m.scale,
        m.T,
        H=m.H,
        V=m.V,
        BT=BT,
        BV=_tile(m.V),
        G_MODE=m.g_mode,
        IS_VARLEN=m.varlen,
        ACC=m.acc,
    )
    dv = torch.empty_like(v, dtype=dtype)

    def v_grid(meta):
        return (triton.cdiv(m.V, meta["BV"]), m.NT, m.B * m.H)

    chunk_bwd_dv_kernel[v_grid](
        k, do, gc, A, dh, dv, m.cu_seqlens, m.chunk_indices, m.T, H=m.H, K=m.K, V=m.V, BT=BT, G_MODE=m.g_mode, IS_VARLEN=m.varlen, ACC=m.acc
    )
    dq = torch.empty_like(q, dtype=dtype)
    dk = torch.empty_like(k, dtype=dtype)

    def k_grid(meta):
        return (triton.cdiv(m.K, meta["BK"]), m.NT, m.B * m.H)

    chunk_bwd_dqk_kernel[k_grid](
        q,
        k,
        v,
        do,
        gc,
        h,
        dh,
        dA,
        dq,
        dk,
        m.cu_seqlens,
        m.chunk_indices,
        m.scale,
        m.T,
        H=m.H,
        K=m.K,
        V=m.V,
        BT=BT,
        G_MODE=m.g_mode,
        IS_VARLEN=m.varlen,
        ACC=m.acc,
    )
    if intra_bwd is not None:
        intra_bwd(q, k, gc, dA, dq, dk, m)
    return dq, dk, dv, dh0


def _compute_inputs(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Contiguous inputs; bf16 becomes fp32 under the interpreter, which cannot do bf16 math."""
    out = []
    for t in tensors:
        if t is not None:
            if TRITON_INTERPRET and t.dtype == torch.bfloat16:
                t = t.float()
            t = t.contiguous()
        out.append(t)
    return out


class ChunkGatedLinearAttention(torch.autograd.Function):
    """Chunked Triton forward and recomputing backward for ``G_MODE`` 0/1/2 (see the module docstring).

    ``intra`` is ``None`` for scalar or no gates, else a pair ``(intra_A, intra_bwd)`` of launchers for
    GLA's per-key intra-chunk kernels (:mod:`seqzoo.ops.gla.triton`).
    """

    @staticmethod
    def forward(ctx, q, k, v, g, h0, scale, output_final_state, cu_seqlens, g_mode, intra):
        in_dtype, state_dtype = q.dtype, (torch.float64 if q.dtype == torch.float64 else torch.float32)
        # Each gradient must come back in its own input's dtype (they may differ, e.g. a bf16 q with an fp32 state).
        ctx.dtypes = [None if t is None else t.dtype for t in (q, k, v, g, h0)]
        q, k, v, g, h0 = _compute_inputs(q, k, v, g, h0)
        if h0 is not None:
            h0 = h0.to(state_dtype)
        m = Meta(q, v, cu_seqlens, g_mode, scale)
        gc = chunk_cumsum(g, m) if g is not None else None
        h, ht = chunk_fwd_h(k, v, gc, h0, output_final_state, m)
        A = chunk_scalar_A(q, k, gc, m) if intra is None else intra[0](q, k, gc, m)
        o = chunk_fwd_o(q, v, gc, h, A, m)
        ctx.save_for_backward(q, k, v, gc, h0, A, ht)
        ctx.m, ctx.intra = m, intra
        return o.to(in_dtype), ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, gc, h0, A, ht = ctx.saved_tensors
        m = ctx.m
        (do,) = _compute_inputs(do)
        do = do.to(q.dtype)
        dht = None if dht is None else dht.contiguous()
        dq, dk, dv, dh0 = chunk_backward(q, k, v, gc, h0, A, do, dht, m, None if ctx.intra is None else ctx.intra[1])
        dg = None
        if gc is not None:
            acc = dq.dtype
            dg = gate_grad_from_qk(q.to(acc), k.to(acc), dq, dk, ht, dht, m, per_key=m.g_mode == 2)
        grads = [None if t is None else t.to(dt) for t, dt in zip((dq, dk, dv, dg, dh0), ctx.dtypes)]
        return (*grads, None, None, None, None, None)


def chunk_gated_linear_attention(q, k, v, g, g_mode, intra, *, scale, initial_state, output_final_state, cu_seqlens):
    """Shared entry of the chunked Triton path; returns ``(o, final_state or None)``."""
    scale = default_scale(scale, q.shape[-1])
    o, ht = ChunkGatedLinearAttention.apply(q, k, v, g, initial_state, scale, output_final_state, cu_seqlens, g_mode, intra)
    return o, (ht if output_final_state else None)


def fused_recurrent(q, k, v, g, g_mode, *, scale, initial_state, output_final_state, cu_seqlens):
    """Forward-only step-by-step kernel for decoding and short inputs; returns ``(o, final_state or None)``."""
    in_dtype = q.dtype
    scale = default_scale(scale, q.shape[-1])
    q, k, v, g, h0 = _compute_inputs(q, k, v, g, initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    state_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if h0 is not None:
        h0 = h0.to(state_dtype)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    cu = None if cu_seqlens is None else cu_seqlens.to(torch.int32).contiguous()
    BK, BV = _tile(K), _tile(V)
    NK = triton.cdiv(K, BK)
    o = q.new_empty(NK, B, T, H, V, dtype=state_dtype)
    ht = q.new_empty(N, H, K, V, dtype=state_dtype) if output_final_state else None
    fused_recurrent_kernel[(triton.cdiv(V, BV), NK, N * H)](
        q,
        k,
        v,
        g,
        o,
        h0,
        ht,
        cu,
        scale,
        T,
        H=H,
        K=K,
        V=V,
        BK=BK,
        BV=BV,
        G_MODE=g_mode,
        USE_H0=h0 is not None,
        STORE_HT=output_final_state,
        IS_VARLEN=cu is not None,
        ACC=_acc_dtype(q.dtype),
    )
    return o.sum(0).to(in_dtype), ht


def simple_gla_triton(q, k, v, g=None, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Chunked Triton simple GLA (differentiable). Shapes as :func:`seqzoo.ops.simple_gla.simple_gla`."""
    return chunk_gated_linear_attention(
        q,
        k,
        v,
        g,
        0 if g is None else 1,
        None,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )


def simple_gla_triton_recurrent(q, k, v, g=None, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Fused recurrent Triton simple GLA, forward only. Shapes as :func:`seqzoo.ops.simple_gla.simple_gla`."""
    return fused_recurrent(
        q,
        k,
        v,
        g,
        0 if g is None else 1,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )
