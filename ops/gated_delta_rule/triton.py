"""Triton kernels for the (gated) delta rule: a chunked WY/UT pipeline with a recomputing backward,
and a fused recurrent kernel for short inference calls.

Layout, packing and flags follow :mod:`seqzoo.ops.core.triton_host`: ``[B, T, H, D]`` tensors, per-chunk
grids ``(…, NT, B·H)`` and per-sequence grids ``(…, N·H)``, ``IS_VARLEN`` for packed sequences, ``G_MODE``
0 (the delta rule) or 1 (a scalar log gate per head). Per chunk of ``BT = 64`` tokens, with ``b`` the
chunk-local cumulative log gate and ``Γ_ij = e^{b_i − b_j}`` on ``j <= i``:

forward
  1. ``chunk_local_cumsum`` (shared)   b                                                   grid (1, NT, B·H)
  2. ``_kkt_inverse_kernel``           M = (I + strict_lower(β K Kᵀ ⊙ Γ))⁻¹, blocked              grid (NT, B·H)
  3. ``_wy_fwd_kernel``                w = M (β K ⊙ e^b), u = M (β V)                             grid (NT, B·H)
  4. ``_state_fwd_kernel``             h per chunk start, v' = u − w h, final state               grid (V/BV, N·H)
  5. ``chunk_fwd_o`` (shared)          o = scale·[(q ⊙ e^b) h + (q Kᵀ ⊙ Γ) v']                    grid (V/BV, NT, B·H)
backward (saves q, k, v, β, b, M; recomputes w, u, h, v')
  6. ``chunk_bwd_dv`` (shared)         Pᵀ dO, the intra-chunk part of dv' (no state term)         grid (V/BV, NT, B·H)
  7. ``_state_bwd_kernel``             dh per chunk end, dv' (full), d initial_state              grid (V/BV, N·H)
  8. ``_dqk_dw_kernel``                dq, state/intra parts of dk, dw, gate partials             grid (K/BK, NT, B·H)
  9. ``_wy_bwd_kernel``                through the inverse: dk, dv, dβ, gate term                 grid (NT, B·H)
 10. ``chunk_local_cumsum``, reversed  the raw-gate gradient from that of b

The stages marked shared are those of :mod:`seqzoo.ops.core.triton_stages` (the delta rule is simple GLA
with ``v`` replaced by ``v'``); the state kernels step their ``[BK, BV]`` tiles with its ``state_update``.
The rest is the delta rule's own maths: the WY/UT representation, its blocked unit-lower-triangular
inverse, and a state sweep that must hold the whole key dimension at once (``v' = u − w h``).

Cross-program sums (the gate gradient over K blocks) go to partial buffers summed in PyTorch, never
atomics. All offsets are int64; accumulation is fp32 (fp64 for fp64 inputs, for gradcheck); every
``tl.dot`` runs at :func:`~seqzoo.ops.core.precision.dot_precision` of the caller's dtype (IEEE for fp32:
tf32's ~1e-3 relative error would be carried by the state over many chunks). The kernels run as the
``torch.library`` ops ``seqzoo::gated_delta_rule_triton_fwd`` / ``_bwd`` (autograd) and
``seqzoo::gated_delta_rule_fused`` (no autograd), with fake implementations for ``torch.compile``.
The interpreter cannot do bf16 math, so the chunked path runs in fp32 (fp64) after one upcast.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from seqzoo.ops.core import TRITON_INTERPRET, compute_dtype, dot_precision
from seqzoo.ops.core.triton_host import (
    BT,
    ChunkMeta,
    acc_dtype,
    chunk_coords,
    global_chunk,
    load_cols,
    load_rows,
    load_state,
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
from seqzoo.ops.utils import autotune_configs, l2norm

BC = 16  # sub-block of the inverse (every dot keeps K >= 16, as the NVIDIA backend requires)
BK = 64  # key tile; the state kernels hold up to four of them (key_dim <= 256)
MAX_KEY_DIM = 256
assert BT == 4 * BC, "the blocked inverse works on exactly four sub-blocks per chunk"

# ----------------------------------------------------------------------------------------------
# forward kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _invert_unit_lower4(a0, a1, a2, a3, BC: tl.constexpr, ACC: tl.constexpr):
    """(I + A)⁻¹ of four strictly lower ``BC×BC`` blocks by forward substitution, all four at once.

    The blocks are joined into one ``[BC, BC, 2, 2]`` tile so each of the ``BC − 1`` row steps is a handful
    of tile operations for all blocks together (rather than four serial substitutions).
    """
    o_r = tl.arange(0, BC)
    is_row = o_r[:, None, None, None]
    # Rows of (I + A)⁻¹ − I satisfy n_r = −a_r − Σ_{c<r} a_rc n_c: start from −A and finish row by row.
    b_x = -tl.join(tl.join(a0, a1), tl.join(a2, a3))
    for r in range(1, BC):
        row = tl.sum(tl.where(is_row == r, b_x, 0.0), 0)
        row = row + tl.sum(row[:, None, :, :] * b_x, 0)
        b_x = tl.where(is_row == r, row[None, :, :, :], b_x)
    x01, x23 = tl.split(b_x)
    x0, x1 = tl.split(x01)
    x2, x3 = tl.split(x23)
    eye = (o_r[:, None] == o_r[None, :]).to(ACC)
    return x0 + eye, x1 + eye, x2 + eye, x3 + eye


@triton.jit
def _gate_block(g_i, g_j, m_i, m_j, STRICT: tl.constexpr, BC: tl.constexpr):
    """exp(g_i − g_j) on a block, 0 outside (masked in the exponent so nothing overflows)."""
    keep = m_i[:, None] & m_j[None, :]
    if STRICT:
        keep = keep & (tl.arange(0, BC)[:, None] > tl.arange(0, BC)[None, :])
    return tl.exp(tl.where(keep, g_i[:, None] - g_j[None, :], float("-inf")))


@triton.jit
def _store_block(Ai, blk, bos, o_r, m_r, col: tl.constexpr, H: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, i_h):
    ptr = Ai + ((bos + o_r) * H + i_h)[:, None] * BT + col * BC + tl.arange(0, BC)[None, :]
    tl.store(ptr, blk.to(Ai.dtype.element_ty), mask=m_r[:, None])


@triton.jit(do_not_specialize=["T"])
def _kkt_inverse_kernel(
    k,
    beta,
    gc,
    Ai,
    cu_seqlens,
    chunk_indices,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    G_MODE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    bos, seq_len, i_c = chunk_coords(i_t, i_b, T, cu_seqlens, chunk_indices, IS_VARLEN)
    o_0 = i_c * BT + tl.arange(0, BC)
    o_1, o_2, o_3 = o_0 + BC, o_0 + 2 * BC, o_0 + 3 * BC
    m_0, m_1, m_2, m_3 = o_0 < seq_len, o_1 < seq_len, o_2 < seq_len, o_3 < seq_len
    a00 = tl.zeros([BC, BC], dtype=ACC)
    a10, a11 = tl.zeros([BC, BC], dtype=ACC), tl.zeros([BC, BC], dtype=ACC)
    a20, a21, a22 = tl.zeros([BC, BC], dtype=ACC), tl.zeros([BC, BC], dtype=ACC), tl.zeros([BC, BC], dtype=ACC)
    a30, a31 = tl.zeros([BC, BC], dtype=ACC), tl.zeros([BC, BC], dtype=ACC)
    a32, a33 = tl.zeros([BC, BC], dtype=ACC), tl.zeros([BC, BC], dtype=ACC)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        k0 = load_rows(k, bos, o_0, m_0, o_k, m_k, H, K, i_h, ACC)
        k1 = load_rows(k, bos, o_1, m_1, o_k, m_k, H, K, i_h, ACC)
        k2 = load_rows(k, bos, o_2, m_2, o_k, m_k, H, K, i_h, ACC)
        k3 = load_rows(k, bos, o_3, m_3, o_k, m_k, H, K, i_h, ACC)
        a00 += tl.dot(k0, tl.trans(k0), input_precision=PRECISION)
        a10 += tl.dot(k1, tl.trans(k0), input_precision=PRECISION)
        a11 += tl.dot(k1, tl.trans(k1), input_precision=PRECISION)
        a20 += tl.dot(k2, tl.trans(k0), input_precision=PRECISION)
        a21 += tl.dot(k2, tl.trans(k1), input_precision=PRECISION)
        a22 += tl.dot(k2, tl.trans(k2), input_precision=PRECISION)
        a30 += tl.dot(k3, tl.trans(k0), input_precision=PRECISION)
        a31 += tl.dot(k3, tl.trans(k1), input_precision=PRECISION)
        a32 += tl.dot(k3, tl.trans(k2), input_precision=PRECISION)
        a33 += tl.dot(k3, tl.trans(k3), input_precision=PRECISION)
    b0 = load_token(beta, bos, o_0, m_0, H, i_h, ACC)
    b1 = load_token(beta, bos, o_1, m_1, H, i_h, ACC)
    b2 = load_token(beta, bos, o_2, m_2, H, i_h, ACC)
    b3 = load_token(beta, bos, o_3, m_3, H, i_h, ACC)
    if G_MODE == 1:
        g0 = load_token(gc, bos, o_0, m_0, H, i_h, ACC)
        g1 = load_token(gc, bos, o_1, m_1, H, i_h, ACC)
        g2 = load_token(gc, bos, o_2, m_2, H, i_h, ACC)
        g3 = load_token(gc, bos, o_3, m_3, H, i_h, ACC)
        a00 *= _gate_block(g0, g0, m_0, m_0, True, BC)
        a11 *= _gate_block(g1, g1, m_1, m_1, True, BC)
        a22 *= _gate_block(g2, g2, m_2, m_2, True, BC)
        a33 *= _gate_block(g3, g3, m_3, m_3, True, BC)
        a10 *= _gate_block(g1, g0, m_1, m_0, False, BC)
        a20 *= _gate_block(g2, g0, m_2, m_0, False, BC)
        a21 *= _gate_block(g2, g1, m_2, m_1, False, BC)
        a30 *= _gate_block(g3, g0, m_3, m_0, False, BC)
        a31 *= _gate_block(g3, g1, m_3, m_1, False, BC)
        a32 *= _gate_block(g3, g2, m_3, m_2, False, BC)
    else:
        strict = tl.arange(0, BC)[:, None] > tl.arange(0, BC)[None, :]
        a00 = tl.where(strict, a00, 0.0)
        a11 = tl.where(strict, a11, 0.0)
        a22 = tl.where(strict, a22, 0.0)
        a33 = tl.where(strict, a33, 0.0)
    a00, a10, a20, a30 = a00 * b0[:, None], a10 * b1[:, None], a20 * b2[:, None], a30 * b3[:, None]
    a11, a21, a31 = a11 * b1[:, None], a21 * b2[:, None], a31 * b3[:, None]
    a22, a32, a33 = a22 * b2[:, None], a32 * b3[:, None], a33 * b3[:, None]
    # Diagonal blocks by substitution, then X_ij = −X_ii Σ_{j<=m<i} A_im X_mj, nearest diagonal first.
    x00, x11, x22, x33 = _invert_unit_lower4(a00, a11, a22, a33, BC, ACC)
    x10 = -tl.dot(x11, tl.dot(a10, x00, input_precision=PRECISION), input_precision=PRECISION)
    x21 = -tl.dot(x22, tl.dot(a21, x11, input_precision=PRECISION), input_precision=PRECISION)
    x32 = -tl.dot(x33, tl.dot(a32, x22, input_precision=PRECISION), input_precision=PRECISION)
    x20 = -tl.dot(x22, tl.dot(a20, x00, input_precision=PRECISION) + tl.dot(a21, x10, input_precision=PRECISION), input_precision=PRECISION)
    x31 = -tl.dot(x33, tl.dot(a31, x11, input_precision=PRECISION) + tl.dot(a32, x21, input_precision=PRECISION), input_precision=PRECISION)
    x30 = -tl.dot(
        x33,
        tl.dot(a30, x00, input_precision=PRECISION)
        + tl.dot(a31, x10, input_precision=PRECISION)
        + tl.dot(a32, x20, input_precision=PRECISION),
        input_precision=PRECISION,
    )
    zero = tl.zeros([BC, BC], dtype=ACC)
    _store_block(Ai, x00, bos, o_0, m_0, 0, H, BT, BC, i_h)
    _store_block(Ai, zero, bos, o_0, m_0, 1, H, BT, BC, i_h)
    _store_block(Ai, zero, bos, o_0, m_0, 2, H, BT, BC, i_h)
    _store_block(Ai, zero, bos, o_0, m_0, 3, H, BT, BC, i_h)
    _store_block(Ai, x10, bos, o_1, m_1, 0, H, BT, BC, i_h)
    _store_block(Ai, x11, bos, o_1, m_1, 1, H, BT, BC, i_h)
    _store_block(Ai, zero, bos, o_1, m_1, 2, H, BT, BC, i_h)
    _store_block(Ai, zero, bos, o_1, m_1, 3, H, BT, BC, i_h)
    _store_block(Ai, x20, bos, o_2, m_2, 0, H, BT, BC, i_h)
    _store_block(Ai, x21, bos, o_2, m_2, 1, H, BT, BC, i_h)
    _store_block(Ai, x22, bos, o_2, m_2, 2, H, BT, BC, i_h)
    _store_block(Ai, zero, bos, o_2, m_2, 3, H, BT, BC, i_h)
    _store_block(Ai, x30, bos, o_3, m_3, 0, H, BT, BC, i_h)
    _store_block(Ai, x31, bos, o_3, m_3, 1, H, BT, BC, i_h)
    _store_block(Ai, x32, bos, o_3, m_3, 2, H, BT, BC, i_h)
    _store_block(Ai, x33, bos, o_3, m_3, 3, H, BT, BC, i_h)


@triton.jit(do_not_specialize=["T"])
def _wy_fwd_kernel(
    k,
    v,
    beta,
    gc,
    Ai,
    w,
    u,
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
    PRECISION: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    bos, seq_len, i_c = chunk_coords(i_t, i_b, T, cu_seqlens, chunk_indices, IS_VARLEN)
    o_t = i_c * BT + tl.arange(0, BT)
    m_t = o_t < seq_len
    o_r = tl.arange(0, BT)
    b_m = load_rows(Ai, bos, o_t, m_t, o_r, o_r < BT, H, BT, i_h, ACC)
    b_beta = load_token(beta, bos, o_t, m_t, H, i_h, ACC)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_v = load_rows(v, bos, o_t, m_t, o_v, m_v, H, V, i_h, ACC) * b_beta[:, None]
        store_rows(u, tl.dot(b_m, b_v, input_precision=PRECISION), bos, o_t, m_t, o_v, m_v, H, V, i_h)
    b_kscale = b_beta
    if G_MODE == 1:
        b_kscale = b_beta * tl.exp(load_token(gc, bos, o_t, m_t, H, i_h, ACC))
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_k = load_rows(k, bos, o_t, m_t, o_k, m_k, H, K, i_h, ACC) * b_kscale[:, None]
        store_rows(w, tl.dot(b_m, b_k, input_precision=PRECISION), bos, o_t, m_t, o_k, m_k, H, K, i_h)


def _state_configs(num_stages: int | None = None) -> list:
    extra = {} if num_stages is None else {"num_stages": num_stages}
    return autotune_configs([triton.Config({"BV": bv}, num_warps=nw, **extra) for bv in (32, 64) for nw in (2, 4)])


# Widest key dim whose state kernels run software-pipelined (two key tiles); wider keys run unpipelined.
PIPELINED_MAX_KEY_DIM = 2 * BK


def _tuned_by_key_dim(kernel) -> tuple:
    """``(for key_dim <= PIPELINED_MAX_KEY_DIM, for wider keys)``: the same state kernel, autotuned,
    pipelined or not.

    Software pipelining keeps ``num_stages`` copies of the chunk loop's tiles in shared memory. With up to
    two key tiles the default (3 stages) fits; with four (key_dim 256) it needs 287 KB (forward) and
    443 KB (backward) against a Hopper SM's 227 KB, so no config could launch. One stage needs 25-50 KB.
    (Figures from compiling for sm_90 with triton 3.9, see ``benchmarks/triton_resources.py``.)
    """
    key = ["H", "K", "V", "G_MODE", "ACC", "PRECISION"]
    return triton.autotune(configs=_state_configs(), key=key)(kernel), triton.autotune(configs=_state_configs(num_stages=1), key=key)(
        kernel
    )


# The state kernels hold the whole key dimension (v' = u − w h needs all of it at once) as up to four BK-row
# tiles b_1 … b_4; tiles past K stay zero and are never loaded, stored or multiplied.


@triton.jit
def _load_tiles(p, o_v, m_v, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr):
    """The ``[K, BV]`` slice of the ``[K, V]`` matrix at ``p`` as four ``[BK, BV]`` key tiles."""
    o_k = tl.arange(0, BK)
    b_1 = load_state(p, o_k, o_k < K, o_v, m_v, V, ACC)
    b_2 = tl.zeros([BK, BV], dtype=ACC)
    b_3 = tl.zeros([BK, BV], dtype=ACC)
    b_4 = tl.zeros([BK, BV], dtype=ACC)
    if K > BK:
        b_2 = load_state(p, o_k + BK, o_k + BK < K, o_v, m_v, V, ACC)
    if K > 2 * BK:
        b_3 = load_state(p, o_k + 2 * BK, o_k + 2 * BK < K, o_v, m_v, V, ACC)
    if K > 3 * BK:
        b_4 = load_state(p, o_k + 3 * BK, o_k + 3 * BK < K, o_v, m_v, V, ACC)
    return b_1, b_2, b_3, b_4


@triton.jit
def _store_tiles(p, b_1, b_2, b_3, b_4, o_v, m_v, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr):
    """Store four key tiles as the ``[K, BV]`` slice of the ``[K, V]`` matrix at ``p``."""
    o_k = tl.arange(0, BK)
    store_state(p, b_1, o_k, o_k < K, o_v, m_v, V)
    if K > BK:
        store_state(p, b_2, o_k + BK, o_k + BK < K, o_v, m_v, V)
    if K > 2 * BK:
        store_state(p, b_3, o_k + 2 * BK, o_k + 2 * BK < K, o_v, m_v, V)
    if K > 3 * BK:
        store_state(p, b_4, o_k + 3 * BK, o_k + 3 * BK < K, o_v, m_v, V)


@triton.jit
def _rows_times_tiles(
    b_acc,
    x,
    row_scale,
    b_1,
    b_2,
    b_3,
    b_4,
    bos,
    o_t,
    m_t,
    H: tl.constexpr,
    K: tl.constexpr,
    i_h,
    BK: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``b_acc + Σ_j (x_j ⊙ row_scale) b_j``: rows ``o_t`` of a ``[tokens, H, K]`` tensor times a state held in key tiles."""
    o_k = tl.arange(0, BK)
    b_acc += tl.dot(load_rows(x, bos, o_t, m_t, o_k, o_k < K, H, K, i_h, ACC) * row_scale[:, None], b_1, input_precision=PRECISION)
    if K > BK:
        b_x = load_rows(x, bos, o_t, m_t, o_k + BK, o_k + BK < K, H, K, i_h, ACC)
        b_acc += tl.dot(b_x * row_scale[:, None], b_2, input_precision=PRECISION)
    if K > 2 * BK:
        b_x = load_rows(x, bos, o_t, m_t, o_k + 2 * BK, o_k + 2 * BK < K, H, K, i_h, ACC)
        b_acc += tl.dot(b_x * row_scale[:, None], b_3, input_precision=PRECISION)
    if K > 3 * BK:
        b_x = load_rows(x, bos, o_t, m_t, o_k + 3 * BK, o_k + 3 * BK < K, H, K, i_h, ACC)
        b_acc += tl.dot(b_x * row_scale[:, None], b_4, input_precision=PRECISION)
    return b_acc


