"""Titans neural long-term memory (Behrouz et al., 2024) as a sequence op: ``neural_memory``.

Per (sequence, head) the memory ``M`` (linear ``k ↦ kW``, or a 2-layer MLP) is trained online on the
keys and values by gradient descent with momentum and forgetting, and read with the queries:

    u_t = ∇_W ½‖M(k_t; W') − v_t‖²        W' = the weights at the start of token t's chunk
    S_t = η_t S_{t−1} − θ_t u_t            (momentum, "past surprise")
    W_t = (1 − α_t) W_{t−1} + S_t          (forgetting)
    o_t = M(q_t; W_t)                      (read after the update, inclusive)

Chunks are counted from the start of each call, and ``chunk_size`` is part of the model, not a speed
knob: ``chunk_size=1`` is the exact online recurrence, larger chunks take every gradient of a chunk at
the chunk-start weights (Titans' and TTT's mini-batch form), and outputs differ between chunk sizes.

Streaming contract (for layers that prefill, then decode): splitting a sequence at a multiple of
``chunk_size`` and passing ``output_final_state`` of the first call as ``initial_state`` of the second
gives exactly the one-call result. A split in mid-chunk does not, because the second call would start a
new chunk. To continue a partial chunk, keep the state of the last chunk boundary plus the pending
tokens (fewer than ``chunk_size``) and call again from that boundary with the pending tokens prepended
(discarding their repeated outputs); commit the new boundary state only when a chunk completes.
"""

from __future__ import annotations

import torch

from seqzoo.ops.core import (
    ChunkLayout,
    autocast_off,
    check_choice,
    check_cu_seqlens,
    check_finite,
    check_float,
    check_positive_int,
    check_qkv,
    check_range,
    check_shape,
    check_state,
    choose_backend,
    compute_dtype,
    fail,
    needs_grad,
)
from seqzoo.ops.neural_memory.chunk import neural_memory_chunk_linear, neural_memory_chunk_mlp, neural_memory_steps_linear
from seqzoo.ops.neural_memory.memory import ACTIVATIONS, LinearMemoryState, MLPMemoryState, MLPSpec
from seqzoo.ops.neural_memory.reference import neural_memory_reference

__all__ = [
    "LinearMemoryState",
    "MLPMemoryState",
    "RETRIEVALS",
    "neural_memory",
    "neural_memory_reference",
]

_OP = "neural_memory"
BACKENDS = ("reference", "torch", "triton")
MEMORY_KINDS = ("linear", "mlp")
RETRIEVALS = ("token", "chunk")


def _check_gate(name: str, g: torch.Tensor | None, shape: tuple[int, ...], device: torch.device, upper: bool) -> None:
    """Gates are ``[batch, seq, heads]`` on q's device; in checking mode also finite, ``>= 0`` and (``upper``) ``<= 1``."""
    if g is None:
        return
    check_float(_OP, name, g)
    check_shape(_OP, name, g, shape)
    if g.device != device:
        fail(_OP, f"{name} is on {g.device}, expected {device} like q")
    check_range(_OP, name, g, 0.0, 1.0 if upper else None)


