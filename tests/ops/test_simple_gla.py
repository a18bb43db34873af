"""simple_gla: chunked PyTorch and Triton paths against the token-loop reference, plus invariants and input errors."""

from __future__ import annotations

import pytest
import torch

from seqzoo.ops.core import OpInputError, checking
from seqzoo.ops.simple_gla import simple_gla, simple_gla_chunk, simple_gla_reference
from tests.helpers import assert_rel_close


def make_inputs(batch, seq, heads, key_dim, value_dim, dtype=torch.float64, gate=True, h0=True, num_states=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k = rand(batch, seq, heads, key_dim), rand(batch, seq, heads, key_dim)
    v = rand(batch, seq, heads, value_dim)
    # logsigmoid(x + 2) spreads decays over roughly (0.5, 1): strong enough to matter, weak enough to carry.
    g = torch.nn.functional.logsigmoid(rand(batch, seq, heads) + 2) if gate else None
    s0 = rand(num_states or batch, heads, key_dim, value_dim) if h0 else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), cast(g), cast(s0)


def outputs_and_grads(fn, q, k, v, g, h0, seed=1, **kwargs):
    """Run ``fn`` with grads on every input and random cotangents on ``o`` and the final state."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (q, k, v, g, h0)]
    o, ht = fn(*leaves[:4], initial_state=leaves[4], output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
    dht = torch.randn(ht.shape, generator=gen, dtype=torch.float64).to(ht.dtype)
    ((o * do).sum() + (ht * dht).sum()).backward()
    return o.detach(), ht.detach(), [None if t is None else t.grad for t in leaves]


NAMES = ("dq", "dk", "dv", "dg", "dh0")


def assert_all_close(got, ref, tol):
    o, ht, grads = got
    o_ref, ht_ref, grads_ref = ref
    assert_rel_close(o, o_ref, tol, "o")
    assert_rel_close(ht, ht_ref, tol, "final_state")
    for name, a, b in zip(NAMES, grads, grads_ref):
        assert (a is None) == (b is None), name
        if a is not None:
            assert_rel_close(a, b, tol, name)


# ---------------------------------------------------------------- chunked PyTorch vs reference


@pytest.mark.parametrize("seq", [1, 37, 64, 130])
@pytest.mark.parametrize("h0", [False, True])
@pytest.mark.parametrize("gate", [True, False])
def test_chunk_matches_reference_float64(seq, h0, gate):
    inputs = make_inputs(2, seq, 2, 8, 12, gate=gate, h0=h0)
    ref = outputs_and_grads(simple_gla_reference, *inputs)
    got = outputs_and_grads(simple_gla_chunk, *inputs)
    assert got[1].dtype == torch.float64
    assert_all_close(got, ref, 1e-10)


def test_chunk_matches_reference_float32():
    inputs = make_inputs(2, 130, 2, 16, 24)
    ref = outputs_and_grads(simple_gla_reference, *inputs)
    got = outputs_and_grads(simple_gla, *[t.float() for t in inputs], backend="torch")
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert_all_close(got, ref, 1e-4)


def test_small_chunk_size_matches_reference():
    inputs = make_inputs(1, 45, 2, 8, 8)
    ref = outputs_and_grads(simple_gla_reference, *inputs)
    got = outputs_and_grads(simple_gla_chunk, *inputs, chunk_size=16)
    assert_all_close(got, ref, 1e-10)


# ---------------------------------------------------------------- packing, state carry, special cases


def split_by_sequence(fn, q, k, v, g, h0, offsets, **kwargs):
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        o, ht = fn(
            q[:, a:b],
            k[:, a:b],
            v[:, a:b],
            None if g is None else g[:, a:b],
            initial_state=h0[i : i + 1],
            output_final_state=True,
            **kwargs,
        )
        outs.append(o)
        finals.append(ht)
    return torch.cat(outs, 1), torch.cat(finals, 0)


@pytest.mark.parametrize("gate", [True, False])
def test_cu_seqlens_equals_loop(gate):
    offsets = [0, 5, 70, 71, 150]
    q, k, v, g, h0 = make_inputs(1, 150, 2, 8, 12, gate=gate, num_states=4)
    cu = torch.tensor(offsets)
    o_ref, ht_ref = split_by_sequence(simple_gla, q, k, v, g, h0, offsets, backend="reference")
    for fn in (simple_gla_reference, simple_gla_chunk):
        got = outputs_and_grads(fn, q, k, v, g, h0, cu_seqlens=cu)
        assert_rel_close(got[0], o_ref, 1e-10, "o")
        assert_rel_close(got[1], ht_ref, 1e-10, "final_state")
    # Gradients of the packed call equal those of the per-sequence reference loop.
    ref = outputs_and_grads(simple_gla_reference, q, k, v, g, h0, cu_seqlens=cu)
    assert_all_close(outputs_and_grads(simple_gla_chunk, q, k, v, g, h0, cu_seqlens=cu), ref, 1e-10)


def test_state_carry_equals_one_call():
    q, k, v, g, h0 = make_inputs(2, 100, 2, 8, 12)
    o_full, ht_full = simple_gla(q, k, v, g, initial_state=h0, output_final_state=True, backend="torch")
    o1, h1 = simple_gla(q[:, :37], k[:, :37], v[:, :37], g[:, :37], initial_state=h0, output_final_state=True, backend="torch")
    o2, h2 = simple_gla(q[:, 37:], k[:, 37:], v[:, 37:], g[:, 37:], initial_state=h1, output_final_state=True, backend="torch")
    assert_rel_close(torch.cat([o1, o2], 1), o_full, 1e-12, "o")
    assert_rel_close(h2, ht_full, 1e-12, "final_state")


def masked_linear_attention(q, k, v, scale):
    seq = q.shape[1]
    scores = torch.einsum("bihk,bjhk->bhij", q * scale, k)
    scores = scores.masked_fill(~torch.ones(seq, seq, dtype=torch.bool).tril(), 0.0)
    return torch.einsum("bhij,bjhv->bihv", scores, v)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_zero_gate_is_causal_linear_attention(backend):
    q, k, v, g, _ = make_inputs(2, 90, 2, 8, 12, h0=False)
    expected = masked_linear_attention(q, k, v, 8**-0.5)
    o_none, _ = simple_gla(q, k, v, None, backend=backend)
    o_zero, _ = simple_gla(q, k, v, torch.zeros_like(g), backend=backend)
    assert_rel_close(o_none, expected, 1e-12, "g=None")
    assert_rel_close(o_zero, expected, 1e-12, "g=0")


def test_custom_scale():
    q, k, v, g, h0 = make_inputs(1, 40, 2, 8, 8)
    o_ref, _ = simple_gla(q * 0.3, k, v, g, scale=1.0, initial_state=h0, backend="reference")
    o, _ = simple_gla(q, k, v, g, scale=0.3, initial_state=h0, backend="torch")
    assert_rel_close(o, o_ref, 1e-12)


# ---------------------------------------------------------------- extremes and low precision


def test_strong_decay_finite_and_exact():
    q, k, v, _, h0 = make_inputs(1, 130, 2, 16, 16, dtype=torch.float32)
    g = torch.full((1, 130, 2), -30.0)
    ref = outputs_and_grads(simple_gla_reference, q, k, v, g, h0)
    got = outputs_and_grads(simple_gla_chunk, q, k, v, g, h0)
    assert_all_close(got, ref, 1e-4)
    # With exp(-30) ≈ 1e-13 per step, each output is (to fp32 precision) its own token's k·q times v.
    own = (q * k).sum(-1, keepdim=True) * 16**-0.5 * v
    assert_rel_close(got[0][:, 1:], own[:, 1:], 1e-5, "o at g=-30")


def test_long_zero_gate_finite():
    q, k, v, _, _ = make_inputs(1, 4096, 1, 4, 4, dtype=torch.float32, h0=False)
    o, ht = simple_gla(q, k, v, torch.zeros(1, 4096, 1), output_final_state=True, backend="torch")
    assert torch.isfinite(o).all() and torch.isfinite(ht).all()
    assert_rel_close(ht[0, 0], k[0, :, 0].T.double() @ v[0, :, 0].double(), 1e-5, "state = KᵀV")
    assert_rel_close(o, masked_linear_attention(q.double(), k.double(), v.double(), 0.5), 1e-4, "o")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    q, k, v, g, h0 = make_inputs(2, 100, 2, 16, 16, dtype=dtype)
    o, ht = simple_gla(q, k, v, g, initial_state=h0.float(), output_final_state=True, backend="torch")
    assert o.dtype == dtype and ht.dtype == torch.float32
    o_ref, ht_ref = simple_gla(*[t.float() for t in (q, k, v, g)], initial_state=h0.float(), output_final_state=True, backend="reference")
    assert_rel_close(o, o_ref, 2e-2 if dtype == torch.bfloat16 else 3e-3, "o")
    assert_rel_close(ht, ht_ref, 1e-5, "final_state")


def test_chunk_gradcheck():
    q, k, v, g, h0 = (t.requires_grad_() for t in make_inputs(1, 11, 1, 3, 2))
    fn = lambda q, k, v, g, h0: simple_gla_chunk(q, k, v, g, initial_state=h0, output_final_state=True, chunk_size=4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, g, h0), fast_mode=True)


# ---------------------------------------------------------------- input errors


def test_input_errors():
    q, k, v, g, h0 = make_inputs(2, 10, 2, 4, 6, dtype=torch.float32)
    with checking():  # the value checks (NaN, a positive gate, bad offsets) run in checking mode
        with pytest.raises(OpInputError, match="k has shape"):
            simple_gla(q, k[:, :5], v, g)
        with pytest.raises(OpInputError, match="v has shape"):
            simple_gla(q, k, v[:, :, :1], g)
        with pytest.raises(OpInputError, match="g has shape"):
            simple_gla(q, k, v, g[..., None])
        with pytest.raises(OpInputError, match="must be <= 0"):
            simple_gla(q, k, v, g.abs() + 0.1)
        with pytest.raises(OpInputError, match="floating-point"):
            simple_gla(q.long(), k, v, g)
        with pytest.raises(OpInputError, match="needs batch 1"):
            simple_gla(q, k, v, g, cu_seqlens=torch.tensor([0, 4, 10]))
        with pytest.raises(OpInputError, match="strictly increasing"):
            simple_gla(q[:1], k[:1], v[:1], g[:1], cu_seqlens=torch.tensor([0, 6, 4, 10]))
        with pytest.raises(OpInputError, match="initial_state has shape"):
            simple_gla(q, k, v, g, initial_state=h0[:, :, :, :5])
        with pytest.raises(OpInputError, match="initial_state has shape"):
            simple_gla(q[:1], k[:1], v[:1], g[:1], initial_state=h0[:1], cu_seqlens=torch.tensor([0, 4, 10]))
        with pytest.raises(OpInputError, match="unknown backend"):
            simple_gla(q, k, v, g, backend="cuda")


# ---------------------------------------------------------------- Triton (interpreter on CPU)


def _triton(fn_name):
    from seqzoo.ops.simple_gla import triton as mod

    return getattr(mod, fn_name)


@pytest.mark.triton
@pytest.mark.parametrize("seq, gate, h0", [(1, True, True), (64, False, True), (130, True, False), (100, True, True)])
def test_triton_matches_reference(seq, gate, h0):
    inputs = [None if t is None else t.float() for t in make_inputs(1, seq, 2, 16, 32, gate=gate, h0=h0)]
    ref = outputs_and_grads(simple_gla_reference, *(None if t is None else t.double() for t in inputs))
    got = outputs_and_grads(simple_gla, *inputs, backend="triton")
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert_all_close(got, ref, 1e-4)


@pytest.mark.triton
@pytest.mark.parametrize("gate", [True, False])
def test_triton_recurrent_matches_reference(gate):
    q, k, v, g, h0 = (None if t is None else t.float() for t in make_inputs(2, 40, 2, 16, 24, gate=gate))
    o_ref, ht_ref = simple_gla_reference(q, k, v, g, initial_state=h0, output_final_state=True)
    o, ht = _triton("simple_gla_fused")(q, k, v, g, initial_state=h0, output_final_state=True)
    assert_rel_close(o, o_ref, 1e-5, "o")
    assert_rel_close(ht, ht_ref, 1e-5, "final_state")
    # The public function takes this path for short inputs without grad: same numbers.
    o_pub, _ = simple_gla(q, k, v, g, initial_state=h0, backend="fused")
    assert torch.equal(o_pub, o)


@pytest.mark.triton
def test_triton_cu_seqlens_equals_loop():
    offsets = [0, 5, 70, 71, 100]
    cu = torch.tensor(offsets)
    q, k, v, g, h0 = (t.float() for t in make_inputs(1, 100, 2, 16, 16, num_states=4))
    ref = outputs_and_grads(simple_gla_reference, q, k, v, g, h0, cu_seqlens=cu)
    assert_all_close(outputs_and_grads(simple_gla, q, k, v, g, h0, cu_seqlens=cu, backend="triton"), ref, 1e-4)
    o_loop, ht_loop = split_by_sequence(simple_gla, q, k, v, g, h0, offsets, backend="triton")
    with torch.no_grad():
        o_rec, ht_rec = _triton("simple_gla_fused")(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    for o, ht in ((o_loop, ht_loop), (o_rec, ht_rec)):
        assert_rel_close(o, ref[0], 1e-5, "o")
        assert_rel_close(ht, ref[1], 1e-5, "final_state")


@pytest.mark.triton
def test_triton_strong_decay_and_low_precision():
    q, k, v, _, h0 = (t.float() for t in make_inputs(1, 70, 2, 16, 16))
    g = torch.full((1, 70, 2), -30.0)
    o, ht = simple_gla(q, k, v, g, initial_state=h0, output_final_state=True, backend="triton")
    o_ref, ht_ref = simple_gla_reference(q, k, v, g, initial_state=h0, output_final_state=True)
    assert_rel_close(o, o_ref, 1e-5, "o at g=-30")
    assert_rel_close(ht, ht_ref, 1e-5, "final_state at g=-30")
    o16, ht16 = simple_gla(q.half(), k.half(), v.half(), g, initial_state=h0, output_final_state=True, backend="triton")
    assert o16.dtype == torch.float16 and ht16.dtype == torch.float32
    assert_rel_close(o16, o_ref, 3e-3, "fp16 o")


@pytest.mark.triton
def test_triton_wide_keys_two_blocks():
    # K = 72 spans two 64-wide key tiles (and two partial outputs in the recurrent kernel); V = 20 is masked.
    inputs = [t.float() for t in make_inputs(1, 20, 1, 72, 20)]
    ref = outputs_and_grads(simple_gla_reference, *(t.double() for t in inputs))
    assert_all_close(outputs_and_grads(simple_gla, *inputs, backend="triton"), ref, 1e-4)
    with torch.no_grad():
        o, ht = simple_gla(*inputs[:4], initial_state=inputs[4], output_final_state=True, backend="triton")
    assert_rel_close(o, ref[0], 1e-5, "recurrent o")
    assert_rel_close(ht, ref[1], 1e-5, "recurrent final_state")


@pytest.mark.triton
def test_triton_mixed_dtypes_grads():
    q, k, v, g, h0 = (t.float() for t in make_inputs(1, 70, 1, 16, 16))
    inputs = (q.half(), k.half(), v.half(), g, h0)

    def grads(fn, tensors, **kwargs):
        leaves = [t.clone().requires_grad_() for t in tensors]
        o, ht = fn(*leaves[:4], initial_state=leaves[4], output_final_state=True, **kwargs)
        (o.double().sum() + ht.double().sum()).backward()
        return [t.grad for t in leaves]

    got = grads(simple_gla, inputs, backend="triton")
    # Each gradient comes back in its own input's dtype.
    assert [t.dtype for t in got] == [torch.float16] * 3 + [torch.float32] * 2
    ref = grads(simple_gla_reference, [t.double() for t in inputs])
    for name, a, b in zip(NAMES, got, ref):
        assert_rel_close(a, b, 3e-3, name)


@pytest.mark.triton
@pytest.mark.parametrize("gate", [True, False])
def test_triton_gradcheck(gate):
    q, k, v, g, h0 = (None if t is None else t.requires_grad_() for t in make_inputs(1, 9, 1, 4, 3, gate=gate))
    fn = _triton("simple_gla_triton")
    if gate:
        check = lambda q, k, v, g, h0: fn(q, k, v, g, initial_state=h0, output_final_state=True)  # noqa: E731
        args = (q, k, v, g, h0)
    else:
        check = lambda q, k, v, h0: fn(q, k, v, None, initial_state=h0, output_final_state=True)  # noqa: E731
        args = (q, k, v, h0)
    assert torch.autograd.gradcheck(check, args, fast_mode=True)
