"""Simple GLA: linear attention with a scalar-per-head log decay (RetNet, Mamba-2/SSD, plain linear attention).

Per head: ``S ← exp(g_t)·S + k_t v_tᵀ;  o_t = Sᵀ(scale·q_t)``, with a key-major fp32 state ``[K, V]``.
Backends: ``reference`` (token loop, the oracle; ``auto`` runs it for a few tokens without gradients on the
CPU), ``torch`` (chunked, default off CUDA), ``triton`` (chunked kernels, default on CUDA) and ``fused``
(a step-by-step Triton kernel, ``auto``'s choice on CUDA for short inference calls).
"""

from __future__ import annotations

import torch

from seqzoo.ops.core import autocast_off, check_linear_inputs, choose_backend, guard_nonfinite, needs_grad, poison_from
from seqzoo.ops.simple_gla.chunk import simple_gla_chunk
from seqzoo.ops.simple_gla.reference import simple_gla_reference

__all__ = ["simple_gla", "simple_gla_chunk", "simple_gla_reference"]

BACKENDS = ("reference", "torch", "triton", "fused")


@autocast_off
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
        backend: ``"auto"``, ``"reference"`` (token loop), ``"torch"`` (chunked), ``"triton"`` (chunked kernels) or
            ``"fused"`` (the step-by-step Triton kernel, no gradients); see :mod:`seqzoo.ops.core.dispatch`.

    Returns:
        ``(o, final_state)``: ``o [batch, seq, heads, value_dim]`` in ``q.dtype``; ``final_state``
        ``[batch or num_seqs, heads, key_dim, value_dim]`` in fp32 (float64 for float64 inputs), or ``None``.

    Raises:
        OpInputError: on mismatched shapes or devices, non-float inputs, positive gates, bad
        ``cu_seqlens`` or a wrongly shaped initial state.
    """
    op = "simple_gla"
    seq = check_linear_inputs(op, q, k, v, g=g, initial_state=initial_state, cu_seqlens=cu_seqlens)[1]
    grad = needs_grad(q, k, v, g, initial_state)
    impl = choose_backend(op, backend, BACKENDS, q, k, v, g, initial_state, seq=seq, grad=grad, short_cpu=True)
    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    if impl == "reference":
        return simple_gla_reference(q, k, v, g, **kwargs)
    if impl in ("torch", "triton"):
        # Chunked forms: a NaN must not reach the positions before it through its chunk (see guard_nonfinite).
        clean, bad = guard_nonfinite({"k": k, "v": v, "g": g}, cu_seqlens)
        k, v, g = clean["k"], clean["v"], clean["g"]
    if impl == "torch":
        return poison_from(*simple_gla_chunk(q, k, v, g, **kwargs), bad, cu_seqlens)
    from seqzoo.ops.simple_gla.triton import simple_gla_fused, simple_gla_triton

    if impl == "fused":
        return simple_gla_fused(q, k, v, g, **kwargs)
    return poison_from(*simple_gla_triton(q, k, v, g, **kwargs), bad, cu_seqlens)
