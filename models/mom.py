"""MoM, Mixture-of-Memories (Du et al. 2025, arXiv 2502.13685): a router sends every token to ``k`` of ``M``
linear memories, each updated only by the tokens routed to it, plus an optional shared memory fed by every token.

Per token ``x_t`` (``D`` wide), with ``M`` memories and top-``k`` routing:

1. **Router.** ``s_t = W_g x_t`` (``gate``, no bias), ``p_t = softmax(s_t)`` in fp32; ``(w_t, I_t) = topk(p_t, k)``
   and ``w_t ← w_t / Σ w_t``, so the selected weights sum to 1.
2. **Memories.** Memory ``m`` sees only its own token stream, the tokens routed to it, in time order. On that
   stream: ``q = conv_q(W_q x)`` (one ``q_proj`` shared by all memories), ``k = conv_k(W_k^m x)``,
   ``v = conv_v(W_v^m x)`` (SiLU short convolutions whose taps read the previous tokens *of the same stream*),
   ``β = σ(W_b^m x)``, ``g = −exp(A_log)·softplus(W_a^m x + dt_bias)`` (``A_log``, ``dt_bias`` per head, shared by
   the memories), and the update rule (the gated delta rule by default) with L2-normalised ``q, k``. A memory
   not selected for a token is untouched: no decay, no write.
3. **Mixing.** ``o_t = Σ_{m ∈ I_t} w_t^m o_t^m``, plus ``o_t^shared`` (weight 1) of the shared memory, which runs
   the same rule over every token with its own ``shared_k/v/b/a`` projections, the same ``q_proj``, the same
   conv modules (with their own tails) and the same ``A_log``/``dt_bias``.
4. **Output.** ``o_proj(RMSNorm(o) ⊙ swish(g_proj(x)))`` per head (``RMSNorm(o)`` without the output gate).

**Training path** (:meth:`MixtureOfMemories._routed_packed`): the ``n`` tokens are duplicated ``k`` times (one
entry per (token, selected memory)), the entries are *stably* sorted by their segment, the (memory, sequence)
pair; inside a segment the time order is kept by the stable sort alone. The segments are laid out memory-major
(fla's padded tensor is memory-major too): they are the same segments as in a sequence-major order, but each
memory's entries then form one contiguous block and its k/v/β/a projections are one matmul on exactly its
entries. The rule runs **once**, packed, with ``cu_seqlens`` over the non-empty segments (the shared memory's
sequences appended to the same call); the outputs are scattered back to their entries and mixed with the
routing weights. Nothing is padded to the longest memory. With the model-level ``cu_seqlens`` (packed
documents) a document is a sequence of its own, so a memory's stream never crosses a document. The short
convolutions run on the same packed segments with per-segment boundaries. Which segments are empty is read
on the host once per call; under ``torch.compile`` that read happens inside one ``torch.library`` op
(``seqzoo::mom_segments``, whose backward recomputes the rule) and every memory projects every token.

**Padded reference** (``path="padded"``, :meth:`MixtureOfMemories._routed_padded`): every (memory, sequence)
pair gets a dense row of capacity 1.0 (as many slots as the sequence has tokens), its routed tokens first in
time order; every memory runs the rule as a dense batch. It computes the same function with about ``M/k``
times the rule's work and shares none of the packed path's index arithmetic: it is the tests' oracle.

**Decoding**: the cache holds ``M`` states per row (+1 shared) and, per memory, the tails of the three convs
over that memory's own stream. A call updates only the memories its tokens were routed to (and the shared
one); every other memory's state and tails are left bitwise as they were.

**fla compatibility.** Parameter names and layouts are those of fla 0.6.0's ``MomAttention`` (``q_proj``,
``gate``, ``k_proj.{m}``, ``v_proj.{m}``, ``b_proj.{m}``, ``a_proj.{m}``, ``shared_k/v/b/a``, ``A_log``,
``dt_bias``, ``q_conv1d``/``k_conv1d``/``v_conv1d``, ``g_proj``, ``o_norm``, ``o_proj``) with one rename: our
conv modules keep their weight one level down (``q_conv1d.conv.weight`` for fla's ``q_conv1d.weight``, same
shape ``[channels, 1, conv_size]``). ``load_state_dict`` accepts either spelling and :meth:`fla_state_dict`
writes fla's. With those weights the layer computes fla's inference path (its ``cu_seqlens``-respecting convs);
fla's training path differs only in that its convs read across segment boundaries, which we never do.
fla 0.6.0 orders each memory's tokens with a plain ``argsort()`` (stable on its GPUs by accident, not on a
CPU), so on a CPU fla's own output is not causal; ours sorts with ``stable=True``. ``seqzoo-eval convert-fla``
turns an fla MoM checkpoint into a seqzoo model (``tests/test_fla_convert.py`` checks it against fla's model).

**Router statistics** for the balance loss leave the layer by a side channel: every forward stores the
router logits on the layer (:attr:`MixtureOfMemories.router_logits`, ``[batch, seq, M]``, with their graph);
:meth:`seqzoo.models.LanguageModel.routing_stats` collects them after the forward and clears them. An attribute
write is a side effect ``torch.compile(fullgraph=True)`` replays after the graph, so the mixer still compiles
whole, and the model's ``forward``/``loss`` signatures stay the same for every mixer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from seqzoo.models.base import Call, StateShapes, TokenMixer, head_dim_for, op_backend
from seqzoo.models.cache import LayerCache
from seqzoo.models.linear_common import init_a_log, init_dt_bias, merge_heads, require, split_heads
from seqzoo.models.modules import GatedRMSNorm, RMSNorm, ShortConvolution, upcast
from seqzoo.models.registry import register_mixer
from seqzoo.ops import delta_rule, gated_delta_rule, l2norm, simple_gla
from seqzoo.ops.core import packed_to_padded, padded_to_packed
from seqzoo.ops.gated_delta_rule import BACKENDS as DELTA_BACKENDS
from seqzoo.ops.simple_gla import BACKENDS as GLA_BACKENDS

__all__ = [
    "BALANCE_FORMS",
    "UPDATE_RULES",
    "MixtureOfMemories",
    "layer_balance_loss",
    "route",
    "routing_loads",
    "switch_balance_loss",
]

#: Memory update rules: name → (uses a write strength β, has a decay gate g). All keep a
#: ``[heads, head_dim, head_v_dim]`` state and take ``cu_seqlens``, so the routing machinery is the same.
UPDATE_RULES: dict[str, tuple[bool, bool]] = {
    "gated_delta_rule": (True, True),  # S ← e^g (I − β k kᵀ) S + β k vᵀ   (the paper's and fla's)
    "delta_rule": (True, False),  # S ← (I − β k kᵀ) S + β k vᵀ
    "simple_gla": (False, True),  # S ← e^g S + k vᵀ   (linear attention with a scalar decay per head)
}

#: Balance-loss forms (the model config's ``balance_loss.form``).
BALANCE_FORMS = ("layer", "switch")


# ---------------------------------------------------------------------------------------------- routing


def route(logits: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` routing: ``softmax(logits)``, the ``k`` largest probabilities renormalised to sum to 1.

    Args:
        logits: ``[..., M]`` router logits (fp32 or fp64).
        topk: memories per token.
    Returns:
        ``(weights [..., k], memories [..., k])``: weights in ``logits.dtype`` summing to 1, memory ids (long).
    """
    probs = torch.softmax(logits, dim=-1)
    weights, memories = torch.topk(probs, topk, dim=-1)
    return weights / weights.sum(-1, keepdim=True), memories


