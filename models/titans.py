"""Titans (Behrouz, Zhong, Mirrokni 2024): the neural long-term memory layer and the MAC/MAG/MAL hybrids.

* ``titans_lmm``: the memory alone as an attention-free token mixer.
* ``titans_mag``: sliding-window attention with persistent K/V, gated by the memory branch.
* ``titans_mal``: the memory layer, then sliding-window attention with persistent K/V on its output.
* ``titans_mac``: memory as context, read causally: per segment, the memory as of the previous segment
  is read with the segment's tokens and its readings join the attention context causally; the
  attention output is then written into the memory token by token and gates the output.

Where the paper leaves a choice open (gate parametrisation, the MAG gate, persistent memory) or is not
causal as written (MAC), the docstrings say what these layers do and why; ``docs/titans.md`` has the
longer account.

The attention is :mod:`seqzoo.models.attention`'s (the ``Attention`` mixer with ``num_persistent`` for MAG
and MAL, its ``causal_mask`` and ``persistent_attention`` for MAC's segment context). The paper's
persistent memory (learned tokens prepended to the input) is read as learned keys and values of each
attention, seen by every query and never windowed out: causal, nothing to cache, and it never passes
through the neural memory.
The memory itself is :func:`seqzoo.ops.neural_memory`; layers only project, convolve and gate around it.
Its chunks count from the start of each call, so a streaming layer keeps the memory state of the last
chunk boundary plus the projected inputs of the tokens after it (fewer than ``chunk_size``) and
recomputes that partial chunk from the boundary on every call: the same numbers as one parallel call,
because every gradient inside a chunk is taken at the chunk-start weights.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from seqzoo.configs import ConfigError
from seqzoo.models.attention import Attention, causal_mask, persistent_attention
from seqzoo.models.base import Call, StateShapes, TokenMixer, head_dim_for
from seqzoo.models.cache import LayerCache
from seqzoo.models.modules import GatedRMSNorm, RMSNorm, RotaryEmbedding, ShortConvolution, recompute_pays, upcast
from seqzoo.models.registry import register_mixer
from seqzoo.ops import LinearMemoryState, MLPMemoryState, l2norm, neural_memory
from seqzoo.ops.core import OpInputError, check_backend
from seqzoo.ops.neural_memory import BACKENDS as NEURAL_MEMORY_BACKENDS
from seqzoo.ops.neural_memory import RETRIEVALS

# Gate-projection bias inits: sigmoid(0) = 0.5 of the max inner lr and half momentum; sigmoid(-4) ≈ 0.018
# forgetting per token, so a fresh memory keeps most of what it stores over a few dozen tokens.
_LR_BIAS, _MOMENTUM_BIAS, _DECAY_BIAS = 0.0, 0.0, -4.0

MemoryState = LinearMemoryState | MLPMemoryState
"""The op's memory state: weights and momenta, fp32 (fp64 for fp64 inputs), each ``[batch, heads, a, b]``."""


def _check(layer: str, ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"{layer}: {message}")


def _check_option(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class MemoryOptions:
    """The options of a Titans memory branch (the same keywords in every Titans mixer), checked on construction.

    Each field is documented in the mixers' ``Args``. ``head_dim=None`` means ``hidden_size // num_heads``
    of the layer: :meth:`resolve` fills it in, and a branch is only built from resolved options.
    A bad value raises a one-line :class:`ConfigError`.
    """

    num_heads: int = 2
    head_dim: int | None = None
    chunk_size: int = 16
    memory: str = "linear"
    mlp_expansion: int = 4
    mlp_activation: str = "gelu"
    mlp_residual_norm: bool = True
    max_lr: float = 0.1
    conv_size: int | None = 4
    use_momentum: bool = True
    use_decay: bool = True
    retrieval: str = "token"
    backend: str = "auto"

    def __post_init__(self) -> None:
        heads, dim = self.num_heads, self.head_dim
        _check_option(heads >= 1 and (dim is None or dim >= 1), f"num_heads and head_dim must be >= 1, got {heads}, {dim}")
        chunk = self.chunk_size
        _check_option(isinstance(chunk, int) and chunk >= 1, f"chunk_size must be an int >= 1, got {chunk!r}")
        _check_option(self.memory in ("linear", "mlp"), f"memory must be 'linear' or 'mlp', got {self.memory!r}")
        _check_option(self.mlp_expansion >= 1, f"mlp_expansion must be >= 1, got {self.mlp_expansion}")
        _check_option(self.mlp_activation in ("gelu", "silu", "relu", "tanh"), f"unknown mlp_activation {self.mlp_activation!r}")
        _check_option(self.max_lr > 0, f"max_lr must be > 0, got {self.max_lr}")
        _check_option(self.conv_size is None or self.conv_size >= 1, f"conv_size must be >= 1 or null, got {self.conv_size}")
        _check_option(self.retrieval in RETRIEVALS, f"retrieval must be one of {', '.join(RETRIEVALS)}, got {self.retrieval!r}")
        try:
            check_backend("neural_memory", self.backend, NEURAL_MEMORY_BACKENDS)
        except OpInputError as err:
            raise ConfigError(f"backend: {err}") from None

    @classmethod
    def resolve(cls, layer: str, hidden_size: int, options: Mapping[str, Any]) -> MemoryOptions:
        """The memory keywords ``options`` of mixer ``layer`` as checked options, ``head_dim`` filled in.

        Errors name ``layer``: an unknown keyword raises ``TypeError`` (as any Python call would), a bad
        value :class:`ConfigError`.
        """
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"{layer}: unknown option(s) {', '.join(unknown)}")
        options = dict(options)
        options["head_dim"] = head_dim_for(layer, hidden_size, options.get("num_heads", cls.num_heads), options.get("head_dim"))
        try:
            return cls(**options)
        except ConfigError as error:
            raise ConfigError(f"{layer}: {error}") from None


