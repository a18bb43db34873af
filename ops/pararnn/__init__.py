"""ParaRNN: nonlinear RNNs trained in parallel over the sequence by Newton's method (see :mod:`.solver`).

``pararnn(cell, x)`` runs any :class:`RecurrentCell` (ParaGRU, ParaLSTM or your own) over ``x`` with the
backend vocabulary of every op (:mod:`seqzoo.ops.core.dispatch`): Newton iterations whose linear steps are
``affine_scan``s (``backend="torch"`` or ``"triton"``, by the scans' kernels), the plain loop
(``"reference"``, also the decoding path), or, for ParaGRU and ParaLSTM, fused kernels that run the whole
Newton loop with the Jacobians built in registers: one Triton kernel (``"fused"``, :mod:`.triton_fused`) or a
compiled C++ kernel on CPU (``"cpp"``, :mod:`.cpu_fused`, which also fuses the backward). ``"auto"`` takes
the device's fused kernel where it applies and the Newton solve over the device's scans elsewhere.
"""

from __future__ import annotations

import torch

from seqzoo.ops.core import (
    HAS_TRITON,
    ChunkLayout,
    autocast_off,
    check_backend,
    check_cu_seqlens,
    check_float,
    check_shape,
    fail,
    on_cuda,
    packed_to_padded,
    padded_to_packed,
    require_triton,
)
from seqzoo.ops.pararnn.cell import STRUCTURES, RecurrentCell, autograd_jacobian
from seqzoo.ops.pararnn.cells import ParaGRU, ParaLSTM, bounded
from seqzoo.ops.pararnn.solver import (
    NewtonConfig,
    NewtonInfo,
    adjoint_solve,
    expand_jacobian,
    fused_apply,
    fused_kind,
    linear_solve,
    newton_solve,
    parallel_apply,
    sequential_apply,
)

__all__ = [
    "BACKENDS",
    "NewtonConfig",
    "NewtonInfo",
    "ParaGRU",
    "ParaLSTM",
    "RecurrentCell",
    "adjoint_solve",
    "autograd_jacobian",
    "bounded",
    "expand_jacobian",
    "fused_apply",
    "fused_kind",
    "linear_solve",
    "newton_solve",
    "pararnn",
    "resolve_backend",
]

_OP = "pararnn"
BACKENDS = ("reference", "torch", "triton", "fused", "cpp")


