"""Triton kernels for chunked gated linear attention, shared by ``simple_gla`` and ``gla``.

Every kernel takes a ``G_MODE`` constexpr: 0 no gate, 1 a scalar log gate per head (simple GLA), 2 a per-key
log gate (GLA); layout, packing and flags follow :mod:`seqzoo.ops.core.triton_host`. With ``b`` the
chunk-local cumulative log gate, the forward is

1. ``b`` by :func:`~seqzoo.ops.core.triton_stages.chunk_local_cumsum` (shared with the delta rule);
2. :func:`chunk_fwd_h`: the state entering every chunk, sequential over chunks, grid ``(K/BK, V/BV, N·H)``;
   each step is the shared :func:`~seqzoo.ops.core.triton_stages.state_update`;
3. per-key gates only: the intra-chunk scores ``A [B, T, H, BT]`` by GLA's secondary chunking
   (:mod:`seqzoo.ops.gla.triton`); without a gate or with a scalar one the output stage forms ``A`` itself;
4. the shared output stage :func:`~seqzoo.ops.core.triton_stages.chunk_fwd_o`: ``o = scale·(q ⊙ e^b) h + A v``.

Backward recomputes the states (kernel 2), walks ``dh`` back over chunks (:func:`chunk_bwd_dh`), forms
``dA = scale·dO vᵀ`` (gated for scalar gates), then ``dv`` (the shared
:func:`~seqzoo.ops.core.triton_stages.chunk_bwd_dv`) and ``dq, dk``. The gate gradient is
``dg = reverse_cumsum(q ⊙ dq − k ⊙ dk)`` per sequence, plus ``Σ_v ht ⊙ dht`` on every token of a
sequence with a final-state cotangent: the gate only moves ``q`` and ``k`` against each other (and
scales the final state), so this identity needs no per-chunk gate terms. It runs as two elementwise
torch ops and a cumsum, memory-bound and cheap next to the kernels. Its error is absolute, about
``eps·Σ|q ⊙ dq|``: where the true gate gradient is itself tiny (every gate near −30) it is only
correct to that absolute level, which the torch path (autograd with exact-zero diagonal exponents)
does better.

The kernels run as ``torch.library`` ops (namespace ``seqzoo``): ``gla_triton_fwd`` and ``gla_triton_bwd``
(autograd: the first's backward calls the second) and the inference-only ``gla_fused``; each has a fake
(shape) implementation, so ``torch.compile`` sees one op per call. Accumulation is fp32 (fp64 for fp64
inputs, which ``gradcheck`` uses); every ``tl.dot`` runs at the precision of
:func:`~seqzoo.ops.core.precision.dot_precision` (IEEE for fp32 inputs, tf32 for half inputs). The
interpreter cannot do bf16 math, so bf16 inputs run in fp32 when interpreting
(:func:`~seqzoo.ops.core.precision.kernel_input`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from seqzoo.ops.core import dot_precision, kernel_input
from seqzoo.ops.core.triton_host import (
    BT,
    ChunkMeta,
    acc_dtype,
    chunk_coords,
    global_chunk,
    kv_block_configs,
    load_cols,
    load_rows,
    load_state,
    load_state_t,
    load_token,
    seq_coords,
    seq_span,
    store_rows,
    store_state,
    tile,
    tl_dtype,
    varlen_indices,
)
from seqzoo.ops.core.triton_stages import chunk_bwd_dv, chunk_fwd_o, chunk_last, chunk_local_cumsum, state_update
from seqzoo.ops.utils import default_scale


@triton.autotune(configs=kv_block_configs(), key=["K", "V", "G_MODE", "ACC", "PRECISION"])
@triton.jit(do_not_specialize=["T"])
def _chunk_fwd_h_kernel(
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
    PRECISION: tl.constexpr,
):
    """Walk a sequence's chunks in order; ``h[n]`` is the state *entering* chunk ``n``."""
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, seq_len, boh = seq_coords(i_n, T, cu_seqlens, chunk_offsets, BT, IS_VARLEN)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    b_h = tl.zeros([BK, BV], dtype=ACC)
    if USE_H0:
        b_h += load_state(h0 + i_nh.to(tl.int64) * (K * V), o_k, m_k, o_v, m_v, V, ACC)
    for i_t in range(0, tl.cdiv(seq_len, BT)):
        store_state(h + ((boh + i_t) * H + i_h) * (K * V), b_h, o_k, m_k, o_v, m_v, V)
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < seq_len
        last = bos + chunk_last(i_t, seq_len, BT)
        # k loaded transposed [BK, BT] so the update is one dot with v [BT, BV].
        b_kt = load_cols(k, bos, o_t, m_t, o_k, m_k, H, K, i_h, ACC)
        b_v = load_rows(v, bos, o_t, m_t, o_v, m_v, H, V, i_h, ACC)
        decay = 1.0
        if G_MODE == 1:
            b_g = load_token(gc, bos, o_t, m_t, H, i_h, ACC)
            g_last = tl.load(gc + last * H + i_h).to(ACC)
            decay = tl.exp(g_last)
            b_kt *= tl.exp(g_last - b_g)[None, :]
        if G_MODE == 2:
            b_gt = load_cols(gc, bos, o_t, m_t, o_k, m_k, H, K, i_h, ACC)
            g_last = tl.load(gc + (last * H + i_h) * K + o_k, mask=m_k, other=0).to(ACC)
            decay = tl.exp(g_last)[:, None]
            b_kt *= tl.exp(g_last[:, None] - b_gt)
        b_h = state_update(b_h, decay, b_kt, b_v, PRECISION)
    if STORE_HT:
        store_state(ht + i_nh.to(tl.int64) * (K * V), b_h, o_k, m_k, o_v, m_v, V)


