"""Checkpoint attention: each query attends, in one softmax, to itself and to one summary per completed segment.

SCOUT's long-range sub-layer and RAT's attention across chunks are the same operation: the sequence is cut
into segments of ``L`` tokens, each *complete* segment ``m`` (positions ``mL … mL+L−1``) has one checkpoint
key/value, and query ``i`` attends to its own key/value and to the checkpoints of every segment that ended
strictly before it (``(m + 1)·L <= i``). With ``L = 1`` and the tokens themselves as checkpoints this is
causal softmax attention. The op never looks at how a checkpoint was made (the last token of its segment,
a pooled summary, the final state of a recurrence): the layer decides that.

Cost: ``O(T · T/L)`` scores instead of attention's ``O(T²)``. Backends: ``reference`` (the full masked score
matrix, the test oracle), ``torch`` (gathered checkpoints, the self term merged through log-sum-exp, chunked
over queries; the CPU default) and ``triton`` (flash-style forward and backward kernels; the CUDA default).
"""

from __future__ import annotations

import torch

from seqzoo.ops.checkpoint_attention.chunk import checkpoint_attention_block, checkpoint_attention_chunk, checkpoint_offsets
from seqzoo.ops.checkpoint_attention.reference import checkpoint_attention_reference, checkpoint_mask
from seqzoo.ops.core import (
    autocast_off,
    check_cu_seqlens,
    check_device,
    check_finite,
    check_float,
    check_positive_int,
    checks_enabled,
    choose_backend,
    fail,
    guard_nonfinite,
    needs_grad,
)

__all__ = [
    "BACKENDS",
    "checkpoint_attention",
    "checkpoint_attention_block",
    "checkpoint_attention_chunk",
    "checkpoint_attention_reference",
    "checkpoint_mask",
    "checkpoint_offsets",
]

BACKENDS = ("reference", "torch", "triton")
_OP = "checkpoint_attention"


def _poisoned(bad_self: torch.Tensor, bad_ckpt: torch.Tensor, segment_len: int, offsets: list[int] | None) -> torch.Tensor:
    """``[batch, seq, kv_heads]``: the queries a NaN/Inf token reaches: a bad self term its own position, a bad
    checkpoint every later query of its sequence that sees it (``i >= (m+1)·L``). Tensor ops only (no host sync)."""
    batch, seq, kv_heads = bad_self.shape
    # Bad checkpoints among the first n of the packed row: count[:, n] (count[:, 0] = 0).
    count = torch.cat([bad_ckpt.new_zeros(batch, 1, kv_heads, dtype=torch.int32), bad_ckpt.to(torch.int32).cumsum(1)], dim=1)
    if offsets is None:
        position = torch.arange(seq, device=bad_self.device)
        first = torch.zeros_like(position)  # each row's checkpoints start at 0
    else:
        lengths = torch.tensor([b - a for a, b in zip(offsets[:-1], offsets[1:])], device=bad_self.device)
        starts = torch.tensor(offsets[:-1], device=bad_self.device)
        bases = torch.tensor(checkpoint_offsets(offsets, segment_len)[:-1], device=bad_self.device)
        position = torch.arange(seq, device=bad_self.device) - starts.repeat_interleave(lengths)
        first = bases.repeat_interleave(lengths)
    seen = first + torch.div(position, segment_len, rounding_mode="floor")  # one past the last checkpoint each query sees
    return bad_self | (count[:, seen] - count[:, first] > 0)


def _check(q, k, v, k_ckpt, v_ckpt, segment_len, cu_seqlens) -> None:
    """Structure checks (always), the checkpoint count of a packed call (its offsets are read anyway), and
    finite values in checking mode."""
    check_positive_int(_OP, "segment_len", segment_len)
    for name, t in (("q", q), ("k", k), ("v", v), ("k_ckpt", k_ckpt), ("v_ckpt", v_ckpt)):
        check_float(_OP, name, t)
        if t.dim() != 4:
            fail(_OP, f"{name} must be [batch, seq, heads, dim], got shape {tuple(t.shape)}")
    batch, seq, heads, key_dim = q.shape
    kv_heads, value_dim = k.shape[2], v.shape[-1]
    if tuple(k.shape) != (batch, seq, kv_heads, key_dim):
        fail(_OP, f"k has shape {tuple(k.shape)}, expected [{batch}, {seq}, kv_heads, {key_dim}] to match q")
    if kv_heads < 1 or heads % kv_heads:
        fail(_OP, f"k's {kv_heads} heads must divide q's {heads} heads (grouped KV heads)")
    if tuple(v.shape[:3]) != (batch, seq, kv_heads):
        fail(_OP, f"v has shape {tuple(v.shape)}, expected [{batch}, {seq}, {kv_heads}, value_dim] to match k")
    check_device(_OP, q, k=k, v=v, k_ckpt=k_ckpt, v_ckpt=v_ckpt, cu_seqlens=cu_seqlens)
    check_cu_seqlens(_OP, cu_seqlens, batch, seq)
    if cu_seqlens is None:
        count, what = seq // segment_len, f"seq // segment_len = {seq} // {segment_len}"
    else:
        # The offsets are needed on the host by every backend (padding, Triton block indices): read them here.
        offsets = [int(o) for o in cu_seqlens.tolist()]
        count = checkpoint_offsets(offsets, segment_len)[-1]
        what = "the sum over packed sequences of len // segment_len"
    for name, t, dim in (("k_ckpt", k_ckpt, key_dim), ("v_ckpt", v_ckpt, value_dim)):
        if tuple(t.shape) != (batch, count, kv_heads, dim):
            fail(_OP, f"{name} has shape {tuple(t.shape)}, expected [{batch}, {count}, {kv_heads}, {dim}] ({what} checkpoints)")
    if checks_enabled():
        for name, t in (("q", q), ("k", k), ("v", v), ("k_ckpt", k_ckpt), ("v_ckpt", v_ckpt)):
            check_finite(_OP, name, t)


