"""Simple GLA: linear attention with a scalar-per-head log decay (RetNet, Mamba-2/SSD, plain linear attention).

Per head: ``S ← exp(g_t)·S + k_t v_tᵀ;  o_t = Sᵀ(scale·q_t)``, with a key-major fp32 state ``[K, V]``.
Backends: ``reference`` (token loop, the oracle), ``torch`` (chunked, default off CUDA) and ``triton``
(chunked kernels, default on CUDA; a fused step-by-step kernel for short inference calls).
"""

from __future__ import annotations

import torch

from seqzoo.ops.simple_gla.chunk import simple_gla_chunk
from seqzoo.ops.simple_gla.reference import simple_gla_reference
from seqzoo.ops.utils import (
    check_cu_seqlens,
    check_log_gate,
    check_qkv,
    check_shape,
    check_state,
    fail,
    resolve_backend,
)

__all__ = ["simple_gla", "simple_gla_chunk", "simple_gla_reference"]

# The fused recurrent kernel wins for decoding and short prompts, where a chunk would be mostly padding.
RECURRENT_MAX_SEQ = 64


def simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention with a scalar log decay per head and step.

    Args:
        q, k: ``[batch, seq, heads, key_dim]``.
        v: ``[batch, seq, heads, value_dim]``.
        g: log decay ``[batch, seq, heads]``, ``<= 0``; ``None`` means no decay (causal linear attention).
        scale: multiplies ``q``; ``key_dim ** -0.5`` by default.
        initial_state: ``[batch, heads, key_dim, value_dim]``, or ``[num_seqs, ...]`` with ``cu_seqlens``.
        output_final_state: also return the state after the last token.
        cu_seqlens: ``[num_seqs + 1]`` int offsets of sequences packed along ``seq`` (needs ``batch == 1``).
        backend: ``"auto"`` (Triton on CUDA, else torch), ``"reference"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``(o, final_state)``: ``o [batch, seq, heads, value_dim]`` in ``q.dtype``; ``final_state``
        ``[batch or num_seqs, heads, key_dim, value_dim]`` in fp32 (float64 for float64 inputs), or ``None``.

    Raises:
        OpInputError: on mismatched shapes or devices, non-float inputs, positive gates, bad
        ``cu_seqlens`` or a wrongly shaped initial state.
    """
    op = "simple_gla"
    batch, seq, heads, key_dim, value_dim = check_qkv(op, q, k, v)
    if g is not None:
        check_log_gate(op, "g", g)
        check_shape(op, "g", g, (batch, seq, heads))
        if g.device != q.device:
            fail(op, f"g is on {g.device}, q on {q.device}")
    num_seqs = check_cu_seqlens(op, cu_seqlens, batch, seq)
    check_state(op, "initial_state", initial_state, (num_seqs, heads, key_dim, value_dim))
    if initial_state is not None and initial_state.device != q.device:
        fail(op, f"initial_state is on {initial_state.device}, q on {q.device}")
    backend = resolve_backend(op, backend, q, k, v, g, initial_state)
    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    if backend == "reference":
        return simple_gla_reference(q, k, v, g, **kwargs)
    if backend == "torch":
        return simple_gla_chunk(q, k, v, g, **kwargs)
    from seqzoo.ops.simple_gla.triton import simple_gla_triton, simple_gla_triton_recurrent

    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, g, initial_state))
    if seq <= RECURRENT_MAX_SEQ and not needs_grad:
        return simple_gla_triton_recurrent(q, k, v, g, **kwargs)
    return simple_gla_triton(q, k, v, g, **kwargs)
