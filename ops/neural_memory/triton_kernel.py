"""Triton kernels for the linear neural memory (forward and backward), the default on CUDA.

The split between PyTorch and Triton follows the chunked PyTorch path (:mod:`.chunk`): the gate
coefficients of every chunk (``β, f, C`` and the last rows, all O(seq · chunk)) are built in PyTorch with
autograd; the kernels run the sequential part (chunk-start states, errors, reads, state writes) and their
backward hands back the gradients of those coefficients, which autograd then carries to the gates.

Grid: ``(cdiv(value_dim, BV), batch * heads)``. The value columns of the memory are independent (the error
``K W − V`` of column block ``j`` needs only ``W[:, j]``), so a program owns a ``[key_dim, BV]`` slice of
``W`` and ``S`` in fp32 registers and walks the chunks in order; the backward walks them in reverse,
carrying ``dW, dS``. Reductions over the value dimension (``dq, dk``, gate terms) are written per value
block and summed in PyTorch: deterministic, no atomics. Chunk-start states are stored for the backward
(``[B, H, N, key_dim, value_dim]``, like fla's ``h``), never per-token weights.

The kernels run as ``torch.library`` ops with fake (shape) implementations: ``seqzoo::neural_memory_linear_triton_fwd``
/ ``_bwd`` (autograd: the first's backward calls the second) and the inference-only
``seqzoo::neural_memory_mlp_triton_fwd``. Accumulation is fp32 (fp64 for an fp64 state, which ``gradcheck``
uses); every ``tl.dot`` runs at :func:`~seqzoo.ops.core.precision.dot_precision` of the input dtype (IEEE
for fp32, so the kernels match the fp32 reference to ~1e-6; tf32 for half inputs, whose own rounding
exceeds tf32's). Memories are dense batches (no packed sequences), so the chunk layout of
:mod:`seqzoo.ops.core.triton_host` is not used here; dtypes, flags and names follow it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from seqzoo.ops.core import dot_precision, kernel_input, needs_grad
from seqzoo.ops.core.triton_host import acc_dtype, tl_dtype
from seqzoo.ops.neural_memory.chunk import gate_coefficients
from seqzoo.ops.neural_memory.memory import LinearMemoryState, MLPMemoryState, MLPSpec
from seqzoo.ops.utils import autotune_configs

_CONFIGS = autotune_configs([triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)])


@triton.jit
def _chunk_tokens(
    q,
    k,
    v,
    theta,
    n,
    i_b,
    i_h,
    T,
    o_t,
    o_k,
    m_k,
    o_v,
    m_v,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    CHUNK: tl.constexpr,
    ACC: tl.constexpr,
):
    """Chunk ``n``'s tokens of one (sequence, head): ``q, k [BT, BK]``, ``v [BT, BV]``, ``θ [BT]``, the row mask and
    the rows' offsets in ``[B, T, H]``. Rows past the chunk (tile padding) or the sequence (last chunk) load as zeros."""
    t = n * CHUNK + o_t
    m_t = (o_t < CHUNK) & (t < T)
    row = (i_b * T + t.to(tl.int64)) * H + i_h
    m_tk = m_t[:, None] & m_k[None, :]
    q_n = tl.load(q + row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
    k_n = tl.load(k + row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
    v_n = tl.load(v + row[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0).to(ACC)
    th = tl.load(theta + row, mask=m_t, other=0.0).to(ACC)
    return q_n, k_n, v_n, th, m_t, row


@triton.jit
def _chunk_coefficients(beta, f, c, c_last, e_last, beta_last, f_last, h_last, i_c, o_t, CHUNK: tl.constexpr):
    """Gate coefficients of chunk ``i_c`` (``[B, H, N]`` flattened): the rows ``β, f, C_last, E_last [BT]``, the
    ``[BT, BT]`` matrix ``C`` and the scalars ``β_last, f_last, h_last``."""
    m_c = o_t < CHUNK
    p_row = i_c * CHUNK + o_t
    b_n = tl.load(beta + p_row, mask=m_c, other=0.0)
    f_n = tl.load(f + p_row, mask=m_c, other=0.0)
    cl = tl.load(c_last + p_row, mask=m_c, other=0.0)
    el = tl.load(e_last + p_row, mask=m_c, other=0.0)
    c_n = tl.load(c + i_c * CHUNK * CHUNK + o_t[:, None] * CHUNK + o_t[None, :], mask=m_c[:, None] & m_c[None, :], other=0.0)
    return b_n, f_n, cl, el, c_n, tl.load(beta_last + i_c), tl.load(f_last + i_c), tl.load(h_last + i_c)


@triton.autotune(configs=_CONFIGS, key=["K", "V", "CHUNK", "BV"])
@triton.jit(do_not_specialize=["T", "N"])
def _fwd_kernel(
    q,
    k,
    v,
    theta,  # [B, T, H, K], [B, T, H, K], [B, T, H, V], [B, T, H]
    beta,
    f,
    c,
    c_last,
    e_last,  # [B, H, N, CHUNK], [B, H, N, CHUNK], [B, H, N, CHUNK, CHUNK], 2 x [B, H, N, CHUNK]
    beta_last,
    f_last,
    h_last,  # [B, H, N]
    w0,
    s0,  # [B, H, K, V]
    y,  # [B, T, H, V] (accumulation dtype)
    w_start,
    s_start,  # [B, H, N, K, V], written when STORE_STARTS
    w_out,
    s_out,  # [B, H, K, V]
    T,
    N,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    CHUNK: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    STORE_STARTS: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_state = i_bh * K * V + o_k[:, None] * V + o_v[None, :]
    w = tl.load(w0 + p_state, mask=m_kv, other=0.0).to(ACC)
    s = tl.load(s0 + p_state, mask=m_kv, other=0.0).to(ACC)
    for n in range(N):
        q_n, k_n, v_n, th, m_t, row = _chunk_tokens(q, k, v, theta, n, i_b, i_h, T, o_t, o_k, m_k, o_v, m_v, H, K, V, CHUNK, ACC)
        i_c = i_bh * N + n
        b_n, f_n, cl, el, c_n, bl, fl, hl = _chunk_coefficients(beta, f, c, c_last, e_last, beta_last, f_last, h_last, i_c, o_t, CHUNK)
        if STORE_STARTS:
            p_save = i_c * K * V + o_k[:, None] * V + o_v[None, :]
            tl.store(w_start + p_save, w, mask=m_kv)
            tl.store(s_start + p_save, s, mask=m_kv)
        # θ-weighted errors at the chunk-start weights (θ_j u_j = k_jᵀ g_j), then the reads of W_t.
        g = th[:, None] * (tl.dot(k_n, w, input_precision=PRECISION, out_dtype=ACC) - v_n)
        scores = c_n * tl.dot(q_n, tl.trans(k_n), input_precision=PRECISION, out_dtype=ACC)
        y_n = b_n[:, None] * tl.dot(q_n, w, input_precision=PRECISION, out_dtype=ACC)
        y_n += f_n[:, None] * tl.dot(q_n, s, input_precision=PRECISION, out_dtype=ACC)
        y_n -= tl.dot(scores, g, input_precision=PRECISION, out_dtype=ACC)
        tl.store(y + row[:, None] * V + o_v[None, :], y_n, mask=m_t[:, None] & m_v[None, :])
        write_w = tl.dot(tl.trans(k_n * cl[:, None]), g, input_precision=PRECISION, out_dtype=ACC)
        write_s = tl.dot(tl.trans(k_n * el[:, None]), g, input_precision=PRECISION, out_dtype=ACC)
        w, s = bl * w + fl * s - write_w, hl * s - write_s
    tl.store(w_out + p_state, w, mask=m_kv)
    tl.store(s_out + p_state, s, mask=m_kv)


@triton.autotune(configs=_CONFIGS, key=["K", "V", "CHUNK", "BV"])
@triton.jit(do_not_specialize=["T", "N"])
def _bwd_kernel(
    q,
    k,
    v,
    theta,
    dy,  # [B, T, H, K] x2, [B, T, H, V], [B, T, H], [B, T, H, V]
    beta,
    f,
    c,
    c_last,
    e_last,
    beta_last,
    f_last,
    h_last,  # as in the forward
    w_start,
    s_start,  # [B, H, N, K, V]
    dw_end,
    ds_end,  # [B, H, K, V]: gradients of the final state (zeros when unused)
    dq,
    dk,  # [NV, B, T, H, K] partial sums over value blocks
    dv,  # [B, T, H, V]
    d_theta,  # [NV, B, T, H]
    d_beta,
    d_f,
    d_c_last,
    d_e_last,  # [NV, B, H, N, CHUNK]
    d_c,  # [NV, B, H, N, CHUNK, CHUNK]
    d_beta_last,
    d_f_last,
    d_h_last,  # [NV, B, H, N]
    dw0,
    ds0,  # [B, H, K, V]
    T,
    N,
    B,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    CHUNK: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    m_c = o_t < CHUNK
    p_state = i_bh * K * V + o_k[:, None] * V + o_v[None, :]
    # Gradients with respect to the state at the end of the current chunk, walked backwards.
    dw = tl.load(dw_end + p_state, mask=m_kv, other=0.0).to(ACC)
    ds = tl.load(ds_end + p_state, mask=m_kv, other=0.0).to(ACC)
    part = i_v.to(tl.int64) * B * H  # this value block's partial sums start part * (N * CHUNK) etc.
    for i_n in range(N):
        n = N - 1 - i_n
        q_n, k_n, v_n, th, m_t, row = _chunk_tokens(q, k, v, theta, n, i_b, i_h, T, o_t, o_k, m_k, o_v, m_v, H, K, V, CHUNK, ACC)
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        dy_n = tl.load(dy + row[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(ACC)
        i_c = i_bh * N + n
        b_n, f_n, cl, el, c_n, bl, fl, hl = _chunk_coefficients(beta, f, c, c_last, e_last, beta_last, f_last, h_last, i_c, o_t, CHUNK)
        m_cc = m_c[:, None] & m_c[None, :]
        p_save = i_c * K * V + o_k[:, None] * V + o_v[None, :]
        w = tl.load(w_start + p_save, mask=m_kv, other=0.0)
        s = tl.load(s_start + p_save, mask=m_kv, other=0.0)

        err = tl.dot(k_n, w, input_precision=PRECISION, out_dtype=ACC) - v_n
        g = th[:, None] * err
        qk = tl.dot(q_n, tl.trans(k_n), input_precision=PRECISION, out_dtype=ACC)
        kc = k_n * cl[:, None]
        ke = k_n * el[:, None]
        dg = -tl.dot(tl.trans(c_n * qk), dy_n, input_precision=PRECISION, out_dtype=ACC)
        dg -= tl.dot(ke, ds, input_precision=PRECISION, out_dtype=ACC)
        dg -= tl.dot(kc, dw, input_precision=PRECISION, out_dtype=ACC)
        # The momentum and weight writes −(K ⊙ Lη_last)ᵀ G and −(K ⊙ C_last)ᵀ G, seen from k and the rows.
        m_s = -tl.dot(g, tl.trans(ds), input_precision=PRECISION, out_dtype=ACC)
        m_w = -tl.dot(g, tl.trans(dw), input_precision=PRECISION, out_dtype=ACC)
        de = th[:, None] * dg
        d_scores = -tl.dot(dy_n, tl.trans(g), input_precision=PRECISION, out_dtype=ACC)
        d_qk = d_scores * c_n
        qw = tl.dot(q_n, w, input_precision=PRECISION, out_dtype=ACC)
        qs = tl.dot(q_n, s, input_precision=PRECISION, out_dtype=ACC)
        dq_n = b_n[:, None] * tl.dot(dy_n, tl.trans(w), input_precision=PRECISION, out_dtype=ACC)
        dq_n += f_n[:, None] * tl.dot(dy_n, tl.trans(s), input_precision=PRECISION, out_dtype=ACC)
        dq_n += tl.dot(d_qk, k_n, input_precision=PRECISION, out_dtype=ACC)
        dk_n = tl.dot(tl.trans(d_qk), q_n, input_precision=PRECISION, out_dtype=ACC)
        dk_n += tl.dot(de, tl.trans(w), input_precision=PRECISION, out_dtype=ACC)
        dk_n += el[:, None] * m_s + cl[:, None] * m_w

        t = n * CHUNK + o_t
        row_p = ((i_v * B + i_b) * T + t.to(tl.int64)) * H + i_h  # [NV, B, T, H] row of the partials
        tl.store(dq + row_p[:, None] * K + o_k[None, :], dq_n, mask=m_tk)
        tl.store(dk + row_p[:, None] * K + o_k[None, :], dk_n, mask=m_tk)
        tl.store(dv + row[:, None] * V + o_v[None, :], -de, mask=m_tv)
        tl.store(d_theta + row_p, tl.sum(dg * err, axis=1), mask=m_t)
        p_row_p = (part * N + i_c) * CHUNK + o_t
        tl.store(d_beta + p_row_p, tl.sum(dy_n * qw, axis=1), mask=m_c)
        tl.store(d_f + p_row_p, tl.sum(dy_n * qs, axis=1), mask=m_c)
        tl.store(d_e_last + p_row_p, tl.sum(k_n * m_s, axis=1), mask=m_c)
        tl.store(d_c_last + p_row_p, tl.sum(k_n * m_w, axis=1), mask=m_c)
        tl.store(d_c + (part * N + i_c) * CHUNK * CHUNK + o_t[:, None] * CHUNK + o_t[None, :], d_scores * qk, mask=m_cc)
        tl.store(d_h_last + part * N + i_c, tl.sum(tl.sum(ds * s, axis=1), axis=0))
        tl.store(d_beta_last + part * N + i_c, tl.sum(tl.sum(dw * w, axis=1), axis=0))
        tl.store(d_f_last + part * N + i_c, tl.sum(tl.sum(dw * s, axis=1), axis=0))

        dw_prev = tl.dot(tl.trans(q_n * b_n[:, None]), dy_n, input_precision=PRECISION, out_dtype=ACC)
        dw_prev += bl * dw + tl.dot(tl.trans(k_n), de, input_precision=PRECISION, out_dtype=ACC)
        ds = tl.dot(tl.trans(q_n * f_n[:, None]), dy_n, input_precision=PRECISION, out_dtype=ACC) + hl * ds + fl * dw
        dw = dw_prev
    tl.store(dw0 + p_state, dw, mask=m_kv)
    tl.store(ds0 + p_state, ds, mask=m_kv)


def _tiles(chunk_size: int, key_dim: int, value_dim: int) -> tuple[int, int, int]:
    """``(BT, BK, BV)``: every ``tl.dot`` dimension ≥ 16 (NVIDIA needs it); the full key dim in one tile.

    Value blocks shrink as the key dim grows so that ``W, S`` (and ``dW, dS``) fit in registers.
    """
    bt = max(16, triton.next_power_of_2(chunk_size))
    bk = max(16, triton.next_power_of_2(key_dim))
    cap = 64 if bk <= 64 else (32 if bk <= 128 else 16)
    bv = max(16, min(triton.next_power_of_2(value_dim), cap))
    return bt, bk, bv


_COEFFICIENTS = ("beta", "f", "C", "beta_last", "f_last", "h_last", "c_last", "e_last")


@triton_op("seqzoo::neural_memory_linear_triton_fwd", mutates_args=())
def _linear_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    beta: Tensor,
    f: Tensor,
    c: Tensor,
    beta_last: Tensor,
    f_last: Tensor,
    h_last: Tensor,
    c_last: Tensor,
    e_last: Tensor,
    w0: Tensor,
    s0: Tensor,
    chunk_size: int,
    store_starts: bool,
    precision: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward of the linear memory: ``(y [B, T, H, V], w [B, H, K, V], s [B, H, K, V], w_start, s_start)``
    in the state dtype; ``w_start, s_start [B, H, N, K, V]`` (the chunk-start states, kept for the backward)
    have 0 elements unless ``store_starts``. Coefficients as :func:`.chunk.gate_coefficients` returns them."""
    batch, seq, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    n_chunks = beta.shape[2]
    bt, bk, bv = _tiles(chunk_size, key_dim, value_dim)
    y = q.new_empty(batch, seq, heads, value_dim, dtype=acc_dtype(w0.dtype))
    starts = (batch, heads, n_chunks, key_dim, value_dim) if store_starts else (0,)
    w_start, s_start = w0.new_empty(starts), w0.new_empty(starts)
    w_out, s_out = torch.empty_like(w0), torch.empty_like(s0)
    grid = (triton.cdiv(value_dim, bv), batch * heads)
    wrap_triton(_fwd_kernel)[grid](
        q, k, v, theta, beta, f, c, c_last, e_last, beta_last, f_last, h_last, w0, s0,
        y, w_start, s_start, w_out, s_out, seq, n_chunks,
        H=heads, K=key_dim, V=value_dim, CHUNK=chunk_size, BT=bt, BK=bk, BV=bv,
        STORE_STARTS=store_starts, ACC=tl_dtype(w0.dtype), PRECISION=precision,
    )  # fmt: skip
    return y, w_out, s_out, w_start, s_start


@_linear_fwd.register_fake
def _(q, k, v, theta, beta, f, c, beta_last, f_last, h_last, c_last, e_last, w0, s0, chunk_size, store_starts, precision):
    batch, seq, heads, key_dim = q.shape
    starts = (batch, heads, beta.shape[2], key_dim, v.shape[-1]) if store_starts else (0,)
    y = q.new_empty(batch, seq, heads, v.shape[-1], dtype=acc_dtype(w0.dtype))
    return y, torch.empty_like(w0), torch.empty_like(s0), w0.new_empty(starts), w0.new_empty(starts)


@triton_op("seqzoo::neural_memory_linear_triton_bwd", mutates_args=())
def _linear_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    beta: Tensor,
    f: Tensor,
    c: Tensor,
    beta_last: Tensor,
    f_last: Tensor,
    h_last: Tensor,
    c_last: Tensor,
    e_last: Tensor,
    w_start: Tensor,
    s_start: Tensor,
    dy: Tensor,
    dw_end: Tensor,
    ds_end: Tensor,
    chunk_size: int,
    precision: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of the linear memory, in the state dtype: the gradients of ``q, k, v, θ``, of the eight
    coefficients (in :func:`_linear_fwd`'s order) and of ``w0, s0``, from the kept chunk-start states and the
    cotangents ``dy [B, T, H, V]``, ``dw_end, ds_end [B, H, K, V]``."""
    batch, seq, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    n_chunks = beta.shape[2]
    bt, bk, bv = _tiles(chunk_size, key_dim, value_dim)
    n_v = triton.cdiv(value_dim, bv)
    shape_state = (batch, heads, key_dim, value_dim)
    new = lambda *shape: w_start.new_empty(*shape)  # noqa: E731
    dq, dk = new(n_v, batch, seq, heads, key_dim), new(n_v, batch, seq, heads, key_dim)
    dv = new(batch, seq, heads, value_dim)
    d_theta = new(n_v, batch, seq, heads)
    d_rows = [new(n_v, batch, heads, n_chunks, chunk_size) for _ in range(4)]
    d_c = new(n_v, batch, heads, n_chunks, chunk_size, chunk_size)
    d_scalars = [new(n_v, batch, heads, n_chunks) for _ in range(3)]
    dw0, ds0 = new(shape_state), new(shape_state)
    wrap_triton(_bwd_kernel)[(n_v, batch * heads)](
        q, k, v, theta, dy, beta, f, c, c_last, e_last, beta_last, f_last, h_last,
        w_start, s_start, dw_end, ds_end, dq, dk, dv, d_theta, *d_rows, d_c, *d_scalars, dw0, ds0,
        seq, n_chunks, batch,
        H=heads, K=key_dim, V=value_dim, CHUNK=chunk_size, BT=bt, BK=bk, BV=bv, ACC=tl_dtype(w_start.dtype), PRECISION=precision,
    )  # fmt: skip
    d_beta, d_f, d_c_last, d_e_last = (x.sum(0) for x in d_rows)
    d_beta_last, d_f_last, d_h_last = (x.sum(0) for x in d_scalars)
    return (
        dq.sum(0), dk.sum(0), dv, d_theta.sum(0),
        d_beta, d_f, d_c.sum(0), d_beta_last, d_f_last, d_h_last, d_c_last, d_e_last, dw0, ds0,
    )  # fmt: skip


@_linear_bwd.register_fake
def _(q, k, v, theta, beta, f, c, beta_last, f_last, h_last, c_last, e_last, w_start, s_start, dy, dw_end, ds_end, chunk_size, precision):
    like = [q, k, v, theta, beta, f, c, beta_last, f_last, h_last, c_last, e_last, dw_end, ds_end]
    return tuple(torch.empty(t.shape, dtype=w_start.dtype, device=t.device) for t in like)


def _linear_setup_context(ctx, inputs, output):
    *tensors, w0, s0, chunk_size, _store_starts, precision = inputs
    _, _, _, w_start, s_start = output
    ctx.mark_non_differentiable(w_start, s_start)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*tensors, w_start, s_start)
    ctx.config = (chunk_size, precision)
    ctx.dtypes = [t.dtype for t in tensors[:4]]


def _linear_backward(ctx, dy, dw_end, ds_end, _dw_start, _ds_start):
    *tensors, w_start, s_start = ctx.saved_tensors
    chunk_size, precision = ctx.config
    state_dtype = w_start.dtype
    q, v = tensors[0], tensors[2]
    dy = torch.zeros_like(v, dtype=state_dtype) if dy is None else dy.to(state_dtype).contiguous()
    shape_state = (q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    dw_end = w_start.new_zeros(shape_state) if dw_end is None else dw_end.contiguous()
    ds_end = w_start.new_zeros(shape_state) if ds_end is None else ds_end.contiguous()
    grads = list(_linear_bwd(*tensors, w_start, s_start, dy, dw_end, ds_end, chunk_size, precision))
    # q, k, v and θ get their gradients in their own dtypes; the coefficients and states are in the state dtype.
    grads[:4] = [g.to(dt) for g, dt in zip(grads[:4], ctx.dtypes)]
    return (*grads, None, None, None)


_linear_fwd.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def neural_memory_linear_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    momentum: torch.Tensor,
    decay: torch.Tensor,
    chunk_size: int,
    state: LinearMemoryState,
    retrieval: str = "token",
) -> tuple[torch.Tensor, LinearMemoryState]:
    """Linear memory with the Triton kernels; arguments and returns as :func:`.chunk.neural_memory_chunk_linear`."""
    precision = dot_precision(q.dtype)
    coef = gate_coefficients(momentum, decay, state.weight.dtype, chunk_size, retrieval)
    # The interpreter computes bf16 wrongly: kernel_input hands it fp32 there.
    q, k, v, lr = (kernel_input(x) for x in (q, k, v, lr))
    inputs = (q, k, v, lr, *(getattr(coef, n).contiguous() for n in _COEFFICIENTS), state.weight.contiguous(), state.momentum.contiguous())
    # The chunk-start states are stored only when a backward can follow.
    y, w, s, _, _ = _linear_fwd(*inputs, chunk_size, needs_grad(*inputs), precision)
    return y, LinearMemoryState(w, s)


# ---------------------------------------------------------------------------------------------- MLP memory (forward)

_ACT_CODES = {"gelu": 0, "silu": 1, "relu": 2, "tanh": 3}


@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == 0:
        return 0.5 * x * (1 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 1:
        return x * tl.sigmoid(x)
    elif ACT == 2:
        return tl.maximum(x, 0.0)
    else:
        return 2 * tl.sigmoid(2 * x) - 1


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    if ACT == 0:
        return 0.5 * (1 + tl.math.erf(x * 0.7071067811865476)) + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    elif ACT == 1:
        sg = tl.sigmoid(x)
        return sg * (1 + x * (1 - sg))
    elif ACT == 2:
        return tl.where(x > 0, 1.0, 0.0)
    else:
        th = 2 * tl.sigmoid(2 * x) - 1
        return 1 - th * th


@triton.jit
def _ln_head(z, m_v, lnw, lnb, V: tl.constexpr, EPS: tl.constexpr):
    """Row-wise LayerNorm over the ``V`` valid columns: returns ``(γ ⊙ x̂ + b, x̂, 1/σ)``."""
    mu = tl.sum(z, axis=1) / V
    zc = tl.where(m_v[None, :], z - mu[:, None], 0.0)
    rstd = 1 / tl.sqrt(tl.sum(zc * zc, axis=1) / V + EPS)
    xhat = zc * rstd[:, None]
    return xhat * lnw[None, :] + lnb[None, :], xhat, rstd


@triton.autotune(configs=_CONFIGS, key=["K", "V", "HID", "CHUNK", "BH"])
@triton.jit(do_not_specialize=["T", "N"])
def _mlp_fwd_kernel(
    q,
    k,
    v,
    theta,  # [B, T, H, K], [B, T, H, K], [B, T, H, V], [B, T, H]
    beta,
    f,
    c,
    c_last,
    e_last,
    beta_last,
    f_last,
    h_last,  # as in the linear kernels
    w1,
    w2,
    s1,
    s2,  # [B, H, K, HID], [B, H, HID, V] x2: the working state, updated in place
    ln_w,
    ln_b,  # [H, V] (read only when USE_LNW / USE_LNB)
    y,  # [B, T, H, V]
    T,
    N,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    HID: tl.constexpr,
    CHUNK: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BH: tl.constexpr,
    ACT: tl.constexpr,
    RESNORM: tl.constexpr,
    USE_LNW: tl.constexpr,
    USE_LNB: tl.constexpr,
    EPS: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # One program per (sequence, head): the LN head and the hidden layer couple all value columns, and
    # the weights (K·HID + HID·V, twice) do not fit in registers, so they live in global memory and
    # are streamed in hidden blocks of BH, twice per chunk (keys forward, then gradients/reads/writes).
    i_bh = tl.program_id(0).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    o_j = tl.arange(0, BH)
    m_k = o_k < K
    m_v = o_v < V
    if USE_LNW:
        lnw = tl.load(ln_w + i_h * V + o_v, mask=m_v, other=0.0).to(ACC)
    else:
        lnw = tl.where(m_v, 1.0, 0.0).to(ACC)
    if USE_LNB:
        lnb = tl.load(ln_b + i_h * V + o_v, mask=m_v, other=0.0).to(ACC)
    else:
        lnb = tl.zeros([BV], dtype=ACC)
    p_w1 = w1 + i_bh * K * HID
    p_s1 = s1 + i_bh * K * HID
    p_w2 = w2 + i_bh * HID * V
    p_s2 = s2 + i_bh * HID * V
    for n in range(N):
        q_n, k_n, v_n, th, m_t, row = _chunk_tokens(q, k, v, theta, n, i_b, i_h, T, o_t, o_k, m_k, o_v, m_v, H, K, V, CHUNK, ACC)
        m_tv = m_t[:, None] & m_v[None, :]
        i_c = i_bh * N + n
        b_n, f_n, cl, el, c_n, bl, fl, hl = _chunk_coefficients(beta, f, c, c_last, e_last, beta_last, f_last, h_last, i_c, o_t, CHUNK)

        # Pass 1: the keys through the chunk-start MLP, for the output-layer gradient G2.
        z2 = tl.zeros([BT, BV], dtype=ACC)
        for j0 in range(0, HID, BH):
            o_h = j0 + o_j
            m_h = o_h < HID
            w1b = tl.load(p_w1 + o_k[:, None] * HID + o_h[None, :], mask=m_k[:, None] & m_h[None, :], other=0.0)
            w2b = tl.load(p_w2 + o_h[:, None] * V + o_v[None, :], mask=m_h[:, None] & m_v[None, :], other=0.0)
            a = _act(tl.dot(k_n, w1b, input_precision=PRECISION, out_dtype=ACC), ACT)
            z2 += tl.dot(a, w2b, input_precision=PRECISION, out_dtype=ACC)
        if RESNORM:
            head, xhat, rstd = _ln_head(z2, m_v, lnw, lnb, V, EPS)
            gh = (k_n + head - v_n) * lnw[None, :]  # K == V here: k_n's columns line up with z2's
            mg = tl.sum(gh, axis=1) / V
            mgx = tl.sum(gh * xhat, axis=1) / V
            g2 = rstd[:, None] * (gh - mg[:, None] - xhat * mgx[:, None])
        else:
            g2 = z2 - v_n
        g2 = tl.where(m_tv, th[:, None] * g2, 0.0)

        # Pass 2: hidden-layer gradients, the query reads through per-token weights, the state writes.
        scores = c_n * tl.dot(q_n, tl.trans(k_n), input_precision=PRECISION, out_dtype=ACC)
        zq2 = tl.zeros([BT, BV], dtype=ACC)
        aa = tl.zeros([BT, BT], dtype=ACC)
        for j0 in range(0, HID, BH):
            o_h = j0 + o_j
            m_h = o_h < HID
            m_kh = m_k[:, None] & m_h[None, :]
            m_hv = m_h[:, None] & m_v[None, :]
            w1b = tl.load(p_w1 + o_k[:, None] * HID + o_h[None, :], mask=m_kh, other=0.0)
            s1b = tl.load(p_s1 + o_k[:, None] * HID + o_h[None, :], mask=m_kh, other=0.0)
            w2b = tl.load(p_w2 + o_h[:, None] * V + o_v[None, :], mask=m_hv, other=0.0)
            s2b = tl.load(p_s2 + o_h[:, None] * V + o_v[None, :], mask=m_hv, other=0.0)
            z1 = tl.dot(k_n, w1b, input_precision=PRECISION, out_dtype=ACC)
            # The transposed activations are recomputed from transposed operands rather than by
            # transposing a dot result: tl.trans of a dot result has miscompiled on Hopper (fla #640).
            a_t = _act(tl.dot(tl.trans(w1b), tl.trans(k_n), input_precision=PRECISION, out_dtype=ACC), ACT)
            g1 = tl.dot(g2, tl.trans(w2b), input_precision=PRECISION, out_dtype=ACC) * _act_grad(z1, ACT)
            zq1 = b_n[:, None] * tl.dot(q_n, w1b, input_precision=PRECISION, out_dtype=ACC)
            zq1 += f_n[:, None] * tl.dot(q_n, s1b, input_precision=PRECISION, out_dtype=ACC)
            zq1 -= tl.dot(scores, g1, input_precision=PRECISION, out_dtype=ACC)
            aq = _act(zq1, ACT)
            zq2 += b_n[:, None] * tl.dot(aq, w2b, input_precision=PRECISION, out_dtype=ACC)
            zq2 += f_n[:, None] * tl.dot(aq, s2b, input_precision=PRECISION, out_dtype=ACC)
            aa += tl.dot(aq, a_t, input_precision=PRECISION, out_dtype=ACC)
            kt = tl.trans(k_n)
            w1n = bl * w1b + fl * s1b - tl.dot(kt * cl[None, :], g1, input_precision=PRECISION, out_dtype=ACC)
            s1n = hl * s1b - tl.dot(kt * el[None, :], g1, input_precision=PRECISION, out_dtype=ACC)
            w2n = bl * w2b + fl * s2b - tl.dot(a_t * cl[None, :], g2, input_precision=PRECISION, out_dtype=ACC)
            s2n = hl * s2b - tl.dot(a_t * el[None, :], g2, input_precision=PRECISION, out_dtype=ACC)
            tl.store(p_w1 + o_k[:, None] * HID + o_h[None, :], w1n, mask=m_kh)
            tl.store(p_s1 + o_k[:, None] * HID + o_h[None, :], s1n, mask=m_kh)
            tl.store(p_w2 + o_h[:, None] * V + o_v[None, :], w2n, mask=m_hv)
            tl.store(p_s2 + o_h[:, None] * V + o_v[None, :], s2n, mask=m_hv)
        zq2 -= tl.dot(c_n * aa, g2, input_precision=PRECISION, out_dtype=ACC)
        if RESNORM:
            head_q, _, _ = _ln_head(zq2, m_v, lnw, lnb, V, EPS)
            zq2 = q_n + head_q
        tl.store(y + row[:, None] * V + o_v[None, :], zq2, mask=m_tv)
        # The next chunk reads, in other threads, the weights this chunk just stored.
        tl.debug_barrier()


@triton_op("seqzoo::neural_memory_mlp_triton_fwd", mutates_args=())
def _mlp_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    beta: Tensor,
    f: Tensor,
    c: Tensor,
    beta_last: Tensor,
    f_last: Tensor,
    h_last: Tensor,
    c_last: Tensor,
    e_last: Tensor,
    w1: Tensor,
    w2: Tensor,
    s1: Tensor,
    s2: Tensor,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    chunk_size: int,
    activation: str,
    residual_norm: bool,
    eps: float,
    precision: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """MLP memory forward (no autograd): ``(y [B, T, H, V], w1, w2, s1, s2)`` in the accumulator dtype of the
    state; the kernel updates copies of the state in place, the inputs are left alone."""
    batch, seq, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    hidden = w1.shape[-1]
    acc = acc_dtype(w1.dtype)
    work = [t.to(acc).clone(memory_format=torch.contiguous_format) for t in (w1, w2, s1, s2)]
    y = q.new_empty(batch, seq, heads, value_dim, dtype=acc)
    bt = max(16, triton.next_power_of_2(chunk_size))
    bk = max(16, triton.next_power_of_2(key_dim))
    bv = max(16, triton.next_power_of_2(value_dim))
    bh = max(16, min(32, triton.next_power_of_2(hidden)))
    wrap_triton(_mlp_fwd_kernel)[(batch * heads,)](
        q, k, v, theta, beta, f, c, c_last, e_last, beta_last, f_last, h_last, *work, ln_weight, ln_bias, y, seq, beta.shape[2],
        H=heads, K=key_dim, V=value_dim, HID=hidden, CHUNK=chunk_size, BT=bt, BK=bk, BV=bv, BH=bh,
        ACT=_ACT_CODES[activation], RESNORM=residual_norm, USE_LNW=ln_weight is not None, USE_LNB=ln_bias is not None, EPS=eps,
        ACC=tl_dtype(w1.dtype), PRECISION=precision,
    )  # fmt: skip
    return (y, *work)


@_mlp_fwd.register_fake
def _(q, k, v, theta, beta, f, c, beta_last, f_last, h_last, c_last, e_last, w1, w2, s1, s2, ln_weight, ln_bias, *config):
    acc = acc_dtype(w1.dtype)
    y = q.new_empty(*q.shape[:3], v.shape[-1], dtype=acc)
    return (y, *(torch.empty_like(t, dtype=acc, memory_format=torch.contiguous_format) for t in (w1, w2, s1, s2)))


def neural_memory_mlp_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    momentum: torch.Tensor,
    decay: torch.Tensor,
    chunk_size: int,
    state: MLPMemoryState,
    spec: MLPSpec,
    retrieval: str = "token",
) -> tuple[torch.Tensor, MLPMemoryState]:
    """MLP memory forward with Triton (no autograd: inference only); arguments as :func:`.chunk.neural_memory_chunk_mlp`."""
    precision = dot_precision(q.dtype)
    with torch.no_grad():
        coef = gate_coefficients(momentum, decay, state.w1.dtype, chunk_size, retrieval)
        q, k, v, lr = (kernel_input(x) for x in (q, k, v, lr))
        ln = [None if t is None else t.detach().contiguous() for t in (spec.ln_weight, spec.ln_bias)]
        y, *work = _mlp_fwd(
            q, k, v, lr, *(getattr(coef, n).contiguous() for n in _COEFFICIENTS), *(t.detach() for t in state), *ln,
            chunk_size, spec.activation, spec.residual_norm, spec.eps, precision,
        )  # fmt: skip
    return y, MLPMemoryState(*work)
