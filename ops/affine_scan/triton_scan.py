"""Triton ``affine_scan``: ``tl.associative_scan`` over time tiles with a carried state.

Grid ``(cdiv(C, BD), batch)``: a program owns ``BD`` channels of one sequence and walks ``BT``-step time
tiles in order. Each tile is scanned along axis 0 (pairs ``(a, b)``, or the 6-tuple of a 2×2 block and
its 2-vector), then the carried state enters through the cumulative coefficient: ``h = A_cum · carry +
B_cum``. Padding rows are the identity map, so the tile's last row is always the state to carry.

``reverse`` loads the tile with a reversed time index and scans forward: ``tl.associative_scan(...,
reverse=True)`` is reported wrong on GPU for non-commutative combines (triton #4362, #8412).
Inputs arrive contiguous in the compute dtype (fp32 or fp64); accumulation happens in that dtype. There is
no ``tl.dot`` here (the scans are elementwise), so no dot precision to choose.

The launch is the ``torch.library`` op ``seqzoo::affine_scan_triton`` (with a fake implementation, so
``torch.compile`` sees one op). It has no autograd of its own: :class:`~seqzoo.ops.affine_scan.chunked.AffineScanFunction`,
which the chunked PyTorch path shares, differentiates it by one more scan through the same op (the adjoint).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton


@triton.jit
def _diag_combine(a1, b1, a2, b2):
    # (a1, b1) is the earlier map, (a2, b2) the later one.
    return a2 * a1, a2 * b1 + b2


@triton.jit
def _block2_combine(l00, l01, l10, l11, lb0, lb1, r00, r01, r10, r11, rb0, rb1):
    # Later map R after earlier map L: (R·L, R·lb + rb).
    return (
        r00 * l00 + r01 * l10,
        r00 * l01 + r01 * l11,
        r10 * l00 + r11 * l10,
        r10 * l01 + r11 * l11,
        r00 * lb0 + r01 * lb1 + rb0,
        r10 * lb0 + r11 * lb1 + rb1,
    )


@triton.jit
def _scan_diag_kernel(a_ptr, b_ptr, h0_ptr, h_ptr, T, C, USE_H0: tl.constexpr, REVERSE: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    i_d = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < C
    o_s = tl.arange(0, BT)
    base = i_b * T * C
    if USE_H0:
        carry = tl.load(h0_ptr + i_b * C + o_d, mask=m_d, other=0.0).to(h_ptr.dtype.element_ty)
    else:
        carry = tl.zeros([BD], dtype=h_ptr.dtype.element_ty)
    for i_t in range(0, tl.cdiv(T, BT)):
        s = i_t * BT + o_s
        if REVERSE:
            t = T - 1 - s
        else:
            t = s
        mask = (s < T)[:, None] & m_d[None, :]
        offs = base + t.to(tl.int64)[:, None] * C + o_d[None, :]
        a = tl.load(a_ptr + offs, mask=mask, other=1.0)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0)
        a_cum, b_cum = tl.associative_scan((a, b), axis=0, combine_fn=_diag_combine)
        h = a_cum * carry[None, :] + b_cum
        tl.store(h_ptr + offs, h, mask=mask)
        carry = tl.sum(tl.where((o_s == BT - 1)[:, None], h, 0.0), axis=0)


@triton.jit
def _scan_block2_kernel(a_ptr, b_ptr, h0_ptr, h_ptr, T, C, USE_H0: tl.constexpr, REVERSE: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    i_d = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < C
    o_s = tl.arange(0, BT)
    base = i_b * T * C
    if USE_H0:
        k0 = tl.load(h0_ptr + (i_b * C + o_d) * 2, mask=m_d, other=0.0).to(h_ptr.dtype.element_ty)
        k1 = tl.load(h0_ptr + (i_b * C + o_d) * 2 + 1, mask=m_d, other=0.0).to(h_ptr.dtype.element_ty)
    else:
        k0 = tl.zeros([BD], dtype=h_ptr.dtype.element_ty)
        k1 = tl.zeros([BD], dtype=h_ptr.dtype.element_ty)
    last = (o_s == BT - 1)[:, None]
    for i_t in range(0, tl.cdiv(T, BT)):
        s = i_t * BT + o_s
        if REVERSE:
            t = T - 1 - s
        else:
            t = s
        mask = (s < T)[:, None] & m_d[None, :]
        cell = base + t.to(tl.int64)[:, None] * C + o_d[None, :]
        # Padding is the identity block with a zero offset.
        a00 = tl.load(a_ptr + cell * 4, mask=mask, other=1.0)
        a01 = tl.load(a_ptr + cell * 4 + 1, mask=mask, other=0.0)
        a10 = tl.load(a_ptr + cell * 4 + 2, mask=mask, other=0.0)
        a11 = tl.load(a_ptr + cell * 4 + 3, mask=mask, other=1.0)
        b0 = tl.load(b_ptr + cell * 2, mask=mask, other=0.0)
        b1 = tl.load(b_ptr + cell * 2 + 1, mask=mask, other=0.0)
        c00, c01, c10, c11, d0, d1 = tl.associative_scan((a00, a01, a10, a11, b0, b1), axis=0, combine_fn=_block2_combine)
        h0 = c00 * k0[None, :] + c01 * k1[None, :] + d0
        h1 = c10 * k0[None, :] + c11 * k1[None, :] + d1
        tl.store(h_ptr + cell * 2, h0, mask=mask)
        tl.store(h_ptr + cell * 2 + 1, h1, mask=mask)
        k0 = tl.sum(tl.where(last, h0, 0.0), axis=0)
        k1 = tl.sum(tl.where(last, h1, 0.0), axis=0)


@triton_op("seqzoo::affine_scan_triton", mutates_args=())
def _affine_scan_triton(a: Tensor, b: Tensor, h0: Tensor | None, structure: str, reverse: bool, chunk_size: int) -> Tensor:
    """``h`` shaped like ``b`` (see :func:`affine_scan_triton`)."""
    batch, seq, channels = b.shape[:3]
    h = torch.empty_like(b, memory_format=torch.contiguous_format)
    # 2×2 keeps six tiles live, so its channel block is narrower.
    bd = min(triton.next_power_of_2(channels), 32 if structure == "diag" else 16)
    bt = triton.next_power_of_2(max(1, chunk_size))
    kernel = _scan_diag_kernel if structure == "diag" else _scan_block2_kernel
    grid = (triton.cdiv(channels, bd), batch)
    wrap_triton(kernel)[grid](a, b, h0, h, seq, channels, USE_H0=h0 is not None, REVERSE=reverse, BT=bt, BD=bd)
    return h


@_affine_scan_triton.register_fake
def _(a, b, h0, structure, reverse, chunk_size):
    return torch.empty_like(b, memory_format=torch.contiguous_format)


def affine_scan_triton(
    a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, structure: str, reverse: bool, chunk_size: int
) -> torch.Tensor:
    """Run the scan kernel; inputs in the compute dtype, ``chunk_size`` rounded up to a power of two.

    Shapes as in :mod:`seqzoo.ops.affine_scan.reference`; returns ``h`` shaped like ``b``.
    """
    return _affine_scan_triton(a.contiguous(), b.contiguous(), None if h0 is None else h0.contiguous(), structure, reverse, chunk_size)
