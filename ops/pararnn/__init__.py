"""ParaRNN: nonlinear RNNs trained in parallel over the sequence by Newton's method (see :mod:`.solver`).

``pararnn(cell, x)`` runs any :class:`RecurrentCell` (ParaGRU, ParaLSTM or your own) over ``x``, either by
Newton iterations whose linear steps are ``affine_scan``s (``mode="parallel"``), by the plain loop
(``mode="sequential"``, for decoding and as the reference), or, for ParaGRU and ParaLSTM, by fused kernels
that run the whole Newton loop with the Jacobians built in registers (``mode="fused"``): one Triton kernel on
CUDA (:mod:`.triton_fused`), a compiled C++ kernel on CPU (:mod:`.cpu_fused`, which also fuses the backward).
``mode="auto"`` takes the fused kernels where they apply and ``"parallel"`` elsewhere.
"""

from __future__ import annotations

import torch

from seqzoo.ops.pararnn.cell import STRUCTURES, RecurrentCell, autograd_jacobian
from seqzoo.ops.pararnn.cells import ParaGRU, ParaLSTM, bounded
from seqzoo.ops.pararnn.solver import (
    FUSED_BACKENDS,
    NewtonConfig,
    NewtonInfo,
    adjoint_solve,
    expand_jacobian,
    fused_apply,
    fused_kind,
    linear_solve,
    newton_solve,
    parallel_apply,
    resolve_fused_backend,
    sequential_apply,
)
from seqzoo.ops.utils import BACKENDS, HAS_TRITON, TRITON_INTERPRET, check_float, check_shape, fail

__all__ = [
    "FUSED_BACKENDS",
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
]

_OP = "pararnn"
MODES = ("auto", "parallel", "sequential", "fused")


