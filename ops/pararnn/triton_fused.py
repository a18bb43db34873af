"""Fused Triton kernels for ParaGRU and ParaLSTM: the whole Newton solve in one launch.

Fusing pays because an iteration of the unfused solve is several passes over ``[batch, seq, state]``
tensors (the step with its Jacobian, the residual, the scan, the update), while the cells are channel-wise:
one program can rebuild ``f`` and ``A_t`` from the previous iterate in registers and scan them in the same
pass, so an iteration reads the inputs and the previous iterate once and writes the new one once.

Forward, grid ``(cdiv(N, BD), batch)``. A program owns ``BD`` channels of one sequence (the recurrence is
channel-wise, so nothing crosses programs) and runs, in one launch:

1. the initial guess ``h_t = f(0, u_t)`` (``f(h_{-1}, u_0)`` at ``t = 0``), or zeros;
2. ``max_iters`` times: walk the ``BT``-step time tiles in order; per tile rebuild ``f(h_{t-1}, u_t)`` and
   the Jacobian ``A_t`` (diagonal for ParaGRU, per-channel 2×2 for ParaLSTM) from the previous iterate in
   registers, scan ``δ_t = A_t δ_{t-1} + r_t`` (``r = f − h``) with ``tl.associative_scan`` plus the ``δ``
   carried from the previous tile, and write ``h + ω δ``.

The iterate lives in the output buffer itself. Iteration ``k`` needs iterate ``k−1`` of ``h_{t-1}``; inside a
tile that is still in memory (a barrier separates the tile's loads from its stores), and at the tile start it
is the previous tile's last old value, carried in registers before that tile was overwritten. A barrier ends
every iteration, so the next one reads what every thread of the program wrote.

Backward (same grid): rebuild ``A_{t+1}`` at the solution and run ``λ_t = g_t + A_{t+1}ᵀ λ_{t+1}`` over the
tiles from the end, each loaded with a reversed time index and scanned forward (``reverse=True`` of
``tl.associative_scan`` is reported wrong on GPU for non-commutative combines, triton #4362, #8412). It
returns ``λ``; parameter and input gradients come from one batched VJP through ``cell.step`` in PyTorch.

Layouts: ``u [batch, seq, 3, N]`` (the cells' ``prepare`` output, channel-contiguous rows), the bounded
recurrent vectors ``a [3, N]`` (and ParaLSTM's peepholes ``p [2, N]``), states ``[batch, seq, S]`` with
``S = N`` (GRU) or ``2N`` as ``[c; h]`` (LSTM). Everything in the compute dtype (fp32, or fp64 for fp64
inputs). The math is exactly ``ParaGRU.step_and_jacobian`` / ``ParaLSTM._forward``; ``tanh`` is
``2σ(2x) − 1`` (libdevice ``tanh`` does not run in the interpreter). There is no ``tl.dot`` (the
recurrences are channel-wise), so no dot precision to choose.

Both launches are ``torch.library`` ops with fake implementations (``seqzoo::pararnn_fused_fwd``,
``seqzoo::pararnn_fused_adjoint``), so ``torch.compile`` sees one op each. Their autograd stays in
:class:`~seqzoo.ops.pararnn.solver.FusedNewtonFunction`: the backward ends in a VJP through the cell's own
``step`` (an ``nn.Module`` method, with its parameters), which cannot be an op argument.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from seqzoo.ops.affine_scan.triton_scan import _block2_combine, _diag_combine

KINDS = ("gru", "lstm")


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _gru_cell(h, uz, ur, uh, az, ar, ah):
    # ParaGRU.step_and_jacobian: f = h + z (n − h), A = (1−z) + (n−h) a_z σ'_z + z a_h tanh'_n (r + h a_r σ'_r).
    z = tl.sigmoid(az * h + uz)
    r = tl.sigmoid(ar * h + ur)
    n = _tanh(ah * (r * h) + uh)
    diff = n - h
    f = h + z * diff
    dr = r + h * ar * r * (1.0 - r)
    jac = (1.0 - z) + diff * az * z * (1.0 - z) + z * (1.0 - n * n) * ah * dr
    return f, jac


@triton.jit
def _lstm_cell(c, h, uf, uo, uc, af, ao, ac, pf, po):
    # ParaLSTM._forward: CIFG with peepholes; the output peephole reads the new c. Blocks rows/cols (c, h).
    f = tl.sigmoid(af * h + pf * c + uf)
    cand = _tanh(ac * h + uc)
    cn = cand + f * (c - cand)
    o = tl.sigmoid(ao * h + po * cn + uo)
    tc = _tanh(cn)
    hn = o * tc
    df = f * (1.0 - f) * (c - cand)
    jcc = f + df * pf
    jch = df * af + (1.0 - f) * ac * (1.0 - cand * cand)
    do = o * (1.0 - o) * tc
    dtanh = o * (1.0 - tc * tc)
    jhc = (dtanh + do * po) * jcc
    jhh = do * (ao + po * jch) + dtanh * jch
    return cn, hn, jcc, jch, jhc, jhh


@triton.jit
def _gru_fwd_kernel(
    u_ptr, a_ptr, h0_ptr, omega_ptr, h_ptr, T, N, max_iters,
    USE_H0: tl.constexpr, ZERO_GUESS: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    i_d = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < N
    o_s = tl.arange(0, BT)
    dt = h_ptr.dtype.element_ty
    az = tl.load(a_ptr + o_d, mask=m_d, other=0.0)[None, :]
    ar = tl.load(a_ptr + N + o_d, mask=m_d, other=0.0)[None, :]
    ah = tl.load(a_ptr + 2 * N + o_d, mask=m_d, other=0.0)[None, :]
    omega = tl.load(omega_ptr)
    u_base = u_ptr + i_b * T * 3 * N
    h_base = h_ptr + i_b * T * N
    if USE_H0:
        init = tl.load(h0_ptr + i_b * N + o_d, mask=m_d, other=0.0).to(dt)
    else:
        init = tl.zeros([BD], dtype=dt)
    first = (o_s == 0)[:, None]
    last = (o_s == BT - 1)[:, None]
    n_tiles = tl.cdiv(T, BT)

    # Initial guess: f(0, u_t), with h_{-1} at t = 0 (all steps independent).
    for i_t in range(0, n_tiles):
        t = i_t * BT + o_s
        mask = (t < T)[:, None] & m_d[None, :]
        t64 = t.to(tl.int64)[:, None]
        uo = t64 * (3 * N) + o_d[None, :]
        ho = t64 * N + o_d[None, :]
        if ZERO_GUESS:
            h = tl.zeros([BT, BD], dtype=dt)
        else:
            uz = tl.load(u_base + uo, mask=mask, other=0.0)
            ur = tl.load(u_base + uo + N, mask=mask, other=0.0)
            uh = tl.load(u_base + uo + 2 * N, mask=mask, other=0.0)
            prev = tl.where((t == 0)[:, None], init[None, :], 0.0)
            h, _ = _gru_cell(prev, uz, ur, uh, az, ar, ah)
        tl.store(h_base + ho, h, mask=mask)
    tl.debug_barrier()

    for _ in range(0, max_iters):
        carry_h = init  # iterate k−1 at the step before the tile (h_{-1} for the first tile)
        carry_d = tl.zeros([BD], dtype=dt)  # δ at the step before the tile (δ_{-1} = 0)
        for i_t in range(0, n_tiles):
            t = i_t * BT + o_s
            mask = (t < T)[:, None] & m_d[None, :]
            t64 = t.to(tl.int64)[:, None]
            uo = t64 * (3 * N) + o_d[None, :]
            ho = t64 * N + o_d[None, :]
            uz = tl.load(u_base + uo, mask=mask, other=0.0)
            ur = tl.load(u_base + uo + N, mask=mask, other=0.0)
            uh = tl.load(u_base + uo + 2 * N, mask=mask, other=0.0)
            h_old = tl.load(h_base + ho, mask=mask, other=0.0)
            # h_{t-1} of the old iterate: row 0 from the carry (memory already holds the new one there).
            prev = tl.load(h_base + ho - N, mask=mask & (o_s > 0)[:, None], other=0.0)
            prev = tl.where(first, carry_h[None, :], prev)
            f, jac = _gru_cell(prev, uz, ur, uh, az, ar, ah)
            a_cum, d_cum = tl.associative_scan((jac, f - h_old), axis=0, combine_fn=_diag_combine)
            delta = a_cum * carry_d[None, :] + d_cum
            carry_h = tl.sum(tl.where(last, h_old, 0.0), axis=0)
            carry_d = tl.sum(tl.where(last, delta, 0.0), axis=0)
            tl.debug_barrier()  # every thread has read the old tile before any overwrites it
            tl.store(h_base + ho, h_old + omega * delta, mask=mask)
        tl.debug_barrier()  # the next iteration reads this one's stores


@triton.jit
def _lstm_fwd_kernel(
    u_ptr, a_ptr, p_ptr, h0_ptr, omega_ptr, h_ptr, T, N, max_iters,
    USE_H0: tl.constexpr, ZERO_GUESS: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    i_d = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < N
    o_s = tl.arange(0, BT)
    dt = h_ptr.dtype.element_ty
    af = tl.load(a_ptr + o_d, mask=m_d, other=0.0)[None, :]
    ao = tl.load(a_ptr + N + o_d, mask=m_d, other=0.0)[None, :]
    ac = tl.load(a_ptr + 2 * N + o_d, mask=m_d, other=0.0)[None, :]
    pf = tl.load(p_ptr + o_d, mask=m_d, other=0.0)[None, :]
    po = tl.load(p_ptr + N + o_d, mask=m_d, other=0.0)[None, :]
    omega = tl.load(omega_ptr)
    u_base = u_ptr + i_b * T * 3 * N
    h_base = h_ptr + i_b * T * 2 * N  # [c; h] rows of width 2N
    if USE_H0:
        init_c = tl.load(h0_ptr + i_b * 2 * N + o_d, mask=m_d, other=0.0).to(dt)
        init_h = tl.load(h0_ptr + i_b * 2 * N + N + o_d, mask=m_d, other=0.0).to(dt)
    else:
        init_c = tl.zeros([BD], dtype=dt)
        init_h = tl.zeros([BD], dtype=dt)
    first = (o_s == 0)[:, None]
    last = (o_s == BT - 1)[:, None]
    n_tiles = tl.cdiv(T, BT)

    for i_t in range(0, n_tiles):
        t = i_t * BT + o_s
        mask = (t < T)[:, None] & m_d[None, :]
        t64 = t.to(tl.int64)[:, None]
        uo = t64 * (3 * N) + o_d[None, :]
        co = t64 * (2 * N) + o_d[None, :]
        if ZERO_GUESS:
            c = tl.zeros([BT, BD], dtype=dt)
            h = tl.zeros([BT, BD], dtype=dt)
        else:
            uf = tl.load(u_base + uo, mask=mask, other=0.0)
            uo_ = tl.load(u_base + uo + N, mask=mask, other=0.0)
            uc = tl.load(u_base + uo + 2 * N, mask=mask, other=0.0)
            is0 = (t == 0)[:, None]
            c, h, _, _, _, _ = _lstm_cell(
                tl.where(is0, init_c[None, :], 0.0), tl.where(is0, init_h[None, :], 0.0), uf, uo_, uc, af, ao, ac, pf, po
            )
        tl.store(h_base + co, c, mask=mask)
        tl.store(h_base + co + N, h, mask=mask)
    tl.debug_barrier()

    for _ in range(0, max_iters):
        carry_c = init_c
        carry_h = init_h
        k0 = tl.zeros([BD], dtype=dt)
        k1 = tl.zeros([BD], dtype=dt)
        for i_t in range(0, n_tiles):
            t = i_t * BT + o_s
            mask = (t < T)[:, None] & m_d[None, :]
            t64 = t.to(tl.int64)[:, None]
            uo = t64 * (3 * N) + o_d[None, :]
            co = t64 * (2 * N) + o_d[None, :]
            uf = tl.load(u_base + uo, mask=mask, other=0.0)
            uo_ = tl.load(u_base + uo + N, mask=mask, other=0.0)
            uc = tl.load(u_base + uo + 2 * N, mask=mask, other=0.0)
            c_old = tl.load(h_base + co, mask=mask, other=0.0)
            h_old = tl.load(h_base + co + N, mask=mask, other=0.0)
            m_prev = mask & (o_s > 0)[:, None]
            c_prev = tl.where(first, carry_c[None, :], tl.load(h_base + co - 2 * N, mask=m_prev, other=0.0))
            h_prev = tl.where(first, carry_h[None, :], tl.load(h_base + co - N, mask=m_prev, other=0.0))
            fc, fh, jcc, jch, jhc, jhh = _lstm_cell(c_prev, h_prev, uf, uo_, uc, af, ao, ac, pf, po)
            a00, a01, a10, a11, d0, d1 = tl.associative_scan(
                (jcc, jch, jhc, jhh, fc - c_old, fh - h_old), axis=0, combine_fn=_block2_combine
            )
            dc = a00 * k0[None, :] + a01 * k1[None, :] + d0
            dh = a10 * k0[None, :] + a11 * k1[None, :] + d1
            carry_c = tl.sum(tl.where(last, c_old, 0.0), axis=0)
            carry_h = tl.sum(tl.where(last, h_old, 0.0), axis=0)
            k0 = tl.sum(tl.where(last, dc, 0.0), axis=0)
            k1 = tl.sum(tl.where(last, dh, 0.0), axis=0)
            tl.debug_barrier()
            tl.store(h_base + co, c_old + omega * dc, mask=mask)
            tl.store(h_base + co + N, h_old + omega * dh, mask=mask)
        tl.debug_barrier()


@triton.jit
def _gru_bwd_kernel(u_ptr, a_ptr, h_ptr, g_ptr, lam_ptr, T, N, BT: tl.constexpr, BD: tl.constexpr):
    i_d = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < N
    o_s = tl.arange(0, BT)
    dt = lam_ptr.dtype.element_ty
    az = tl.load(a_ptr + o_d, mask=m_d, other=0.0)[None, :]
    ar = tl.load(a_ptr + N + o_d, mask=m_d, other=0.0)[None, :]
    ah = tl.load(a_ptr + 2 * N + o_d, mask=m_d, other=0.0)[None, :]
    u_base = u_ptr + i_b * T * 3 * N
    base = i_b * T * N
    last = (o_s == BT - 1)[:, None]
    carry = tl.zeros([BD], dtype=dt)
    for i_t in range(0, tl.cdiv(T, BT)):
        s = i_t * BT + o_s
        t = T - 1 - s  # row s of the tile is step t, walking backwards
        mask = (s < T)[:, None] & m_d[None, :]
        m_next = mask & (t + 1 < T)[:, None]
        t64 = t.to(tl.int64)[:, None]
        ho = base + t64 * N + o_d[None, :]
        uo = (t64 + 1) * (3 * N) + o_d[None, :]
        # A_{t+1} = ∂f(h_t, u_{t+1})/∂h_t; none after the last step.
        h_t = tl.load(h_ptr + ho, mask=mask, other=0.0)
        uz = tl.load(u_base + uo, mask=m_next, other=0.0)
        ur = tl.load(u_base + uo + N, mask=m_next, other=0.0)
        uh = tl.load(u_base + uo + 2 * N, mask=m_next, other=0.0)
        _, jac = _gru_cell(h_t, uz, ur, uh, az, ar, ah)
        jac = tl.where(m_next, jac, 0.0)
        g = tl.load(g_ptr + ho, mask=mask, other=0.0)
        a_cum, l_cum = tl.associative_scan((jac, g), axis=0, combine_fn=_diag_combine)
        lam = a_cum * carry[None, :] + l_cum
        tl.store(lam_ptr + ho, lam, mask=mask)
        carry = tl.sum(tl.where(last, lam, 0.0), axis=0)


@triton.jit
def _lstm_bwd_kernel(u_ptr, a_ptr, p_ptr, h_ptr, g_ptr, lam_ptr, T, N, BT: tl.constexpr, BD: tl.constexpr):
    i_d = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < N
    o_s = tl.arange(0, BT)
    dt = lam_ptr.dtype.element_ty
    af = tl.load(a_ptr + o_d, mask=m_d, other=0.0)[None, :]
    ao = tl.load(a_ptr + N + o_d, mask=m_d, other=0.0)[None, :]
    ac = tl.load(a_ptr + 2 * N + o_d, mask=m_d, other=0.0)[None, :]
    pf = tl.load(p_ptr + o_d, mask=m_d, other=0.0)[None, :]
    po = tl.load(p_ptr + N + o_d, mask=m_d, other=0.0)[None, :]
    u_base = u_ptr + i_b * T * 3 * N
    base = i_b * T * 2 * N
    last = (o_s == BT - 1)[:, None]
    k0 = tl.zeros([BD], dtype=dt)
    k1 = tl.zeros([BD], dtype=dt)
    for i_t in range(0, tl.cdiv(T, BT)):
        s = i_t * BT + o_s
        t = T - 1 - s
        mask = (s < T)[:, None] & m_d[None, :]
        m_next = mask & (t + 1 < T)[:, None]
        t64 = t.to(tl.int64)[:, None]
        co = base + t64 * (2 * N) + o_d[None, :]
        uo = (t64 + 1) * (3 * N) + o_d[None, :]
        c_t = tl.load(h_ptr + co, mask=mask, other=0.0)
        h_t = tl.load(h_ptr + co + N, mask=mask, other=0.0)
        uf = tl.load(u_base + uo, mask=m_next, other=0.0)
        uo_ = tl.load(u_base + uo + N, mask=m_next, other=0.0)
        uc = tl.load(u_base + uo + 2 * N, mask=m_next, other=0.0)
        _, _, jcc, jch, jhc, jhh = _lstm_cell(c_t, h_t, uf, uo_, uc, af, ao, ac, pf, po)
        # A_{t+1}ᵀ: the off-diagonal entries swap.
        m00 = tl.where(m_next, jcc, 0.0)
        m01 = tl.where(m_next, jhc, 0.0)
        m10 = tl.where(m_next, jch, 0.0)
        m11 = tl.where(m_next, jhh, 0.0)
        g0 = tl.load(g_ptr + co, mask=mask, other=0.0)
        g1 = tl.load(g_ptr + co + N, mask=mask, other=0.0)
        c00, c01, c10, c11, l0, l1 = tl.associative_scan((m00, m01, m10, m11, g0, g1), axis=0, combine_fn=_block2_combine)
        lam0 = c00 * k0[None, :] + c01 * k1[None, :] + l0
        lam1 = c10 * k0[None, :] + c11 * k1[None, :] + l1
        tl.store(lam_ptr + co, lam0, mask=mask)
        tl.store(lam_ptr + co + N, lam1, mask=mask)
        k0 = tl.sum(tl.where(last, lam0, 0.0), axis=0)
        k1 = tl.sum(tl.where(last, lam1, 0.0), axis=0)


def _blocks(kind: str, seq: int, hidden: int, chunk_size: int | None, block_d: int | None) -> tuple[int, int]:
    # Defaults are untuned guesses (no GPU measurement yet): 2×2 keeps six scan tiles live, so narrower channels.
    bt = triton.next_power_of_2(max(1, chunk_size if chunk_size is not None else (128 if kind == "gru" else 64)))
    bt = min(bt, triton.next_power_of_2(seq))
    bd = block_d if block_d is not None else 16
    return bt, min(triton.next_power_of_2(bd), triton.next_power_of_2(hidden))


@triton_op("seqzoo::pararnn_fused_fwd", mutates_args=())
def _pararnn_fused_fwd(
    u: Tensor,
    rec: Tensor,
    peep: Tensor | None,
    h0: Tensor | None,
    kind: str,
    max_iters: int,
    omega: float,
    zero_guess: bool,
    chunk_size: int | None,
    block_d: int | None,
) -> Tensor:
    """The Newton states ``[batch, seq, S]`` (see :func:`pararnn_fused`); inputs contiguous in one dtype."""
    batch, seq, _, hidden = u.shape
    h = u.new_empty(batch, seq, hidden if kind == "gru" else 2 * hidden)
    omega_t = torch.full((1,), omega, dtype=u.dtype, device=u.device)
    bt, bd = _blocks(kind, seq, hidden, chunk_size, block_d)
    grid = (triton.cdiv(hidden, bd), batch)
    flags = dict(USE_H0=h0 is not None, ZERO_GUESS=zero_guess, BT=bt, BD=bd)
    if kind == "gru":
        wrap_triton(_gru_fwd_kernel)[grid](u, rec, h0, omega_t, h, seq, hidden, max_iters, **flags)
    else:
        wrap_triton(_lstm_fwd_kernel)[grid](u, rec, peep, h0, omega_t, h, seq, hidden, max_iters, **flags)
    return h


@_pararnn_fused_fwd.register_fake
def _(u, rec, peep, h0, kind, max_iters, omega, zero_guess, chunk_size, block_d):
    batch, seq, _, hidden = u.shape
    return u.new_empty(batch, seq, hidden if kind == "gru" else 2 * hidden)


@triton_op("seqzoo::pararnn_fused_adjoint", mutates_args=())
def _pararnn_fused_adjoint(
    u: Tensor, rec: Tensor, peep: Tensor | None, h: Tensor, grad: Tensor, kind: str, chunk_size: int | None, block_d: int | None
) -> Tensor:
    """``λ [batch, seq, S]`` (see :func:`pararnn_fused_adjoint`); inputs contiguous in one dtype."""
    batch, seq, _, hidden = u.shape
    lam = torch.empty_like(h)
    bt, bd = _blocks(kind, seq, hidden, chunk_size, block_d)
    grid = (triton.cdiv(hidden, bd), batch)
    if kind == "gru":
        wrap_triton(_gru_bwd_kernel)[grid](u, rec, h, grad, lam, seq, hidden, BT=bt, BD=bd)
    else:
        wrap_triton(_lstm_bwd_kernel)[grid](u, rec, peep, h, grad, lam, seq, hidden, BT=bt, BD=bd)
    return lam


@_pararnn_fused_adjoint.register_fake
def _(u, rec, peep, h, grad, kind, chunk_size, block_d):
    return torch.empty_like(h)


def pararnn_fused(
    kind: str,
    u: torch.Tensor,
    rec: torch.Tensor,
    peep: torch.Tensor | None,
    initial: torch.Tensor | None,
    max_iters: int,
    omega: float = 1.0,
    zero_guess: bool = False,
    chunk_size: int | None = None,
    block_d: int | None = None,
) -> torch.Tensor:
    """The Newton states ``[batch, seq, S]`` from one kernel launch.

    ``u [batch, seq, 3, N]``, ``rec [3, N]``, ``peep [2, N]`` (``"lstm"`` only), ``initial [batch, S]`` or
    ``None``; all in the compute dtype (fp32 or fp64) on one device. ``chunk_size`` is the time tile
    (rounded up to a power of two), ``block_d`` the channels per program.
    """
    h0 = None if initial is None else initial.to(u.dtype).contiguous()
    peep = None if peep is None else peep.contiguous()
    return _pararnn_fused_fwd(u.contiguous(), rec.contiguous(), peep, h0, kind, max_iters, float(omega), zero_guess, chunk_size, block_d)


def pararnn_fused_adjoint(
    kind: str,
    u: torch.Tensor,
    rec: torch.Tensor,
    peep: torch.Tensor | None,
    h: torch.Tensor,
    grad: torch.Tensor,
    chunk_size: int | None = None,
    block_d: int | None = None,
) -> torch.Tensor:
    """``λ [batch, seq, S]`` of ``λ_t = g_t + A_{t+1}ᵀ λ_{t+1}`` with the Jacobians rebuilt at the solution ``h``.

    Shapes and dtypes as in :func:`pararnn_fused`; ``grad [batch, seq, S]`` is ``∂L/∂H``.
    """
    peep = None if peep is None else peep.contiguous()
    args = (u.contiguous(), rec.contiguous(), peep, h.contiguous(), grad.to(u.dtype).contiguous())
    return _pararnn_fused_adjoint(*args, kind, chunk_size, block_d)
