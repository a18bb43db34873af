"""The core every op family is built on: one front end, one chunk layout, one precision policy.

A public op (``seqzoo.ops.gated_delta_rule`` and its siblings) is written the same way in every family:

1. **check** its inputs with :mod:`.checks` (structure always, values only in :func:`checking` mode);
2. **choose** an implementation with :func:`choose_backend` (``backend="auto" | "reference" | "torch" |
   "triton" | "fused" | "cpp"``; ``auto`` decides by device, length and autograd; an explicit choice is
   never overridden);
3. **run** it: the family's ``reference.py`` (token loop, the test oracle), its chunked PyTorch path
   (built on :class:`ChunkLayout` and :func:`scan_chunks`), or its Triton kernels (whose host code
   takes its packing indices from the same :class:`ChunkLayout`), all under the rules of
   :mod:`.precision`.

Two modules serve the Triton kernels and import ``triton``, so they are imported only where a kernel
runs: :mod:`.triton_host` (the one host convention: call metadata, dtypes, tiles, chunk coordinates,
tile addressing, names and flags) and :mod:`.triton_stages` (the stages the linear-attention families
share: chunk-local cumsum, the state-recurrence step, the output stage, ``dv``). Every Triton launch is
a ``torch.library`` op in the ``seqzoo`` namespace with a fake implementation (and, where it is
differentiable, its backward op registered as its autograd formula), so ``torch.compile`` sees one op.
"""

from seqzoo.ops.core.checks import (
    OpInputError,
    check_choice,
    check_cu_seqlens,
    check_device,
    check_finite,
    check_float,
    check_linear_inputs,
    check_log_gate,
    check_positive_int,
    check_qkv,
    check_range,
    check_shape,
    check_state,
    checking,
    checks_enabled,
    fail,
    guard_nonfinite,
    poison_from,
)
from seqzoo.ops.core.chunks import ChunkLayout, packed_to_padded, padded_to_packed, scan_chunks
from seqzoo.ops.core.dispatch import (
    BACKENDS,
    CPU_STEP_MAX_SEQ,
    HAS_TRITON,
    RECURRENT_MAX_SEQ,
    TRITON_INTERPRET,
    check_backend,
    choose_backend,
    needs_grad,
    on_cuda,
    require_triton,
)
from seqzoo.ops.core.precision import autocast_off, compute_dtype, dot_precision, kernel_input

__all__ = [
    "autocast_off",
    "BACKENDS",
    "CPU_STEP_MAX_SEQ",
    "ChunkLayout",
    "HAS_TRITON",
    "OpInputError",
    "RECURRENT_MAX_SEQ",
    "TRITON_INTERPRET",
    "check_backend",
    "check_choice",
    "check_cu_seqlens",
    "check_device",
    "check_finite",
    "check_float",
    "check_linear_inputs",
    "check_log_gate",
    "check_positive_int",
    "check_qkv",
    "check_range",
    "check_shape",
    "check_state",
    "checking",
    "checks_enabled",
    "choose_backend",
    "compute_dtype",
    "dot_precision",
    "fail",
    "guard_nonfinite",
    "poison_from",
    "kernel_input",
    "needs_grad",
    "on_cuda",
    "packed_to_padded",
    "padded_to_packed",
    "require_triton",
    "scan_chunks",
]
