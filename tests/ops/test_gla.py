"""gla (per-key gates): chunked PyTorch and Triton paths against the token-loop reference, plus invariants and input errors."""

from __future__ import annotations

import pytest
import torch

from seqzoo.ops.core import OpInputError, checking
from seqzoo.ops.gla import gla, gla_chunk, gla_reference
from seqzoo.ops.simple_gla import simple_gla
from tests.helpers import assert_rel_close
from tests.ops.test_simple_gla import assert_all_close, masked_linear_attention, outputs_and_grads, split_by_sequence


def make_inputs(batch, seq, heads, key_dim, value_dim, dtype=torch.float64, h0=True, num_states=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k = rand(batch, seq, heads, key_dim), rand(batch, seq, heads, key_dim)
    v = rand(batch, seq, heads, value_dim)
    # Per-key decays from fast (≈0.1 per step) to slow (≈0.99), so keys really differ.
    g = torch.nn.functional.logsigmoid(rand(batch, seq, heads, key_dim) * 2 + 2)
    s0 = rand(num_states or batch, heads, key_dim, value_dim) if h0 else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), cast(g), cast(s0)


# ---------------------------------------------------------------- chunked PyTorch vs reference


@pytest.mark.parametrize("seq", [1, 37, 64, 130])
@pytest.mark.parametrize("h0", [False, True])
# 30: the default per-chunk choice (these gates give a mix); -1: secondary chunking everywhere;
# 1e9: the single-matmul form everywhere (safe in float64 at these spans).
@pytest.mark.parametrize("span_limit", [30.0, -1.0, 1e9])
def test_chunk_matches_reference_float64(seq, h0, span_limit):
    inputs = make_inputs(2, seq, 2, 8, 12, h0=h0)
    ref = outputs_and_grads(gla_reference, *inputs)
    got = outputs_and_grads(gla_chunk, *inputs, span_limit=span_limit)
    assert got[1].dtype == torch.float64
    assert_all_close(got, ref, 1e-10)


@pytest.mark.parametrize("span_limit", [30.0, -1.0])
def test_chunk_matches_reference_float32(span_limit):
    inputs = make_inputs(2, 130, 2, 16, 24)
    ref = outputs_and_grads(gla_reference, *inputs)
    got = outputs_and_grads(gla_chunk, *[t.float() for t in inputs], span_limit=span_limit)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert_all_close(got, ref, 1e-4)


@pytest.mark.parametrize("chunk_size, sub_chunk", [(16, 4), (32, 32), (64, 8)])
def test_other_chunkings_match_reference(chunk_size, sub_chunk):
    inputs = make_inputs(1, 45, 2, 8, 8)
    ref = outputs_and_grads(gla_reference, *inputs)
    got = outputs_and_grads(gla_chunk, *inputs, chunk_size=chunk_size, sub_chunk=sub_chunk, span_limit=-1.0)
    assert_all_close(got, ref, 1e-10)


# ---------------------------------------------------------------- packing, state carry, special cases


def test_cu_seqlens_equals_loop():
    offsets = [0, 5, 70, 71, 150]
    q, k, v, g, h0 = make_inputs(1, 150, 2, 8, 12, num_states=4)
    cu = torch.tensor(offsets)
    o_ref, ht_ref = split_by_sequence(gla, q, k, v, g, h0, offsets, backend="reference")
    got = outputs_and_grads(gla_chunk, q, k, v, g, h0, cu_seqlens=cu)
    assert_rel_close(got[0], o_ref, 1e-10, "o")
    assert_rel_close(got[1], ht_ref, 1e-10, "final_state")
    assert_all_close(got, outputs_and_grads(gla_reference, q, k, v, g, h0, cu_seqlens=cu), 1e-10)


