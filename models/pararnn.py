"""ParaRNN mixers: a ParaGRU or ParaLSTM cell solved by Newton's method in parallel over the sequence.

The block follows ParaRNN's language model (as reconstructed from the paper by third parties: an RNN block in
place of attention, alternating with SwiGLU MLPs); the pre-norm is the LanguageModel's::

    x [B, T, D] ─ Linear(D → 2E) ─┬─ u ─ causal conv (k=4) ─ SiLU ─ cell (Newton, parallel) ─ h ─┐
                                  └─ z ────────────────────────────────────────── GatedRMSNorm(h, SiLU(z)) ─ Linear(E → D)

Training runs :func:`seqzoo.ops.pararnn.pararnn` with ``backend="auto"`` (a fixed number of Newton iterations
and the adjoint backward, in the fused kernels: Triton on CUDA, compiled C++ on CPU; Newton over scans where
they cannot run); decoding one token at a time runs the exact step loop (``"reference"``) from the cached
state, and a multi-token prefill with a cache runs the training backend from that state.

Exactness: with ``max_iters`` fixed (ParaRNN uses 3) the parallel form is the sequential recurrence only
up to Newton's residual. The recurrent vectors are bounded (``recurrent_bound``, 0.5) so the Jacobians
contract and 3 iterations reach ~fp32 precision for moderate lengths (Newton converges quadratically: a float64
ParaGRU at 64 steps was off by 7e-2, 7e-4, 7e-8, 8e-16 after 1..4 iterations); any
``max_iters >= seq`` is exact whatever the parameters.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from seqzoo.configs import ConfigError
from seqzoo.models.base import Call, StateShapes, TokenMixer, op_backend
from seqzoo.models.cache import LayerCache
from seqzoo.models.modules import GatedRMSNorm, ShortConvolution, upcast
from seqzoo.models.registry import register_mixer
from seqzoo.ops.pararnn import BACKENDS, ParaGRU, ParaLSTM, pararnn

_GUESSES = ("f0", "zeros")


class ParaRNNBlock(TokenMixer):
    """The ParaRNN LM block around a diagonal-Jacobian cell (subclasses pick the cell).

    Args:
        hidden_size: model width ``D``.
        layer_idx: position in the stack (unused; part of the mixer contract).
        expand: inner width ``E = expand · D`` (the cell's input and state width ``N``). Default: 1 (§1.8's D → 2D).
        num_heads: diagonal blocks of the cell's multi-head input projection; must divide ``E``. Default: 2.
        conv_size: taps of the causal depthwise convolution before the cell; 1 disables mixing over time. Default: 4.
        recurrent_bound: smooth bound ``|a| < bound`` on the recurrent (and peephole) vectors, which keeps
            Newton contracting; ``None`` leaves them free. Default: 0.5.
        backend: the :func:`~seqzoo.ops.pararnn.pararnn` backend of the training form and prefill: ``"auto"`` (the
            fused kernel of the device where it runs, else Newton over scans), ``"torch"`` / ``"triton"`` (Newton
            over PyTorch / Triton scans), ``"fused"`` (one Triton kernel), ``"cpp"`` (the compiled CPU kernel) or
            ``"reference"`` (the plain loop). Default: ``"auto"``.
        max_iters: Newton iterations of the parallel form (fixed, as in ParaRNN). Default: 3.
        omega: Newton step damping. Default: 1.
        init_guess: ``"f0"`` (``h_t = f(0, u_t)``) or ``"zeros"``.
        tol: stop Newton early once the max-norm residual is ``<= tol`` (costs a host sync per iteration).
        norm_eps: epsilon of the gated output RMSNorm.

    Cache: ``recurrent`` ``[batch, S]`` (the cell state: ``h`` for GRU, ``[c; h]`` for LSTM; fp32, fp64 for a
    float64 model) and ``conv_u`` ``[batch, conv_size - 1, E]`` (the convolution's input tail).
    """

    cell_class: type = ParaGRU

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int = 0,
        expand: float = 1.0,
        num_heads: int = 2,
        conv_size: int = 4,
        recurrent_bound: float | None = 0.5,
        backend: str = "auto",
        max_iters: int = 3,
        omega: float = 1.0,
        init_guess: str = "f0",
        tol: float | None = None,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        name = self.mixer_name
        inner = int(expand * hidden_size)
        if inner < 1:
            raise ConfigError(f"{name}: expand · hidden_size must be >= 1, got {expand} · {hidden_size}")
        if not isinstance(num_heads, int) or num_heads < 1 or inner % num_heads:
            raise ConfigError(f"{name}: num_heads ({num_heads}) must be >= 1 and divide the inner width {inner}")
        if conv_size < 1:
            raise ConfigError(f"{name}: conv_size must be >= 1, got {conv_size}")
        if recurrent_bound is not None and not recurrent_bound > 0:
            raise ConfigError(f"{name}: recurrent_bound must be > 0 or null, got {recurrent_bound}")
        self.backend = op_backend(name, "pararnn", backend, BACKENDS)
        if not isinstance(max_iters, int) or max_iters < 0:
            raise ConfigError(f"{name}: max_iters must be a non-negative integer, got {max_iters!r}")
        if not omega > 0:
            raise ConfigError(f"{name}: omega must be > 0, got {omega}")
        if init_guess not in _GUESSES:
            raise ConfigError(f"{name}: init_guess must be one of {', '.join(_GUESSES)}, got {init_guess!r}")
        if tol is not None and tol < 0:
            raise ConfigError(f"{name}: tol must be >= 0 or null, got {tol}")
        self.hidden_size, self.layer_idx, self.inner = hidden_size, layer_idx, inner
        self.solver = {"max_iters": max_iters, "omega": omega, "init_guess": init_guess, "tol": tol}
        self.in_proj = nn.Linear(hidden_size, 2 * inner, bias=False)
        self.conv = ShortConvolution(inner, conv_size, activation="silu")
        self.cell = self.cell_class(inner, inner, num_heads=num_heads, recurrent_bound=recurrent_bound)
        # The cell's recurrent vectors and gate biases act like decay parameters: shrinking them changes the dynamics.
        for param in (*self.cell.recurrent_parameters(), self.cell.bias):
            param._no_weight_decay = True
        self.norm = GatedRMSNorm(inner, norm_eps, activation="silu", norm_before_gate=True)
        self.out_proj = nn.Linear(inner, hidden_size, bias=False)

    def mix(self, x: torch.Tensor, cache: LayerCache | None, call: Call) -> torch.Tensor:
        """``x: [batch, seq, hidden] -> [batch, seq, hidden]``; with ``cache``, continue from its state."""
        u, z = rearrange(self.in_proj(x), "b t (two e) -> two b t e", two=2)
        conv_state = cache.get("conv_u") if cache is not None else None
        u, conv_tail = self.conv(u, conv_state=conv_state, output_state=cache is not None, offsets=call.offsets)
        initial = cache.get("recurrent") if cache is not None else None
        # One decoded token is one exact step; longer inputs use the configured (training) form.
        backend = "reference" if cache is not None and x.shape[1] == 1 else self.backend
        # The recurrence runs in fp32 (fp64 for a float64 model) whatever autocast picks: Newton's residual and
        # the state must not be rounded to bf16.
        dtype = upcast(u).dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            h, final = pararnn(
                self.cell,
                u.to(dtype),
                initial=None if initial is None else initial.to(dtype),
                backend=backend,
                output_final_state=cache is not None,
                cu_seqlens=call.cu_seqlens,
                **self.solver,
            )
        if cache is not None:
            cache.set("recurrent", final.to(self.state_dtype()))
            cache.set("conv_u", conv_tail.to(self.conv.conv.weight.dtype))
        o = self.norm(h.to(x.dtype), z)
        return self.out_proj(o)

    def state_shapes(self, seq_len: int | None = None) -> StateShapes:
        """The cell state and the conv tail; constant in ``seq_len``."""
        conv = self.conv
        return {
            "recurrent": ((self.cell.state_size,), self.state_dtype()),
            "conv_u": ((conv.kernel_size - 1, conv.conv.in_channels), conv.conv.weight.dtype),
        }


@register_mixer("pararnn_gru")
class ParaGRUMixer(ParaRNNBlock):
    """ParaRNN block with a ParaGRU cell (diagonal Jacobian, state ``h`` of width ``E``). See :class:`ParaRNNBlock`."""

    cell_class = ParaGRU


@register_mixer("pararnn_lstm")
class ParaLSTMMixer(ParaRNNBlock):
    """ParaRNN block with a ParaLSTM cell (CIFG + peepholes, 2×2 Jacobian blocks, state ``[c; h]`` of width ``2E``).

    See :class:`ParaRNNBlock`.
    """

    cell_class = ParaLSTM