def routing_loads(logits: torch.Tensor, topk: int) -> torch.Tensor:
    """Fraction of the tokens routed to each memory, ``[M]`` (sums to ``k``), from logits ``[..., M]``."""
    memories = torch.topk(logits, topk, dim=-1).indices.reshape(-1, topk)
    chosen = F.one_hot(memories, logits.shape[-1]).amax(1)  # [tokens, M]: 1 where the memory was selected
    return chosen.float().mean(0)


def switch_balance_loss(logits: Sequence[torch.Tensor], topk: int) -> torch.Tensor:
    """The Switch/Mixtral balance loss over the tokens of **all layers at once** (fla's MoM loss):
    ``M · Σ_m f_m P_m`` with ``f_m`` the fraction of (token, slot) pairs whose top-``k`` slot picks ``m`` (summed
    over the ``k`` slots, so ``Σ_m f_m = k``) and ``P_m`` the mean router probability of ``m``.

    ``k`` under perfectly balanced routing, up to ``M`` when every token picks the same ``k`` memories.

    Args:
        logits: one ``[..., M]`` tensor per routed layer (the same ``M`` everywhere).
        topk: memories per token.
    Returns: a scalar, fp32 (fp64 for fp64 logits).
    """
    flat = torch.cat([upcast(x).reshape(-1, x.shape[-1]) for x in logits])
    num_memories = flat.shape[-1]
    probs = torch.softmax(flat, dim=-1)
    memories = torch.topk(probs, topk, dim=-1).indices
    per_slot = F.one_hot(memories, num_memories).to(probs.dtype).mean(0)  # [k, M]
    return num_memories * (per_slot * probs.mean(0)).sum()


def layer_balance_loss(logits: Sequence[torch.Tensor], topk: int) -> torch.Tensor:
    """The per-layer balance loss of the MoM paper's code, averaged over layers: per layer and batch row,
    ``M² · mean_m(f_m · P_m)`` with ``f_m`` the fraction of the row's tokens routed to ``m`` and ``P_m`` the mean
    *renormalised* routing weight of ``m`` (0 where not selected); averaged over rows, then over layers.

    Balancing each layer (and row) on its own prevents the degenerate solution where layers collapse onto
    different memories while the all-layer statistics still look balanced. ``k`` under balanced routing.

    Args:
        logits: one ``[batch, seq, M]`` tensor per routed layer (a packed row of documents is one row).
        topk: memories per token.
    Returns: a scalar, fp32 (fp64 for fp64 logits).
    """
    losses = []
    for layer_logits in logits:
        x = upcast(layer_logits)
        x = x.reshape(-1, *x.shape[-2:]) if x.dim() >= 3 else x[None]  # [rows, seq, M]
        num_memories = x.shape[-1]
        weights, memories = route(x, topk)
        full = torch.zeros_like(x).scatter(-1, memories, weights)
        chosen = torch.zeros_like(x).scatter(-1, memories, 1.0)
        losses.append((chosen.mean(-2) * full.mean(-2)).mean() * num_memories**2)
    return torch.stack(losses).mean()


