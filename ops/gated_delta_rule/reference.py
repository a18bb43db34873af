"""Token-by-token (gated) delta rule: the test oracle, written for clarity rather than speed.

Per head, with state ``S [key_dim, value_dim]``:
``S ← exp(g_t)·S;  u_t = β_t·(v_t − Sᵀk_t);  S ← S + k_t u_tᵀ;  o_t = Sᵀ(scale·q_t)``.
"""

from __future__ import annotations

import torch

from seqzoo.ops.core import compute_dtype
from seqzoo.ops.utils import for_each_sequence, l2norm


def gated_delta_rule_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the recurrence one token at a time.

    Args:
        q, k: ``[batch, seq, heads, key_dim]``; v: ``[batch, seq, heads, value_dim]``.
        beta: ``[batch, seq, heads]`` write strengths; g: ``[batch, seq, heads]`` log decay, or ``None`` (no decay).
        scale: multiplies ``q`` (after the optional L2 norm).
        initial_state: ``[num_states, heads, key_dim, value_dim]`` or ``None`` (zeros).
        cu_seqlens: ``[num_seqs + 1]`` offsets of packed sequences (batch 1), or ``None``.
    Returns:
        ``o [batch, seq, heads, value_dim]`` in ``q.dtype`` and the final state
        ``[num_states, heads, key_dim, value_dim]`` (fp32, float64 for float64 inputs) or ``None``.
    """
    if cu_seqlens is not None:
        return for_each_sequence(
            gated_delta_rule_reference,
            cu_seqlens,
            [q, k, v, beta, g],
            initial_state,
            output_final_state,
            scale=scale,
            use_qk_l2norm=use_qk_l2norm,
        )
    dt = compute_dtype(q, k, v, beta, g, initial_state)
    batch, seq, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    qf, kf, vf, bf = (t.to(dt) for t in (q, k, v, beta))
    if use_qk_l2norm:
        qf, kf = l2norm(qf), l2norm(kf)
    qf = qf * scale
    if initial_state is None:
        state = q.new_zeros(batch, heads, key_dim, value_dim, dtype=dt)
    else:
        state = initial_state.to(dt)
    outputs = []
    for t in range(seq):
        if g is not None:
            state = state * g[:, t].to(dt).exp()[..., None, None]
        k_t = kf[:, t]
        u_t = bf[:, t, :, None] * (vf[:, t] - (k_t[..., None, :] @ state).squeeze(-2))
        state = state + k_t[..., :, None] * u_t[..., None, :]
        outputs.append((qf[:, t, :, None, :] @ state).squeeze(-2))
    o = torch.stack(outputs, dim=1) if outputs else vf.new_zeros(batch, 0, heads, value_dim)
    return o.to(q.dtype), (state if output_final_state else None)
