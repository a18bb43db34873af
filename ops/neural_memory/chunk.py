"""Chunked dual form of the Titans neural memory in PyTorch (the default off CUDA).

Inside a chunk of ``b`` tokens every gradient is taken at the chunk-start weights ``W0`` (and momentum
``S0``), so the momentum/forget recurrence is linear in the per-token gradients and has a closed form
(unrolled below; ``docs/titans.md`` sets out the layers around it). With chunk-local cumulative log gates ``A_t = Σ_{m≤t} log(1−α_m)`` and
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
from torch.utils.checkpoint import checkpoint

from seqzoo.ops.neural_memory.memory import (
    LinearMemoryState,
    MLPMemoryState,
    MLPSpec,
    activation,
    activation_grad,
    layer_norm_head,
    layer_norm_head_grad,
)

# Gates are floored before the log: η = 0 or α = 1 give log 0 = −inf, and −inf − (−inf) is NaN. The
# floor (≈ e^-60) is far below the rounding of fp64, so it changes no value; only the derivative with
# respect to a gate sitting exactly at 0 (η) or 1 (α) is lost (the clamp passes no gradient there).
GATE_FLOOR = 1e-26
# Decay products below e^-80 (1.8e-35, far below the rounding of fp64) are set to exactly 0 so that
# they cannot turn into fp32 denormals, which slow CPU matmuls by an order of magnitude.
LOG_UNDERFLOW = -80.0


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
    return torch.exp(seg.masked_fill(~incl | (seg < LOG_UNDERFLOW), float("-inf")))


def _exp_cumsum(x: torch.Tensor) -> torch.Tensor:
    """``exp(Σ_{m≤t} x_m)`` along the last dim, exactly 0 below ``e^LOG_UNDERFLOW``."""
    c = x.cumsum(-1)
    return torch.exp(c.masked_fill(c < LOG_UNDERFLOW, float("-inf")))


def chunk_coefficients(log_retain: torch.Tensor, log_eta: torch.Tensor, chunk_size: int, retrieval: str = "token") -> ChunkCoefficients:
    """Closed-form coefficients of every chunk from log gates ``[B, H, T]`` (differentiable).

    ``retrieval="chunk"`` rewrites only the read coefficients (``beta``, ``f``, ``C``): every row but a
    full chunk's last reads the chunk-start weights (``β = 1, f = 0, C = 0``), the last row keeps its
    inclusive read of the chunk's end weights. The write coefficients (``*_last``) are unchanged.
    """
    seq = log_retain.shape[-1]
    n_chunks = -(-seq // chunk_size)
    pad = n_chunks * chunk_size - seq
    # Padded tokens get neutral gates; their rows are never read (see the `_last` rows below).
    la = F.pad(log_retain, (0, pad)).unflatten(-1, (n_chunks, chunk_size))
    ln = F.pad(log_eta, (0, pad)).unflatten(-1, (n_chunks, chunk_size))
    l_beta = segsum_exp(la)
    l_eta = segsum_exp(ln)
    c = l_beta @ l_eta
    beta = _exp_cumsum(la)
    h = _exp_cumsum(ln)
    f = (l_beta @ h.unsqueeze(-1)).squeeze(-1)
    last = chunk_size - 1 - pad  # last real row of the final chunk
    if retrieval == "chunk":
        # Only row chunk_size − 1 ends a chunk; in a partial final chunk that row is padding, dropped later.
        ends = torch.zeros(chunk_size, dtype=torch.bool, device=la.device)
        ends[-1] = True
        read_beta = torch.where(ends, beta, torch.ones_like(beta))
        read_f = torch.where(ends, f, torch.zeros_like(f))
        read_c = torch.where(ends.unsqueeze(-1), c, torch.zeros_like(c))
    else:
        read_beta, read_f, read_c = beta, f, c

    def last_rows(x: torch.Tensor, matrix: bool) -> torch.Tensor:
        if matrix:
            full, tail = x[..., :-1, chunk_size - 1, :], x[..., -1:, last, :]
        else:
            full, tail = x[..., :-1, chunk_size - 1], x[..., -1:, last]
        return torch.cat([full, tail], dim=2)

    return ChunkCoefficients(
        beta=read_beta,
        f=read_f,
        C=read_c,
        beta_last=last_rows(beta, False),
        f_last=last_rows(f, False),
        h_last=last_rows(h, False),
        c_last=last_rows(c, True),
        e_last=last_rows(l_eta, True),
    )


def gate_coefficients(
    momentum: torch.Tensor, decay: torch.Tensor, dtype: torch.dtype, chunk_size: int, retrieval: str = "token"
) -> ChunkCoefficients:
    """:func:`chunk_coefficients` of the gates ``[batch, seq, heads]``, recomputed in backward under autograd.

    Recomputing is cheap (work ``O(seq · chunk_size)``) and saves the ``[B, H, N, b, b]`` masks and
    exponentials that autograd would otherwise keep for every chunk.
    """
    log_retain, log_eta = log_gates(momentum, decay, dtype)
    if torch.is_grad_enabled() and (log_retain.requires_grad or log_eta.requires_grad):
        return checkpoint(chunk_coefficients, log_retain, log_eta, chunk_size, retrieval, use_reentrant=False)
    return chunk_coefficients(log_retain, log_eta, chunk_size, retrieval)


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


def per_chunk(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``[B, H, N, ...] -> N`` contiguous ``[B, H, ...]`` tensors.

    Unbinding once matters for the backward: indexing ``x[:, :, n]`` inside the chunk loop would make
    autograd scatter every slice's gradient into a zero tensor of the full size (quadratic in chunks).
    """
    return x.movedim(2, 0).contiguous().unbind(0)


