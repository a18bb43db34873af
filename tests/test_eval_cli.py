"""The eval CLI on tiny checkpoints: its JSON holds the numbers it printed, and they agree with training."""

import json
import math
import os
import re
import time

import pytest
import torch

import seqzoo.training as training
from seqzoo.eval.cli import main
from seqzoo.eval.measure import peak_memory, time_call
from tests.helpers import texts_outside

COMMON = [
    "trainer.enable_progress_bar=false",
    "trainer.val_check_interval=4",
    "checkpoint_every_n_steps=4",
    "trainer.max_steps=4",
    "model.hidden_size=16",
]


def trained(tmp_path_factory, name, overrides):
    out = tmp_path_factory.mktemp(name)
    cfg = training.compose([*COMMON, *overrides])
    result = training.run(cfg, out)
    return out / "checkpoints" / "last.ckpt", result


@pytest.fixture(scope="module")
def mqar_run(tmp_path_factory):
    return trained(
        tmp_path_factory,
        "mqar",
        [
            "data.vocab_size=64",
            "data.train_segments=[{seq_len:16,num_kv_pairs:2,num_examples:64}]",
            "data.test_segments=[{seq_len:16,num_kv_pairs:2,num_examples:32},{seq_len:32,num_kv_pairs:4,num_examples:32}]",
            "data.batch_size=8",
        ],
    )


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    return trained(
        tmp_path_factory,
        "text",
        [
            "data=text",
            "data.max_documents=20",
            "data.block_size=32",
            "data.batch_size=4",
            "data.eval_batch_size=8",
            "data.eval_batches=3",
        ],
    )


