"""Quality of a checkpoint: perplexity / bits per byte on text, MQAR accuracy per segment."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seqzoo.data.mqar import MQARSegment, generate_mqar, mqar_misfit
from seqzoo.data.text import ByteTokenizer, TextDataModule
from seqzoo.eval.report import progress, write_report
from seqzoo.models.losses import linear_nll
from seqzoo.training.checkpoint import load_language_model


@torch.no_grad()
def perplexity(
    checkpoint: str | Path,
    out_dir: str | Path,
    data_overrides: dict[str, Any] | None = None,
    split: str = "test",
    max_batches: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Perplexity and bits per byte of ``checkpoint`` on a text split.

    The text data config saved in the checkpoint is used (the standard-library corpus for a model
    trained on something else whose vocabulary holds byte tokens), updated by ``data_overrides``
    (``source``, ``path``, ``block_size``…). ``max_batches``: evaluation batches, spread evenly over the
    split; ``None`` keeps the run's own budget (``data.eval_batches``, so the numbers match its test), ``0``
    reads the whole split. Shows a progress bar on stderr.
    Writes ``ppl.json``, ``ppl.md`` and ``ppl.png`` (mean loss per position in the block).
    """
    model, config = load_language_model(checkpoint, device)
    data_cfg = dict(config.get("data", {}))
    if "source" not in data_cfg:  # trained on MQAR or another task: measure on the embedded corpus
        trained_on = str(data_cfg.get("_target_", "another task")).rsplit(".", 1)[-1]
        if model.config.vocab_size < ByteTokenizer.vocab_size and "tokenizer" not in (data_overrides or {}):
            raise ValueError(
                f"ppl: {checkpoint} is not a text checkpoint (trained on {trained_on}): its vocabulary of "
                f"{model.config.vocab_size} tokens cannot hold the {ByteTokenizer.vocab_size} byte tokens of the text corpus"
            )
        data_cfg = {"source": "stdlib", "vocab_size": model.config.vocab_size}
    data_cfg = {k: v for k, v in data_cfg.items() if not k.startswith("_")}
    data_cfg.update(data_overrides or {})
    datamodule = TextDataModule(**data_cfg)
    if datamodule.tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"ppl: the tokenizer has {datamodule.tokenizer.vocab_size} tokens, the model only {model.config.vocab_size}")
    if max_batches is not None and max_batches < 0:
        raise ValueError(f"ppl: --max-batches must be >= 0 (0: the whole split), got {max_batches}")
    print(f"ppl: reading and packing the {data_cfg.get('source', 'stdlib')} text", file=sys.stderr, flush=True)
    datamodule.setup("test")
    if split not in datamodule.splits:
        raise ValueError(f"ppl: unknown split {split!r}; choose one of {', '.join(datamodule.splits)}")
    blocks = datamodule.eval_split(split, -1 if max_batches is None else (max_batches or None))
    # The run's own collation: with varlen data the documents of a batch are kept apart, as in its test loss.
    loader = torch.utils.data.DataLoader(blocks, batch_size=datamodule.eval_batch_size, collate_fn=datamodule.collate())
    model.to(device)
    position_loss = torch.zeros(datamodule.block_size, dtype=torch.float64)
    total_nll, total_tokens, total_bytes = 0.0, 0, 0
    for batch in progress(loader, f"ppl ({split} split)"):
        cu_seqlens = batch.get("cu_seqlens")
        hidden = model.hidden_states(batch["input_ids"].to(device), cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(device))
        labels = batch["labels"].reshape(-1, datamodule.block_size)
        # Chunked through the head: no [tokens, vocab] fp32 logits for a large vocabulary.
        nll = linear_nll(hidden.reshape(-1, hidden.shape[-1]), model.head.weight, labels.reshape(-1).to(device))
        nll = nll.reshape(labels.shape).double().cpu()
        position_loss += nll.sum(0)
        total_nll += nll.sum().item()
        total_tokens += nll.numel()
        total_bytes += sum(len(datamodule.tokenizer.decode(row.tolist()).encode("utf-8")) for row in labels)
    if total_tokens == 0:
        raise ValueError(f"ppl: the {split} split yielded no tokens")
    mean_nll = total_nll / total_tokens
    result = {
        "checkpoint": str(checkpoint),
        "split": split,
        "tokens": total_tokens,
        "loss": mean_nll,
        "perplexity": math.exp(mean_nll),
        "bits_per_byte": total_nll / math.log(2) / max(1, total_bytes),
    }
    per_position = (position_loss / (total_tokens / datamodule.block_size)).tolist()

    def plot(ax):
        ax.plot(np.arange(1, len(per_position) + 1), per_position)
        ax.set_xlabel("position in block")
        ax.set_ylabel("loss (nats)")
        ax.grid(alpha=0.3)

    write_report(
        out_dir,
        "ppl",
        {**result, "loss_per_position": per_position},
        [result],
        ["split", "tokens", "loss", "perplexity", "bits_per_byte"],
        plot,
        title=f"Loss by position in the block ({split} split; perplexity {result['perplexity']:.4g}, {result['bits_per_byte']:.4g} bits per byte)",
    )
    return result