@triton.autotune(configs=kv_block_configs(), key=["K", "V", "G_MODE", "ACC", "PRECISION"])
@triton.jit(do_not_specialize=["T"])
def _chunk_bwd_dh_kernel(
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
    PRECISION: tl.constexpr,
):
    """Walk chunks backwards; ``dh[n]`` is the gradient of the state *leaving* chunk ``n``."""
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, seq_len, boh = seq_coords(i_n, T, cu_seqlens, chunk_offsets, BT, IS_VARLEN)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    b_dh = tl.zeros([BK, BV], dtype=ACC)
    if USE_DHT:
        b_dh += load_state(dht + i_nh.to(tl.int64) * (K * V), o_k, m_k, o_v, m_v, V, ACC)
    for i_t in range(tl.cdiv(seq_len, BT) - 1, -1, -1):
        store_state(dh + ((boh + i_t) * H + i_h) * (K * V), b_dh, o_k, m_k, o_v, m_v, V)
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < seq_len
        last = bos + chunk_last(i_t, seq_len, BT)
        b_qt = load_cols(q, bos, o_t, m_t, o_k, m_k, H, K, i_h, ACC)
        b_do = load_rows(do, bos, o_t, m_t, o_v, m_v, H, V, i_h, ACC)
        decay = 1.0
        if G_MODE == 1:
            decay = tl.exp(tl.load(gc + last * H + i_h).to(ACC))
            b_qt *= tl.exp(load_token(gc, bos, o_t, m_t, H, i_h, ACC))[None, :]
        if G_MODE == 2:
            decay = tl.exp(tl.load(gc + (last * H + i_h) * K + o_k, mask=m_k, other=0).to(ACC))[:, None]
            b_qt *= tl.exp(load_cols(gc, bos, o_t, m_t, o_k, m_k, H, K, i_h, ACC))
        b_dh = state_update(b_dh, decay, b_qt * scale, b_do, PRECISION)
    if STORE_DH0:
        store_state(dh0 + i_nh.to(tl.int64) * (K * V), b_dh, o_k, m_k, o_v, m_v, V)


