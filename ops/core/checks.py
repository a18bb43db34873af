"""Input checks of every public op, and the checking mode that switches on the value checks.

Two kinds of checks, with different costs:

* **Structure checks** (shapes, dtypes, devices, option values) read only tensor metadata. They always run
  and never wait for the device, so they cost nothing on a GPU stream and trace cleanly under
  ``torch.compile``.
* **Value checks** (NaN or Inf, a positive log gate, a write strength outside its range, a rate outside
  ``[0, 1]``) have to look at the data: on a GPU that is a device→host synchronisation per call, and
  under ``torch.compile`` a data-dependent branch (a graph break). They run only in **checking mode**:
  ``SEQZOO_CHECK=1`` in the environment (read at import), or the context manager :func:`checking`::

      with seqzoo.ops.checking():
          o, _ = gated_delta_rule(q, k, v, beta, g)   # raises OpInputError on a NaN or g > 0

Outside checking mode a bad value is not reported; the ops then promise only that a NaN or Inf never
travels backwards in time (see :func:`seqzoo.ops.core.guard_nonfinite`).
Every failure is an :class:`OpInputError` with one line, ``"<op>: <what is wrong>"``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


class OpInputError(ValueError):
    """A one-line error for a bad argument to a ``seqzoo.ops`` function."""


def fail(op: str, message: str) -> None:
    """Raise :class:`OpInputError` as ``"<op>: <message>"``."""
    raise OpInputError(f"{op}: {message}")


# A module global, not a ContextVar: torch.compile reads it as a constant (and guards on it), so the
# value checks vanish from compiled graphs instead of breaking them.
_checking = os.environ.get("SEQZOO_CHECK", "0").strip().lower() in ("1", "true", "yes", "on")


def checks_enabled() -> bool:
    """Whether value checks run (checking mode): ``SEQZOO_CHECK=1`` or inside :func:`checking`."""
    return _checking


@contextmanager
def checking(enabled: bool = True) -> Iterator[None]:
    """Switch the value checks of every op on (or, with ``enabled=False``, off) inside the block."""
    global _checking
    previous, _checking = _checking, bool(enabled)
    try:
        yield
    finally:
        _checking = previous


# ---------------------------------------------------------------------------------------- structure


def check_float(op: str, name: str, t: torch.Tensor | None) -> None:
    """Require a floating-point tensor (``None`` passes; integer and boolean tensors are rejected)."""
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


def check_device(op: str, reference: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """Require every given tensor on ``reference``'s device (the first argument names it in the error)."""
    for name, t in tensors.items():
        if t is not None and t.device != reference.device:
            fail(op, f"{name} is on {t.device} but q is on {reference.device}")


