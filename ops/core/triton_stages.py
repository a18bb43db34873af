"""Triton stages shared by the chunked linear-attention families: simple GLA / GLA and the (gated) delta rule.

Both families cut a sequence into chunks of ``BT`` tokens, carry a ``[K, V]`` state from chunk to chunk and
read it with ``q``; with ``b`` the chunk-local cumulative log gate and ``Γ_ij = e^{b_i − b_j}`` on ``j <= i``
(0 elsewhere), the delta rule is simple GLA with ``v`` replaced by its corrected values ``v' = u − w h``.
Where the maths is the same it is written once, here:

1. :func:`chunk_local_cumsum`: ``b`` from the raw log gates (scalar or per key), and, reversed, the
   gradient of the raw gates from the gradient of ``b``.
2. :func:`state_update`, the step of every inter-chunk state recurrence, ``h ← decay·h + xᵀ y``:
   forward ``x = k ⊙ e^{b_C − b}, y = v`` (``v'`` for the delta rule), backward ``x = scale·q ⊙ e^b, y = dO``
   (the delta rule subtracts ``wᵀ dv'`` as well). The *kernels* around it stay per family: GLA's key blocks
   are independent, so its state kernels split ``K`` over programs (grid ``K/BK × V/BV × N·H``), while
   ``v' = u − w h`` needs the whole key dimension at once, so a delta-rule program holds all of ``K`` (up to
   four tiles, grid ``V/BV × N·H``) and also writes ``v'``. fla keeps ``chunk_h`` and ``chunk_delta_h``
   apart for the same reason.
3. :func:`chunk_fwd_o`, the output stage ``o = scale·(q ⊙ e^b) h + A v`` with ``A = scale·(q kᵀ ⊙ Γ)``:
   ``A`` is formed inline for no gate or a scalar gate (simple GLA; the delta rule with ``v'``) and loaded
   for per-key gates (GLA, whose ``A`` needs secondary chunking, :mod:`seqzoo.ops.gla.triton`).
4. :func:`chunk_bwd_dv`, ``dv = Aᵀ dO + (k ⊙ e^{b_C − b}) dh``. The delta rule launches it without the
   ``dh`` term: its reverse state sweep must finish ``dv'`` of a chunk before it can step ``dh`` past that
   chunk (``dh ← … − wᵀ dv'``), so it adds the ``dh`` term itself.

Not shared, because the maths differs: the intra-chunk backward (GLA keeps ``dA = scale·dO vᵀ ⊙ Γ`` in
memory for its per-key sub-chunk kernels; the delta rule forms ``dP = dO v'ᵀ`` inline next to ``dw`` and its
gate partials), the WY/UT representation and its blocked unit-lower-triangular inverse (only the delta rule
has them, so the inverse lives in :mod:`seqzoo.ops.gated_delta_rule.triton`), and the fused recurrent
kernels (one recurrence each).

Layout, flags and names follow :mod:`.triton_host`; every ``tl.dot`` takes ``input_precision=PRECISION``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from seqzoo.ops.core.triton_host import (
    ChunkMeta,
    chunk_coords,
    global_chunk,
    kv_block_configs,
    load_cols,
    load_rows,
    load_state,
    load_token,
    store_rows,
    tile,
)


@triton.jit
def state_update(b_h, decay, b_xt, b_y, PRECISION: tl.constexpr):
    """One chunk of an inter-chunk state recurrence on a ``[BK, BV]`` tile: ``decay·h + xᵀ y``.

    ``decay`` is a scalar (``e^{b_C}`` of a scalar gate, 1 without a gate) or a ``[BK, 1]`` column (per-key
    gates); ``b_xt [BK, BT]`` is ``x`` already transposed (loaded so, never ``tl.trans`` of a dot result).
    """
    return b_h * decay + tl.dot(b_xt, b_y, input_precision=PRECISION)


@triton.jit
def chunk_last(i_c, seq_len, BT: tl.constexpr):
    """Offset (within its sequence) of the last token of chunk ``i_c``: the chunk may be partial."""
    return tl.minimum(i_c * BT + BT, seq_len) - 1


# ------------------------------------------------------------------------------------------------ cumsum


@triton.jit(do_not_specialize=["T"])
def _chunk_cumsum_kernel(
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
    REVERSE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    ACC: tl.constexpr,
):
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    bos, seq_len, i_c = chunk_coords(i_t, i_b, T, cu_seqlens, chunk_indices, IS_VARLEN)
    o_t = i_c * BT + tl.arange(0, BT)
    m_t = o_t < seq_len
    if PER_KEY:
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_g = load_rows(g, bos, o_t, m_t, o_k, m_k, H, K, i_h, ACC)
        store_rows(gc, tl.cumsum(b_g, axis=0, reverse=REVERSE), bos, o_t, m_t, o_k, m_k, H, K, i_h)
    else:
        b_g = load_token(g, bos, o_t, m_t, H, i_h, ACC)
        tl.store(gc + (bos + o_t) * H + i_h, tl.cumsum(b_g, axis=0, reverse=REVERSE).to(gc.dtype.element_ty), mask=m_t)


def chunk_local_cumsum(g: torch.Tensor, m: ChunkMeta, reverse: bool = False) -> torch.Tensor:
    """Inclusive cumsum of ``g`` (``[B, T, H]`` or per key ``[B, T, H, K]``) within every chunk, from the chunk
    end with ``reverse``; fp32 (fp64 for fp64 ``g``)."""
    per_key = g.dim() == 4
    gc = torch.empty(g.shape, dtype=torch.float64 if g.dtype == torch.float64 else torch.float32, device=g.device)
    BK = tile(m.K) if per_key else 16
    grid = (triton.cdiv(m.K, BK) if per_key else 1, m.NT, m.B * m.H)
    wrap_triton(_chunk_cumsum_kernel)[grid](
        g, gc, m.cu_seqlens, m.chunk_indices, m.T,
        H=m.H, K=m.K, BT=m.chunk, BK=BK, PER_KEY=per_key, REVERSE=reverse, IS_VARLEN=m.varlen, ACC=m.ACC,
    )  # fmt: skip
    return gc


# ------------------------------------------------------------------------------------------ output stage


@triton.autotune(configs=kv_block_configs(), key=["K", "V", "G_MODE", "ACC", "PRECISION"])
@triton.jit(do_not_specialize=["T"])
def _chunk_fwd_o_kernel(
    q,
    k,
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
    PRECISION: tl.constexpr,
):
    """``o = scale·(q ⊙ e^b) h + A v`` for one ``[BT, BV]`` tile; ``A`` (scale included) is read for ``G_MODE == 2``."""
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    bos, seq_len, i_c = chunk_coords(i_t, i_b, T, cu_seqlens, chunk_indices, IS_VARLEN)
    p_h = h + (global_chunk(i_t, i_b, T, BT, IS_VARLEN) * H + i_h) * (K * V)
    o_i = tl.arange(0, BT)
    o_t = i_c * BT + o_i
    m_t = o_t < seq_len
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_o = tl.zeros([BT, BV], dtype=ACC)
    b_A = tl.zeros([BT, BT], dtype=ACC)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_q = load_rows(q, bos, o_t, m_t, o_k, m_k, H, K, i_h, ACC)
        if G_MODE == 2:
            b_q *= tl.exp(load_rows(gc, bos, o_t, m_t, o_k, m_k, H, K, i_h, ACC))
        else:
            b_A += tl.dot(b_q, load_cols(k, bos, o_t, m_t, o_k, m_k, H, K, i_h, ACC), input_precision=PRECISION)
        b_o += tl.dot(b_q, load_state(p_h, o_k, m_k, o_v, m_v, V, ACC), input_precision=PRECISION)
    if G_MODE == 2:
        b_A = load_rows(A, bos, o_t, m_t, o_i, o_i < BT, H, BT, i_h, ACC)
    else:
        # Mask the exponent, not the product: above the diagonal (and in padding) b_i − b_j may be large.
        valid = (o_i[:, None] >= o_i[None, :]) & m_t[:, None] & m_t[None, :]
        if G_MODE == 1:
            b_g = load_token(gc, bos, o_t, m_t, H, i_h, ACC)
            b_o *= tl.exp(b_g)[:, None]
            b_A *= tl.exp(tl.where(valid, b_g[:, None] - b_g[None, :], float("-inf")))
        else:
            b_A = tl.where(valid, b_A, 0)
        b_A *= scale
    b_v = load_rows(v, bos, o_t, m_t, o_v, m_v, H, V, i_h, ACC)
    b_o = b_o * scale + tl.dot(b_A, b_v, input_precision=PRECISION)
    store_rows(o, b_o, bos, o_t, m_t, o_v, m_v, H, V, i_h)


def chunk_fwd_o(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gc: torch.Tensor | None,
    h: torch.Tensor,
    A: torch.Tensor | None,
    m: ChunkMeta,
    scale: float,
    g_mode: int,
) -> torch.Tensor:
    """Outputs ``[B, T, H, V]`` (``v``'s dtype) from ``q, k [B, T, H, K]``, ``v``, the cumulated gate ``gc``
    (``None`` for ``g_mode == 0``), the chunk-start states ``h [total_chunks, H, K, V]`` and, for per-key gates
    (``g_mode == 2``), the intra-chunk scores ``A [B, T, H, BT]``."""
    o = torch.empty_like(v)

    def grid(meta):
        return (triton.cdiv(m.V, meta["BV"]), m.NT, m.B * m.H)

    wrap_triton(_chunk_fwd_o_kernel)[grid](
        q, k, v, gc, h, A, o, m.cu_seqlens, m.chunk_indices, scale, m.T,
        H=m.H, K=m.K, V=m.V, BT=m.chunk, G_MODE=g_mode, IS_VARLEN=m.varlen, ACC=m.ACC, PRECISION=m.precision,
    )  # fmt: skip
    return o


# --------------------------------------------------------------------------------------- dv (backward)


@triton.autotune(configs=kv_block_configs(), key=["K", "V", "G_MODE", "USE_DH", "ACC", "PRECISION"])
@triton.jit(do_not_specialize=["T"])
def _chunk_bwd_dv_kernel(
    q,
    k,
    do,
    gc,
    A,
    dh,
    dv,
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
    USE_DH: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``dv = Aᵀ dO`` (plus ``(k ⊙ e^{b_C − b}) dh`` with ``USE_DH``) for one ``[BT, BV]`` tile; ``Aᵀ`` is formed
    inline for ``G_MODE < 2`` and read (transposed by its indexing) for per-key gates."""
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    bos, seq_len, i_c = chunk_coords(i_t, i_b, T, cu_seqlens, chunk_indices, IS_VARLEN)
    i_tg = global_chunk(i_t, i_b, T, BT, IS_VARLEN)
    o_i = tl.arange(0, BT)
    o_t = i_c * BT + o_i
    m_t = o_t < seq_len
    last = bos + chunk_last(i_c, seq_len, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    if G_MODE == 1:
        b_g = load_token(gc, bos, o_t, m_t, H, i_h, ACC)
        g_last = tl.load(gc + last * H + i_h).to(ACC)
    b_dv = tl.zeros([BT, BV], dtype=ACC)
    b_At = tl.zeros([BT, BT], dtype=ACC)  # b_At[j, i] = A[i, j]
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_k = load_rows(k, bos, o_t, m_t, o_k, m_k, H, K, i_h, ACC)
        if G_MODE < 2:
            b_At += tl.dot(b_k, load_cols(q, bos, o_t, m_t, o_k, m_k, H, K, i_h, ACC), input_precision=PRECISION)
        if USE_DH:
            if G_MODE == 1:
                b_k *= tl.exp(g_last - b_g)[:, None]
            if G_MODE == 2:
                g_last_k = tl.load(gc + (last * H + i_h) * K + o_k, mask=m_k, other=0).to(ACC)
                b_k *= tl.exp(g_last_k[None, :] - load_rows(gc, bos, o_t, m_t, o_k, m_k, H, K, i_h, ACC))
            b_dh = load_state(dh + (i_tg * H + i_h) * (K * V), o_k, m_k, o_v, m_v, V, ACC)
            b_dv += tl.dot(b_k, b_dh, input_precision=PRECISION)
    if G_MODE == 2:
        b_At = load_cols(A, bos, o_t, m_t, o_i, o_i < BT, H, BT, i_h, ACC)
    else:
        keep = (o_i[None, :] >= o_i[:, None]) & m_t[:, None] & m_t[None, :]
        if G_MODE == 1:
            b_At *= tl.exp(tl.where(keep, b_g[None, :] - b_g[:, None], float("-inf")))
        else:
            b_At = tl.where(keep, b_At, 0)
        b_At *= scale
    b_dv += tl.dot(b_At, load_rows(do, bos, o_t, m_t, o_v, m_v, H, V, i_h, ACC), input_precision=PRECISION)
    store_rows(dv, b_dv, bos, o_t, m_t, o_v, m_v, H, V, i_h)


def chunk_bwd_dv(
    q: torch.Tensor,
    k: torch.Tensor,
    do: torch.Tensor,
    gc: torch.Tensor | None,
    A: torch.Tensor | None,
    dh: torch.Tensor | None,
    m: ChunkMeta,
    scale: float,
    g_mode: int,
) -> torch.Tensor:
    """``dv [B, T, H, V]`` (accumulator dtype) from ``do [B, T, H, V]``, with the state term when ``dh``
    (``[total_chunks, H, K, V]``, gradients of the states leaving every chunk) is given. Shapes as :func:`chunk_fwd_o`."""
    dv = torch.empty_like(do, dtype=m.acc)

    def grid(meta):
        return (triton.cdiv(m.V, meta["BV"]), m.NT, m.B * m.H)

    wrap_triton(_chunk_bwd_dv_kernel)[grid](
        q, k, do, gc, A, dh, dv, m.cu_seqlens, m.chunk_indices, scale, m.T,
        H=m.H, K=m.K, V=m.V, BT=m.chunk, G_MODE=g_mode, USE_DH=dh is not None, IS_VARLEN=m.varlen, ACC=m.ACC,
        PRECISION=m.precision,
    )  # fmt: skip
    return dv