# ------------------------------------------------------------------------------ the packed rule call


def _nonempty(offsets: Sequence[int]) -> tuple[list[int], list[int]]:
    """``(kept, cu_seqlens)``: the indices of the non-empty segments among ``offsets`` (``[S + 1]``, repeats for
    empty segments) and the strictly increasing offsets over them alone, which the ops require."""
    kept = [i for i in range(len(offsets) - 1) if offsets[i + 1] > offsets[i]]
    return kept, [0, *(offsets[i + 1] for i in kept)]


def _run_rule(
    rule: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | None,
    g: torch.Tensor | None,
    *,
    cu_seqlens: Sequence[int] | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One call of update rule ``rule`` on ``[batch, seq, heads, dim]`` inputs, from a dense batch (``cu_seqlens``
    ``None``) or sequences packed along ``seq`` at the host offsets ``cu_seqlens`` (strictly increasing).
    Returns the op's ``(o, final_state)``."""
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, device=q.device)
    common = dict(initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu, backend=backend)
    if rule == "gated_delta_rule":
        return gated_delta_rule(q, k, v, beta, g, use_qk_l2norm=True, **common)
    if rule == "delta_rule":
        return delta_rule(q, k, v, beta, use_qk_l2norm=True, **common)
    return simple_gla(q, k, v, g, **common)  # the layer L2-normalises q and k itself (the op has no such option)


