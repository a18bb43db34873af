"""Decoding caches: the recurrent state each layer carries from one call to the next."""

from __future__ import annotations

import torch


class LayerCache:
    """The decoding state of one token mixer, updated in place by the mixer's ``forward``.

    ``tensors`` maps a state name (``"key"``, ``"value"``, ``"recurrent"``, ``"conv_q"``, …) to a tensor
    whose first dimension is the batch; ``seen_tokens`` counts the tokens consumed so far (positions
    for RoPE, chunk phase for chunked memories). An empty cache means "nothing seen yet".
    """

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.seen_tokens = 0
        self.tensors: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor | None:
        """The state ``name``, or ``None`` before the first call."""
        return self.tensors.get(name)

    def set(self, name: str, value: torch.Tensor) -> None:
        """Store state ``name``, detached and compact.

        Detached: a cache never carries an autograd graph between calls. Compact: a view into a larger
        buffer (a conv tail, the last state or the pending tokens of a prefill) is copied, otherwise the
        cache would keep the whole prefill buffer alive while :meth:`nbytes` counts only the view.
        """
        value = value.detach()
        if value.untyped_storage().nbytes() != value.numel() * value.element_size():
            value = value.clone(memory_format=torch.contiguous_format)
        self.tensors[name] = value

    def nbytes(self) -> int:
        """Bytes held by all state tensors (what :meth:`state_size` of the mixer predicts)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class ModelCache:
    """One :class:`LayerCache` per layer of a :class:`~seqzoo.models.LanguageModel`."""

    def __init__(self, layers: list[LayerCache]) -> None:
        self.layers = layers

    def __getitem__(self, idx: int) -> LayerCache:
        return self.layers[idx]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def seen_tokens(self) -> int:
        """Tokens consumed so far (the same for every layer)."""
        return self.layers[0].seen_tokens if self.layers else 0

    def nbytes(self) -> int:
        """Bytes held by every layer's state."""
        return sum(layer.nbytes() for layer in self.layers)