def _memory_keywords(init: Callable[..., None]) -> Callable[..., None]:
    """Give a mixer's ``__init__(self, hidden_size, layer_idx=0, *, own options, **memory)`` the signature it accepts.

    The Titans mixers take the memory options as ``**memory`` so that their names and defaults live only in
    :class:`MemoryOptions`, which rejects any other name. :func:`~seqzoo.models.registry.build_mixer` reads
    the constructor's signature to reject unknown config keys (it accepts anything from a ``**`` parameter),
    so the signature shown lists every :class:`MemoryOptions` field as a keyword-only parameter with its
    default, after ``layer_idx`` and before the mixer's own options: the order of the config files.
    """
    signature = inspect.signature(init)
    params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    own = [p for p in params if p.kind is p.KEYWORD_ONLY]
    memory = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type) for f in fields(MemoryOptions)
    ]
    init.__signature__ = signature.replace(parameters=[p for p in params if p not in own] + memory + own)
    return init


# --- decode state ------------------------------------------------------------------------------------
# The layers work on these typed states; only _load and _save know how they sit in a LayerCache.


@dataclass
class MemoryStreamState:
    """What a memory branch carries from one call to the next (``None``: nothing seen yet).

    Every token of a chunk takes its gradient at the weights of the chunk's start, so a call that begins in
    the middle of a chunk needs those weights besides the current ones: the op continues from ``memory``
    with ``chunk_start`` as the gradient base (its ``phase``/``chunk_start`` arguments). A decode step is then
    one token-sized update of a fixed-size state, whatever the context length.

    Attributes:
        conv: tails of the q, k, v short convs, each ``[batch, conv_size − 1, heads·head_dim]``
            (stays ``None`` without convs).
        memory: memory weights and momenta after the last token; ``None``: the learned init.
        chunk_start: the state at the start of the chunk in progress (equal to ``memory`` on a boundary).
    """

    conv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    memory: MemoryState | None = None
    chunk_start: MemoryState | None = None


@dataclass
class KVState:
    """Attention keys and values kept for the next call, each ``[batch, n, heads, head_dim]`` (after RoPE)."""

    key: torch.Tensor | None = None
    value: torch.Tensor | None = None


@dataclass
class SegmentState:
    """``titans_mac``'s state of the segment in progress.

    Attributes:
        memory: the memory as of the segment's start, which its tokens read; ``None``: the learned init.
        conv: tail of the memory-query short conv, ``[batch, conv_size − 1, heads·head_dim]``.
        memory_kv: keys and values of the segment's memory tokens so far (the tokens' own are
            :attr:`TitansState.kv`).
    """

    memory: MemoryState | None = None
    conv: torch.Tensor | None = None
    memory_kv: KVState = field(default_factory=KVState)


@dataclass
class TitansState:
    """The decode state of a Titans layer; each layer uses the parts it has.

    Attributes:
        stream: the memory branch's (every layer; MAL's is its LMM sub-layer's).
        kv: the attention's keys and values: the window of MAG and MAL, the current segment's tokens of MAC.
        segment: MAC's segment state.
    """

    stream: MemoryStreamState = field(default_factory=MemoryStreamState)
    kv: KVState = field(default_factory=KVState)
    segment: SegmentState = field(default_factory=SegmentState)


_CONV_NAMES = ("conv_q", "conv_k", "conv_v")


def _load(cache: LayerCache | None, branch: _MemoryBranch) -> TitansState:
    """The state in ``cache`` (empty without a cache or before the first call); memory states take ``branch``'s shapes."""
    if cache is None:
        # Spelled out rather than left to the default factories: torch.compile cannot trace a dataclass
        # constructor called from inside another's generated __init__.
        return TitansState(stream=MemoryStreamState(), kv=KVState(), segment=SegmentState(memory_kv=KVState()))
    get = cache.get
    conv = tuple(get(name) for name in _CONV_NAMES)
    return TitansState(
        stream=MemoryStreamState(
            conv=None if conv[0] is None else conv,
            memory=_unpack(get("recurrent"), branch),
            chunk_start=_unpack(get("recurrent_chunk_start"), branch),
        ),
        kv=KVState(get("key"), get("value")),
        segment=SegmentState(
            memory=_unpack(get("recurrent_segment"), branch), conv=get("conv_hq"), memory_kv=KVState(get("mem_key"), get("mem_value"))
        ),
    )


def _save(cache: LayerCache | None, state: TitansState) -> None:
    """Write ``state`` into ``cache`` after a call (the inverse of :func:`_load`; the base class advances ``seen``).

    Each tensor is stored under its own name; each memory state is packed into one ``[batch, heads, n]``
    tensor. Parts a layer does not have (``None``) are not stored.
    """
    if cache is None:
        return
    stream, segment = state.stream, state.segment
    tensors = {
        **dict(zip(_CONV_NAMES, stream.conv or ())),
        "recurrent": _pack(stream.memory),
        "recurrent_chunk_start": _pack(stream.chunk_start),
        "key": state.kv.key,
        "value": state.kv.value,
        "recurrent_segment": _pack(segment.memory),
        "conv_hq": segment.conv,
        "mem_key": segment.memory_kv.key,
        "mem_value": segment.memory_kv.value,
    }
    for name, value in tensors.items():
        if value is not None:
            cache.set(name, value)


def _pack(state: MemoryState | None) -> torch.Tensor | None:
    """A memory state (weights then momenta, each ``[batch, heads, a, b]``) as one ``[batch, heads, n]`` tensor."""
    return None if state is None else torch.cat([t.flatten(2) for t in state], dim=-1)


