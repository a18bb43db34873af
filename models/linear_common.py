"""Plumbing shared by the linear-attention family of mixers (linear attention, RetNet, GLA, HGRN-2,
DeltaNet, Gated DeltaNet, Mamba-2).

Every one of them does the same three things around its own gates and norms: run short causal convs
whose tails live in the cache, call one :mod:`seqzoo.ops` function with the cached recurrent state as
``initial_state``, and report the bytes of that state. :class:`LinearMixer` does them once; a layer
only writes :meth:`LinearMixer.mix`. Also here: the Mamba-2-style ``A_log``/``dt_bias`` inits that
Gated DeltaNet and Mamba-2 share.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch
from einops import rearrange
from torch import nn

from seqzoo.configs import ConfigError
from seqzoo.models.base import Call, StateShapes, TokenMixer, op_backend
from seqzoo.models.cache import LayerCache
from seqzoo.models.modules import ShortConvolution

__all__ = ["LinearMixer", "init_a_log", "init_dt_bias", "merge_heads", "no_weight_decay", "require", "split_heads"]


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[batch, seq, heads·head_dim] -> [batch, seq, heads, head_dim]``."""
    return rearrange(x, "b t (h d) -> b t h d", d=head_dim)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[batch, seq, heads, head_dim] -> [batch, seq, heads·head_dim]``."""
    return rearrange(x, "b t h d -> b t (h d)")


def require(layer: str, condition: bool, message: str) -> None:
    """Raise a one-line :class:`ConfigError` ``"<layer>: <message>"`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{layer}: {message}")


def no_weight_decay(param: nn.Parameter) -> nn.Parameter:
    """Flag ``param`` so the optimizer exempts it from weight decay (decay logs, dt biases); returns it."""
    param._no_weight_decay = True
    return param


def init_a_log(num_heads: int, low: float, high: float) -> nn.Parameter:
    """Mamba-2 decay rates: ``A ~ U(low, high)`` per head, stored as ``A_log = log A`` (no weight decay).

    The layer uses ``−exp(A_log)``, so the decay rate stays negative whatever the optimizer does.
    ``low = 0`` (Gated DeltaNet) is clamped to the smallest positive float so ``log A`` is finite.
    """
    a = torch.empty(num_heads).uniform_(low, high).clamp_min(torch.finfo(torch.float32).tiny)
    return no_weight_decay(nn.Parameter(a.log()))


def init_dt_bias(num_heads: int, dt_min: float = 1e-3, dt_max: float = 1e-1, dt_floor: float = 1e-4) -> nn.Parameter:
    """Mamba step-size bias: ``dt ~ logU(dt_min, dt_max)`` (floored), stored as ``softplus⁻¹(dt)``.

    ``softplus(dt_bias) = dt`` exactly at init, so a zero-input step size starts in ``[dt_min, dt_max]``.
    """
    log_dt = torch.rand(num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = log_dt.exp().clamp_min(dt_floor)
    # softplus⁻¹(dt) = log(expm1(dt)) = dt + log(1 − e^{−dt}), the form that is exact for small dt.
    return no_weight_decay(nn.Parameter(dt + torch.log(-torch.expm1(-dt))))


class LinearMixer(TokenMixer):
    """Base of the mixers whose decode state is one fp32 ``[batch, heads, key_dim, value_dim]`` matrix
    plus the tails of their short convolutions.

    Subclasses call :meth:`set_op`, :meth:`set_state_shape` and :meth:`add_conv` in ``__init__`` and implement
    :meth:`mix`, using :meth:`conv` and :meth:`run_op`; :meth:`forward` and :meth:`state_size` come
    from here. Cache entries: ``"recurrent"`` (the op's state, fp32) and ``"conv_<name>"``
    (``[batch, kernel_size − 1, channels]``, the last inputs of each conv).
    """

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleDict()
        self._state_shape: tuple[int, int, int] | None = None
        self.backend = "auto"

    def set_op(self, op: str, backend: str) -> None:
        """Name the ``seqzoo.ops`` function this layer runs and the backend it asks for (the ``backend``
        config option); an unknown name or one the op lacks is a one-line :class:`ConfigError` here."""
        self.backend = op_backend(self.mixer_name, op, backend, importlib.import_module(f"seqzoo.ops.{op}").BACKENDS)

    def set_state_shape(self, heads: int, key_dim: int, value_dim: int) -> None:
        """Declare the recurrent state ``[heads, key_dim, value_dim]`` per sequence (for :meth:`state_size`)."""
        self._state_shape = (heads, key_dim, value_dim)

    def add_conv(self, name: str, channels: int, kernel_size: int, activation: str | None = "silu", bias: bool = False) -> None:
        """A causal depthwise conv ``name`` over ``channels`` whose tail is cached as ``conv_<name>``."""
        self.convs[name] = ShortConvolution(channels, kernel_size, activation, bias)

    def conv(self, name: str, x: torch.Tensor, cache: LayerCache | None, call: Call) -> torch.Tensor:
        """Run conv ``name`` on ``x: [batch, seq, channels]``, continuing from (and updating) its cached tail;
        packed sequences (``call.offsets``) are convolved separately, each with its own tail."""
        key = f"conv_{name}"
        state = None if cache is None else cache.get(key)
        y, tail = self.convs[name](x, state, output_state=cache is not None, offsets=call.offsets)
        if cache is not None:
            cache.set(key, tail)
        return y

    def run_op(
        self, op: Callable[..., tuple[torch.Tensor, torch.Tensor | None]], *args, cache: LayerCache | None, call: Call, **kwargs
    ) -> torch.Tensor:
        """``op(*args, initial_state=cached, output_final_state=…, cu_seqlens=…, backend=self.backend, **kwargs)``;
        stores the new state in ``cache``.

        Without a cache this is the op's parallel form from a zero state; with one, the op continues from
        ``cache["recurrent"]``, so the same call serves prefill and token-by-token decoding. Packed sequences
        (``call.cu_seqlens``) each run from their own row of the cache. Returns ``[batch, seq, heads, value_dim]``.
        """
        initial = None if cache is None else cache.get("recurrent")
        o, final = op(
            *args, initial_state=initial, output_final_state=cache is not None, cu_seqlens=call.cu_seqlens, backend=self.backend, **kwargs
        )
        if cache is not None:
            cache.set("recurrent", final)
        return o

    def state_shapes(self, seq_len: int | None = None) -> StateShapes:
        """The recurrent matrix (fp32, fp64 for a float64 model) and every conv tail; independent of ``seq_len``."""
        assert self._state_shape is not None, "LinearMixer subclasses must call set_state_shape"
        shapes: StateShapes = {"recurrent": (self._state_shape, self.state_dtype())}
        for name, conv in self.convs.items():
            shapes[f"conv_{name}"] = ((conv.kernel_size - 1, conv.conv.in_channels), conv.conv.weight.dtype)
        return shapes
