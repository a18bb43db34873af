"""``seqzoo-eval bench pararnn``: ParaRNN's Newton solve against the sequential loop, side by side.

For every cell and sequence length the same cell, input and thread count run both ways:

* ``parallel``: :func:`seqzoo.ops.pararnn.pararnn` with Newton iterations over ``affine_scan`` and the adjoint
  backward (``backend="torch"`` on CPU, ``"triton"`` on CUDA);
* ``sequential``: ``backend="reference"``, the token loop, differentiated by autograd through the loop
  (what training a nonlinear RNN costs without ParaRNN);
* ``fused``: the whole Newton loop in one kernel per call: Triton on CUDA (``backend="fused"``), the compiled
  C++ kernel on CPU (``backend="cpp"``, which also fuses the backward). Where it cannot run (no compiler on
  a CPU machine, another device) it is skipped and the reason is recorded in the report's
  ``settings.skipped`` (and printed), never dropped silently.

``projection=True`` (the default) times the whole cell, input projection (``cell.prepare``) included: the
same GEMMs in every mode, so they cap the ratios. ``projection=False`` times the recurrence alone on the
projected inputs ``u`` (what ParaRNN parallelises; the paper's fused kernels also take ``Wx + b``
precomputed); gradients then flow to ``u`` and the recurrent vectors. The ``rel_err`` columns compare the
outputs with the sequential ones of the same run, so a speed-up never hides a wrong answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from seqzoo.eval.measure import time_call
from seqzoo.eval.report import write_report

CELLS = ("gru", "lstm")
MODES = ("parallel", "sequential", "fused")


def _cell(name: str, hidden: int, num_heads: int) -> torch.nn.Module:
    from seqzoo.ops.pararnn import ParaGRU, ParaLSTM

    if name not in CELLS:
        raise ValueError(f"bench pararnn: unknown cell {name!r}; known: {', '.join(CELLS)}")
    return (ParaGRU if name == "gru" else ParaLSTM)(hidden, hidden, num_heads=num_heads)


def bench_pararnn(
    out_dir: str | Path,
    cells: Sequence[str] = CELLS,
    seq_lens: Sequence[int] = (256, 1024, 4096, 16384),
    batch: int = 4,
    hidden: int = 256,
    num_heads: int = 2,
    max_iters: int = 3,
    device: str = "cpu",
    dtype: str = "float32",
    repeats: int = 3,
    skip_sequential_above: int | None = None,
    modes: Sequence[str] = MODES,
    projection: bool = True,
) -> list[dict[str, Any]]:
    """Forward and forward+backward seconds of the parallel, sequential and fused modes, and their ratios.

    Inputs ``x: [batch, seq, hidden]`` (standard normal, seed 0); the loss for the backward is
    ``mean(H²)``, gradients flow to ``x`` and every cell parameter. Rows: ``cell``, ``seq_len``,
    ``par_fwd_s``, ``seq_fwd_s``, ``fwd_speedup``, ``par_fwd_bwd_s``, ``seq_fwd_bwd_s``,
    ``fwd_bwd_speedup``, ``rel_err``, ``newton_iters``; with ``"fused"`` in ``modes`` (where it runs) also
    ``fused_fwd_s``, ``fused_fwd_bwd_s``, ``fused_fwd_speedup`` and ``fused_fwd_bwd_speedup`` (sequential time
    / fused time), ``fused_vs_par_fwd`` and ``fused_vs_par_fwd_bwd`` (parallel time / fused time),
    ``fused_rel_err`` (against sequential) and ``fused_par_diff`` (relative difference to parallel).
    Sequential columns are empty above ``skip_sequential_above`` or without ``"sequential"`` in ``modes``;
    ``"parallel"`` always runs (the baseline). Writes ``bench_pararnn.{json,md,png}``.
    """
    if batch < 1 or hidden < 1 or repeats < 1 or any(s < 1 for s in seq_lens):
        raise ValueError(
            f"bench pararnn: batch, hidden, repeats and seq lens must be >= 1, got {batch}, {hidden}, {repeats}, {list(seq_lens)}"
        )
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"bench pararnn: unknown modes {unknown}; known: {', '.join(MODES)}")
    dev, dt = torch.device(device), getattr(torch, dtype)
    skipped: dict[str, str] = {}
    run_fused = "fused" in modes
    if run_fused:
        reason = _fused_unavailable(dev)
        if reason:
            run_fused = False
            skipped["fused"] = reason
            print(f"bench pararnn: fused skipped: {reason}")
    run_seq = "sequential" in modes
    rows: list[dict[str, Any]] = []
    for name in cells:
        for seq in seq_lens:
            torch.manual_seed(0)
            cell = _cell(name, hidden, num_heads).to(device=dev, dtype=dt)
            x = torch.randn(batch, seq, hidden, device=dev, dtype=dt, requires_grad=True)
            inp = x if projection else cell.prepare(x).detach().requires_grad_(True)

            def run(mode: str, backward: bool) -> torch.Tensor:
                with torch.set_grad_enabled(backward):
                    h = _apply(cell, inp, mode, max_iters, projection)
                    if backward:
                        cell.zero_grad(set_to_none=True)
                        inp.grad = None
                        h.float().square().mean().backward()
                return h

            row: dict[str, Any] = {"cell": name, "seq_len": seq}
            row["par_fwd_s"] = time_call(lambda: run("parallel", False), dev, repeats=repeats)
            row["par_fwd_bwd_s"] = time_call(lambda: run("parallel", True), dev, repeats=repeats)
            h_par = run("parallel", False)
            row["newton_iters"] = max_iters
            h_seq = None
            if run_seq and (skip_sequential_above is None or seq <= skip_sequential_above):
                row["seq_fwd_s"] = time_call(lambda: run("sequential", False), dev, repeats=repeats)
                row["seq_fwd_bwd_s"] = time_call(lambda: run("sequential", True), dev, repeats=repeats)
                h_seq = run("sequential", False).double()
                row["fwd_speedup"] = row["seq_fwd_s"] / row["par_fwd_s"]
                row["fwd_bwd_speedup"] = row["seq_fwd_bwd_s"] / row["par_fwd_bwd_s"]
                row["rel_err"] = _rel(h_par, h_seq)
            else:
                row.update({"seq_fwd_s": None, "seq_fwd_bwd_s": None, "fwd_speedup": None, "fwd_bwd_speedup": None, "rel_err": None})
            if run_fused:
                row["fused_fwd_s"] = time_call(lambda: run("fused", False), dev, repeats=repeats)
                row["fused_fwd_bwd_s"] = time_call(lambda: run("fused", True), dev, repeats=repeats)
                h_fused = run("fused", False)
                has_seq = row["seq_fwd_s"] is not None
                row["fused_fwd_speedup"] = row["seq_fwd_s"] / row["fused_fwd_s"] if has_seq else None
                row["fused_fwd_bwd_speedup"] = row["seq_fwd_bwd_s"] / row["fused_fwd_bwd_s"] if has_seq else None
                row["fused_vs_par_fwd"] = row["par_fwd_s"] / row["fused_fwd_s"]
                row["fused_vs_par_fwd_bwd"] = row["par_fwd_bwd_s"] / row["fused_fwd_bwd_s"]
                row["fused_rel_err"] = None if h_seq is None else _rel(h_fused, h_seq)
                row["fused_par_diff"] = _rel(h_fused, h_par)
            rows.append(row)
            # Long sequential loops take minutes on some devices: report each row as it lands.
            measured = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float))
            print(f"bench pararnn: {name} seq {seq}: {measured}", flush=True)

    def plot(ax):
        for name in cells:
            for key, style in (("fwd_speedup", "--"), ("fwd_bwd_speedup", "-")):
                pts = [(r["seq_len"], r[key]) for r in rows if r["cell"] == name and r[key] is not None]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", label=f"{name} {key.removesuffix('_speedup').replace('_', '+')}")
                # The fused kernel against the same sequential time.
                pts = [(r["seq_len"], r["fused_" + key]) for r in rows if r["cell"] == name and r.get("fused_" + key)]
                if pts:
                    ax.plot(*zip(*pts), style, marker="s", label=f"{name} fused {key.removesuffix('_speedup').replace('_', '+')}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("sequential time / parallel time")
        ax.legend()
        ax.grid(alpha=0.3, which="both")

    settings = {
        "batch": batch, "hidden": hidden, "num_heads": num_heads, "max_iters": max_iters, "device": device,
        "dtype": dtype, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "modes": list(modes), "skipped": skipped, "projection": projection,
    }  # fmt: skip
    columns = [
        "cell",
        "seq_len",
        "par_fwd_s",
        "seq_fwd_s",
        "fwd_speedup",
        "par_fwd_bwd_s",
        "seq_fwd_bwd_s",
        "fwd_bwd_speedup",
        "rel_err",
        "newton_iters",
    ]
    if run_fused and dev.type == "cuda":
        import triton

        settings["triton"] = triton.__version__
    if run_fused:
        columns += [
            "fused_fwd_s",
            "fused_fwd_bwd_s",
            "fused_fwd_speedup",
            "fused_fwd_bwd_speedup",
            "fused_vs_par_fwd",
            "fused_vs_par_fwd_bwd",
            "fused_rel_err",
            "fused_par_diff",
        ]
    scope = "cell with its input projection" if projection else "recurrence only"
    title = (
        f"ParaRNN {' / '.join(m for m in modes if m != 'fused' or run_fused)}, {scope} ({device}, {dtype}, batch {batch}, hidden {hidden})"
    )
    write_report(out_dir, "bench_pararnn", {"settings": settings}, rows, columns, plot, title=title)
    return rows


def _fused_unavailable(device: torch.device) -> str | None:
    """Why the fused kernel cannot be timed on ``device``, or ``None`` when it can."""
    if device.type == "cuda":
        from seqzoo.ops.core import HAS_TRITON

        return None if HAS_TRITON else "the fused kernel on CUDA needs the triton package"
    if device.type == "cpu":
        from seqzoo.ops.pararnn.cpu_fused import CpuKernelUnavailable, library

        try:
            library()
        except CpuKernelUnavailable as err:
            return str(err)
        return None
    return f"the fused kernels run on CUDA and CPU only, not {device.type}"


def _apply(cell: torch.nn.Module, inp: torch.Tensor, mode: str, max_iters: int, projection: bool) -> torch.Tensor:
    """The cell output ``[batch, seq, N]`` in ``mode``: through :func:`pararnn` from ``x`` (``projection``), or
    through the solver from the projected inputs ``u`` (the recurrence alone)."""
    from seqzoo.ops.pararnn import pararnn
    from seqzoo.ops.pararnn.solver import NewtonConfig, fused_apply, parallel_apply, sequential_apply

    cuda = inp.is_cuda
    backend = {"sequential": "reference", "parallel": "triton" if cuda else "torch", "fused": "fused" if cuda else "cpp"}[mode]
    if projection:
        return pararnn(cell, inp, backend=backend, max_iters=max_iters)[0]
    if mode == "sequential":
        return cell.output(sequential_apply(cell, inp, None))
    config = NewtonConfig(max_iters=max_iters, backend=backend)
    return cell.output((fused_apply if mode == "fused" else parallel_apply)(cell, inp, None, config))


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float((out.double() - ref).norm() / ref.norm())