def test_state_carry_equals_one_call():
    q, k, v, g, h0 = make_inputs(2, 100, 2, 8, 12)
    o_full, ht_full = gla(q, k, v, g, initial_state=h0, output_final_state=True, backend="torch")
    o1, h1 = gla(q[:, :37], k[:, :37], v[:, :37], g[:, :37], initial_state=h0, output_final_state=True, backend="torch")
    o2, h2 = gla(q[:, 37:], k[:, 37:], v[:, 37:], g[:, 37:], initial_state=h1, output_final_state=True, backend="torch")
    assert_rel_close(torch.cat([o1, o2], 1), o_full, 1e-12, "o")
    assert_rel_close(h2, ht_full, 1e-12, "final_state")


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_shared_gate_equals_simple_gla(backend):
    q, k, v, g, h0 = make_inputs(2, 90, 2, 8, 12)
    g_head = g[..., 0]
    o, ht = gla(q, k, v, g_head[..., None].expand_as(q), initial_state=h0, output_final_state=True, backend=backend)
    o_s, ht_s = simple_gla(q, k, v, g_head, initial_state=h0, output_final_state=True, backend=backend)
    assert_rel_close(o, o_s, 1e-12, "o")
    assert_rel_close(ht, ht_s, 1e-12, "final_state")


def test_zero_gate_is_causal_linear_attention():
    q, k, v, g, _ = make_inputs(2, 90, 2, 8, 12, h0=False)
    o, _ = gla(q, k, v, torch.zeros_like(g), backend="torch")
    assert_rel_close(o, masked_linear_attention(q, k, v, 8**-0.5), 1e-12)


# ---------------------------------------------------------------- extremes and low precision


def test_strong_decay_finite_and_exact():
    q, k, v, _, h0 = make_inputs(1, 130, 2, 16, 16, dtype=torch.float32)
    # Most keys forget almost everything each step (g = −30), a few keep a little memory.
    g = torch.full((1, 130, 2, 16), -30.0)
    g[..., :3] = -0.5
    ref = outputs_and_grads(gla_reference, *(t.double() for t in (q, k, v, g, h0)))
    got = outputs_and_grads(gla_chunk, q, k, v, g, h0)
    assert_all_close(got, ref, 1e-4)


def test_long_zero_gate_finite():
    q, k, v, _, _ = make_inputs(1, 4096, 1, 4, 4, dtype=torch.float32, h0=False)
    o, ht = gla(q, k, v, torch.zeros_like(q), output_final_state=True, backend="torch")
    assert torch.isfinite(o).all() and torch.isfinite(ht).all()
    assert_rel_close(ht[0, 0], k[0, :, 0].T.double() @ v[0, :, 0].double(), 1e-5, "state = KᵀV")
    assert_rel_close(o, masked_linear_attention(q.double(), k.double(), v.double(), 0.5), 1e-4, "o")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    q, k, v, g, h0 = make_inputs(2, 100, 2, 16, 16, dtype=dtype)
    o, ht = gla(q, k, v, g, initial_state=h0.float(), output_final_state=True, backend="torch")
    assert o.dtype == dtype and ht.dtype == torch.float32
    o_ref, ht_ref = gla(*[t.float() for t in (q, k, v, g)], initial_state=h0.float(), output_final_state=True, backend="reference")
    assert_rel_close(o, o_ref, 2e-2 if dtype == torch.bfloat16 else 3e-3, "o")
    assert_rel_close(ht, ht_ref, 1e-5, "final_state")


def test_chunk_gradcheck():
    q, k, v, g, h0 = (t.requires_grad_() for t in make_inputs(1, 11, 1, 3, 2))
    fn = lambda q, k, v, g, h0: gla_chunk(q, k, v, g, initial_state=h0, output_final_state=True, chunk_size=4, sub_chunk=2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, g, h0), fast_mode=True)


# ---------------------------------------------------------------- input errors


def test_input_errors():
    q, k, v, g, h0 = make_inputs(2, 10, 2, 4, 6, dtype=torch.float32)
    with checking():  # the value checks (NaN, a positive gate, bad offsets) run in checking mode
        with pytest.raises(OpInputError, match="k has shape"):
            gla(q, k[:, :5], v, g)
        with pytest.raises(OpInputError, match="v has shape"):
            gla(q, k, v[:, :, :1], g)
        with pytest.raises(OpInputError, match="g has shape"):
            gla(q, k, v, g[..., 0])
        with pytest.raises(OpInputError, match="g is required"):
            gla(q, k, v, None)
        with pytest.raises(OpInputError, match="must be <= 0"):
            gla(q, k, v, g.abs() + 0.1)
        with pytest.raises(OpInputError, match="floating-point"):
            gla(q, k, v.int(), g)
        with pytest.raises(OpInputError, match="needs batch 1"):
            gla(q, k, v, g, cu_seqlens=torch.tensor([0, 4, 10]))
        with pytest.raises(OpInputError, match="strictly increasing"):
            gla(q[:1], k[:1], v[:1], g[:1], cu_seqlens=torch.tensor([0, 4, 4, 10]))
        with pytest.raises(OpInputError, match="initial_state has shape"):
            gla(q, k, v, g, initial_state=h0[:1])
        with pytest.raises(OpInputError, match="unknown backend"):
            gla(q, k, v, g, backend="cuda")


