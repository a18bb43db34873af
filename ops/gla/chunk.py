"""Chunked-parallel GLA (per-key gates) in PyTorch: the default backend off CUDA.

Per-key gates make the intra-chunk scores ``A_ij = Σ_k q_ik k_jk exp(b_ik − b_jk)`` no longer one
matmul. We use secondary chunking: the chunk (``C = 64``) is cut into sub-chunks of ``c = 16``.
For a query sub-chunk ``I`` and every earlier key position ``j``, the factor is split at the
reference point ``r_I`` = the cumulative gate at the first row of ``I``:
``exp(b_i − r_I) · exp(r_I − b_j)``. Both exponents are ``<= 0`` (cumulative log gates only fall),
so each factor lies in ``(0, 1]`` and the cross terms are plain matmuls that cannot overflow, even
at ``g = −30`` per step. The diagonal ``c×c`` sub-blocks are computed exactly, element by element.
Chunks whose gates decay little over the chunk (the common case in trained GLA, whose gates are
``logsigmoid(·)/16``) skip all this and take one matmul around a mid-chunk reference point
(:func:`direct_chunk_scores`): same accuracy, several times faster. The choice is made per chunk.
Between chunks the state recurrence is the same loop as simple GLA, with a per-key decay.
Gradients come from autograd; it saves chunk-boundary states and per-chunk tensors only.
"""

from __future__ import annotations

import torch
from einops import rearrange

from seqzoo.ops.core import ChunkLayout, compute_dtype
from seqzoo.ops.simple_gla.chunk import reverse_exclusive_cumsum, scan_gated_states
from seqzoo.ops.utils import default_scale


def intra_chunk_scores(qc: torch.Tensor, kc: torch.Tensor, g: torch.Tensor, b: torch.Tensor, sub_chunk: int = 16) -> torch.Tensor:
    """Causal scores ``A_ij = Σ_k q_ik k_jk exp(b_ik − b_jk)`` (``j <= i``) within each chunk.

    Args:
        qc, kc: ``[..., C, K]`` chunked queries (already scaled) and keys.
        g: ``[..., C, K]`` the chunked log gates; ``b`` their inclusive chunk-local cumsum.

    Returns:
        ``[..., C, C]``, zero above the diagonal.
    """
    chunk = qc.shape[-2]
    n_sub = chunk // sub_chunk
    split = lambda x: rearrange(x, "... (s c) k -> ... s c k", c=sub_chunk)  # noqa: E731
    qs, ks, bs, gs = split(qc), split(kc), split(b), split(g)
    ref = bs[..., 0, :]  # [..., S, K]
    # b_i − ref as a cumsum of the sub-chunk's gates after its first, so row 0 is an exact 0.
    q_rel = qs * torch.cumsum(torch.cat([torch.zeros_like(gs[..., :1, :]), gs[..., 1:, :]], dim=-2), dim=-2).exp()
    # Keys strictly before sub-chunk I, relative to I's reference point; the rest masked in the
    # exponent (→ exp(-inf) = 0) so no positive exponent is ever evaluated.
    before = torch.arange(chunk, device=qc.device)[None, :] < (torch.arange(n_sub, device=qc.device) * sub_chunk)[:, None]
    k_exp = (ref[..., :, None, :] - b[..., None, :, :]).masked_fill(~before[..., None], float("-inf"))
    k_rel = kc[..., None, :, :] * k_exp.exp()  # [..., S, C, K]
    scores = rearrange(q_rel @ k_rel.transpose(-1, -2), "... s c j -> ... (s c) j")
    # Diagonal sub-blocks exactly: exp(b_ik − b_jk) for j <= i inside the sub-chunk.
    causal = torch.ones(sub_chunk, sub_chunk, dtype=torch.bool, device=qc.device).tril()
    # The diagonal factor is the constant 1, not exp(b_i − b_i): see simple_gla.chunk on why.
    eye_c = torch.eye(sub_chunk, dtype=torch.bool, device=qc.device)
    d_exp = (bs[..., :, None, :] - bs[..., None, :, :]).masked_fill(~causal[..., None], float("-inf"))
    d_exp = d_exp.masked_fill(eye_c[..., None], 0.0)
    diag = (qs[..., :, None, :] * ks[..., None, :, :] * d_exp.exp()).sum(-1)  # [..., S, c, c]
    eye = torch.eye(n_sub, dtype=qc.dtype, device=qc.device)
    return scores + rearrange(torch.einsum("...sij,st->...sitj", diag, eye), "... s i t j -> ... (s i) (t j)")


