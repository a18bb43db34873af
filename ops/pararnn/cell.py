"""The cell protocol of the ParaRNN solver: a recurrence ``h_t = f(h_{t-1}, u_t)`` evaluated for all ``t`` at once.

A cell is an ``nn.Module`` that declares the structure of its Jacobian ``A_t = ∂f(h_{t-1}, u_t)/∂h_{t-1}``:

- ``"diagonal"``: ``A_t`` is diagonal, returned as ``[batch, seq, state]``;
- ``"block2"``: the state ``[batch, seq, 2·N]`` is two halves ``[p; q]`` and ``A_t`` couples only channel
  ``j`` of each half, returned as per-channel blocks ``[batch, seq, N, 2, 2]`` with
  ``J[..., j, r, s] = ∂h[r·N + j] / ∂h_prev[s·N + j]`` (ParaLSTM's ``[c; h]``);
- ``"dense"``: any ``f``; ``[batch, seq, state, state]`` built with autograd. O(state³) per step in the
  solve, for prototyping new cells only.

To write a new cell, subclass :class:`RecurrentCell`, set ``structure`` and ``state_size`` and implement
:meth:`RecurrentCell.step`; the Jacobian defaults to autograd (a few VJPs for diagonal/2×2 structure,
exact because the structure is declared), and an analytic :meth:`RecurrentCell.jacobian` may replace it.
Everything else (Newton solve, adjoint backward, sequential mode) comes from :mod:`.solver`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

STRUCTURES = ("diagonal", "block2", "dense")


class RecurrentCell(nn.Module):
    """Base class of cells solved by :func:`seqzoo.ops.pararnn.pararnn`.

    Attributes:
        structure: ``"diagonal" | "block2" | "dense"``, the declared Jacobian structure.
        state_size: the state width ``S`` (``2·N`` for ``"block2"``).
    """

    structure: ClassVar[str] = "dense"
    state_size: int

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The part of the cell that does not depend on the state (e.g. the input projection), run once.

        ``x [batch, seq, input] → u [batch, seq, ...]``, differentiated by plain autograd outside the
        Newton solve. Default: ``x`` itself.
        """
        return x

    def step(self, h_prev: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``f(h_{t-1}, u_t)`` for every ``t`` at once: ``h_prev [batch, seq, S]``, ``u [batch, seq, ...]`` → ``[batch, seq, S]``."""
        raise NotImplementedError

    def jacobian(self, h_prev: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``∂f(h_{t-1}, u_t)/∂h_{t-1}`` in the declared structure (see the module docstring), by autograd.

        Called without gradient tracking; override with the analytic form for speed.
        """
        return autograd_jacobian(self.step, self.structure, h_prev, u)

    def step_and_jacobian(self, h_prev: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both ``f`` and its Jacobian at the same point; override to share the gate computations."""
        return self.step(h_prev, u), self.jacobian(h_prev, u)

    def output(self, h: torch.Tensor) -> torch.Tensor:
        """Map the state ``[batch, seq, S]`` to the cell output (ParaLSTM keeps ``h`` and drops ``c``). Default: the state."""
        return h

    def recurrent_parameters(self) -> list[torch.Tensor]:
        """The parameters :meth:`step` reads (they receive gradients from the adjoint VJP). Default: all."""
        return [p for p in self.parameters()]


def autograd_jacobian(
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], structure: str, h_prev: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """Jacobian of ``step`` w.r.t. ``h_prev`` in ``structure``, with the fewest VJPs the structure allows.

    - diagonal: one VJP with a ones cotangent (column sums of a diagonal matrix are its diagonal);
    - block2: two VJPs, ones on one half of the output each (gives row ``r`` of every 2×2 block);
    - dense: ``S`` VJPs, vmapped.

    ``h_prev [batch, seq, S]``; returns ``[batch, seq, S]``, ``[batch, seq, S/2, 2, 2]`` or ``[batch, seq, S, S]``.
    """
    h_prev = h_prev.detach()
    u = u.detach()
    # torch.func transforms differentiate even inside the solver's torch.no_grad().
    out, vjp = torch.func.vjp(lambda h: step(h, u), h_prev)
    size = out.shape[-1]
    if structure == "diagonal":
        return vjp(torch.ones_like(out))[0]
    if structure == "block2":
        half = size // 2
        rows = []
        for r in range(2):
            v = torch.zeros_like(out)
            v[..., r * half : (r + 1) * half] = 1.0
            g = vjp(v)[0]
            rows.append(torch.stack([g[..., :half], g[..., half:]], dim=-1))  # [.., N, 2] over s
        return torch.stack(rows, dim=-2)  # [.., N, r, s]
    eye = torch.eye(size, dtype=out.dtype, device=out.device)
    cot = eye.view(size, *([1] * (out.dim() - 1)), size).expand(size, *out.shape)
    rows = torch.func.vmap(vjp)(cot)[0]  # [S_out, batch, seq, S_in]
    return rows.movedim(0, -2)
