"""``seqzoo-eval bench loss`` (chunked against plain cross-entropy through the head) and ``bench generate`` (HF
``generate`` against ``LanguageModel.generate``): side by side in one run, the baseline measured each time."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from seqzoo.eval.measure import peak_memory, time_call
from seqzoo.eval.report import progress, write_report


def bench_loss(out_dir: str, vocabs: list[int], hidden: int, tokens: int, device: str = "cpu", repeats: int = 3) -> list[dict[str, Any]]:
    """Forward + backward of the head and cross-entropy for ``tokens`` rows of width ``hidden``: the plain
    ``F.cross_entropy(F.linear(h, W).float(), y)`` against :func:`~seqzoo.models.losses.linear_cross_entropy`, per
    vocabulary. Rows: tokens/s and peak memory of each, their ratios, and the loss difference. Writes
    ``bench_loss.json`` / ``.md`` / ``.png``."""
    from seqzoo.models.losses import chunk_rows_for, linear_cross_entropy

    dev = torch.device(device)
    rows = []
    for vocab in progress(vocabs, "bench loss"):
        g = torch.Generator().manual_seed(0)
        h = (torch.randn(tokens, hidden, generator=g) * 0.5).to(dev).requires_grad_()
        w = (torch.randn(vocab, hidden, generator=g) * 0.02).to(dev).requires_grad_()
        y = torch.randint(0, vocab, (tokens,), generator=g).to(dev)

        def plain():
            loss = F.cross_entropy(F.linear(h, w).float(), y)
            loss.backward()
            h.grad = w.grad = None
            return loss

        def chunked():
            loss = linear_cross_entropy(h, w, y)[0]
            loss.backward()
            h.grad = w.grad = None
            return loss

        row: dict[str, Any] = {"vocab": vocab, "hidden": hidden, "tokens": tokens, "chunk_rows": chunk_rows_for(vocab)}
        for name, fn in (("plain", plain), ("chunked", chunked)):
            seconds = time_call(fn, dev, warmup=1, repeats=repeats)
            row[f"{name}_tok_s"] = tokens / seconds
            row[f"{name}_peak_MiB"] = peak_memory(fn, dev) / 2**20
        row["speed_ratio"] = row["chunked_tok_s"] / row["plain_tok_s"]
        row["memory_ratio"] = row["chunked_peak_MiB"] / row["plain_peak_MiB"]
        with torch.no_grad():
            reference = F.cross_entropy(F.linear(h, w).float(), y)
            row["loss_abs_diff"] = abs(float(reference) - float(linear_cross_entropy(h, w, y)[0]))
        rows.append(row)

    def plot(ax):
        ax.plot(vocabs, [r["plain_peak_MiB"] for r in rows], "o-", label="plain: peak MiB")
        ax.plot(vocabs, [r["chunked_peak_MiB"] for r in rows], "s-", label="chunked: peak MiB")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("vocabulary")
        ax.set_ylabel("peak memory of fwd+bwd (MiB)")
        ax.legend()
        ax.grid(alpha=0.3)

    columns = [
        "vocab",
        "tokens",
        "plain_tok_s",
        "chunked_tok_s",
        "speed_ratio",
        "plain_peak_MiB",
        "chunked_peak_MiB",
        "memory_ratio",
        "loss_abs_diff",
    ]
    write_report(out_dir, "bench_loss", {"device": device, "repeats": repeats}, rows, columns, plot,
                 title=f"Cross-entropy through the head, fwd+bwd, {tokens} tokens, hidden {hidden} ({device})")  # fmt: skip
    return rows


def bench_generate(
    out_dir: str,
    mixers: list[str],
    contexts: list[int],
    new_tokens: int = 32,
    hidden: int = 128,
    layers: int = 2,
    vocab: int = 256,
    batch: int = 1,
    options: dict[str, dict[str, Any]] | None = None,
    device: str = "cpu",
    repeats: int = 3,
) -> list[dict[str, Any]]:
    """Greedy decoding of ``new_tokens`` after a prompt of each context length: HF ``generate`` on
    :class:`~seqzoo.models.hf.SeqzooForCausalLM` against :meth:`LanguageModel.generate` on the same weights (prefill
    included in both). Rows: tokens/s of each and their ratio; the outputs are checked equal. Writes
    ``bench_generate.json`` / ``.md`` / ``.png``."""
    from seqzoo.models import LanguageModel
    from seqzoo.models.hf import SeqzooForCausalLM

    dev = torch.device(device)
    rows = []
    for mixer in progress(mixers, "bench generate"):
        torch.manual_seed(0)
        mixer_options = (options or {}).get(mixer, {})
        model = LanguageModel({"vocab_size": vocab, "hidden_size": hidden, "num_layers": layers, "pattern": [mixer],
                               "mixers": {mixer: mixer_options} if mixer_options else {}, "mlp": "swiglu"}).to(dev).eval()  # fmt: skip
        hf = SeqzooForCausalLM.from_language_model(model)
        for context in contexts:
            prompt = torch.randint(0, vocab, (batch, context), generator=torch.Generator().manual_seed(1)).to(dev)
            # An explicit all-ones mask: without one HF infers it from ``prompt != pad_token_id``, and a random prompt
            # that contains the pad id would read as a padded row with holes.
            hf_kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
            ours_out = model.generate(prompt, max_new_tokens=new_tokens, temperature=0)
            hf_out = hf.generate(prompt, **hf_kwargs)
            ours_s = time_call(lambda: model.generate(prompt, max_new_tokens=new_tokens, temperature=0), dev, warmup=1, repeats=repeats)
            hf_s = time_call(lambda: hf.generate(prompt, **hf_kwargs), dev, warmup=1, repeats=repeats)
            rows.append({"mixer": mixer, "context": context, "new_tokens": new_tokens, "batch": batch,
                         "seqzoo_tok_s": batch * new_tokens / ours_s, "hf_tok_s": batch * new_tokens / hf_s,
                         "hf_over_seqzoo": ours_s / hf_s, "same_tokens": bool(torch.equal(ours_out, hf_out))})  # fmt: skip

    def plot(ax):
        for mixer in mixers:
            mine = [r for r in rows if r["mixer"] == mixer]
            ax.plot([r["context"] for r in mine], [r["seqzoo_tok_s"] for r in mine], "o-", label=f"{mixer}: LanguageModel.generate")
            ax.plot([r["context"] for r in mine], [r["hf_tok_s"] for r in mine], "s--", label=f"{mixer}: HF generate")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("generated tokens/s (prefill included)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)

    columns = ["mixer", "context", "new_tokens", "seqzoo_tok_s", "hf_tok_s", "hf_over_seqzoo", "same_tokens"]
    write_report(out_dir, "bench_generate", {"device": device, "hidden": hidden, "layers": layers, "repeats": repeats}, rows, columns, plot,
                 title=f"HF generate vs LanguageModel.generate, greedy, {new_tokens} new tokens ({device})")  # fmt: skip
    return rows