def _initial_state(
    memory: str,
    initial_state,
    shape_bhkv: tuple[int, int, int, int],
    device: torch.device,
    dtype: torch.dtype,
) -> LinearMemoryState | MLPMemoryState:
    """Validate ``initial_state`` and return it as a full state in the compute dtype."""
    batch, heads, key_dim, value_dim = shape_bhkv
    if memory == "linear":
        if initial_state is None:
            zeros = torch.zeros(batch, heads, key_dim, value_dim, device=device, dtype=dtype)
            return LinearMemoryState(zeros, zeros)
        if isinstance(initial_state, torch.Tensor) or len(initial_state) != 2:
            fail(_OP, "initial_state for memory='linear' must be a (weight, momentum) pair, e.g. LinearMemoryState")
        for name, t in zip(LinearMemoryState._fields, initial_state):
            check_state(_OP, f"initial_state.{name}", t, (batch, heads, key_dim, value_dim))
            if t.device != device:
                fail(_OP, f"initial_state.{name} is on {t.device}, expected {device} like q")
        return LinearMemoryState(*(t.to(dtype) for t in initial_state))
    if initial_state is None:
        fail(_OP, "memory='mlp' needs initial_state=MLPMemoryState(w1, w2, s1, s2): zero MLP weights never learn")
    if isinstance(initial_state, torch.Tensor) or len(initial_state) != 4:
        fail(_OP, "initial_state for memory='mlp' must be MLPMemoryState(w1, w2, s1, s2)")
    w1 = initial_state[0]
    check_float(_OP, "initial_state.w1", w1)
    if w1.dim() != 4:
        fail(_OP, f"initial_state.w1 must be [batch, heads, key_dim, hidden], got shape {tuple(w1.shape)}")
    hidden = w1.shape[-1]
    shapes = {
        "w1": (batch, heads, key_dim, hidden),
        "w2": (batch, heads, hidden, value_dim),
        "s1": (batch, heads, key_dim, hidden),
        "s2": (batch, heads, hidden, value_dim),
    }
    for name, t in zip(MLPMemoryState._fields, initial_state):
        check_state(_OP, f"initial_state.{name}", t, shapes[name])
        if t.device != device:
            fail(_OP, f"initial_state.{name} is on {t.device}, expected {device} like q")
    return MLPMemoryState(*(t.to(dtype) for t in initial_state))


