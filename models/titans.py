"""Titans (Behrouz, Zhong, Mirrokni 2024): the neural long-term memory layer and the MAC/MAG/MAL hybrids.

* ``titans_lmm``: the memory alone as a token mixer (spec titans.md §2.1, §2.4 "LMM").
* ``titans_mag``: sliding-window attention with persistent K/V, gated by the memory branch (§2.4, §9.8).
* ``titans_mal``: the memory layer, then sliding-window attention with persistent K/V on its output (§2.4).
* ``titans_mac``: causal memory-as-context (§9.7): per segment, the memory as of the previous segment
  is read with the segment's tokens and its readings join the attention context causally; the
  attention output is then written into the memory token by token and gates the output.

The attention is :mod:`seqzoo.models.attention`'s (the ``Attention`` mixer with ``num_persistent`` for MAG
and MAL, its ``causal_mask`` and ``persistent_attention`` for MAC's segment context).
The memory itself is :func:`seqzoo.ops.neural_memory`; layers only project, convolve and gate around it.
Its chunks count from the start of each call, so a streaming layer keeps the memory state of the last
chunk boundary plus the projected inputs of the tokens after it (fewer than ``chunk_size``) and
recomputes that partial chunk from the boundary on every call: the same numbers as one parallel call,
because every gradient inside a chunk is taken at the chunk-start weights.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from seqzoo.configs import ConfigError
from seqzoo.models.attention import Attention, causal_mask, persistent_attention
from seqzoo.models.base import TokenMixer, check_hidden, head_dim_for
from seqzoo.models.cache import LayerCache
from seqzoo.models.modules import GatedRMSNorm, RMSNorm, RotaryEmbedding, ShortConvolution, upcast
from seqzoo.models.registry import register_mixer
from seqzoo.ops import LinearMemoryState, MLPMemoryState, l2norm, neural_memory
from seqzoo.ops.neural_memory import RETRIEVALS

# Gate-projection bias inits: sigmoid(0) = 0.5 of the max inner lr and half momentum; sigmoid(-4) ≈ 0.018
# forgetting per token, so a fresh memory keeps most of what it stores over a few dozen tokens.
_LR_BIAS, _MOMENTUM_BIAS, _DECAY_BIAS = 0.0, 0.0, -4.0

State = dict[str, Any]


def _check(layer: str, ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"{layer}: {message}")


def _load(cache: LayerCache | None) -> State:
    """The working state of one call: the cache's tensors (or nothing)."""
    return {} if cache is None else dict(cache.tensors)


def _save(cache: LayerCache | None, state: State, seq: int) -> None:
    """Write the working state back into ``cache`` (memory states packed into one fp32 tensor each)."""
    if cache is None:
        return
    for name, value in state.items():
        cache.set(name, _pack(value) if isinstance(value, tuple) else value)
    cache.seen_tokens += seq


