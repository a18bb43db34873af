"""Input checks, backend selection and small tensor helpers shared by every op family.

Every public op validates its inputs here so that a bad call fails with one line naming the
problem (an :class:`OpInputError`), never with a NaN or a stack trace from inside a kernel.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence

import torch

BACKENDS = ("auto", "reference", "torch", "triton")

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None


class OpInputError(ValueError):
    """A one-line error for a bad argument to a ``seqzoo.ops`` function."""


def fail(op: str, message: str) -> None:
    """Raise :class:`OpInputError` as ``"<op>: <message>"``."""
    raise OpInputError(f"{op}: {message}")


def resolve_backend(op: str, backend: str, *tensors: torch.Tensor) -> str:
    """Pick the implementation for ``backend``: ``"auto"`` is Triton on CUDA, chunked PyTorch elsewhere.

    Triton on CPU tensors is allowed only under ``TRITON_INTERPRET=1`` (the interpreter used by tests).
    """
    if backend not in BACKENDS:
        fail(op, f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if backend == "auto":
        return "triton" if on_cuda and HAS_TRITON else "torch"
    if backend == "triton":
        if not HAS_TRITON:
            fail(op, "backend='triton' needs the triton package (pip install triton)")
        if not on_cuda and not TRITON_INTERPRET:
            fail(op, "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")
    return backend


def check_float(op: str, name: str, t: torch.Tensor | None) -> None:
    """Require a floating-point tensor (integer and boolean inputs are rejected)."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        fail(op, f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_shape(op: str, name: str, t: torch.Tensor | None, expected: Sequence[int]) -> None:
    """Require ``t.shape == expected`` (``t`` may be ``None``)."""
    if t is not None and tuple(t.shape) != tuple(expected):
        fail(op, f"{name} has shape {tuple(t.shape)}, expected {tuple(expected)}")


def check_qkv(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Validate ``q, k: [batch, seq, heads, key_dim]`` and ``v: [batch, seq, heads, value_dim]``.

    Returns ``(batch, seq, heads, key_dim, value_dim)``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(op, name, t)
        if t.dim() != 4:
            fail(op, f"{name} must be [batch, seq, heads, dim], got {t.dim()} dims with shape {tuple(t.shape)}")
    batch, seq, heads, key_dim = q.shape
    check_shape(op, "k", k, q.shape)
    if tuple(v.shape[:3]) != (batch, seq, heads):
        fail(op, f"v has shape {tuple(v.shape)}, expected [{batch}, {seq}, {heads}, value_dim] to match q")
    if not (q.device == k.device == v.device):
        fail(op, f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    return batch, seq, heads, key_dim, v.shape[-1]


def check_log_gate(op: str, name: str, g: torch.Tensor | None) -> None:
    """Require log-space decay gates ``g <= 0`` (a positive log gate would grow the state)."""
    if g is None:
        return
    check_float(op, name, g)
    if torch.isnan(g).any():
        fail(op, f"{name} contains NaN")
    if (g > 0).any():
        fail(op, f"{name} is a log decay gate and must be <= 0, max is {g.max().item():.4g}")


def check_cu_seqlens(op: str, cu_seqlens: torch.Tensor | None, batch: int, seq: int) -> int:
    """Validate packed-sequence offsets ``cu_seqlens: [num_seqs + 1]`` and return the number of states.

    With ``cu_seqlens`` the batch must be 1, offsets start at 0, end at ``seq`` and strictly increase
    (an empty sequence is rejected).
    """
    if cu_seqlens is None:
        return batch
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        fail(op, f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        fail(op, f"cu_seqlens must be 1-D with at least 2 offsets, got shape {tuple(cu_seqlens.shape)}")
    if batch != 1:
        fail(op, f"cu_seqlens needs batch 1 (sequences packed along seq), got batch {batch}")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != seq:
        fail(op, f"cu_seqlens must start at 0 and end at seq={seq}, got {offsets[0]} … {offsets[-1]}")
    if any(b <= a for a, b in zip(offsets[:-1], offsets[1:])):
        fail(op, "cu_seqlens must be strictly increasing (no empty or reversed sequences)")
    return len(offsets) - 1


def check_state(op: str, name: str, state: torch.Tensor | None, expected: Sequence[int]) -> None:
    """Validate an initial state's shape and dtype."""
    if state is None:
        return
    check_float(op, name, state)
    check_shape(op, name, state, expected)


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any input is float64 (so tests can reach ~1e-12), fp32 otherwise (also for bf16/fp16)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def default_scale(scale: float | None, key_dim: int) -> float:
    """The query scale, ``key_dim ** -0.5`` unless given."""
    return key_dim**-0.5 if scale is None else float(scale)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """L2-normalise the last dimension, in fp32 for half-precision inputs (float64 stays float64); shape and dtype kept."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def for_each_sequence(
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
    cu_seqlens: torch.Tensor,
    per_token: Sequence[torch.Tensor | None],
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a batch-1 op once per packed sequence and stitch outputs and final states back together.

    ``per_token`` tensors are ``[1, seq, ...]`` and are sliced along ``seq``; ``fn`` is called as
    ``fn(*slices, initial_state=h0_i, output_final_state=..., **kwargs)`` for sequence ``i``.
    Returns ``(output [1, seq, ...], final_states [num_seqs, ...] or None)``.
    """
    offsets = cu_seqlens.tolist()
    outputs, finals = [], []
    for i, (bos, eos) in enumerate(zip(offsets[:-1], offsets[1:])):
        pieces = [None if t is None else t[:, bos:eos] for t in per_token]
        h0 = None if initial_state is None else initial_state[i : i + 1]
        o, ht = fn(*pieces, initial_state=h0, output_final_state=output_final_state, **kwargs)
        outputs.append(o)
        if output_final_state:
            finals.append(ht)
    return torch.cat(outputs, dim=1), (torch.cat(finals, dim=0) if output_final_state else None)


# SEQZOO_AUTOTUNE=0 keeps each kernel's first config: every config is a separate compile (seconds each on a
# GPU), which a correctness run across many shapes and dtypes cannot afford and does not need.
AUTOTUNE = os.environ.get("SEQZOO_AUTOTUNE", "1") != "0"


def autotune_configs(configs: list) -> list:
    """The Triton autotune configs to try: only the first under the interpreter (it cannot benchmark)
    or with ``SEQZOO_AUTOTUNE=0``; the first config must therefore be valid for every shape."""
    return configs[:1] if TRITON_INTERPRET or not AUTOTUNE else configs


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # <sys/mman.h>, Linux


def _madvise():
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


_MADVISE = _madvise()


def empty_huge(*shape: int, like: torch.Tensor) -> torch.Tensor:
    """``torch.empty(shape)`` with ``like``'s dtype and device; on Linux CPU, large buffers get transparent huge pages.

    glibc gives every allocation above 32 MiB fresh ``mmap`` memory and returns it on free, so each such
    buffer is page-faulted 4 KiB at a time as it is first written: about 16 ms per 48 MiB on the 2-core VM
    of ``benchmarks/RESULTS.md``, as long as the kernel that fills it. ``madvise(MADV_HUGEPAGE)`` on the
    untouched buffer makes those faults 2 MiB each. A hint only: ignored where THP is off, never an error.
    """
    out = torch.empty(shape, dtype=like.dtype, device=like.device)
    nbytes = out.numel() * out.element_size()
    if _MADVISE is not None and out.device.type == "cpu" and nbytes >= 8 * _HUGE_PAGE:
        start = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        end = (out.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if end > start:
            _MADVISE(start, end - start, _MADV_HUGEPAGE)
    return out
