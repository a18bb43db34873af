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
