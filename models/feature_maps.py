"""Feature maps φ for linear attention: ``φ(q)·φ(k)`` stands in for the softmax kernel ``exp(q·k)``.

One module shared by every layer that needs a kernel feature map (``linear_attention``, and Based,
which is ``linear_attention`` with the Taylor map). Each map acts on the last dimension:
``[..., dim] -> [..., feature_size(dim)]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqzoo.configs import ConfigError

__all__ = ["FEATURE_MAPS", "EluFeatureMap", "FeatureMap", "IdentityFeatureMap", "TaylorFeatureMap", "build_feature_map"]


class FeatureMap(nn.Module):
    """Base of the parameter-free feature maps.

    Attributes:
        positive: ``φ(q)·φ(k) > 0`` for every ``q, k``, so a normaliser ``φ(q)·Σφ(k)`` cannot vanish.
        kernel_scaled: the map already carries the ``1/√dim`` temperature of the kernel, so the layer
            must call the op with ``scale=1``.
    """

    positive: bool = False
    kernel_scaled: bool = False

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def feature_size(self) -> int:
        """Width of ``φ(x)`` for inputs of width ``dim``."""
        return self.dim


class IdentityFeatureMap(FeatureMap):
    """``φ(x) = x``: plain (unnormalised) linear attention, ``o_t = Σ_{s≤t} (q_t·k_s) v_s``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class EluFeatureMap(FeatureMap):
    """``φ(x) = elu(x) + 1`` (Katharopoulos et al. 2020): strictly positive features."""

    positive = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x) + 1.0


class TaylorFeatureMap(FeatureMap):
    """Based's second-order Taylor map, ``φ(q)·φ(k) = 1 + q·k/√d + (q·k)²/(2d) ≈ exp(q·k/√d)``.

    ``φ(x) = [1, x/d^{1/4}, x_i²/(√2·√d) for i, x_i·x_j/√d for i<j]`` has ``1 + d + d(d+1)/2`` features
    (153 for ``d = 16``): the quadratic term keeps only the upper triangle of ``x ⊗ x``, with the
    off-diagonal entries weighted so that the dot product still counts each pair twice. The
    kernel is ``1 + a + a²/2 ≥ 1/2`` for ``a = q·k/√d``, so it is positive and carries its own temperature.
    """

    positive = True
    kernel_scaled = True

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        for name, value in self._indices().items():
            self.register_buffer(name, value, persistent=False)

    def _indices(self) -> dict[str, torch.Tensor]:
        rows, cols = torch.triu_indices(self.dim, self.dim)
        # √2 on the off-diagonal: Σ_{i<j} 2 q_i q_j k_i k_j + Σ_i q_i² k_i² = (q·k)².
        weight = torch.where(rows == cols, 1.0, math.sqrt(2.0)) / math.sqrt(2.0 * self.dim)
        return {"rows": rows, "cols": cols, "quad_weight": weight}

    def reset_buffers(self) -> None:
        """Recompute the non-persistent index buffers (a model built on the meta device, as HF's loader does, has none)."""
        for name, value in self._indices().items():
            setattr(self, name, value.to(getattr(self, name).device))

    def feature_size(self) -> int:
        return 1 + self.dim + self.dim * (self.dim + 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The squared term grows fast (|q·k|² / 2 for unnormalised inputs): build it in at least fp32, never bf16.
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        linear = xf / self.dim**0.25
        quad = xf[..., self.rows] * xf[..., self.cols] * self.quad_weight.to(xf.dtype)
        ones = torch.ones_like(xf[..., :1])
        return torch.cat([ones, linear, quad], dim=-1).to(x.dtype)


FEATURE_MAPS: dict[str, type[FeatureMap]] = {"identity": IdentityFeatureMap, "elu": EluFeatureMap, "taylor": TaylorFeatureMap}


def build_feature_map(name: str, dim: int) -> FeatureMap:
    """The feature map ``name`` (``identity``, ``elu`` or ``taylor``) for inputs of width ``dim``."""
    if name not in FEATURE_MAPS:
        raise ConfigError(f"unknown feature map {name!r}; choose one of {', '.join(FEATURE_MAPS)}")
    return FEATURE_MAPS[name](dim)
