"""``seqzoo-eval mqar-sweep``: the recall–memory trade-off of Zoology / Based (Zoology's recall-vs-state-size figure).

For every named model config (and width), train on an MQAR data config with the repository's
``seqzoo.training.run`` (what ``python train.py`` runs, with the config groups installed in ``seqzoo.configs``), take the test accuracy per segment from that run's own test stage, and measure the state
the model carries at the longest test length (``LanguageModel.state_size``, bytes). The result is
``mqar_sweep.json`` / ``.md`` / ``.png`` (accuracy against state bytes, log x axis, as in Zoology's plot).

The published sweep trains for 32 epochs on 180k examples; on a CPU the same mixture is scaled down with
``steps``, ``train_examples_scale`` and ``max_seq_len`` (segments longer than it are dropped).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from seqzoo.eval.report import write_report

_CMD = "mqar-sweep"


def _scaled(segments: Sequence[Any], scale: float | None, max_seq_len: int | None, examples: int | None) -> list[dict[str, int]]:
    """Segments as plain dicts, those longer than ``max_seq_len`` dropped, example counts scaled or replaced."""
    out = []
    for seg in segments:
        seg = {k: int(v) for k, v in dict(seg).items()}
        if max_seq_len is not None and seg["seq_len"] > max_seq_len:
            continue
        if examples is not None:
            seg["num_examples"] = examples
        elif scale is not None:
            seg["num_examples"] = max(1, math.ceil(seg["num_examples"] * scale))
        out.append(seg)
    return out


def _segment_name(seg: dict[str, int]) -> str:
    return f"seq{seg['seq_len']}_kv{seg['num_kv_pairs']}"


def mqar_sweep(
    models: Sequence[str],
    out_dir: str | Path,
    widths: Sequence[int] | None = None,
    data: str = "mqar_zoology",
    steps: int = 300,
    train_examples_scale: float = 0.1,
    max_seq_len: int | None = 256,
    test_examples: int | None = None,
    batch_size: int | None = None,
    lrs: Sequence[float] | None = None,
    overrides: Sequence[str] = (),
    device: str = "cpu",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Train and test every ``model`` (× ``width``) on MQAR; one row per run with accuracy and state bytes.

    Args:
        models: model config names under ``configs/model/`` (``attention``, ``gated_deltanet``, …).
        out_dir: where ``mqar_sweep.{json,md,png}`` and one training folder per run (``runs/``) go.
        widths: ``hidden_size`` values to sweep; ``None`` keeps each config's own.
        data: MQAR data config name under ``configs/data/`` (a ``.yaml`` path is reduced to its stem).
        steps: optimizer steps per run.
        train_examples_scale: multiplies every training segment's ``num_examples``.
        max_seq_len: drop train and test segments longer than this (``None`` keeps all).
        test_examples: examples per test segment (default: the config's).
        batch_size: training batch size (default: the config's).
        lrs: AdamW learning rates to try per model and width; the row keeps the best test accuracy, as
            Zoology reports the max over its learning rates (default: the config's one rate).
        overrides: extra Hydra overrides applied to every run (``model.num_layers=2`` …), before the scaling.
        device: ``"cpu"`` or ``"cuda"`` (the Lightning accelerator).
        seed: run seed (data and init).

    Returns the rows written to ``mqar_sweep.json``: ``model``, ``hidden_size``, ``params``, ``state_bytes``
    (at ``test_seq_len``), ``accuracy`` (pooled over the test mixture, Zoology's ``valid/accuracy``),
    ``acc/<segment>``, ``lr`` (the best one), ``steps``, ``train_examples``, ``wall_s`` (summed over the
    learning rates tried), ``note`` (``"diverged: …"`` when the training loss became NaN or Inf, or an op refused NaN/Inf in
    checking mode; its
    accuracies are then NaN and the sweep goes on). The JSON also keeps every run in ``runs`` (one entry per learning rate).
    """
    if not models:
        raise ValueError(f"{_CMD}: name at least one model config")
    if steps < 1:
        raise ValueError(f"{_CMD}: --steps must be >= 1, got {steps}")
    if not train_examples_scale > 0:
        raise ValueError(f"{_CMD}: --train-examples-scale must be > 0, got {train_examples_scale}")
    if lrs is not None and (not lrs or any(not lr > 0 for lr in lrs)):
        raise ValueError(f"{_CMD}: learning rates must be > 0, got {list(lrs)}")
    if widths is not None and any(w < 1 for w in widths):
        raise ValueError(f"{_CMD}: widths must be positive, got {list(widths)}")
    from seqzoo.configs import ConfigError, config_names
    from seqzoo.training import compose, run

    known = config_names("model")
    unknown = [m for m in models if m not in known]
    if unknown:
        raise ValueError(f"{_CMD}: unknown model config(s) {', '.join(unknown)}; known: {', '.join(known)}")
    data = Path(data).stem if data.endswith(".yaml") else data
    if data not in config_names("data"):
        raise ValueError(f"{_CMD}: unknown data config {data!r}; known: {', '.join(config_names('data'))}")

    from omegaconf import OmegaConf

    from seqzoo.models import LanguageModel
    from seqzoo.ops.core import OpInputError

    out_dir = Path(out_dir)
    rows: list[dict[str, Any]] = []
    all_runs: list[dict[str, Any]] = []
    segments_used: dict[str, Any] = {}
    total_runs, run_number = len(models) * len(widths or [None]) * len(lrs or [None]), 0
    for name in models:
        for width in widths or [None]:
            tried: list[dict[str, Any]] = []
            for lr in lrs or [None]:
                run_number += 1
                run_overrides = [
                    f"model={name}",
                    f"data={data}",
                    f"seed={seed}",
                    f"trainer.max_steps={steps}",
                    "trainer.enable_progress_bar=false",
                    "trainer.limit_val_batches=0",
                    f"trainer.accelerator={'gpu' if device.startswith('cuda') else 'cpu'}",
                    f"checkpoint_every_n_steps={steps}",
                    "test_after_fit=true",
                    *overrides,
                ]
                if width is not None:
                    run_overrides.append(f"model.hidden_size={width}")
                if batch_size is not None:
                    run_overrides.append(f"data.batch_size={batch_size}")
                if lr is not None:
                    run_overrides.append(f"optim.lr={lr}")
                try:
                    cfg = compose(run_overrides)
                except ConfigError as exc:
                    raise ConfigError(f"{_CMD}: {exc}") from None
                if "test_segments" not in cfg.data:
                    raise ValueError(f"{_CMD}: data config {data!r} is not an MQAR config (no test_segments)")
                train_segments = _scaled(cfg.data.train_segments, train_examples_scale, max_seq_len, None)
                test_segments = _scaled(cfg.data.test_segments, None, max_seq_len, test_examples)
                if not train_segments or not test_segments:
                    raise ValueError(f"{_CMD}: no train or test segment is at most --max-seq-len {max_seq_len} long")
                cfg.data.train_segments = train_segments
                cfg.data.test_segments = test_segments
                segments_used = {"train": train_segments, "test": test_segments}
                test_len = max(s["seq_len"] for s in test_segments)

                label = name if width is None else f"{name}_d{width}"
                if lrs is not None and len(lrs) > 1:
                    label += f"_lr{lr:g}"
                # Each run trains without a progress bar: one line per run says how far the sweep is.
                print(f"{_CMD}: run {run_number}/{total_runs}: {label} ({steps} steps)", file=sys.stderr, flush=True)
                start = time.perf_counter()
                note = ""
                try:
                    result = run(cfg, out_dir / "runs" / label)
                except OpInputError as exc:
                    # An op refusing NaN/Inf mid-training (in checking mode) means this run diverged: a result,
                    # not a reason to lose the rest of the sweep.
                    result, note = {}, f"diverged: {exc}"
                bad = next(((step, loss) for step, loss in result.get("losses", []) if not math.isfinite(loss)), None)
                if bad is not None:
                    # Outside checking mode a diverged run trains on with a NaN loss: the same verdict.
                    result, note = {}, f"diverged: the training loss became {bad[1]} at step {bad[0]}"
                wall = time.perf_counter() - start

                model = LanguageModel(OmegaConf.to_container(cfg.model, resolve=True))
                test = result.get("test", {})
                row: dict[str, Any] = {
                    "model": name,
                    "hidden_size": int(cfg.model.hidden_size),
                    "params": model.num_parameters(),
                    "state_bytes": int(model.state_size(batch=1, seq_len=test_len)),
                    "accuracy": float(test.get("test/acc", float("nan"))),
                }
                for seg in test_segments:
                    key = f"test/acc/{_segment_name(seg)}"
                    row[f"acc/{_segment_name(seg)}"] = float(test[key] if key in test else test.get("test/acc", float("nan")))
                row.update(
                    {
                        "lr": float(cfg.optim.lr),
                        "steps": steps,
                        "train_examples": sum(s["num_examples"] for s in train_segments),
                        "wall_s": round(wall, 2),
                        "note": note,
                    }
                )
                tried.append(row)
            all_runs.extend(tried)
            # A diverged run has NaN accuracy; it never wins.
            best = max(tried, key=lambda r: -1.0 if math.isnan(r["accuracy"]) else r["accuracy"])
            rows.append({**best, "wall_s": round(sum(r["wall_s"] for r in tried), 2)})

    seg_columns = [f"acc/{_segment_name(s)}" for s in segments_used["test"]]
    columns = ["model", "hidden_size", "params", "state_bytes", "accuracy", *seg_columns, "lr", "steps", "train_examples", "wall_s", "note"]
    payload = {
        "data": data,
        "steps": steps,
        "train_examples_scale": train_examples_scale,
        "max_seq_len": max_seq_len,
        "test_seq_len": max(s["seq_len"] for s in segments_used["test"]),
        "segments": segments_used,
        "overrides": list(overrides),
        "device": device,
        "seed": seed,
        "lrs": None if lrs is None else [float(lr) for lr in lrs],
        "runs": all_runs,
    }

    def plot(ax):
        for name in models:
            points = sorted((r["state_bytes"], r["accuracy"]) for r in rows if r["model"] == name)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        ax.set_xscale("log", base=2)  # the Based/Zoology plot labels its state axis in powers of two
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(f"state size (bytes; at seq_len {payload['test_seq_len']})")
        ax.set_ylabel("MQAR accuracy (test mixture)")
        ax.grid(alpha=0.3, which="both")
        ax.legend()

    write_report(out_dir, "mqar_sweep", payload, rows, columns, plot, title="MQAR: recall vs state size")
    return rows