def _run_segments(
    rule: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | None,
    g: torch.Tensor | None,
    bounds: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    """The rule over the segments at device offsets ``bounds`` (empty ones allowed), from zero states."""
    cu_seqlens = _nonempty(bounds.tolist())[1]
    return _run_rule(rule, q, k, v, beta, g, cu_seqlens=cu_seqlens, initial_state=None, output_final_state=False, backend=backend)[0]


def _optional(t: torch.Tensor) -> torch.Tensor | None:
    # torch.library arguments cannot be None: an absent β or g travels as a 0-element tensor.
    return t if t.numel() else None


@torch.library.custom_op("seqzoo::mom_segments", mutates_args=())
def _segments_op(
    rule: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, g: torch.Tensor, bounds: torch.Tensor, backend: str
) -> torch.Tensor:
    """The packed rule call of the training path as one opaque op, for ``torch.compile``.

    Which segments are empty is data (the routing), and the ops read ``cu_seqlens`` on the host: Dynamo
    cannot trace that, so under compile the call is this op (fixed output shape ``[1, seq, heads, value_dim]``).
    Its backward recomputes the forward under autograd (no saved intermediates; one more forward of the rule).
    """
    return _run_segments(rule, q, k, v, _optional(beta), _optional(g), bounds, backend)


@_segments_op.register_fake
def _segments_op_fake(rule, q, k, v, beta, g, bounds, backend):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@torch.library.custom_op("seqzoo::mom_segments_backward", mutates_args=())
def _segments_backward_op(
    rule: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor,
    bounds: torch.Tensor,
    backend: str,
    grad_o: torch.Tensor,
) -> list[torch.Tensor]:
    """Gradients of :func:`_segments_op` for ``q, k, v, beta, g`` (0-element for an absent ``beta``/``g``)."""
    inputs = [t.detach().requires_grad_(t.numel() > 0) for t in (q, k, v, beta, g)]
    # An op's implementation runs below the autograd dispatch keys, where nothing is recorded even under
    # enable_grad(); the guard clears the excluded keys for the recompute (private, but in every torch this
    # project accepts), keeping the included ones the factory functions need.
    unexcluded = torch._C._ForceDispatchKeyGuard(
        torch._C._dispatch_tls_local_include_set(), torch._C.DispatchKeySet(torch._C.DispatchKey.Undefined)
    )
    with unexcluded, torch.enable_grad():
        o = _run_segments(rule, *inputs[:3], _optional(inputs[3]), _optional(inputs[4]), bounds, backend)
    live = [t for t in inputs if t.requires_grad]
    grads = iter(torch.autograd.grad(o, live, grad_o, allow_unused=True))
    out = []
    for t in inputs:
        grad = next(grads) if t.requires_grad else None
        out.append(torch.zeros_like(t) if grad is None else grad)
    return out


@_segments_backward_op.register_fake
def _segments_backward_fake(rule, q, k, v, beta, g, bounds, backend, grad_o):
    return [torch.empty_like(t) for t in (q, k, v, beta, g)]


def _segments_setup(ctx, inputs, output) -> None:
    rule, q, k, v, beta, g, bounds, backend = inputs
    ctx.rule, ctx.backend = rule, backend
    ctx.save_for_backward(q, k, v, beta, g, bounds)


def _segments_backward(ctx, grad_o):
    q, k, v, beta, g, bounds = ctx.saved_tensors
    dq, dk, dv, dbeta, dg = _segments_backward_op(ctx.rule, q, k, v, beta, g, bounds, ctx.backend, grad_o.contiguous())
    return None, dq, dk, dv, (dbeta if beta.numel() else None), (dg if g.numel() else None), None, None


_segments_op.register_autograd(_segments_backward, setup_context=_segments_setup)


# ------------------------------------------------------------------------------------------ the layer


@register_mixer("mom")
class MixtureOfMemories(TokenMixer):
    """MoM: top-``k`` routed linear memories plus an optional shared memory (see the module docstring for the
    equations, the packed training path, decoding and fla compatibility).

    Args:
        hidden_size: model width ``D``.
        layer_idx: position in the stack (unused; part of the mixer contract).
        num_memories: routed memories ``M``. Default: 4 (the paper's configs).
        topk: memories per token ``k`` (``1 <= k <= M``). Default: 2.
        shared_memory: a memory fed by every token, added with weight 1 (fla's ``shared_mem``). Default: True.
        single_kv_proj: one set of ``k/v/b/a`` projections (``shared_k/v/b/a``) for every memory, the shared one
            included; the memories then differ only by the tokens they see. Default: False.
        num_heads: heads. Default: 4.
        head_dim: key width per head. Default: ``hidden_size // num_heads``.
        expand_v: value width per head ``= expand_v · head_dim``. Default: 2.0 (fla's layer default, as GDN).
        use_output_gate: the swish-gated output norm (else a plain per-head RMSNorm). Default: True.
        use_short_conv: SiLU short convs on ``q, k, v`` within each memory's stream (without them: a plain
            SiLU). Default: True.
        conv_size: taps of the convs. Default: 4.
        conv_bias: a bias in the convs (fla's ``conv_bias``). Default: False.
        update_rule: the memories' rule, one of :data:`UPDATE_RULES`: ``"gated_delta_rule"`` (default),
            ``"delta_rule"`` (no decay: no ``a`` projections, ``A_log``, ``dt_bias``) or ``"simple_gla"`` (no ``β``:
            no ``b`` projections; ``q, k`` L2-normalised as for the delta rules).
        a_init_range: ``(low, high)`` of the uniform init of ``A``. Default: ``(0, 16)``.
        dt_range: ``(dt_min, dt_max)`` of the log-uniform init of the step size. Default: ``(1e-3, 1e-1)``.
        norm_eps: epsilon of the output norm. Default: 1e-5.
        path: ``"packed"`` (default, the varlen training path) or ``"padded"`` (the capacity-1.0 dense reference,
            for tests and benchmarks; a call with a cache always runs the packed path, the only one that decodes).
        backend: the rule's backend (``"auto"``, ``"reference"``, ``"torch"``, ``"triton"``, ``"fused"``).

    Shapes: ``[batch, seq, hidden] -> [batch, seq, hidden]``.
    Cache (per row): ``recurrent`` ``[M, heads, head_dim, head_v_dim]`` and ``shared``
    ``[heads, head_dim, head_v_dim]`` (fp32; fp64 for a float64 model); ``conv_q/k/v`` ``[M, conv_size − 1, width]``
    (each memory's own stream) and ``shared_conv_q/k/v`` ``[conv_size − 1, width]``.
    Attributes:
        router_logits: ``[batch, seq, M]`` logits of the last forward (fp32; fp64 for a float64 model), for the
            balance loss; :meth:`pop_router_logits` hands them over and clears them.
    """

    has_router = True

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int = 0,
        num_memories: int = 4,
        topk: int = 2,
        shared_memory: bool = True,
        single_kv_proj: bool = False,
        num_heads: int = 4,
        head_dim: int | None = None,
        expand_v: float = 2.0,
        use_output_gate: bool = True,
        use_short_conv: bool = True,
        conv_size: int = 4,
        conv_bias: bool = False,
        update_rule: str = "gated_delta_rule",
        a_init_range: Sequence[float] = (0.0, 16.0),
        dt_range: Sequence[float] = (1e-3, 1e-1),
        norm_eps: float = 1e-5,
        path: str = "packed",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        name = "mom"
        require(name, isinstance(num_memories, int) and num_memories >= 1, f"num_memories must be an integer >= 1, got {num_memories!r}")
        require(
            name,
            isinstance(topk, int) and 1 <= topk <= num_memories,
            f"topk must be an integer in [1, num_memories={num_memories}], got {topk!r}",
        )
        require(name, update_rule in UPDATE_RULES, f"update_rule must be one of {', '.join(UPDATE_RULES)}, got {update_rule!r}")
        require(name, path in ("packed", "padded"), f"path must be 'packed' or 'padded', got {path!r}")
        self.backend = op_backend(name, update_rule, backend, GLA_BACKENDS if update_rule == "simple_gla" else DELTA_BACKENDS)
        head_dim = head_dim_for(name, hidden_size, num_heads, head_dim)
        head_v_dim = int(head_dim * expand_v)
        require(name, head_dim >= 1 and head_v_dim >= 1, f"head_dim and head_dim·expand_v must be >= 1, got {head_dim}, {head_v_dim}")
        if use_short_conv:
            require(name, isinstance(conv_size, int) and conv_size >= 1, f"conv_size must be an integer >= 1, got {conv_size!r}")
        self.hidden_size, self.layer_idx = hidden_size, layer_idx
        self.num_memories, self.topk, self.shared_memory, self.single_kv_proj = num_memories, topk, shared_memory, single_kv_proj
        self.num_heads, self.head_k_dim, self.head_v_dim = num_heads, head_dim, head_v_dim
        self.update_rule, self.path = update_rule, path
        self.uses_beta, self.has_decay = UPDATE_RULES[update_rule]
        key_dim, value_dim = num_heads * head_dim, num_heads * head_v_dim
        self.key_dim, self.value_dim = key_dim, value_dim
        # Per memory: k, v, then β and a where the rule has them; their widths, in the order of the fused matmul.
        self._widths = [key_dim, value_dim] + [num_heads] * (int(self.uses_beta) + int(self.has_decay))

        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.gate = nn.Linear(hidden_size, num_memories, bias=False)
        if single_kv_proj or shared_memory:
            self.shared_k = nn.Linear(hidden_size, key_dim, bias=False)
            self.shared_v = nn.Linear(hidden_size, value_dim, bias=False)
            self.shared_b = nn.Linear(hidden_size, num_heads, bias=False) if self.uses_beta else None
            self.shared_a = nn.Linear(hidden_size, num_heads, bias=False) if self.has_decay else None
        if not single_kv_proj:

            def per_memory(width: int) -> nn.ModuleList:
                return nn.ModuleList(nn.Linear(hidden_size, width, bias=False) for _ in range(num_memories))

            self.k_proj = per_memory(key_dim)
            self.v_proj = per_memory(value_dim)
            self.b_proj = per_memory(num_heads) if self.uses_beta else None
            self.a_proj = per_memory(num_heads) if self.has_decay else None
        if self.has_decay:
            low, high = a_init_range
            require(name, 0 <= low < high, f"a_init_range must be [low, high] with 0 <= low < high, got {list(a_init_range)}")
            dt_min, dt_max = dt_range
            require(name, 0 < dt_min <= dt_max, f"dt_range must be [min, max] with 0 < min <= max, got {list(dt_range)}")
            self.A_log = init_a_log(num_heads, low, high)
            self.dt_bias = init_dt_bias(num_heads, dt_min, dt_max)
        self.use_short_conv = use_short_conv
        if use_short_conv:
            self.q_conv1d = ShortConvolution(key_dim, conv_size, "silu", conv_bias)
            self.k_conv1d = ShortConvolution(key_dim, conv_size, "silu", conv_bias)
            self.v_conv1d = ShortConvolution(value_dim, conv_size, "silu", conv_bias)
        self.g_proj = nn.Linear(hidden_size, value_dim, bias=False) if use_output_gate else None
        self.o_norm = GatedRMSNorm(head_v_dim, norm_eps, "silu") if use_output_gate else RMSNorm(head_v_dim, norm_eps)
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)
        self.router_logits: torch.Tensor | None = None
        self.register_load_state_dict_pre_hook(_accept_fla_conv_names)

    # ------------------------------------------------------------------------------ weights

    def _memory_linears(self, m: int) -> list[nn.Linear]:
        """Memory ``m``'s ``k, v`` (and ``b``, ``a`` where the rule has them) projections."""
        if self.single_kv_proj:
            return self._shared_linears()
        mods = [self.k_proj[m], self.v_proj[m]]
        mods += [self.b_proj[m]] if self.uses_beta else []
        mods += [self.a_proj[m]] if self.has_decay else []
        return mods

    def _shared_linears(self) -> list[nn.Linear]:
        """The shared memory's ``k, v`` (and ``b``, ``a``) projections."""
        return [self.shared_k, self.shared_v] + ([self.shared_b] if self.uses_beta else []) + ([self.shared_a] if self.has_decay else [])

    def _memory_weight(self, m: int) -> torch.Tensor:
        """Memory ``m``'s projections as one ``[k + v (+ β) (+ a) widths, D]`` matrix (one matmul per memory)."""
        return torch.cat([lin.weight for lin in self._memory_linears(m)])

    def fla_state_dict(self) -> dict[str, torch.Tensor]:
        """This layer's ``state_dict`` with fla's ``MomAttention`` names (``q_conv1d.weight`` for ``q_conv1d.conv.weight``)."""
        return {key.replace("_conv1d.conv.", "_conv1d."): value for key, value in self.state_dict().items()}

    # ------------------------------------------------------------------------------ state

    def state_shapes(self, seq_len: int | None = None) -> StateShapes:
        """``M`` memory states (+1 shared) and, per memory (+ shared), the tails of the three convs; independent of ``seq_len``."""
        state = (self.num_heads, self.head_k_dim, self.head_v_dim)
        dtype = self.state_dtype()
        shapes: StateShapes = {"recurrent": ((self.num_memories, *state), dtype)}
        if self.shared_memory:
            shapes["shared"] = (state, dtype)
        if self.use_short_conv:
            keep, conv_dtype = self.q_conv1d.kernel_size - 1, self.q_conv1d.conv.weight.dtype
            for name, width in (("q", self.key_dim), ("k", self.key_dim), ("v", self.value_dim)):
                shapes[f"conv_{name}"] = ((self.num_memories, keep, width), conv_dtype)
                if self.shared_memory:
                    shapes[f"shared_conv_{name}"] = ((keep, width), conv_dtype)
        return shapes

    def pop_router_logits(self) -> torch.Tensor | None:
        """The router logits of the last forward (``[batch, seq, M]``), cleared here so no graph outlives its step."""
        logits, self.router_logits = self.router_logits, None
        return logits

    # ------------------------------------------------------------------------------ forward

    def router(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits ``[batch, seq, M]`` in fp32 (fp64 for fp64 inputs), also under autocast: a bf16 gate would
        round near-tied probabilities and flip top-``k`` choices between otherwise equal runs."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.to(dtype), self.gate.weight.to(dtype))

    def mix(self, x: torch.Tensor, cache: LayerCache | None, call: Call) -> torch.Tensor:
        logits = self.router(x)
        self.router_logits = logits
        weights, memories = route(logits, self.topk)
        weights = weights.to(x.dtype)
        if self.path == "padded" and cache is None:
            o = self._routed_padded(x, weights, memories, call)
        else:
            o = self._routed_packed(x, weights, memories, cache, call)
        if self.g_proj is not None:
            o = self.o_norm(o, split_heads(self.g_proj(x), self.head_v_dim))
        else:
            o = self.o_norm(o)
        return self.o_proj(merge_heads(o))

    def _gates(self, b: torch.Tensor | None, a: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``β = σ(b)`` and the log decay ``g = −exp(A_log)·softplus(a + dt_bias)`` (fp32, ≤ 0), where the rule has them."""
        beta = torch.sigmoid(b) if b is not None else None
        g = -upcast(self.A_log).exp() * F.softplus(upcast(a) + upcast(self.dt_bias)) if a is not None else None
        return beta, g

    def _conv(
        self, name: str, x: torch.Tensor, state: torch.Tensor | None, want_state: bool, offsets
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Conv ``name`` (``q``/``k``/``v``) on ``[batch, seq, width]`` (a plain SiLU without short convs)."""
        if not self.use_short_conv:
            return F.silu(x), None
        return getattr(self, f"{name}_conv1d")(x, state, output_state=want_state, offsets=offsets)

    def _routed_packed(
        self, x: torch.Tensor, weights: torch.Tensor, memories: torch.Tensor, cache: LayerCache | None, call: Call
    ) -> torch.Tensor:
        """The varlen path: ``[batch, seq, hidden]`` → mixed memory outputs ``[batch, seq, heads, head_v_dim]``."""
        batch, seq, hidden = x.shape
        n, k, num_mem, rows = batch * seq, self.topk, self.num_memories, call.num_seqs
        compiling = torch.compiler.is_compiling()
        if compiling and cache is not None:
            raise ValueError("mom: cached decoding does not compile (the routed segments are read on the host); compile the parallel form")
        device = x.device
        x_flat = x.reshape(n, hidden)

        # Entries: one per (token, selected memory), token-major; segment id = memory · rows + sequence.
        if call.packed:
            seq_of = call.sequence_ids(device)
        else:
            seq_of = torch.arange(batch, device=device)[:, None].expand(batch, seq).reshape(n)
        entry_memory = memories.reshape(n * k)
        entry_token = torch.arange(n, device=device)[:, None].expand(n, k).reshape(n * k)
        segment = entry_memory * rows + seq_of[entry_token]
        # Stable: inside a segment the entries keep their token order, i.e. time order (torch's default sort is not
        # documented as stable).
        order = torch.argsort(segment, stable=True)
        token_of, memory_of = entry_token[order], entry_memory[order]
        counts = torch.zeros(num_mem * rows, dtype=torch.long, device=device).scatter_add_(0, segment, torch.ones_like(segment))
        bounds = F.pad(counts.cumsum(0), (1, 0))  # [M·rows + 1], memory-major, on the device
        # Eager: the one host read of the routing (segment sizes), for the memories' blocks and the op's cu_seqlens.
        host_counts = None if compiling else counts.tolist()

        # Projections of the sorted entries: q once per token (shared q_proj), k/v/β/a with each memory's own weights.
        q_all = self.q_proj(x_flat)
        q_r = q_all[token_of]
        if self.single_kv_proj:
            kvba_all = F.linear(x_flat, self._memory_weight(0))  # the shared memory's too
            kvba = kvba_all[token_of]
        elif compiling:
            # Under compile the memories' block sizes are data: every memory projects every token, and the
            # entry picks its own memory's row (M/k times the projection work of the eager path).
            every = torch.stack([F.linear(x_flat, self._memory_weight(m)) for m in range(num_mem)], dim=1)
            kvba = every[token_of, memory_of]
        else:
            per_memory = [sum(host_counts[m * rows : (m + 1) * rows]) for m in range(num_mem)]
            blocks = x_flat[token_of].split(per_memory)
            kvba = torch.cat([F.linear(block, self._memory_weight(m)) for m, block in enumerate(blocks)])
        k_r, v_r, *gates = kvba.split(self._widths, dim=-1)
        beta_r, g_r = self._gates(gates[0] if self.uses_beta else None, gates[-1] if self.has_decay else None)

        # Short convs on the memories' own streams: taps stop at every (memory, sequence) segment boundary and
        # continue from that memory's cached tail; the shared memory convolves each sequence whole.
        want = cache is not None
        tails: dict[str, torch.Tensor | None] = {}
        routed = {}
        for name, value in (("q", q_r), ("k", k_r), ("v", v_r)):
            state = cache.get(f"conv_{name}") if want and self.use_short_conv else None
            if state is not None:  # [rows, M, keep, width] → one tail per segment, memory-major
                state = state.transpose(0, 1).reshape(num_mem * rows, *state.shape[2:])
            routed[name], tails[name] = self._conv(name, value[None], state, want, bounds)
        heads = {"q": self.head_k_dim, "k": self.head_k_dim, "v": self.head_v_dim}
        parts = [(*(split_heads(routed[c], heads[c]) for c in "qkv"), beta_r, g_r)]

        if self.shared_memory:
            if self.single_kv_proj:
                kvba_s = kvba_all.view(batch, seq, -1)
            else:
                kvba_s = F.linear(x, torch.cat([lin.weight for lin in self._shared_linears()]))
            k_s, v_s, *gates_s = kvba_s.split(self._widths, dim=-1)
            beta_s, g_s = self._gates(gates_s[0] if self.uses_beta else None, gates_s[-1] if self.has_decay else None)
            shared = {}
            for name, value in (("q", q_all.view(batch, seq, -1)), ("k", k_s), ("v", v_s)):
                state = cache.get(f"shared_conv_{name}") if want and self.use_short_conv else None
                shared[name], tails[f"shared_{name}"] = self._conv(name, value, state, want, call.offsets)
            flat = [split_heads(shared[c], heads[c]).reshape(1, n, self.num_heads, heads[c]) for c in "qkv"]
            parts.append((*flat, *(None if t is None else t.reshape(1, n, -1)[0] for t in (beta_s, g_s))))

        # One packed call for every segment: the routed (memory, sequence) segments, then the shared memory's sequences.
        q, kk, v = (torch.cat([p[i] for p in parts], dim=1) for i in range(3))
        beta = torch.cat([p[3] for p in parts])[None] if self.uses_beta else None
        g = torch.cat([p[4] for p in parts])[None] if self.has_decay else None
        if self.update_rule == "simple_gla":
            q, kk = l2norm(q), l2norm(kk)
        if compiling:
            all_bounds = bounds
            if self.shared_memory:
                rows_end = (
                    call.cu_seqlens[1:].to(device=device, dtype=torch.long)
                    if call.packed
                    else seq * torch.arange(1, batch + 1, device=device)
                )
                all_bounds = torch.cat([bounds, n * k + rows_end])
            empty = q.new_empty(0)
            o = torch.ops.seqzoo.mom_segments(
                self.update_rule, q, kk, v, beta if beta is not None else empty, g if g is not None else empty, all_bounds, self.backend
            )
        else:
            offsets = [0]
            for c in host_counts:
                offsets.append(offsets[-1] + c)
            if self.shared_memory:
                row_offsets = call.offsets if call.packed else [i * seq for i in range(batch + 1)]
                offsets += [n * k + o for o in row_offsets[1:]]
            kept, cu_seqlens = _nonempty(offsets)
            initial = self._initial_states(cache, kept, rows, device) if want else None
            o, finals = _run_rule(
                self.update_rule,
                q,
                kk,
                v,
                beta,
                g,
                cu_seqlens=cu_seqlens,
                initial_state=initial,
                output_final_state=want,
                backend=self.backend,
            )
            if want:
                self._store(cache, finals, kept, tails, rows)

        # Back from segment order to (token, slot) entries, weighted and summed over the k slots.
        o_r = o[0, : n * k]
        entries = torch.zeros_like(o_r).index_copy(0, order, o_r)
        mixed = (entries.view(n, k, *o_r.shape[1:]) * weights.reshape(n, k, 1, 1)).sum(1)
        if self.shared_memory:
            mixed = mixed + o[0, n * k :]
        return mixed.view(batch, seq, self.num_heads, self.head_v_dim)

    def _slots(self, kept: list[int], rows: int) -> torch.Tensor:
        """Where the state of each kept segment lives in ``[rows·M (routed, row-major) ; rows (shared)]``: segment
        ``s = m · rows + r`` (routed) is row ``r``'s memory ``m``; segment ``M·rows + r`` is row ``r``'s shared memory."""
        num_mem = self.num_memories
        return torch.tensor([(s % rows) * num_mem + s // rows if s < num_mem * rows else s for s in kept])

    def _initial_states(self, cache: LayerCache, kept: list[int], rows: int, device: torch.device) -> torch.Tensor:
        """The states entering the kept segments of the packed call, ``[len(kept), heads, dk, dv]`` (zeros on a new cache).

        Only those are gathered: a decode step reads the ``k`` (+1) states it updates, not all ``M``.
        """
        dtype = self.state_dtype()
        shape = (self.num_heads, self.head_k_dim, self.head_v_dim)
        if cache.get("recurrent") is None:
            cache.set("recurrent", torch.zeros(rows, self.num_memories, *shape, dtype=dtype, device=device))
            if self.shared_memory:
                cache.set("shared", torch.zeros(rows, *shape, dtype=dtype, device=device))
        states = cache.get("recurrent").view(-1, *shape)
        if self.shared_memory:
            states = torch.cat([states, cache.get("shared")])
        return states[self._slots(kept, rows).to(device)]

    def _store(self, cache: LayerCache, finals: torch.Tensor, kept: list[int], tails: dict[str, torch.Tensor | None], rows: int) -> None:
        """Write back the final states of the segments that had tokens (and every conv tail); the other memories'
        states are not touched, so they stay bitwise as they were."""
        num_mem = self.num_memories
        routed = sum(1 for s in kept if s < num_mem * rows)  # kept is sorted: the routed segments come first
        if routed:
            state = cache.get("recurrent")
            slots = self._slots(kept[:routed], rows).to(finals.device)
            state.view(rows * num_mem, *state.shape[2:]).index_copy_(0, slots, finals[:routed].to(state.dtype))
        if self.shared_memory:
            # Every sequence of a call has at least one token, so all its shared segments were kept, in row order.
            cache.set("shared", finals[routed:])
        if self.use_short_conv:
            for name in ("q", "k", "v"):
                tail = tails[name]  # [M·rows, keep, width], memory-major; an empty segment's tail is its old one
                cache.set(f"conv_{name}", tail.view(num_mem, rows, *tail.shape[1:]).transpose(0, 1))
                if self.shared_memory:
                    cache.set(f"shared_conv_{name}", tails[f"shared_{name}"])

    def _routed_padded(self, x: torch.Tensor, weights: torch.Tensor, memories: torch.Tensor, call: Call) -> torch.Tensor:
        """The capacity-1.0 dense reference: every memory runs the rule over a dense ``[rows, longest]`` batch, each
        row its routed tokens first (in time order), the rest after them (they cannot reach the routed tokens'
        outputs through a causal rule, and their own outputs get weight 0). Same shapes as :meth:`_routed_packed`."""
        batch, seq, _ = x.shape
        full = torch.zeros(batch, seq, self.num_memories, dtype=weights.dtype, device=x.device).scatter(-1, memories, weights)
        chosen = torch.zeros(batch, seq, self.num_memories, dtype=torch.bool, device=x.device).scatter(-1, memories, True)
        rows_x = x
        if call.packed:  # documents as rows, padded at the end: a padding token has weight 0 and is routed nowhere
            rows_x, full, chosen = (packed_to_padded(t, call.offsets) for t in (x, full, chosen))
        q_rows = self.q_proj(rows_x)

        def run(q: torch.Tensor, xs: torch.Tensor, linears: list[nn.Linear]) -> torch.Tensor:
            k, v, *gates = (lin(xs) for lin in linears)
            beta, g = self._gates(gates[0] if self.uses_beta else None, gates[-1] if self.has_decay else None)
            q, k, v = (self._conv(c, t, None, False, None)[0] for c, t in (("q", q), ("k", k), ("v", v)))
            q, k, v = split_heads(q, self.head_k_dim), split_heads(k, self.head_k_dim), split_heads(v, self.head_v_dim)
            if self.update_rule == "simple_gla":
                q, k = l2norm(q), l2norm(k)
            return _run_rule(
                self.update_rule, q, k, v, beta, g, cu_seqlens=None, initial_state=None, output_final_state=False, backend=self.backend
            )[0]

        out = 0
        for m in range(self.num_memories):
            # Slot j of row r holds token slots[r, j]: the routed tokens first, in time order (a stable sort of "not routed").
            slots = torch.argsort((~chosen[..., m]).to(torch.int8), dim=1, stable=True)
            gather = slots[..., None]
            o_m = run(
                q_rows.gather(1, gather.expand(-1, -1, q_rows.shape[-1])),
                rows_x.gather(1, gather.expand(-1, -1, rows_x.shape[-1])),
                self._memory_linears(m),
            )
            back = torch.zeros_like(o_m).scatter(1, slots[..., None, None].expand_as(o_m), o_m)
            out = out + back * full[..., m, None, None]
        if self.shared_memory:
            out = out + run(q_rows, rows_x, self._shared_linears())
        return padded_to_packed(out, call.offsets) if call.packed else out


def _accept_fla_conv_names(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook: fla's ``{q,k,v}_conv1d.{weight,bias}`` (its conv *is* an ``nn.Conv1d``) are our
    ``{q,k,v}_conv1d.conv.{weight,bias}``; both spellings load."""
    for name in ("q", "k", "v"):
        for param in ("weight", "bias"):
            fla_key = f"{prefix}{name}_conv1d.{param}"
            if fla_key in state_dict:
                state_dict[f"{prefix}{name}_conv1d.conv.{param}"] = state_dict.pop(fla_key)