@triton.jit(do_not_specialize=["T"])
def _chunk_bwd_dA_kernel(
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
    PRECISION: tl.constexpr,
):
    """``dA_ij = scale·(dO_i·v_j)`` for ``j <= i``; times ``exp(b_i − b_j)`` for a scalar gate."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    bos, seq_len, i_c = chunk_coords(i_t, i_b, T, cu_seqlens, chunk_indices, IS_VARLEN)
    o_i = tl.arange(0, BT)
    o_t = i_c * BT + o_i
    m_t = o_t < seq_len
    b_dA = tl.zeros([BT, BT], dtype=ACC)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_do = load_rows(do, bos, o_t, m_t, o_v, m_v, H, V, i_h, ACC)
        b_dA += tl.dot(b_do, load_cols(v, bos, o_t, m_t, o_v, m_v, H, V, i_h, ACC), input_precision=PRECISION)
    valid = (o_i[:, None] >= o_i[None, :]) & m_t[:, None] & m_t[None, :]
    if G_MODE == 1:
        b_g = load_token(gc, bos, o_t, m_t, H, i_h, ACC)
        b_dA *= tl.exp(tl.where(valid, b_g[:, None] - b_g[None, :], float("-inf")))
    else:
        b_dA = tl.where(valid, b_dA, 0)
    store_rows(dA, b_dA * scale, bos, o_t, m_t, o_i, o_i < BT, H, BT, i_h)


@triton.autotune(configs=kv_block_configs(), key=["K", "V", "G_MODE", "ACC", "PRECISION"])
@triton.jit(do_not_specialize=["T"])
def _chunk_bwd_dqk_kernel(
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
    PRECISION: tl.constexpr,
):
    """Inter-chunk ``dq, dk``; for ``G_MODE < 2`` also the intra-chunk part from the gated ``dA``."""
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    bos, seq_len, i_c = chunk_coords(i_t, i_b, T, cu_seqlens, chunk_indices, IS_VARLEN)
    i_tg = global_chunk(i_t, i_b, T, BT, IS_VARLEN)
    p_h = h + (i_tg * H + i_h) * (K * V)
    p_dh = dh + (i_tg * H + i_h) * (K * V)
    o_i = tl.arange(0, BT)
    o_t = i_c * BT + o_i
    m_t = o_t < seq_len
    last = bos + chunk_last(i_c, seq_len, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    b_dq = tl.zeros([BT, BK], dtype=ACC)
    b_dk = tl.zeros([BT, BK], dtype=ACC)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_do = load_rows(do, bos, o_t, m_t, o_v, m_v, H, V, i_h, ACC)
        b_v = load_rows(v, bos, o_t, m_t, o_v, m_v, H, V, i_h, ACC)
        # States loaded transposed [BV, BK].
        b_dq += tl.dot(b_do, load_state_t(p_h, o_k, m_k, o_v, m_v, V, ACC), input_precision=PRECISION)
        b_dk += tl.dot(b_v, load_state_t(p_dh, o_k, m_k, o_v, m_v, V, ACC), input_precision=PRECISION)
    if G_MODE == 1:
        b_g = load_token(gc, bos, o_t, m_t, H, i_h, ACC)
        g_last = tl.load(gc + last * H + i_h).to(ACC)
        b_dq *= tl.exp(b_g)[:, None]
        b_dk *= tl.exp(g_last - b_g)[:, None]
    if G_MODE == 2:
        b_g = load_rows(gc, bos, o_t, m_t, o_k, m_k, H, K, i_h, ACC)
        g_last = tl.load(gc + (last * H + i_h) * K + o_k, mask=m_k, other=0).to(ACC)
        b_dq *= tl.exp(b_g)
        b_dk *= tl.exp(g_last[None, :] - b_g)
    b_dq *= scale
    if G_MODE < 2:
        b_q = load_rows(q, bos, o_t, m_t, o_k, m_k, H, K, i_h, ACC)
        b_k = load_rows(k, bos, o_t, m_t, o_k, m_k, H, K, i_h, ACC)
        b_dA = load_rows(dA, bos, o_t, m_t, o_i, o_i < BT, H, BT, i_h, ACC)
        b_dAt = load_cols(dA, bos, o_t, m_t, o_i, o_i < BT, H, BT, i_h, ACC)
        b_dq += tl.dot(b_dA, b_k, input_precision=PRECISION)
        b_dk += tl.dot(b_dAt, b_q, input_precision=PRECISION)
    store_rows(dq, b_dq, bos, o_t, m_t, o_k, m_k, H, K, i_h)
    store_rows(dk, b_dk, bos, o_t, m_t, o_k, m_k, H, K, i_h)


@triton.jit(do_not_specialize=["T"])
def _fused_recurrent_kernel(
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
    bos, seq_len = seq_span(i_n, T, cu_seqlens, IS_VARLEN)
    # Tokens in the call: T when packed (batch 1), batch·T otherwise.
    if IS_VARLEN:
        total = T
    else:
        total = T * (tl.num_programs(2) // H)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    b_h = tl.zeros([BK, BV], dtype=ACC)
    if USE_H0:
        b_h += load_state(h0 + i_nh.to(tl.int64) * (K * V), o_k, m_k, o_v, m_v, V, ACC)
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
        store_state(ht + i_nh.to(tl.int64) * (K * V), b_h, o_k, m_k, o_v, m_v, V)


# ---------------------------------------------------------------------------------------------- launchers


def chunk_fwd_h(
    k: Tensor, v: Tensor, gc: Tensor | None, h0: Tensor | None, store_ht: bool, m: ChunkMeta, g_mode: int
) -> tuple[Tensor, Tensor | None]:
    """States entering every chunk ``[total_chunks, H, K, V]`` and the final states ``[N, H, K, V]`` (or ``None``)."""
    h = k.new_empty(m.total_chunks, m.H, m.K, m.V, dtype=m.acc)
    ht = k.new_empty(m.N, m.H, m.K, m.V, dtype=m.acc) if store_ht else None

    def grid(meta):
        return (triton.cdiv(m.K, meta["BK"]), triton.cdiv(m.V, meta["BV"]), m.N * m.H)

    wrap_triton(_chunk_fwd_h_kernel)[grid](
        k, v, gc, h, h0, ht, m.cu_seqlens, m.chunk_offsets, m.T,
        H=m.H, K=m.K, V=m.V, BT=m.chunk, G_MODE=g_mode, USE_H0=h0 is not None, STORE_HT=store_ht,
        IS_VARLEN=m.varlen, ACC=m.ACC, PRECISION=m.precision,
    )  # fmt: skip
    return h, ht


def chunk_bwd_dh(
    q: Tensor, do: Tensor, gc: Tensor | None, dht: Tensor | None, store_dh0: bool, m: ChunkMeta, scale: float, g_mode: int
) -> tuple[Tensor, Tensor | None]:
    """Gradients of the states leaving every chunk ``[total_chunks, H, K, V]`` and of the initial states ``[N, H, K, V]``."""
    dh = q.new_empty(m.total_chunks, m.H, m.K, m.V, dtype=m.acc)
    dh0 = q.new_empty(m.N, m.H, m.K, m.V, dtype=m.acc) if store_dh0 else None

    def grid(meta):
        return (triton.cdiv(m.K, meta["BK"]), triton.cdiv(m.V, meta["BV"]), m.N * m.H)

    wrap_triton(_chunk_bwd_dh_kernel)[grid](
        q, do, gc, dh, dht, dh0, m.cu_seqlens, m.chunk_offsets, scale, m.T,
        H=m.H, K=m.K, V=m.V, BT=m.chunk, G_MODE=g_mode, USE_DHT=dht is not None, STORE_DH0=store_dh0,
        IS_VARLEN=m.varlen, ACC=m.ACC, PRECISION=m.precision,
    )  # fmt: skip
    return dh, dh0


def chunk_bwd_dA(v: Tensor, do: Tensor, gc: Tensor | None, m: ChunkMeta, scale: float, g_mode: int) -> Tensor:
    """``dA [B, T, H, BT]`` (accumulator dtype), ``scale`` included; gated for a scalar gate."""
    dA = v.new_empty(m.B, m.T, m.H, m.chunk, dtype=m.acc)
    wrap_triton(_chunk_bwd_dA_kernel)[(m.NT, m.B * m.H)](
        v, do, gc, dA, m.cu_seqlens, m.chunk_indices, scale, m.T,
        H=m.H, V=m.V, BT=m.chunk, BV=tile(m.V), G_MODE=g_mode, IS_VARLEN=m.varlen, ACC=m.ACC, PRECISION=m.precision,
    )  # fmt: skip
    return dA


def chunk_bwd_dqk(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    do: Tensor,
    gc: Tensor | None,
    h: Tensor,
    dh: Tensor,
    dA: Tensor,
    m: ChunkMeta,
    scale: float,
    g_mode: int,
) -> tuple[Tensor, Tensor]:
    """``dq, dk [B, T, H, K]`` (accumulator dtype): the inter-chunk parts, and the intra-chunk part for ``g_mode < 2``."""
    dq = torch.empty_like(q, dtype=m.acc)
    dk = torch.empty_like(k, dtype=m.acc)

    def grid(meta):
        return (triton.cdiv(m.K, meta["BK"]), m.NT, m.B * m.H)

    wrap_triton(_chunk_bwd_dqk_kernel)[grid](
        q, k, v, do, gc, h, dh, dA, dq, dk, m.cu_seqlens, m.chunk_indices, scale, m.T,
        H=m.H, K=m.K, V=m.V, BT=m.chunk, G_MODE=g_mode, IS_VARLEN=m.varlen, ACC=m.ACC, PRECISION=m.precision,
    )  # fmt: skip
    return dq, dk


def gate_grad_from_qk(q, k, dq, dk, ht, dht, m: ChunkMeta, per_key: bool) -> Tensor:
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
    offsets = m.cu_seqlens
    lengths = offsets[1:] - offsets[:-1]
    tail = torch.cat([rc[0], torch.zeros_like(rc[0, :1])])[offsets[1:]]  # rc at each sequence's end
    out = rc[0] - tail.repeat_interleave(lengths, dim=0, output_size=m.T)
    if final is not None:
        out = out + final.repeat_interleave(lengths, dim=0, output_size=m.T)
    return out[None]


def _intra(g_mode: int):
    """GLA's per-key intra-chunk launchers ``(gla_intra_A, gla_intra_bwd)`` for ``g_mode == 2``, else ``None``
    (imported here: :mod:`seqzoo.ops.gla.triton` builds on this module)."""
    if g_mode != 2:
        return None
    from seqzoo.ops.gla.triton import gla_intra_A, gla_intra_bwd

    return gla_intra_A, gla_intra_bwd


def _or_empty(t: Tensor | None, like: Tensor, dtype: torch.dtype) -> Tensor:
    # torch.library outputs cannot be None: an output the call does not produce is a 0-element tensor.
    return t if t is not None else like.new_empty(0, dtype=dtype)


def _or_none(t: Tensor | None) -> Tensor | None:
    return None if t is None or t.numel() == 0 else t


# ---------------------------------------------------------------------------------------------- ops


@triton_op("seqzoo::gla_triton_fwd", mutates_args=())
def _gla_triton_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    h0: Tensor | None,
    cu_seqlens: Tensor | None,
    chunk_indices: Tensor | None,
    chunk_offsets: Tensor | None,
    scale: float,
    g_mode: int,
    output_final_state: bool,
    precision: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Chunked forward: ``(o [B, T, H, V], ht [N, H, K, V], gc, A)``. ``gc`` (the cumulated gate, like ``g``)
    and ``A`` (per-key intra scores ``[B, T, H, BT]``) are kept for the backward; an output the call does
    not produce (``ht`` without ``output_final_state``, ``gc`` without a gate, ``A`` below ``g_mode`` 2)
    has 0 elements."""
    m = ChunkMeta.build(q, v, cu_seqlens, chunk_indices, chunk_offsets, precision)
    gc = chunk_local_cumsum(g, m) if g is not None else None
    h, ht = chunk_fwd_h(k, v, gc, h0, output_final_state, m, g_mode)
    intra = _intra(g_mode)
    A = intra[0](q, k, gc, m, scale) if intra is not None else None
    o = chunk_fwd_o(q, k, v, gc, h, A, m, scale, g_mode)
    return o, _or_empty(ht, q, m.acc), _or_empty(gc, q, m.acc), _or_empty(A, q, m.acc)


