"""Delta rule (DeltaNet): ``S ← S + β_t k_t (v_t − Sᵀk_t)ᵀ;  o_t = Sᵀ(scale·q_t)``.

The gated delta rule with no decay. It runs the gated machinery of :mod:`seqzoo.ops.gated_delta_rule`
with ``g=None``, which skips every gate term rather than exponentiating a tensor of zeros.
"""

from __future__ import annotations

import torch

from seqzoo.ops.core import autocast_off
from seqzoo.ops.gated_delta_rule import BACKENDS, run_delta_rule

__all__ = ["BACKENDS", "delta_rule"]


@autocast_off
def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Delta rule over a sequence, per head: ``u_t = β_t·(v_t − Sᵀk_t);  S ← S + k_t u_tᵀ;  o_t = Sᵀ(scale·q_t)``.

    Args:
        q, k: ``[batch, seq, heads, key_dim]``.
        v: ``[batch, seq, heads, value_dim]`` (same dtype as ``q`` and ``k``).
        beta: ``[batch, seq, heads]`` write strengths.
        scale: multiplies ``q``; default ``key_dim ** -0.5``.
        initial_state: ``[num_states, heads, key_dim, value_dim]`` (key-major), ``num_states`` = batch,
            or the number of packed sequences with ``cu_seqlens``; ``None`` starts from zeros.
        output_final_state: also return the state after the last token.
        cu_seqlens: ``[num_seqs + 1]`` int offsets of sequences packed along ``seq`` (then ``batch == 1``).
        use_qk_l2norm: L2-normalise ``q`` and ``k`` over ``key_dim`` first (``scale`` applies after).
        backend: ``"auto"``, ``"reference"``, ``"torch"`` or ``"triton"``.
    Returns:
        ``(o, final_state)``: ``o [batch, seq, heads, value_dim]`` in ``q.dtype``; ``final_state``
        ``[num_states, heads, key_dim, value_dim]`` in fp32 (float64 for float64 inputs), or ``None``.
    Raises:
        OpInputError: on mismatched shapes or devices, integer dtypes, a bad ``cu_seqlens`` or state
            shape, or an unknown backend.
    """
    return run_delta_rule(
        "delta_rule",
        q,
        k,
        v,
        beta,
        None,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        use_qk_l2norm=use_qk_l2norm,
        backend=backend,
    )