def check_qkv(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Validate ``q, k: [batch, seq, heads, key_dim]`` and ``v: [batch, seq, heads, value_dim]`` on one device.

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


def check_state(op: str, name: str, state: torch.Tensor | None, expected: Sequence[int]) -> None:
    """Validate an initial state's dtype and shape (``None`` passes)."""
    if state is None:
        return
    check_float(op, name, state)
    check_shape(op, name, state, expected)


def check_positive_int(op: str, name: str, value: object) -> None:
    """Require a Python ``int >= 1`` (``bool`` is rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        fail(op, f"{name} must be an int >= 1, got {value!r}")


def check_choice(op: str, name: str, value: object, choices: Sequence[str]) -> None:
    """Require ``value`` to be one of ``choices``."""
    if value not in choices:
        fail(op, f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def check_cu_seqlens(op: str, cu_seqlens: torch.Tensor | None, batch: int, seq: int) -> int:
    """Validate packed-sequence offsets ``cu_seqlens: [num_seqs + 1]`` and return the number of states.

    The dtype, shape and batch rule are metadata. The values (start at 0, end at ``seq``, strictly
    increasing: fla's trackers traced illegal memory accesses to empty sequences) are read on the host
    only in checking mode; outside it the chunk layout reads them anyway and checks the same rules
    (:meth:`seqzoo.ops.core.ChunkLayout.build`).
    """
    if cu_seqlens is None:
        return batch
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        fail(op, f"cu_seqlens must be an int32 or int64 tensor, got {getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        fail(op, f"cu_seqlens must be 1-D with at least 2 offsets, got shape {tuple(cu_seqlens.shape)}")
    if batch != 1:
        fail(op, f"cu_seqlens needs batch 1 (sequences packed along seq), got batch {batch}")
    if checks_enabled():
        check_offsets(op, cu_seqlens.tolist(), seq)
    return cu_seqlens.numel() - 1


def check_offsets(op: str, offsets: Sequence[int], seq: int) -> None:
    """The value rules of ``cu_seqlens`` on its host copy: ``0 = o_0 < o_1 < … < o_n = seq``."""
    if offsets[0] != 0 or offsets[-1] != seq:
        fail(op, f"cu_seqlens must start at 0 and end at seq={seq}, got {offsets[0]} … {offsets[-1]}")
    if any(b <= a for a, b in zip(offsets[:-1], offsets[1:])):
        fail(op, "cu_seqlens must be strictly increasing (no empty or reversed sequences)")


# -------------------------------------------------------------------------------------------- values


def check_finite(op: str, name: str, t: torch.Tensor | None) -> None:
    """Checking mode only: reject NaN or Inf in ``t``."""
    if t is None or not checks_enabled() or t.numel() == 0:
        return
    if not bool(torch.isfinite(t).all()):
        fail(op, f"{name} contains NaN or Inf")


def check_range(op: str, name: str, t: torch.Tensor | None, low: float | None = None, high: float | None = None) -> None:
    """Checking mode only: reject NaN or Inf in ``t`` and values outside ``[low, high]`` (``None``: unbounded).

    The message names the interval and the observed range, e.g. ``"g is a log decay gate and must lie in
    [-inf, 0], got values in [-3.2, 0.5]"``.
    """
    if t is None or not checks_enabled() or t.numel() == 0:
        return
    check_finite(op, name, t)
    lo, hi = t.min().item(), t.max().item()
    if (low is not None and lo < low) or (high is not None and hi > high):
        interval = f"[{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}]"
        fail(op, f"{name} must lie in {interval}, got values in [{lo:.4g}, {hi:.4g}]")


def check_log_gate(op: str, name: str, g: torch.Tensor | None) -> None:
    """Checking mode only: a log decay gate must be finite and ``<= 0`` (a positive one grows the state)."""
    if g is None or not checks_enabled() or g.numel() == 0:
        return
    if bool(torch.isnan(g).any()):
        fail(op, f"{name} contains NaN")
    if bool((g > 0).any()):
        fail(op, f"{name} is a log decay gate and must be <= 0, max is {g.max().item():.4g}")


# ------------------------------------------------------------------------ the linear-attention family


def check_linear_inputs(
    op: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    per_key_gate: bool = False,
    beta: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    same_dtype: bool = False,
    allow_empty: bool = True,
) -> tuple[int, int, int, int, int, int]:
    """The checks shared by the ops with a ``[heads, key_dim, value_dim]`` state (simple GLA, GLA, the delta rules).

    Structure: ``q, k [batch, seq, heads, key_dim]``, ``v [batch, seq, heads, value_dim]`` (one dtype when
    ``same_dtype``; ``seq >= 1`` unless ``allow_empty``), ``g`` ``[batch, seq, heads]`` (or ``[…, key_dim]`` with ``per_key_gate``), ``beta
    [batch, seq, heads]``, ``initial_state [num_states, heads, key_dim, value_dim]``, ``cu_seqlens``, one device.
    Values, in checking mode: finite inputs, ``g <= 0``, ``beta`` in ``[0, 2]`` (2 is the largest write
    strength that keeps ``I − β k kᵀ`` a contraction for unit keys: the negative-eigenvalue variant).

    Returns ``(batch, seq, heads, key_dim, value_dim, num_states)``.
    """
    batch, seq, heads, key_dim, value_dim = check_qkv(op, q, k, v)
    if same_dtype and not (q.dtype == k.dtype == v.dtype):
        fail(op, f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if seq == 0 and not allow_empty:
        fail(op, "seq must be at least 1")
    check_float(op, "g", g)
    check_shape(op, "g", g, (batch, seq, heads, key_dim) if per_key_gate else (batch, seq, heads))
    check_float(op, "beta", beta)
    check_shape(op, "beta", beta, (batch, seq, heads))
    check_device(op, q, g=g, beta=beta, initial_state=initial_state, cu_seqlens=cu_seqlens)
    num_states = check_cu_seqlens(op, cu_seqlens, batch, seq)
    check_state(op, "initial_state", initial_state, (num_states, heads, key_dim, value_dim))
    if checks_enabled():
        for name, t in (("q", q), ("k", k), ("v", v), ("initial_state", initial_state)):
            check_finite(op, name, t)
        check_log_gate(op, "g", g)
        check_range(op, "beta", beta, 0.0, 2.0)
    return batch, seq, heads, key_dim, value_dim, num_states


# ------------------------------------------------------------------------- non-finite inputs, unchecked


def guard_nonfinite(
    per_token: dict[str, torch.Tensor | None], cu_seqlens: torch.Tensor | None
) -> tuple[dict[str, torch.Tensor | None], torch.Tensor]:
    """Zero the tokens of a chunked op's inputs that hold NaN or Inf, and say where they were.

    Outside checking mode nothing stops a NaN from reaching an op. A token-by-token recurrence makes every
    output from that token on NaN, which is honest. A chunked form multiplies whole chunks of tokens at
    once, and ``0 · NaN`` is NaN, so the NaN would also appear at the positions *before* it in its chunk:
    it would travel backwards in time. This finds the bad tokens with one reduction per input (no host
    sync), replaces them by zeros, and :func:`poison_from` puts NaN back from each bad token on. Pass only the
    inputs that reach other positions (keys, values, gates, write strengths): a query reads the state at its
    own position only, so a bad query stays where it is without help.

    Args:
        per_token: the op's inputs, each ``[batch, seq, heads]`` or ``[batch, seq, heads, dim]`` (``None`` skipped).
        cu_seqlens: packed offsets or ``None``.

    Returns:
        ``(clean inputs, bad [batch, seq, heads] bool)``; ``(inputs unchanged, None)`` when every input is finite
        and that could be read for free (eager CPU tensors: no device to wait for, no graph to break), which
        spares the copies; :func:`poison_from` then has nothing to do.
    """
    # One finiteness test of the sum of every input's per-token reduction: a NaN or an Inf anywhere makes the
    # sum non-finite (Inf − Inf is NaN), and finite inputs large enough to overflow it are not a concern here.
    total = None
    for t in per_token.values():
        if t is not None:
            reduced = (t if t.dim() == 3 else t.sum(-1)).float()
            total = reduced if total is None else total + reduced
    finite = torch.isfinite(total)
    if total.device.type == "cpu" and not torch.compiler.is_compiling() and bool(finite.all()):
        return dict(per_token), None
    bad = ~finite
    clean = {name: None if t is None else t.masked_fill(bad if t.dim() == 3 else bad[..., None], 0) for name, t in per_token.items()}
    return clean, bad


def poison_from(o: torch.Tensor, final: torch.Tensor | None, bad: torch.Tensor | None, cu_seqlens: torch.Tensor | None):
    """NaN in ``o [batch, seq, heads, dim]`` from every bad token on (within its sequence and head), and in the
    final state ``[states, heads, K, V]`` of every (sequence, head) that had one: what the recurrence gives.
    ``bad`` ``None`` (:func:`guard_nonfinite` saw only finite inputs): ``(o, final)`` unchanged."""
    if bad is None:
        return o, final
    count = bad.to(torch.int32).cumsum(1)
    if cu_seqlens is not None:
        starts = cu_seqlens[:-1].long()
        before = torch.cat([count.new_zeros(1, 1, count.shape[2]), count], dim=1)[:, starts]  # [1, seqs, heads]
        seq_id = torch.repeat_interleave(torch.arange(starts.numel(), device=o.device), (cu_seqlens[1:] - cu_seqlens[:-1]).long())
        count = count - before[:, seq_id]
    o = o.masked_fill((count > 0)[..., None], float("nan"))
    if final is not None:
        if cu_seqlens is None:
            tainted = count[:, -1] > 0  # [batch, heads]
        else:
            ends = cu_seqlens[1:].long() - 1
            tainted = count[0, ends] > 0  # [seqs, heads]
        final = final.masked_fill(tainted[..., None, None], float("nan"))
    return o, final