@_gla_triton_fwd.register_fake
def _(q, k, v, g, h0, cu_seqlens, chunk_indices, chunk_offsets, scale, g_mode, output_final_state, precision):
    B, T, H, K = q.shape
    acc = acc_dtype(q.dtype)
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    ht = q.new_empty(N, H, K, v.shape[-1], dtype=acc) if output_final_state else q.new_empty(0, dtype=acc)
    gc = (
        torch.empty_like(g, dtype=acc_dtype(g.dtype), memory_format=torch.contiguous_format) if g is not None else q.new_empty(0, dtype=acc)
    )
    A = q.new_empty(B, T, H, BT, dtype=acc) if g_mode == 2 else q.new_empty(0, dtype=acc)
    return torch.empty_like(v), ht, gc, A


@triton_op("seqzoo::gla_triton_bwd", mutates_args=())
def _gla_triton_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gc: Tensor | None,
    h0: Tensor | None,
    A: Tensor | None,
    ht: Tensor | None,
    do: Tensor,
    dht: Tensor | None,
    cu_seqlens: Tensor | None,
    chunk_indices: Tensor | None,
    chunk_offsets: Tensor | None,
    scale: float,
    g_mode: int,
    precision: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Recomputing backward: ``(dq, dk, dv, dg, dh0)`` in the accumulator dtype from the forward's inputs and
    kept outputs and the cotangents ``do [B, T, H, V]``, ``dht [N, H, K, V]`` (or ``None``); ``dg`` and ``dh0``
    have 0 elements without a gate or an initial state."""
    m = ChunkMeta.build(q, v, cu_seqlens, chunk_indices, chunk_offsets, precision)
    h, _ = chunk_fwd_h(k, v, gc, h0, False, m, g_mode)
    dh, dh0 = chunk_bwd_dh(q, do, gc, dht, h0 is not None, m, scale, g_mode)
    dA = chunk_bwd_dA(v, do, gc, m, scale, g_mode)
    dv = chunk_bwd_dv(q, k, do, gc, A, dh, m, scale, g_mode)
    dq, dk = chunk_bwd_dqk(q, k, v, do, gc, h, dh, dA, m, scale, g_mode)
    intra = _intra(g_mode)
    if intra is not None:
        intra[1](q, k, gc, dA, dq, dk, m)
    dg = None
    if gc is not None:
        dg = gate_grad_from_qk(q.to(m.acc), k.to(m.acc), dq, dk, ht, dht, m, per_key=g_mode == 2)
    return dq, dk, dv, _or_empty(dg, q, m.acc), _or_empty(dh0, q, m.acc)


@_gla_triton_bwd.register_fake
def _(q, k, v, gc, h0, A, ht, do, dht, cu_seqlens, chunk_indices, chunk_offsets, scale, g_mode, precision):
    acc = acc_dtype(q.dtype)
    dg = q.new_empty(gc.shape, dtype=acc) if gc is not None else q.new_empty(0, dtype=acc)
    dh0 = torch.empty_like(h0, dtype=acc, memory_format=torch.contiguous_format) if h0 is not None else q.new_empty(0, dtype=acc)
    empty = [torch.empty_like(t, dtype=acc, memory_format=torch.contiguous_format) for t in (q, k, v)]
    return (*empty, dg, dh0)


def _gla_setup_context(ctx, inputs, output):
    q, k, v, g, h0, cu_seqlens, chunk_indices, chunk_offsets, scale, g_mode, output_final_state, precision = inputs
    _, ht, gc, A = output
    ctx.mark_non_differentiable(gc, A)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, h0, _or_none(gc), _or_none(A), ht if output_final_state else None)
    ctx.packing = (cu_seqlens, chunk_indices, chunk_offsets)
    ctx.config = (scale, g_mode, precision)
    # Each gradient comes back in its own input's dtype (they may differ, e.g. a half q with an fp32 state).
    ctx.dtypes = [None if t is None else t.dtype for t in (q, k, v, g, h0)]


def _gla_backward(ctx, do, dht, _dgc, _dA):
    q, k, v, h0, gc, A, ht = ctx.saved_tensors
    scale, g_mode, precision = ctx.config
    do = torch.zeros_like(v) if do is None else do.contiguous().to(q.dtype)
    dht = None if dht is None or ht is None else dht.contiguous()
    grads = _gla_triton_bwd(q, k, v, gc, h0, A, ht, do, dht, *ctx.packing, scale, g_mode, precision)
    grads = [None if dt is None else t.to(dt) for t, dt in zip(grads, ctx.dtypes)]
    return (*grads, None, None, None, None, None, None, None)


_gla_triton_fwd.register_autograd(_gla_backward, setup_context=_gla_setup_context)


@triton_op("seqzoo::gla_fused", mutates_args=())
def _gla_fused(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    h0: Tensor | None,
    cu_seqlens: Tensor | None,
    scale: float,
    g_mode: int,
    output_final_state: bool,
) -> tuple[Tensor, Tensor]:
    """Step-by-step forward (no autograd): ``(o [B, T, H, V], ht [N, H, K, V])`` in the accumulator dtype,
    ``ht`` with 0 elements without ``output_final_state``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = acc_dtype(q.dtype)
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    BK, BV = tile(K), tile(V)
    NK = triton.cdiv(K, BK)
    o = q.new_empty(NK, B, T, H, V, dtype=acc)
    ht = q.new_empty(N, H, K, V, dtype=acc) if output_final_state else None
    wrap_triton(_fused_recurrent_kernel)[(triton.cdiv(V, BV), NK, N * H)](
        q, k, v, g, o, h0, ht, cu_seqlens, scale, T,
        H=H, K=K, V=V, BK=BK, BV=BV, G_MODE=g_mode, USE_H0=h0 is not None, STORE_HT=output_final_state,
        IS_VARLEN=cu_seqlens is not None, ACC=tl_dtype(q.dtype),
    )  # fmt: skip
    return o.sum(0), _or_empty(ht, q, acc)


