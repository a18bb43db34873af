"""``seqzoo-eval bench ops``: every kernel's backends side by side (reference loop, chunked PyTorch,
Triton on CUDA), plus peer implementations when their optional packages are installed.

The throughput of each row is tokens (batch × seq) per second; ``fwd_bwd_vs_reference`` is the
forward+backward speed-up over the token-by-token reference measured in the same run, and
``fwd_bwd_vs_fla`` (on our rows) the ratio of our forward+backward throughput to fla's chunked kernel.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from seqzoo.eval.measure import peak_memory, time_call
from seqzoo.eval.report import progress, write_report


def _qkv(batch: int, seq: int, heads: int, dim: int, device, dtype) -> dict[str, torch.Tensor]:
    return {
        "q": torch.randn(batch, seq, heads, dim, device=device, dtype=dtype),
        "k": torch.randn(batch, seq, heads, dim, device=device, dtype=dtype),
        "v": torch.randn(batch, seq, heads, dim, device=device, dtype=dtype),
    }


def _log_gate(*shape: int, device, dtype) -> torch.Tensor:
    # log decays in (log 0.9, 0): a realistic spread without underflow
    return (torch.rand(*shape, device=device) * torch.log(torch.tensor(0.9))).to(dtype)


def _inputs(op: str, batch: int, seq: int, heads: int, dim: int, device, dtype) -> dict[str, torch.Tensor]:
    if op == "affine_scan":
        return {
            "a": torch.rand(batch, seq, heads * dim, device=device, dtype=dtype),
            "b": torch.randn(batch, seq, heads * dim, device=device, dtype=dtype),
        }
    x = _qkv(batch, seq, heads, dim, device, dtype)
    if op == "simple_gla":
        x["g"] = _log_gate(batch, seq, heads, device=device, dtype=dtype)
    elif op == "gla":
        x["g"] = _log_gate(batch, seq, heads, dim, device=device, dtype=dtype)
    elif op in ("delta_rule", "gated_delta_rule"):
        x["beta"] = torch.rand(batch, seq, heads, device=device, dtype=dtype)
        if op == "gated_delta_rule":
            x["g"] = _log_gate(batch, seq, heads, device=device, dtype=dtype)
    elif op == "neural_memory":
        x["q"], x["k"] = torch.nn.functional.normalize(x["q"], dim=-1), torch.nn.functional.normalize(x["k"], dim=-1)
        x["lr"] = 0.1 * torch.rand(batch, seq, heads, device=device, dtype=dtype)
        x["momentum"] = 0.9 * torch.rand(batch, seq, heads, device=device, dtype=dtype)
        x["decay"] = 0.01 * torch.rand(batch, seq, heads, device=device, dtype=dtype)
    return x


def _ours(op: str, backend: str) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    fn = getattr(importlib.import_module("seqzoo.ops"), op)
    if op == "affine_scan":
        return lambda x: fn(x["a"], x["b"], backend=backend)[0]
    if op in ("delta_rule", "gated_delta_rule"):
        order = ["q", "k", "v", "beta"] + (["g"] if op == "gated_delta_rule" else [])
        return lambda x: fn(*(x[n] for n in order), use_qk_l2norm=True, backend=backend)[0]
    if op == "neural_memory":
        return lambda x: fn(x["q"], x["k"], x["v"], x["lr"], x["momentum"], x["decay"], chunk_size=16, backend=backend)[0]
    return lambda x: fn(x["q"], x["k"], x["v"], x["g"], backend=backend)[0]


def _peers(op: str, device: torch.device) -> dict[str, Callable[[dict[str, torch.Tensor]], torch.Tensor]]:
    """Implementations from optional packages (the ``bench`` extra); none are runtime dependencies.

    On CUDA: fla's chunked Triton kernel for each linear-attention op, called with the same inputs and
    options as ours (``[batch, seq, heads, dim]`` layout, q/k L2-normalised in the kernel for the delta
    rules). On the CPU: fla's naive chunked PyTorch gated delta rule.
    """
    peers: dict[str, Callable] = {}
    try:
        if device.type == "cuda":
            if op == "gated_delta_rule":
                from fla.ops.gated_delta_rule import chunk_gated_delta_rule

                peers["fla chunk (triton)"] = lambda x: chunk_gated_delta_rule(
                    x["q"], x["k"], x["v"], x["g"], x["beta"], use_qk_l2norm_in_kernel=True
                )[0]
            elif op == "delta_rule":
                from fla.ops.delta_rule import chunk_delta_rule

                peers["fla chunk (triton)"] = lambda x: chunk_delta_rule(x["q"], x["k"], x["v"], x["beta"], use_qk_l2norm_in_kernel=True)[0]
            elif op == "gla":
                from fla.ops.gla import chunk_gla

                peers["fla chunk (triton)"] = lambda x: chunk_gla(x["q"], x["k"], x["v"], x["g"])[0]
            elif op == "simple_gla":
                from fla.ops.simple_gla import chunk_simple_gla

                peers["fla chunk (triton)"] = lambda x: chunk_simple_gla(x["q"], x["k"], x["v"], x["g"])[0]
        elif op == "gated_delta_rule":
            from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule

            def fla_naive(x: dict[str, torch.Tensor]) -> torch.Tensor:
                q, k = (torch.nn.functional.normalize(x[n], dim=-1) for n in ("q", "k"))
                return naive_chunk_gated_delta_rule(q, k, x["v"], x["g"], x["beta"], chunk_size=64)[0]

            peers["fla naive_chunk (torch)"] = fla_naive
    except Exception:  # not installed, or an incompatible version: no peer row
        pass
    return peers


ALL_OPS = ("simple_gla", "gla", "delta_rule", "gated_delta_rule", "affine_scan", "neural_memory")


def bench_ops(
    out_dir: str | Path,
    ops: Sequence[str] | None = None,
    seq_lens: Sequence[int] = (256, 1024, 4096),
    batch: int = 2,
    heads: int = 4,
    dim: int = 64,
    device: str = "cpu",
    dtype: str = "float32",
    repeats: int = 3,
    skip_reference_above: int = 4096,
) -> list[dict[str, Any]]:
    """Forward and forward+backward tokens/s and peak memory per op and implementation.

    Writes ``bench_ops.json``, ``bench_ops.md`` and ``bench_ops.png`` (speed-up over the reference).
    """
    ops = list(ops or ALL_OPS)
    unknown = sorted(set(ops) - set(ALL_OPS))
    if unknown:
        raise ValueError(f"bench ops: unknown op(s) {', '.join(unknown)}; choose from {', '.join(ALL_OPS)}")
    dev, dt = torch.device(device), getattr(torch, dtype)
    backends = ["reference", "torch"] + (["triton"] if dev.type == "cuda" else [])
    rows: list[dict[str, Any]] = []
    for op, seq in progress([(op, seq) for op in ops for seq in seq_lens], "bench ops (op, length)"):
        impls = {f"ours {b}": _ours(op, b) for b in backends if not (b == "reference" and seq > skip_reference_above)}
        impls.update(_peers(op, dev))
        torch.manual_seed(0)
        inputs = _inputs(op, batch, seq, heads, dim, dev, dt)
        for name, fn in impls.items():
            leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
            cotangent = torch.randn_like(fn(leaves).float())

            def forward() -> None:
                with torch.no_grad():
                    fn(leaves)

            def forward_backward() -> None:
                for leaf in leaves.values():
                    leaf.grad = None
                (fn(leaves).float() * cotangent).sum().backward()

            tokens = batch * seq
            rows.append(
                {
                    "op": op,
                    "impl": name,
                    "seq_len": seq,
                    "fwd_tok_s": tokens / time_call(forward, dev, repeats=repeats),
                    "fwd_bwd_tok_s": tokens / time_call(forward_backward, dev, repeats=repeats),
                    "peak_mem_mb": peak_memory(forward_backward, dev) / 2**20,
                }
            )
    for r in rows:
        ref = next((x for x in rows if x["op"] == r["op"] and x["seq_len"] == r["seq_len"] and x["impl"] == "ours reference"), None)
        r["fwd_bwd_vs_reference"] = r["fwd_bwd_tok_s"] / ref["fwd_bwd_tok_s"] if ref else None
        fla = next((x for x in rows if x["op"] == r["op"] and x["seq_len"] == r["seq_len"] and x["impl"].startswith("fla chunk")), None)
        r["fwd_bwd_vs_fla"] = r["fwd_bwd_tok_s"] / fla["fwd_bwd_tok_s"] if fla and r["impl"].startswith("ours") else None

    def plot(ax):
        for op in ops:
            for impl in sorted({r["impl"] for r in rows if r["op"] == op}):
                pts = [(r["seq_len"], r["fwd_bwd_tok_s"]) for r in rows if r["op"] == op and r["impl"] == impl]
                ax.plot(*zip(*pts), marker="o", label=f"{op} / {impl}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("fwd+bwd tokens/s")
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)

    settings = {
        "batch": batch,
        "heads": heads,
        "dim": dim,
        "device": device,
        "dtype": dtype,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    columns = ["op", "impl", "seq_len", "fwd_tok_s", "fwd_bwd_tok_s", "peak_mem_mb", "fwd_bwd_vs_reference", "fwd_bwd_vs_fla"]
    write_report(
        out_dir, "bench_ops", {"settings": settings}, rows, columns, plot, title=f"ops ({device}, {dtype}, B={batch}, H={heads}, D={dim})"
    )
    return rows
