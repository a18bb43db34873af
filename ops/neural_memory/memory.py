"""State containers and the deep (MLP) memory model shared by every neural-memory backend.

The memory of one (sequence, head) pair maps a key row-vector to a value row-vector:

* linear memory ``M(x) = x W`` with ``W: [key_dim, value_dim]``;
* MLP memory ``M(x) = σ(x W1) W2`` with ``W1: [key_dim, hidden]``, ``W2: [hidden, value_dim]``, optionally
  with a residual LayerNorm head ``M(x) = x + γ ⊙ LN(σ(x W1) W2) + b`` (TTT's ``x + LN(f(x))``; needs
  ``key_dim == value_dim``). ``γ, b: [heads, value_dim]`` are *outer* parameters: the inner loop does not
  update them, gradients reach them like any other input. The MLP has no biases (as titans-pytorch's
  ``MemoryMLP``).

The inner loss is ``½‖M(k) − v‖²`` summed over the value dimension, so the linear memory's gradient is
``k (Wᵀk − v)ᵀ``; titans-pytorch's mean-over-d loss corresponds to ``lr`` scaled by ``2 / value_dim``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

ACTIVATIONS = ("gelu", "silu", "relu", "tanh")


class LinearMemoryState(NamedTuple):
    """State of the linear memory; both fields ``[batch, heads, key_dim, value_dim]``, fp32 (fp64 for fp64 inputs)."""

    weight: torch.Tensor
    """``W``: the memory's weights."""
    momentum: torch.Tensor
    """``S``: the momentum ("past surprise") of ``W``."""


class MLPMemoryState(NamedTuple):
    """State of the 2-layer MLP memory: its weights, then their momenta (same shapes).

    ``w1, s1: [batch, heads, key_dim, hidden]``; ``w2, s2: [batch, heads, hidden, value_dim]``.
    A learned per-head init ``[heads, ...]`` is expanded to the batch by the caller
    (``w.expand(batch, -1, -1, -1)``); start the momenta at zero.
    """

    w1: torch.Tensor
    w2: torch.Tensor
    s1: torch.Tensor
    s2: torch.Tensor


class MLPSpec(NamedTuple):
    """Everything about the MLP memory that is not state (validated by the public function)."""

    activation: str = "gelu"
    residual_norm: bool = False
    ln_weight: torch.Tensor | None = None  # [heads, value_dim], the LN gain γ (1 when None)
    ln_bias: torch.Tensor | None = None  # [heads, value_dim], the LN bias b (0 when None)
    eps: float = 1e-5


def activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """The hidden activation σ (GELU is the exact erf form)."""
    if name == "gelu":
        return F.gelu(x)
    if name == "silu":
        return F.silu(x)
    if name == "relu":
        return F.relu(x)
    return torch.tanh(x)


def activation_grad(x: torch.Tensor, name: str) -> torch.Tensor:
    """σ'(x) in closed form, itself differentiable: the dual form needs it for second-order gradients."""
    if name == "gelu":
        cdf = 0.5 * (1 + torch.erf(x * (1 / math.sqrt(2))))
        pdf = torch.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi))
        return cdf + x * pdf
    if name == "silu":
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))
    if name == "relu":
        return (x > 0).to(x.dtype)
    t = torch.tanh(x)
    return 1 - t * t


def _ln_affine(spec: MLPSpec, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """γ and b as ``[1, heads, 1, value_dim]`` for ``[batch, heads, n, value_dim]`` tensors."""
    w = None if spec.ln_weight is None else spec.ln_weight.to(dtype)[None, :, None, :]
    b = None if spec.ln_bias is None else spec.ln_bias.to(dtype)[None, :, None, :]
    return w, b


def layer_norm_head(z: torch.Tensor, spec: MLPSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``γ ⊙ LN(z) + b`` over the last dim of ``z [batch, heads, n, value_dim]``.

    Returns ``(output, x̂, 1/σ)``; the normalised ``x̂`` and ``1/σ [.., n, 1]`` feed :func:`layer_norm_head_grad`.
    """
    mu = z.mean(-1, keepdim=True)
    zc = z - mu
    rstd = torch.rsqrt(zc.pow(2).mean(-1, keepdim=True) + spec.eps)
    xhat = zc * rstd
    w, b = _ln_affine(spec, z.dtype)
    out = xhat if w is None else xhat * w
    if b is not None:
        out = out + b
    return out, xhat, rstd


def layer_norm_head_grad(dout: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor, spec: MLPSpec) -> torch.Tensor:
    """Backward of :func:`layer_norm_head` to its input ``z`` (closed form, differentiable)."""
    w, _ = _ln_affine(spec, dout.dtype)
    g = dout if w is None else dout * w
    return rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))


def mlp_apply(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, spec: MLPSpec) -> torch.Tensor:
    """The MLP memory with fixed weights: ``x [batch, heads, n, key_dim] -> [batch, heads, n, value_dim]``."""
    z2 = activation(x @ w1, spec.activation) @ w2
    if not spec.residual_norm:
        return z2
    return x + layer_norm_head(z2, spec)[0]
