"""Token-by-token oracle for the Titans neural memory: clarity over speed, used only by tests and benchmarks.

Each token's inner gradient is taken *with autograd* at the weights the token's chunk started from
(``create_graph=True``, so outer gradients flow through it), then the momentum/forget recurrence is run
one token at a time and the query is read with the freshly updated weights (retrieve after update).
Nothing here uses the closed forms of the chunked implementation, which is what makes it an oracle.
"""

from __future__ import annotations

import torch

from seqzoo.ops.neural_memory.memory import (
    LinearMemoryState,
    MLPMemoryState,
    MLPSpec,
    mlp_apply,
)


def _memory_apply(x: torch.Tensor, weights: tuple[torch.Tensor, ...], mlp: MLPSpec | None) -> torch.Tensor:
    """Memory forward for one token of every sequence and head: ``x [B, H, key_dim] -> [B, H, value_dim]``."""
    if mlp is None:
        return torch.einsum("bhk,bhkv->bhv", x, weights[0])
    return mlp_apply(x.unsqueeze(-2), weights[0], weights[1], mlp).squeeze(-2)


def neural_memory_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    momentum: torch.Tensor,
    decay: torch.Tensor,
    chunk_size: int,
    state: LinearMemoryState | MLPMemoryState,
    mlp: MLPSpec | None = None,
    retrieval: str = "token",
    phase: int = 0,
    chunk_base: tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, LinearMemoryState | MLPMemoryState]:
    """Primal per-token loop with chunk-start gradients.

    Args:
        q, k: ``[batch, seq, heads, key_dim]``; v: ``[batch, seq, heads, value_dim]``.
        lr, momentum, decay: ``[batch, seq, heads]`` gates θ, η, α (already validated, no ``None``).
        chunk_size: gradients of every token of a chunk are taken at the chunk-start weights.
        state: the initial state (fp32 or fp64), a full ``LinearMemoryState`` or ``MLPMemoryState``.
        mlp: the deep-memory description, ``None`` for the linear memory.
        retrieval: ``"token"`` reads each query with the weights just updated by its token; ``"chunk"``
            with the chunk-start weights, except a chunk's last token, which sees its whole chunk.
        phase: tokens of the first token's chunk that came before this call (0: the call starts a chunk).
        chunk_base: with ``phase > 0``, the weights at that chunk's start (the gradient base of its tokens).

    Returns:
        ``(o [batch, seq, heads, value_dim] in the state's dtype, final state of the same kind)``.
    """
    batch, seq, heads, _ = q.shape
    dtype = state[0].dtype
    n_w = len(state) // 2
    weights = tuple(state[:n_w])
    moms = tuple(state[n_w:])
    outputs = []
    tracked = [q, k, v, lr, momentum, decay, *state]
    if mlp is not None:
        tracked += [mlp.ln_weight, mlp.ln_bias]
    # Outer gradients are wanted only when autograd records this call; otherwise the inner gradients
    # are taken without a graph of their own and the results are detached.
    outer = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tracked)
    # The inner gradient must be computable even under torch.no_grad (inference): it is the update.
    with torch.enable_grad():
        base: tuple[torch.Tensor, ...] = weights if chunk_base is None else tuple(w.detach().requires_grad_() for w in chunk_base)
        for t in range(seq):
            if (t + phase) % chunk_size == 0:
                # Constant bases (no grad) still need requires_grad to take the inner gradient. Without an outer
                # graph every base is detached: a view taken under no_grad of a parameter says requires_grad but
                # is not connected to any graph, so differentiating it would fail.
                base = tuple(w if outer and w.requires_grad else w.detach().requires_grad_() for w in weights)
            k_t = k[:, t].to(dtype)
            v_t = v[:, t].to(dtype)
            q_t = q[:, t].to(dtype)
            theta = lr[:, t].to(dtype)[..., None, None]
            eta = momentum[:, t].to(dtype)[..., None, None]
            retain = 1 - decay[:, t].to(dtype)[..., None, None]
            # ½‖M(k) − v‖², summed over batch and heads: each (batch, head) owns its weights, so the
            # gradient of the sum with respect to them is each pair's own gradient.
            loss = 0.5 * (_memory_apply(k_t, base, mlp) - v_t).pow(2).sum()
            grads = torch.autograd.grad(loss, base, create_graph=outer)
            moms = tuple(eta * s - theta * g for s, g in zip(moms, grads))
            weights = tuple(retain * w + s for w, s in zip(weights, moms))
            chunk_ends = (t + phase + 1) % chunk_size == 0
            outputs.append(_memory_apply(q_t, weights if retrieval == "token" or chunk_ends else base, mlp))
    o = torch.stack(outputs, dim=1) if outputs else q.new_zeros(batch, 0, heads, v.shape[-1], dtype=dtype)
    final = type(state)(*weights, *moms)
    if not outer:
        o, final = o.detach(), type(state)(*(t.detach() for t in final))
    return o, final
