"""ParaRNN: nonlinear RNNs trained in parallel over the sequence by Newton's method (see :mod:`.solver`).

``pararnn(cell, x)`` runs any :class:`RecurrentCell` (ParaGRU, ParaLSTM or your own) over ``x``, either by
Newton iterations whose linear steps are ``affine_scan``s (``mode="parallel"``) or by the plain loop
(``mode="sequential"``, for decoding and as the reference).
"""

from __future__ import annotations

import torch

from seqzoo.ops.pararnn.cell import STRUCTURES, RecurrentCell, autograd_jacobian
from seqzoo.ops.pararnn.cells import ParaGRU, ParaLSTM, bounded
from seqzoo.ops.pararnn.solver import (
    NewtonConfig,
    NewtonInfo,
    adjoint_solve,
    expand_jacobian,
    linear_solve,
    newton_solve,
    parallel_apply,
    sequential_apply,
)
from seqzoo.ops.utils import BACKENDS, check_float, check_shape, fail

__all__ = [
    "NewtonConfig",
    "NewtonInfo",
    "ParaGRU",
    "ParaLSTM",
    "RecurrentCell",
    "adjoint_solve",
    "autograd_jacobian",
    "bounded",
    "expand_jacobian",
    "linear_solve",
    "newton_solve",
    "pararnn",
]

_OP = "pararnn"


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
):
    """Apply ``cell`` to a sequence: ``h_t = f(h_{t-1}, u_t)`` with ``u = cell.prepare(x)``.

    Args:
        cell: a :class:`RecurrentCell` with declared Jacobian structure.
        x: ``[batch, seq, input]`` floating point.
        initial: ``h_{-1}`` as ``[batch, cell.state_size]`` (zeros if ``None``); receives gradients.
        mode: ``"parallel"`` (Newton + scans, adjoint backward) or ``"sequential"`` (loop + autograd).
        max_iters: Newton iterations (fixed unless ``tol`` stops earlier); ``seq`` iterations are exact.
        omega: step damping ``H ← H + ω δ``.
        init_guess: ``"f0"`` (``f(0, u_t)`` for all ``t``) or ``"zeros"``.
        tol: stop once the max-norm residual is ``<= tol`` (a host sync per iteration); ``None`` never stops early.
        scan_backend: ``affine_scan`` backend for the linear steps (``"auto" | "torch" | "triton" | "reference"``).
        check_residual: also evaluate the final iterate's residual into ``info.residuals`` (one more ``step``).
        output_final_state: also return the last state ``[batch, state_size]`` (for decoding after a prompt).
        return_info: also return a :class:`NewtonInfo` (iterations, residual per iterate; parallel mode only,
            ``None`` in sequential mode).

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
    if mode not in ("parallel", "sequential"):
        fail(_OP, f"mode must be 'parallel' or 'sequential', got {mode!r}")
    if init_guess not in ("f0", "zeros"):
        fail(_OP, f"init_guess must be 'f0' or 'zeros', got {init_guess!r}")
    if not isinstance(max_iters, int) or max_iters < 0:
        fail(_OP, f"max_iters must be a non-negative int, got {max_iters!r}")
    if not omega > 0:
        fail(_OP, f"omega must be > 0, got {omega}")
    if scan_backend not in BACKENDS:
        fail(_OP, f"unknown scan_backend {scan_backend!r}; choose one of {', '.join(BACKENDS)}")

    u = cell.prepare(x)
    info = None
    if mode == "sequential":
        h = sequential_apply(cell, u, initial)
    else:
        config = NewtonConfig(max_iters, float(omega), init_guess, tol, scan_backend, check_residual)
        info = NewtonInfo()
        h = parallel_apply(cell, u, initial, config, info)
    y = cell.output(h)
    final = h[:, -1] if output_final_state else None
    return (y, final, info) if return_info else (y, final)