@torch.no_grad()
def mqar_accuracy(
    checkpoint: str | Path,
    out_dir: str | Path,
    segments: list[tuple[int, int]] | None = None,
    num_examples: int = 1000,
    batch_size: int = 250,
    seed: int | None = None,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Accuracy of ``checkpoint`` on MQAR test segments, one row per (seq_len, num_kv_pairs).

    Segments default to the test segments saved in the checkpoint's data config; the data seed
    defaults to the test seed of training (``2·seed + 1``), so the numbers match the run's own test.
    Writes ``mqar.json``, ``mqar.md`` and ``mqar.png``.
    """
    model, config = load_language_model(checkpoint, device)
    data_cfg = config.get("data", {})
    if segments is None:
        if "test_segments" not in data_cfg:
            raise ValueError("mqar: the checkpoint was not trained on MQAR; pass --segments SEQ:KV ...")
        segs = [MQARSegment(**s) for s in data_cfg["test_segments"]]
    else:
        segs = [MQARSegment(seq_len, kv, num_examples) for seq_len, kv in segments]
    data_seed = 2 * int(data_cfg.get("seed", 0)) + 1 if seed is None else seed
    options = {k: data_cfg[k] for k in ("power_a", "num_passes", "random_non_queries") if k in data_cfg}
    vocab = model.config.vocab_size
    for seg in segs:  # all at once, before minutes of evaluation
        problem = mqar_misfit(vocab, seg.seq_len, seg.num_kv_pairs, int(options.get("num_passes", 1)))
        if problem:
            raise ValueError(f"mqar: segment {seg.seq_len}:{seg.num_kv_pairs} does not fit this model: {problem}")
    model.to(device)
    rows = []
    for i, seg in enumerate(progress(segs, "mqar segments")):
        inputs, labels = generate_mqar(
            model.config.vocab_size, seg.num_examples, seg.seq_len, seg.num_kv_pairs, seed=data_seed * 1000 + i, **options
        )
        correct = count = 0
        for start in range(0, len(inputs), batch_size):
            _, hits, n = model.loss(inputs[start : start + batch_size].to(device), labels[start : start + batch_size].to(device))
            correct, count = correct + hits.item(), count + n.item()
        rows.append(
            {
                "segment": seg.name,
                "seq_len": seg.seq_len,
                "num_kv_pairs": seg.num_kv_pairs,
                "examples": seg.num_examples,
                "accuracy": correct / max(1, count),
            }
        )

    def plot(ax):
        ax.bar([r["segment"] for r in rows], [r["accuracy"] for r in rows], color="tab:blue")
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("test segment (seq: sequence length, kv: key-value pairs)")
        ax.set_ylabel("accuracy")
        ax.tick_params(axis="x", rotation=30)

    write_report(
        out_dir,
        "mqar",
        {"checkpoint": str(checkpoint), "seed": data_seed},
        rows,
        ["segment", "seq_len", "num_kv_pairs", "examples", "accuracy"],
        plot,
        title="MQAR accuracy",
    )
    return rows
