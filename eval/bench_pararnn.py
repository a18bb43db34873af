"""``seqzoo-eval bench pararnn``: ParaRNN's Newton solve against the sequential loop, side by side.

For every cell and sequence length the same cell, input and thread count run both ways:

* ``parallel``: :func:`seqzoo.ops.pararnn.pararnn` with ``mode="parallel"`` (Newton iterations over
  ``affine_scan``, adjoint backward);
* ``sequential``: ``mode="sequential"``, the token loop, differentiated by autograd through the loop
  (what training a nonlinear RNN costs without ParaRNN).

Both include the cell's input projection (``cell.prepare``), which is the same work in each. The
``rel_err`` column is ``‖H_par − H_seq‖ / ‖H_seq‖`` of the two outputs in the same run, so a speed-up
never hides a wrong answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from seqzoo.eval.measure import time_call
from seqzoo.eval.report import write_report

CELLS = ("gru", "lstm")


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
) -> list[dict[str, Any]]:
    """Forward and forward+backward seconds of the parallel and sequential modes, and their ratios.

    Inputs ``x: [batch, seq, hidden]`` (standard normal, seed 0); the loss for the backward is
    ``mean(H²)``, gradients flow to ``x`` and every cell parameter. Rows: ``cell``, ``seq_len``,
    ``par_fwd_s``, ``seq_fwd_s``, ``fwd_speedup``, ``par_fwd_bwd_s``, ``seq_fwd_bwd_s``,
    ``fwd_bwd_speedup``, ``rel_err``, ``newton_iters``. Sequential columns are empty above
    ``skip_sequential_above``. Writes ``bench_pararnn.{json,md,png}``.
    """
    from seqzoo.ops.pararnn import pararnn

    if batch < 1 or hidden < 1 or repeats < 1 or any(s < 1 for s in seq_lens):
        raise ValueError(f"bench pararnn: batch, hidden, repeats and seq lens must be >= 1, got {batch}, {hidden}, {repeats}, {list(seq_lens)}")
    dev, dt = torch.device(device), getattr(torch, dtype)
    rows: list[dict[str, Any]] = []
    for name in cells:
        for seq in seq_lens:
            torch.manual_seed(0)
            cell = _cell(name, hidden, num_heads).to(device=dev, dtype=dt)
            x = torch.randn(batch, seq, hidden, device=dev, dtype=dt, requires_grad=True)

            def run(mode: str, backward: bool) -> torch.Tensor:
                with torch.set_grad_enabled(backward):
                    h = pararnn(cell, x, mode=mode, max_iters=max_iters)[0]
                    if backward:
                        cell.zero_grad(set_to_none=True)
                        x.grad = None
                        h.float().square().mean().backward()
                return h

            row: dict[str, Any] = {"cell": name, "seq_len": seq}
            row["par_fwd_s"] = time_call(lambda: run("parallel", False), dev, repeats=repeats)
            row["par_fwd_bwd_s"] = time_call(lambda: run("parallel", True), dev, repeats=repeats)
            h_par = run("parallel", False)
            row["newton_iters"] = max_iters
            if skip_sequential_above is None or seq <= skip_sequential_above:
                row["seq_fwd_s"] = time_call(lambda: run("sequential", False), dev, repeats=repeats)
                row["seq_fwd_bwd_s"] = time_call(lambda: run("sequential", True), dev, repeats=repeats)
                h_seq = run("sequential", False).double()
                row["fwd_speedup"] = row["seq_fwd_s"] / row["par_fwd_s"]
                row["fwd_bwd_speedup"] = row["seq_fwd_bwd_s"] / row["par_fwd_bwd_s"]
                row["rel_err"] = float((h_par.double() - h_seq).norm() / h_seq.norm())
            else:
                row.update({"seq_fwd_s": None, "seq_fwd_bwd_s": None, "fwd_speedup": None, "fwd_bwd_speedup": None, "rel_err": None})
            rows.append(row)

    def plot(ax):
        for name in cells:
            for key, style in (("fwd_speedup", "--"), ("fwd_bwd_speedup", "-")):
                pts = [(r["seq_len"], r[key]) for r in rows if r["cell"] == name and r[key] is not None]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", label=f"{name} {key.removesuffix('_speedup').replace('_', '+')}")
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
    }  # fmt: skip
    columns = ["cell", "seq_len", "par_fwd_s", "seq_fwd_s", "fwd_speedup", "par_fwd_bwd_s", "seq_fwd_bwd_s", "fwd_bwd_speedup", "rel_err", "newton_iters"]
    title = f"ParaRNN parallel vs sequential ({device}, {dtype}, batch {batch}, hidden {hidden})"
    write_report(out_dir, "bench_pararnn", {"settings": settings}, rows, columns, plot, title=title)
    return rows