def _chunk_major(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, ...] -> [N, B, H, ...]`` contiguous: one chunk's operands are one contiguous block."""
    return x.movedim(2, 0).contiguous()


class _LinearChunkFunction(torch.autograd.Function):
    """Linear-memory dual form over chunk-major tensors with a hand-written backward.

    Shapes (``N`` chunks of ``b`` tokens, ``B, H`` batch and heads): ``q, k: [N, B, H, b, dk]``,
    ``v: [N, B, H, b, dv]``, ``theta, beta, f, c_last, e_last: [N, B, H, b, 1]``, ``c: [N, B, H, b, b]``,
    ``beta_last, f_last, h_last: [N, B, H, 1, 1]``, ``w0, s0: [B, H, dk, dv]``.

    Only the chunk-start states are saved (``2 N`` weight sets); errors and gradients are recomputed.
    Both passes work one chunk at a time into preallocated outputs, so no temporary grows with the
    sequence. Gradients of the coefficients are returned as such; autograd carries them to the gates
    through :func:`chunk_coefficients`.
    """

    @staticmethod
    def forward(ctx, q, k, v, theta, beta, f, c, beta_last, f_last, h_last, c_last, e_last, w0, s0):
        n_chunks = q.shape[0]
        ws = w0.new_empty(n_chunks, *w0.shape)
        ss = s0.new_empty(n_chunks, *s0.shape)
        y = v.new_empty(v.shape)
        w, s = w0, s0
        for n in range(n_chunks):
            ws[n], ss[n] = w, s
            kn, qn = k[n], q[n]
            # θ-weighted errors at the chunk start: θ_j u_j = k_jᵀ G_j.
            g = theta[n] * (kn @ w - v[n])
            # Reads of the per-token weights W_t through the intra-chunk "attention" C ⊙ Q Kᵀ.
            y[n] = beta[n] * (qn @ w) + f[n] * (qn @ s) - (c[n] * (qn @ kn.transpose(-1, -2))) @ g
            kt = kn.transpose(-1, -2)
            write_w = (kt * c_last[n].transpose(-1, -2)) @ g
            write_s = (kt * e_last[n].transpose(-1, -2)) @ g
            w, s = beta_last[n] * w + f_last[n] * s - write_w, h_last[n] * s - write_s
        ctx.save_for_backward(q, k, v, theta, beta, f, c, beta_last, f_last, h_last, c_last, e_last, ws, ss)
        return y, w, s

    @staticmethod
    def backward(ctx, dy, dw_final, ds_final):
        q, k, v, theta, beta, f, c, beta_last, f_last, h_last, c_last, e_last, ws, ss = ctx.saved_tensors
        n_chunks = q.shape[0]
        dy = torch.zeros_like(v) if dy is None else dy
        # dw, ds: gradients with respect to the state at the *end* of chunk n, walked backwards.
        dw = torch.zeros_like(ws[0]) if dw_final is None else dw_final
        ds = torch.zeros_like(ss[0]) if ds_final is None else ds_final
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        d_theta, d_beta, d_f, d_c_last, d_e_last = (torch.empty_like(x) for x in (theta, beta, f, c_last, e_last))
        d_c = torch.empty_like(c)
        d_beta_last, d_f_last, d_h_last = (torch.empty_like(beta_last) for _ in range(3))
        for n in range(n_chunks - 1, -1, -1):
            qn, kn, dyn, wn, sn = q[n], k[n], dy[n], ws[n], ss[n]
            kt, wt, st = kn.transpose(-1, -2), wn.transpose(-1, -2), sn.transpose(-1, -2)
            err = kn @ wn - v[n]
            g = theta[n] * err
            qk = qn @ kt
            cn = c[n]
            dg = -(cn * qk).transpose(-1, -2) @ dyn - (kn * e_last[n]) @ ds - (kn * c_last[n]) @ dw
            m_s = -g @ ds.transpose(-1, -2)  # from the momentum write −(K ⊙ Lη_last)ᵀ G
            m_w = -g @ dw.transpose(-1, -2)  # from the weight write −(K ⊙ C_last)ᵀ G
            d_h_last[n] = (ds * sn).sum((-1, -2), keepdim=True)
            d_beta_last[n] = (dw * wn).sum((-1, -2), keepdim=True)
            d_f_last[n] = (dw * sn).sum((-1, -2), keepdim=True)
            de = theta[n] * dg
            d_theta[n] = (dg * err).sum(-1, keepdim=True)
            d_scores = -dyn @ g.transpose(-1, -2)
            d_c[n] = d_scores * qk
            d_qk = d_scores * cn
            dq[n] = beta[n] * (dyn @ wt) + f[n] * (dyn @ st) + d_qk @ kn
            d_beta[n] = (dyn * (qn @ wn)).sum(-1, keepdim=True)
            d_f[n] = (dyn * (qn @ sn)).sum(-1, keepdim=True)
            dk[n] = d_qk.transpose(-1, -2) @ qn + de @ wt + e_last[n] * m_s + c_last[n] * m_w
            d_e_last[n] = (kn * m_s).sum(-1, keepdim=True)
            d_c_last[n] = (kn * m_w).sum(-1, keepdim=True)
            dv[n] = -de
            qt = qn.transpose(-1, -2)
            dw, ds = (
                (qt * beta[n].transpose(-1, -2)) @ dyn + beta_last[n] * dw + kt @ de,
                (qt * f[n].transpose(-1, -2)) @ dyn + h_last[n] * ds + f_last[n] * dw,
            )
        return dq, dk, dv, d_theta, d_beta, d_f, d_c, d_beta_last, d_f_last, d_h_last, d_c_last, d_e_last, dw, ds


