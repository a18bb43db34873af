"""``seqzoo-eval bench titans`` with a stand-in for titans-pytorch: the grid, the ratios, the printout, the refusal."""

import json
import sys

import pytest
import torch
from torch import nn

from seqzoo.eval import bench_titans
from seqzoo.eval.cli import main

TINY = ["bench", "titans", "--dims", "8", "--chunks", "4", "--seq-lens", "8", "16", "--heads", "2", "--repeats", "1"]


class FakeMemoryMLP(nn.Module):
    def __init__(self, dim, depth, expansion_factor=2.0):
        super().__init__()
        self.dim, self.depth = dim, depth


class FakeNeuralMemory(nn.Module):
    """Records its constructor arguments; returns ``(retrieved, state)`` like ``NeuralMemory.forward``."""

    built: list[dict] = []

    def __init__(self, dim, **kwargs):
        super().__init__()
        FakeNeuralMemory.built.append({"dim": dim, **kwargs})
        self.proj = nn.Linear(dim, dim)

    def forward(self, seq):
        return self.proj(seq), None


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny layers on a shared 2-core machine: a second intra-op thread only adds wake-up waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fake_peer(monkeypatch):
    FakeNeuralMemory.built = []
    monkeypatch.setattr(bench_titans, "_import_peer", lambda: (FakeNeuralMemory, FakeMemoryMLP))
    return FakeNeuralMemory.built


@pytest.fixture
def fast_peak(monkeypatch):
    """The CPU profiler costs ~0.5 s a call (measure.peak_memory has its own test): run once, count up MiB."""
    calls = []

    def peak(fn, device):
        fn()
        calls.append(fn)
        return len(calls) * 2**20

    monkeypatch.setattr(bench_titans, "peak_memory", peak)
    return calls


def printed_rows(text):
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_bench_titans_rows_match_the_printout_and_the_grid(fake_peer, fast_peak, tmp_path, capsys):
    assert main([*TINY, "--memory", "linear", "mlp", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "bench_titans.json").read_text())
    rows, printed = payload["rows"], printed_rows(capsys.readouterr().out)
    keys = [(r["memory"], r["dim"], r["chunk"], r["seq_len"], r["peer"]) for r in rows]
    assert keys == [
        (memory, 8, 4, seq, peer) for memory in ("linear", "mlp") for seq in (8, 16) for peer in ("batch_size=chunk", "batch_size=None")
    ]
    columns = [
        "memory",
        "dim",
        "chunk",
        "seq_len",
        "peer",
        "ours_tok_s",
        "peer_tok_s",
        "speedup",
        "speedup_best",
        "ours_peak_mb",
        "peer_peak_mb",
        "mem_ratio",
    ]
    assert len(printed) == len(rows)
    for row, cells in zip(rows, printed):
        for name, cell in zip(columns, cells):
            if isinstance(row[name], float):
                assert float(cell) == pytest.approx(row[name], rel=1e-3)
            else:
                assert cell == str(row[name])
        assert row["speedup"] == pytest.approx(row["ours_tok_s"] / row["peer_tok_s"])
        assert row["speedup_best"] == pytest.approx(min(row["peer_times_s"]) / min(row["ours_times_s"]))
        assert row["mem_ratio"] == pytest.approx(row["ours_peak_mb"] / row["peer_peak_mb"])
        assert row["ours_tok_s"] > 0 and row["peer_tok_s"] > 0
        assert len(row["ours_times_s"]) == len(row["peer_times_s"]) == 1
    # Per grid point: ours, then each peer, measured once; ours is shown beside each peer configuration.
    assert len(fast_peak) == 4 * 3
    assert [(r["ours_peak_mb"], r["peer_peak_mb"]) for r in rows[:4]] == [(1, 2), (1, 3), (4, 5), (4, 6)]
    assert rows[0]["ours_tok_s"] == rows[1]["ours_tok_s"]
    # The peer got the same width, heads, head size and chunk; batch_size chunk and None; the matching memory.
    assert len(fake_peer) == 8
    for kwargs in fake_peer:
        assert (kwargs["dim"], kwargs["heads"], kwargs["dim_head"], kwargs["chunk_size"]) == (8, 2, 4, 4)
        assert kwargs["qk_rmsnorm"] and kwargs["post_rmsnorm"] and not kwargs["pre_rmsnorm"]
        # The same inner step: our max_lr for a ½·sum loss, × dim_head / 2 for its mean over dim_head.
        assert kwargs["default_step_transform_max_lr"] == pytest.approx(bench_titans.build_ours(8, 2, 4, "linear").memory.max_lr * 4 / 2)
    assert [k["batch_size"] for k in fake_peer[:2]] == [4, None]
    assert fake_peer[0]["model"].depth == 1 and not fake_peer[0]["mem_model_norm_add_residual"]
    assert "model" not in fake_peer[-1] and fake_peer[-1]["mem_model_norm_add_residual"]
    assert payload["settings"]["heads"] == 2 and set(payload["summary"]) == {"batch_size=chunk", "batch_size=None"}
    assert "chunk granularity" in (tmp_path / "bench_titans.md").read_text()
    assert (tmp_path / "bench_titans.png").stat().st_size > 0


def test_bench_titans_retrieval_chunk_reaches_our_mixer(fake_peer, fast_peak, monkeypatch, tmp_path):
    built = []
    real_build = bench_titans.build_ours
    monkeypatch.setattr(bench_titans, "build_ours", lambda *a: built.append(real_build(*a)) or built[-1])
    assert main([*TINY, "--retrieval", "chunk", "--peer-batch-size", "chunk", "--out", str(tmp_path)]) == 0
    assert len(built) == 2 and all(m.memory.retrieval == "chunk" for m in built)
    assert json.loads((tmp_path / "bench_titans.json").read_text())["settings"]["retrieval"] == "chunk"


def test_bench_titans_without_titans_pytorch_is_one_line_and_writes_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "titans_pytorch", None)  # import titans_pytorch -> ImportError
    assert main([*TINY, "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("seqzoo-eval: error: bench titans needs titans-pytorch") and "cannot be imported" in err
    assert not (tmp_path / "bench_titans.json").exists()


def test_bench_titans_rejects_a_grid_it_cannot_run(fake_peer, tmp_path, capsys):
    assert main(["bench", "titans", "--dims", "8", "--chunks", "4", "--seq-lens", "10", "--heads", "2", "--out", str(tmp_path)]) == 1
    assert "multiple of every chunk" in capsys.readouterr().err
    assert main(["bench", "titans", "--dims", "9", "--heads", "2", "--out", str(tmp_path)]) == 1
    assert "multiple of heads" in capsys.readouterr().err
    assert fake_peer == []


def test_real_peer_takes_our_configuration():
    """With titans-pytorch installed: the peer accepts the arguments, and its memory has our shapes."""
    pytest.importorskip("titans_pytorch")
    classes = bench_titans.load_peer()
    x = torch.randn(1, 8, 8)
    for memory in ("linear", "mlp"):
        ours = bench_titans.build_ours(8, 2, 4, memory)
        peer = bench_titans.build_peer(classes, 8, 2, 4, memory, "chunk", ours.memory.max_lr)
        assert [tuple(p.shape) for p in peer.memory_model_parameters if p.ndim == 3] == [tuple(p.shape) for p in ours.memory.init_weights]
        assert peer(x)[0].shape == ours(x).shape == x.shape
