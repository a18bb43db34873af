"""Fused ParaGRU / ParaLSTM Newton solve and backward on the CPU: a compiled C++ kernel (``csrc/newton_cpu.cpp``).

The CPU counterpart of :mod:`.triton_fused`, and more:

- forward: the initial guess and all Newton iterations in one pass over time (iterate ``k`` at step ``t``
  needs only iterate ``k−1`` at ``t−1`` and ``t``, so the levels are evaluated one after another at each
  step), reading ``u`` once and writing ``H`` once; same operations per element as separate sweeps;
- backward: one reverse pass computes the adjoint states *and* the VJP of ``step`` with them, so it returns
  ``du`` and the gradients of the (bounded) recurrent and peephole vectors directly, without autograd.

Why compiled code: in eager PyTorch every elementwise op of the step, its Jacobian and the scans is a full
pass over ``[batch, seq, S]`` in memory, and on a few cores those passes, not arithmetic, set the time
(``benchmarks/RESULTS.md``).

The kernel is built on first use by :func:`torch.utils.cpp_extension.load` (ninja and a C++ compiler; a few
seconds, cached under ``TORCH_EXTENSIONS_DIR``, rebuilt when the source changes) and called through
``ctypes`` (it includes no torch headers, so the build is quick), one contiguous range of work items per
thread, ``torch.get_num_threads()`` threads (``ctypes`` releases the GIL). A work item is one sequence and
``LANES`` channels (fewer at the end of a row); items never share data.
"""

from __future__ import annotations

import ctypes
import platform
import subprocess
import threading
import warnings
from pathlib import Path

import torch

from seqzoo.ops.utils import empty_huge

SOURCE = Path(__file__).with_name("csrc") / "newton_cpu.cpp"
_FLOATS = {torch.float32: "f32", torch.float64: "f64"}


class CpuKernelUnavailable(RuntimeError):
    """The C++ kernel could not be built here (no compiler or ninja); the message says why in one line."""


_BUILD: dict[str, object] = {}


