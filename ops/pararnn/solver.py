"""ParaRNN: apply a nonlinear recurrence ``h_t = f(h_{t-1}, u_t)`` to a whole sequence by Newton's method.

The states ``H = [h_0 … h_{T-1}]`` solve ``F_t(H) = h_t − f(h_{t-1}, u_t) = 0``. ``∂F/∂H`` is block lower
bidiagonal (identity diagonal, ``−A_t`` below), so a Newton step is the linear recurrence

    δ_t = A_t δ_{t-1} + r_t,   r_t = f(h_{t-1}, u_t) − h_t,   δ_{-1} = 0,   H ← H + ω δ,

solved by :func:`seqzoo.ops.affine_scan.affine_scan` (diagonal, 2×2 blocks) or a plain loop (dense,
prototyping). ``A_0`` only ever multiplies ``δ_{-1} = 0``, so the Jacobian at the first step is ignored.
With ``ω = 1``, after ``k`` iterations ``h_0 … h_k`` are exact (``h_0`` already is with the ``f(0, x)``
guess); ``max_iters = seq`` is always the sequential result.

Backward (implicit differentiation at the solution, nothing from the iterations is saved): with the output
gradient ``g``, ``λ_t = g_t + A_{t+1}ᵀ λ_{t+1}`` (one reverse ``affine_scan``), then one batched VJP of
``f(roll(H), u)`` with cotangent ``λ`` gives the gradients of ``u``, the initial state and the parameters.

:class:`FusedNewtonFunction` is the same solve and backward for ParaGRU/ParaLSTM with the Newton loop and the
adjoint recurrence each in one Triton kernel (:mod:`.triton_fused`); only the final VJP stays in PyTorch.
:func:`cpp_apply` is its CPU counterpart, a compiled C++ kernel (:mod:`.cpu_fused`) that also
does the VJP, so its backward runs no autograd at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from seqzoo.ops.affine_scan import adjoint_coeff, affine_scan
from seqzoo.ops.core import compute_dtype
from seqzoo.ops.pararnn.cell import RecurrentCell


@dataclass
class NewtonInfo:
    """Diagnostics of one parallel solve.

    Attributes:
        iterations: Newton updates applied.
        residuals: ``max_t,i |f(h_{t-1}, u_t) − h_t|`` of each iterate before its update (index 0 is the
            initial guess), plus the final iterate's when ``check_residual`` was asked for.
    """

    iterations: int = 0
    residuals: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class NewtonConfig:
    """Newton settings: fixed ``max_iters`` (ParaRNN uses 3), damping ``omega`` (< 1 damps), the initial
    guess ``"f0"`` (``h_t = f(0, u_t)``, all ``t`` in parallel) or ``"zeros"``, an optional early stop when
    the residual's max-norm is ``<= tol``, whether to evaluate the final residual (one extra ``step``), the
    time tile of the fused Triton kernels (``None``: their default), and the kernels: ``backend`` is the
    ``affine_scan`` backend of the Newton steps (``"torch"`` or ``"triton"``) for :func:`parallel_apply`,
    and ``"fused"`` (Triton) or ``"cpp"`` (the compiled CPU kernel) for :func:`fused_apply`."""

    max_iters: int = 3
    omega: float = 1.0
    init_guess: str = "f0"
    tol: float | None = None
    backend: str = "torch"
    check_residual: bool = False
    chunk_size: int | None = None


def shift_states(h: torch.Tensor, initial: torch.Tensor | None) -> torch.Tensor:
    """``h_prev``: ``[initial (or 0), h_0, …, h_{T-2}]`` from ``h [batch, seq, S]`` and ``initial [batch, S]``."""
    first = torch.zeros_like(h[:, :1]) if initial is None else initial.unsqueeze(1).to(h.dtype)
    return torch.cat([first, h[:, :-1]], dim=1)


def _to_pairs(x: torch.Tensor) -> torch.Tensor:
    # [.., 2N] = [p; q] halves → [.., N, 2] channel pairs, the layout of affine_scan's 2×2 blocks.
    return x.unflatten(-1, (2, x.shape[-1] // 2)).transpose(-1, -2)


def _from_pairs(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2).flatten(-2)


def _dense_scan(a: torch.Tensor, b: torch.Tensor, reverse: bool) -> torch.Tensor:
    """Loop ``h_t = a_t h_{t∓1} + b_t`` for dense ``a [batch, seq, S, S]`` (prototyping cells only)."""
    out = torch.empty_like(b)
    h = torch.zeros_like(b[:, 0])
    for t in range(b.shape[1] - 1, -1, -1) if reverse else range(b.shape[1]):
        h = torch.einsum("bij,bj->bi", a[:, t], h) + b[:, t]
        out[:, t] = h
    return out


def linear_solve(structure: str, jac: torch.Tensor, rhs: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Solve ``δ_t = A_t δ_{t-1} + r_t`` with ``δ_{-1} = 0`` (``A_0`` is therefore irrelevant).

    ``jac`` in the cell's structure (``[B, T, S]``, ``[B, T, S/2, 2, 2]`` or ``[B, T, S, S]``), ``rhs [B, T, S]``.
    """
    if structure == "diagonal":
        return affine_scan(jac, rhs, backend=backend)[0]
    if structure == "block2":
        return _from_pairs(affine_scan(jac, _to_pairs(rhs), backend=backend)[0])
    return _dense_scan(jac, rhs, reverse=False)


