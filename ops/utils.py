"""Small tensor helpers shared by the op families (the front end, chunk layout and precision rules are in
:mod:`seqzoo.ops.core`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from seqzoo.ops.core.dispatch import TRITON_INTERPRET


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
