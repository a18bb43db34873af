"""Gated delta rule (Gated DeltaNet): ``S ← exp(g_t)·S;  S ← S + β_t k_t (v_t − Sᵀk_t)ᵀ;  o_t = Sᵀ(scale·q_t)``.

Four implementations share one signature: ``reference`` (a token loop, the test oracle; ``auto`` runs it for
a few tokens without gradients on the CPU), ``torch`` (chunked WY/UT form, the default off CUDA), ``triton``
(chunked kernels, the default on CUDA) and ``fused`` (a step-by-step kernel, ``auto``'s choice on CUDA for
short inference calls). :func:`seqzoo.ops.delta_rule.delta_rule`
runs the same machinery without a gate.
"""

from __future__ import annotations

import torch

from seqzoo.ops.core import autocast_off, check_linear_inputs, choose_backend, fail, guard_nonfinite, needs_grad, poison_from
from seqzoo.ops.gated_delta_rule.chunk import chunk_gated_delta_rule
from seqzoo.ops.gated_delta_rule.reference import gated_delta_rule_reference
from seqzoo.ops.utils import default_scale

__all__ = ["gated_delta_rule", "run_delta_rule"]

BACKENDS = ("reference", "torch", "triton", "fused")


def run_delta_rule(
    op: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    *,
    scale: float | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    use_qk_l2norm: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate the inputs of ``op`` (``"gated_delta_rule"`` or ``"delta_rule"``) and run the chosen backend.

    ``g=None`` means no decay: every backend then skips the gate terms instead of exponentiating zeros.
    Shapes are those of :func:`gated_delta_rule`.
    """
    _, seq, _, key_dim, _, _ = check_linear_inputs(
        op, q, k, v, g=g, beta=beta, initial_state=initial_state, cu_seqlens=cu_seqlens, same_dtype=True, allow_empty=False
    )
    if scale is not None and not isinstance(scale, (int, float)):
        fail(op, f"scale must be a number, got {type(scale).__name__}")
    scale = default_scale(scale, key_dim)
    grad = needs_grad(q, k, v, beta, g, initial_state)
    impl = choose_backend(op, backend, BACKENDS, q, k, v, beta, g, initial_state, seq=seq, grad=grad, short_cpu=True)
    if impl in ("torch", "triton"):
        # Chunked forms: a NaN must not reach the positions before it through its chunk (see guard_nonfinite).
        clean, bad = guard_nonfinite({"k": k, "v": v, "beta": beta, "g": g}, cu_seqlens)
        k, v, beta, g = (clean[n] for n in ("k", "v", "beta", "g"))
    args = (q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm)
    if impl == "reference":
        return gated_delta_rule_reference(*args)
    if impl == "torch":
        return poison_from(*chunk_gated_delta_rule(*args), bad, cu_seqlens)
    from seqzoo.ops.gated_delta_rule import triton as kernels

    if key_dim > kernels.MAX_KEY_DIM:
        fail(op, f"backend={impl!r} supports key_dim <= {kernels.MAX_KEY_DIM}, got {key_dim}")
    if impl == "fused":
        return kernels.gated_delta_rule_fused(*args)
    return poison_from(*kernels.gated_delta_rule_triton(*args), bad, cu_seqlens)


@autocast_off
def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule over a sequence, per head:
    ``S ← exp(g_t)·S;  u_t = β_t·(v_t − Sᵀk_t);  S ← S + k_t u_tᵀ;  o_t = Sᵀ(scale·q_t)``.

    Args:
        q, k: ``[batch, seq, heads, key_dim]``.
        v: ``[batch, seq, heads, value_dim]`` (same dtype as ``q`` and ``k``).
        beta: ``[batch, seq, heads]`` write strengths (usually a sigmoid, in ``[0, 1]``; ``[0, 2]`` allows
            negative eigenvalues).
        g: ``[batch, seq, heads]`` natural-log decay gates, ``<= 0``.
        scale: multiplies ``q``; default ``key_dim ** -0.5``.
        initial_state: ``[num_states, heads, key_dim, value_dim]`` (key-major), ``num_states`` = batch,
            or the number of packed sequences with ``cu_seqlens``; ``None`` starts from zeros.
        output_final_state: also return the state after the last token.
        cu_seqlens: ``[num_seqs + 1]`` int offsets of sequences packed along ``seq`` (then ``batch == 1``).
        use_qk_l2norm: L2-normalise ``q`` and ``k`` over ``key_dim`` first (in fp32; ``scale`` applies after).
        backend: ``"auto"``, ``"reference"`` (token loop), ``"torch"`` (chunked WY/UT), ``"triton"`` (chunked kernels)
            or ``"fused"`` (the step-by-step Triton kernel, no gradients); see :mod:`seqzoo.ops.core.dispatch`.
    Returns:
        ``(o, final_state)``: ``o [batch, seq, heads, value_dim]`` in ``q.dtype``; ``final_state``
        ``[num_states, heads, key_dim, value_dim]`` in fp32 (float64 for float64 inputs), or ``None``.
    Raises:
        OpInputError: on mismatched shapes or devices, integer dtypes, positive or NaN gates, a bad
            ``cu_seqlens`` or state shape, or an unknown backend.
    """
    if g is None:
        fail("gated_delta_rule", "g is required (use delta_rule for the ungated rule)")
    return run_delta_rule(
        "gated_delta_rule",
        q,
        k,
        v,
        beta,
        g,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        use_qk_l2norm=use_qk_l2norm,
        backend=backend,
    )
