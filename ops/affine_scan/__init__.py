"""``affine_scan``: first-order linear recurrences with diagonal or per-channel 2×2 coefficients.

Forward (``reverse=False``), ``h_{-1} = initial`` (zeros if ``None``)::

    h_t = a_t ⊙ h_{t-1} + b_t          t = 0 … seq-1

Reverse (``reverse=True``), ``h_seq = initial``; ``a_t`` multiplies the state to its *right*::

    h_t = a_t ⊙ h_{t+1} + b_t          t = seq-1 … 0

So the coefficient in slot ``t`` always belongs to the step that produces ``h_t``. An adjoint
``g_t = dh_t + a_{t+1}ᵀ g_{t+1}`` is ``affine_scan(a_next_T, dh, reverse=True)`` with
``a_next_T[:, t] = a[:, t+1]ᵀ`` (anything, e.g. 0, in the last slot when ``initial`` is ``None``);
:func:`adjoint_coeff` builds it. ParaRNN's backward uses exactly that.
"""

from __future__ import annotations

import math

import torch

from seqzoo.ops.affine_scan.chunked import AffineScanFunction, adjoint_coeff, scan_torch
from seqzoo.ops.affine_scan.reference import affine_scan_reference, apply_coeff
from seqzoo.ops.core import (
    ChunkLayout,
    autocast_off,
    check_cu_seqlens,
    check_float,
    check_positive_int,
    check_shape,
    choose_backend,
    compute_dtype,
    fail,
    needs_grad,
)

__all__ = ["affine_scan", "adjoint_coeff", "scan_structure"]

_OP = "affine_scan"
BACKENDS = ("reference", "torch", "triton")
DEFAULT_CHUNK = 64


def scan_structure(a: torch.Tensor, b: torch.Tensor) -> str:
    """``"diag"`` when ``a.shape == b.shape`` (``[batch, seq, *channels]``), ``"block2"`` when
    ``a: [batch, seq, *channels, 2, 2]`` and ``b: [batch, seq, *channels, 2]``; otherwise an ``OpInputError``.
    """
    if a.dim() == b.dim():
        if b.dim() < 3:
            fail(_OP, f"b must be [batch, seq, dim, ...], got shape {tuple(b.shape)}")
        check_shape(_OP, "a", a, b.shape)
        return "diag"
    if a.dim() == b.dim() + 1:
        if b.dim() < 4 or b.shape[-1] != 2 or tuple(a.shape) != (*b.shape, 2):
            fail(_OP, f"2×2 blocks need a [batch, seq, dim, 2, 2] and b [batch, seq, dim, 2], got a {tuple(a.shape)}, b {tuple(b.shape)}")
        return "block2"
    fail(_OP, f"a {tuple(a.shape)} must match b {tuple(b.shape)} (diagonal) or add a trailing 2×2 (blocks)")
    raise AssertionError  # unreachable


