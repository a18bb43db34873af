"""Timing and peak-memory measurement shared by every benchmark (CPU and CUDA)."""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[..., object],
    device: torch.device,
    warmup: int = 1,
    repeats: int = 3,
    min_time: float = 0.0,
    setup: Callable[[], object] | None = None,
) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs.

    ``setup``: run untimed before every call (the warm-up ones too) and its result passed as ``fn``'s one argument:
    state that a call consumes, e.g. a freshly prefilled decode cache, so that only ``fn``'s own work is timed.
    """

    def timed() -> float:
        args = () if setup is None else (setup(),)
        sync(device)
        start = time.perf_counter()
        fn(*args)
        sync(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        timed()
    times: list[float] = []
    while len(times) < repeats or sum(times) < min_time:
        times.append(timed())
        if len(times) >= 50:
            break
    times.sort()
    return times[len(times) // 2]


# Lines the CPU profiler writes straight to file descriptor 2 on every use (25 of them for `bench ops`):
# kineto's "USDT: … profiler_start / profiler_stop" and c10's note that a block allocated before profiling was
# freed during it. They say nothing about the measured code, and C++ writes them, so no Python filter sees them.
PROFILER_CHATTER = (re.compile(r"^USDT:.*SyncActivityProfilerHandler"), re.compile(r"CPUAllocator\.cpp.*Memory block of unknown size"))


@contextmanager
def _without_profiler_chatter() -> Iterator[None]:
    """Route fd 2 through a file while the profiler runs, then pass on every line except :data:`PROFILER_CHATTER`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            kept = [
                line
                for line in sink.read().decode(errors="replace").splitlines(keepends=True)
                if not any(p.search(line) for p in PROFILER_CHATTER)
            ]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes of tensor memory allocated while ``fn()`` runs, above what was live before.

    CUDA: the caching allocator's peak counter. CPU: replayed from the profiler's raw allocator
    records (one signed record per allocation or free, in time order), since the CPU allocator keeps
    no peak statistic. The per-op memory columns of ``prof.events()`` are not used: they book a free
    on the enclosing op, so everything freed inside a long op (a custom ``autograd.Function`` looping
    over chunks, a backward node) would only be released at that op's end and inflate the peak.
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with _without_profiler_chatter(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cpu = torch._C._autograd.DeviceType.CPU
    records = sorted(
        [
            (event.start_ns(), event.nbytes())
            for event in prof.profiler.kineto_results.events()
            if event.name() == "[memory]" and event.device_type() == cpu
        ],
        key=lambda record: record[0],  # stable: same-time records keep the allocator's order
    )
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return int(peak)