def printed_rows(text):
    """Rows of the markdown table in ``text`` as lists of cell strings."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_mqar_command_matches_training_test_and_its_printout(mqar_run, tmp_path, capsys, saved_figures):
    checkpoint, result = mqar_run
    assert main(["mqar", str(checkpoint), "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "mqar.json").read_text())["rows"]
    printed = printed_rows(capsys.readouterr().out)
    assert [r[0] for r in printed] == ["seq16_kv2", "seq32_kv4"]
    for row, cells in zip(rows, printed):
        assert float(cells[-1]) == pytest.approx(row["accuracy"], abs=5e-4)
        assert row["accuracy"] == pytest.approx(result["test"][f"test/acc/{row['segment']}"], abs=1e-9)
    assert (tmp_path / "mqar.png").stat().st_size > 0 and (tmp_path / "mqar.md").is_file()
    (ax,) = saved_figures[0].axes
    assert ax.get_xlabel().startswith("test segment") and texts_outside(saved_figures[0]) == []  # it had no x label


def test_mqar_command_with_custom_segments(mqar_run, tmp_path):
    checkpoint, _ = mqar_run
    assert main(["mqar", str(checkpoint), "--segments", "16:2", "32:8", "--num-examples", "20", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "mqar.json").read_text())["rows"]
    assert [(r["seq_len"], r["num_kv_pairs"], r["examples"]) for r in rows] == [(16, 2, 20), (32, 8, 20)]


def test_mqar_segments_the_vocabulary_cannot_hold_are_one_line_before_any_work(mqar_run, tmp_path, capsys):
    checkpoint, _ = mqar_run  # vocabulary 64
    assert main(["mqar", str(checkpoint), "--segments", "16:2", "64:4", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "seqzoo-eval: error: mqar: segment 64:4 does not fit this model: vocab_size (64) must exceed seq_len (64); "
        "the longest sequence it holds is 62"
    )
    assert not (tmp_path / "mqar.json").exists()


def test_ppl_command_matches_training_test_loss(text_run, tmp_path, capsys, saved_figures):
    checkpoint, result = text_run
    # By default ppl reads the run's own evaluation budget (data.eval_batches=3), so it reproduces its test.
    assert main(["ppl", str(checkpoint), "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "ppl.json").read_text())
    captured = capsys.readouterr()
    cells = printed_rows(captured.out)[0]
    # It printed nothing for minutes before the table: now a bar with the batch count.
    assert re.search(r"ppl \(test split\):.*\b0/3\b", captured.err)
    assert float(cells[2]) == pytest.approx(payload["loss"], rel=1e-3)
    assert payload["loss"] == pytest.approx(result["test"]["test/loss"], rel=1e-5)
    assert payload["perplexity"] == pytest.approx(math.exp(payload["loss"]))
    # Byte tokens: one byte per token (end-of-document decodes to one newline byte).
    assert payload["bits_per_byte"] == pytest.approx(payload["loss"] / math.log(2), rel=1e-9)
    assert payload["tokens"] == 3 * 8 * 32
    assert len(payload["loss_per_position"]) == 32 and (tmp_path / "ppl.png").is_file()
    # The plot was titled "Perplexity" over a curve of loss in nats.
    (ax,) = saved_figures[0].axes
    title = saved_figures[0]._suptitle.get_text().replace("\n", " ")
    assert ax.get_ylabel() == "loss (nats)" and title.startswith("Loss by position in the block")
    assert f"perplexity {payload['perplexity']:.4g}" in title and texts_outside(saved_figures[0]) == []


def test_bench_command_puts_attention_beside_itself(tmp_path, capsys):
    assert (
        main(
            [
                "bench",
                "layers",
                "--mixers",
                "attention",
                "--seq-lens",
                "16",
                "32",
                "--hidden",
                "16",
                "--repeats",
                "1",
                "--decode-tokens",
                "2",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "bench_layers.json").read_text())["rows"]
    printed = printed_rows(capsys.readouterr().out)
    assert [(r["mixer"], r["seq_len"]) for r in rows] == [("attention", 16), ("attention", 32)]
    for row, cells in zip(rows, printed):
        assert row["fwd_bwd_vs_attention"] == 1.0 and row["fwd_tok_s"] > 0 and row["peak_mem_mb"] > 0
        assert float(cells[2]) == pytest.approx(row["fwd_tok_s"], rel=1e-3)
        assert row["state_bytes"] == 2 * row["seq_len"] * 16 * 4
    assert (tmp_path / "bench_layers.png").is_file()


def test_cpu_peak_memory_counts_live_tensors():
    def hold_ten():
        blocks = [torch.empty(1 << 18) for _ in range(10)]  # 10 MiB live at once
        return len(blocks)

    def one_at_a_time():
        for _ in range(10):
            torch.empty(1 << 18).fill_(1.0)

    assert peak_memory(hold_ten, torch.device("cpu")) >= 10 * 2**20
    assert peak_memory(one_at_a_time, torch.device("cpu")) < 3 * 2**20


class _LoopInsideOneOp(torch.autograd.Function):
    """Allocates and frees 1 MiB ten times inside one op, as a chunked custom Function does."""

    @staticmethod
    def forward(ctx, x):
        for _ in range(10):
            x = x + torch.ones(1 << 18).sum()
        return x


def test_cpu_peak_memory_sees_frees_inside_an_op():
    # Booking frees on the enclosing op (the profiler's per-op columns) would report 10 MiB here.
    assert peak_memory(lambda: _LoopInsideOneOp.apply(torch.zeros(4)), torch.device("cpu")) < 3 * 2**20


def test_time_call_gives_every_call_its_own_untimed_setup():
    made, used = [], []

    def setup() -> int:
        time.sleep(0.2)  # untimed: far above what appending to a list takes
        made.append(len(made))
        return made[-1]

    seconds = time_call(used.append, torch.device("cpu"), warmup=2, repeats=3, setup=setup)
    assert made == [0, 1, 2, 3, 4] and used == made  # one fresh state per call, warm-ups included
    assert seconds < 0.1


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["mqar", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"seqzoo-eval: error: checkpoint not found: .*missing\.ckpt", err)
    with pytest.raises(SystemExit):
        main(["mqar", "x.ckpt", "--segments", "64-4"])


def test_bench_ops_compares_backends_against_the_reference(tmp_path, capsys):
    argv = [
        "bench",
        "ops",
        "--ops",
        "simple_gla",
        "affine_scan",
        "--seq-lens",
        "16",
        "--batch",
        "1",
        "--heads",
        "2",
        "--head-dim",
        "8",
        "--repeats",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "bench_ops.json").read_text())["rows"]
    printed = printed_rows(capsys.readouterr().out)
    assert [(r["op"], r["impl"]) for r in rows] == [
        ("simple_gla", "ours reference"),
        ("simple_gla", "ours torch"),
        ("affine_scan", "ours reference"),
        ("affine_scan", "ours torch"),
    ]
    for row, cells in zip(rows, printed):
        assert float(cells[4]) == pytest.approx(row["fwd_bwd_tok_s"], rel=1e-3)
    assert [r["fwd_bwd_vs_reference"] for r in rows][::2] == [1.0, 1.0]
    assert main(["bench", "ops", "--ops", "warp_drive", "--out", str(tmp_path)]) == 1
    assert "unknown op(s) warp_drive" in capsys.readouterr().err


def test_bench_pararnn_times_both_modes_and_checks_they_agree(tmp_path, capsys, saved_figures):
    argv = ["bench", "pararnn", "--seq-lens", "8", "24", "--batch", "2", "--hidden", "8", "--max-iters", "24", "--repeats", "1",
            "--skip-sequential-above", "16", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "bench_pararnn.json").read_text())
    rows, printed = report["rows"], printed_rows(capsys.readouterr().out)
    assert [(r["cell"], r["seq_len"]) for r in rows] == [("gru", 8), ("gru", 24), ("lstm", 8), ("lstm", 24)]
    assert report["settings"]["batch"] == 2 and report["settings"]["hidden"] == 8
    # On CPU the fused mode is the compiled kernel; it runs and is checked like the others.
    assert report["settings"]["skipped"] == {} and report["settings"]["projection"] is True
    for row, cells in zip(rows, printed):
        assert float(cells[2]) == pytest.approx(row["par_fwd_s"], rel=1e-3)
        assert row["fused_par_diff"] < 1e-5
        if row["seq_len"] == 8:
            # max_iters >= seq: Newton is exact, so the modes agree to rounding; the ratios are of the same run's times.
            assert row["rel_err"] < 1e-5 and row["fused_rel_err"] < 1e-5
            assert row["fwd_bwd_speedup"] == pytest.approx(row["seq_fwd_bwd_s"] / row["par_fwd_bwd_s"])
            assert row["fused_fwd_bwd_speedup"] == pytest.approx(row["seq_fwd_bwd_s"] / row["fused_fwd_bwd_s"])
        else:  # beyond --skip-sequential-above: no sequential columns
            assert row["seq_fwd_s"] is None and row["rel_err"] is None and row["fused_fwd_bwd_speedup"] is None
    assert (tmp_path / "bench_pararnn.png").is_file()
    # The long title ran past both sides of the figure.
    assert texts_outside(saved_figures[0]) == [] and "ParaRNN" in saved_figures[0]._suptitle.get_text()
    assert "fused_fwd_bwd_speedup" in (tmp_path / "bench_pararnn.md").read_text()
    # The recurrence alone, on precomputed inputs: the same agreement checks.
    assert main([*argv[:-2], "--no-projection", "--modes", "parallel", "sequential", "fused", "--out", str(tmp_path / "rec")]) == 0
    report = json.loads((tmp_path / "rec" / "bench_pararnn.json").read_text())
    assert report["settings"]["projection"] is False
    assert all(r["rel_err"] < 1e-5 and r["fused_rel_err"] < 1e-5 for r in report["rows"] if r["seq_len"] == 8)
    assert main(["bench", "pararnn", "--batch", "0", "--out", str(tmp_path)]) == 1
    assert "must be >= 1" in capsys.readouterr().err


def test_text_evaluation_reads_its_budget_spread_over_the_split(text_run, tmp_path):
    # A 60-step data=text run spent 2 min 37 s on a 130-batch test pass; the budget is a data option.
    assert training.compose(["data=text"]).data.eval_batches == 20
    checkpoint, _ = text_run
    datamodule = training.build_datamodule(training.compose(["data=text", "data.max_documents=20", "data.block_size=32"]))
    datamodule.setup("test")
    full = len(datamodule.splits["test"])
    budget = datamodule.eval_split("test", 2)
    assert len(budget) == 2 * 16 < full and budget.indices[0] == 0 and budget.indices[-1] > full // 2
    assert len(datamodule.test_dataloader()) == min(20, -(-full // 16))
    assert main(["ppl", str(checkpoint), "--max-batches", "0", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "ppl.json").read_text())["tokens"] == full * 32
    with pytest.raises(ValueError, match="eval_batches must be a positive integer or null"):
        training.build_datamodule(training.compose(["data=text", "data.eval_batches=0"]))


def test_ppl_on_an_mqar_checkpoint_says_it_is_not_a_text_checkpoint(mqar_run, tmp_path, capsys):
    checkpoint, _ = mqar_run
    assert main(["ppl", str(checkpoint), "--out", str(tmp_path)]) == 1
    # It said "tokenizer has 257 tokens but vocab_size is 256"; mqar on a text checkpoint names the mismatch.
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"seqzoo-eval: error: ppl: \S+last\.ckpt is not a text checkpoint \(trained on MQARDataModule\).*", err)


def test_cpu_peak_memory_passes_stderr_on_without_the_profiler_chatter(capfd):
    # Every profiled call printed kineto's "USDT: … profiler_start/stop" (25 lines for `bench ops`), and freeing
    # a tensor allocated before profiling printed c10's "CPUAllocator.cpp … Memory block of unknown size".
    held = [torch.randn(1 << 16)]

    def work():
        held.clear()
        os.write(2, b"a message of the measured code\n")
        return torch.ones(1 << 10).sum()

    capfd.readouterr()
    assert peak_memory(work, torch.device("cpu")) > 0
    err = capfd.readouterr().err
    assert "a message of the measured code" in err
    assert "USDT" not in err and "CPUAllocator" not in err


def test_eval_threads_flag_sets_torch_threads(mqar_run, tmp_path, capsys):
    checkpoint, _ = mqar_run
    before = torch.get_num_threads()
    try:
        assert main(["mqar", str(checkpoint), "--threads", "1", "--out", str(tmp_path)]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        main(["mqar", str(checkpoint), "--threads", "0"])
    assert "expected an integer >= 1, got '0'" in capsys.readouterr().err


def test_bench_checkpoint_attention_puts_each_segment_length_beside_sdpa(tmp_path, capsys):
    argv = ["bench", "checkpoint_attention", "--seq-lens", "24", "40", "--segment-lens", "4", "8", "--heads", "2", "--head-dim", "8"]
    assert main([*argv, "--repeats", "1", "--backends", "torch", "reference", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_checkpoint_attention.json").read_text())["rows"]
    keys = [(r["seq_len"], r["impl"], r["segment_len"]) for r in rows]
    assert keys == [
        (seq, impl, L)
        for seq in (24, 40)
        for impl, L in [("sdpa causal", None)] + [(f"checkpoint {b}", L) for L in (4, 8) for b in ("torch", "reference")]
    ]
    for r in rows:
        base = next(x for x in rows if x["seq_len"] == r["seq_len"] and x["segment_len"] is None)
        if r["segment_len"] is not None:
            assert r["fwd_bwd_vs_sdpa"] == pytest.approx(r["fwd_bwd_ms"] / base["fwd_bwd_ms"]) and r["ideal"] == 1 / r["segment_len"]
            assert len(r["fwd_bwd_s_repeats"]) == 1 and r["fwd_bwd_peak_mib"] > 0
    assert (tmp_path / "bench_checkpoint_attention.png").is_file()
    assert main(["bench", "checkpoint_attention", "--backends", "fused", "--out", str(tmp_path)]) == 1
    assert "unknown backend(s) fused" in capsys.readouterr().err


def test_bench_varlen_reports_throughput_per_layout_and_no_leak_with_cu_seqlens(tmp_path, capsys):
    import json as _json

    assert main(["bench", "varlen", "--mixers", "attention", "gated_deltanet", "--seq-lens", "64", "--batch", "2",
                 "--hidden", "16", "--repeats", "1", "--out", str(tmp_path)]) == 0  # fmt: skip
    rows = _json.loads((tmp_path / "bench_varlen.json").read_text())["rows"]
    assert [r["mixer"] for r in rows] == ["attention", "gated_deltanet"]
    for row in rows:
        # Replacing the document before a boundary changes nothing after it with cu_seqlens, something without.
        assert row["leak_varlen"] == 0.0 and row["leak_packed"] > 0
        assert row["varlen_vs_packed"] == row["varlen_useful_tok_s"] / row["packed_useful_tok_s"]
    assert (tmp_path / "bench_varlen.md").is_file() and (tmp_path / "bench_varlen.png").stat().st_size > 0