def pararnn(
    cell: RecurrentCell,
    x: torch.Tensor,
    *,
    initial: torch.Tensor | None = None,
    mode: str = "parallel",
    max_iters: int = 3,
    omega: float = 1.0,
    init_guess: str = "f0",
    tol: float | None = None,
    scan_backend: str = "auto",
    check_residual: bool = False,
    output_final_state: bool = False,
    return_info: bool = False,
    chunk_size: int | None = None,
    fused_backend: str = "auto",
):
    """Apply ``cell`` to a sequence: ``h_t = f(h_{t-1}, u_t)`` with ``u = cell.prepare(x)``.

    Args:
        cell: a :class:`RecurrentCell` with declared Jacobian structure.
        x: ``[batch, seq, input]`` floating point.
        initial: ``h_{-1}`` as ``[batch, cell.state_size]`` (zeros if ``None``); receives gradients.
        mode: ``"parallel"`` (Newton + scans, adjoint backward), ``"sequential"`` (loop + autograd) or
            ``"fused"`` (ParaGRU/ParaLSTM only: the whole Newton solve in one kernel, fp32 or fp64 compute, the
            same math and implicit backward as ``"parallel"``; ``scan_backend`` and ``tol`` do not apply), or
            ``"auto"``: ``"fused"`` when the cell has fused kernels, ``tol`` is ``None`` and the kernels run
            here (CUDA with Triton, or CPU with the C++ kernel built), else ``"parallel"``.
        max_iters: Newton iterations (fixed unless ``tol`` stops earlier); ``seq`` iterations are exact.
        omega: step damping ``H ← H + ω δ``.
        init_guess: ``"f0"`` (``f(0, u_t)`` for all ``t``) or ``"zeros"``.
        tol: stop once the max-norm residual is ``<= tol`` (a host sync per iteration); ``None`` never stops early.
        scan_backend: ``affine_scan`` backend for the linear steps (``"auto" | "torch" | "triton" | "reference"``).
        check_residual: also evaluate the final iterate's residual into ``info.residuals`` (one more ``step``).
        output_final_state: also return the last state ``[batch, state_size]`` (for decoding after a prompt).
        return_info: also return a :class:`NewtonInfo` (iterations, residual per iterate; ``None`` in sequential
            mode; in fused mode only the final residual, with ``check_residual``).
        chunk_size: time tile of the fused Triton kernels (rounded up to a power of two; ``None``: their default).
        fused_backend: the kernels of ``mode="fused"``: ``"auto"`` (Triton for CUDA tensors, the compiled C++
            kernel for CPU tensors), ``"triton"`` (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``) or
            ``"cpu"`` (built on first use; needs a C++ compiler and ninja).

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
    check_shape(_OP, "initial", initial, (x.shape[0], cell.state_size))
    if mode not in MODES:
        fail(_OP, f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if init_guess not in ("f0", "zeros"):
        fail(_OP, f"init_guess must be 'f0' or 'zeros', got {init_guess!r}")
    if not isinstance(max_iters, int) or max_iters < 0:
        fail(_OP, f"max_iters must be a non-negative int, got {max_iters!r}")
    if not omega > 0:
        fail(_OP, f"omega must be > 0, got {omega}")
    if scan_backend not in BACKENDS:
        fail(_OP, f"unknown scan_backend {scan_backend!r}; choose one of {', '.join(BACKENDS)}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        fail(_OP, f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if fused_backend not in FUSED_BACKENDS:
        fail(_OP, f"fused_backend must be one of {', '.join(FUSED_BACKENDS)}, got {fused_backend!r}")
    kernels = resolve_fused_backend(fused_backend, x)
    if mode == "auto":
        mode = "fused" if _fused_runs(cell, x, initial, tol, kernels) else "parallel"
    if mode == "fused":
        _check_fused(cell, x, initial, tol, kernels)

    u = cell.prepare(x)
    info = None
    if mode == "sequential":
        h = sequential_apply(cell, u, initial)
    else:
        config = NewtonConfig(max_iters, float(omega), init_guess, tol, scan_backend, check_residual, chunk_size, fused_backend)
        info = NewtonInfo()
        h = (fused_apply if mode == "fused" else parallel_apply)(cell, u, initial, config, info)
    y = cell.output(h)
    final = h[:, -1] if output_final_state else None
    return (y, final, info) if return_info else (y, final)


def _fused_runs(cell: RecurrentCell, x: torch.Tensor, initial: torch.Tensor | None, tol: float | None, backend: str) -> bool:
    """Whether ``mode="fused"`` would run here (what ``mode="auto"`` asks; builds the CPU kernel on first use)."""
    if fused_kind(cell) is None or tol is not None:
        return False
    devices = {x.device.type} | ({initial.device.type} if initial is not None else set())
    if backend == "cpu":
        from seqzoo.ops.pararnn.cpu_fused import available

        return devices == {"cpu"} and available()
    return HAS_TRITON and devices == {"cuda"}


def _check_fused(cell: RecurrentCell, x: torch.Tensor, initial: torch.Tensor | None, tol: float | None, backend: str) -> None:
    if fused_kind(cell) is None:
        fail(_OP, f"mode='fused' has kernels for ParaGRU and ParaLSTM only, not {type(cell).__name__}; use mode='parallel'")
    if tol is not None:
        fail(_OP, "mode='fused' runs exactly max_iters iterations; tol is not supported (use mode='parallel')")
    if backend == "cpu":
        from seqzoo.ops.pararnn.cpu_fused import CpuKernelUnavailable, library

        if x.device.type != "cpu" or (initial is not None and initial.device.type != "cpu"):
            fail(_OP, f"fused_backend='cpu' needs CPU tensors, got x on {x.device}")
        try:
            library()
        except CpuKernelUnavailable as err:
            fail(_OP, f"mode='fused' on CPU: {err}; use mode='parallel'")
        return
    if not HAS_TRITON:
        fail(_OP, "mode='fused' with Triton needs the triton package (pip install triton)")
    if not (x.is_cuda and (initial is None or initial.is_cuda)) and not TRITON_INTERPRET:
        fail(_OP, f"fused_backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import), got x on {x.device}")
