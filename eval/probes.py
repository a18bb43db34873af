"""Long-context probes of a checkpoint (``seqzoo-eval probe …``).

* ``niah``: single needle in a haystack (RULER S-NIAH: passkey, number, word) on a depth × length
  grid; exact match of greedy decoding with the cache. One heatmap per kind.
* ``mqar``: MQAR test segments far longer than training (up to seq 4096 / 1024 pairs); segments that
  the model's vocabulary cannot hold are listed with the reason instead of a number.
* ``length``: per-position loss on text up to ``factor`` × the training length, and the norm of each
  layer's recurrent state along the sequence (prefilled piece by piece through the cache).
* ``decode``: per-token decode latency and cache bytes after prompts of growing length, for several
  checkpoints and/or freshly initialised registered mixers side by side.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from seqzoo.data.mqar import MQARSegment, generate_mqar, mqar_misfit
from seqzoo.data.niah import DEFAULT_DIGITS, KINDS, VALUE_WORDS, chance_accuracy, check_kind, generate_niah
from seqzoo.data.text import ByteTokenizer, TextDataModule
from seqzoo.eval.measure import sync
from seqzoo.eval.report import progress, write_report
from seqzoo.models import LanguageModel
from seqzoo.models.cache import ModelCache
from seqzoo.training.checkpoint import load_language_model

Predictor = Callable[[torch.Tensor, int], list[bytes]]
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
MAX_MQAR_PROBE_LENGTH = 4096
DEFAULT_CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768)


def _two_panels(ax):
    """Split the report's single axis into two side-by-side panels."""
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    return ax, make_axes_locatable(ax).append_axes("right", size="100%", pad=0.8)


def _training_length(config: dict[str, Any]) -> int | None:
    """The sequence length a run trained on (text block, needle sequence or longest MQAR segment)."""
    data = config.get("data", {})
    if "block_size" in data:
        return int(data["block_size"])
    if "seq_len" in data:
        return int(data["seq_len"])
    if data.get("train_segments"):
        return max(int(s["seq_len"]) for s in data["train_segments"])
    return None


# ---------------------------------------------------------------- needle in a haystack


def needle_prompt_lengths(seq_len: int, kind: str, digits: int | None, factors: Sequence[int] = (1, 2, 4, 8)) -> list[int]:
    """Prompt lengths at ``factors`` × a needle run's training length.

    A training example holds ``seq_len + 1`` tokens, prompt and answer together, so at 1× the prompt is
    ``seq_len + 1 − len(answer)`` tokens: the question and answer sit at the positions the model was
    trained on (with ``seq_len`` itself the answer would start beyond them). Word answers vary in length;
    the longest one is used.
    """
    answer = DEFAULT_DIGITS[kind] if digits is None else digits
    if kind == "word":
        answer = max(len(w) for w in VALUE_WORDS)
    return [f * seq_len + 1 - answer for f in factors]


def greedy_predictor(model: LanguageModel, device: str | torch.device = "cpu", prefill_chunk: int = 2048) -> Predictor:
    """``predict(prompts [n, length], max_new_tokens) -> [bytes]``: greedy decoding with the cache.

    Same tokens as ``model.generate(..., temperature=0)``, but the prompt is prefilled through the
    cache in chunks of ``prefill_chunk`` tokens so attention's prefill memory stays bounded at long
    contexts. Tokens outside the byte range (an end-of-document id) come back as byte 0, which no
    answer holds.
    """

    @torch.no_grad()
    def predict(prompts: torch.Tensor, max_new_tokens: int) -> list[bytes]:
        prompts = prompts.to(device)
        cache = model.init_cache(prompts.shape[0])
        for start in range(0, prompts.shape[1], prefill_chunk):
            logits = model(prompts[:, start : start + prefill_chunk], cache=cache)[:, -1]
        tokens = []
        for step in range(max_new_tokens):
            tokens.append(logits.argmax(-1))
            if step + 1 < max_new_tokens:
                logits = model(tokens[-1][:, None], cache=cache)[:, -1]
        out = torch.stack(tokens, 1).cpu() if tokens else torch.zeros(prompts.shape[0], 0, dtype=torch.long)
        return [bytes(t if t < 256 else 0 for t in row.tolist()) for row in out]

    return predict