@triton.jit
def _step_tile(
    b_h, J: tl.constexpr, decay, x, x_scale, b_y, z, b_z, bos, o_t, m_t, H: tl.constexpr, K: tl.constexpr, i_h, BK: tl.constexpr,
    SUB_Z: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Key tile ``J`` of one recurrence step: ``decay·h + (x ⊙ x_scale)ᵀ y``, minus ``zᵀ b_z`` with ``SUB_Z``."""
    o_k = J * BK + tl.arange(0, BK)
    m_k = o_k < K
    b_xt = load_cols(x, bos, o_t, m_t, o_k, m_k, H, K, i_h, ACC) * x_scale[None, :]
    b_h = state_update(b_h, decay, b_xt, b_y, PRECISION)
    if SUB_Z:
        b_h -= tl.dot(load_cols(z, bos, o_t, m_t, o_k, m_k, H, K, i_h, ACC), b_z, input_precision=PRECISION)
    return b_h


@triton.jit
def _step_tiles(
    b_1, b_2, b_3, b_4, decay, x, x_scale, b_y, z, b_z, bos, o_t, m_t, H: tl.constexpr, K: tl.constexpr, i_h, BK: tl.constexpr,
    SUB_Z: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """:func:`_step_tile` on every key tile: the shared ``state_update`` step, plus the delta rule's ``− zᵀ b_z``."""
    b_1 = _step_tile(b_1, 0, decay, x, x_scale, b_y, z, b_z, bos, o_t, m_t, H, K, i_h, BK, SUB_Z, ACC, PRECISION)
    if K > BK:
        b_2 = _step_tile(b_2, 1, decay, x, x_scale, b_y, z, b_z, bos, o_t, m_t, H, K, i_h, BK, SUB_Z, ACC, PRECISION)
    if K > 2 * BK:
        b_3 = _step_tile(b_3, 2, decay, x, x_scale, b_y, z, b_z, bos, o_t, m_t, H, K, i_h, BK, SUB_Z, ACC, PRECISION)
    if K > 3 * BK:
        b_4 = _step_tile(b_4, 3, decay, x, x_scale, b_y, z, b_z, bos, o_t, m_t, H, K, i_h, BK, SUB_Z, ACC, PRECISION)
    return b_1, b_2, b_3, b_4


@triton.jit(do_not_specialize=["T"])
def _state_fwd_kernel(
    k,
    w,
    u,
    gc,
    h0,
    h,
    v_new,
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
    """Walk a sequence's chunks in order: store ``h`` entering each chunk, then ``v' = u − w h``, then the step."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, seq_len, boh = seq_coords(i_n, T, cu_seqlens, chunk_offsets, BT, IS_VARLEN)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_h1 = tl.zeros([BK, BV], dtype=ACC)
    b_h2 = tl.zeros([BK, BV], dtype=ACC)
    b_h3 = tl.zeros([BK, BV], dtype=ACC)
    b_h4 = tl.zeros([BK, BV], dtype=ACC)
    if USE_H0:
        b_h1, b_h2, b_h3, b_h4 = _load_tiles(h0 + i_nh.to(tl.int64) * K * V, o_v, m_v, K, V, BK, BV, ACC)
    ones = tl.full([BT], 1.0, dtype=ACC)
    for i_t in range(tl.cdiv(seq_len, BT)):
        _store_tiles(h + ((boh + i_t) * H + i_h) * K * V, b_h1, b_h2, b_h3, b_h4, o_v, m_v, K, V, BK)
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < seq_len
        # u − w h as u + (−w) h: the same numbers, one helper for every "rows times key tiles" product.
        b_v = load_rows(u, bos, o_t, m_t, o_v, m_v, H, V, i_h, ACC)
        b_v = _rows_times_tiles(b_v, w, -ones, b_h1, b_h2, b_h3, b_h4, bos, o_t, m_t, H, K, i_h, BK, ACC, PRECISION)
        store_rows(v_new, b_v, bos, o_t, m_t, o_v, m_v, H, V, i_h)
        decay = 1.0
        if G_MODE == 1:
            last = chunk_last(i_t, seq_len, BT)
            g_last = tl.load(gc + (bos + last) * H + i_h).to(ACC)
            b_g = load_token(gc, bos, o_t, m_t, H, i_h, ACC)
            # Scaling the rows of v' by e^{b_C − b} is the same as scaling K, and cheaper.
            b_v = b_v * tl.exp(tl.where(m_t, g_last - b_g, float("-inf")))[:, None]
            decay = tl.exp(g_last)
        b_h1, b_h2, b_h3, b_h4 = _step_tiles(
            b_h1, b_h2, b_h3, b_h4, decay, k, ones, b_v, None, None, bos, o_t, m_t, H, K, i_h, BK, False, ACC, PRECISION
        )
    if STORE_HT:
        _store_tiles(ht + i_nh.to(tl.int64) * K * V, b_h1, b_h2, b_h3, b_h4, o_v, m_v, K, V, BK)


# ----------------------------------------------------------------------------------------------
# backward kernels
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["T"])
def _state_bwd_kernel(
    q,
    k,
    w,
    gc,
    do,
    dv_local,
    dv,
    dht,
    dh,
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
    """Reverse sweep: stores dS after each chunk in ``dh`` and the full dv' = Pᵀ dO + (K ⊙ e^{b_C − b}) dS in ``dv``;
    the step is ``dS ← e^{b_C} dS + (q ⊙ scale e^b)ᵀ dO − wᵀ dv'``.

    ``dv`` is a separate buffer from ``dv_local``: the autotuner replays the kernel, so it must not update in place.
    """
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, seq_len, boh = seq_coords(i_n, T, cu_seqlens, chunk_offsets, BT, IS_VARLEN)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_dh1 = tl.zeros([BK, BV], dtype=ACC)
    b_dh2 = tl.zeros([BK, BV], dtype=ACC)
    b_dh3 = tl.zeros([BK, BV], dtype=ACC)
    b_dh4 = tl.zeros([BK, BV], dtype=ACC)
    if USE_DHT:
        b_dh1, b_dh2, b_dh3, b_dh4 = _load_tiles(dht + i_nh.to(tl.int64) * K * V, o_v, m_v, K, V, BK, BV, ACC)
    for i_t in range(tl.cdiv(seq_len, BT) - 1, -1, -1):
        _store_tiles(dh + ((boh + i_t) * H + i_h) * K * V, b_dh1, b_dh2, b_dh3, b_dh4, o_v, m_v, K, V, BK)
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < seq_len
        b_kscale = m_t.to(ACC)
        b_qscale = m_t.to(ACC) * scale
        decay = 1.0
        if G_MODE == 1:
            last = chunk_last(i_t, seq_len, BT)
            g_last = tl.load(gc + (bos + last) * H + i_h).to(ACC)
            b_g = load_token(gc, bos, o_t, m_t, H, i_h, ACC)
            b_kscale = tl.exp(tl.where(m_t, g_last - b_g, float("-inf")))
            b_qscale = b_qscale * tl.exp(b_g)
            decay = tl.exp(g_last)
        # dv' = Pᵀ dO (stored by the shared chunk_bwd_dv) + (K ⊙ e^{b_C − b}) dS_next
        b_dv = load_rows(dv_local, bos, o_t, m_t, o_v, m_v, H, V, i_h, ACC)
        b_dv = _rows_times_tiles(b_dv, k, b_kscale, b_dh1, b_dh2, b_dh3, b_dh4, bos, o_t, m_t, H, K, i_h, BK, ACC, PRECISION)
        store_rows(dv, b_dv, bos, o_t, m_t, o_v, m_v, H, V, i_h)
        b_do = load_rows(do, bos, o_t, m_t, o_v, m_v, H, V, i_h, ACC)
        b_dh1, b_dh2, b_dh3, b_dh4 = _step_tiles(
            b_dh1, b_dh2, b_dh3, b_dh4, decay, q, b_qscale, b_do, w, b_dv, bos, o_t, m_t, H, K, i_h, BK, True, ACC, PRECISION
        )
    if STORE_DH0:
        _store_tiles(dh0 + i_nh.to(tl.int64) * K * V, b_dh1, b_dh2, b_dh3, b_dh4, o_v, m_v, K, V, BK)


_STATE_FORWARD = _tuned_by_key_dim(_state_fwd_kernel)
_STATE_BACKWARD = _tuned_by_key_dim(_state_bwd_kernel)


@triton.jit(do_not_specialize=["T", "TOTAL"])
def _dqk_dw_kernel(
    q,
    k,
    v_new,
    h,
    gc,
    do,
    dh,
    dv,
    dq,
    dk,
    dw,
    db,
    cu_seqlens,
    chunk_indices,
    scale,
    T,
    TOTAL,
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
    """Per chunk and key block: dq, the output/state parts of dk, dw = −dv' hᵀ, and gate partials per key block
    (``db [K/BK, TOTAL, H]``, ``TOTAL = B·T``)."""
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    bos, seq_len, i_c = chunk_coords(i_t, i_b, T, cu_seqlens, chunk_indices, IS_VARLEN)
    i_tg = global_chunk(i_t, i_b, T, BT, IS_VARLEN)
    o_t = i_c * BT + tl.arange(0, BT)
    m_t = o_t < seq_len
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    p_h = h + (i_tg * H + i_h) * K * V
    p_dh = dh + (i_tg * H + i_h) * K * V
    b_dq = tl.zeros([BT, BK], dtype=ACC)
    b_dk = tl.zeros([BT, BK], dtype=ACC)
    b_dw = tl.zeros([BT, BK], dtype=ACC)
    b_dp = tl.zeros([BT, BT], dtype=ACC)
    b_hdh = tl.zeros([BK, BV], dtype=ACC)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_do = load_rows(do, bos, o_t, m_t, o_v, m_v, H, V, i_h, ACC)
        b_vn = load_rows(v_new, bos, o_t, m_t, o_v, m_v, H, V, i_h, ACC)
        b_dv = load_rows(dv, bos, o_t, m_t, o_v, m_v, H, V, i_h, ACC)
        b_h = load_state(p_h, o_k, m_k, o_v, m_v, V, ACC)
        b_dh = load_state(p_dh, o_k, m_k, o_v, m_v, V, ACC)
        b_dq += tl.dot(b_do, tl.trans(b_h), input_precision=PRECISION)
        b_dk += tl.dot(b_vn, tl.trans(b_dh), input_precision=PRECISION)
        b_dw -= tl.dot(b_dv, tl.trans(b_h), input_precision=PRECISION)
        b_dp += tl.dot(b_do, tl.trans(b_vn), input_precision=PRECISION)
        b_hdh += b_h * b_dh
    b_q = load_rows(q, bos, o_t, m_t, o_k, m_k, H, K, i_h, ACC) * scale
    b_k = load_rows(k, bos, o_t, m_t, o_k, m_k, H, K, i_h, ACC)
    o_r = tl.arange(0, BT)
    keep = (o_r[:, None] >= o_r[None, :]) & m_t[:, None] & m_t[None, :]
    if G_MODE == 1:
        last = chunk_last(i_c, seq_len, BT)
        g_last = tl.load(gc + (bos + last) * H + i_h).to(ACC)
        b_g = load_token(gc, bos, o_t, m_t, H, i_h, ACC)
        b_dq = b_dq * tl.exp(b_g)[:, None]
        b_dk = b_dk * tl.exp(tl.where(m_t, g_last - b_g, float("-inf")))[:, None]
        # Gate gradient w.r.t. the chunk cumsum b: read term, state-carry term, intra-chunk decay term.
        b_kdk = tl.sum(b_dk * b_k, 1)
        b_db = tl.sum(b_dq * b_q, 1) - b_kdk
        b_db_last = tl.sum(b_hdh) * tl.exp(g_last) + tl.sum(b_kdk)
        b_dp = b_dp * tl.exp(tl.where(keep, b_g[:, None] - b_g[None, :], float("-inf")))
        b_term = b_dp * tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)
        b_db += tl.sum(b_term, 1) - tl.sum(b_term, 0)
        b_db = tl.where(o_t == last, b_db + b_db_last, b_db)
        tl.store(db + (i_k.to(tl.int64) * TOTAL + bos + o_t) * H + i_h, b_db.to(db.dtype.element_ty), mask=m_t)
    else:
        b_dp = tl.where(keep, b_dp, 0.0)
    b_dq += tl.dot(b_dp, b_k, input_precision=PRECISION)
    b_dk += tl.dot(tl.trans(b_dp), b_q, input_precision=PRECISION)
    store_rows(dq, b_dq * scale, bos, o_t, m_t, o_k, m_k, H, K, i_h)
    store_rows(dk, b_dk, bos, o_t, m_t, o_k, m_k, H, K, i_h)
    store_rows(dw, b_dw, bos, o_t, m_t, o_k, m_k, H, K, i_h)


@triton.jit(do_not_specialize=["T"])
def _wy_bwd_kernel(
    k,
    v,
    beta,
    gc,
    Ai,
    dw,
    du,
    dk_in,
    dk,
    dv,
    dbeta,
    db,
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
    PRECISION: tl.constexpr,
):
    """Back through w = M(β K ⊙ e^b), u = M(β V) and M = (I + A)⁻¹: dA = −Mᵀ dM Mᵀ on the strict lower part."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    bos, seq_len, i_c = chunk_coords(i_t, i_b, T, cu_seqlens, chunk_indices, IS_VARLEN)
    o_t = i_c * BT + tl.arange(0, BT)
    m_t = o_t < seq_len
    o_r = tl.arange(0, BT)
    b_mt = tl.trans(load_rows(Ai, bos, o_t, m_t, o_r, o_r < BT, H, BT, i_h, ACC))
    b_beta = load_token(beta, bos, o_t, m_t, H, i_h, ACC)
    b_eg = m_t.to(ACC)
    if G_MODE == 1:
        b_g = load_token(gc, bos, o_t, m_t, H, i_h, ACC)
        b_eg = tl.exp(b_g)
    b_kscale = b_beta * b_eg
    b_dm = tl.zeros([BT, BT], dtype=ACC)
    b_kk = tl.zeros([BT, BT], dtype=ACC)
    b_dbeta = tl.zeros([BT], dtype=ACC)
    b_db = tl.zeros([BT], dtype=ACC)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_k = load_rows(k, bos, o_t, m_t, o_k, m_k, H, K, i_h, ACC)
        b_dw = load_rows(dw, bos, o_t, m_t, o_k, m_k, H, K, i_h, ACC)
        b_kb = b_k * b_kscale[:, None]
        b_dm += tl.dot(b_dw, tl.trans(b_kb), input_precision=PRECISION)
        b_dkb = tl.dot(b_mt, b_dw, input_precision=PRECISION)
        b_dbeta += tl.sum(b_dkb * b_k, 1) * b_eg
        b_db += tl.sum(b_dkb * b_kb, 1)
        b_kk += tl.dot(b_k, tl.trans(b_k), input_precision=PRECISION)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_v = load_rows(v, bos, o_t, m_t, o_v, m_v, H, V, i_h, ACC)
        b_du = load_rows(du, bos, o_t, m_t, o_v, m_v, H, V, i_h, ACC)
        b_dm += tl.dot(b_du, tl.trans(b_v * b_beta[:, None]), input_precision=PRECISION)
        b_dvb = tl.dot(b_mt, b_du, input_precision=PRECISION)
        b_dbeta += tl.sum(b_dvb * b_v, 1)
        store_rows(dv, b_dvb * b_beta[:, None], bos, o_t, m_t, o_v, m_v, H, V, i_h)
    keep = (o_r[:, None] > o_r[None, :]) & m_t[:, None] & m_t[None, :]
    b_da = -tl.dot(b_mt, tl.dot(b_dm, b_mt, input_precision=PRECISION), input_precision=PRECISION)
    if G_MODE == 1:
        b_e = b_da * tl.exp(tl.where(keep, b_g[:, None] - b_g[None, :], float("-inf")))
    else:
        b_e = tl.where(keep, b_da, 0.0)
    # A_ij = β_i (k_i·k_j) e^{b_i − b_j}; b_e = dA ⊙ e^{b_i − b_j}.
    b_ekk = b_e * b_kk
    b_dbeta += tl.sum(b_ekk, 1)
    if G_MODE == 1:
        b_daa = b_ekk * b_beta[:, None]
        b_db += tl.sum(b_daa, 1) - tl.sum(b_daa, 0)
        tl.store(db + (bos + o_t) * H + i_h, b_db.to(db.dtype.element_ty), mask=m_t)
    tl.store(dbeta + (bos + o_t) * H + i_h, b_dbeta.to(dbeta.dtype.element_ty), mask=m_t)
    b_eb = b_e * b_beta[:, None]
    b_ebt = tl.trans(b_eb)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_k = load_rows(k, bos, o_t, m_t, o_k, m_k, H, K, i_h, ACC)
        b_dw = load_rows(dw, bos, o_t, m_t, o_k, m_k, H, K, i_h, ACC)
        b_dk = load_rows(dk_in, bos, o_t, m_t, o_k, m_k, H, K, i_h, ACC)
        b_dk += tl.dot(b_mt, b_dw, input_precision=PRECISION) * b_kscale[:, None]
        b_dk += tl.dot(b_eb, b_k, input_precision=PRECISION) + tl.dot(b_ebt, b_k, input_precision=PRECISION)
        store_rows(dk, b_dk, bos, o_t, m_t, o_k, m_k, H, K, i_h)


# ----------------------------------------------------------------------------------------------
# fused recurrent kernel (decode and short prompts)
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["T"])
def _fused_recurrent_kernel(
    q,
    k,
    v,
    beta,
    g,
    h0,
    o,
    ht,
    cu_seqlens,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BKF: tl.constexpr,
    BV: tl.constexpr,
    G_MODE: tl.constexpr,
    USE_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    ACC: tl.constexpr,
):
    """One program per (value block, sequence, head) walks the tokens with the state in registers."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, seq_len = seq_span(i_n, T, cu_seqlens, IS_VARLEN)
    o_k = tl.arange(0, BKF)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    b_h = tl.zeros([BKF, BV], dtype=ACC)
    if USE_H0:
        b_h = load_state(h0 + i_nh.to(tl.int64) * K * V, o_k, m_k, o_v, m_v, V, ACC)
    for t in range(seq_len):
        p = (bos + t) * H + i_h
        b_q = tl.load(q + p * K + o_k, mask=m_k, other=0.0).to(ACC) * scale
        b_k = tl.load(k + p * K + o_k, mask=m_k, other=0.0).to(ACC)
        b_v = tl.load(v + p * V + o_v, mask=m_v, other=0.0).to(ACC)
        b_beta = tl.load(beta + p).to(ACC)
        if G_MODE == 1:
            b_h = b_h * tl.exp(tl.load(g + p).to(ACC))
        b_u = (b_v - tl.sum(b_h * b_k[:, None], 0)) * b_beta
        b_h += b_k[:, None] * b_u[None, :]
        tl.store(o + p * V + o_v, tl.sum(b_h * b_q[:, None], 0).to(o.dtype.element_ty), mask=m_v)
    if STORE_HT:
        store_state(ht + i_nh.to(tl.int64) * K * V, b_h, o_k, m_k, o_v, m_v, V)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def _kkt_inverse(k: Tensor, beta: Tensor, gc: Tensor | None, m: ChunkMeta) -> Tensor:
    """``M = (I + strict_lower(β K Kᵀ ⊙ Γ))⁻¹`` of every chunk, ``[B, T, H, BT]`` (rows of each chunk's ``M``)."""
    Ai = k.new_empty(m.B, m.T, m.H, BT)
    wrap_triton(_kkt_inverse_kernel)[(m.NT, m.B * m.H)](
        k, beta, gc, Ai, m.cu_seqlens, m.chunk_indices, m.T,
        H=m.H, K=m.K, BT=BT, BC=BC, BK=BK, G_MODE=int(gc is not None), IS_VARLEN=m.varlen, ACC=m.ACC, PRECISION=m.precision,
    )  # fmt: skip
    return Ai


def _wy_and_state(k, v, beta, gc, Ai, h0, m: ChunkMeta, store_ht: bool):
    """``w, u``, then the chunk-start states ``h [total_chunks, H, K, V]``, ``v' [B, T, H, V]`` and the final
    state ``[N, H, K, V]`` (or ``None``)."""
    g_mode = int(gc is not None)
    w = torch.empty_like(k)
    u = torch.empty_like(v)
    wrap_triton(_wy_fwd_kernel)[(m.NT, m.B * m.H)](
        k, v, beta, gc, Ai, w, u, m.cu_seqlens, m.chunk_indices, m.T,
        H=m.H, K=m.K, V=m.V, BT=BT, BK=BK, BV=tile(m.V), G_MODE=g_mode, IS_VARLEN=m.varlen, ACC=m.ACC, PRECISION=m.precision,
    )  # fmt: skip
    h = k.new_empty(m.total_chunks, m.H, m.K, m.V)
    v_new = torch.empty_like(v)
    ht = k.new_empty(m.N, m.H, m.K, m.V) if store_ht else None

    def grid(meta):
        return (triton.cdiv(m.V, meta["BV"]), m.N * m.H)

    wrap_triton(_STATE_FORWARD[m.K > PIPELINED_MAX_KEY_DIM])[grid](
        k, w, u, gc, h0, h, v_new, ht, m.cu_seqlens, m.chunk_offsets, m.T,
        H=m.H, K=m.K, V=m.V, BT=BT, BK=BK, G_MODE=g_mode, USE_H0=h0 is not None, STORE_HT=store_ht,
        IS_VARLEN=m.varlen, ACC=m.ACC, PRECISION=m.precision,
    )  # fmt: skip
    return w, u, h, v_new, ht


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    # torch.library outputs cannot be None: an output the call does not produce is a 0-element tensor.
    return t if t is not None else like.new_empty(0)


# ----------------------------------------------------------------------------------------------
# ops
# ----------------------------------------------------------------------------------------------


@triton_op("seqzoo::gated_delta_rule_triton_fwd", mutates_args=())
def _gated_delta_rule_triton_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None,
    h0: Tensor | None,
    cu_seqlens: Tensor | None,
    chunk_indices: Tensor | None,
    chunk_offsets: Tensor | None,
    scale: float,
    output_final_state: bool,
    precision: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Chunked forward over tensors of one float dtype (fp32 or fp64, contiguous): ``(o [B, T, H, V],
    ht [N, H, K, V], gc [B, T, H], M [B, T, H, BT])``; ``gc`` (the cumulated gate) and ``M`` (the inverse) are
    kept for the backward. ``ht`` without ``output_final_state`` and ``gc`` without a gate have 0 elements."""
    m = ChunkMeta.build(q, v, cu_seqlens, chunk_indices, chunk_offsets, precision)
    gc = chunk_local_cumsum(g, m) if g is not None else None
    Ai = _kkt_inverse(k, beta, gc, m)
    _, _, h, v_new, ht = _wy_and_state(k, v, beta, gc, Ai, h0, m, output_final_state)
    o = chunk_fwd_o(q, k, v_new, gc, h, None, m, scale, int(gc is not None))
    return o, _or_empty(ht, q), _or_empty(gc, q), Ai


@_gated_delta_rule_triton_fwd.register_fake
def _(q, k, v, beta, g, h0, cu_seqlens, chunk_indices, chunk_offsets, scale, output_final_state, precision):
    B, T, H, K = q.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    ht = q.new_empty(N, H, K, v.shape[-1]) if output_final_state else q.new_empty(0)
    gc = q.new_empty(B, T, H) if g is not None else q.new_empty(0)
    return torch.empty_like(v), ht, gc, q.new_empty(B, T, H, BT)


@triton_op("seqzoo::gated_delta_rule_triton_bwd", mutates_args=())
def _gated_delta_rule_triton_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    gc: Tensor | None,
    Ai: Tensor,
    h0: Tensor | None,
    do: Tensor,
    dht: Tensor | None,
    cu_seqlens: Tensor | None,
    chunk_indices: Tensor | None,
    chunk_offsets: Tensor | None,
    scale: float,
    precision: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Recomputing backward: ``(dq, dk, dv, dβ, dg, dh0)`` from the forward's inputs, its kept ``gc, M`` and the
    cotangents ``do [B, T, H, V]``, ``dht [N, H, K, V]`` (or ``None``); ``dg``/``dh0`` have 0 elements without a
    gate or an initial state."""
    m = ChunkMeta.build(q, v, cu_seqlens, chunk_indices, chunk_offsets, precision)
    g_mode = int(gc is not None)
    # Recompute instead of saving: w, u, the chunk-start states and v' cost one forward state sweep.
    w, _, h, v_new, _ = _wy_and_state(k, v, beta, gc, Ai, h0, m, store_ht=False)
    dv_local = chunk_bwd_dv(q, k, do, gc, None, None, m, scale, g_mode)
    dh = torch.empty_like(h)
    dh0 = torch.empty_like(h0) if h0 is not None else None
    dv = torch.empty_like(v)

    def grid(meta):
        return (triton.cdiv(m.V, meta["BV"]), m.N * m.H)

    wrap_triton(_STATE_BACKWARD[m.K > PIPELINED_MAX_KEY_DIM])[grid](
        q, k, w, gc, do, dv_local, dv, dht, dh, dh0, m.cu_seqlens, m.chunk_offsets, scale, m.T,
        H=m.H, K=m.K, V=m.V, BT=BT, BK=BK, G_MODE=g_mode, USE_DHT=dht is not None, STORE_DH0=dh0 is not None,
        IS_VARLEN=m.varlen, ACC=m.ACC, PRECISION=m.precision,
    )  # fmt: skip
    n_kblocks = triton.cdiv(m.K, BK)
    dq = torch.empty_like(q)
    dk_part = torch.empty_like(k)
    dw = torch.empty_like(k)
    db_part = q.new_empty(n_kblocks, m.B, m.T, m.H) if g_mode else None
    wrap_triton(_dqk_dw_kernel)[(n_kblocks, m.NT, m.B * m.H)](
        q, k, v_new, h, gc, do, dh, dv, dq, dk_part, dw, db_part, m.cu_seqlens, m.chunk_indices, scale, m.T, m.B * m.T,
        H=m.H, K=m.K, V=m.V, BT=BT, BK=BK, BV=tile(m.V), G_MODE=g_mode, IS_VARLEN=m.varlen, ACC=m.ACC, PRECISION=m.precision,
    )  # fmt: skip
    dk = torch.empty_like(k)
    dv_in = torch.empty_like(v)
    dbeta = torch.empty_like(beta)
    db_wy = torch.empty_like(beta) if g_mode else None
    wrap_triton(_wy_bwd_kernel)[(m.NT, m.B * m.H)](
        k, v, beta, gc, Ai, dw, dv, dk_part, dk, dv_in, dbeta, db_wy, m.cu_seqlens, m.chunk_indices, m.T,
        H=m.H, K=m.K, V=m.V, BT=BT, BK=BK, BV=tile(m.V), G_MODE=g_mode, IS_VARLEN=m.varlen, ACC=m.ACC, PRECISION=m.precision,
    )  # fmt: skip
    dg = None
    if g_mode:
        # Gradients w.r.t. the chunk cumsum become gradients w.r.t. the raw gates by a reverse cumsum.
        dg = chunk_local_cumsum((db_part.sum(0) + db_wy).contiguous(), m, reverse=True)
    return dq, dk, dv_in, dbeta, _or_empty(dg, q), _or_empty(dh0, q)


@_gated_delta_rule_triton_bwd.register_fake
def _(q, k, v, beta, gc, Ai, h0, do, dht, cu_seqlens, chunk_indices, chunk_offsets, scale, precision):
    dg = torch.empty_like(beta) if gc is not None else q.new_empty(0)
    dh0 = torch.empty_like(h0) if h0 is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(beta), dg, dh0


def _gdr_setup_context(ctx, inputs, output):
    q, k, v, beta, g, h0, cu_seqlens, chunk_indices, chunk_offsets, scale, output_final_state, precision = inputs
    _, _, gc, Ai = output
    ctx.mark_non_differentiable(gc, Ai)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, beta, gc if g is not None else None, Ai, h0)
    ctx.packing = (cu_seqlens, chunk_indices, chunk_offsets)
    ctx.config = (scale, precision, g is not None, output_final_state)


def _gdr_backward(ctx, do, dht, _dgc, _dAi):
    q, k, v, beta, gc, Ai, h0 = ctx.saved_tensors
    scale, precision, has_g, output_final_state = ctx.config
    do = torch.zeros_like(v) if do is None else do.contiguous().to(q.dtype)
    dht = dht.contiguous().to(q.dtype) if dht is not None and output_final_state else None
    dq, dk, dv, dbeta, dg, dh0 = _gated_delta_rule_triton_bwd(q, k, v, beta, gc, Ai, h0, do, dht, *ctx.packing, scale, precision)
    return dq, dk, dv, dbeta, dg if has_g else None, dh0 if h0 is not None else None, None, None, None, None, None, None


_gated_delta_rule_triton_fwd.register_autograd(_gdr_backward, setup_context=_gdr_setup_context)


@triton_op("seqzoo::gated_delta_rule_fused", mutates_args=())
def _gated_delta_rule_fused(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None,
    h0: Tensor | None,
    cu_seqlens: Tensor | None,
    scale: float,
    output_final_state: bool,
) -> tuple[Tensor, Tensor]:
    """Step-by-step forward (no autograd): ``(o [B, T, H, V], ht [N, H, K, V])`` in the accumulator dtype of
    ``q`` (``ht`` with 0 elements without ``output_final_state``)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = acc_dtype(q.dtype)
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    o = q.new_empty(B, T, H, V, dtype=acc)
    ht = q.new_empty(N, H, K, V, dtype=acc) if output_final_state else None
    bkf = max(16, triton.next_power_of_2(K))
    # Keep the register state at <= 256·32 fp32 values per program; more programs cover V.
    bv = min(tile(V), max(8, 8192 // bkf))
    wrap_triton(_fused_recurrent_kernel)[(triton.cdiv(V, bv), N * H)](
        q, k, v, beta, g, h0, o, ht, cu_seqlens, scale, T,
        H=H, K=K, V=V, BKF=bkf, BV=bv, G_MODE=int(g is not None), USE_H0=h0 is not None, STORE_HT=output_final_state,
        IS_VARLEN=cu_seqlens is not None, ACC=tl_dtype(q.dtype),
    )  # fmt: skip
    return o, ht if ht is not None else q.new_empty(0, dtype=acc)


@_gated_delta_rule_fused.register_fake
def _(q, k, v, beta, g, h0, cu_seqlens, scale, output_final_state):
    B, T, H, K = q.shape
    acc = acc_dtype(q.dtype)
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    ht = q.new_empty(N, H, K, v.shape[-1], dtype=acc) if output_final_state else q.new_empty(0, dtype=acc)
    return q.new_empty(B, T, H, v.shape[-1], dtype=acc), ht


# ----------------------------------------------------------------------------------------------
# entry points
# ----------------------------------------------------------------------------------------------


def _check_key_dim(key_dim: int) -> None:
    if key_dim > MAX_KEY_DIM:
        raise ValueError(f"gated_delta_rule: the Triton backend supports key_dim <= {MAX_KEY_DIM}, got {key_dim}")


def gated_delta_rule_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked Triton gated delta rule with autograd (inputs validated by the public function).

    Shapes as :func:`seqzoo.ops.gated_delta_rule.gated_delta_rule`: ``q, k [B, T, H, K]``, ``v [B, T, H, V]``,
    ``beta, g [B, T, H]`` (``g=None``: no decay), ``initial_state [N, H, K, V]``. ``key_dim <= 256``.
    Returns ``o [B, T, H, V]`` in ``q.dtype`` and the final state ``[N, H, K, V]`` (fp32/fp64) or ``None``.
    """
    batch, seq, _, key_dim = q.shape
    _check_key_dim(key_dim)
    out_dtype = q.dtype
    precision = dot_precision(q.dtype)
    dt = compute_dtype(q, k, v, beta, g, initial_state)
    if use_qk_l2norm:
        q, k = l2norm(q.to(dt)), l2norm(k.to(dt))
    # Saved for the backward and re-read by several kernels: one upcast here (interpreter: no bf16 math at all).
    q, k, v, beta = (t.to(dt).contiguous() for t in (q, k, v, beta))
    g = g.to(dt).contiguous() if g is not None else None
    h0 = initial_state.to(dt).contiguous() if initial_state is not None else None
    packing = varlen_indices(cu_seqlens, batch, seq, q.device, "gated_delta_rule") or (None, None, None)
    o, ht, _, _ = _gated_delta_rule_triton_fwd(q, k, v, beta, g, h0, *packing, scale, output_final_state, precision)
    return o.to(out_dtype), (ht if output_final_state else None)


def _as_kernel_input(t: torch.Tensor | None, dtype: torch.dtype, on_gpu: bool) -> torch.Tensor | None:
    if t is None:
        return None
    # On the GPU the kernels load any float dtype and upcast; the interpreter cannot do bf16 math at all.
    if not on_gpu or t.dtype == torch.float64 or dtype == torch.float64:
        t = t.to(dtype)
    return t.contiguous()


def gated_delta_rule_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step-by-step Triton kernel with the state in registers: for decoding and short prompts, no autograd.

    Shapes as :func:`gated_delta_rule_triton`. Returns ``o [B, T, H, V]`` in ``q.dtype`` and the final
    state ``[N, H, K, V]`` (fp32/fp64) or ``None``.
    """
    _check_key_dim(q.shape[-1])
    out_dtype = q.dtype
    dt = compute_dtype(q, k, v, beta, g, initial_state)
    on_gpu = q.is_cuda and not TRITON_INTERPRET
    if use_qk_l2norm:
        q, k = l2norm(q.to(dt)), l2norm(k.to(dt))
    q, k, v, beta, g = (_as_kernel_input(t, dt, on_gpu) for t in (q, k, v, beta, g))
    h0 = initial_state.to(dt).contiguous() if initial_state is not None else None
    # No ChunkLayout here: the step kernel needs only the offsets, and a decode step should not sync the host.
    cu = None if cu_seqlens is None else cu_seqlens.to(torch.int64).contiguous()
    o, ht = _gated_delta_rule_fused(q, k, v, beta, g, h0, cu, scale, output_final_state)
    return o.to(out_dtype), (ht if output_final_state else None)
