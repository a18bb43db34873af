"""Throughput and memory benchmarks, always side by side with a baseline measured in the same run.

``models``: whole language models, one per mixer, against softmax attention at the same width.
``layers``: one token mixer alone, same comparison. ``ops``: each kernel's backends (reference
loop vs chunked PyTorch vs Triton), see :mod:`seqzoo.eval.bench_ops`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from seqzoo.eval.measure import peak_memory, time_call
from seqzoo.eval.report import progress, write_report
from seqzoo.models import LanguageModel, build_mixer

BASELINE = "attention"


def _build(kind: str, mixer: str, hidden: int, layers: int, vocab: int, options: dict[str, Any], device: torch.device, dtype: torch.dtype):
    if kind == "models":
        model = LanguageModel(
            {
                "vocab_size": vocab,
                "hidden_size": hidden,
                "num_layers": layers,
                "pattern": [mixer],
                "mixers": {mixer: options} if options else {},
            }
        )
    else:
        model = build_mixer(mixer, hidden, 0, options)
    return model.to(device=device, dtype=dtype)


def _inputs(kind: str, batch: int, seq: int, hidden: int, vocab: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if kind == "models":
        return torch.randint(0, vocab, (batch, seq), device=device)
    return torch.randn(batch, seq, hidden, device=device, dtype=dtype)


def bench_mixers(
    mixers: Sequence[str],
    out_dir: str | Path,
    kind: str = "models",
    seq_lens: Sequence[int] = (1024, 4096),
    batch: int = 1,
    hidden: int = 128,
    layers: int = 2,
    vocab: int = 256,
    decode_tokens: int = 16,
    mixer_options: dict[str, dict[str, Any]] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    repeats: int = 3,
    compile: bool = False,
) -> list[dict[str, Any]]:
    """Forward, forward+backward and per-token decode throughput, peak memory and state bytes.

    Each mixer is measured at every sequence length next to :data:`BASELINE` (added if missing);
    ``*_vs_attention`` columns are throughput ratios against it in the same run. ``compile=True`` also
    times forward+backward of ``torch.compile(model, fullgraph=True)`` (Inductor; compiled once per mixer
    and length, the compile time not counted): ``compiled_fwd_bwd_tok_s``, ``compile_speedup`` (compiled ÷
    eager, same mixer) and ``compiled_vs_attention`` (compiled ÷ compiled attention), plus the graph breaks
    ``torch._dynamo.explain`` finds.
    Writes ``bench_<kind>.json``, ``.md`` and ``.png`` (fwd+bwd tokens/s against length), named like the other
    benchmarks' ``bench_ops.*``, ``bench_titans.*`` and ``bench_pararnn.*``.
    """
    if kind not in ("models", "layers"):
        raise ValueError(f"bench: kind must be models or layers, got {kind!r}")
    dev, dt = torch.device(device), getattr(torch, dtype)
    names = [BASELINE] + [m for m in mixers if m != BASELINE]
    mixer_options = mixer_options or {}
    rows: list[dict[str, Any]] = []
    for seq, name in progress([(seq, name) for seq in seq_lens for name in names], f"bench {kind} (length, mixer)"):
        torch.manual_seed(0)
        module = _build(kind, name, hidden, layers, vocab, mixer_options.get(name, {}), dev, dt)
        x = _inputs(kind, batch, seq, hidden, vocab, dev, dt)

        def forward() -> None:
            with torch.no_grad():
                module(x)

        def forward_backward() -> None:
            module.zero_grad(set_to_none=True)
            out = module(x)
            out.float().square().mean().backward()

        def prefilled_cache() -> Any:
            with torch.no_grad():
                cache = module.init_cache(batch)
                module(x, cache=cache)
            return cache

        def decode(cache: Any) -> None:
            with torch.no_grad():
                for _ in range(decode_tokens):
                    module(x[:, -1:], cache=cache)

        t_fwd = time_call(forward, dev, repeats=repeats)
        t_fb = time_call(forward_backward, dev, repeats=repeats)
        # Only the decode steps are timed, each repeat from a freshly prefilled cache. (Timing prefill + decode and
        # subtracting a separately timed prefill left the noise of a long prefill in a short decode.)
        t_decode = time_call(decode, dev, repeats=repeats, setup=prefilled_cache)
        tokens = batch * seq
        compiled_columns: dict[str, Any] = {}
        if compile:
            torch._dynamo.reset()
            breaks = torch._dynamo.explain(module)(x).graph_break_count
            compiled = torch.compile(module, fullgraph=True, dynamic=False)

            def compiled_forward_backward() -> None:
                module.zero_grad(set_to_none=True)
                compiled(x).float().square().mean().backward()

            t_compiled = time_call(compiled_forward_backward, dev, warmup=2, repeats=repeats)
            compiled_columns = {"graph_breaks": breaks, "compiled_fwd_bwd_tok_s": tokens / t_compiled, "compile_speedup": t_fb / t_compiled}
        rows.append(
            {
                "mixer": name,
                "seq_len": seq,
                "fwd_tok_s": tokens / t_fwd,
                "fwd_bwd_tok_s": tokens / t_fb,
                "decode_tok_s": batch * decode_tokens / t_decode,
                "peak_mem_mb": peak_memory(forward_backward, dev) / 2**20,
                "state_bytes": module.state_size(batch=batch, seq_len=seq),
                **compiled_columns,
            }
        )
    base = {r["seq_len"]: r for r in rows if r["mixer"] == BASELINE}
    for r in rows:
        for key in ("fwd_tok_s", "fwd_bwd_tok_s", "decode_tok_s"):
            r[f"{key.removesuffix('_tok_s')}_vs_attention"] = r[key] / base[r["seq_len"]][key]
        if compile:
            r["compiled_vs_attention"] = r["compiled_fwd_bwd_tok_s"] / base[r["seq_len"]]["compiled_fwd_bwd_tok_s"]

    def plot(ax):
        for name in names:
            pts = [(r["seq_len"], r["fwd_bwd_tok_s"]) for r in rows if r["mixer"] == name]
            ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("fwd+bwd tokens/s")
        ax.legend()
        ax.grid(alpha=0.3)

    settings = {
        "kind": kind,
        "batch": batch,
        "hidden": hidden,
        "layers": layers,
        "vocab": vocab,
        "decode_tokens": decode_tokens,
        "device": device,
        "dtype": dtype,
        "torch": torch.__version__,
    }
    columns = [
        "mixer",
        "seq_len",
        "fwd_tok_s",
        "fwd_bwd_tok_s",
        "decode_tok_s",
        "peak_mem_mb",
        "state_bytes",
        "fwd_vs_attention",
        "fwd_bwd_vs_attention",
        "decode_vs_attention",
    ]
    if compile:
        columns += ["graph_breaks", "compiled_fwd_bwd_tok_s", "compile_speedup", "compiled_vs_attention"]
    settings["threads"] = torch.get_num_threads()
    write_report(
        out_dir,
        f"bench_{kind}",
        {"settings": settings},
        rows,
        columns,
        plot,
        title=f"{kind} throughput ({device}, {dtype}, batch {batch}, hidden {hidden})",
    )
    return rows