def neural_memory_chunk_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    momentum: torch.Tensor,
    decay: torch.Tensor,
    chunk_size: int,
    state: LinearMemoryState,
    retrieval: str = "token",
) -> tuple[torch.Tensor, LinearMemoryState]:
    """Linear memory, chunked dual form with a hand-written backward (:class:`_LinearChunkFunction`).

    Args: as :func:`seqzoo.ops.neural_memory.neural_memory`, with a full fp32/fp64 ``state``; ``retrieval``
    as there (through :func:`chunk_coefficients`).
    Returns: ``(o [B, T, H, value_dim] in the state's dtype, final LinearMemoryState)``.
    """
    seq = q.shape[1]
    dtype = state.weight.dtype
    qc, kc, vc = (_chunk_major(to_chunks(x, chunk_size, dtype)) for x in (q, k, v))
    theta = _chunk_major(to_chunks(lr, chunk_size, dtype).unsqueeze(-1))
    coef = gate_coefficients(momentum, decay, dtype, chunk_size, retrieval)
    rows = (_chunk_major(x.unsqueeze(-1)) for x in (coef.beta, coef.f))
    scalars = (_chunk_major(x[..., None, None]) for x in (coef.beta_last, coef.f_last, coef.h_last))
    last_rows = (_chunk_major(x.unsqueeze(-1)) for x in (coef.c_last, coef.e_last))
    y, w, s = _LinearChunkFunction.apply(qc, kc, vc, theta, *rows, _chunk_major(coef.C), *scalars, *last_rows, state.weight, state.momentum)
    return from_chunks(y.movedim(0, 2), seq), LinearMemoryState(w, s)


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
    retrieval: str = "token",
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
    coef = gate_coefficients(momentum, decay, dtype, chunk_size, retrieval)
    scores1 = coef.C * (qc @ kc.transpose(-1, -2))
    act = spec.activation

    k_n, v_n, q_n, th_n = (per_chunk(x) for x in (kc, vc, qc, theta))
    beta_n, f_n = (per_chunk(x.unsqueeze(-1)) for x in (coef.beta, coef.f))
    c_n, sc_n = per_chunk(coef.C), per_chunk(scores1)
    bl_n, fl_n, hl_n = (per_chunk(x[..., None, None]) for x in (coef.beta_last, coef.f_last, coef.h_last))
    cw_n, cs_n = (per_chunk(x.unsqueeze(-2)) for x in (coef.c_last, coef.e_last))  # [B, H, 1, b] rows

    w1, w2, s1, s2 = state
    outs = []
    for n in range(qc.shape[2]):
        kn, vn, qn, beta, fc = k_n[n], v_n[n], q_n[n], beta_n[n], f_n[n]
        # Keys through the chunk-start MLP, then the θ-weighted per-token gradients at each layer's output.
        z1 = kn @ w1
        a = activation(z1, act)
        z2 = a @ w2
        if spec.residual_norm:
            head, xhat, rstd = layer_norm_head(z2, spec)
            g2 = layer_norm_head_grad(kn + head - vn, xhat, rstd, spec)
        else:
            g2 = z2 - vn
        g2 = th_n[n] * g2
        g1 = (g2 @ w2.transpose(-1, -2)) * activation_grad(z1, act)

        # Queries through the per-token weights W_t, layer by layer, in dual form.
        zq1 = beta * (qn @ w1) + fc * (qn @ s1) - sc_n[n] @ g1
        aq = activation(zq1, act)
        zq2 = beta * (aq @ w2) + fc * (aq @ s2) - (c_n[n] * (aq @ a.transpose(-1, -2))) @ g2
        outs.append(qn + layer_norm_head(zq2, spec)[0] if spec.residual_norm else zq2)

        bl, fl, hl, cw, cs = bl_n[n], fl_n[n], hl_n[n], cw_n[n], cs_n[n]
        kt, at = kn.transpose(-1, -2), a.transpose(-1, -2)
        w1, s1 = bl * w1 + fl * s1 - (kt * cw) @ g1, hl * s1 - (kt * cs) @ g1
        w2, s2 = bl * w2 + fl * s2 - (at * cw) @ g2, hl * s2 - (at * cs) @ g2

    y = torch.stack(outs, dim=2)
    return from_chunks(y, seq), MLPMemoryState(w1, w2, s1, s2)


