"""Chunked dual form of the Titans neural memory in PyTorch (the default off CUDA).

Inside a chunk of ``b`` tokens every gradient is taken at the chunk-start weights ``W0`` (and momentum
``S0``), so the momentum/forget recurrence is linear in the per-token gradients and has a closed form
(spec titans.md §1.2–1.4). With chunk-local cumulative log gates ``A_t = Σ_{m≤t} log(1−α_m)`` and
``H_t = Σ_{m≤t} log η_m``:

    Lβ[t,i] = exp(A_t − A_i),  Lη[i,j] = exp(H_i − H_j)   (lower triangular, inclusive)
    C = Lβ Lη,  f = Lβ exp(H),  β = exp(A),  h = exp(H)
    W_t = β_t W0 + f_t S0 − Σ_{j≤t} C[t,j] θ_j u_j,    S_t = h_t S0 − Σ_{j≤t} Lη[t,j] θ_j u_j

Outputs read ``W_t`` per token through the dual form (``(C ⊙ Q Kᵀ) G``) without building per-token weights;
only the chunk-boundary states are kept, so memory grows with ``seq / chunk_size`` weight sets at most.
The chunk loop itself is sequential: the next chunk's gradients need this chunk's final weights.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from seqzoo.ops.neural_memory.memory import (
    LinearMemoryState,
    MLPMemoryState,
    MLPSpec,
    activation,
    activation_grad,
    layer_norm_head,
    layer_norm_head_grad,
)

# Gates are floored before the log: η = 0 or α = 1 give log 0 = −inf, and −inf − (−inf) is NaN. e^-60 is
# far below the rounding of fp64, so the floor does not change any value; only the derivative with
# respect to a gate sitting exactly at 0 (η) or 1 (α) is lost (it is clamped to zero).
GATE_FLOOR = 1e-26


class ChunkCoefficients(NamedTuple):
    """Per-chunk closed-form coefficients; ``N`` chunks of ``b`` tokens (the last one zero-padded)."""

    beta: torch.Tensor  # [B, H, N, b]     β_t: decay of W0 seen by token t
    f: torch.Tensor  # [B, H, N, b]        f_t: weight of S0 in W_t
    C: torch.Tensor  # [B, H, N, b, b]     C[t, j]: weight of token j's step in W_t
    beta_last: torch.Tensor  # [B, H, N]   β at the chunk's last real token
    f_last: torch.Tensor  # [B, H, N]
    h_last: torch.Tensor  # [B, H, N]      h at the chunk's last real token (decay of S0)
    c_last: torch.Tensor  # [B, H, N, b]   C's row of the last real token (writes W)
    e_last: torch.Tensor  # [B, H, N, b]   Lη's row of the last real token (writes S)


def log_gates(momentum: torch.Tensor, decay: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log(1 − α), log η)`` as ``[batch, heads, seq]`` in ``dtype``, floored at ``log(GATE_FLOOR)``."""
    retain = (1 - decay.to(dtype)).clamp_min(GATE_FLOOR)
    eta = momentum.to(dtype).clamp_min(GATE_FLOOR)
    return torch.log(retain).transpose(1, 2), torch.log(eta).transpose(1, 2)


def segsum_exp(x: torch.Tensor) -> torch.Tensor:
    """``exp(Σ_{m=j+1..i} x_m)`` for ``i ≥ j``, else 0: ``x [..., b] -> [..., b, b]``.

    The sums come from a masked cumulative sum, not from differences of one cumulative sum, so a very
    negative early gate (α ≈ 1, η ≈ 0) cannot cancel the precision of the later entries.
    """
    b = x.shape[-1]
    strict = torch.ones(b, b, dtype=torch.bool, device=x.device).tril(-1)
    incl = torch.ones(b, b, dtype=torch.bool, device=x.device).tril()
    xx = x.unsqueeze(-1).expand(*x.shape, b).masked_fill(~strict, 0)
    seg = xx.cumsum(-2)
    return torch.exp(seg.masked_fill(~incl, float("-inf")))