def adjoint_solve(structure: str, jac: torch.Tensor, grad: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Solve the transposed system ``λ_t = g_t + A_{t+1}ᵀ λ_{t+1}``, ``λ_{T-1} = g_{T-1}``, by a reverse scan.

    Shapes as in :func:`linear_solve`; ``A_0`` is unused.
    """
    if structure == "diagonal":
        return affine_scan(adjoint_coeff(jac, "diag", reverse=False), grad, reverse=True, backend=backend)[0]
    if structure == "block2":
        coeff = adjoint_coeff(jac, "block2", reverse=False)
        return _from_pairs(affine_scan(coeff, _to_pairs(grad), reverse=True, backend=backend)[0])
    coeff = torch.cat([jac[:, 1:].transpose(-1, -2), torch.zeros_like(jac[:, :1])], dim=1)
    return _dense_scan(coeff, grad, reverse=True)


def expand_jacobian(structure: str, jac: torch.Tensor) -> torch.Tensor:
    """The dense ``[B, T, S, S]`` matrix of a diagonal or 2×2-block Jacobian (for checks and debugging)."""
    if structure == "dense":
        return jac
    if structure == "diagonal":
        return torch.diag_embed(jac)
    half = jac.shape[-3]
    rows = [torch.cat([torch.diag_embed(jac[..., r, s]) for s in range(2)], dim=-1) for r in range(2)]
    assert rows[0].shape[-1] == 2 * half
    return torch.cat(rows, dim=-2)


@torch.no_grad()
def newton_solve(
    cell: RecurrentCell,
    u: torch.Tensor,
    initial: torch.Tensor | None,
    config: NewtonConfig,
    info: NewtonInfo | None = None,
) -> torch.Tensor:
    """Newton iterations for the states of ``cell`` on prepared inputs ``u [batch, seq, ...]``, no autograd.

    ``initial [batch, S]`` is ``h_{-1}`` (zeros if ``None``). Returns ``H [batch, seq, S]``; fills ``info``.
    """
    batch, seq = u.shape[:2]
    size = cell.state_size
    if config.init_guess == "f0":
        # f(h_{-1}, u_0) at t = 0 and f(0, u_t) elsewhere: all independent, so one batched step.
        prev0 = u.new_zeros(batch, seq, size)
        if initial is not None:
            prev0[:, 0] = initial
        h = cell.step(prev0, u)
    else:
        h = u.new_zeros(batch, seq, size)
    residuals = []
    done = 0
    for _ in range(config.max_iters):
        f, jac = cell.step_and_jacobian(shift_states(h, initial), u)
        r = f - h
        if info is not None or config.tol is not None:  # a max-norm is a host sync: only when asked for
            residuals.append(r.abs().amax())
        if config.tol is not None and residuals[-1].item() <= config.tol:
            break
        delta = linear_solve(cell.structure, jac, r, config.backend)
        h = h + delta if config.omega == 1.0 else h + config.omega * delta
        done += 1
    if config.check_residual and info is not None:
        residuals.append((cell.step(shift_states(h, initial), u) - h).abs().amax())
    if info is not None:
        info.iterations = done
        info.residuals = [float(x) for x in residuals]
    return h


class NewtonRNNFunction(torch.autograd.Function):
    """Newton forward under ``no_grad``; backward by the adjoint recurrence and one VJP through ``step``.

    Saves only ``u``, ``initial`` and the solution ``H`` (no Jacobians, no iterates).
    """

    @staticmethod
    def forward(ctx, cell, config, info, u, initial, *params):  # type: ignore[override]
        h = newton_solve(cell, u, initial, config, info)
        ctx.save_for_backward(u, initial, h)
        ctx.cell, ctx.config = cell, config
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h):  # type: ignore[override]
        u, initial, h = ctx.saved_tensors
        # h is this Function's own output: without detach the VJP below would recurse into this backward.
        h = h.detach()
        cell, config = ctx.cell, ctx.config
        params = cell.recurrent_parameters()
        with torch.no_grad():
            jac = cell.jacobian(shift_states(h, initial), u)
            lam = adjoint_solve(cell.structure, jac, grad_h.contiguous(), config.backend)
        grads = step_vjp(cell, params, u, initial, h, lam, ctx.needs_input_grad[3], ctx.needs_input_grad[4], ctx.needs_input_grad[5:])
        return (None, None, None, *grads)


def step_vjp(
    cell: RecurrentCell,
    params: list[torch.Tensor],
    u: torch.Tensor,
    initial: torch.Tensor | None,
    h: torch.Tensor,
    lam: torch.Tensor,
    needs_u: bool,
    needs_init: bool,
    needs_params: tuple[bool, ...],
) -> tuple[torch.Tensor | None, ...]:
    """``(du, dinitial, *dparams)``: one batched VJP of ``f(roll(H), u)`` with cotangent ``λ`` (the adjoint states)."""
    with torch.enable_grad():
        u_ = u.detach().requires_grad_(needs_u)
        init_ = None if initial is None else initial.detach().requires_grad_(needs_init)
        f = cell.step(shift_states(h, init_), u_)
        wrt = [u_] if needs_u else []
        if needs_init:
            wrt.append(init_)
        wrt += [p for p, need in zip(params, needs_params) if need]
        grads = list(torch.autograd.grad(f, wrt, lam.to(f.dtype), allow_unused=True)) if wrt else []
    du = grads.pop(0) if needs_u else None
    dinit = grads.pop(0) if needs_init else None
    dparams = [grads.pop(0) if need else None for need in needs_params]
    return (du, dinit, *dparams)


def sequential_apply(cell: RecurrentCell, u: torch.Tensor, initial: torch.Tensor | None) -> torch.Tensor:
    """The plain loop ``h_t = f(h_{t-1}, u_t)`` (decoding and the reference), differentiable by autograd.

    ``u [batch, seq, ...]``, ``initial [batch, S]`` → ``H [batch, seq, S]``.
    """
    h = u.new_zeros(u.shape[0], 1, cell.state_size) if initial is None else initial.unsqueeze(1).to(u.dtype)
    out = []
    # unbind, not u[:, t]: each slice's backward would materialise a full-size zero gradient (O(T²)).
    for u_t in u.unbind(1):
        h = cell.step(h, u_t.unsqueeze(1))
        out.append(h)
    return torch.cat(out, dim=1)


def parallel_apply(
    cell: RecurrentCell,
    u: torch.Tensor,
    initial: torch.Tensor | None,
    config: NewtonConfig,
    info: NewtonInfo | None = None,
) -> torch.Tensor:
    """Newton solve with the adjoint backward: ``u [batch, seq, ...]``, ``initial [batch, S]`` → ``H [batch, seq, S]``."""
    params = cell.recurrent_parameters()
    return NewtonRNNFunction.apply(cell, config, info, u, initial, *params)


def fused_kind(cell: RecurrentCell) -> str | None:
    """``"gru"`` / ``"lstm"`` when the fused Triton kernels implement ``cell``'s math exactly, else ``None``.

    A subclass that overrides the step (or the gate evaluation it is built on) gets ``None``.
    """
    from seqzoo.ops.pararnn.cells import ParaGRU, ParaLSTM

    kind_type = type(cell)
    if isinstance(cell, ParaGRU) and all(getattr(kind_type, m) is getattr(ParaGRU, m) for m in ("step", "_gates")):
        return "gru"
    if isinstance(cell, ParaLSTM) and all(getattr(kind_type, m) is getattr(ParaLSTM, m) for m in ("step", "_forward")):
        return "lstm"
    return None


def _bounded_vectors(cell: RecurrentCell, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused kernels' cell vectors, differentiable: bounded recurrent ``[3, N]`` and, for the LSTM,
    bounded peephole ``[2, N]`` (``None`` for the GRU)."""
    from seqzoo.ops.pararnn.cells import bounded

    rec = bounded(cell.recurrent, cell.recurrent_bound)
    return rec, bounded(cell.peephole, cell.recurrent_bound) if kind == "lstm" else None


def _fused_vectors(cell: RecurrentCell, kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`_bounded_vectors` as contiguous constants in ``dtype`` (the Triton kernels' inputs)."""
    with torch.no_grad():
        rec, peep = _bounded_vectors(cell, kind)
        return rec.to(dtype).contiguous(), None if peep is None else peep.to(dtype).contiguous()


class FusedNewtonFunction(torch.autograd.Function):
    """:class:`NewtonRNNFunction` with the Newton loop and the adjoint recurrence in fused Triton kernels.

    Forward: one launch runs the initial guess and all ``max_iters`` iterations (Jacobians built in
    registers); backward: one launch for ``λ``, then the same batched VJP through ``cell.step``. Computes in
    fp32 (fp64 for fp64 inputs); saves only ``u``, ``initial`` and ``H``. The two launches are the
    ``torch.library`` ops ``seqzoo::pararnn_fused_fwd`` and ``seqzoo::pararnn_fused_adjoint``; the autograd
    stays in this Function because its backward differentiates the cell module's ``step``, which an op
    cannot take as an argument.
    """

    @staticmethod
    def forward(ctx, cell, config, kind, u, initial, *params):  # type: ignore[override]
        from seqzoo.ops.pararnn.triton_fused import pararnn_fused

        compute = compute_dtype(u)
        rec, peep = _fused_vectors(cell, kind, compute)
        init = None if initial is None else initial.to(compute)
        zero_guess = config.init_guess == "zeros"
        h = pararnn_fused(kind, u.to(compute), rec, peep, init, config.max_iters, config.omega, zero_guess, config.chunk_size)
        ctx.save_for_backward(u, initial, h)
        ctx.cell, ctx.config, ctx.kind = cell, config, kind
        return h.to(u.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h):  # type: ignore[override]
        from seqzoo.ops.pararnn.triton_fused import pararnn_fused_adjoint

        u, initial, h = ctx.saved_tensors
        h = h.detach()
        cell, kind = ctx.cell, ctx.kind
        rec, peep = _fused_vectors(cell, kind, h.dtype)
        with torch.no_grad():
            lam = pararnn_fused_adjoint(kind, u.to(h.dtype), rec, peep, h, grad_h, ctx.config.chunk_size)
        needs = ctx.needs_input_grad
        params = cell.recurrent_parameters()
        grads = step_vjp(cell, params, u, initial, h, lam, needs[3], needs[4], needs[5:])
        return (None, None, None, *grads)


def cpp_apply(
    kind: str, config: NewtonConfig, u: torch.Tensor, rec: torch.Tensor, peep: torch.Tensor | None, initial: torch.Tensor | None
) -> torch.Tensor:
    """The fused solve on CPU tensors through the compiled kernel of :mod:`.cpu_fused` (the op ``seqzoo::pararnn_newton_cpu``).

    Forward: the initial guess and all ``max_iters`` Newton iterations in one pass over time. Backward: one
    reverse pass gives ``λ`` and the VJP of ``step`` with it (``du``, the gradients of the bounded recurrent
    and peephole vectors, of ``initial``). It takes the *bounded* vectors as inputs, so autograd carries their
    gradients on to the raw parameters. Computes in fp32 (fp64 for fp64 inputs): the casts around the op
    are ordinary differentiable ones.
    """
    from seqzoo.ops.pararnn.cpu_fused import newton_cpu

    compute = compute_dtype(u)

    def prep(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(compute).contiguous()

    h = newton_cpu(kind, prep(u), prep(rec), prep(peep), prep(initial), config.max_iters, float(config.omega), config.init_guess == "zeros")
    return h.to(u.dtype)


def fused_apply(
    cell: RecurrentCell,
    u: torch.Tensor,
    initial: torch.Tensor | None,
    config: NewtonConfig,
    info: NewtonInfo | None = None,
) -> torch.Tensor:
    """:func:`parallel_apply` through the fused kernels (ParaGRU and ParaLSTM only, see :func:`fused_kind`):
    Triton (``config.backend == "fused"``) or the compiled CPU kernel (``"cpp"``).

    Runs exactly ``config.max_iters`` iterations (no ``tol``); ``info.residuals`` holds only the final
    residual, and only with ``config.check_residual``.
    """
    kind = fused_kind(cell)
    if kind is None:
        raise ValueError(f"no fused kernel for {type(cell).__name__}")
    if config.backend == "fused":
        h = FusedNewtonFunction.apply(cell, config, kind, u, initial, *cell.recurrent_parameters())
    else:
        h = cpp_apply(kind, config, u, *_bounded_vectors(cell, kind), initial)
    if info is not None:
        info.iterations = config.max_iters
        info.residuals = []
        if config.check_residual:
            with torch.no_grad():
                compute = compute_dtype(u)
                init = None if initial is None else initial.to(compute)
                hc = h.to(compute)
                info.residuals = [float((cell.step(shift_states(hc, init), u.to(compute)) - hc).abs().amax())]
    return h