def neural_memory_steps_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    momentum: torch.Tensor,
    decay: torch.Tensor,
    state: LinearMemoryState,
    base: torch.Tensor,
    phase: int,
    chunk_size: int,
    retrieval: str = "token",
) -> tuple[torch.Tensor, LinearMemoryState]:
    """The linear memory token by token inside one chunk, in closed form: the decoding path.

    For ``M(x) = xW`` the inner gradient at the chunk-start weights ``W0`` is ``k (k W0 − v)ᵀ``, so a token is
    ``S ← η S − θ k (k W0 − v)ᵀ;  W ← (1 − α) W + S;  o = q W`` (``o = q W0`` before the chunk's end with
    ``retrieval="chunk"``): a few batched small products per token, no chunk machinery and no autograd.

    Args:
        q, k: ``[batch, n, heads, key_dim]``; v: ``[batch, n, heads, value_dim]``; lr, momentum, decay:
            ``[batch, n, heads]`` (no ``None``); the ``n`` tokens all belong to the chunk in progress.
        state: the memory after the tokens before (``[batch, heads, key_dim, value_dim]`` each).
        base: ``W0``, the weights at the chunk's start, ``[batch, heads, key_dim, value_dim]``.
        phase: tokens of the chunk before this call; ``phase + n <= chunk_size``.

    Returns:
        ``(o [batch, n, heads, value_dim], state after the last token)`` in the state's dtype.
    """
    dtype = state.weight.dtype
    weight, mom = state.weight, state.momentum
    base = base.to(dtype)
    outputs = []
    for t in range(q.shape[1]):
        k_t, v_t, q_t = k[:, t].to(dtype), v[:, t].to(dtype), q[:, t].to(dtype)
        err = torch.einsum("bhk,bhkv->bhv", k_t, base) - v_t
        grad = k_t[..., :, None] * err[..., None, :]
        mom = momentum[:, t].to(dtype)[..., None, None] * mom - lr[:, t].to(dtype)[..., None, None] * grad
        weight = (1 - decay[:, t].to(dtype))[..., None, None] * weight + mom
        read = weight if retrieval == "token" or (phase + t + 1) % chunk_size == 0 else base
        outputs.append(torch.einsum("bhk,bhkv->bhv", q_t, read))
    return torch.stack(outputs, dim=1), LinearMemoryState(weight, mom)
