"""Token-by-token loop for ``affine_scan``: the test oracle, written for clarity, not speed.

Internal layout (the public wrapper flattens extra channel dims into one ``C``):

- ``"diag"``:   ``a, b: [batch, seq, C]``,             ``h0: [batch, C]``
- ``"block2"``: ``a: [batch, seq, C, 2, 2]``, ``b: [batch, seq, C, 2]``, ``h0: [batch, C, 2]``
"""

from __future__ import annotations

import torch


def apply_coeff(structure: str, a: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``a ⊙ h`` (``"diag"``) or the per-channel matrix-vector product ``A h`` (``"block2"``).

    Shapes: ``a [..., C]`` / ``[..., C, 2, 2]``, ``h [..., C]`` / ``[..., C, 2]``; returns ``h``'s shape.
    """
    if structure == "diag":
        return a * h
    return (a * h.unsqueeze(-2)).sum(-1)


def affine_scan_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    h0: torch.Tensor | None,
    structure: str,
    reverse: bool = False,
) -> torch.Tensor:
    """Loop ``h_t = a_t h_{t-1} + b_t`` (or ``h_t = a_t h_{t+1} + b_t`` when ``reverse``).

    ``h0`` is the state before the first step taken (``h_{-1}`` forward, ``h_T`` reversed); ``None``
    means zeros. Computes in ``b``'s dtype; differentiable by plain autograd. Returns ``h`` shaped like ``b``.
    """
    seq = b.shape[1]
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0
    out = [None] * seq
    order = range(seq - 1, -1, -1) if reverse else range(seq)
    for t in order:
        h = apply_coeff(structure, a[:, t], h) + b[:, t]
        out[t] = h
    return torch.stack(out, dim=1)
