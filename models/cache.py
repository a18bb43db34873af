"""Decoding caches: the recurrent state each layer carries from one call to the next.

One discipline for every mixer (:class:`~seqzoo.models.base.TokenMixer` applies it):

* a :class:`LayerCache` holds one layer's state for ``batch_size`` rows: named tensors whose first dimension
  is the row, and ``seen``, the tokens each row has consumed (its next position: RoPE offsets, the phase of
  a chunked memory or of a segment). Rows may have seen different numbers of tokens: prompts of different
  lengths prefilled in one packed call.
* The base class advances ``seen`` after every call; a mixer only reads its state and writes the new one.
* A mixer that cannot work on rows at different positions at once (its state has a per-row length, like
  Titans' pending tokens) is run row by row: the cache then keeps one single-row cache per row in
  :attr:`LayerCache.rows`.
* ``state_size(batch, seq_len)`` of a mixer equals :meth:`LayerCache.nbytes` after a prompt of
  ``seq_len`` tokens: both come from the state the mixer declares (``TokenMixer.state_shapes``).
"""

from __future__ import annotations

import torch


class LayerCache:
    """The decoding state of one token mixer, updated in place by the mixer's ``forward``.

    Attributes:
        batch_size: rows (sequences) of the cache.
        seen: tokens consumed so far by each row.
        tensors: state name (``"key"``, ``"recurrent"``, ``"conv_q"``, …) → tensor ``[batch_size, …]``.
        rows: ``None``, or one single-row :class:`LayerCache` per row for mixers run row by row.
    """

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.seen: list[int] = [0] * batch_size
        self.tensors: dict[str, torch.Tensor] = {}
        self.rows: list[LayerCache] | None = None

    @property
    def seen_tokens(self) -> int:
        """Tokens consumed so far, when every row has seen the same number (else a one-line error)."""
        if len(set(self.seen)) > 1:
            raise ValueError(f"LayerCache: rows have seen different numbers of tokens {self.seen}; read cache.seen")
        return self.seen[0] if self.seen else 0

    @property
    def ragged(self) -> bool:
        """Whether the rows have seen different numbers of tokens."""
        return len(set(self.seen)) > 1

    def advance(self, counts: list[int]) -> None:
        """Add ``counts[i]`` tokens to row ``i`` (the base class calls this after every forward)."""
        self.seen = [s + c for s, c in zip(self.seen, counts)]
        if self.rows is not None:
            for row, count in zip(self.rows, counts):
                row.seen = [row.seen[0] + count]

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

    def split_rows(self) -> list[LayerCache]:
        """This cache as single-row caches (made once; afterwards :attr:`rows` is what the mixer updates)."""
        if self.rows is None:
            rows = []
            for i in range(self.batch_size):
                row = LayerCache(1)
                row.seen = [self.seen[i]]
                row.tensors = {name: t[i : i + 1] for name, t in self.tensors.items()}
                rows.append(row)
            self.rows, self.tensors = rows, {}
        return self.rows

    def nbytes(self) -> int:
        """Bytes held by all state tensors (what the mixer's ``state_size`` predicts)."""
        if self.rows is not None:
            return sum(row.nbytes() for row in self.rows)
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def scope(self, prefix: str) -> ScopedCache:
        """This cache as seen by a mixer nested inside another: its state names get ``prefix`` (see :class:`ScopedCache`)."""
        return ScopedCache(self, prefix)


class ScopedCache(LayerCache):
    """A view of a :class:`LayerCache` whose state names carry a prefix, for a mixer nested inside another.

    A layer built from sub-mixers (SCOUT: a sliding-window attention or Mamba-2 mixer, then checkpoint
    attention) hands each one ``cache.scope("local_")``: the sub-mixer reads and writes ``key`` as usual and
    the tensor lives in the parent as ``local_key``, so two sub-mixers never collide and the parent's
    :meth:`nbytes` counts them all. Rows and positions (``seen``) are the parent's.
    """

    def __init__(self, parent: LayerCache, prefix: str) -> None:  # no LayerCache state of its own: all is the parent's
        self.parent, self.prefix = parent, prefix

    @property
    def batch_size(self) -> int:  # type: ignore[override]
        return self.parent.batch_size

    @property
    def seen(self) -> list[int]:  # type: ignore[override]
        return self.parent.seen

    @property
    def rows(self) -> list[LayerCache] | None:  # type: ignore[override]
        return self.parent.rows

    @property
    def tensors(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        n = len(self.prefix)
        return {name[n:]: t for name, t in self.parent.tensors.items() if name.startswith(self.prefix)}

    def get(self, name: str) -> torch.Tensor | None:
        return self.parent.get(self.prefix + name)

    def set(self, name: str, value: torch.Tensor) -> None:
        self.parent.set(self.prefix + name, value)

    def advance(self, counts: list[int]) -> None:
        raise RuntimeError("ScopedCache: positions belong to the parent cache, which its own mixer advances")

    def split_rows(self) -> list[LayerCache]:
        raise RuntimeError("ScopedCache: split the parent cache, not a view of it")


class ModelCache:
    """One :class:`LayerCache` per layer of a :class:`~seqzoo.models.LanguageModel`."""

    def __init__(self, layers: list[LayerCache]) -> None:
        self.layers = layers

    def __getitem__(self, idx: int) -> LayerCache:
        return self.layers[idx]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def batch_size(self) -> int:
        """Rows of every layer's cache."""
        return self.layers[0].batch_size if self.layers else 0

    @property
    def seen(self) -> list[int]:
        """Tokens consumed so far by each row (the same for every layer)."""
        return list(self.layers[0].seen) if self.layers else []

    @property
    def seen_tokens(self) -> int:
        """Tokens consumed so far when every row has seen the same number (see :attr:`LayerCache.seen_tokens`)."""
        return self.layers[0].seen_tokens if self.layers else 0

    def nbytes(self) -> int:
        """Bytes held by every layer's state."""
        return sum(layer.nbytes() for layer in self.layers)
