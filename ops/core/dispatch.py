"""Backend selection, the same for every op.

Every public op takes ``backend=``, one of :data:`BACKENDS`:

* ``"reference"``: the family's token-by-token loop, written for clarity (the test oracle).
* ``"torch"``: the chunked (or otherwise parallel) PyTorch implementation; the CPU default.
* ``"triton"``: the chunked Triton kernels; the CUDA default for training.
* ``"fused"``: the family's fused Triton kernel where it has one (a step-by-step kernel with the state in
  registers for the linear-attention ops; the whole Newton solve for ParaRNN).
* ``"cpp"``: a compiled CPU kernel where the family has one (ParaRNN).
* ``"auto"``: chosen by :func:`choose_backend` from the device, the sequence length and whether
  autograd records the call. An explicit backend is never overridden: asking for ``"triton"`` gives the
  chunked Triton kernels even for one token.

``auto`` takes a step-by-step path for short calls without gradients (decoding, short prompts): a chunk
of 64 would be mostly padding there, so the recurrent form is several times cheaper. On CUDA that is
the ``fused`` kernel; on the CPU the family's plain step loop (``reference``) where the family declares
it fast enough (``short_cpu``).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch

from seqzoo.ops.core.checks import fail

BACKENDS = ("auto", "reference", "torch", "triton", "fused", "cpp")

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None

# At or below this many tokens (and without autograd) ``auto`` runs the step-by-step path: the fused
# Triton kernel on CUDA beats the chunked pipeline up to about a chunk.
RECURRENT_MAX_SEQ = 64
# On the CPU a Python step loop costs a few small ops per token, the chunked form a fixed set of
# chunk-sized ones: the loop wins for a handful of tokens (a decode step, a tiny prompt).
CPU_STEP_MAX_SEQ = 4


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records this call: grad mode is on and some input requires a gradient."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def on_cuda(*tensors: torch.Tensor | None) -> bool:
    """Whether every given tensor lives on a CUDA device."""
    return all(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))


def check_backend(op: str, backend: str, available: Sequence[str]) -> None:
    """One-line error unless ``backend`` is a known name that this op implements (``"auto"`` always is).

    Layers call this when they are built, so a config naming a backend the op lacks fails at once; the
    op calls it again through :func:`choose_backend` with the device known.
    """
    if backend not in BACKENDS:
        fail(op, f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto" and backend not in available:
        fail(op, f"has no {backend!r} backend; choose one of auto, {', '.join(available)}")


def require_triton(op: str, backend: str, *tensors: torch.Tensor | None) -> None:
    """One-line error unless Triton can run here: the package is installed and the tensors are on CUDA
    (or the interpreter is on, ``TRITON_INTERPRET=1`` set before import, which tests use on the CPU)."""
    if not HAS_TRITON:
        fail(op, f"backend={backend!r} needs the triton package (pip install triton)")
    if not on_cuda(*tensors) and not TRITON_INTERPRET:
        fail(op, f"backend={backend!r} needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")


def choose_backend(
    op: str,
    backend: str,
    available: Sequence[str],
    *tensors: torch.Tensor | None,
    seq: int,
    grad: bool,
    short_cpu: bool = False,
) -> str:
    """The implementation to run: ``backend`` itself when explicit (checked it can run here), else ``auto``'s pick.

    Args:
        op: the op's name, for errors.
        backend: what the caller asked for (:data:`BACKENDS`).
        available: the backends this op implements besides ``auto``.
        tensors: the op's tensor inputs (their device decides ``auto``).
        seq: tokens per sequence of the call.
        grad: whether autograd records the call (:func:`needs_grad`).
        short_cpu: ``auto`` may run ``reference`` for short calls without gradients on the CPU.

    ``auto``: on CUDA with Triton, ``fused`` for short calls without gradients where available, else
    ``triton``; elsewhere ``reference`` for short calls when ``short_cpu``, else ``torch``.
    """
    check_backend(op, backend, available)
    if backend == "auto":
        short = seq <= RECURRENT_MAX_SEQ and not grad
        if HAS_TRITON and on_cuda(*tensors) and "triton" in available:
            return "fused" if short and "fused" in available else "triton"
        if short_cpu and seq <= CPU_STEP_MAX_SEQ and not grad and "reference" in available:
            return "reference"
        return "torch"
    if backend in ("triton", "fused"):
        require_triton(op, backend, *tensors)
    return backend