@autocast_off
def checkpoint_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_ckpt: torch.Tensor,
    v_ckpt: torch.Tensor,
    *,
    segment_len: int,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, None]:
    """Attention of every query over itself and the checkpoints of the segments completed before it.

    Args:
        q: ``[batch, seq, heads, key_dim]``.
        k: ``[batch, seq, kv_heads, key_dim]`` and v: ``[batch, seq, kv_heads, value_dim]``: each token's own key
            and value (the self term); ``kv_heads`` divides ``heads`` (query head ``h`` reads KV head
            ``h // (heads / kv_heads)``, as SDPA's ``enable_gqa``).
        k_ckpt, v_ckpt: ``[batch, seq // segment_len, kv_heads, ·]``: one key/value per *complete* segment, in
            order. With ``cu_seqlens``: ``[1, Σ_d ⌊len_d / segment_len⌋, kv_heads, ·]``, each document's
            checkpoints packed in document order (segments restart at every document).
        segment_len: ``L``; segment ``m`` covers positions ``mL … mL+L−1`` and is visible to queries ``i >= (m+1)L``.
        scale: score scale, ``key_dim ** -0.5`` by default.
        cu_seqlens: ``[num_seqs + 1]`` offsets of documents packed along ``seq`` (``batch == 1``).
        backend: ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"reference"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``(o, None)``: ``o [batch, seq, heads, value_dim]`` in ``q.dtype`` (computed in fp32, float64 for
        float64 inputs); ``None`` in the place other ops return a final state.

    Raises:
        OpInputError: mismatched shapes, devices or dtypes, a ``segment_len`` below 1, a checkpoint count
        that does not match ``seq`` (or the packed documents), bad ``cu_seqlens``; NaN/Inf in checking mode.
    """
    _check(q, k, v, k_ckpt, v_ckpt, segment_len, cu_seqlens)
    seq = q.shape[1]
    if seq == 0:
        return q.new_zeros(*q.shape[:3], v.shape[-1]), None
    grad = needs_grad(q, k, v, k_ckpt, v_ckpt)
    impl = choose_backend(_OP, backend, BACKENDS, q, k, v, k_ckpt, v_ckpt, seq=seq, grad=grad)
    kwargs = dict(segment_len=segment_len, scale=scale, cu_seqlens=cu_seqlens)
    # Every backend multiplies masked weights (exact zeros) by the values of keys a query must not see, and
    # 0 · NaN is NaN: a NaN/Inf key or value would reach earlier queries. So bad tokens and checkpoints are zeroed
    # here and NaN is put back on exactly the queries that see them (a bad query only ever reaches its own row).
    clean, bad_self = guard_nonfinite({"k": k, "v": v}, cu_seqlens)
    clean_ckpt, bad_ckpt = guard_nonfinite({"k": k_ckpt, "v": v_ckpt}, None)
    args = (q, clean["k"], clean["v"], clean_ckpt["k"], clean_ckpt["v"])
    if impl == "reference":
        o, _ = checkpoint_attention_reference(*args, **kwargs)
    elif impl == "torch":
        o, _ = checkpoint_attention_chunk(*args, **kwargs)
    else:
        from seqzoo.ops.checkpoint_attention.triton import checkpoint_attention_triton

        o, _ = checkpoint_attention_triton(*args, **kwargs)
    if bad_self is None and bad_ckpt is None:
        return o, None
    bad_self = torch.zeros(k.shape[:3], dtype=torch.bool, device=k.device) if bad_self is None else bad_self
    bad_ckpt = torch.zeros(k_ckpt.shape[:3], dtype=torch.bool, device=k.device) if bad_ckpt is None else bad_ckpt
    offsets = None if cu_seqlens is None else [int(x) for x in cu_seqlens.tolist()]
    poisoned = _poisoned(bad_self, bad_ckpt, segment_len, offsets).repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    return o.masked_fill(poisoned[..., None], float("nan")), None
