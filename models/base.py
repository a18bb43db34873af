"""The token-mixer base class: what every layer in the zoo offers."""

from __future__ import annotations

import torch
from torch import nn

from seqzoo.configs import ConfigError
from seqzoo.models.cache import LayerCache
from seqzoo.ops.core import OpInputError, check_backend


class TokenMixer(nn.Module):
    """Base of every registered token mixer.

    Contract:
        ``forward(x [batch, seq, hidden], cache=None) -> [batch, seq, hidden]``: the parallel (training)
        form when ``cache`` is ``None``; with a :class:`LayerCache` the layer continues from the state in
        it and updates it in place, so a prefill of any length followed by token-by-token calls equals
        one parallel call.
        ``state_size(batch=1, seq_len=None)``: bytes the cache holds after a prompt of ``seq_len`` tokens.
    """

    mixer_name: str = "?"

    def init_cache(self, batch_size: int) -> LayerCache:
        """An empty cache for ``batch_size`` sequences (filled by the first ``forward``)."""
        return LayerCache(batch_size)

    def state_size(self, batch: int = 1, seq_len: int | None = None) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def head_dim_for(layer: str, hidden_size: int, num_heads: int, head_dim: int | None = None) -> int:
    """The per-head width of a multi-head mixer: ``head_dim`` when given, else ``hidden_size // num_heads``.

    The one head-count rule every mixer follows: ``num_heads >= 1``, and a derived head width must split
    ``hidden_size`` exactly (a remainder would silently drop channels: 63 over 4 heads would project to 60).
    An explicit ``head_dim`` sets the projected width ``num_heads · head_dim`` on purpose and is taken as is.
    Raises a one-line :class:`ConfigError` ``"<layer>: num_heads (…) must divide hidden_size …"``.
    """
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ConfigError(f"{layer}: num_heads must be an integer >= 1, got {num_heads!r}")
    if head_dim is None:
        if hidden_size % num_heads:
            raise ConfigError(f"{layer}: num_heads ({num_heads}) must divide hidden_size {hidden_size} (or set head_dim)")
        head_dim = hidden_size // num_heads
    return head_dim


def check_hidden(layer: str, x: torch.Tensor, hidden_size: int) -> None:
    """One-line error unless ``x`` is a floating ``[batch, seq, hidden_size]`` tensor."""
    if x.dim() != 3 or x.shape[-1] != hidden_size:
        raise ValueError(f"{layer}: expected input [batch, seq, {hidden_size}], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{layer}: expected a floating-point input, got dtype {x.dtype}")


def op_backend(layer: str, op: str, backend: str, available: tuple[str, ...]) -> str:
    """A layer's ``backend`` option for op ``op``: checked once, when the layer is built, against the op's own
    vocabulary (:func:`seqzoo.ops.core.check_backend`); a bad name is a one-line :class:`ConfigError`.

    Whether the backend can run on the device is known only when the op is called; the op reports that.
    """
    try:
        check_backend(op, backend, available)
    except OpInputError as err:
        raise ConfigError(f"{layer}: backend: {err}") from None
    return backend
