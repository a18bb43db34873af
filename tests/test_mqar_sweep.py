"""``seqzoo-eval mqar-sweep``: a tiny two-model sweep; JSON == printed table, state bytes == LanguageModel.state_size."""

import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import seqzoo.training
from seqzoo.eval.cli import main
from seqzoo.eval.report import format_value
from seqzoo.models import LanguageModel

ROOT = Path(__file__).resolve().parents[1]

# Tiny MQAR: the mqar config's segments replaced, then scaled by the sweep's own options.
TINY = [
    "data.vocab_size=64",
    "data.train_segments=[{seq_len:16,num_kv_pairs:2,num_examples:32},{seq_len:64,num_kv_pairs:4,num_examples:32}]",
    "data.test_segments=[{seq_len:16,num_kv_pairs:2,num_examples:8},{seq_len:32,num_kv_pairs:4,num_examples:8},{seq_len:64,num_kv_pairs:8,num_examples:8}]",
    "data.eval_batch_size=8",
    "trainer.log_every_n_steps=1",
]


def parse_table(text):
    """Rows of the first markdown table in ``text`` as dicts of strings."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_tiny_sweep_writes_rows_matching_the_table_and_state_bytes(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = [
        "mqar-sweep", "--models", "attention", "pararnn_gru", "--widths", "16", "--data", "mqar", "--steps", "2",
        "--train-examples-scale", "0.5", "--max-seq-len", "32", "--batch-size", "8",
        "--out", str(out), "--device", "cpu", "--override", *TINY,
    ]  # fmt: skip
    assert main(argv) == 0
    printed = parse_table(capsys.readouterr().out)
    report = json.loads((out / "mqar_sweep.json").read_text())
    rows = report["rows"]
    assert [r["model"] for r in rows] == ["attention", "pararnn_gru"]
    assert len(printed) == len(rows)
    for shown, row in zip(printed, rows):
        assert shown == {k: format_value(v) for k, v in row.items()}
    assert (out / "mqar_sweep.md").read_text().count("\n| ") == 4 and (out / "mqar_sweep.png").stat().st_size > 0

    # max_seq_len 32 dropped the 64-token segments; the training set was halved.
    assert report["test_seq_len"] == 32
    assert [s["seq_len"] for s in report["segments"]["test"]] == [16, 32]
    assert [s["num_examples"] for s in report["segments"]["train"]] == [16]
    for row in rows:
        assert row["steps"] == 2 and row["train_examples"] == 16 and row["hidden_size"] == 16
        assert {"acc/seq16_kv2", "acc/seq32_kv4"} <= set(row) and 0.0 <= row["accuracy"] <= 1.0
        results = json.loads((out / "runs" / f"{row['model']}_d16" / "results.json").read_text())["test"]
        assert row["accuracy"] == pytest.approx(results["test/acc"])
        assert row["acc/seq32_kv4"] == pytest.approx(results["test/acc/seq32_kv4"])

    # State bytes: the KV cache at the test length for attention, the constant recurrent state for ParaGRU.
    for row in rows:
        cfg = seqzoo.training.compose([f"model={row['model']}", "model.hidden_size=16", "data.vocab_size=64"])
        model = LanguageModel(OmegaConf.to_container(cfg.model, resolve=True))
        assert row["state_bytes"] == model.state_size(batch=1, seq_len=32)
        assert row["params"] == model.num_parameters()
    attention = rows[0]["state_bytes"]
    assert attention == 2 * 2 * 32 * 16 * 4  # layers · (K, V) · seq · width · fp32
    assert rows[1]["state_bytes"] == 2 * (16 + 3 * 16) * 4  # layers · (h + conv tail) · fp32


def test_bad_model_name_is_one_line(tmp_path, capsys):
    assert main(["mqar-sweep", "--models", "attention", "nope", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown model config(s) nope; known: " in err and "attention" in err
    assert not (tmp_path / "mqar_sweep.json").exists()


def test_the_sweep_runs_outside_a_checkout(tmp_path, monkeypatch):
    # The config groups come with the package (seqzoo.configs), not from the working directory.
    monkeypatch.chdir(tmp_path)
    argv = ["mqar-sweep", "--models", "attention", "--widths", "16", "--data", "mqar", "--steps", "1",
            "--max-seq-len", "16", "--train-examples-scale", "1", "--batch-size", "8", "--out", "sweep", "--device", "cpu", "--override", *TINY]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((tmp_path / "sweep" / "mqar_sweep.json").read_text())["rows"][0]["model"] == "attention"
    assert not (tmp_path / "configs").exists()


def test_several_learning_rates_keep_the_best_run(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = [
        "mqar-sweep", "--models", "attention", "--widths", "16", "--data", "mqar", "--steps", "3", "--lr", "1e-4", "3e-2", "--train-examples-scale", "0.5",
        "--max-seq-len", "32", "--batch-size", "8", "--out", str(out), "--device", "cpu",
        "--override", *TINY,
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "mqar_sweep.json").read_text())
    runs, (row,) = report["runs"], report["rows"]
    assert report["lrs"] == [1e-4, 3e-2] and [r["lr"] for r in runs] == [1e-4, 3e-2]
    # Each run's accuracy is the one its own training folder recorded; the row is the better of the two.
    for run in runs:
        results = json.loads((out / "runs" / f"attention_d16_lr{run['lr']:g}" / "results.json").read_text())["test"]
        assert run["accuracy"] == pytest.approx(results["test/acc"])
    best = max(runs, key=lambda r: r["accuracy"])
    assert row["lr"] == best["lr"] and row["accuracy"] == best["accuracy"]
    assert row["wall_s"] == pytest.approx(sum(r["wall_s"] for r in runs), abs=0.02)
    assert parse_table(capsys.readouterr().out)[0]["lr"] == format_value(best["lr"])


def test_non_positive_learning_rate_is_one_line(tmp_path, capsys):
    assert main(["mqar-sweep", "--models", "attention", "--lr", "0", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "learning rates must be > 0" in err


def test_a_diverged_run_is_a_nan_row_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    from seqzoo.ops.core import OpInputError

    real_run = seqzoo.training.run

    def run(cfg, output_dir):
        if cfg.model.pattern[0] == "attention":
            raise OpInputError("neural_memory: lr contains NaN or Inf")
        return real_run(cfg, output_dir)

    monkeypatch.setattr(seqzoo.training, "run", run)
    argv = [
        "mqar-sweep", "--models", "attention", "pararnn_gru", "--widths", "16", "--data", "mqar", "--steps", "2",
        "--train-examples-scale", "0.5", "--max-seq-len", "32", "--batch-size", "8",
        "--out", str(tmp_path), "--device", "cpu", "--override", *TINY,
    ]  # fmt: skip
    assert main(argv) == 0
    diverged, trained = json.loads((tmp_path / "mqar_sweep.json").read_text())["rows"]
    assert diverged["note"] == "diverged: neural_memory: lr contains NaN or Inf"
    assert math.isnan(diverged["accuracy"]) and math.isnan(diverged["acc/seq16_kv2"])
    assert trained["note"] == "" and 0.0 <= trained["accuracy"] <= 1.0


def test_a_nan_training_loss_marks_the_run_diverged(tmp_path, monkeypatch):
    # Outside checking mode no op raises on NaN: the loss history is what shows a diverged run.
    real_run = seqzoo.training.run

    def run(cfg, output_dir):
        result = real_run(cfg, output_dir)
        result["losses"] = [(1, 2.0), (2, float("nan"))]
        return result

    monkeypatch.setattr(seqzoo.training, "run", run)
    argv = [
        "mqar-sweep", "--models", "attention", "--widths", "16", "--data", "mqar", "--steps", "2",
        "--train-examples-scale", "0.5", "--max-seq-len", "32", "--batch-size", "8",
        "--out", str(tmp_path), "--device", "cpu", "--override", *TINY,
    ]  # fmt: skip
    assert main(argv) == 0
    (row,) = json.loads((tmp_path / "mqar_sweep.json").read_text())["rows"]
    assert row["note"] == "diverged: the training loss became nan at step 2" and math.isnan(row["accuracy"])
