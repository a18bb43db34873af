"""The ops core: checking mode in both states, backend selection, the chunk layout and its state scan."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from seqzoo.ops import gated_delta_rule, gla, neural_memory, simple_gla
from seqzoo.ops.core import (
    ChunkLayout,
    OpInputError,
    checking,
    checks_enabled,
    choose_backend,
    guard_nonfinite,
    poison_from,
    scan_chunks,
)
from seqzoo.ops.core import dispatch as dispatch_module


def _linear_inputs(seq=10, heads=2, dim=4):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, seq, heads, dim) for _ in range(3))
    g = -torch.rand(2, seq, heads)
    beta = torch.rand(2, seq, heads)
    return q, k, v, g, beta


BAD_VALUES = [
    ("positive gate", lambda q, k, v, g, b: simple_gla(q, k, v, g.abs() + 0.1), "must be <= 0"),
    ("NaN gate", lambda q, k, v, g, b: gla(q, k, v, g[..., None].expand(*g.shape, 4).clone().fill_(float("nan"))), "g contains NaN"),
    ("beta above 2", lambda q, k, v, g, b: gated_delta_rule(q, k, v, b + 2.5, g), "beta must lie in [0, 2]"),
    ("NaN in v", lambda q, k, v, g, b: gated_delta_rule(q, k, v.masked_fill(v > 1, float("nan")), b, g), "v contains NaN"),
    ("lr negative", lambda q, k, v, g, b: neural_memory(q, k, v, -b, None, None, chunk_size=4), "lr must lie in [0, inf]"),
]


@pytest.mark.parametrize("call, match", [(c, m) for _, c, m in BAD_VALUES], ids=[n for n, _, _ in BAD_VALUES])
def test_value_checks_run_only_in_checking_mode(call, match):
    inputs = _linear_inputs()
    assert not checks_enabled()
    call(*inputs)  # off by default: no device→host synchronisation, no error
    with checking():
        assert checks_enabled()
        with pytest.raises(OpInputError, match=match.replace("[", r"\[").replace("]", r"\]")) as info:
            call(*inputs)
        assert "\n" not in str(info.value)
        with checking(False):
            call(*inputs)  # a nested block can switch it off again
    assert not checks_enabled()


def test_structure_checks_run_outside_checking_mode():
    q, k, v, g, beta = _linear_inputs()
    with pytest.raises(OpInputError, match="g has shape"):
        simple_gla(q, k, v, g[:, :3])
    with pytest.raises(OpInputError, match="strictly increasing"):
        simple_gla(q[:1], k[:1], v[:1], g[:1], cu_seqlens=torch.tensor([0, 6, 4, 10]), backend="torch")


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("0", False), ("", False)])
def test_checking_mode_from_the_environment(value, on):
    code = "from seqzoo.ops.core import checks_enabled; print(checks_enabled())"
    env = {**os.environ, "SEQZOO_CHECK": value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(on)


def test_auto_backend_by_device_length_and_autograd(monkeypatch):
    x = torch.zeros(1)
    linear = ("reference", "torch", "triton", "fused")
    assert choose_backend("op", "auto", linear, x, seq=1, grad=False, short_cpu=True) == "reference"
    assert choose_backend("op", "auto", linear, x, seq=1, grad=True, short_cpu=True) == "torch"
    assert choose_backend("op", "auto", linear, x, seq=100, grad=False, short_cpu=True) == "torch"
    assert choose_backend("op", "auto", linear, x, seq=1, grad=False, short_cpu=False) == "torch"
    # On CUDA (faked): the fused kernel for short calls without gradients, the chunked kernels otherwise.
    monkeypatch.setattr(dispatch_module, "on_cuda", lambda *t: True)
    monkeypatch.setattr(dispatch_module, "HAS_TRITON", True)
    assert choose_backend("op", "auto", linear, x, seq=64, grad=False) == "fused"
    assert choose_backend("op", "auto", linear, x, seq=65, grad=False) == "triton"
    assert choose_backend("op", "auto", linear, x, seq=1, grad=True) == "triton"
    assert choose_backend("op", "auto", ("reference", "torch", "triton"), x, seq=1, grad=False) == "triton"


def test_an_explicit_backend_is_never_overridden(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.setattr(dispatch_module, "TRITON_INTERPRET", True)
    for backend in ("reference", "torch", "triton", "fused"):
        assert choose_backend("op", backend, ("reference", "torch", "triton", "fused"), x, seq=1, grad=False, short_cpu=True) == backend


def test_backend_errors_are_one_line(monkeypatch):
    x = torch.zeros(1)
    with pytest.raises(OpInputError, match="op: unknown backend 'cuda'; choose one of auto, reference"):
        choose_backend("op", "cuda", ("torch",), x, seq=1, grad=False)
    with pytest.raises(OpInputError, match="op: has no 'fused' backend; choose one of auto, reference, torch, triton"):
        choose_backend("op", "fused", ("reference", "torch", "triton"), x, seq=1, grad=False)
    monkeypatch.setattr(dispatch_module, "TRITON_INTERPRET", False)
    with pytest.raises(OpInputError, match="backend='triton' needs CUDA tensors"):
        choose_backend("op", "triton", ("triton",), x, seq=1, grad=False)


def _ragged(x, offsets):
    return [x[:, a:b] for a, b in zip(offsets[:-1], offsets[1:])]


@pytest.mark.parametrize("chunk_major", [False, True])
def test_chunk_layout_round_trip_dense_and_packed(chunk_major):
    x = torch.randn(3, 37, 2, 5)
    dense = ChunkLayout.build(3, 37, 16, None, x.device)
    chunks = dense.to_chunks(x, chunk_major)
    assert chunks.shape == ((3, 3, 2, 16, 5) if chunk_major else (3, 2, 3, 16, 5))
    assert torch.equal(dense.from_chunks(chunks, chunk_major), x)
    # Packed: every sequence starts a new chunk and is zero-padded to a chunk multiple.
    offsets = [0, 5, 40, 41, 70]
    xp = torch.randn(1, 70, 2, 5)
    packed = ChunkLayout.build(1, 70, 16, torch.tensor(offsets), xp.device)
    assert packed.chunk_offsets == [0, 1, 4, 5, 7] and packed.num_seqs == 4
    chunks = packed.to_chunks(xp, chunk_major)
    flat = chunks.movedim(0, 2) if chunk_major else chunks
    flat = flat.flatten(2, 3)[0].transpose(0, 1)  # [slots, heads, d]
    for i, piece in enumerate(_ragged(xp, offsets)):
        start = packed.chunk_offsets[i] * 16
        length = piece.shape[1]
        assert torch.equal(flat[start : start + length], piece[0])
        assert not flat[start + length : packed.chunk_offsets[i + 1] * 16].any()
    assert torch.equal(packed.from_chunks(chunks, chunk_major), xp)


def test_chunk_layout_triton_indices():
    packed = ChunkLayout.build(1, 70, 16, torch.tensor([0, 5, 40, 41, 70]), torch.device("cpu"))
    assert packed.chunk_indices().tolist() == [[0, 0], [1, 0], [1, 1], [1, 2], [2, 0], [3, 0], [3, 1]]
    assert packed.chunk_offsets_tensor().tolist() == [0, 1, 4, 5, 7]
    dense = ChunkLayout.build(2, 20, 16, None, torch.device("cpu"))
    assert dense.chunk_indices().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert dense.chunk_offsets_tensor().tolist() == [0, 2, 4] and dense.cu_seqlens_tensor().tolist() == [0, 20, 40]


def test_scan_chunks_restarts_at_every_sequence():
    layout = ChunkLayout.build(1, 70, 16, torch.tensor([0, 5, 40, 41, 70]), torch.device("cpu"))
    initial = torch.tensor([[100.0], [200.0], [300.0], [400.0]])
    entering, finals = scan_chunks(layout, lambda n, s: s + 1, initial, lambda: torch.zeros(1, 1))
    assert [float(s) for s in entering] == [100, 200, 201, 202, 300, 400, 401]
    assert finals.flatten().tolist() == [101, 203, 301, 402]
    _, zero_finals = scan_chunks(layout, lambda n, s: s + 1, None, lambda: torch.zeros(1, 1))
    assert zero_finals.flatten().tolist() == [1, 3, 1, 2]


def test_chunk_layout_rejects_bad_offsets_with_one_line():
    with pytest.raises(OpInputError, match="^gla: cu_seqlens must be strictly increasing"):
        ChunkLayout.build(1, 10, 4, torch.tensor([0, 4, 4, 10]), torch.device("cpu"), op="gla")
    with pytest.raises(OpInputError, match="end at seq=10"):
        ChunkLayout.build(1, 10, 4, torch.tensor([0, 4, 9]), torch.device("cpu"))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("op", ["simple_gla", "gla", "gated_delta_rule"])
def test_a_nan_never_travels_backwards_outside_checking_mode(op, packed):
    # Chunked forms multiply a NaN by the zeros above a chunk's diagonal; the guard keeps every position before
    # the bad token exact and makes the bad token's sequence and head NaN from there on (the token loop makes
    # at least that much NaN).
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 100, 2, 8, dtype=torch.float64) for _ in range(3))
    g, beta = -torch.rand(1, 100, 2, dtype=torch.float64), torch.rand(1, 100, 2, dtype=torch.float64)
    v[0, 70, 1, 3] = float("nan")
    cu = torch.tensor([0, 40, 100]) if packed else None

    def run(backend):
        if op == "gated_delta_rule":
            return gated_delta_rule(q, k, v, beta, g, cu_seqlens=cu, output_final_state=True, backend=backend)
        if op == "gla":
            return gla(q, k, v, g[..., None].expand(-1, -1, -1, 8) * 0.1, cu_seqlens=cu, output_final_state=True, backend=backend)
        return simple_gla(q, k, v, g, cu_seqlens=cu, output_final_state=True, backend=backend)

    (o, final), (ref, ref_final) = run("torch"), run("reference")
    assert not torch.isnan(o[:, :70]).any(), "a NaN reached a position before it"
    assert torch.isnan(o[:, 70:, 1]).all() and torch.isnan(final[-1, 1]).all()
    assert (torch.isnan(o) >= torch.isnan(ref)).all() and (torch.isnan(final) >= torch.isnan(ref_final)).all()
    finite = ~torch.isnan(o)
    torch.testing.assert_close(o[finite], ref[finite], rtol=1e-9, atol=1e-9)
    assert not torch.isnan(o[:, :, 0]).any() and not torch.isnan(final[:, 0]).any()  # the other head is untouched


def test_a_nan_query_stays_at_its_own_position():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 100, 2, 8, dtype=torch.float64) for _ in range(3))
    g, beta = -torch.rand(1, 100, 2, dtype=torch.float64), torch.rand(1, 100, 2, dtype=torch.float64)
    q[0, 30, 1, 2] = float("nan")
    o, _ = gated_delta_rule(q, k, v, beta, g, backend="torch")
    ref, _ = gated_delta_rule(q, k, v, beta, g, backend="reference")
    assert torch.equal(torch.isnan(o), torch.isnan(ref)) and torch.isnan(o).sum() == 8  # the one (position, head)


def test_guard_skips_its_copies_only_where_finiteness_is_free_to_read(monkeypatch):
    # Eager CPU: all finite is read on the host (no device to wait for) and the inputs pass through untouched.
    k, v = torch.randn(1, 9, 2, 4), torch.randn(1, 9, 2, 4)
    clean, bad = guard_nonfinite({"k": k, "v": v, "g": None}, None)
    assert bad is None and clean["k"] is k and clean["v"] is v and clean["g"] is None
    o = torch.randn(1, 9, 2, 4)
    assert poison_from(o, None, None, None) == (o, None)
    # Where that read would sync a device or break a graph (here: as if compiling), the mask is computed on the
    # device: all False for finite inputs, the bad (position, head) otherwise.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    clean, bad = guard_nonfinite({"k": k, "v": v}, None)
    assert bad is not None and not bad.any() and torch.equal(clean["k"], k)
    v[0, 4, 1, 2] = float("inf")
    clean, bad = guard_nonfinite({"k": k, "v": v}, None)
    assert bad.nonzero().tolist() == [[0, 4, 1]] and torch.equal(clean["v"][0, 4, 1], torch.zeros(4))