@autocast_off
def neural_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    momentum: torch.Tensor | None,
    decay: torch.Tensor | None,
    *,
    chunk_size: int = 16,
    memory: str = "linear",
    initial_state: LinearMemoryState | MLPMemoryState | tuple[torch.Tensor, ...] | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
    mlp_activation: str = "gelu",
    mlp_residual_norm: bool = False,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    ln_eps: float = 1e-5,
    retrieval: str = "token",
    cu_seqlens: torch.Tensor | None = None,
    phase: int = 0,
    chunk_start: LinearMemoryState | MLPMemoryState | None = None,
) -> tuple[torch.Tensor, LinearMemoryState | MLPMemoryState | None]:
    """Titans neural long-term memory: write ``(k, v)`` by gradient steps with momentum and forgetting, read ``q``.

    Args:
        q: ``[batch, seq, heads, key_dim]`` queries (no normalisation or scale is applied).
        k: ``[batch, seq, heads, key_dim]`` keys.
        v: ``[batch, seq, heads, value_dim]`` values.
        lr: ``[batch, seq, heads]`` inner learning rate θ ≥ 0.
        momentum: ``[batch, seq, heads]`` momentum decay η ∈ [0, 1]; ``None`` means η = 0 (no momentum).
        decay: ``[batch, seq, heads]`` forget rate α ∈ [0, 1] (``W ← (1−α) W + S``); ``None`` means α = 0.
        chunk_size: tokens per chunk (≥ 1); gradients inside a chunk are taken at its start. Semantic.
        memory: ``"linear"`` (``M(x) = xW``) or ``"mlp"`` (``σ(x W1) W2``, hidden size from ``initial_state``).
        initial_state: ``LinearMemoryState(weight, momentum)`` (each ``[batch, heads, key_dim, value_dim]``;
            ``None`` = zeros) or, required for ``"mlp"``, ``MLPMemoryState(w1, w2, s1, s2)`` with
            ``w1, s1: [batch, heads, key_dim, hidden]`` and ``w2, s2: [batch, heads, hidden, value_dim]``.
            Gradients flow into it.
        output_final_state: also return the state after the last token.
        backend: ``"auto"`` (Triton on CUDA, chunked PyTorch otherwise), ``"torch"``, ``"triton"`` or
            ``"reference"`` (the token loop; slow). The MLP memory's Triton kernel is forward-only: with
            gradients required, ``"auto"`` runs PyTorch and ``"triton"`` is an error.
        mlp_activation: hidden activation of the MLP memory: ``"gelu"`` (exact), ``"silu"``, ``"relu"``, ``"tanh"``.
        mlp_residual_norm: MLP memory ``x + γ ⊙ LN(σ(x W1) W2) + b`` (needs ``key_dim == value_dim``).
        ln_weight, ln_bias: ``[heads, value_dim]`` LN gain/bias of that head, outer parameters (defaults 1, 0).
        ln_eps: the LayerNorm epsilon.
        retrieval: ``"token"`` (default): ``o_t`` reads the weights updated by token ``t`` (inclusive, per
            token). ``"chunk"``: titans-pytorch's retrieval at chunk granularity: ``o_t`` reads the weights
            after the last completed chunk, so a chunk's tokens see only earlier chunks, except its last
            token, which sees its own chunk (a partial final chunk's tokens never do). Cheaper reads, coarser
            memory; the writes and the final state are the same in both.

        cu_seqlens: ``[num_seqs + 1]`` offsets of sequences packed along ``seq`` (``batch == 1``): each is its own
            memory, from ``initial_state[i]`` (every state field ``[num_seqs, …]``), with chunks counted from its
            own first token. Run as one call per sequence: the chunk recurrence is sequential anyway, so the
            loop adds a per-sequence setup, not a per-token cost.
        phase, chunk_start: continue in the middle of a chunk (decoding): ``phase`` tokens of the current chunk
            came before this call, ``initial_state`` is the state after them and ``chunk_start`` the state at the
            chunk's start, whose weights are the gradient base of the chunk's remaining tokens. Those (at most
            ``chunk_size − phase``) run token by token (a closed-form step for the linear memory, the reference
            loop for the MLP memory or ``backend="reference"``); the rest
            continue in whole chunks. A decode step therefore touches a fixed-size state, however long the context.

    Returns:
        ``(o, final_state)``: ``o: [batch, seq, heads, value_dim]`` in q's dtype; the final state in fp32
        (fp64 for fp64 inputs), of the same kind as ``initial_state``, or ``None``.
    """
    batch, seq, heads, key_dim, value_dim = check_qkv(_OP, q, k, v)
    if isinstance(phase, bool) or not isinstance(phase, int) or not 0 <= phase < (chunk_size if isinstance(chunk_size, int) else 1):
        fail(_OP, f"phase must be an int in [0, chunk_size), got {phase!r}")
    if phase and (chunk_start is None or cu_seqlens is not None):
        fail(_OP, "phase > 0 needs chunk_start (the state at the chunk's start) and no cu_seqlens")
    if cu_seqlens is not None:
        num_seqs = check_cu_seqlens(_OP, cu_seqlens, batch, seq)
        offsets = ChunkLayout.build(
            batch, seq, chunk_size if isinstance(chunk_size, int) and chunk_size > 0 else 1, cu_seqlens, q.device, op=_OP
        ).offsets
        if initial_state is not None and (isinstance(initial_state, torch.Tensor) or any(t.shape[0] != num_seqs for t in initial_state)):
            fail(_OP, f"with cu_seqlens every initial_state field has one row per sequence ({num_seqs})")
        options = dict(
            chunk_size=chunk_size, memory=memory, output_final_state=True, backend=backend, mlp_activation=mlp_activation,
            mlp_residual_norm=mlp_residual_norm, ln_weight=ln_weight, ln_bias=ln_bias, ln_eps=ln_eps, retrieval=retrieval,
        )  # fmt: skip
        outs, finals = [], []
        for i, (bos, eos) in enumerate(zip(offsets[:-1], offsets[1:])):
            piece = [None if t is None else t[:, bos:eos] for t in (q, k, v, lr, momentum, decay)]
            init_i = None if initial_state is None else type(initial_state)(*(t[i : i + 1] for t in initial_state))
            o_i, final_i = neural_memory(*piece, initial_state=init_i, **options)
            outs.append(o_i)
            finals.append(final_i)
        final = type(finals[0])(*(torch.cat(parts) for parts in zip(*finals))) if output_final_state else None
        return torch.cat(outs, dim=1), final
    gate_shape = (batch, seq, heads)
    if lr is None:
        fail(_OP, "lr (the inner learning rate θ) is required")
    _check_gate("lr", lr, gate_shape, q.device, upper=False)
    _check_gate("momentum", momentum, gate_shape, q.device, upper=True)
    _check_gate("decay", decay, gate_shape, q.device, upper=True)
    check_positive_int(_OP, "chunk_size", chunk_size)
    check_choice(_OP, "retrieval", retrieval, RETRIEVALS)
    check_choice(_OP, "memory", memory, MEMORY_KINDS)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_finite(_OP, name, t)
    requested = backend
    # A few tokens without gradients (decoding) run the token loop on the CPU: the chunked form's fixed cost
    # (chunk coefficients, padding to a chunk) would dominate them.
    grad = needs_grad(q, k, v, lr, momentum, decay, ln_weight, ln_bias)
    backend = choose_backend(_OP, backend, BACKENDS, q, k, v, seq=seq, grad=grad, short_cpu=True)

    spec = None
    if memory == "mlp":
        if mlp_activation not in ACTIVATIONS:
            fail(_OP, f"unknown mlp_activation {mlp_activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        if mlp_residual_norm and key_dim != value_dim:
            fail(_OP, f"mlp_residual_norm needs key_dim == value_dim, got {key_dim} and {value_dim}")
        for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
            if t is not None:
                if not mlp_residual_norm:
                    fail(_OP, f"{name} is only used with mlp_residual_norm=True")
                check_float(_OP, name, t)
                check_shape(_OP, name, t, (heads, value_dim))
        spec = MLPSpec(mlp_activation, bool(mlp_residual_norm), ln_weight, ln_bias, float(ln_eps))
    elif ln_weight is not None or ln_bias is not None or mlp_residual_norm:
        fail(_OP, "ln_weight, ln_bias and mlp_residual_norm apply to memory='mlp' only")

    dtype = compute_dtype(q)
    state = _initial_state(memory, initial_state, (batch, heads, key_dim, value_dim), q.device, dtype)
    if memory == "mlp" and backend == "triton" and needs_grad(q, k, v, lr, momentum, decay, ln_weight, ln_bias, *state):
        # The MLP kernel is forward-only; training runs the chunked PyTorch path.
        if requested == "triton":
            fail(_OP, "backend='triton' for memory='mlp' is inference-only (no gradients); use backend='torch'")
        backend = "torch"
    zeros = None
    if momentum is None or decay is None:
        zeros = torch.zeros(gate_shape, device=q.device, dtype=dtype)
    momentum = zeros if momentum is None else momentum
    decay = zeros if decay is None else decay

    if seq == 0:
        o = q.new_zeros(batch, 0, heads, value_dim)
        return o, (state if output_final_state else None)
    if phase:
        base = _initial_state(memory, chunk_start, (batch, heads, key_dim, value_dim), q.device, dtype)
        head = min(seq, chunk_size - phase)
        head_inputs = [t[:, :head] for t in (q, k, v, lr, momentum, decay)]
        if memory == "linear" and backend != "reference":
            o_head, state = neural_memory_steps_linear(*head_inputs, state, base.weight, phase, chunk_size, retrieval)
        else:
            o_head, state = neural_memory_reference(*head_inputs, chunk_size, state, spec, retrieval, phase, base[: len(base) // 2])
        if head == seq:
            return o_head.to(q.dtype), (state if output_final_state else None)
        rest = (t[:, head:] for t in (q, k, v, lr, momentum, decay))
        options = dict(chunk_size=chunk_size, memory=memory, output_final_state=output_final_state, backend=requested, retrieval=retrieval)
        if memory == "mlp":
            options.update(
                mlp_activation=mlp_activation, mlp_residual_norm=mlp_residual_norm, ln_weight=ln_weight, ln_bias=ln_bias, ln_eps=ln_eps
            )
        o_rest, final = neural_memory(*rest, initial_state=state, **options)
        return torch.cat([o_head.to(q.dtype), o_rest], dim=1), final

    if backend == "reference":
        o, final = neural_memory_reference(q, k, v, lr, momentum, decay, chunk_size, state, spec, retrieval)
    elif memory == "mlp" and backend == "triton":
        from seqzoo.ops.neural_memory.triton_kernel import neural_memory_mlp_triton

        o, final = neural_memory_mlp_triton(q, k, v, lr, momentum, decay, chunk_size, state, spec, retrieval)
    elif memory == "mlp":
        o, final = neural_memory_chunk_mlp(q, k, v, lr, momentum, decay, chunk_size, state, spec, retrieval)
    elif backend == "triton":
        from seqzoo.ops.neural_memory.triton_kernel import neural_memory_linear_triton

        o, final = neural_memory_linear_triton(q, k, v, lr, momentum, decay, chunk_size, state, retrieval)
    else:
        o, final = neural_memory_chunk_linear(q, k, v, lr, momentum, decay, chunk_size, state, retrieval)
    return o.to(q.dtype), (final if output_final_state else None)