@autocast_off
def affine_scan(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    initial: torch.Tensor | None = None,
    reverse: bool = False,
    output_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Solve ``h_t = a_t h_{t∓1} + b_t`` for every ``t`` in parallel (see the module docstring).

    Args:
        a: diagonal ``[batch, seq, *channels]``, or 2×2 blocks ``[batch, seq, *channels, 2, 2]``
            (``h_t = A_t h_{t-1} + b_t`` as a matrix–vector product per channel).
        b: ``[batch, seq, *channels]`` (diagonal) or ``[batch, seq, *channels, 2]`` (blocks).
        initial: the state entering the first step taken: ``h_{-1}`` forward, ``h_seq`` reversed;
            ``[batch, *channels]`` or ``[batch, *channels, 2]``. ``None`` means zeros.
        reverse: run from the end, ``h_t = a_t h_{t+1} + b_t``.
        output_final_state: also return the last state produced (``h[:, -1]``, or ``h[:, 0]`` reversed).
        chunk_size: chunk length of the PyTorch scan / time tile of the Triton kernel (power of two there).
        cu_seqlens: ``[num_seqs + 1]`` offsets of sequences packed along ``seq`` (then ``batch == 1``): each is
            scanned on its own, from its own ``initial[i]`` (``initial``, ``final``: ``[num_seqs, ...]``).
        backend: ``"auto"`` (Triton on CUDA, chunked PyTorch elsewhere), ``"reference"``, ``"torch"``, ``"triton"``.

    Returns:
        ``(h, final)``: ``h`` shaped like ``b`` in ``b``'s and ``a``'s promoted dtype (computed in fp32,
        or fp64 for fp64 inputs); ``final`` shaped like ``initial``, or ``None``. Gradients flow to
        ``a``, ``b`` and ``initial`` (torch and triton backends: one adjoint scan, no saved intermediates
        besides ``h``).
    """
    check_float(_OP, "a", a)
    check_float(_OP, "b", b)
    check_float(_OP, "initial", initial)
    structure = scan_structure(a, b)
    batch, seq = b.shape[:2]
    num_states = check_cu_seqlens(_OP, cu_seqlens, batch, seq)
    state_shape = (num_states, *b.shape[2:])
    check_shape(_OP, "initial", initial, state_shape)
    if seq == 0:
        fail(_OP, "seq must be at least 1")
    check_positive_int(_OP, "chunk_size", chunk_size)
    devices = {t.device for t in (a, b, initial) if t is not None}
    if len(devices) > 1:
        fail(_OP, f"a, b, initial must be on one device, got {sorted(map(str, devices))}")
    impl = choose_backend(_OP, backend, BACKENDS, a, b, initial, seq=seq, grad=needs_grad(a, b, initial))

    out_dtype = torch.promote_types(a.dtype, b.dtype)
    compute = compute_dtype(a, b)
    # Extra channel dims flatten into one; the kernels see [B, T, C] or [B, T, C, 2(, 2)].
    channels = math.prod(b.shape[2:]) if structure == "diag" else math.prod(b.shape[2:-1])
    tail = () if structure == "diag" else (2,)
    af = a.to(compute).reshape(batch, seq, channels, *tail, *tail)
    bf = b.to(compute).reshape(batch, seq, channels, *tail)
    h0 = None if initial is None else initial.to(compute).reshape(num_states, channels, *tail)

    if cu_seqlens is not None:
        layout = ChunkLayout.build(batch, seq, chunk_size, cu_seqlens, a.device, op=_OP)
        starts = torch.tensor(layout.offsets[:-1], device=a.device)
        ends = torch.tensor(layout.offsets[1:], device=a.device) - 1
        first = ends if reverse else starts  # the first step each sequence takes
    if impl == "reference" and cu_seqlens is not None:
        pieces = []
        for i, (bos, eos) in enumerate(zip(layout.offsets[:-1], layout.offsets[1:])):
            init_i = None if h0 is None else h0[i : i + 1]
            pieces.append(affine_scan_reference(af[:, bos:eos], bf[:, bos:eos], init_i, structure, reverse))
        h = torch.cat(pieces, dim=1)
    elif impl == "reference":
        h = affine_scan_reference(af, bf, h0, structure, reverse)
    else:
        if cu_seqlens is not None:
            # One scan over the packed row, cut at every boundary: the first step of each sequence ignores the
            # state before it (a = 0 there) and takes its own initial state through b (b += a·initial).
            if h0 is not None:
                bf = bf.index_add(1, first, apply_coeff(structure, af[:, first], h0[None]))
            af = af.index_fill(1, first, 0.0)
            h0 = None
        if impl == "triton":
            from seqzoo.ops.affine_scan.triton_scan import affine_scan_triton as core
        else:
            core = scan_torch
        h = AffineScanFunction.apply(af, bf, h0, structure, reverse, chunk_size, core)
    h = h.reshape(b.shape).to(out_dtype)
    final = None
    if output_final_state:
        if cu_seqlens is None:
            final = h[:, 0] if reverse else h[:, -1]
        else:
            final = h[0, starts if reverse else ends]
    return h, final