def direct_chunk_scores(qc: torch.Tensor, kc: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Causal scores ``[..., C, C]`` as one matmul, for chunks whose per-key gate span is small.

    With ``r`` = the midpoint of each key's cumulative gate over the chunk, ``exp(b_i − r)`` and
    ``exp(r − b_j)`` both lie within ``exp(±span/2)``; for ``span <= DIRECT_SPAN_LIMIT`` no factor
    over- or underflows, and every product carries the same few roundings as the exact form.
    ``r`` is detached: the scores do not depend on it, so it needs no gradient.
    """
    chunk = qc.shape[-2]
    ref = (0.5 * (b[..., :1, :] + b[..., -1:, :])).detach()
    scores = (qc * (b - ref).exp()) @ (kc * (ref - b).exp()).transpose(-1, -2)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=qc.device).tril()
    return scores.masked_fill(~causal, 0.0)


# exp(±15) stays far from fp32 over/underflow, so a direct chunk is as accurate as the split one.
DIRECT_SPAN_LIMIT = 30.0


def chunk_scores(qc: torch.Tensor, kc: torch.Tensor, g: torch.Tensor, b: torch.Tensor, sub_chunk: int, span_limit: float) -> torch.Tensor:
    """Intra-chunk scores ``[rows, heads, num_chunks, C, C]``, each chunk by the cheapest stable form.

    Chunks whose largest per-key decay span ``b_0 − b_{C−1}`` is at most ``span_limit`` take the
    single-matmul form; the rest (strong gates, e.g. ``g → −30``) take secondary chunking.
    """
    span = (b[..., 0, :] - b[..., -1, :]).amax(-1)
    direct = span <= span_limit
    if torch.compiler.is_compiling():
        # Traced graphs have no data-dependent branches: both forms for every chunk, the cheaper one kept
        # where it is exact (eager runs pick one form per chunk below). The direct form sees zero gates in
        # the chunks it does not serve: its exponents there could overflow, and the zero gradient that
        # ``where`` sends to an infinite branch would still turn into NaN.
        safe_b = b.masked_fill(~direct[..., None, None], 0.0)
        return torch.where(direct[..., None, None], direct_chunk_scores(qc, kc, safe_b), intra_chunk_scores(qc, kc, g, b, sub_chunk))
    if bool(direct.all()):
        return direct_chunk_scores(qc, kc, b)
    if not bool(direct.any()):
        return intra_chunk_scores(qc, kc, g, b, sub_chunk)
    # A mix: run each form on its own chunks and put the results back in place.
    lead = qc.shape[:3]
    flat = lambda x: x.reshape(-1, *x.shape[3:])  # noqa: E731
    fq, fk, fg, fb = flat(qc), flat(kc), flat(g), flat(b)
    fast = direct.reshape(-1).nonzero().squeeze(1)
    slow = (~direct).reshape(-1).nonzero().squeeze(1)
    chunk = qc.shape[-2]
    out = qc.new_zeros(fq.shape[0], chunk, chunk)
    out = out.index_copy(0, fast, direct_chunk_scores(fq[fast], fk[fast], fb[fast]))
    out = out.index_copy(0, slow, intra_chunk_scores(fq[slow], fk[slow], fg[slow], fb[slow], sub_chunk))
    return out.reshape(*lead, chunk, chunk)


def gla_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    sub_chunk: int = 16,
    span_limit: float = DIRECT_SPAN_LIMIT,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked GLA; same contract as :func:`seqzoo.ops.gla.gla`.

    Shapes: ``q, k, g [batch, seq, heads, K]``, ``v [batch, seq, heads, V]``, states
    ``[batch or num_seqs, heads, K, V]``. ``chunk_size`` must be a multiple of ``sub_chunk``.
    ``span_limit`` picks the intra-chunk form per chunk (see :func:`chunk_scores`; ``-1`` forces
    secondary chunking everywhere, which tests use). Computes in
    fp32 (float64 for float64 inputs); returns ``o`` in ``q.dtype`` and the final state (or ``None``).
    """
    batch, seq, heads, key_dim = q.shape
    acc = compute_dtype(q)
    scale = default_scale(scale, key_dim)
    layout = ChunkLayout.build(batch, seq, chunk_size, cu_seqlens, q.device, op="gla")

    qc = layout.to_chunks(q.to(acc) * scale)
    kc = layout.to_chunks(k.to(acc))
    vc = layout.to_chunks(v.to(acc))
    gc = layout.to_chunks(g.to(acc))
    b = torch.cumsum(gc, dim=-2)
    scores = chunk_scores(qc, kc, gc, b, sub_chunk, span_limit)
    kv = (kc * reverse_exclusive_cumsum(gc, dim=-2).exp()).transpose(-1, -2) @ vc
    decay = rearrange(b[..., -1:, :].exp(), "... one k -> ... k one")
    states, finals = scan_gated_states(kv, decay, layout, initial_state)
    o = (qc * b.exp()) @ states + scores @ vc
    o = layout.from_chunks(o).to(q.dtype)
    return o, (finals if output_final_state else None)
