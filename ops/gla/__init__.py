"""GLA: gated linear attention with a per-key log decay (GLA, HGRN-2 run on it).

Per head: ``S ← diag(exp(g_t))·S + k_t v_tᵀ;  o_t = Sᵀ(scale·q_t)``, with a key-major fp32 state ``[K, V]``.
Backends: ``reference`` (token loop, the oracle; ``auto`` runs it for a few tokens without gradients on the
CPU), ``torch`` (chunked with secondary chunking, default off CUDA), ``triton`` (chunked kernels, default on
CUDA) and ``fused`` (a step-by-step Triton kernel, ``auto``'s choice on CUDA for short inference calls).
"""

from __future__ import annotations

import torch

from seqzoo.ops.core import autocast_off, check_linear_inputs, choose_backend, fail, guard_nonfinite, needs_grad, poison_from
from seqzoo.ops.gla.chunk import gla_chunk
from seqzoo.ops.gla.reference import gla_reference

__all__ = ["gla", "gla_chunk", "gla_reference"]

BACKENDS = ("reference", "torch", "triton", "fused")


@autocast_off
def gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention with a per-key log decay.

    Args:
        q, k: ``[batch, seq, heads, key_dim]``.
        v: ``[batch, seq, heads, value_dim]``.
        g: per-key log decay ``[batch, seq, heads, key_dim]``, ``<= 0``.
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
    op = "gla"
    if g is None:
        fail(op, "g is required (use simple_gla for no gate)")
    seq = check_linear_inputs(op, q, k, v, g=g, per_key_gate=True, initial_state=initial_state, cu_seqlens=cu_seqlens)[1]
    grad = needs_grad(q, k, v, g, initial_state)
    impl = choose_backend(op, backend, BACKENDS, q, k, v, g, initial_state, seq=seq, grad=grad, short_cpu=True)
    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    if impl == "reference":
        return gla_reference(q, k, v, g, **kwargs)
    if impl in ("torch", "triton"):
        # Chunked forms: a NaN must not reach the positions before it through its chunk (see guard_nonfinite).
        clean, bad = guard_nonfinite({"k": k, "v": v, "g": g}, cu_seqlens)
        k, v, g = clean["k"], clean["v"], clean["g"]
    if impl == "torch":
        return poison_from(*gla_chunk(q, k, v, g, **kwargs), bad, cu_seqlens)
    from seqzoo.ops.gla.triton import gla_fused, gla_triton

    if impl == "fused":
        return gla_fused(q, k, v, g, **kwargs)
    return poison_from(*gla_triton(q, k, v, g, **kwargs), bad, cu_seqlens)
