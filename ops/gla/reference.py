"""Token-by-token GLA (per-key log gate): the test oracle, written for clarity not speed."""

from __future__ import annotations

import torch

from seqzoo.ops.utils import default_scale, for_each_sequence


def gla_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``S ← diag(exp(g_t))·S + k_t v_tᵀ;  o_t = Sᵀ(scale·q_t)`` one token at a time.

    Args:
        q, k: ``[batch, seq, heads, key_dim]``.
        v: ``[batch, seq, heads, value_dim]``.
        g: per-key log decay ``[batch, seq, heads, key_dim]`` (``<= 0``).
        scale: query scale, ``key_dim ** -0.5`` by default.
        initial_state: ``[batch or num_seqs, heads, key_dim, value_dim]``.
        cu_seqlens: packed-sequence offsets ``[num_seqs + 1]`` (then ``batch == 1``).

    Returns:
        ``o [batch, seq, heads, value_dim]`` in ``q.dtype`` and the final state
        ``[batch or num_seqs, heads, key_dim, value_dim]`` (fp32; float64 for float64 inputs) or ``None``.
    """
    if cu_seqlens is not None:
        return for_each_sequence(gla_reference, cu_seqlens, (q, k, v, g), initial_state, output_final_state, scale=scale)
    batch, seq, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = default_scale(scale, key_dim)
    qf, kf, vf, gf = q.to(acc) * scale, k.to(acc), v.to(acc), g.to(acc)
    if initial_state is None:
        state = q.new_zeros(batch, heads, key_dim, value_dim, dtype=acc)
    else:
        state = initial_state.to(acc)
    outputs = []
    for t in range(seq):
        state = state * gf[:, t].exp()[..., None] + kf[:, t, :, :, None] * vf[:, t, :, None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", qf[:, t], state))
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(batch, 0, heads, value_dim, dtype=acc)
    return o.to(q.dtype), (state if output_final_state else None)