def score_niah(
    predict: Predictor,
    kind: str,
    lengths: Sequence[int],
    depths: Sequence[float] = DEFAULT_DEPTHS,
    samples: int = 20,
    seed: int = 0,
    haystack: str | None = None,
    digits: int | None = None,
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """Exact-match accuracy of ``predict`` on every (length, depth) cell.

    A prediction is correct when its first ``len(answer)`` bytes are the answer's. Rows hold
    ``kind, length, depth, samples, accuracy, chance`` (chance: one fixed guess, see
    :func:`seqzoo.data.niah.chance_accuracy`).
    """
    check_kind(kind)
    chance = chance_accuracy(kind, digits)
    rows = []
    for length, depth in progress([(n, d) for n in lengths for d in depths], f"probe niah {kind} (length, depth)"):
        examples = generate_niah(kind, samples, length, depth, seed, haystack, digits)
        hits = 0
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            answers = [e.answer.encode() for e in batch]
            preds = predict(torch.stack([e.prompt_ids for e in batch]), max(len(a) for a in answers))
            hits += sum(p[: len(a)] == a for p, a in zip(preds, answers))
        rows.append(
            {"kind": kind, "length": length, "depth": depth, "samples": samples, "accuracy": hits / max(1, samples), "chance": chance}
        )
    return rows


def relative_luminance(rgb: Sequence[float]) -> float:
    """WCAG relative luminance of an sRGB colour (channels in [0, 1])."""
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb[:3]]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """WCAG contrast ratio of two colours, from 1 (none) to 21 (black on white)."""
    la, lb = sorted((relative_luminance(a), relative_luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def readable_on(background: Sequence[float]) -> str:
    """``"black"`` or ``"white"``, whichever contrasts more with ``background`` (black numbers on the heatmap's
    dark red cells were hard to read)."""
    return "black" if contrast_ratio(background, (0.0, 0.0, 0.0)) >= contrast_ratio(background, (1.0, 1.0, 1.0)) else "white"


def _heatmap(rows: list[dict[str, Any]], lengths: Sequence[int], depths: Sequence[float]):
    grid = np.array([[next(r["accuracy"] for r in rows if r["length"] == n and r["depth"] == d) for n in lengths] for d in depths])

    def plot(ax):
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                cell = image.cmap(image.norm(grid[i, j]))
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8, color=readable_on(cell))
        ax.figure.colorbar(image, ax=ax, label="exact-match accuracy")

    return plot


@torch.no_grad()
def niah_probe(
    checkpoint: str | Path,
    out_dir: str | Path,
    kinds: Sequence[str] | None = None,
    lengths: Sequence[int] | None = None,
    depths: Sequence[float] | None = None,
    samples: int = 20,
    seed: int = 0,
    haystack: str | None = None,
    digits: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
) -> dict[str, list[dict[str, Any]]]:
    """S-NIAH grid of ``checkpoint``; writes ``niah_<kind>.json/.md/.png`` per kind.

    Defaults: the kind a needle run trained on (else all three), prompt lengths at 1×, 2×, 4×, 8× its
    training length (:func:`needle_prompt_lengths`; else 256…2048), depths 0, ¼, ½, ¾, 1; ``digits`` from the run's data config when it matches.
    """
    model, config = load_language_model(checkpoint, device)
    if model.config.vocab_size < 256:
        raise ValueError(f"niah: byte prompts need a vocabulary of at least 256 tokens, the model has {model.config.vocab_size}")
    data = config.get("data", {})
    trained_kind = data.get("kind") if str(data.get("_target_", "")).endswith("NIAHDataModule") else None
    kinds = list(kinds or ([trained_kind] if trained_kind else KINDS))
    for kind in kinds:
        check_kind(kind)
    base = _training_length(config) if trained_kind else None
    if not lengths:
        lengths = needle_prompt_lengths(base, trained_kind, data.get("digits")) if base else [256, 512, 1024, 2048]
    lengths = list(lengths)
    depths = list(depths if depths is not None else DEFAULT_DEPTHS)
    model.to(device)
    predict = greedy_predictor(model, device)
    results = {}
    for kind in kinds:
        kind_digits = digits if digits is not None else (data.get("digits") if kind == trained_kind else None)
        kind_haystack = haystack or (data.get("haystack") if kind == trained_kind else None)
        rows = score_niah(predict, kind, lengths, depths, samples, seed, kind_haystack, kind_digits, batch_size)
        payload = {
            "checkpoint": str(checkpoint),
            "kind": kind,
            "seed": seed,
            "haystack": kind_haystack,
            "digits": kind_digits,
            "trained_length": base,
            "decoding": "greedy with cache; exact match of the first len(answer) bytes",
        }
        write_report(
            out_dir,
            f"niah_{kind}",
            payload,
            rows,
            ["kind", "length", "depth", "samples", "accuracy", "chance"],
            _heatmap(rows, lengths, depths),
            title=f"S-NIAH {kind}",
        )
        results[kind] = rows
    return results


# ---------------------------------------------------------------- MQAR at long lengths


def default_long_segments(vocab_size: int, config: dict[str, Any]) -> list[tuple[int, int]]:
    """Test-only MQAR segments beyond a run's training length that its vocabulary can hold.

    Lengths 2×, 4×, 8×… the longest training sequence up to :data:`MAX_MQAR_PROBE_LENGTH`, plus the longest
    length the vocabulary holds (``vocab_size − 1``, even) when it stops short of the next doubling; each with
    the training mixture's densest key-value ratio (Zoology's mixture, trained at 256:64: 512:128 … 4096:1024;
    the default 256-token model, trained at 64:8: 128:16 and 254:31). Raises ``ValueError`` when no length
    beyond training fits.
    """
    data = config.get("data", {})
    train = [(int(s["seq_len"]), int(s["num_kv_pairs"])) for s in data.get("train_segments") or []]
    base = max((length for length, _ in train), default=None) or _training_length(config) or 256
    ratio = max((kv / length for length, kv in train), default=0.25)
    passes = int(data.get("num_passes", 1))
    cap = min(MAX_MQAR_PROBE_LENGTH, (vocab_size - 1) // 2 * 2)
    lengths = []
    length = 2 * base
    while length <= cap:
        lengths.append(length)
        length *= 2
    if cap > max(lengths, default=base):
        lengths.append(cap)
    segments = []
    for length in lengths:
        kv = min(max(1, int(length * ratio)), length // (2 * passes + 2), vocab_size // 2 - 1)
        if mqar_misfit(vocab_size, length, kv, passes) is None:
            segments.append((length, kv))
    if not segments:
        raise ValueError(
            f"probe mqar: the model's vocabulary of {vocab_size} tokens holds no MQAR sequence longer than its training "
            f"length {base} (MQAR needs vocab_size > seq_len); pass --segments SEQ_LEN:NUM_KV_PAIRS"
        )
    return segments


@torch.no_grad()
def mqar_long_probe(
    checkpoint: str | Path,
    out_dir: str | Path,
    segments: Sequence[tuple[int, int]] | None = None,
    num_examples: int = 100,
    batch_size: int = 8,
    seed: int = 0,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """MQAR accuracy on test-only segments longer than training; writes ``mqar_long.*``.

    Keys and values come from the model's own vocabulary, so MQAR needs ``vocab > seq_len`` and
    ``num_kv_pairs < vocab/2``. The default segments are those the vocabulary holds
    (:func:`default_long_segments`); a ``segments`` entry that cannot fit gets ``accuracy: null`` and the
    reason in ``note``.
    """
    model, config = load_language_model(checkpoint, device)
    data = config.get("data", {})
    options = {k: data[k] for k in ("power_a", "num_passes", "random_non_queries") if k in data}
    vocab = model.config.vocab_size
    segments = list(segments or default_long_segments(vocab, config))
    model.to(device)
    rows = []
    for i, (seq_len, kv) in enumerate(progress(segments, "probe mqar segments")):
        seg = MQARSegment(seq_len, kv, num_examples)
        row: dict[str, Any] = {
            "segment": seg.name,
            "seq_len": seq_len,
            "num_kv_pairs": kv,
            "examples": num_examples,
            "accuracy": None,
            "state_bytes": model.state_size(1, seq_len),
            "note": "",
        }
        try:
            inputs, labels = generate_mqar(vocab, num_examples, seq_len, kv, seed=seed * 1000 + i, **options)
        except ValueError as exc:
            row["note"] = f"does not fit: {exc}"
            rows.append(row)
            continue
        correct = count = 0
        for start in range(0, num_examples, batch_size):
            _, hits, n = model.loss(inputs[start : start + batch_size].to(device), labels[start : start + batch_size].to(device))
            correct, count = correct + hits.item(), count + n.item()
        row["accuracy"] = correct / max(1, count)
        rows.append(row)

    def plot(ax):
        names = [r["segment"] for r in rows]
        ax.bar(names, [r["accuracy"] or 0.0 for r in rows], color=["tab:blue" if r["accuracy"] is not None else "lightgray" for r in rows])
        for j, r in enumerate(rows):
            if r["accuracy"] is None:
                ax.text(j, 0.02, "n/a (vocab)", ha="center", rotation=90, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("test segment (seq: sequence length, kv: key-value pairs)")
        ax.set_ylabel("accuracy")
        ax.tick_params(axis="x", rotation=30)

    payload = {
        "checkpoint": str(checkpoint),
        "seed": seed,
        "vocab_size": vocab,
        "trained_segments": data.get("train_segments"),
        "max_seq_len_for_vocab": (vocab - 1) // 2 * 2,
        "max_kv_pairs_for_vocab": vocab // 2 - 1,
    }
    write_report(
        out_dir,
        "mqar_long",
        payload,
        rows,
        ["segment", "seq_len", "num_kv_pairs", "examples", "accuracy", "state_bytes", "note"],
        plot,
        title="MQAR beyond the training length",
    )
    return rows


# ---------------------------------------------------------------- length extrapolation


def state_norms(cache: ModelCache) -> list[float]:
    """Per layer: the L2 norm of its state (every cached tensor except conv tails), mean over the batch."""
    norms = []
    for layer in cache.layers:
        tensors = [t.float().flatten(1) for name, t in layer.tensors.items() if not name.startswith("conv_")]
        if not tensors:
            norms.append(0.0)
            continue
        norms.append(torch.cat(tensors, 1).norm(dim=1).mean().item())
    return norms


@torch.no_grad()
def length_probe(
    checkpoint: str | Path,
    out_dir: str | Path,
    train_length: int | None = None,
    factor: int = 8,
    num_sequences: int = 4,
    piece: int | None = None,
    split: str = "test",
    max_documents: int | None = None,
    batch_size: int = 4,
    device: str = "cpu",
) -> dict[str, Any]:
    """Per-position loss up to ``factor`` × the training length and each layer's state norm along it.

    Text: the run's own text data (the standard-library corpus for runs on other tasks), cut into
    blocks of ``factor · train_length`` tokens. Each block is prefilled through the cache in pieces of
    ``piece`` tokens (default a quarter of the training length); after each piece the state norms are
    read (:func:`state_norms`). Rows: one per multiple of the training length. Writes ``length.*``.
    """
    model, config = load_language_model(checkpoint, device)
    base = train_length or _training_length(config)
    if not base:
        raise ValueError("length: cannot tell the training length from the checkpoint; pass --train-length")
    if factor < 1 or num_sequences < 1:
        raise ValueError("length: factor and num_sequences must be positive")
    piece = piece or (base // 4 if base % 4 == 0 else base)
    if base % piece:
        raise ValueError(f"length: piece ({piece}) must divide the training length ({base})")
    data = dict(config.get("data", {}))
    if "source" not in data:  # trained on MQAR or needles: the embedded corpus, if the vocabulary holds bytes
        if model.config.vocab_size < ByteTokenizer.vocab_size:
            trained_on = str(data.get("_target_", "another task")).rsplit(".", 1)[-1]
            raise ValueError(
                f"length: {checkpoint} is not a text checkpoint (trained on {trained_on}): its vocabulary of "
                f"{model.config.vocab_size} tokens cannot hold the {ByteTokenizer.vocab_size} byte tokens of the text corpus"
            )
        data = {"source": "stdlib", "vocab_size": model.config.vocab_size}
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    data.update(block_size=base * factor, eval_batch_size=batch_size)
    if max_documents is not None:
        data["max_documents"] = max_documents
    datamodule = TextDataModule(**data)
    if datamodule.tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"length: the tokenizer has {datamodule.tokenizer.vocab_size} tokens, the model only {model.config.vocab_size}")
    datamodule.setup("test")
    if split not in datamodule.splits:
        raise ValueError(f"length: unknown split {split!r}; choose one of {', '.join(datamodule.splits)}")
    loader = torch.utils.data.DataLoader(datamodule.splits[split], batch_size=batch_size)
    model.to(device)
    total = base * factor
    loss_sum = torch.zeros(total, dtype=torch.float64)
    ends = list(range(piece, total + 1, piece))
    norm_sum = np.zeros((len(ends), len(model.blocks)))
    seen = 0
    bar = progress(loader, f"probe length (batches of {batch_size} sequences of {total} tokens)", -(-num_sequences // batch_size))
    for batch in bar:
        ids, labels = batch["input_ids"][: num_sequences - seen].to(device), batch["labels"][: num_sequences - seen].to(device)
        cache = model.init_cache(ids.shape[0])
        for j, end in enumerate(ends):
            logits = model(ids[:, end - piece : end], cache=cache).float()
            loss_sum[end - piece : end] += (
                F.cross_entropy(logits.transpose(1, 2), labels[:, end - piece : end], reduction="none").double().sum(0).cpu()
            )
            norm_sum[j] += np.asarray(state_norms(cache)) * ids.shape[0]
        seen += ids.shape[0]
        if seen >= num_sequences:
            break
    bar.close()  # the loop can stop early: clear the bar before the table is printed
    if seen == 0:
        raise ValueError(f"length: the {split} split holds no block of {total} tokens")
    per_position = (loss_sum / seen).tolist()
    norms = norm_sum / seen
    rows = []
    for k in range(1, factor + 1):
        row = {"span": f"{(k - 1) * base + 1}-{k * base}", "x_train": k, "loss": float(np.mean(per_position[(k - 1) * base : k * base]))}
        j = ends.index(k * base)
        for layer, value in enumerate(norms[j]):
            row[f"state_norm_L{layer}"] = float(value)
        rows.append(row)
    smooth = max(1, base // 8)

    def plot(ax):
        left, right = _two_panels(ax)
        curve = np.convolve(per_position, np.ones(smooth) / smooth, mode="valid")
        left.plot(np.arange(smooth, total + 1), curve)
        left.axvline(base, color="gray", ls="--", label="training length")
        left.set_xlabel("position")
        left.set_ylabel(f"loss (nats, mean over {smooth})")
        left.legend()
        left.grid(alpha=0.3)
        for layer in range(norms.shape[1]):
            right.plot(ends, norms[:, layer], marker=".", label=f"layer {layer} ({model.config.layer_mixers()[layer]})")
        right.axvline(base, color="gray", ls="--")
        right.set_yscale("log")
        right.set_xlabel("position")
        right.set_ylabel("state norm")
        right.legend(fontsize=7)
        right.grid(alpha=0.3)

    payload = {
        "checkpoint": str(checkpoint),
        "train_length": base,
        "factor": factor,
        "sequences": seen,
        "split": split,
        "piece": piece,
        "loss_per_position": per_position,
        "state_norm_positions": ends,
        "state_norms": norms.tolist(),
    }
    columns = ["span", "x_train", "loss", *[f"state_norm_L{i}" for i in range(norms.shape[1])]]
    write_report(out_dir, "length", payload, rows, columns, plot, title=f"Length extrapolation (trained at {base})")
    return {**payload, "rows": rows}


# ---------------------------------------------------------------- decode cost


def _decode_models(
    checkpoints: Sequence[str],
    mixers: Sequence[str],
    hidden: int,
    layers: int,
    vocab: int,
    options: dict[str, dict[str, Any]],
    device: torch.device,
    dtype: torch.dtype,
):
    """``(name, model)`` pairs: checkpoints (named by run folder) then fresh models of registered mixers."""
    for path in checkpoints:
        model, _ = load_language_model(path, device)
        p = Path(path)
        name = p.parent.parent.name if p.parent.name == "checkpoints" else p.stem
        yield name, model.to(device=device, dtype=dtype)
    for mixer in mixers:
        torch.manual_seed(0)
        spec = {
            "vocab_size": vocab,
            "hidden_size": hidden,
            "num_layers": layers,
            "pattern": [mixer],
            "mixers": {mixer: options[mixer]} if mixer in options else {},
        }
        yield mixer, LanguageModel(spec).to(device=device, dtype=dtype).eval()


@torch.no_grad()
def decode_probe(
    out_dir: str | Path,
    checkpoints: Sequence[str] = (),
    mixers: Sequence[str] = (),
    contexts: Sequence[int] = DEFAULT_CONTEXTS,
    decode_tokens: int = 16,
    hidden: int = 128,
    layers: int = 2,
    vocab: int = 256,
    options: dict[str, dict[str, Any]] | None = None,
    prefill_chunk: int = 2048,
    batch: int = 1,
    device: str = "cpu",
    dtype: str = "float32",
) -> list[dict[str, Any]]:
    """Per-token decode latency and cache bytes after prompts of ``contexts`` tokens; writes ``decode.*``.

    Each model prefills a random prompt through its cache in chunks of ``prefill_chunk`` tokens (so
    attention's prefill memory stays bounded), then decodes one warm-up token and ``decode_tokens``
    timed tokens; the row holds the median step time, the cache bytes right after the prompt and
    the mixers' own ``state_size`` prediction.
    """
    if not checkpoints and not mixers:
        raise ValueError("decode: name at least one checkpoint or mixer")
    if decode_tokens < 1 or prefill_chunk < 1 or batch < 1:
        raise ValueError("decode: decode_tokens, prefill_chunk and batch must be positive")
    dev, dt = torch.device(device), getattr(torch, dtype)
    rows = []
    names = []
    for name, model in _decode_models(checkpoints, mixers, hidden, layers, vocab, options or {}, dev, dt):
        names.append(name)
        for context in progress(contexts, f"probe decode {name} (prompt lengths)"):
            gen = torch.Generator().manual_seed(context)
            ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=gen).to(dev)
            cache = model.init_cache(batch)
            sync(dev)
            start = time.perf_counter()
            for s in range(0, context, prefill_chunk):
                logits = model(ids[:, s : s + prefill_chunk], cache=cache)
            sync(dev)
            prefill_s = time.perf_counter() - start
            cache_bytes = cache.nbytes()
            token = logits[:, -1:].argmax(-1)
            steps = []
            for step in range(decode_tokens + 1):
                start = time.perf_counter()
                token = model(token, cache=cache)[:, -1:].argmax(-1)
                sync(dev)
                if step:  # the first step pays one-off costs (allocations, kernel selection)
                    steps.append(time.perf_counter() - start)
            ms = statistics.median(steps) * 1e3
            rows.append(
                {
                    "model": name,
                    "context": context,
                    "ms_per_token": ms,
                    "tokens_per_s": batch * 1e3 / ms,
                    "prefill_s": prefill_s,
                    "cache_bytes": cache_bytes,
                    "state_size": model.state_size(batch=batch, seq_len=context),
                }
            )
        del model

    def plot(ax):
        left, right = _two_panels(ax)
        for name in names:
            pts = [r for r in rows if r["model"] == name]
            left.plot([r["context"] for r in pts], [r["ms_per_token"] for r in pts], marker="o", label=name)
            right.plot([r["context"] for r in pts], [max(1, r["cache_bytes"]) for r in pts], marker="o", label=name)
        for panel, label in ((left, "ms per decoded token"), (right, "cache bytes after the prompt")):
            panel.set_xscale("log", base=2)
            panel.set_xlabel("prompt length (tokens)")
            panel.set_ylabel(label)
            panel.grid(alpha=0.3)
        left.set_yscale("log")
        right.set_yscale("log", base=2)
        left.legend(fontsize=7)

    settings = {
        "batch": batch,
        "decode_tokens": decode_tokens,
        "prefill_chunk": prefill_chunk,
        "hidden": hidden,
        "layers": layers,
        "vocab": vocab,
        "device": device,
        "dtype": dtype,
        "torch": torch.__version__,
    }
    columns = ["model", "context", "ms_per_token", "tokens_per_s", "prefill_s", "cache_bytes", "state_size"]
    write_report(
        out_dir, "decode", {"settings": settings}, rows, columns, plot, title=f"Decode cost vs context ({device}, {dtype}, batch {batch})"
    )
    return rows
