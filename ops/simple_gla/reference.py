"""Token-by-token simple GLA (scalar-per-head log gate): the test oracle, written for clarity not speed."""

from __future__ import annotations

import torch

from seqzoo.ops.utils import default_scale, for_each_sequence


def simple_gla_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``S ← exp(g_t)·S + k_t v_tᵀ;  o_t = Sᵀ(scale·q_t)`` one token at a time.

    Args:
        q, k: ``[batch, seq, heads, key_dim]``.
        v: ``[batch, seq, heads, value_dim]``.
        g: log decay ``[batch, seq, heads]`` (``<= 0``), or ``None`` for plain linear attention.
        scale: query scale, ``key_dim ** -0.5`` by default.
        initial_state: ``[batch or num_seqs, heads, key_dim, value_dim]``.
        cu_seqlens: packed-sequence offsets ``[num_seqs + 1]`` (then ``batch == 1``).

    Returns:
        ``o [batch, seq, heads, value_dim]`` in ``q.dtype`` and the final state
        ``[batch or num_seqs, heads, key_dim, value_dim]`` (fp32; float64 for float64 inputs) or ``None``.
    """
    if cu_seqlens is not None:
        return for_each_sequence(simple_gla_reference, cu_seqlens, (q, k, v, g), initial_state, output_final_state, scale=scale)
    batch, seq, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    # float64 inputs keep float64 so the oracle is exact enough to test float64 fast paths tightly.
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = default_scale(scale, key_dim)
    qf, kf, vf = q.to(acc) * scale, k.to(acc), v.to(acc)
    if initial_state is None:
        state = q.new_zeros(batch, heads, key_dim, value_dim, dtype=acc)
    else:
        state = initial_state.to(acc)
    outputs = []
    for t in range(seq):
        if g is not None:
            state = state * g[:, t].to(acc).exp()[:, :, None, None]
        state = state + kf[:, t, :, :, None] * vf[:, t, :, None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", qf[:, t], state))
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(batch, 0, heads, value_dim, dtype=acc)
    return o.to(q.dtype), (state if output_final_state else None)
