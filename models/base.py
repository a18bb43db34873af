"""The token-mixer base class: what every layer in the zoo offers, and the one cache discipline they share."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from seqzoo.configs import ConfigError
from seqzoo.models.cache import LayerCache
from seqzoo.ops.core import OpInputError, check_backend

StateShapes = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass(frozen=True)
class Call:
    """How the tokens of one mixer call are laid out: a dense batch, or sequences packed along ``seq``.

    Attributes:
        batch, seq: the input's ``[batch, seq]``.
        cu_seqlens: ``[num_seqs + 1]`` offsets of sequences packed along ``seq`` (``batch == 1``), or ``None``.
        offsets: host copy of ``cu_seqlens`` (``None`` for a dense batch).
        start: tokens each sequence had consumed before this call (its first token's position): the cache's
            ``seen`` per row, zeros without a cache.
    """

    batch: int
    seq: int
    cu_seqlens: torch.Tensor | None
    offsets: tuple[int, ...] | None
    start: tuple[int, ...]

    @classmethod
    def of(cls, layer: str, x: torch.Tensor, cache: LayerCache | None, cu_seqlens: torch.Tensor | None) -> Call:
        """The layout of ``x [batch, seq, hidden]`` (checked against ``cache`` and ``cu_seqlens``; one-line errors)."""
        batch, seq = x.shape[:2]
        offsets = None
        if cu_seqlens is not None:
            if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"{layer}: cu_seqlens must be a 1-D int32 or int64 tensor of offsets")
            if batch != 1:
                raise ValueError(f"{layer}: cu_seqlens needs x of batch 1 (sequences packed along seq), got batch {batch}")
            offsets = tuple(int(o) for o in cu_seqlens.tolist())
            if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != seq or any(b <= a for a, b in zip(offsets[:-1], offsets[1:])):
                raise ValueError(f"{layer}: cu_seqlens must rise strictly from 0 to seq={seq}, got {list(offsets)}")
        rows = batch if offsets is None else len(offsets) - 1
        if cache is not None and cache.batch_size != rows:
            what = "packed sequences" if offsets is not None else "batch rows"
            raise ValueError(f"{layer}: the cache holds {cache.batch_size} rows but the call has {rows} {what}")
        start = tuple(cache.seen) if cache is not None else (0,) * rows
        return cls(batch, seq, cu_seqlens, offsets, start)

    @property
    def packed(self) -> bool:
        """Whether sequences are packed along ``seq`` (``cu_seqlens`` given)."""
        return self.offsets is not None

    @property
    def num_seqs(self) -> int:
        """Sequences of the call: batch rows, or packed sequences."""
        return self.batch if self.offsets is None else len(self.offsets) - 1

    @property
    def lengths(self) -> list[int]:
        """Tokens of each sequence in this call."""
        if self.offsets is None:
            return [self.seq] * self.batch
        return [b - a for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    @property
    def uniform_start(self) -> int | None:
        """The common position of every sequence's first token, or ``None`` when they differ."""
        return self.start[0] if len(set(self.start)) == 1 else None

    def positions(self, device: torch.device) -> torch.Tensor:
        """Absolute position of every token within its own sequence, ``[batch, seq]`` (long)."""
        if self.offsets is None:
            base = torch.tensor(self.start, device=device)[:, None]
            return base + torch.arange(self.seq, device=device)[None, :]
        pieces = [torch.arange(s, s + n, device=device) for s, n in zip(self.start, self.lengths)]
        return torch.cat(pieces)[None, :]

    def sequence_ids(self, device: torch.device) -> torch.Tensor:
        """Which packed sequence every token belongs to, ``[seq]`` (long; all 0 for a dense call)."""
        if self.offsets is None:
            return torch.zeros(self.seq, dtype=torch.long, device=device)
        return torch.repeat_interleave(torch.arange(self.num_seqs, device=device), torch.tensor(self.lengths, device=device))


class TokenMixer(nn.Module):
    """Base of every registered token mixer.

    Contract:
        ``forward(x [batch, seq, hidden], cache=None, *, cu_seqlens=None) -> [batch, seq, hidden]``:
        the parallel (training) form when ``cache`` is ``None``; with a :class:`LayerCache` the layer
        continues from the state in it and updates it, so a prefill of any length followed by
        token-by-token calls equals one parallel call. With ``cu_seqlens`` (``[num_seqs + 1]`` offsets,
        batch 1) the sequences packed along ``seq`` are independent documents: nothing of one reaches
        another, and each starts at position 0 (or, with a cache of ``num_seqs`` rows, at its row's
        position: a packed prefill of several prompts leaves one state per prompt).
        ``state_size(batch=1, seq_len=None)``: bytes the cache holds after a prompt of ``seq_len`` tokens.

    A subclass implements :meth:`mix` (its computation, given the call's :class:`Call`) and
    :meth:`state_shapes` (the state it keeps, per row); this class checks the input, reads the layout,
    advances the cache's positions, and, for a mixer that cannot hold rows at different positions
    (``ragged_rows = False``), runs such caches row by row.
    """

    mixer_name: str = "?"
    #: Whether :meth:`mix` handles a cache whose rows sit at different positions, and packed prefills with a cache.
    ragged_rows: bool = True
    #: Whether the mixer is a whole pre-norm residual block with its own norms (SCOUT's four sub-layers): the
    #: language model's block then feeds it the raw residual stream instead of ``RMSNorm(x)`` and adds its
    #: output, the block's residual update.
    owns_norm: bool = False
    hidden_size: int

    def init_cache(self, batch_size: int) -> LayerCache:
        """An empty cache for ``batch_size`` sequences (filled by the first ``forward``)."""
        return LayerCache(batch_size)

    def state_shapes(self, seq_len: int | None = None) -> StateShapes:  # pragma: no cover - abstract
        """The cache entries after a prompt of ``seq_len`` tokens, per row: ``{name: (shape, dtype)}``
        (``seq_len=None``: the most the cache ever holds, where that is bounded)."""
        raise NotImplementedError

    def state_size(self, batch: int = 1, seq_len: int | None = None) -> int:
        """Bytes of the decode state of ``batch`` rows after a prompt of ``seq_len`` tokens (equals ``cache.nbytes()``)."""
        shapes = self.state_shapes(seq_len)
        return batch * sum(math.prod(shape) * dtype.itemsize for shape, dtype in shapes.values())

    def state_dtype(self) -> torch.dtype:
        """The dtype of recurrent states: fp32, or fp64 for a float64 model (exact tests)."""
        param = next(self.parameters(), None)
        return torch.float64 if param is not None and param.dtype == torch.float64 else torch.float32

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None, *, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """``x: [batch, seq, hidden] -> [batch, seq, hidden]``; with ``cache``, continue after its tokens."""
        check_hidden(self.mixer_name, x, self.hidden_size)
        call = Call.of(self.mixer_name, x, cache, cu_seqlens)
        if cache is not None and not self.ragged_rows and (cache.rows is not None or cache.ragged or call.packed):
            y = self._row_by_row(x, cache, call)
        else:
            y = self.mix(x, cache, call)
        if cache is not None:
            cache.advance(call.lengths)
        return y

    def mix(self, x: torch.Tensor, cache: LayerCache | None, call: Call) -> torch.Tensor:  # pragma: no cover - abstract
        """The layer itself: ``[batch, seq, hidden] -> [batch, seq, hidden]`` laid out as ``call`` says;
        reads and writes ``cache``'s tensors (its ``seen`` is advanced by :meth:`forward` afterwards)."""
        raise NotImplementedError

    def _row_by_row(self, x: torch.Tensor, cache: LayerCache, call: Call) -> torch.Tensor:
        """Each sequence on its own single-row cache: for mixers whose state has a per-row length."""
        rows = cache.split_rows()
        if call.packed:
            pieces = [x[:, a:b] for a, b in zip(call.offsets[:-1], call.offsets[1:])]
        else:
            pieces = [x[i : i + 1] for i in range(call.batch)]
        outs = [self.mix(piece, row, Call.of(self.mixer_name, piece, row, None)) for piece, row in zip(pieces, rows)]
        return torch.cat(outs, dim=1 if call.packed else 0)


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