@autocast_off
def pararnn(
    cell: RecurrentCell,
    x: torch.Tensor,
    *,
    initial: torch.Tensor | None = None,
    backend: str = "auto",
    max_iters: int = 3,
    omega: float = 1.0,
    init_guess: str = "f0",
    tol: float | None = None,
    check_residual: bool = False,
    output_final_state: bool = False,
    return_info: bool = False,
    chunk_size: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
):
    """Apply ``cell`` to a sequence: ``h_t = f(h_{t-1}, u_t)`` with ``u = cell.prepare(x)``.

    Args:
        cell: a :class:`RecurrentCell` with declared Jacobian structure.
        x: ``[batch, seq, input]`` floating point.
        initial: ``h_{-1}`` as ``[batch, cell.state_size]`` (zeros if ``None``); receives gradients.
        backend: ``"reference"`` (the step loop, differentiated by autograd), ``"torch"`` (Newton iterations
            over PyTorch ``affine_scan``s, adjoint backward), ``"triton"`` (the same over Triton scans),
            ``"fused"`` (ParaGRU/ParaLSTM: the whole Newton solve and its adjoint in one Triton kernel each),
            ``"cpp"`` (ParaGRU/ParaLSTM on CPU: a compiled C++ kernel doing the same, backward included), or
            ``"auto"``: the fused kernel of the device (``fused`` on CUDA, ``cpp`` on the CPU where it builds)
            when the cell has one and ``tol`` is ``None``, else Newton over the device's scans. The fused
            kernels run exactly ``max_iters`` iterations, in fp32 (fp64 for fp64 inputs), with the same math
            and implicit backward as ``"torch"``.
        max_iters: Newton iterations (fixed unless ``tol`` stops earlier); ``seq`` iterations are exact.
        omega: step damping ``H ← H + ω δ``.
        init_guess: ``"f0"`` (``f(0, u_t)`` for all ``t``) or ``"zeros"``.
        tol: stop once the max-norm residual is ``<= tol`` (a host sync per iteration); ``None`` never stops early.
        check_residual: also evaluate the final iterate's residual into ``info.residuals`` (one more ``step``).
        output_final_state: also return the last state ``[batch, state_size]`` (for decoding after a prompt).
        return_info: also return a :class:`NewtonInfo` (iterations, residual per iterate: a host sync each;
            ``None`` for ``reference``; for the fused kernels only the final residual, with ``check_residual``).
        chunk_size: time tile of the fused Triton kernels (rounded up to a power of two; ``None``: their default).
        cu_seqlens: ``[num_seqs + 1]`` offsets of sequences packed along ``seq`` (``batch == 1``): each restarts
            from its own ``initial[i]`` (``initial``, ``final``: ``[num_seqs, S]``). ``reference`` loops over them;
            the other backends run them as a zero-padded batch ``[num_seqs, longest, …]`` (the padding follows
            each sequence, so it changes none of its states; it costs the padded work).

    Returns:
        ``(y, final)`` or ``(y, final, info)``: ``y = cell.output(H)`` (``[batch, seq, N]``), ``final`` the full
        state at the last step or ``None``.
    """
    check_float(_OP, "x", x)
    if not isinstance(cell, RecurrentCell):
        fail(_OP, f"cell must be a RecurrentCell, got {type(cell).__name__}")
    if cell.structure not in STRUCTURES:
        fail(_OP, f"cell.structure must be one of {', '.join(STRUCTURES)}, got {cell.structure!r}")
    if x.dim() < 3 or x.shape[1] == 0:
        fail(_OP, f"x must be [batch, seq, input] with seq >= 1, got shape {tuple(x.shape)}")
    check_float(_OP, "initial", initial)
    num_states = check_cu_seqlens(_OP, cu_seqlens, x.shape[0], x.shape[1])
    check_shape(_OP, "initial", initial, (num_states, cell.state_size))
    if init_guess not in ("f0", "zeros"):
        fail(_OP, f"init_guess must be 'f0' or 'zeros', got {init_guess!r}")
    if not isinstance(max_iters, int) or max_iters < 0:
        fail(_OP, f"max_iters must be a non-negative int, got {max_iters!r}")
    if not omega > 0:
        fail(_OP, f"omega must be > 0, got {omega}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        fail(_OP, f"chunk_size must be a positive int or None, got {chunk_size!r}")
    impl = resolve_backend(cell, backend, x, initial, tol)
    config = NewtonConfig(max_iters, float(omega), init_guess, tol, impl, check_residual, chunk_size)
    info = NewtonInfo() if return_info and impl != "reference" else None
    if cu_seqlens is None:
        h = _solve(cell, x, initial, impl, config, info)
        final = h[:, -1] if output_final_state else None
    else:
        offsets = ChunkLayout.build(1, x.shape[1], 1, cu_seqlens, x.device, op=_OP).offsets
        if impl == "reference":
            pieces = [x[:, a:b] for a, b in zip(offsets[:-1], offsets[1:])]
            hs = [_solve(cell, p, None if initial is None else initial[i : i + 1], impl, config, None) for i, p in enumerate(pieces)]
            h = torch.cat(hs, dim=1)
            final = torch.cat([h_i[:, -1] for h_i in hs]) if output_final_state else None
        else:
            padded = _solve(cell, packed_to_padded(x, offsets), initial, impl, config, info)
            h = padded_to_packed(padded, offsets)
            lengths = torch.tensor([b - a for a, b in zip(offsets[:-1], offsets[1:])], device=x.device)
            final = padded[torch.arange(len(lengths), device=x.device), lengths - 1] if output_final_state else None
    y = cell.output(h)
    return (y, final, info) if return_info else (y, final)


def _solve(cell: RecurrentCell, x: torch.Tensor, initial: torch.Tensor | None, impl: str, config: NewtonConfig, info: NewtonInfo | None):
    """The states ``H [batch, seq, S]`` of ``cell`` on ``x [batch, seq, input]`` with the resolved backend ``impl``."""
    u = cell.prepare(x)
    if impl == "reference":
        return sequential_apply(cell, u, initial)
    return (fused_apply if impl in ("fused", "cpp") else parallel_apply)(cell, u, initial, config, info)


def resolve_backend(
    cell: RecurrentCell, backend: str, x: torch.Tensor, initial: torch.Tensor | None = None, tol: float | None = None
) -> str:
    """The implementation :func:`pararnn` runs for ``backend`` on ``x``'s device (checked that it can run there).

    ``"auto"`` takes the device's fused kernel (``"fused"`` on CUDA, ``"cpp"`` on the CPU, built on first use;
    if it cannot build, a one-time warning and ``"torch"``) when ``cell`` has one and ``tol`` is ``None``, else
    ``"triton"`` on CUDA and ``"torch"`` elsewhere. An explicit backend that cannot run here is a one-line error.
    """
    check_backend(_OP, backend, BACKENDS)
    fusable = fused_kind(cell) is not None and tol is None
    cuda = on_cuda(x, initial)
    if backend == "auto":
        if cuda and HAS_TRITON:
            return "fused" if fusable else "triton"
        if fusable and x.device.type == "cpu" and (initial is None or initial.device.type == "cpu"):
            from seqzoo.ops.pararnn.cpu_fused import available

            if available():
                return "cpp"
        return "torch"
    if backend in ("fused", "cpp"):
        if fused_kind(cell) is None:
            fail(_OP, f"backend={backend!r} has kernels for ParaGRU and ParaLSTM only, not {type(cell).__name__}; use backend='torch'")
        if tol is not None:
            fail(_OP, f"backend={backend!r} runs exactly max_iters iterations; tol is not supported (use backend='torch')")
    if backend in ("triton", "fused"):
        require_triton(_OP, backend, x, initial)
    if backend == "cpp":
        from seqzoo.ops.pararnn.cpu_fused import CpuKernelUnavailable, library

        if x.device.type != "cpu" or (initial is not None and initial.device.type != "cpu"):
            fail(_OP, f"backend='cpp' needs CPU tensors, got x on {x.device}")
        try:
            library()
        except CpuKernelUnavailable as err:
            fail(_OP, f"backend='cpp': {err}; use backend='torch'")
    return backend
