"""Building blocks shared by several layers: norms, the SwiGLU MLP, a causal short convolution, RoPE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, computed in fp32: ``x / rms(x) * weight``.

    Args:
        dim: size of the normalised (last) dimension.
        eps: added to the mean square. Default: 1e-6.
    Shapes: ``[..., dim] -> [..., dim]`` (input dtype kept).
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = upcast(x)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(xf.dtype)).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """RMSNorm of ``x`` multiplied by ``act(gate)`` (Mamba-2 / Gated DeltaNet output norm).

    Shapes: ``x, gate: [..., dim] -> [..., dim]``. ``norm_before_gate=True`` normalises then gates
    (fla's ``FusedRMSNormGated``); ``False`` gates then normalises (Mamba-2's default).
    """

    def __init__(self, dim: int, eps: float = 1e-6, activation: str = "silu", norm_before_gate: bool = True) -> None:
        super().__init__(dim, eps)
        self.activation = _activation(activation)
        self.norm_before_gate = norm_before_gate

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if recompute_pays(x):
            # Recomputed in backward: autograd keeps x and gate, not the upcast, normalised and gated copies.
            return checkpoint(self._normalise_and_gate, x, gate, use_reentrant=False)
        return self._normalise_and_gate(x, gate)

    def _normalise_and_gate(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        g = self.activation(upcast(gate))
        if self.norm_before_gate:
            return (upcast(super().forward(x)) * g).to(x.dtype)
        return super().forward((upcast(x) * g).to(x.dtype))


class SwiGLU(nn.Module):
    """The SwiGLU MLP ``down(silu(gate(x)) * up(x))``.

    Args:
        hidden_size: model width.
        intermediate_size: inner width; default ``8/3 · hidden`` rounded up to a multiple of 32.
    Shapes: ``[batch, seq, hidden] -> [batch, seq, hidden]``.
    """

    def __init__(self, hidden_size: int, intermediate_size: int | None = None) -> None:
        super().__init__()
        if intermediate_size is None:
            intermediate_size = 32 * ((int(hidden_size * 8 / 3) + 31) // 32)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ShortConvolution(nn.Module):
    """Causal depthwise 1-D convolution over time with a decode cache (the conv "tail").

    Args:
        channels: number of channels (each convolved independently).
        kernel_size: taps; output ``t`` sees inputs ``t-kernel_size+1 … t``. Default: 4.
        activation: ``"silu"`` or ``None``.
        bias: learnable bias. Default: False.
    """

    def __init__(self, channels: int, kernel_size: int = 4, activation: str | None = "silu", bias: bool = False) -> None:
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"ShortConvolution: kernel_size must be >= 1, got {kernel_size}")
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=bias)
        self.activation = _activation(activation)

    def forward(
        self,
        x: torch.Tensor,
        conv_state: torch.Tensor | None = None,
        output_state: bool = False,
        offsets: tuple[int, ...] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Convolve ``x: [batch, seq, channels]``.

        ``conv_state: [batch, kernel_size-1, channels]`` holds the inputs before ``x`` (zeros if ``None``).
        With ``offsets`` (host copy of ``cu_seqlens``, ``[num_seqs + 1]``; ``batch == 1``) the sequences packed
        along ``seq`` are convolved separately: a tap never reads across a boundary, and ``conv_state`` and
        the new state are ``[num_seqs, kernel_size-1, channels]``, one per sequence.
        Returns ``(y [batch, seq, channels], new_state or None)``; the new state is the last
        ``kernel_size-1`` inputs, ready for the next call.
        """
        if offsets is not None:
            return self._forward_packed(x, conv_state, output_state, offsets)
        batch, seq, channels = x.shape
        keep = self.kernel_size - 1
        if conv_state is None:
            conv_state = x.new_zeros(batch, keep, channels)
        conv_state = conv_state.to(x.dtype)
        if seq == 1 and not torch.is_grad_enabled():
            # A decode step: the taps as one product-and-sum over the kernel window, and the window shifted by one.
            window = torch.cat([conv_state, x], dim=1)  # [batch, kernel_size, channels]
            y = (window * self.conv.weight[:, 0].to(x.dtype).T).sum(1, keepdim=True)
            if self.conv.bias is not None:
                y = y + self.conv.bias.to(x.dtype)
            return self.activation(y), (window[:, 1:].clone() if output_state else None)
        if recompute_pays(x):
            # Recomputed in backward: autograd keeps x instead of the padded input and the pre-activation
            # output (one activation-sized tensor less per conv; the recompute is a depthwise conv).
            y = checkpoint(self._convolve, conv_state, x, use_reentrant=False)
        else:
            y = self._convolve(conv_state, x)
        new_state = None
        if output_state:
            recent = torch.cat([conv_state, x[:, max(0, seq - keep) :]], dim=1)
            # A compact copy: the state owns its kernel_size − 1 rows and shares no buffer with this call.
            new_state = recent[:, recent.shape[1] - keep :].clone()
        return y, new_state

    def _forward_packed(
        self, x: torch.Tensor, conv_state: torch.Tensor | None, output_state: bool, offsets: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`forward` on packed sequences: every tap reads through a gather that stops at its sequence's start.

        The rows a tap may read are stacked as ``[zero row; each sequence's conv_state rows; x]``; for each
        shift and token, the index points at the token ``shift`` steps back if it is in the same sequence,
        else at that sequence's state row (or the zero row without a state).
        """
        keep, seq, channels = self.kernel_size - 1, x.shape[1], x.shape[2]
        num_seqs = len(offsets) - 1
        if conv_state is not None:
            states = conv_state.to(x.dtype).reshape(num_seqs * keep, channels)
        else:
            states = x.new_zeros(0, channels)
        source = torch.cat([x.new_zeros(1, channels), states, x[0]])
        x_base = 1 + states.shape[0]

        bounds = torch.tensor(offsets, device=x.device)
        lengths = bounds[1:] - bounds[:-1]
        seq_id = torch.repeat_interleave(torch.arange(num_seqs, device=x.device), lengths)

        def rows(seq_of: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            """Source row of input position ``p`` as seen from sequence ``seq_of`` (same shapes)."""
            bos = bounds[seq_of]
            before = (1 + seq_of * keep + keep - (bos - p)) if conv_state is not None else torch.zeros_like(p)
            return torch.where(p >= bos, x_base + p, before)

        t = torch.arange(seq, device=x.device)
        index = torch.stack([rows(seq_id, t - s) for s in range(1, keep + 1)])  # [keep, seq]: x_{t - s}
        weight = self.conv.weight[:, 0].to(x.dtype)  # [channels, taps]; tap j multiplies x_{t - (keep - j)}
        y = x[0] * weight[:, keep]
        for s in range(1, keep + 1):
            y = torch.addcmul(y, source[index[s - 1]], weight[:, keep - s])
        if self.conv.bias is not None:
            y = y + self.conv.bias.to(x.dtype)
        y = self.activation(y)[None]
        new_state = None
        if output_state:
            seqs = torch.arange(num_seqs, device=x.device)[:, None].expand(num_seqs, keep)
            last = bounds[1:, None] - keep + torch.arange(keep, device=x.device)[None, :]  # [num_seqs, keep]
            new_state = source[rows(seqs, last)].clone()
        return y, new_state

    def _convolve(self, conv_state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # Taps as shifted multiply-adds in the [batch, time, channels] layout: a depthwise conv1d here would
        # transpose to [batch, channels, time] and back, and its CPU kernel plus the strided activation cost
        # about 10x these few contiguous passes at LM sizes; the compiler fuses them into one loop.
        full = torch.cat([conv_state, x], dim=1)
        seq, taps = x.shape[1], self.kernel_size
        weight = self.conv.weight[:, 0].to(x.dtype)  # [channels, taps]
        y = full[:, :seq] * weight[:, 0]
        for j in range(1, taps):
            y = torch.addcmul(y, full[:, j : j + seq], weight[:, j])
        if self.conv.bias is not None:
            y = y + self.conv.bias.to(x.dtype)
        return self.activation(y)

    def state_size(self, batch: int = 1) -> int:
        """Bytes of the conv tail kept between decode calls."""
        return batch * (self.kernel_size - 1) * self.conv.in_channels * self.conv.weight.element_size()


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half form) applied to ``[batch, seq, heads, head_dim]``.

    Args:
        head_dim: rotated dimension (must be even).
        theta: base of the frequencies. Default: 10000.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RotaryEmbedding: head_dim must be even, got {head_dim}")
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._frequencies(), persistent=False)

    def _frequencies(self) -> torch.Tensor:
        return (1.0 / self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)).float()

    def reset_buffers(self) -> None:
        """Recompute the non-persistent frequencies (a model built on the meta device, as HF's loader does, has none)."""
        self.inv_freq = self._frequencies().to(self.inv_freq.device)

    def forward(self, x: torch.Tensor, positions: int | torch.Tensor = 0) -> torch.Tensor:
        """Rotate ``x: [batch, seq, heads, head_dim]`` for the positions of its tokens.

        ``positions``: the position of the first token (an int; the rest follow), or every token's own
        position ``[batch or 1, seq]`` (packed documents restart at 0; rows of a cache sit at different offsets).
        """
        if isinstance(positions, int):
            positions = torch.arange(positions, positions + x.shape[1], device=x.device)[None]
        angles = positions.to(device=x.device, dtype=torch.float32)[..., None] * self.inv_freq  # [batch, seq, head_dim/2]
        cos = rearrange(torch.cat([angles.cos(), angles.cos()], -1), "b t d -> b t 1 d")
        sin = rearrange(torch.cat([angles.sin(), angles.sin()], -1), "b t d -> b t 1 d")
        xf = upcast(x)
        x1, x2 = xf.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return (xf * cos + rotated * sin).to(x.dtype)


# Recomputing an activation in backward saves its memory at the price of running it twice. Below this many
# elements (4 MiB in fp32) the memory saved is negligible and the recompute's own overhead (hooks, a second
# pass of several small ops) costs more than it saves: at 128 tokens it was a visible share of a step.
RECOMPUTE_MIN_NUMEL = 1 << 20


def recompute_pays(x: torch.Tensor) -> bool:
    """Whether to recompute an activation of ``x``'s size in backward instead of keeping it (autograd on, large)."""
    return torch.is_grad_enabled() and x.numel() >= RECOMPUTE_MIN_NUMEL


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32 if it is a half type, else unchanged (float64 stays float64 for exact tests)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _activation(name: str | None):
    table = {
        None: nn.Identity(),
        "identity": nn.Identity(),
        "silu": nn.SiLU(),
        "swish": nn.SiLU(),
        "sigmoid": nn.Sigmoid(),
        "gelu": nn.GELU(),
    }
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(str(k) for k in table)}")
    return table[name]
