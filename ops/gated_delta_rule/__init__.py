"""Gated delta rule (Gated DeltaNet): ``S ← exp(g_t)·S;  S ← S + β_t k_t (v_t − Sᵀk_t)ᵀ;  o_t = Sᵀ(scale·q_t)``.

Three implementations share one signature: ``reference`` (a token loop, the test oracle), ``torch``
(chunked WY/UT form, the default off CUDA) and ``triton`` (chunked kernels for training, a fused
recurrent kernel for short inference calls; the default on CUDA). :func:`seqzoo.ops.delta_rule.delta_rule`
runs the same machinery without a gate.
"""

from __future__ import annotations

import torch

from seqzoo.ops.gated_delta_rule.chunk import chunk_gated_delta_rule
from seqzoo.ops.gated_delta_rule.reference import gated_delta_rule_reference
from seqzoo.ops.utils import (
    check_cu_seqlens,
    check_float,
    check_log_gate,
    check_qkv,
    check_shape,
    check_state,
    default_scale,
    fail,
    resolve_backend,
)

__all__ = ["gated_delta_rule", "run_delta_rule"]

# The fused recurrent kernel beats the chunked pipeline for decode-sized calls without autograd.
RECURRENT_MAX_SEQ = 64


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
    batch, seq, heads, key_dim, value_dim = check_qkv(op, q, k, v)
    if not (q.dtype == k.dtype == v.dtype):
        fail(op, f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_float(op, "beta", beta)
    check_shape(op, "beta", beta, (batch, seq, heads))
    if g is not None:
        check_float(op, "g", g)
        check_shape(op, "g", g, (batch, seq, heads))
        check_log_gate(op, "g", g)
    for name, t in (("beta", beta), ("g", g), ("initial_state", initial_state), ("cu_seqlens", cu_seqlens)):
        if t is not None and t.device != q.device:
            fail(op, f"{name} is on {t.device} but q is on {q.device}")
    if seq == 0:
        fail(op, "seq must be at least 1")
    num_states = check_cu_seqlens(op, cu_seqlens, batch, seq)
    check_state(op, "initial_state", initial_state, (num_states, heads, key_dim, value_dim))
    if scale is not None and not isinstance(scale, (int, float)):
        fail(op, f"scale must be a number, got {type(scale).__name__}")
    scale = default_scale(scale, key_dim)
    backend = resolve_backend(op, backend, q, k, v, beta, g, initial_state)

    args = (q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm)
    if backend == "reference":
        return gated_delta_rule_reference(*args)
    if backend == "torch":
        return chunk_gated_delta_rule(*args)
    from seqzoo.ops.gated_delta_rule import triton as triton_impl

    if key_dim > triton_impl.MAX_KEY_DIM:
        fail(op, f"backend='triton' supports key_dim <= {triton_impl.MAX_KEY_DIM}, got {key_dim}")
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, beta, g, initial_state))
    if seq <= RECURRENT_MAX_SEQ and not needs_grad:
        return triton_impl.fused_recurrent_gated_delta_rule(*args)
    return triton_impl.chunk_gated_delta_rule_triton(*args)


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
        backend: ``"auto"`` (Triton on CUDA, chunked PyTorch elsewhere), ``"reference"``, ``"torch"``, ``"triton"``.
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
