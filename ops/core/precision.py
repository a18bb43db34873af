"""The precision policy of every op, in one place.

1. **States and accumulation in fp32** whatever the input dtype (bf16, fp16 or fp32); **fp64 when any input
   is fp64**, so tests and ``gradcheck`` can reach ~1e-12 against the float64 references.
   :func:`compute_dtype` is that rule. A recurrent state is summed over the whole sequence: rounding it
   to 8 bits of mantissa (bf16) at every chunk would drift visibly after a few thousand tokens.
2. **Outputs in the input dtype** (``q``'s); final states in the compute dtype.
3. **Matrix products inside Triton kernels** take their operands in the compute dtype and accumulate in
   it. Their precision is :func:`dot_precision`: full IEEE fp32 for fp32 (and fp64) inputs, because a
   user who hands us fp32 asks for fp32 results and tf32's 10-bit mantissa costs ~1e-3 relative error,
   which the chunk-to-chunk state recurrence then carries along the sequence; **tf32 for bf16 and fp16
   inputs**, whose own rounding (8 or 11 bits) already exceeds what tf32 adds, and which then run on
   tensor cores. No kernel ever accumulates in bf16. Every Triton kernel with a ``tl.dot`` takes this as its
   ``PRECISION`` constexpr, computed by the host from the *caller's* dtype (the host may upcast the tensors
   first): GLA and simple GLA, the (gated) delta rule, the neural memory. The scan and ParaRNN kernels
   have no dots. The interpreter ignores the setting; only a GPU run shows its effect.
4. **The PyTorch paths** compute in :func:`compute_dtype` with PyTorch's own matmul settings
   (``torch.backends.cuda.matmul.allow_tf32`` is off by default, so fp32 on a GPU is IEEE there too).
5. **Under the Triton interpreter** bf16 arithmetic is wrong (it multiplies the raw bit patterns), so
   bf16 inputs are converted to fp32 before an interpreted kernel (:func:`kernel_input`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

from seqzoo.ops.core.dispatch import TRITON_INTERPRET

P = ParamSpec("P")
R = TypeVar("R")


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any input is float64, float32 otherwise (also for bf16 and fp16 inputs)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def dot_precision(input_dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot`` for inputs of ``input_dtype``: ``"ieee"`` for fp32/fp64, ``"tf32"`` for bf16/fp16."""
    return "ieee" if input_dtype in (torch.float32, torch.float64) else "tf32"


def kernel_input(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` as a contiguous kernel input; bf16 becomes fp32 under the interpreter (whose bf16 math is wrong)."""
    if t is None:
        return None
    if TRITON_INTERPRET and t.dtype == torch.bfloat16:
        t = t.float()
    return t.contiguous()


def autocast_off(op: Callable[P, R]) -> Callable[P, R]:
    """Run ``op`` with autocast switched off on its tensors' device (a decorator for every public op).

    Under ``torch.autocast`` a matmul inside an op would run in bf16 whatever :func:`compute_dtype` asked
    for, and the chunked delta rule's triangular solve has no bf16 kernel at all. The op already computes
    in fp32 and returns the input's dtype, which is what autocast wants of it.
    """

    @functools.wraps(op)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        device = next((t.device.type for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)), "cpu")
        if not torch.is_autocast_enabled(device):
            return op(*args, **kwargs)
        with torch.autocast(device_type=device, enabled=False):
            return op(*args, **kwargs)

    return wrapper