@_gla_fused.register_fake
def _(q, k, v, g, h0, cu_seqlens, scale, g_mode, output_final_state):
    B, T, H, K = q.shape
    acc = acc_dtype(q.dtype)
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    ht = q.new_empty(N, H, K, v.shape[-1], dtype=acc) if output_final_state else q.new_empty(0, dtype=acc)
    return torch.empty_like(v, dtype=acc, memory_format=torch.contiguous_format), ht


# ---------------------------------------------------------------------------------------------- entry points


def chunk_gla(q, k, v, g, g_mode: int, *, scale, initial_state, output_final_state, cu_seqlens, op: str):
    """Shared entry of the chunked Triton path (``g_mode`` 0/1/2, see the module docstring); returns
    ``(o in q.dtype, final_state or None)``. Shapes as :func:`seqzoo.ops.gla.gla`."""
    in_dtype = q.dtype
    precision = dot_precision(in_dtype)
    scale = default_scale(scale, q.shape[-1])
    q, k, v, g = (kernel_input(t) for t in (q, k, v, g))
    h0 = None if initial_state is None else kernel_input(initial_state).to(acc_dtype(q.dtype))
    packing = varlen_indices(cu_seqlens, q.shape[0], q.shape[1], q.device, op) or (None, None, None)
    o, ht, _, _ = _gla_triton_fwd(q, k, v, g, h0, *packing, scale, g_mode, output_final_state, precision)
    return o.to(in_dtype), (ht if output_final_state else None)