def chunk_coefficients(log_retain: torch.Tensor, log_eta: torch.Tensor, chunk_size: int) -> ChunkCoefficients:
    """Closed-form coefficients of every chunk from log gates ``[B, H, T]`` (differentiable)."""
    seq = log_retain.shape[-1]
    n_chunks = -(-seq // chunk_size)
    pad = n_chunks * chunk_size - seq
    # Padded tokens get neutral gates; their rows are never read (see the `_last` rows below).
    la = F.pad(log_retain, (0, pad)).unflatten(-1, (n_chunks, chunk_size))
    ln = F.pad(log_eta, (0, pad)).unflatten(-1, (n_chunks, chunk_size))
    l_beta = segsum_exp(la)
    l_eta = segsum_exp(ln)
    c = l_beta @ l_eta
    beta = torch.exp(la.cumsum(-1))
    h = torch.exp(ln.cumsum(-1))
    f = (l_beta @ h.unsqueeze(-1)).squeeze(-1)
    last = chunk_size - 1 - pad  # last real row of the final chunk

    def last_rows(x: torch.Tensor, matrix: bool) -> torch.Tensor:
        if matrix:
            full, tail = x[..., :-1, chunk_size - 1, :], x[..., -1:, last, :]
        else:
            full, tail = x[..., :-1, chunk_size - 1], x[..., -1:, last]
        return torch.cat([full, tail], dim=2)

    return ChunkCoefficients(
        beta=beta,
        f=f,
        C=c,
        beta_last=last_rows(beta, False),
        f_last=last_rows(f, False),
        h_last=last_rows(h, False),
        c_last=last_rows(c, True),
        e_last=last_rows(l_eta, True),
    )


def to_chunks(x: torch.Tensor, chunk_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, T, H, ...] -> [B, H, N, b, ...]`` in ``dtype``, zero-padded to whole chunks."""
    x = x.to(dtype).transpose(1, 2)
    seq = x.shape[2]
    n_chunks = -(-seq // chunk_size)
    pad = n_chunks * chunk_size - seq
    if pad:
        x = torch.cat([x, x.new_zeros(*x.shape[:2], pad, *x.shape[3:])], dim=2)
    return x.unflatten(2, (n_chunks, chunk_size))


def from_chunks(y: torch.Tensor, seq: int) -> torch.Tensor:
    """``[B, H, N, b, D] -> [B, T, H, D]`` (drops the padding)."""
    return y.flatten(2, 3)[:, :, :seq].transpose(1, 2)


def neural_memory_chunk_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    momentum: torch.Tensor,
    decay: torch.Tensor,
    chunk_size: int,
    state: LinearMemoryState,
) -> tuple[torch.Tensor, LinearMemoryState]:
    """Linear memory, chunked dual form; autograd differentiates it (every op is a batched matmul).

    Args: as :func:`seqzoo.ops.neural_memory.neural_memory`, with a full fp32/fp64 ``state``.
    Returns: ``(o [B, T, H, value_dim] in the state's dtype, final LinearMemoryState)``.
    """
    seq = q.shape[1]
    dtype = state.weight.dtype
    qc, kc, vc = (to_chunks(x, chunk_size, dtype) for x in (q, k, v))
    theta = to_chunks(lr, chunk_size, dtype).unsqueeze(-1)  # [B, H, N, b, 1]
    coef = chunk_coefficients(*log_gates(momentum, decay, dtype), chunk_size)

    # Everything that does not depend on the chunk-start state is batched over all chunks up front.
    scores = coef.C * (qc @ kc.transpose(-1, -2))  # (C ⊙ Q Kᵀ): the intra-chunk "attention"
    k_write_w = (kc * coef.c_last.unsqueeze(-1)).transpose(-1, -2)  # [B, H, N, dk, b]
    k_write_s = (kc * coef.e_last.unsqueeze(-1)).transpose(-1, -2)

    w, s = state.weight, state.momentum
    ws, ss, gs = [], [], []
    for n in range(qc.shape[2]):
        # θ-weighted errors at the chunk start: θ_j u_j = k_jᵀ G_j.
        g = theta[:, :, n] * (kc[:, :, n] @ w - vc[:, :, n])
        ws.append(w)
        ss.append(s)
        gs.append(g)
        bl = coef.beta_last[:, :, n, None, None]
        fl = coef.f_last[:, :, n, None, None]
        hl = coef.h_last[:, :, n, None, None]
        w, s = bl * w + fl * s - k_write_w[:, :, n] @ g, hl * s - k_write_s[:, :, n] @ g

    w_start = torch.stack(ws, dim=2)
    s_start = torch.stack(ss, dim=2)
    g_all = torch.stack(gs, dim=2)
    y = coef.beta.unsqueeze(-1) * (qc @ w_start) + coef.f.unsqueeze(-1) * (qc @ s_start) - scores @ g_all
    return from_chunks(y, seq), LinearMemoryState(w, s)


def neural_memory_chunk_mlp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    momentum: torch.Tensor,
    decay: torch.Tensor,
    chunk_size: int,
    state: MLPMemoryState,
    spec: MLPSpec,
) -> tuple[torch.Tensor, MLPMemoryState]:
    """2-layer MLP memory, chunked dual form (TTT-MLP's construction with momentum and forget gates).

    The per-token hidden-layer gradients ``G1 = (G2 W2ᵀ) ⊙ σ'(Z1)`` are written in closed form, so
    autograd through this function gives the second-order outer gradients.
    Returns ``(o [B, T, H, value_dim] in the state's dtype, final MLPMemoryState)``.
    """
    seq = q.shape[1]
    dtype = state.w1.dtype
    qc, kc, vc = (to_chunks(x, chunk_size, dtype) for x in (q, k, v))
    theta = to_chunks(lr, chunk_size, dtype).unsqueeze(-1)
    coef = chunk_coefficients(*log_gates(momentum, decay, dtype), chunk_size)
    scores1 = coef.C * (qc @ kc.transpose(-1, -2))
    act = spec.activation

    w1, w2, s1, s2 = state
    outs = []
    for n in range(qc.shape[2]):
        kn, vn, qn = kc[:, :, n], vc[:, :, n], qc[:, :, n]
        beta = coef.beta[:, :, n].unsqueeze(-1)
        fc = coef.f[:, :, n].unsqueeze(-1)
        c = coef.C[:, :, n]
        # Keys through the chunk-start MLP, then the θ-weighted per-token gradients at each layer's output.
        z1 = kn @ w1
        a = activation(z1, act)
        z2 = a @ w2
        if spec.residual_norm:
            head, xhat, rstd = layer_norm_head(z2, spec)
            g2 = layer_norm_head_grad(kn + head - vn, xhat, rstd, spec)
        else:
            g2 = z2 - vn
        g2 = theta[:, :, n] * g2
        g1 = (g2 @ w2.transpose(-1, -2)) * activation_grad(z1, act)

        # Queries through the per-token weights W_t, layer by layer, in dual form.
        zq1 = beta * (qn @ w1) + fc * (qn @ s1) - scores1[:, :, n] @ g1
        aq = activation(zq1, act)
        zq2 = beta * (aq @ w2) + fc * (aq @ s2) - (c * (aq @ a.transpose(-1, -2))) @ g2
        outs.append(qn + layer_norm_head(zq2, spec)[0] if spec.residual_norm else zq2)

        bl = coef.beta_last[:, :, n, None, None]
        fl = coef.f_last[:, :, n, None, None]
        hl = coef.h_last[:, :, n, None, None]
        cw = coef.c_last[:, :, n].unsqueeze(-1)
        cs = coef.e_last[:, :, n].unsqueeze(-1)
        kt, at = kn.transpose(-1, -2), a.transpose(-1, -2)
        w1, s1 = bl * w1 + fl * s1 - (kt * cw.transpose(-1, -2)) @ g1, hl * s1 - (kt * cs.transpose(-1, -2)) @ g1
        w2, s2 = bl * w2 + fl * s2 - (at * cw.transpose(-1, -2)) @ g2, hl * s2 - (at * cs.transpose(-1, -2)) @ g2

    y = torch.stack(outs, dim=2)
    return from_chunks(y, seq), MLPMemoryState(w1, w2, s1, s2)
