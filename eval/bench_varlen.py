"""``seqzoo-eval bench varlen``: packed documents against padded batches and classic packing, and the leak.

On real documents (the standard-library corpus by default, its own length distribution) each mixer's
language model runs forward+backward three ways in one process, the repeats interleaved:

* ``varlen``: blocks of ``seq_len`` tokens packed side by side into one row, documents marked by
  ``cu_seqlens`` (what ``data.varlen: true`` trains on);
* ``packed``: the same blocks as a ``[batch, seq_len]`` batch without boundaries (``data.varlen: false``,
  a document reads the end of the previous one);
* ``padded``: one document per row, each cut at ``seq_len``, padded to the longest row of the batch.

``*_useful_tok_s`` counts real tokens only (a padded batch's padding is work but not data). ``leak_*`` is the
largest change of the logits after a document boundary when the document before it is replaced by another
of the same length: exactly 0 when documents are isolated.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from seqzoo.eval.report import progress, write_report


def _documents(vocab: int, seq_len: int, count: int) -> list[torch.Tensor]:
    """Token ids of the first ``count`` standard-library documents with at least 8 tokens, each cut at ``seq_len``."""
    from seqzoo.data import ByteTokenizer, load_documents

    tokenizer = ByteTokenizer()
    if vocab < tokenizer.vocab_size:
        raise ValueError(f"bench varlen: --vocab must be at least {tokenizer.vocab_size} for the byte tokenizer, got {vocab}")
    docs = []
    for text in load_documents("stdlib", max_documents=4 * count)["text"]:
        ids = torch.from_numpy(tokenizer.encode(text).astype("int64"))
        ids = torch.cat([ids, torch.tensor([tokenizer.eos_id])])[:seq_len]
        if ids.numel() >= 8:
            docs.append(ids)
        if len(docs) == count:
            break
    return docs


def _batches(docs: list[torch.Tensor], seq_len: int, batch: int) -> dict[str, Any]:
    """The three layouts of the same documents: ``(inputs, cu_seqlens or None, useful tokens)`` each."""
    stream = torch.cat(docs)
    total = (stream.numel() // seq_len) * seq_len
    blocks = stream[:total].view(-1, seq_len)[:batch]
    starts = {0}
    position = 0
    for doc in docs:
        position += doc.numel()
        if position < blocks.numel():
            starts.add(position)
    starts.update(range(0, blocks.numel(), seq_len))
    cu = torch.tensor(sorted(starts) + [blocks.numel()], dtype=torch.int32)
    rows = docs[: max(1, len(cu) - 1)][: batch * 4]
    width = max(d.numel() for d in rows)
    padded = torch.zeros(len(rows), width, dtype=torch.long)
    for i, d in enumerate(rows):
        padded[i, : d.numel()] = d
    return {
        "varlen": (blocks.reshape(1, -1), cu, blocks.numel()),
        "packed": (blocks, None, blocks.numel()),
        "padded": (padded, None, sum(d.numel() for d in rows)),
    }


def _leak(model: torch.nn.Module, docs: list[torch.Tensor], varlen: bool) -> float:
    """Largest logit change on document ``b`` when the document packed before it changes (same length)."""
    a1 = docs[0]
    a2 = next((d for d in docs[1:] if d.numel() >= a1.numel()), None)
    if a2 is None:
        return float("nan")
    a2, b = a2[: a1.numel()], docs[-1]
    outs = []
    with torch.no_grad():
        for a in (a1, a2):
            row = torch.cat([a, b])[None]
            cu = torch.tensor([0, a.numel(), row.shape[1]], dtype=torch.int32) if varlen else None
            outs.append(model(row, cu_seqlens=cu)[0, a.numel() :])
    return float((outs[0] - outs[1]).abs().max())


def bench_varlen(
    mixers: Sequence[str],
    out_dir: str | Path,
    seq_len: int = 1024,
    batch: int = 4,
    hidden: int = 128,
    layers: int = 2,
    vocab: int = 257,
    repeats: int = 3,
) -> list[dict[str, Any]]:
    """Useful tokens/s of varlen, packed and padded batches per mixer, and the cross-document leak of each mode.

    Writes ``bench_varlen.json``, ``.md`` and ``.png``; ``varlen_vs_packed`` and ``varlen_vs_padded`` are the
    throughput ratios of the same run.
    """
    from seqzoo.models import LanguageModel

    docs = _documents(vocab, seq_len, count=8 * batch)
    layouts = _batches(docs, seq_len, batch)
    rows = []
    for name in progress(list(mixers), "bench varlen (mixer)"):
        torch.manual_seed(0)
        model = LanguageModel({"vocab_size": vocab, "hidden_size": hidden, "num_layers": layers, "pattern": [name]})
        times: dict[str, list[float]] = {mode: [] for mode in layouts}
        for _ in range(repeats + 1):  # the first round warms up and is dropped
            for mode, (ids, cu, _) in layouts.items():
                model.zero_grad(set_to_none=True)
                start = time.perf_counter()
                model(ids, cu_seqlens=cu).float().square().mean().backward()
                times[mode].append(time.perf_counter() - start)
        row: dict[str, Any] = {"mixer": name}
        for mode, (_, _, useful) in layouts.items():
            row[f"{mode}_useful_tok_s"] = useful / sorted(times[mode][1:])[len(times[mode][1:]) // 2]
        row["varlen_vs_packed"] = row["varlen_useful_tok_s"] / row["packed_useful_tok_s"]
        row["varlen_vs_padded"] = row["varlen_useful_tok_s"] / row["padded_useful_tok_s"]
        row["leak_varlen"] = _leak(model, docs, varlen=True)
        row["leak_packed"] = _leak(model, docs, varlen=False)
        rows.append(row)

    def plot(ax):
        modes = list(layouts)
        for i, mode in enumerate(modes):
            ax.bar([j + 0.25 * i for j in range(len(rows))], [r[f"{mode}_useful_tok_s"] for r in rows], width=0.25, label=mode)
        ax.set_xticks([j + 0.25 for j in range(len(rows))], [r["mixer"] for r in rows], rotation=20)
        ax.set_ylabel("useful fwd+bwd tokens/s")
        ax.legend()

    lengths = [d.numel() for d in docs]
    settings = {
        "seq_len": seq_len, "batch": batch, "hidden": hidden, "layers": layers, "vocab": vocab, "repeats": repeats,
        "threads": torch.get_num_threads(), "documents": len(docs), "doc_len_mean": sum(lengths) / len(lengths),
        "varlen_docs": len(layouts["varlen"][1]) - 1, "padded_rows": layouts["padded"][0].shape[0], "torch": torch.__version__,
    }  # fmt: skip
    columns = [
        "mixer", "varlen_useful_tok_s", "packed_useful_tok_s", "padded_useful_tok_s", "varlen_vs_packed", "varlen_vs_padded",
        "leak_varlen", "leak_packed",
    ]  # fmt: skip
    title = f"packed documents vs padded batches ({seq_len}-token blocks × {batch}, hidden {hidden}, {layers} layers)"
    write_report(out_dir, "bench_varlen", {"settings": settings}, rows, columns, plot, title=title)
    return rows