def fused_gla(q, k, v, g, g_mode: int, *, scale, initial_state, output_final_state, cu_seqlens):
    """Shared entry of the step-by-step kernel (forward only, for decoding and short inputs); returns
    ``(o in q.dtype, final_state or None)``."""
    in_dtype = q.dtype
    scale = default_scale(scale, q.shape[-1])
    q, k, v, g = (kernel_input(t) for t in (q, k, v, g))
    h0 = None if initial_state is None else kernel_input(initial_state).to(acc_dtype(q.dtype))
    # No ChunkLayout here: the step kernel needs only the offsets, and a decode step should not sync the host.
    cu = None if cu_seqlens is None else cu_seqlens.to(torch.int64).contiguous()
    o, ht = _gla_fused(q, k, v, g, h0, cu, scale, g_mode, output_final_state)
    return o.to(in_dtype), (ht if output_final_state else None)


def simple_gla_triton(q, k, v, g=None, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Chunked Triton simple GLA (differentiable). Shapes as :func:`seqzoo.ops.simple_gla.simple_gla`."""
    return chunk_gla(
        q, k, v, g, 0 if g is None else 1,
        scale=scale, initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens, op="simple_gla",
    )  # fmt: skip


def simple_gla_fused(q, k, v, g=None, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Fused recurrent Triton simple GLA, forward only. Shapes as :func:`seqzoo.ops.simple_gla.simple_gla`."""
    return fused_gla(
        q, k, v, g, 0 if g is None else 1,
        scale=scale, initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
    )  # fmt: skip