def _pack(state: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A memory state (weights then momenta, each ``[batch, heads, a, b]``) as ``[batch, heads, n]``."""
    return torch.cat([t.flatten(2) for t in state], dim=-1)


class _MemoryBranch(nn.Module):
    """Projections, short convs and gates around the neural-memory op, with streaming over partial chunks.

    ``features(x [batch, seq, in_dim])`` gives ``q, k, v [batch, seq, heads, head_dim]`` (SiLU, L2-normed
    q and k) and gates ``[batch, seq, heads, n_gates]``; ``run`` writes and reads the memory.

    State names (``prefix`` + name): ``conv_q``/``conv_k``/``conv_v`` (conv tails ``[batch, conv_size-1,
    heads·head_dim]``), ``recurrent`` (fp32 memory weights + momenta at the last chunk boundary, packed
    ``[batch, heads, n]``), ``pending_qkv`` ``[batch, p, heads, 3·head_dim]`` and ``pending_gates``
    ``[batch, p, heads, n_gates]`` for the ``p < chunk_size`` tokens after that boundary.
    """

    def __init__(
        self,
        layer: str,
        in_dim: int,
        num_heads: int,
        head_dim: int,
        chunk_size: int,
        memory: str,
        mlp_expansion: int,
        mlp_activation: str,
        mlp_residual_norm: bool,
        max_lr: float,
        conv_size: int | None,
        use_momentum: bool,
        use_decay: bool,
        retrieval: str = "token",
    ) -> None:
        super().__init__()
        _check(layer, num_heads >= 1 and head_dim >= 1, f"num_heads and head_dim must be >= 1, got {num_heads}, {head_dim}")
        _check(layer, isinstance(chunk_size, int) and chunk_size >= 1, f"chunk_size must be an int >= 1, got {chunk_size!r}")
        _check(layer, memory in ("linear", "mlp"), f"memory must be 'linear' or 'mlp', got {memory!r}")
        _check(layer, mlp_expansion >= 1, f"mlp_expansion must be >= 1, got {mlp_expansion}")
        _check(layer, mlp_activation in ("gelu", "silu", "relu", "tanh"), f"unknown mlp_activation {mlp_activation!r}")
        _check(layer, max_lr > 0, f"max_lr must be > 0, got {max_lr}")
        _check(layer, conv_size is None or conv_size >= 1, f"conv_size must be >= 1 or null, got {conv_size}")
        _check(layer, retrieval in RETRIEVALS, f"retrieval must be one of {', '.join(RETRIEVALS)}, got {retrieval!r}")
        self.num_heads, self.head_dim, self.chunk_size, self.memory = num_heads, head_dim, chunk_size, memory
        self.max_lr, self.use_momentum, self.use_decay = max_lr, use_momentum, use_decay
        self.mlp_activation, self.retrieval = mlp_activation, retrieval
        self.mlp_residual_norm = memory == "mlp" and mlp_residual_norm
        self.n_gates = 1 + int(use_momentum) + int(use_decay)
        width = num_heads * head_dim
        self.q_proj = nn.Linear(in_dim, width, bias=False)
        self.k_proj = nn.Linear(in_dim, width, bias=False)
        self.v_proj = nn.Linear(in_dim, width, bias=False)
        self.conv_size = conv_size
        if conv_size is not None:
            self.q_conv = ShortConvolution(width, conv_size, activation="silu")
            self.k_conv = ShortConvolution(width, conv_size, activation="silu")
            self.v_conv = ShortConvolution(width, conv_size, activation="silu")
        # θ, η, α = sigmoid(Linear(x)) per head; their init is set here, not by the model's generic init.
        self.gate_proj = nn.Linear(in_dim, num_heads * self.n_gates)
        self.gate_proj._keep_init = True
        nn.init.normal_(self.gate_proj.weight, std=0.02)
        biases = [_LR_BIAS] + [_MOMENTUM_BIAS] * use_momentum + [_DECAY_BIAS] * use_decay
        with torch.no_grad():
            self.gate_proj.bias.copy_(torch.tensor(biases).repeat(num_heads))
        # Learned per-head initial memory (never zero: a zero deep memory has zero hidden-layer gradients).
        # Exempt from weight decay, which would pull it towards that zero.
        if memory == "linear":
            self.init_weights = nn.ParameterList([nn.Parameter(_xavier(num_heads, head_dim, head_dim))])
        else:
            hidden = mlp_expansion * head_dim
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
        return [tuple(p.shape[1:]) for p in self.init_weights]

    def initial_state(self, batch: int, dtype: torch.dtype) -> LinearMemoryState | MLPMemoryState:
        """The learned init expanded to ``batch`` sequences, with zero momenta, in ``dtype``."""
        weights = [p.to(dtype).expand(batch, -1, -1, -1) for p in self.init_weights]
        momenta = [torch.zeros_like(w) for w in weights]
        cls = LinearMemoryState if self.memory == "linear" else MLPMemoryState
        return cls(*weights, *momenta)

    def unpack(self, packed: torch.Tensor) -> LinearMemoryState | MLPMemoryState:
        """Inverse of the packing in the cache: ``[batch, heads, n]`` to the op's state type."""
        sizes = [a * b for a, b in self._shapes()] * 2
        parts = packed.split(sizes, dim=-1)
        shapes = self._shapes() * 2
        tensors = [t.unflatten(-1, s) for t, s in zip(parts, shapes)]
        return (LinearMemoryState if self.memory == "linear" else MLPMemoryState)(*tensors)

    def get_state(self, state: State, name: str, batch: int, dtype: torch.dtype):
        """Memory state ``name`` from the working state (unpacked), or the learned init."""
        value = state.get(name)
        if value is None:
            return self.initial_state(batch, dtype)
        return self.unpack(value) if isinstance(value, torch.Tensor) else value

    def state_numel(self) -> int:
        """Floats per (sequence, head) in one memory state (weights + momenta)."""
        return 2 * sum(a * b for a, b in self._shapes())

    def state_size(self, batch: int, pending: int, recurrent_copies: int = 1) -> int:
        """Bytes of this branch's cache entries with ``pending`` tokens after the last chunk boundary."""
        elt = self.q_proj.weight.element_size()
        state_elt = 8 if self.q_proj.weight.dtype == torch.float64 else 4
        width = self.num_heads * self.head_dim
        total = recurrent_copies * batch * self.num_heads * self.state_numel() * state_elt
        if self.conv_size is not None:
            total += 3 * batch * (self.conv_size - 1) * width * elt
        total += batch * pending * (3 * width * elt + self.num_heads * self.n_gates * max(elt, 4))
        return total

    # --- compute -----------------------------------------------------------------------------------
    def features(self, x: torch.Tensor, state: State, prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """``x [batch, seq, in_dim]`` → ``(qkv [batch, seq, heads, 3·head_dim], gates [batch, seq, heads, n_gates])``.

        Advances the conv tails in ``state``. Under autograd the projections, convs and norms are
        recomputed in backward, so only ``x`` is kept for them (about five activation-sized tensors
        less per layer, for about 10-15% more fwd+bwd time on CPU).
        """
        names = [prefix + n for n in ("conv_q", "conv_k", "conv_v")] if self.conv_size is not None else []
        tails = [state.get(n) for n in names]
        if torch.is_grad_enabled():
            qkv, gates, *new_tails = checkpoint(self._features, x, *tails, use_reentrant=False)
        else:
            qkv, gates, *new_tails = self._features(x, *tails)
        state.update(zip(names, new_tails))
        return qkv, gates

    def _features(self, x: torch.Tensor, *tails: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """:meth:`features` without state: returns ``(qkv, gates, *new conv tails)``."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        new_tails = []
        if self.conv_size is None:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        else:
            convs = (self.q_conv, self.k_conv, self.v_conv)
            (q, tq), (k, tk), (v, tv) = (conv(t, tail, output_state=True) for conv, t, tail in zip(convs, (q, k, v), tails))
            new_tails = [tq, tk, tv]
        split = lambda t: rearrange(t, "b t (h d) -> b t h d", d=self.head_dim)  # noqa: E731
        qkv = torch.cat([l2norm(split(q)), l2norm(split(k)), split(v)], dim=-1)
        gates = torch.sigmoid(upcast(self.gate_proj(x)))
        gates = rearrange(gates, "b t (h g) -> b t h g", g=self.n_gates)
        return (qkv, gates, *new_tails)

    def _op(self, qkv: torch.Tensor, gates: torch.Tensor, initial_state, final: bool, read_only: bool = False):
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
            output_final_state=final, retrieval=self.retrieval, **kwargs,
        )  # fmt: skip

    def read(self, q: torch.Tensor, memory_state) -> torch.Tensor:
        """``M(q; W)`` with the fixed weights of ``memory_state``: ``q [batch, seq, heads, head_dim]`` → same shape."""
        qkv = torch.cat([q, q, torch.zeros_like(q)], dim=-1)
        gates = q.new_zeros(*q.shape[:3], self.n_gates)
        return self._op(qkv, gates, memory_state, final=False, read_only=True)[0]

    def run(self, qkv: torch.Tensor, gates: torch.Tensor, state: State, prefix: str = "") -> torch.Tensor:
        """Write and read the memory for new tokens; returns ``[batch, seq, heads, head_dim]``.

        Continues from ``state`` (chunk-boundary memory + pending tokens) and updates it.
        """
        batch, seq = qkv.shape[:2]
        pending_qkv, pending_gates = state.get(prefix + "pending_qkv"), state.get(prefix + "pending_gates")
        past = 0 if pending_qkv is None else pending_qkv.shape[1]
        if past:
            qkv = torch.cat([pending_qkv.to(qkv.dtype), qkv], dim=1)
            gates = torch.cat([pending_gates.to(gates.dtype), gates], dim=1)
        dtype = torch.float64 if qkv.dtype == torch.float64 else torch.float32
        memory_state = self.get_state(state, prefix + "recurrent", batch, dtype)
        total = past + seq
        full = total - total % self.chunk_size
        outs = []
        if full:
            o, memory_state = self._op(qkv[:, :full], gates[:, :full], memory_state, final=True)
            outs.append(o)
        if total > full:
            outs.append(self._op(qkv[:, full:], gates[:, full:], memory_state, final=False)[0])
        state[prefix + "recurrent"] = memory_state
        state[prefix + "pending_qkv"] = qkv[:, full:]
        state[prefix + "pending_gates"] = gates[:, full:]
        o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return o[:, past:]


def _xavier(heads: int, fan_in: int, fan_out: int) -> torch.Tensor:
    """Xavier-normal init of ``heads`` independent ``[fan_in, fan_out]`` matrices."""
    return torch.randn(heads, fan_in, fan_out) * (2.0 / (fan_in + fan_out)) ** 0.5


def _attention(layer: str, hidden_size: int, layer_idx: int, **options) -> Attention:
    """The attention sub-layer of ``layer`` (an :class:`Attention`); its option errors name ``layer``."""
    try:
        return Attention(hidden_size, layer_idx, **options)
    except ConfigError as error:
        raise ConfigError(f"{layer}: {error}") from None


def _pending(seq_len: int | None, chunk_size: int) -> int:
    """Tokens after the last chunk boundary: after ``seq_len`` tokens, or at most (``None``)."""
    return chunk_size - 1 if seq_len is None else seq_len % chunk_size


_MEMORY_DOC = """
        num_heads: memory heads. Default: 2.
        head_dim: per-head width of q, k, v and the memory. Default: ``hidden_size // num_heads``.
        chunk_size: tokens per memory chunk; gradients inside a chunk are taken at its start weights.
            Part of the model (outputs change with it). Default: 16.
        memory: ``"linear"`` (``M(x) = xW``) or ``"mlp"`` (2-layer MLP ``σ(x W1) W2``). Default: ``"linear"``.
        mlp_expansion: hidden width of the MLP memory in units of ``head_dim``. Default: 4.
        mlp_activation: the MLP memory's hidden activation (``gelu``, ``silu``, ``relu``, ``tanh``).
        mlp_residual_norm: MLP memory ``x + LN(MLP(x))`` (TTT/§9.5) with learned per-head LN gain/bias. Default: True.
        max_lr: the inner learning rate is ``θ = max_lr · sigmoid(Linear(x))`` per head. Default: 0.1. Every
            token of a chunk takes its gradient at the chunk-start weights, so similar keys add up to a
            step of about ``chunk_size · θ``; at 1.0 with chunk 16 a MAC model diverged in training and an
            LMM blew up on repetitive text beyond its training length.
        conv_size: taps of the depthwise causal convs after the q/k/v projections; ``None`` disables them. Default: 4.
        use_momentum: learn a momentum gate η (else η = 0). Default: True.
        use_decay: learn a forget gate α (else α = 0). Default: True.
        retrieval: ``"token"`` reads every token with its own updated weights (the paper, the default);
            ``"chunk"`` reads with the weights of the last completed chunk (a chunk's last token sees its
            own chunk), titans-pytorch's cheaper retrieval (spec §9.1)."""


@register_mixer("titans_lmm")
class TitansLMM(TokenMixer):
    (
        """Titans' neural long-term memory as an attention-free token mixer (spec §2.1, §2.4).

    ``q, k, v = L2(SiLU(conv(x W)))`` (no L2 on v), per-head gates ``θ, η, α = sigmoid(Linear(x))``, the
    memory op (retrieve after update, inclusive), then ``W_o(RMSNorm(o) ⊙ sigmoid(x W_g))`` per head.

    Args:
        hidden_size: model width.
        layer_idx: position in the stack (unused; part of the mixer contract)."""
        + _MEMORY_DOC
        + """

    Cache: ``recurrent`` (fp32 memory weights + momenta at the last chunk boundary, ``[batch, heads, n]``),
    ``pending_qkv``/``pending_gates`` (the ``seen_tokens % chunk_size`` tokens since), ``conv_q/k/v``.
    """
    )

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int = 0,
        num_heads: int = 2,
        head_dim: int | None = None,
        chunk_size: int = 16,
        memory: str = "linear",
        mlp_expansion: int = 4,
        mlp_activation: str = "gelu",
        mlp_residual_norm: bool = True,
        max_lr: float = 0.1,
        conv_size: int | None = 4,
        use_momentum: bool = True,
        use_decay: bool = True,
        retrieval: str = "token",
    ) -> None:
        super().__init__()
        head_dim = head_dim_for(self.mixer_name, hidden_size, num_heads, head_dim)
        self.hidden_size, self.layer_idx = hidden_size, layer_idx
        self.memory = _MemoryBranch(
            "titans_lmm", hidden_size, num_heads, head_dim, chunk_size, memory, mlp_expansion, mlp_activation,
            mlp_residual_norm, max_lr, conv_size, use_momentum, use_decay, retrieval,
        )  # fmt: skip
        self.num_heads, self.head_dim = num_heads, head_dim
        self.g_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.out_norm = GatedRMSNorm(head_dim, activation="sigmoid")
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """``x: [batch, seq, hidden] -> [batch, seq, hidden]``; with ``cache``, continue after its tokens."""
        check_hidden("titans_lmm", x, self.hidden_size)
        if x.shape[1] == 0:  # nothing to read or write; the cache stays as it is
            return x.new_zeros(x.shape)
        state = _load(cache)
        o = self.memory.run(*self.memory.features(x, state), state)
        gate = rearrange(self.g_proj(x), "b t (h d) -> b t h d", d=self.head_dim)
        o = self.o_proj(rearrange(self.out_norm(o.to(x.dtype), gate), "b t h d -> b t (h d)"))
        _save(cache, state, x.shape[1])
        return o

    def state_size(self, batch: int = 1, seq_len: int | None = None) -> int:
        """Bytes of the cache after ``seq_len`` tokens (``None``: the most it ever holds, ``chunk_size − 1`` pending)."""
        return self.memory.state_size(batch, _pending(seq_len, self.memory.chunk_size))


class _GatedCombine(nn.Module):
    """``W_o(RMSNorm_a(y) ⊙ sigmoid(RMSNorm_b(m)))`` (spec §9.8): the MAG gate, also MAC's output gate."""

    def __init__(self, width: int, hidden_size: int) -> None:
        super().__init__()
        self.norm_y, self.norm_m = RMSNorm(width), RMSNorm(width)
        self.o_proj = nn.Linear(width, hidden_size, bias=False)

    def forward(self, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.norm_y(y) * torch.sigmoid(self.norm_m(m)))


@register_mixer("titans_mag")
class TitansMAG(TokenMixer):
    (
        """Titans MAG, memory as a gate (spec §2.4, §9.8): ``o = W_o(Norm(SWA*(x)) ⊙ σ(Norm(M(x))))``.

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

    Cache: the memory branch's (``recurrent``, ``pending_*``, ``conv_*``) + ``key``/``value`` (last
    ``window_size − 1`` tokens).
    """
    )

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int = 0,
        num_heads: int = 2,
        head_dim: int | None = None,
        chunk_size: int = 16,
        memory: str = "linear",
        mlp_expansion: int = 4,
        mlp_activation: str = "gelu",
        mlp_residual_norm: bool = True,
        max_lr: float = 0.1,
        conv_size: int | None = 4,
        use_momentum: bool = True,
        use_decay: bool = True,
        retrieval: str = "token",
        window_size: int | None = 64,
        num_persistent: int = 4,
        rope_theta: float | None = 10000.0,
    ) -> None:
        super().__init__()
        head_dim = head_dim_for(self.mixer_name, hidden_size, num_heads, head_dim)
        self.hidden_size, self.layer_idx = hidden_size, layer_idx
        self.memory = _MemoryBranch(
            "titans_mag", hidden_size, num_heads, head_dim, chunk_size, memory, mlp_expansion, mlp_activation,
            mlp_residual_norm, max_lr, conv_size, use_momentum, use_decay, retrieval,
        )  # fmt: skip
        # No output projection: the gate's W_o projects the gated attention output.
        self.attn = _attention(
            "titans_mag", hidden_size, layer_idx, num_heads=num_heads, head_dim=head_dim, window_size=window_size,
            rope_theta=rope_theta, num_persistent=num_persistent, project_output=False,
        )  # fmt: skip
        self.combine = _GatedCombine(num_heads * head_dim, hidden_size)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """``x: [batch, seq, hidden] -> [batch, seq, hidden]``; with ``cache``, continue after its tokens."""
        check_hidden("titans_mag", x, self.hidden_size)
        if x.shape[1] == 0:  # nothing to read or write; the cache stays as it is
            return x.new_zeros(x.shape)
        state = _load(cache)
        offset = 0 if cache is None else cache.seen_tokens
        y, state["key"], state["value"] = self.attn.attend(x, state.get("key"), state.get("value"), offset)
        m = self.memory.run(*self.memory.features(x, state), state)
        o = self.combine(y, rearrange(m, "b t h d -> b t (h d)").to(y.dtype))
        _save(cache, state, x.shape[1])
        return o

    def state_size(self, batch: int = 1, seq_len: int | None = None) -> int:
        """Bytes of the cache after ``seq_len`` tokens (``None``: the most it holds; needs a window)."""
        return self.memory.state_size(batch, _pending(seq_len, self.memory.chunk_size)) + self.attn.state_size(batch, seq_len)


@register_mixer("titans_mal")
class TitansMAL(TokenMixer):
    (
        """Titans MAL, memory as a layer (spec §2.4, Eqs 29–31): the memory layer, then SWA* on its output.

    ``m = W_m(RMSNorm(M(x)) ⊙ σ(x W_g))`` is a full ``titans_lmm`` sub-layer; ``h = x + m`` (residual);
    ``o = m + W_o SWA*(RMSNorm(h))``, so the surrounding block computes ``x + m + SWA*(Norm(x + m))``:
    the two residual sub-layers of the H3-style stack with the memory's output feeding the attention.
    ``SWA*`` is sliding-window attention with learned persistent K/V (``num_persistent`` per head): the
    ``attention`` mixer (``attn``, its ``o_proj`` is ``W_o``).

    Args:
        hidden_size: model width.
        layer_idx: position in the stack (unused)."""
        + _MEMORY_DOC
        + """
        window_size: attention window (itself included); ``None`` = full causal attention. Default: 64.
        num_persistent: learned persistent K/V slots per head. Default: 4.
        rope_theta: RoPE base of the attention; ``None`` disables it.

    Cache: the memory's (``recurrent``, ``pending_*``, ``conv_*``) + ``key``/``value`` (last ``window_size − 1``).
    """
    )

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int = 0,
        num_heads: int = 2,
        head_dim: int | None = None,
        chunk_size: int = 16,
        memory: str = "linear",
        mlp_expansion: int = 4,
        mlp_activation: str = "gelu",
        mlp_residual_norm: bool = True,
        max_lr: float = 0.1,
        conv_size: int | None = 4,
        use_momentum: bool = True,
        use_decay: bool = True,
        retrieval: str = "token",
        window_size: int | None = 64,
        num_persistent: int = 4,
        rope_theta: float | None = 10000.0,
    ) -> None:
        super().__init__()
        self.hidden_size, self.layer_idx = hidden_size, layer_idx
        self.lmm = TitansLMM(
            hidden_size, layer_idx, num_heads, head_dim, chunk_size, memory, mlp_expansion, mlp_activation,
            mlp_residual_norm, max_lr, conv_size, use_momentum, use_decay, retrieval,
        )  # fmt: skip
        head_dim = self.lmm.head_dim
        self.attn_norm = RMSNorm(hidden_size)
        self.attn = _attention(
            "titans_mal", hidden_size, layer_idx, num_heads=num_heads, head_dim=head_dim, window_size=window_size,
            rope_theta=rope_theta, num_persistent=num_persistent,
        )  # fmt: skip

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """``x: [batch, seq, hidden] -> [batch, seq, hidden]``; with ``cache``, continue after its tokens."""
        check_hidden("titans_mal", x, self.hidden_size)
        if x.shape[1] == 0:  # nothing to read or write; the cache stays as it is
            return x.new_zeros(x.shape)
        state = _load(cache)
        lmm = self.lmm
        o = lmm.memory.run(*lmm.memory.features(x, state), state)
        gate = rearrange(lmm.g_proj(x), "b t (h d) -> b t h d", d=lmm.head_dim)
        m = lmm.o_proj(rearrange(lmm.out_norm(o.to(x.dtype), gate), "b t h d -> b t (h d)"))
        offset = 0 if cache is None else cache.seen_tokens
        y, state["key"], state["value"] = self.attn.attend(self.attn_norm(x + m), state.get("key"), state.get("value"), offset)
        _save(cache, state, x.shape[1])
        return m + self.attn.o_proj(y)

    def state_size(self, batch: int = 1, seq_len: int | None = None) -> int:
        """Bytes of the cache after ``seq_len`` tokens (``None``: the most it holds; needs a window)."""
        return self.lmm.state_size(batch, seq_len) + self.attn.state_size(batch, seq_len)


