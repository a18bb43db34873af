"""Chunked-parallel GLA (per-key gates) in PyTorch: the default backend off CUDA.

Per-key gates make the intra-chunk scores ``A_ij = Σ_k q_ik k_jk exp(b_ik − b_jk)`` no longer one
matmul. We use secondary chunking: the chunk (``C = 64``) is cut into sub-chunks of ``c = 16``.
For a query sub-chunk ``I`` and every earlier key position ``j``, the factor is split at the
reference point ``r_I`` = the cumulative gate at the first row of ``I``:
``exp(b_i − r_I) · exp(r_I − b_j)``. Both exponents are ``<= 0`` (cumulative log gates only fall),
so each factor lies in ``(0, 1]`` and the cross terms are plain matmuls that cannot overflow, even
at ``g = −30`` per step. The diagonal ``c×c`` sub-blocks are computed exactly, element by element.
Between chunks the state recurrence is the same loop as simple GLA, with a per-key decay.
Gradients come from autograd; it saves chunk-boundary states and per-chunk tensors only.
"""

from __future__ import annotations

import torch
from einops import rearrange

from seqzoo.ops.simple_gla.chunk import ChunkLayout, reverse_exclusive_cumsum, scan_chunk_states
from seqzoo.ops.utils import default_scale


def intra_chunk_scores(
    qc: torch.Tensor, kc: torch.Tensor, g: torch.Tensor, b: torch.Tensor, sub_chunk: int = 16
) -> torch.Tensor:
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked GLA; same contract as :func:`seqzoo.ops.gla.gla`.

    Shapes: ``q, k, g [batch, seq, heads, K]``, ``v [batch, seq, heads, V]``, states
    ``[batch or num_seqs, heads, K, V]``. ``chunk_size`` must be a multiple of ``sub_chunk``. Computes in
    fp32 (float64 for float64 inputs); returns ``o`` in ``q.dtype`` and the final state (or ``None``).
    """
    batch, seq, heads, key_dim = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = default_scale(scale, key_dim)
    num_seqs = batch if cu_seqlens is None else cu_seqlens.numel() - 1
    layout = ChunkLayout.build(seq, chunk_size, cu_seqlens, q.device)

    qc = layout.to_chunks(q.to(acc) * scale)
    kc = layout.to_chunks(k.to(acc))
    vc = layout.to_chunks(v.to(acc))
    gc = layout.to_chunks(g.to(acc))
    b = torch.cumsum(gc, dim=-2)
    scores = intra_chunk_scores(qc, kc, gc, b, sub_chunk)
    kv = (kc * reverse_exclusive_cumsum(gc, dim=-2).exp()).transpose(-1, -2) @ vc
    decay = rearrange(b[..., -1:, :].exp(), "... one k -> ... k one")
    states, finals = scan_chunk_states(kv, decay, layout, initial_state, num_seqs)
    o = (qc * b.exp()) @ states + scores @ vc
    o = layout.from_chunks(o).to(q.dtype)
    return o, (finals if output_final_state else None)