def library() -> ctypes.CDLL:
    """Build (once per source version, cached on disk) and load the kernel library.

    Raises :class:`CpuKernelUnavailable` if it cannot be built; the failure is remembered for the process.
    """
    if "lib" in _BUILD:
        return _BUILD["lib"]  # type: ignore[return-value]
    if "error" in _BUILD:
        raise CpuKernelUnavailable(_BUILD["error"])
    from torch.utils import cpp_extension

    # -ffast-math lets the exp and reciprocal code vectorise; the kernels have no NaN/inf logic to lose.
    # -march=native: AVX2/AVX-512 where the CPU has them (x86-64's baseline is SSE2); aarch64's NEON is baseline.
    flags = ["-O3", "-ffast-math"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=native")
    try:
        path = cpp_extension.load(
            name="seqzoo_pararnn_cpu", sources=[str(SOURCE)], extra_cflags=flags, is_python_module=False, verbose=False
        )
    except (RuntimeError, OSError, ImportError, subprocess.CalledProcessError) as err:
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        _BUILD["error"] = f"cannot build the CPU ParaRNN kernel ({first})"
        raise CpuKernelUnavailable(_BUILD["error"]) from err
    lib = ctypes.CDLL(path)
    i64, f64, ptr, i32 = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p, ctypes.c_int
    for suffix in _FLOATS.values():
        getattr(lib, f"seqzoo_gru_forward_{suffix}").argtypes = [ptr] * 4 + [i64, i64, i64, f64, i32, i64, i64]
        getattr(lib, f"seqzoo_gru_backward_{suffix}").argtypes = [ptr] * 8 + [i64, i64, i64, i64]
        getattr(lib, f"seqzoo_lstm_forward_{suffix}").argtypes = [ptr] * 5 + [i64, i64, i64, f64, i32, i64, i64]
        getattr(lib, f"seqzoo_lstm_backward_{suffix}").argtypes = [ptr] * 10 + [i64, i64, i64, i64]
    lib.seqzoo_lanes.restype = i64
    _BUILD["lib"] = lib
    return lib


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the kernel builds and loads here (builds it on the first call; warns once if it cannot).

    A constant for ``torch.compile``: asked while tracing, it is answered once, eagerly, not traced.
    """
    try:
        library()
    except CpuKernelUnavailable as err:
        if not _BUILD.get("warned"):
            _BUILD["warned"] = True
            warnings.warn(f"{err}; ParaRNN's backend='auto' runs backend='torch' (Newton over PyTorch scans) on CPU", stacklevel=3)
        return False
    return True


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _run_items(fn, args: tuple, items: int) -> None:
    """Call ``fn(*args, begin, end)`` on contiguous item ranges, one per thread (the caller takes the first).

    Threads are started per call and joined, not pooled: no thread outlives the call, so a later ``fork``
    (DataLoader workers) never copies a process with idle worker threads. Starting one costs ~0.1 ms.
    """
    workers = max(1, min(torch.get_num_threads(), items))
    bounds = [items * i // workers for i in range(workers + 1)]
    threads = [threading.Thread(target=fn, args=(*args, lo, hi)) for lo, hi in zip(bounds[1:-1], bounds[2:])]
    for thread in threads:
        thread.start()
    try:
        fn(*args, bounds[0], bounds[1])
    finally:
        for thread in threads:
            thread.join()


def _items(batch: int, hidden: int) -> int:
    return batch * -(-hidden // library().seqzoo_lanes())


def newton_forward(
    kind: str,
    u: torch.Tensor,
    rec: torch.Tensor,
    peep: torch.Tensor | None,
    initial: torch.Tensor | None,
    max_iters: int,
    omega: float,
    zero_guess: bool,
) -> torch.Tensor:
    """The Newton states ``[batch, seq, S]``: the initial guess, then ``max_iters`` iterations.

    ``u [batch, seq, 3, N]``, ``rec [3, N]``, ``peep [2, N]`` (``"lstm"``), ``initial [batch, S]`` or ``None``:
    contiguous CPU tensors of one dtype (fp32 or fp64). ``S = N`` (GRU) or ``2N`` as ``[c; h]`` (LSTM).
    """
    batch, seq, _, hidden = u.shape
    suffix = _FLOATS[u.dtype]
    out = empty_huge(batch, seq, hidden if kind == "gru" else 2 * hidden, like=u)
    lib = library()
    common = (seq, hidden, max_iters, float(omega), int(zero_guess))
    if kind == "gru":
        args = (_ptr(u), _ptr(rec), _ptr(initial), _ptr(out), *common)
    else:
        args = (_ptr(u), _ptr(rec), _ptr(peep), _ptr(initial), _ptr(out), *common)
    _run_items(getattr(lib, f"seqzoo_{kind}_forward_{suffix}"), args, _items(batch, hidden))
    return out


def newton_backward(
    kind: str,
    u: torch.Tensor,
    rec: torch.Tensor,
    peep: torch.Tensor | None,
    initial: torch.Tensor | None,
    h: torch.Tensor,
    grad: torch.Tensor,
    want_initial: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(du, drec, dpeep, dinitial)`` at the solution ``h`` for the output gradient ``grad [batch, seq, S]``.

    Implicit differentiation at the solution (differentiating ``h_t − f(h_{t−1}, u_t) = 0``, so nothing from the
    iterations is needed): ``λ_t = g_t + A_{t+1}ᵀ λ_{t+1}`` and the VJP of
    ``f(h_{t-1}, u_t)`` with ``λ_t``, in one reverse pass. ``du`` is shaped like ``u``, ``drec [3, N]``,
    ``dpeep [2, N]`` (``None`` for the GRU), ``dinitial [batch, S]`` when ``want_initial``. Same dtype and
    contiguity rules as :func:`newton_forward`.
    """
    batch, seq, _, hidden = u.shape
    suffix = _FLOATS[u.dtype]
    du = empty_huge(*u.shape, like=u)
    drec = u.new_empty(batch, 3, hidden)
    dpeep = u.new_empty(batch, 2, hidden) if kind == "lstm" else None
    dinit = torch.empty_like(h[:, 0]) if want_initial else None
    lib = library()
    if kind == "gru":
        args = (_ptr(u), _ptr(rec), _ptr(initial), _ptr(h), _ptr(grad), _ptr(du), _ptr(drec), _ptr(dinit), seq, hidden)
    else:
        args = (
            _ptr(u),
            _ptr(rec),
            _ptr(peep),
            _ptr(initial),
            _ptr(h),
            _ptr(grad),
            _ptr(du),
            _ptr(drec),
            _ptr(dpeep),
            _ptr(dinit),
            seq,
            hidden,
        )
    _run_items(getattr(lib, f"seqzoo_{kind}_backward_{suffix}"), args, _items(batch, hidden))
    # Per-sequence partial sums, added here in a fixed order: the result does not depend on the thread count.
    return du, drec.sum(0), None if dpeep is None else dpeep.sum(0), dinit


# ------------------------------------------------------------------------------ torch.library registration
# The kernel as two torch.library ops with shape functions and an autograd formula, so that torch.compile
# keeps each call whole (it cannot trace ctypes) and autograd runs the fused backward.


@torch.library.custom_op("seqzoo::pararnn_newton_cpu", mutates_args=())
def newton_cpu(
    kind: str,
    u: torch.Tensor,
    rec: torch.Tensor,
    peep: torch.Tensor | None,
    initial: torch.Tensor | None,
    max_iters: int,
    omega: float,
    zero_guess: bool,
) -> torch.Tensor:
    """:func:`newton_forward` as a differentiable op: ``H [batch, seq, S]``; its gradient is :func:`newton_cpu_backward`."""
    return newton_forward(kind, u, rec, peep, initial, max_iters, omega, zero_guess)


@newton_cpu.register_fake
def _(kind, u, rec, peep, initial, max_iters, omega, zero_guess):
    batch, seq, _, hidden = u.shape
    return u.new_empty(batch, seq, hidden if kind == "gru" else 2 * hidden)


@torch.library.custom_op("seqzoo::pararnn_newton_cpu_backward", mutates_args=())
def newton_cpu_backward(
    kind: str,
    u: torch.Tensor,
    rec: torch.Tensor,
    peep: torch.Tensor | None,
    initial: torch.Tensor | None,
    h: torch.Tensor,
    grad: torch.Tensor,
    want_initial: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`newton_backward` as an op: ``(du, drec, dpeep, dinitial)``, the last two empty where there is none."""
    du, drec, dpeep, dinit = newton_backward(kind, u, rec, peep, initial, h, grad.contiguous(), want_initial)
    return du, drec, (rec.new_empty(0) if dpeep is None else dpeep), (h.new_empty(0) if dinit is None else dinit)


@newton_cpu_backward.register_fake
def _(kind, u, rec, peep, initial, h, grad, want_initial):
    dpeep = rec.new_empty(0) if peep is None else torch.empty_like(peep)
    return torch.empty_like(u), torch.empty_like(rec), dpeep, (torch.empty_like(h[:, 0]) if want_initial else h.new_empty(0))


def _newton_setup(ctx, inputs, output) -> None:
    kind, u, rec, peep, initial = inputs[:5]
    ctx.save_for_backward(u, rec, peep, initial, output)
    ctx.kind = kind


def _newton_backward(ctx, grad_h):
    u, rec, peep, initial, h = ctx.saved_tensors
    need = ctx.needs_input_grad
    du, drec, dpeep, dinit = newton_cpu_backward(ctx.kind, u, rec, peep, initial, h, grad_h, need[4])
    grads = (du if need[1] else None, drec if need[2] else None, dpeep if need[3] else None, dinit if need[4] else None)
    return (None, *grads, None, None, None)


newton_cpu.register_autograd(_newton_backward, setup_context=_newton_setup)