@register_mixer("titans_mac")
class TitansMAC(TokenMixer):
    (
        """Titans MAC, memory as context, in the causal interpretation of spec §9.7 (not titans-pytorch's MAC).

    The sequence is cut into segments of ``segment_size`` tokens (counted from the first token). For a
    token ``i`` of segment ``n``:

    1. ``h_i = M_{n−1}(q̃_i)``, ``q̃_i = L2(SiLU(conv(x_i W_h)))``: the memory as of the end of segment
       ``n−1`` (the learned init for ``n = 0``), read with token ``i``'s own query — never a later one.
    2. ``a_i = Attn(q_i; persistent K/V ‖ K/V(h_j) ‖ K/V(x_j) for j ≤ i in segment n)``: causal
       attention inside the segment; a memory token ``h_j`` is visible only from position ``j`` on, so no
       token sees information from a later token (hazard (a) of §2.4).
    3. The attention outputs are written into the memory token by token (same branch as ``titans_lmm``,
       on ``a`` instead of ``x``), and ``m_i = M_i(a_i)`` is read after token ``i``'s update (hazard (b):
       per-token causal weights, never the end-of-segment memory).
    4. ``o_i = W_o(RMSNorm(a_i) ⊙ sigmoid(RMSNorm(m_i)))``.

    ``segment_size`` must be a multiple of ``chunk_size`` so that segment ends are chunk boundaries.

    Args:
        hidden_size: model width.
        layer_idx: position in the stack (unused)."""
        + _MEMORY_DOC
        + """
        segment_size: attention segment length ``C``. Default: 32.
        num_persistent: learned persistent K/V slots per head. Default: 4.
        rope_theta: RoPE base of the attention (memory tokens take their token's position); ``None`` disables it.

    Cache: the memory branch's (``recurrent``, ``pending_*``, ``conv_q/k/v`` over ``a``) + ``recurrent_segment``
    (memory at the current segment's start) + ``conv_hq`` + ``key``/``value``/``mem_key``/``mem_value``
    (the current segment's tokens and memory tokens, ``seen_tokens % segment_size`` each).
    """
    )

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int = 0,
        num_heads: int = 2,
        head_dim: int | None = None,
        chunk_size: int = 16,
        memory: str = "linear",
        mlp_expansion: int = 4,
        mlp_activation: str = "gelu",
        mlp_residual_norm: bool = True,
        max_lr: float = 0.1,
        conv_size: int | None = 4,
        use_momentum: bool = True,
        use_decay: bool = True,
        retrieval: str = "token",
        segment_size: int = 32,
        num_persistent: int = 4,
        rope_theta: float | None = 10000.0,
    ) -> None:
        super().__init__()
        head_dim = head_dim_for(self.mixer_name, hidden_size, num_heads, head_dim)
        self.hidden_size, self.layer_idx = hidden_size, layer_idx
        width = num_heads * head_dim
        self.memory = _MemoryBranch(
            "titans_mac", width, num_heads, head_dim, chunk_size, memory, mlp_expansion, mlp_activation,
            mlp_residual_norm, max_lr, conv_size, use_momentum, use_decay, retrieval,
        )  # fmt: skip
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

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """``x: [batch, seq, hidden] -> [batch, seq, hidden]``; with ``cache``, continue after its tokens."""
        check_hidden("titans_mac", x, self.hidden_size)
        if x.shape[1] == 0:  # nothing to read or write; the cache stays as it is
            return x.new_zeros(x.shape)
        state = _load(cache)
        offset = 0 if cache is None else cache.seen_tokens
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
            hq, state["conv_hq"] = self.h_conv(hq, state.get("conv_hq"), output_state=True)
        hq = l2norm(split(hq))
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        outs, start = [], 0
        while start < seq:
            pos = offset + start
            n = min(seq - start, self.segment_size - pos % self.segment_size)
            piece = slice(start, start + n)
            # 1. read the memory as of the segment start with each token's own query.
            segment_memory = state["recurrent_segment"] = self.memory.get_state(state, "recurrent_segment", batch, dtype)
            h = rearrange(self.memory.read(hq[:, piece], segment_memory), "b t h d -> b t (h d)").to(x.dtype)
            hk, hv = (split(t) for t in self.h_kv(h).chunk(2, dim=-1))
            if self.rotary is not None:
                hk = self.rotary(hk, pos)
            # 2. causal attention over persistent ‖ memory tokens ‖ tokens of this segment.
            past = 0 if state.get("key") is None else state["key"].shape[1]
            if past:
                hk, hv = torch.cat([state["mem_key"], hk], 1), torch.cat([state["mem_value"], hv], 1)
                kk, vv = torch.cat([state["key"], k[:, piece]], 1), torch.cat([state["value"], v[:, piece]], 1)
            else:
                kk, vv = k[:, piece], v[:, piece]
            # Memory token j sits at token j's position: both halves of the context share one causal mask.
            causal = causal_mask(n, past, device=x.device)
            context_k, context_v = torch.cat([hk, kk], 1), torch.cat([hv, vv], 1)
            a = persistent_attention(q[:, piece], context_k, context_v, torch.cat([causal, causal], 1), self.persistent)
            # 3. write the attention outputs into the memory; read each after its own update.
            m = self.memory.run(*self.memory.features(a, state), state)
            outs.append(self.combine(a, rearrange(m, "b t h d -> b t (h d)").to(a.dtype)))
            if (pos + n) % self.segment_size == 0:
                # The segment is complete: its end is a chunk boundary, the next segment reads this memory.
                state["recurrent_segment"] = state["recurrent"]
                hk, hv, kk, vv = (t[:, :0] for t in (hk, hv, kk, vv))
            state["mem_key"], state["mem_value"], state["key"], state["value"] = hk, hv, kk, vv
            start += n
        _save(cache, state, seq)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def state_size(self, batch: int = 1, seq_len: int | None = None) -> int:
        """Bytes of the cache after ``seq_len`` tokens (``None``: the most it ever holds)."""
        in_segment = self.segment_size - 1 if seq_len is None else seq_len % self.segment_size
        elt = self.qkv.weight.element_size()
        total = self.memory.state_size(batch, _pending(seq_len, self.memory.chunk_size), recurrent_copies=2)
        if self.h_conv is not None:
            total += batch * (self.h_conv.kernel_size - 1) * self.num_heads * self.head_dim * elt
        return total + 4 * batch * in_segment * self.num_heads * self.head_dim * elt