def _unpack(packed: torch.Tensor | None, branch: _MemoryBranch) -> MemoryState | None:
    """Inverse of :func:`_pack` for ``branch``'s memory: ``[batch, heads, n]`` to the op's state type."""
    if packed is None:
        return None
    shapes = branch._shapes() * 2
    parts = packed.split([a * b for a, b in shapes], dim=-1)
    cls = LinearMemoryState if branch.memory == "linear" else MLPMemoryState
    return cls(*(t.unflatten(-1, shape) for t, shape in zip(parts, shapes)))


class _MemoryBranch(nn.Module):
    """Projections, short convs and gates around the neural-memory op, with streaming over partial chunks.

    ``features(x [batch, seq, in_dim])`` gives ``q, k, v [batch, seq, heads, head_dim]`` (SiLU, L2-normed
    q and k) and gates ``[batch, seq, heads, n_gates]``; ``run`` writes and reads the memory.
    Both advance a :class:`MemoryStreamState`; ``forward(x, stream)`` does the two.
    """

    def __init__(self, in_dim: int, options: MemoryOptions) -> None:
        """``in_dim``: width of the branch's input; ``options``: resolved (``head_dim`` set, see :meth:`MemoryOptions.resolve`)."""
        super().__init__()
        self.options = options
        # Flat copies of the options that the compute reads (and that eval's benchmark reads: max_lr).
        num_heads, head_dim, conv_size = options.num_heads, options.head_dim, options.conv_size
        self.num_heads, self.head_dim, self.conv_size = num_heads, head_dim, conv_size
        self.chunk_size, self.memory, self.retrieval = options.chunk_size, options.memory, options.retrieval
        self.max_lr, self.use_momentum, self.use_decay = options.max_lr, options.use_momentum, options.use_decay
        self.mlp_activation = options.mlp_activation
        self.mlp_residual_norm = options.memory == "mlp" and options.mlp_residual_norm
        self.n_gates = 1 + int(options.use_momentum) + int(options.use_decay)
        width = num_heads * head_dim
        self.q_proj = nn.Linear(in_dim, width, bias=False)
        self.k_proj = nn.Linear(in_dim, width, bias=False)
        self.v_proj = nn.Linear(in_dim, width, bias=False)
        if conv_size is not None:
            self.q_conv = ShortConvolution(width, conv_size, activation="silu")
            self.k_conv = ShortConvolution(width, conv_size, activation="silu")
            self.v_conv = ShortConvolution(width, conv_size, activation="silu")
        # θ, η, α = sigmoid(Linear(x)) per head; their init is set here, not by the model's generic init.
        self.gate_proj = nn.Linear(in_dim, num_heads * self.n_gates)
        self.gate_proj._keep_init = True
        nn.init.normal_(self.gate_proj.weight, std=0.02)
        biases = [_LR_BIAS] + [_MOMENTUM_BIAS] * options.use_momentum + [_DECAY_BIAS] * options.use_decay
        with torch.no_grad():
            self.gate_proj.bias.copy_(torch.tensor(biases).repeat(num_heads))
        # Learned per-head initial memory (never zero: a zero deep memory has zero hidden-layer gradients).
        # Exempt from weight decay, which would pull it towards that zero.
        if options.memory == "linear":
            self.init_weights = nn.ParameterList([nn.Parameter(_xavier(num_heads, head_dim, head_dim))])
        else:
            hidden = options.mlp_expansion * head_dim
            self.init_weights = nn.ParameterList(
                [nn.Parameter(_xavier(num_heads, head_dim, hidden)), nn.Parameter(_xavier(num_heads, hidden, head_dim))]
            )
        for p in self.init_weights:
            p._no_weight_decay = True
        if self.mlp_residual_norm:
            self.ln_weight = nn.Parameter(torch.ones(num_heads, head_dim))
            self.ln_bias = nn.Parameter(torch.zeros(num_heads, head_dim))
        else:
            self.ln_weight = self.ln_bias = None

    # --- state -------------------------------------------------------------------------------------
    def _shapes(self) -> list[tuple[int, int]]:
        """Per-head shapes of the memory's weight matrices (the momenta have the same)."""
        return [tuple(p.shape[1:]) for p in self.init_weights]

    def initial_state(self, batch: int, dtype: torch.dtype) -> MemoryState:
        """The learned init expanded to ``batch`` sequences, with zero momenta, in ``dtype``."""
        weights = [p.to(dtype).expand(batch, -1, -1, -1) for p in self.init_weights]
        momenta = [torch.zeros_like(w) for w in weights]
        cls = LinearMemoryState if self.memory == "linear" else MLPMemoryState
        return cls(*weights, *momenta)

    def state_or_init(self, state: MemoryState | None, batch: int, dtype: torch.dtype) -> MemoryState:
        """``state``, or the learned init (:meth:`initial_state`) before the first chunk boundary."""
        return self.initial_state(batch, dtype) if state is None else state

    def state_numel(self) -> int:
        """Floats per (sequence, head) in one memory state (weights + momenta)."""
        return 2 * sum(a * b for a, b in self._shapes())

    def state_shapes(self) -> StateShapes:
        """This branch's cache entries per row: the q/k/v conv tails, the memory after the last token and at the
        start of the chunk in progress (each weights + momenta, packed ``[heads, n]``, fp32 or fp64)."""
        dtype = self.q_proj.weight.dtype
        memory = ((self.num_heads, self.state_numel()), torch.float64 if dtype == torch.float64 else torch.float32)
        shapes: StateShapes = {"recurrent": memory, "recurrent_chunk_start": memory}
        if self.conv_size is not None:
            for name in _CONV_NAMES:
                shapes[name] = ((self.conv_size - 1, self.num_heads * self.head_dim), dtype)
        return shapes

    # --- compute -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, stream: MemoryStreamState, call: Call | None = None) -> torch.Tensor:
        """Write ``x [batch, seq, in_dim]`` into the memory and read it: ``[batch, seq, heads, head_dim]``; advances ``stream``.

        With a packed ``call`` (training on documents packed along ``seq``, no cache) every document is its own
        memory from the learned init, its convs and chunks starting at its first token.
        """
        offsets = None if call is None else call.offsets
        phase = 0 if call is None or call.packed else call.start[0] % self.chunk_size
        return self.run(*self.features(x, stream, offsets), stream, None if call is None else call.cu_seqlens, phase)

    def features(
        self, x: torch.Tensor, stream: MemoryStreamState, offsets: tuple[int, ...] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [batch, seq, in_dim]`` → ``(qkv [batch, seq, heads, 3·head_dim], gates [batch, seq, heads, n_gates])``.

        Advances the conv tails in ``stream``. Under autograd the projections, convs and norms are
        recomputed in backward, so only ``x`` is kept for them (about five activation-sized tensors
        less per layer, for about 10-15% more fwd+bwd time on CPU).
        """
        tails = () if self.conv_size is None else stream.conv or (None, None, None)
        if recompute_pays(x):
            qkv, gates, *new_tails = checkpoint(self._features, x, offsets, *tails, use_reentrant=False)
        else:
            qkv, gates, *new_tails = self._features(x, offsets, *tails)
        if new_tails:
            stream.conv = tuple(new_tails)
        return qkv, gates

    def _features(self, x: torch.Tensor, offsets: tuple[int, ...] | None, *tails: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """:meth:`features` without state: returns ``(qkv, gates, *new conv tails)``."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        new_tails = []
        if self.conv_size is None:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        else:
            convs = (self.q_conv, self.k_conv, self.v_conv)
            (q, tq), (k, tk), (v, tv) = (
                conv(t, tail, output_state=True, offsets=offsets) for conv, t, tail in zip(convs, (q, k, v), tails)
            )
            new_tails = [tq, tk, tv]
        split = lambda t: rearrange(t, "b t (h d) -> b t h d", d=self.head_dim)  # noqa: E731
        qkv = torch.cat([l2norm(split(q)), l2norm(split(k)), split(v)], dim=-1)
        gates = torch.sigmoid(upcast(self.gate_proj(x)))
        gates = rearrange(gates, "b t (h g) -> b t h g", g=self.n_gates)
        return (qkv, gates, *new_tails)

    def _op(
        self,
        qkv: torch.Tensor,
        gates: torch.Tensor,
        initial_state: MemoryState,
        final: bool,
        read_only: bool = False,
        cu_seqlens: torch.Tensor | None = None,
        phase: int = 0,
        chunk_start: MemoryState | None = None,
    ) -> tuple[torch.Tensor, MemoryState | None]:
        q, k, v = qkv.split(self.head_dim, dim=-1)
        if read_only:
            # θ = 0 and no momentum: the memory is frozen, so the op returns M(q; W) of ``initial_state``.
            lr, momentum, decay = torch.zeros_like(gates[..., 0]), None, None
        else:
            lr = gates[..., 0] * self.max_lr
            momentum = gates[..., 1] if self.use_momentum else None
            decay = gates[..., -1] if self.use_decay else None
        kwargs = {}
        if self.memory == "mlp":
            kwargs = dict(mlp_activation=self.mlp_activation, mlp_residual_norm=self.mlp_residual_norm)
            if self.mlp_residual_norm:
                kwargs.update(ln_weight=self.ln_weight, ln_bias=self.ln_bias)
        return neural_memory(
            q, k, v, lr, momentum, decay,
            chunk_size=self.chunk_size, memory=self.memory, initial_state=initial_state,
            output_final_state=final, retrieval=self.retrieval, backend=self.options.backend, cu_seqlens=cu_seqlens,
            phase=phase, chunk_start=chunk_start if phase else None, **kwargs,
        )  # fmt: skip

    def read(self, q: torch.Tensor, memory_state: MemoryState) -> torch.Tensor:
        """``M(q; W)`` with the fixed weights of ``memory_state``: ``q [batch, seq, heads, head_dim]`` → same shape."""
        qkv = torch.cat([q, q, torch.zeros_like(q)], dim=-1)
        gates = q.new_zeros(*q.shape[:3], self.n_gates)
        return self._op(qkv, gates, memory_state, final=False, read_only=True)[0]

    def run(
        self,
        qkv: torch.Tensor,
        gates: torch.Tensor,
        stream: MemoryStreamState,
        cu_seqlens: torch.Tensor | None = None,
        phase: int = 0,
    ) -> torch.Tensor:
        """Write and read the memory for new tokens (:meth:`features`); returns ``[batch, seq, heads, head_dim]``.

        Continues from ``stream`` and updates it; ``phase`` is the tokens of the current chunk written before
        this call (``seen % chunk_size``). With ``cu_seqlens`` (packed documents, no cache) each document runs
        from the learned init.
        """
        batch, seq = qkv.shape[:2]
        dtype = torch.float64 if qkv.dtype == torch.float64 else torch.float32
        if cu_seqlens is not None:
            initial = self.state_or_init(None, cu_seqlens.numel() - 1, dtype)
            return self._op(qkv, gates, initial, final=False, cu_seqlens=cu_seqlens)[0]
        memory = self.state_or_init(stream.memory, batch, dtype)
        start = memory if phase == 0 or stream.chunk_start is None else stream.chunk_start
        # Split at the last chunk boundary this call reaches: the state there is the next chunk_start.
        to_boundary = (phase + seq) - (phase + seq) % self.chunk_size - phase
        outs = []
        if to_boundary > 0:
            o, memory = self._op(qkv[:, :to_boundary], gates[:, :to_boundary], memory, final=True, phase=phase, chunk_start=start)
            outs.append(o)
            start, phase = memory, 0
        if seq > to_boundary:
            rest = slice(max(to_boundary, 0), seq)
            o, memory = self._op(qkv[:, rest], gates[:, rest], memory, final=True, phase=phase, chunk_start=start)
            outs.append(o)
        stream.memory, stream.chunk_start = memory, start
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def _xavier(heads: int, fan_in: int, fan_out: int) -> torch.Tensor:
    """Xavier-normal init of ``heads`` independent ``[fan_in, fan_out]`` matrices."""
    return torch.randn(heads, fan_in, fan_out) * (2.0 / (fan_in + fan_out)) ** 0.5


def _attention(layer: str, hidden_size: int, layer_idx: int, **options) -> Attention:
    """The attention sub-layer of ``layer`` (an :class:`Attention`); its option errors name ``layer``."""
    try:
        return Attention(hidden_size, layer_idx, **options)
    except ConfigError as error:
        raise ConfigError(f"{layer}: {error}") from None


_MEMORY_DOC = """
        num_heads: memory heads. Default: 2.
        head_dim: per-head width of q, k, v and the memory. Default: ``hidden_size // num_heads``.
        chunk_size: tokens per memory chunk; gradients inside a chunk are taken at its start weights.
            Part of the model (outputs change with it). Default: 16.
        memory: ``"linear"`` (``M(x) = xW``) or ``"mlp"`` (2-layer MLP ``σ(x W1) W2``). Default: ``"linear"``.
        mlp_expansion: hidden width of the MLP memory in units of ``head_dim``. Default: 4.
        mlp_activation: the MLP memory's hidden activation (``gelu``, ``silu``, ``relu``, ``tanh``).
        mlp_residual_norm: MLP memory ``x + LN(MLP(x))`` with learned per-head LN gain/bias, the inner model
            that TTT, Miras and ATLAS share. Default: True.
        max_lr: the inner learning rate is ``θ = max_lr · sigmoid(Linear(x))`` per head. Default: 0.1. Every
            token of a chunk takes its gradient at the chunk-start weights, so similar keys add up to a
            step of about ``chunk_size · θ``; at 1.0 with chunk 16 a MAC model diverged in training and an
            LMM blew up on repetitive text beyond its training length.
        conv_size: taps of the depthwise causal convs after the q/k/v projections; ``None`` disables them. Default: 4.
        use_momentum: learn a momentum gate η (else η = 0). Default: True.
        use_decay: learn a forget gate α (else α = 0). Default: True.
        retrieval: ``"token"`` reads every token with its own updated weights (the paper, the default);
            ``"chunk"`` reads with the weights of the last completed chunk (a chunk's last token sees its
            own chunk), titans-pytorch's cheaper retrieval.
        backend: the :func:`~seqzoo.ops.neural_memory` backend (``"auto"``, ``"reference"``, ``"torch"``,
            ``"triton"``). Default: ``"auto"``."""


@register_mixer("titans_lmm")
class TitansLMM(TokenMixer):
    (
        """Titans' neural long-term memory as an attention-free token mixer.

    ``q, k, v = L2(SiLU(conv(x W)))`` (no L2 on v), per-head gates ``θ, η, α = sigmoid(Linear(x))``, the
    memory op (retrieve after update, inclusive), then ``W_o(RMSNorm(o) ⊙ sigmoid(x W_g))`` per head.

    Args:
        hidden_size: model width.
        layer_idx: position in the stack (unused; part of the mixer contract)."""
        + _MEMORY_DOC
        + """

    Cache: ``recurrent`` (fp32 memory weights + momenta at the last chunk boundary, ``[batch, heads, n]``),
    ``recurrent_chunk_start`` (the same at the start of the chunk in progress, the gradient base of its
    remaining tokens), ``conv_q/k/v``. Fixed in size: a decode step updates it in place of re-running a chunk.
    """
    )

    # The memory's chunk phase (and MAC's segment) differ between rows at different positions: run them one by one.
    ragged_rows = False

    @_memory_keywords
    def __init__(self, hidden_size: int, layer_idx: int = 0, **memory: Any) -> None:
        super().__init__()
        options = MemoryOptions.resolve("titans_lmm", hidden_size, memory)
        self.hidden_size, self.layer_idx = hidden_size, layer_idx
        self.memory = _MemoryBranch(hidden_size, options)
        num_heads, head_dim = self.num_heads, self.head_dim = options.num_heads, options.head_dim
        self.g_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.out_norm = GatedRMSNorm(head_dim, activation="sigmoid")
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def mix(self, x: torch.Tensor, cache: LayerCache | None, call: Call) -> torch.Tensor:
        """``x: [batch, seq, hidden] -> [batch, seq, hidden]``; with ``cache``, continue after its tokens."""
        if x.shape[1] == 0:  # nothing to read or write; the cache stays as it is
            return x.new_zeros(x.shape)
        state = _load(cache, self.memory)
        o = self.forward_state(x, state.stream, call)
        _save(cache, state)
        return o

    def forward_state(self, x: torch.Tensor, stream: MemoryStreamState, call: Call | None = None) -> torch.Tensor:
        """The layer on its typed state: ``x [batch, seq, hidden] -> [batch, seq, hidden]``, advancing ``stream``.

        :meth:`mix` without the cache; ``titans_mal`` runs its memory sub-layer through this.
        """
        o = self.memory(x, stream, call)
        gate = rearrange(self.g_proj(x), "b t (h d) -> b t h d", d=self.head_dim)
        return self.o_proj(rearrange(self.out_norm(o.to(x.dtype), gate), "b t h d -> b t (h d)"))

    def state_shapes(self, seq_len: int | None = None) -> StateShapes:
        """The memory branch's state: fixed in size, whatever ``seq_len``."""
        return self.memory.state_shapes()


class _GatedCombine(nn.Module):
    """``W_o(RMSNorm_a(y) ⊙ sigmoid(RMSNorm_b(m)))``: the MAG gate, also MAC's output gate.

    The paper leaves the gate open and, for its experiments, normalises both branches with learnable
    vector-valued weights before a non-linearity: here the RMSNorm gains are those weights, normalising
    both branches keeps the gate independent of their scales, and the sigmoid on the memory side scales
    each channel of ``y`` by a factor in ``(0, 1)``. ``W_o`` replaces the attention's output projection.
    ``y, m: [batch, seq, width]`` → ``[batch, seq, hidden]``.
    """

    def __init__(self, width: int, hidden_size: int) -> None:
        super().__init__()
        self.norm_y, self.norm_m = RMSNorm(width), RMSNorm(width)
        self.o_proj = nn.Linear(width, hidden_size, bias=False)

    def forward(self, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.norm_y(y) * torch.sigmoid(self.norm_m(m)))


@register_mixer("titans_mag")
class TitansMAG(TokenMixer):
    (
        """Titans MAG, memory as a gate: ``o = W_o(Norm(SWA*(x)) ⊙ σ(Norm(M(x))))`` (the gate: :class:`_GatedCombine`).

    ``SWA*`` is sliding-window causal attention over the layer input with learned persistent K/V per
    head (``num_persistent`` slots visible to every query): the ``attention`` mixer (``attn``) without
    its output projection, whose place ``W_o`` takes; ``M`` is the neural memory branch of
    ``titans_lmm`` on the same input (per-token retrieval after update). The two branches share
    ``num_heads``/``head_dim``.

    Args:
        hidden_size: model width.
        layer_idx: position in the stack (unused)."""
        + _MEMORY_DOC
        + """
        window_size: attention window (itself included); ``None`` = full causal attention. Default: 64.
        num_persistent: learned persistent K/V slots per head. Default: 4.
        rope_theta: RoPE base of the attention branch; ``None`` disables it.

    Cache: the memory branch's (``recurrent``, ``recurrent_chunk_start``, ``conv_*``) + ``key``/``value`` (last
    ``window_size − 1`` tokens).
    """
    )

    # The memory's chunk phase (and MAC's segment) differ between rows at different positions: run them one by one.
    ragged_rows = False

    @_memory_keywords
    def __init__(
        self,
        hidden_size: int,
        layer_idx: int = 0,
        *,
        window_size: int | None = 64,
        num_persistent: int = 4,
        rope_theta: float | None = 10000.0,
        **memory: Any,
    ) -> None:
        super().__init__()
        options = MemoryOptions.resolve("titans_mag", hidden_size, memory)
        num_heads, head_dim = options.num_heads, options.head_dim
        self.hidden_size, self.layer_idx = hidden_size, layer_idx
        self.memory = _MemoryBranch(hidden_size, options)
        # No output projection: the gate's W_o projects the gated attention output.
        self.attn = _attention(
            "titans_mag", hidden_size, layer_idx, num_heads=num_heads, head_dim=head_dim, window_size=window_size,
            rope_theta=rope_theta, num_persistent=num_persistent, project_output=False,
        )  # fmt: skip
        self.combine = _GatedCombine(num_heads * head_dim, hidden_size)

    def mix(self, x: torch.Tensor, cache: LayerCache | None, call: Call) -> torch.Tensor:
        """``x: [batch, seq, hidden] -> [batch, seq, hidden]``; with ``cache``, continue after its tokens."""
        if x.shape[1] == 0:  # nothing to read or write; the cache stays as it is
            return x.new_zeros(x.shape)
        state = _load(cache, self.memory)
        y, *kv = self.attn.attend(x, call, state.kv.key, state.kv.value, cached=cache is not None)
        state.kv = KVState(*kv)
        m = self.memory(x, state.stream, call)
        o = self.combine(y, rearrange(m, "b t h d -> b t (h d)").to(y.dtype))
        _save(cache, state)
        return o

    def state_shapes(self, seq_len: int | None = None) -> StateShapes:
        """The memory branch's state and the attention window (``None``: the most it holds; needs a window)."""
        return {**self.memory.state_shapes(), **self.attn.state_shapes(seq_len)}


@register_mixer("titans_mal")
class TitansMAL(TokenMixer):
    (
        """Titans MAL, memory as a layer (the paper's Eqs 29–31): the memory layer, then SWA* on its output.

    ``m = W_m(RMSNorm(M(x)) ⊙ σ(x W_g))`` is a full ``titans_lmm`` sub-layer; ``h = x + m`` (residual);
    ``o = m + W_o SWA*(RMSNorm(h))``, so the surrounding block computes ``x + m + SWA*(Norm(x + m))``:
    the two residual sub-layers of the H3-style stack with the memory's output feeding the attention.
    ``SWA*`` is sliding-window attention with learned persistent K/V (``num_persistent`` per head): the
    ``attention`` mixer (``attn``, its ``o_proj`` is ``W_o``). Both run as they would on their own
    (:meth:`TitansLMM.forward_state`, :meth:`Attention.attend`); this layer only wires them.

    Args:
        hidden_size: model width.
        layer_idx: position in the stack (unused)."""
        + _MEMORY_DOC
        + """
        window_size: attention window (itself included); ``None`` = full causal attention. Default: 64.
        num_persistent: learned persistent K/V slots per head. Default: 4.
        rope_theta: RoPE base of the attention; ``None`` disables it.

    Cache: the memory's (``recurrent``, ``recurrent_chunk_start``, ``conv_*``) + ``key``/``value`` (last ``window_size − 1``).
    """
    )

    # The memory's chunk phase (and MAC's segment) differ between rows at different positions: run them one by one.
    ragged_rows = False

    @_memory_keywords
    def __init__(
        self,
        hidden_size: int,
        layer_idx: int = 0,
        *,
        window_size: int | None = 64,
        num_persistent: int = 4,
        rope_theta: float | None = 10000.0,
        **memory: Any,
    ) -> None:
        super().__init__()
        self.hidden_size, self.layer_idx = hidden_size, layer_idx
        # The memory sub-layer is a whole titans_lmm; the options are checked here so errors name this layer.
        MemoryOptions.resolve("titans_mal", hidden_size, memory)
        self.lmm = TitansLMM(hidden_size, layer_idx, **memory)
        num_heads, head_dim = self.lmm.num_heads, self.lmm.head_dim
        self.attn_norm = RMSNorm(hidden_size)
        self.attn = _attention(
            "titans_mal", hidden_size, layer_idx, num_heads=num_heads, head_dim=head_dim, window_size=window_size,
            rope_theta=rope_theta, num_persistent=num_persistent,
        )  # fmt: skip

    def mix(self, x: torch.Tensor, cache: LayerCache | None, call: Call) -> torch.Tensor:
        """``x: [batch, seq, hidden] -> [batch, seq, hidden]``; with ``cache``, continue after its tokens."""
        if x.shape[1] == 0:  # nothing to read or write; the cache stays as it is
            return x.new_zeros(x.shape)
        state = _load(cache, self.lmm.memory)
        m = self.lmm.forward_state(x, state.stream, call)
        y, *kv = self.attn.attend(self.attn_norm(x + m), call, state.kv.key, state.kv.value, cached=cache is not None)
        state.kv = KVState(*kv)
        _save(cache, state)
        return m + self.attn.o_proj(y)

    def state_shapes(self, seq_len: int | None = None) -> StateShapes:
        """The memory sub-layer's state and the attention window (``None``: the most it holds; needs a window)."""
        return {**self.lmm.state_shapes(seq_len), **self.attn.state_shapes(seq_len)}


@register_mixer("titans_mac")
class TitansMAC(TokenMixer):
    (
        """Titans MAC, memory as context, read causally (a different model from titans-pytorch's MAC).

    The paper's MAC, taken literally, leaks later tokens into earlier ones in two places: (a) each
    segment token's memory reading ``h_j`` comes from its own query, and the paper lets every query of
    the segment attend to all of them, so token ``i`` would see ``h_j`` of a later token ``j``; (b) the
    output gate reads the memory after it has been written with the whole segment. This layer keeps the
    paper's structure and closes both (``docs/titans.md`` has the longer account).

    The sequence is cut into segments of ``segment_size`` tokens (counted from the first token). For a
    token ``i`` of segment ``n``:

    1. ``h_i = M_{n−1}(q̃_i)``, ``q̃_i = L2(SiLU(conv(x_i W_h)))``: the memory as of the end of segment
       ``n−1`` (the learned init for ``n = 0``), read with token ``i``'s own query — never a later one.
    2. ``a_i = Attn(q_i; persistent K/V ‖ K/V(h_j) ‖ K/V(x_j) for j ≤ i in segment n)``: causal
       attention inside the segment; a memory token ``h_j`` sits at token ``j``'s position and is visible
       only from there on, so no token sees a later one through it (closes (a)).
    3. The attention outputs are written into the memory token by token (same branch as ``titans_lmm``,
       on ``a`` instead of ``x``), and ``m_i = M_i(a_i)`` is read right after token ``i``'s own update,
       never with the end-of-segment memory (closes (b)).
    4. ``o_i = W_o(RMSNorm(a_i) ⊙ sigmoid(RMSNorm(m_i)))``, MAG's gate (:class:`_GatedCombine`).

    ``segment_size`` must be a multiple of ``chunk_size``: the next segment reads the memory as of the
    segment's end, and the memory state exists only at chunk boundaries.

    Args:
        hidden_size: model width.
        layer_idx: position in the stack (unused)."""
        + _MEMORY_DOC
        + """
        segment_size: attention segment length ``C``. Default: 32.
        num_persistent: learned persistent K/V slots per head. Default: 4.
        rope_theta: RoPE base of the attention (memory tokens take their token's position); ``None`` disables it.

    Cache: the memory branch's (``recurrent``, ``recurrent_chunk_start``, ``conv_q/k/v`` over ``a``) + ``recurrent_segment``
    (memory at the current segment's start) + ``conv_hq`` + ``key``/``value``/``mem_key``/``mem_value``
    (the current segment's tokens and memory tokens, ``seen_tokens % segment_size`` each).
    """
    )

    # The memory's chunk phase (and MAC's segment) differ between rows at different positions: run them one by one.
    ragged_rows = False

    @_memory_keywords
    def __init__(
        self,
        hidden_size: int,
        layer_idx: int = 0,
        *,
        segment_size: int = 32,
        num_persistent: int = 4,
        rope_theta: float | None = 10000.0,
        **memory: Any,
    ) -> None:
        super().__init__()
        options = MemoryOptions.resolve("titans_mac", hidden_size, memory)
        num_heads, head_dim, chunk_size, conv_size = options.num_heads, options.head_dim, options.chunk_size, options.conv_size
        self.hidden_size, self.layer_idx = hidden_size, layer_idx
        width = num_heads * head_dim
        # The memory branch of MAC reads and writes the attention output (width wide), not the layer input.
        self.memory = _MemoryBranch(width, options)
        _check("titans_mac", isinstance(segment_size, int) and segment_size >= 1, f"segment_size must be an int >= 1, got {segment_size!r}")
        _check(
            "titans_mac", segment_size % chunk_size == 0, f"segment_size ({segment_size}) must be a multiple of chunk_size ({chunk_size})"
        )
        _check("titans_mac", num_persistent >= 0, f"num_persistent must be >= 0, got {num_persistent}")
        _check("titans_mac", rope_theta is None or head_dim % 2 == 0, f"RoPE needs an even head_dim, got {head_dim}")
        self.num_heads, self.head_dim, self.segment_size = num_heads, head_dim, segment_size
        self.h_proj = nn.Linear(hidden_size, width, bias=False)
        self.h_conv = ShortConvolution(width, conv_size, activation="silu") if conv_size is not None else None
        self.h_kv = nn.Linear(width, 2 * width, bias=False)
        self.qkv = nn.Linear(hidden_size, 3 * width, bias=False)
        self.rotary = RotaryEmbedding(head_dim, rope_theta) if rope_theta is not None else None
        self.persistent = nn.Parameter(torch.zeros(2, num_heads, num_persistent, head_dim))
        self.combine = _GatedCombine(width, hidden_size)

    def mix(self, x: torch.Tensor, cache: LayerCache | None, call: Call) -> torch.Tensor:
        """``x: [batch, seq, hidden] -> [batch, seq, hidden]``; with ``cache``, continue after its tokens.

        Packed documents (training, no cache) each run on their own: MAC's segments and its segment-start
        memory are per document, and the segment loop is sequential anyway.
        """
        if x.shape[1] == 0:  # nothing to read or write; the cache stays as it is
            return x.new_zeros(x.shape)
        if call.packed:
            pieces = [x[:, a:b] for a, b in zip(call.offsets[:-1], call.offsets[1:])]
            return torch.cat([self.mix(p, None, Call.of(self.mixer_name, p, None, None)) for p in pieces], dim=1)
        state = _load(cache, self.memory)
        segment = state.segment
        offset = call.start[0]
        batch, seq, _ = x.shape
        split = lambda t: rearrange(t, "b t (h d) -> b t h d", d=self.head_dim)  # noqa: E731
        # Everything that depends on x alone is computed for the whole call at once.
        q, k, v = (split(t) for t in self.qkv(x).chunk(3, dim=-1))
        if self.rotary is not None:
            q, k = self.rotary(q, offset), self.rotary(k, offset)
        hq = self.h_proj(x)
        if self.h_conv is None:
            hq = F.silu(hq)
        else:
            hq, segment.conv = self.h_conv(hq, segment.conv, output_state=True)
        hq = l2norm(split(hq))
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        outs, start = [], 0
        while start < seq:
            pos = offset + start
            n = min(seq - start, self.segment_size - pos % self.segment_size)
            piece = slice(start, start + n)
            # 1. read the memory as of the segment start with each token's own query.
            segment.memory = self.memory.state_or_init(segment.memory, batch, dtype)
            h = rearrange(self.memory.read(hq[:, piece], segment.memory), "b t h d -> b t (h d)").to(x.dtype)
            hk, hv = (split(t) for t in self.h_kv(h).chunk(2, dim=-1))
            if self.rotary is not None:
                hk = self.rotary(hk, pos)
            # 2. causal attention over persistent ‖ memory tokens ‖ tokens of this segment.
            past = 0 if state.kv.key is None else state.kv.key.shape[1]
            if past:
                hk, hv = torch.cat([segment.memory_kv.key, hk], 1), torch.cat([segment.memory_kv.value, hv], 1)
                kk, vv = torch.cat([state.kv.key, k[:, piece]], 1), torch.cat([state.kv.value, v[:, piece]], 1)
            else:
                kk, vv = k[:, piece], v[:, piece]
            # Memory token j sits at token j's position: both halves of the context share one causal mask.
            causal = causal_mask(n, past, device=x.device)
            context_k, context_v = torch.cat([hk, kk], 1), torch.cat([hv, vv], 1)
            a = persistent_attention(q[:, piece], context_k, context_v, torch.cat([causal, causal], 1), self.persistent)
            # 3. write the attention outputs into the memory; read each after its own update.
            m = self.memory.run(*self.memory.features(a, state.stream), state.stream, phase=pos % self.memory.chunk_size)
            outs.append(self.combine(a, rearrange(m, "b t h d -> b t (h d)").to(a.dtype)))
            if (pos + n) % self.segment_size == 0:
                # The segment is complete: its end is a chunk boundary, the next segment reads this memory.
                segment.memory = state.stream.memory
                hk, hv, kk, vv = (t[:, :0] for t in (hk, hv, kk, vv))
            segment.memory_kv, state.kv = KVState(hk, hv), KVState(kk, vv)
            start += n
        _save(cache, state)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def state_shapes(self, seq_len: int | None = None) -> StateShapes:
        """The memory branch's state, the memory at the segment's start, the memory-query conv tail and the
        current segment's token and memory-token keys and values (``seq_len % segment_size`` each; ``None``:
        the most it ever holds)."""
        in_segment = self.segment_size - 1 if seq_len is None else seq_len % self.segment_size
        dtype = self.qkv.weight.dtype
        shapes = self.memory.state_shapes()
        shapes["recurrent_segment"] = shapes["recurrent"]
        if self.h_conv is not None:
            shapes["conv_hq"] = ((self.h_conv.kernel_size - 1, self.num_heads * self.head_dim), dtype)
        for name in ("key", "value", "mem_key", "mem_value"):
            shapes[name] = ((in_segment, self.num_heads, self.head_dim), dtype)
        return shapes
