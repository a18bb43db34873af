"""Hugging Face hand-offs of ``seqzoo-eval``: ``export`` (a training checkpoint to an HF directory), ``lm-eval``
(lm-evaluation-harness on an exported directory) and ``convert-fla`` (an fla-hub checkpoint to seqzoo)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import torch

from seqzoo.eval.report import write_report


def checkpoint_tokenizer(config: dict[str, Any], vocab_size: int):
    """The HF tokenizer of a training run: its text data's ``tokenizer`` (``byte`` or a local ``tokenizer.json``),
    the byte tokenizer for byte-level tasks (needle in a haystack: vocabulary 257), ``None`` for synthetic token
    tasks (MQAR) whose ids are no text."""
    from seqzoo.data.text import ByteTokenizer, hf_tokenizer

    data = config.get("data", {}) or {}
    if "tokenizer" in data:
        return hf_tokenizer(data["tokenizer"])
    if vocab_size == ByteTokenizer.vocab_size and str(data.get("_target_", "")).endswith("NIAHDataModule"):
        return hf_tokenizer("byte")
    return None


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Write the model of a Lightning checkpoint as an HF directory: ``config.json``, ``model.safetensors``,
    ``generation_config.json``, the run's tokenizer (see :func:`checkpoint_tokenizer`) and ``modeling_seqzoo.py``.

    Checks that the exported model's logits equal the checkpoint's on a few tokens before returning
    ``{"out_dir", "tokenizer", "max_abs_diff", ...}``; prints the files written.
    """
    from seqzoo.models.hf import SeqzooForCausalLM, save_hf_directory
    from seqzoo.training.checkpoint import load_language_model

    model, config = load_language_model(checkpoint)
    tokenizer = checkpoint_tokenizer(config, model.config.vocab_size)
    out_dir = save_hf_directory(model, out_dir, tokenizer=tokenizer)
    loaded = SeqzooForCausalLM.from_pretrained(out_dir).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (loaded(ids).logits - model(ids)).abs().max().item()
    if diff != 0.0:
        raise ValueError(f"export: the exported model's logits differ from the checkpoint's by {diff:.3g}")
    for path in sorted(out_dir.iterdir()):
        print(f"wrote {path}")
    note = "" if tokenizer is not None else " (no tokenizer: the run's token ids are not text)"
    print(f"export: {checkpoint} -> {out_dir}{note}; logits equal the checkpoint's")
    return {"out_dir": str(out_dir), "tokenizer": tokenizer is not None, "max_abs_diff": diff}


def lm_eval_report(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    tasks: list[str],
    include_path: list[str] | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    num_fewshot: int | None = None,
) -> dict[str, Any]:
    """Run lm-evaluation-harness's ``hf`` model on an exported directory and write ``lm_eval.json`` / ``.md`` / ``.png``.

    ``tasks``: lm-eval task names; seqzoo's local tasks (``seqzoo_text``, ``seqzoo_choice``,
    :mod:`seqzoo.eval.lm_eval_tasks`) are always on the include path, ``include_path`` adds more folders.
    The model loads through ``AutoModelForCausalLM`` exactly as ``lm_eval --model hf`` loads it (seqzoo is
    imported here, so no ``trust_remote_code`` is needed). Returns ``{"results": {task: {metric: value}}, "rows": …}``.
    """
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError("lm-eval: lm-evaluation-harness is not installed (pip install lm-eval)") from None
    import seqzoo.models.hf  # noqa: F401  (registers the Auto classes)
    from seqzoo.eval.lm_eval_tasks import TASKS_DIR

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"lm-eval: {model_dir} is not an HF model directory (no config.json); `seqzoo-eval export` makes one")
    # Indexing lm-eval's thousands of built-in task files takes most of a small run: only when a task needs them.
    own = {p.stem for folder in [TASKS_DIR, *(include_path or [])] for p in Path(folder).rglob("*.yaml")}
    manager = TaskManager(include_path=[str(TASKS_DIR), *(include_path or [])], include_defaults=not set(tasks) <= own)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"lm-eval: unknown task(s) {', '.join(unknown)} (seqzoo's local tasks: seqzoo_text, seqzoo_choice)")
    print(f"lm-eval: {', '.join(tasks)} on {model_dir}", file=sys.stderr, flush=True)
    output = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": "float32"},
        tasks=tasks,
        task_manager=manager,
        batch_size=batch_size,
        device=device,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=False,
        bootstrap_iters=0,
    )
    results = {task: {k: v for k, v in values.items() if k != "alias"} for task, values in output["results"].items()}
    rows = []
    for task, values in results.items():
        for key, value in values.items():
            metric, _, _filter = key.partition(",")
            if metric.endswith("_stderr") or metric == "sample_len" or not isinstance(value, (int, float)):
                continue
            stderr = values.get(f"{metric}_stderr,{_filter}")
            rows.append(
                {"task": task, "metric": metric, "value": float(value), "stderr": stderr if isinstance(stderr, (int, float)) else None}
            )

    def plot(ax):
        labels = [f"{r['task']}\n{r['metric']}" for r in rows]
        values = [r["value"] for r in rows]
        ax.bar(range(len(rows)), [v if math.isfinite(v) else 0.0 for v in values])
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_yscale("log" if any(v > 10 for v in values) else "linear")
        ax.set_ylabel("value")
        ax.grid(alpha=0.3, axis="y")

    write_report(
        out_dir,
        "lm_eval",
        {"model": str(model_dir), "tasks": tasks, "limit": limit, "results": results},
        rows,
        ["task", "metric", "value", "stderr"],
        plot,
        title=f"lm-evaluation-harness on {model_dir.name}",
    )
    return {"results": results, "rows": rows}