# ---------------------------------------------------------------- Triton (interpreter on CPU)


def _triton(fn_name):
    from seqzoo.ops.gla import triton as mod

    return getattr(mod, fn_name)


@pytest.mark.triton
@pytest.mark.parametrize("seq, h0", [(1, True), (37, False), (100, True)])
def test_triton_matches_reference(seq, h0):
    inputs = [None if t is None else t.float() for t in make_inputs(1, seq, 2, 16, 32, h0=h0)]
    ref = outputs_and_grads(gla_reference, *(None if t is None else t.double() for t in inputs))
    got = outputs_and_grads(gla, *inputs, backend="triton")
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert_all_close(got, ref, 1e-4)


@pytest.mark.triton
def test_triton_recurrent_matches_reference():
    q, k, v, g, h0 = (t.float() for t in make_inputs(2, 40, 2, 24, 16))
    o_ref, ht_ref = gla_reference(q, k, v, g, initial_state=h0, output_final_state=True)
    o, ht = _triton("gla_fused")(q, k, v, g, initial_state=h0, output_final_state=True)
    assert_rel_close(o, o_ref, 1e-5, "o")
    assert_rel_close(ht, ht_ref, 1e-5, "final_state")
    o_pub, _ = gla(q, k, v, g, initial_state=h0, backend="fused")
    assert torch.equal(o_pub, o)


@pytest.mark.triton
def test_triton_cu_seqlens_equals_loop():
    offsets = [0, 5, 40, 41, 70]
    cu = torch.tensor(offsets)
    q, k, v, g, h0 = (t.float() for t in make_inputs(1, 70, 1, 16, 16, num_states=4))
    ref = outputs_and_grads(gla_reference, q, k, v, g, h0, cu_seqlens=cu)
    assert_all_close(outputs_and_grads(gla, q, k, v, g, h0, cu_seqlens=cu, backend="triton"), ref, 1e-4)
    with torch.no_grad():
        o_rec, ht_rec = _triton("gla_fused")(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert_rel_close(o_rec, ref[0], 1e-5, "o")
    assert_rel_close(ht_rec, ref[1], 1e-5, "final_state")


@pytest.mark.triton
def test_triton_strong_decay_finite():
    q, k, v, _, h0 = (t.float() for t in make_inputs(1, 70, 1, 16, 16))
    g = torch.full((1, 70, 1, 16), -30.0)
    g[..., :3] = -0.5
    leaves = [t.clone().requires_grad_() for t in (q, k, v, g, h0)]
    o, ht = gla(*leaves[:4], initial_state=leaves[4], output_final_state=True, backend="triton")
    o_ref, ht_ref = gla_reference(*(t.double() for t in (q, k, v, g)), initial_state=h0.double(), output_final_state=True)
    assert_rel_close(o, o_ref, 1e-5, "o at g=-30")
    assert_rel_close(ht, ht_ref, 1e-5, "final_state at g=-30")
    (o.sum() + ht.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


@pytest.mark.triton
def test_triton_shared_gate_equals_simple_gla():
    q, k, v, g, h0 = (t.float() for t in make_inputs(1, 70, 2, 16, 16))
    g_head = g[..., 0]
    o, ht = gla(q, k, v, g_head[..., None].expand_as(q).contiguous(), initial_state=h0, output_final_state=True, backend="triton")
    o_s, ht_s = simple_gla(q, k, v, g_head, initial_state=h0, output_final_state=True, backend="triton")
    assert_rel_close(o, o_s, 1e-5, "o")
    assert_rel_close(ht, ht_s, 1e-5, "final_state")


@pytest.mark.triton
def test_triton_gradcheck():
    q, k, v, g, h0 = (t.requires_grad_() for t in make_inputs(1, 9, 1, 4, 3))
    fn = _triton("gla_triton")
    check = lambda q, k, v, g, h0: fn(q, k, v, g, initial_state=h0, output_final_state=True)  # noqa: E731
    assert torch.autograd.gradcheck(check, (q, k, v, g, h0), fast_mode=True)
