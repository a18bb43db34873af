"""Triton kernels for checkpoint attention: a flash-attention-style forward and a two-kernel backward.

Layout, packing and flags follow :mod:`seqzoo.ops.core.triton_host`. A query block of ``BM`` tokens starts its
online softmax from the self term (running max = its own score, normaliser 1, accumulator = its own value:
so the running max is finite from the start and no ``−inf − (−inf)`` can occur), then walks the checkpoint
blocks of ``BN`` that its last query may see, masking ``m >= ⌊p / L⌋`` per row. It stores ``o`` and the
log-sum-exp ``lse`` of every query.

Backward (``δ = rowsum(dO ⊙ O)``, ``p = exp(s − lse)``, ``ds = p ⊙ (dP − δ)``):

* :func:`_ckpt_bwd_dq_kernel`, per query block: ``dq`` (self and checkpoint terms) and the self term's
  ``dk_i = scale·ds_self·q_i``, ``dv_i = p_self·dO_i`` per *query* head;
* :func:`_ckpt_bwd_dkv_kernel`, per checkpoint block: ``dk_ckpt, dv_ckpt`` per query head, walking the
  query blocks that see the block (from position ``(m₀+1)·L`` on).

Grouped KV heads are summed over each group in PyTorch (no atomics: deterministic).
Both launches are ``torch.library`` ops (``seqzoo::checkpoint_attention_fwd`` with its backward op
``seqzoo::checkpoint_attention_bwd`` as autograd formula) with fake implementations. Accumulation is fp32
(fp64 for fp64 inputs); every ``tl.dot`` at :func:`~seqzoo.ops.core.precision.dot_precision` of the input
dtype. The interpreter cannot do bf16 math, so bf16 inputs run in fp32 when interpreting.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from seqzoo.ops.checkpoint_attention.chunk import checkpoint_offsets
from seqzoo.ops.core import ChunkLayout, dot_precision, fail, kernel_input
from seqzoo.ops.core.triton_host import acc_dtype, chunk_coords, load_cols, load_rows, load_token, seq_span, store_rows, tl_dtype
from seqzoo.ops.utils import default_scale

MAX_HEAD_DIM = 256  # one tile holds a whole head: q, k (and the accumulator) stay on chip


def _width(dim: int) -> int:
    """Tile width of a head dimension: the next power of two, at least 16 (every ``tl.dot`` dimension must be)."""
    return max(16, triton.next_power_of_2(dim))


def _blocks(key_dim: int, value_dim: int) -> tuple[int, int]:
    """``(BM, BN)``, queries and checkpoints per block, from the head widths: the backward's checkpoint kernel holds
    four ``[BN, head]`` fp32 tiles plus two ``[head, BM]`` query/gradient tiles, so wider heads take smaller blocks
    (64 × 64 at head 64, as flash attention; nothing here has been tuned on a GPU yet)."""
    width = max(_width(key_dim), _width(value_dim))
    if width <= 64:
        return 64, 64
    return (64, 32) if width <= 128 else (32, 32)


@triton.jit
def _query_block(
    i_t,
    i_bh,
    T,
    M,
    L,
    cu_seqlens,
    ckpt_offsets,
    chunk_indices,
    H: tl.constexpr,
    HKV: tl.constexpr,
    BM: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """Where query-block program ``(i_t, i_bh)`` reads: ``(i_h, i_hk, bos, cbos, o_t, m_t, n_hi)``, its query head and
    KV head, the first token of its sequence and of the sequence's checkpoints, the block's positions ``[BM]`` and
    their mask, and ``n_hi``, how many checkpoints its last query sees (the loop bound of both query-block kernels)."""
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // (H // HKV)
    bos, seq_len, i_c = chunk_coords(i_t, i_b, T, cu_seqlens, chunk_indices, IS_VARLEN)
    i_n = i_b  # dense: the row's checkpoints; packed (batch 1): the sequence's
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int64)
    cbos, count = seq_span(i_n, M, ckpt_offsets, IS_VARLEN)
    o_t = i_c * BM + tl.arange(0, BM)
    n_hi = tl.minimum((tl.minimum(i_c * BM + BM, seq_len) - 1) // L, count)
    return i_h, i_hk, bos, cbos, o_t, o_t < seq_len, n_hi


@triton.jit(do_not_specialize=["T", "M", "L"])
def _ckpt_fwd_kernel(
    q,
    k,
    v,
    kc,
    vc,
    o,
    lse,
    cu_seqlens,
    ckpt_offsets,
    chunk_indices,
    scale,
    T,
    M,
    L,
    H: tl.constexpr,
    HKV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One query block of one head: online softmax over [self, visible checkpoints]."""
    i_h, i_hk, bos, cbos, o_t, m_t, n_hi = _query_block(
        tl.program_id(0), tl.program_id(1), T, M, L, cu_seqlens, ckpt_offsets, chunk_indices, H, HKV, BM, IS_VARLEN
    )
    o_k, o_v = tl.arange(0, BK), tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    b_q = load_rows(q, bos, o_t, m_t, o_k, m_k, H, K, i_h, ACC)
    b_k = load_rows(k, bos, o_t, m_t, o_k, m_k, HKV, K, i_hk, ACC)
    b_m = tl.sum(b_q * b_k, axis=1) * scale  # the self score starts the running max
    b_l = tl.full([BM], 1.0, dtype=ACC)
    b_acc = load_rows(v, bos, o_t, m_t, o_v, m_v, HKV, V, i_hk, ACC)
    seen = o_t // L  # checkpoints each query may see
    for n0 in range(0, n_hi, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < n_hi
        b_kct = load_cols(kc, cbos, o_n, m_n, o_k, m_k, HKV, K, i_hk, ACC)  # [BK, BN]
        b_vc = load_rows(vc, cbos, o_n, m_n, o_v, m_v, HKV, V, i_hk, ACC)  # [BN, BV]
        b_s = tl.dot(b_q, b_kct, input_precision=PRECISION) * scale
        visible = (o_n[None, :] < seen[:, None]) & m_n[None, :]
        b_s = tl.where(visible, b_s, float("-inf"))
        m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
        alpha = tl.exp(b_m - m_new)
        b_p = tl.exp(b_s - m_new[:, None])
        b_l = b_l * alpha + tl.sum(b_p, axis=1)
        b_acc = b_acc * alpha[:, None] + tl.dot(b_p, b_vc, input_precision=PRECISION)
        b_m = m_new
    store_rows(o, b_acc / b_l[:, None], bos, o_t, m_t, o_v, m_v, H, V, i_h)
    tl.store(lse + (bos + o_t) * H + i_h, (b_m + tl.log(b_l)).to(lse.dtype.element_ty), mask=m_t)


@triton.jit(do_not_specialize=["T", "M", "L"])
def _ckpt_bwd_dq_kernel(
    q,
    k,
    v,
    kc,
    vc,
    do,
    lse,
    delta,
    dq,
    dk,
    dv,
    cu_seqlens,
    ckpt_offsets,
    chunk_indices,
    scale,
    T,
    M,
    L,
    H: tl.constexpr,
    HKV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One query block of one head: ``dq``, and the self term's ``dk``, ``dv`` per query head."""
    i_h, i_hk, bos, cbos, o_t, m_t, n_hi = _query_block(
        tl.program_id(0), tl.program_id(1), T, M, L, cu_seqlens, ckpt_offsets, chunk_indices, H, HKV, BM, IS_VARLEN
    )
    o_k, o_v = tl.arange(0, BK), tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    b_q = load_rows(q, bos, o_t, m_t, o_k, m_k, H, K, i_h, ACC)
    b_k = load_rows(k, bos, o_t, m_t, o_k, m_k, HKV, K, i_hk, ACC)
    b_v = load_rows(v, bos, o_t, m_t, o_v, m_v, HKV, V, i_hk, ACC)
    b_do = load_rows(do, bos, o_t, m_t, o_v, m_v, H, V, i_h, ACC)
    b_lse = load_token(lse, bos, o_t, m_t, H, i_h, ACC)
    b_delta = load_token(delta, bos, o_t, m_t, H, i_h, ACC)
    p_self = tl.exp(tl.sum(b_q * b_k, axis=1) * scale - b_lse)
    ds_self = p_self * (tl.sum(b_do * b_v, axis=1) - b_delta)
    store_rows(dv, p_self[:, None] * b_do, bos, o_t, m_t, o_v, m_v, H, V, i_h)
    store_rows(dk, (ds_self * scale)[:, None] * b_q, bos, o_t, m_t, o_k, m_k, H, K, i_h)
    b_dq = ds_self[:, None] * b_k
    seen = o_t // L
    for n0 in range(0, n_hi, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < n_hi
        b_kct = load_cols(kc, cbos, o_n, m_n, o_k, m_k, HKV, K, i_hk, ACC)  # [BK, BN]
        b_kc = load_rows(kc, cbos, o_n, m_n, o_k, m_k, HKV, K, i_hk, ACC)  # [BN, BK]
        b_vct = load_cols(vc, cbos, o_n, m_n, o_v, m_v, HKV, V, i_hk, ACC)  # [BV, BN]
        visible = (o_n[None, :] < seen[:, None]) & m_n[None, :]
        b_s = tl.dot(b_q, b_kct, input_precision=PRECISION) * scale
        # Mask the exponent, not the result: a masked score may be large, and exp() of it would overflow.
        b_p = tl.exp(tl.where(visible, b_s - b_lse[:, None], float("-inf")))
        b_dp = tl.dot(b_do, b_vct, input_precision=PRECISION)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds, b_kc, input_precision=PRECISION)
    store_rows(dq, b_dq * scale, bos, o_t, m_t, o_k, m_k, H, K, i_h)


@triton.jit(do_not_specialize=["T", "M", "L"])
def _ckpt_bwd_dkv_kernel(
    q,
    kc,
    vc,
    do,
    lse,
    delta,
    dkc,
    dvc,
    cu_seqlens,
    ckpt_offsets,
    ckpt_indices,
    scale,
    T,
    M,
    L,
    H: tl.constexpr,
    HKV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One checkpoint block of one query head: ``dk_ckpt, dv_ckpt`` from every query that sees it."""
    i_nb, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // (H // HKV)
    if IS_VARLEN:
        i_n = tl.load(ckpt_indices + i_nb * 2).to(tl.int64)
        i_cb = tl.load(ckpt_indices + i_nb * 2 + 1).to(tl.int64)
    else:
        i_n = i_b
        i_cb = i_nb.to(tl.int64)
    bos, seq_len = seq_span(i_n, T, cu_seqlens, IS_VARLEN)
    cbos, count = seq_span(i_n, M, ckpt_offsets, IS_VARLEN)
    o_n = i_cb * BN + tl.arange(0, BN)
    m_n = o_n < count
    o_k, o_v = tl.arange(0, BK), tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    b_kc = load_rows(kc, cbos, o_n, m_n, o_k, m_k, HKV, K, i_hk, ACC)  # [BN, BK]
    b_vc = load_rows(vc, cbos, o_n, m_n, o_v, m_v, HKV, V, i_hk, ACC)  # [BN, BV]
    b_dkc = tl.zeros([BN, BK], dtype=ACC)
    b_dvc = tl.zeros([BN, BV], dtype=ACC)
    first = (i_cb * BN + 1) * L  # the first query that sees the block's first checkpoint
    for t0 in range(first // BM * BM, seq_len, BM):
        o_t = t0 + tl.arange(0, BM)
        m_t = o_t < seq_len
        b_qt = load_cols(q, bos, o_t, m_t, o_k, m_k, H, K, i_h, ACC)  # [BK, BM]
        b_q = load_rows(q, bos, o_t, m_t, o_k, m_k, H, K, i_h, ACC)  # [BM, BK]
        b_do = load_rows(do, bos, o_t, m_t, o_v, m_v, H, V, i_h, ACC)  # [BM, BV]
        b_dot = load_cols(do, bos, o_t, m_t, o_v, m_v, H, V, i_h, ACC)  # [BV, BM]
        b_lse = load_token(lse, bos, o_t, m_t, H, i_h, ACC)
        b_delta = load_token(delta, bos, o_t, m_t, H, i_h, ACC)
        visible = (o_n[:, None] < (o_t // L)[None, :]) & m_n[:, None] & m_t[None, :]
        b_st = tl.dot(b_kc, b_qt, input_precision=PRECISION) * scale  # [BN, BM]
        b_pt = tl.exp(tl.where(visible, b_st - b_lse[None, :], float("-inf")))
        b_dvc += tl.dot(b_pt, b_do, input_precision=PRECISION)
        b_dpt = tl.dot(b_vc, b_dot, input_precision=PRECISION)
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dkc += tl.dot(b_dst, b_q, input_precision=PRECISION)
    store_rows(dkc, b_dkc * scale, cbos, o_n, m_n, o_k, m_k, H, K, i_h)
    store_rows(dvc, b_dvc, cbos, o_n, m_n, o_v, m_v, H, V, i_h)


# ---------------------------------------------------------------------------------------------- ops


def _sizes(q: Tensor, k: Tensor, v: Tensor, kc: Tensor):
    B, T, H, K = q.shape
    return B, T, H, k.shape[2], K, v.shape[-1], kc.shape[1]


@triton_op("seqzoo::checkpoint_attention_fwd", mutates_args=())
def _ckpt_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kc: Tensor,
    vc: Tensor,
    cu_seqlens: Tensor | None,
    ckpt_offsets: Tensor | None,
    chunk_indices: Tensor | None,
    ckpt_indices: Tensor | None,
    segment_len: int,
    scale: float,
    precision: str,
) -> tuple[Tensor, Tensor]:
    """``(o [B, T, H, V] in v's dtype, lse [B, T, H] in the accumulator dtype)``. ``ckpt_indices`` is the
    backward's (passed here so the autograd formula receives it)."""
    B, T, H, HKV, K, V, M = _sizes(q, k, v, kc)
    BM, BN = _blocks(K, V)
    o = q.new_empty(B, T, H, V, dtype=v.dtype)
    lse = q.new_empty(B, T, H, dtype=acc_dtype(q.dtype))
    varlen = cu_seqlens is not None
    NT = chunk_indices.shape[0] if varlen else triton.cdiv(T, BM)
    wrap_triton(_ckpt_fwd_kernel)[(NT, B * H)](
        q, k, v, kc, vc, o, lse, cu_seqlens, ckpt_offsets, chunk_indices, scale, T, M, segment_len,
        H=H, HKV=HKV, K=K, V=V, BM=BM, BN=BN, BK=_width(K), BV=_width(V), IS_VARLEN=varlen, ACC=tl_dtype(q.dtype), PRECISION=precision,
    )  # fmt: skip
    return o, lse


@_ckpt_fwd.register_fake
def _(q, k, v, kc, vc, cu_seqlens, ckpt_offsets, chunk_indices, ckpt_indices, segment_len, scale, precision):
    B, T, H, _ = q.shape
    o = q.new_empty(B, T, H, v.shape[-1], dtype=v.dtype)
    return o, q.new_empty(B, T, H, dtype=acc_dtype(q.dtype))


@triton_op("seqzoo::checkpoint_attention_bwd", mutates_args=())
def _ckpt_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kc: Tensor,
    vc: Tensor,
    o: Tensor,
    lse: Tensor,
    do: Tensor,
    cu_seqlens: Tensor | None,
    ckpt_offsets: Tensor | None,
    chunk_indices: Tensor | None,
    ckpt_indices: Tensor | None,
    segment_len: int,
    scale: float,
    precision: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dk_ckpt, dv_ckpt)`` in the accumulator dtype, shaped like their inputs."""
    B, T, H, HKV, K, V, M = _sizes(q, k, v, kc)
    BM, BN = _blocks(K, V)
    acc = acc_dtype(q.dtype)
    group = H // HKV
    delta = (do.to(acc) * o.to(acc)).sum(-1).contiguous()  # [B, T, H]
    dq = q.new_empty(B, T, H, K, dtype=acc)
    dk_part = q.new_empty(B, T, H, K, dtype=acc)
    dv_part = q.new_empty(B, T, H, V, dtype=acc)
    dkc_part = q.new_zeros(B, M, H, K, dtype=acc)
    dvc_part = q.new_zeros(B, M, H, V, dtype=acc)
    varlen = cu_seqlens is not None
    NT = chunk_indices.shape[0] if varlen else triton.cdiv(T, BM)
    meta = dict(
        H=H, HKV=HKV, K=K, V=V, BM=BM, BN=BN, BK=_width(K), BV=_width(V), IS_VARLEN=varlen, ACC=tl_dtype(q.dtype), PRECISION=precision
    )
    wrap_triton(_ckpt_bwd_dq_kernel)[(NT, B * H)](
        q, k, v, kc, vc, do, lse, delta, dq, dk_part, dv_part, cu_seqlens, ckpt_offsets, chunk_indices, scale, T, M, segment_len, **meta
    )  # fmt: skip
    NC = ckpt_indices.shape[0] if varlen else triton.cdiv(M, BN)
    if NC:
        wrap_triton(_ckpt_bwd_dkv_kernel)[(NC, B * H)](
            q, kc, vc, do, lse, delta, dkc_part, dvc_part, cu_seqlens, ckpt_offsets, ckpt_indices, scale, T, M, segment_len, **meta
        )  # fmt: skip
    # Query head h belongs to KV head h // group: sum each group's partial gradients.
    dk = dk_part.unflatten(2, (HKV, group)).sum(3)
    dv = dv_part.unflatten(2, (HKV, group)).sum(3)
    dkc = dkc_part.unflatten(2, (HKV, group)).sum(3)
    dvc = dvc_part.unflatten(2, (HKV, group)).sum(3)
    return dq, dk, dv, dkc, dvc


@_ckpt_bwd.register_fake
def _(q, k, v, kc, vc, o, lse, do, cu_seqlens, ckpt_offsets, chunk_indices, ckpt_indices, segment_len, scale, precision):
    acc = acc_dtype(q.dtype)
    return tuple(torch.empty_like(t, dtype=acc, memory_format=torch.contiguous_format) for t in (q, k, v, kc, vc))


def _setup_context(ctx, inputs, output):
    q, k, v, kc, vc, cu_seqlens, ckpt_offsets, chunk_indices, ckpt_indices, segment_len, scale, precision = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, kc, vc, o, lse)
    ctx.packing = (cu_seqlens, ckpt_offsets, chunk_indices, ckpt_indices)
    ctx.config = (segment_len, scale, precision)
    ctx.dtypes = [t.dtype for t in (q, k, v, kc, vc)]


def _backward(ctx, do, _dlse):
    q, k, v, kc, vc, o, lse = ctx.saved_tensors
    do = torch.zeros_like(o) if do is None else do.contiguous()
    grads = _ckpt_bwd(q, k, v, kc, vc, o, lse, do, *ctx.packing, *ctx.config)
    return (*(g.to(dt) for g, dt in zip(grads, ctx.dtypes)), None, None, None, None, None, None, None)


_ckpt_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------- entry point


def _packing(
    cu_seqlens: Tensor, seq: int, segment_len: int, device: torch.device, blocks: tuple[int, int]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Host-built index tensors of a packed call: ``cu_seqlens`` (int64), checkpoint offsets ``[N + 1]`` (int64),
    query blocks ``[NT, 2]`` and checkpoint blocks ``[NC, 2]`` (int32: sequence, block within it) for the call's
    ``(BM, BN)`` (:func:`_blocks`)."""
    BM, BN = blocks
    layout = ChunkLayout.build(1, seq, BM, cu_seqlens, device, op="checkpoint_attention")
    ckpt = checkpoint_offsets(layout.offsets, segment_len)
    blocks = [(i, b) for i in range(len(ckpt) - 1) for b in range(-(-(ckpt[i + 1] - ckpt[i]) // BN))]
    return (
        layout.cu_seqlens_tensor().to(torch.int64),
        torch.tensor(ckpt, dtype=torch.int64, device=device),
        layout.chunk_indices(),
        torch.tensor(blocks, dtype=torch.int32, device=device).reshape(-1, 2),
    )


def checkpoint_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_ckpt: Tensor,
    v_ckpt: Tensor,
    *,
    segment_len: int,
    scale: float | None = None,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, None]:
    """The Triton backend (differentiable); contract as :func:`seqzoo.ops.checkpoint_attention.checkpoint_attention`."""
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        fail("checkpoint_attention", f"backend='triton' supports head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]} and {v.shape[-1]}")
    in_dtype = q.dtype
    precision = dot_precision(in_dtype)
    scale = default_scale(scale, q.shape[-1])
    q, k, v, k_ckpt, v_ckpt = (kernel_input(t) for t in (q, k, v, k_ckpt, v_ckpt))
    blocks = _blocks(q.shape[-1], v.shape[-1])
    packing = (None,) * 4 if cu_seqlens is None else _packing(cu_seqlens, q.shape[1], segment_len, q.device, blocks)
    o, _ = _ckpt_fwd(q, k, v, k_ckpt, v_ckpt, *packing, segment_len, scale, precision)
    return o.to(in_dtype), None
