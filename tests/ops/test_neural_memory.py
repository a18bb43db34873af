"""Titans neural memory op: its invariants at op level.

The oracle is ``backend="reference"`` (a per-token loop whose inner gradients come from autograd at the
chunk-start weights); I1, I3 and I6 also use tiny closed-form loops written here, so that no test
compares the implementation with itself.
"""

from __future__ import annotations

import re

import pytest
import torch

from seqzoo.ops.core import OpInputError, checking
from seqzoo.ops.neural_memory import LinearMemoryState, MLPMemoryState, neural_memory
from tests.helpers import assert_rel_close, rel_err

F64 = torch.float64
GATE_NAMES = ("lr", "momentum", "decay")


def make_inputs(
    batch=2,
    seq=21,
    heads=2,
    key_dim=6,
    value_dim=6,
    hidden=12,
    memory="linear",
    gates=True,
    dtype=F64,
    seed=0,
    requires_grad=False,
):
    """Random op inputs; ``gates=False`` drops momentum and decay (``None``), the memory then only learns."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_(requires_grad)

    def uni(lo, hi):
        return (lo + (hi - lo) * torch.rand(batch, seq, heads, generator=g, dtype=dtype)).requires_grad_(requires_grad)

    x = {
        "q": rnd(batch, seq, heads, key_dim, scale=key_dim**-0.5),
        "k": rnd(batch, seq, heads, key_dim, scale=key_dim**-0.5),
        "v": rnd(batch, seq, heads, value_dim),
        # MLP memories diverge with large steps; keep both in the regime a trained layer would use.
        "lr": uni(0.05, 0.6 if memory == "linear" else 0.3),
        "momentum": uni(0.0, 0.9) if gates else None,
        "decay": uni(0.0, 0.2) if gates else None,
    }
    if memory == "linear":
        state = LinearMemoryState(rnd(batch, heads, key_dim, value_dim, scale=0.2), rnd(batch, heads, key_dim, value_dim, scale=0.1))
    else:
        state = MLPMemoryState(
            rnd(batch, heads, key_dim, hidden, scale=key_dim**-0.5),
            rnd(batch, heads, hidden, value_dim, scale=hidden**-0.5),
            rnd(batch, heads, key_dim, hidden, scale=0.05),
            rnd(batch, heads, hidden, value_dim, scale=0.05),
        )
    return x, state


def run(x, state, backend, chunk_size, memory="linear", **kw):
    return neural_memory(
        x["q"],
        x["k"],
        x["v"],
        x["lr"],
        x["momentum"],
        x["decay"],
        chunk_size=chunk_size,
        memory=memory,
        initial_state=state,
        output_final_state=True,
        backend=backend,
        **kw,
    )


def primal_linear(q, k, v, lr, momentum, decay, chunk_size, w, s, retrieval="token"):
    """Linear memory, primal form, closed-form gradient ``k (Wᵀk − v)ᵀ`` at the chunk start; per-token weights.

    ``retrieval="chunk"`` reads with the chunk-start weights, except at a chunk's last token.
    """
    out = []
    base = w
    for t in range(q.shape[1]):
        if t % chunk_size == 0:
            base = w
        kt, vt = k[:, t], v[:, t]
        err = torch.einsum("bhk,bhkv->bhv", kt, base) - vt
        u = kt.unsqueeze(-1) * err.unsqueeze(-2)
        eta = 0 if momentum is None else momentum[:, t, :, None, None]
        alpha = 0 if decay is None else decay[:, t, :, None, None]
        s = eta * s - lr[:, t, :, None, None] * u
        w = (1 - alpha) * w + s
        read = w if retrieval == "token" or (t + 1) % chunk_size == 0 else base
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t], read))
    return torch.stack(out, 1), w, s


# ---------------------------------------------------------------------------------------------- I2, I3


@pytest.mark.parametrize("gates", [True, False], ids=["gates", "nogates"])
@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("chunk_size", [1, 4, 16])
@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_chunked_matches_chunk_start_reference(memory, chunk_size, heads, gates):
    """I2 forward: the chunked dual form equals the primal loop with chunk-start autograd gradients (T=21)."""
    x, state = make_inputs(heads=heads, memory=memory, gates=gates, seed=chunk_size + heads)
    o, final = run(x, state, "torch", chunk_size, memory)
    o_ref, final_ref = run(x, state, "reference", chunk_size, memory)
    assert_rel_close(o, o_ref, 1e-10, "o")
    for name, a, b in zip(final._fields, final, final_ref):
        assert_rel_close(a, b, 1e-10, name)


@pytest.mark.parametrize("chunk_size", [1, 4, 16])
@pytest.mark.parametrize("memory", ["linear", "mlp", "mlp_ln"])
def test_chunked_gradients_match_reference(memory, chunk_size):
    """I2 backward: gradients of every input (q, k, v, gates, initial state, LN head) equal the oracle's."""
    kind = "linear" if memory == "linear" else "mlp"
    x, state = make_inputs(seq=19, heads=2, memory=kind, seed=3, requires_grad=True)
    kw = {}
    if memory == "mlp_ln":
        kw = dict(
            mlp_residual_norm=True,
            ln_weight=(1 + 0.3 * torch.randn(2, 6, dtype=F64)).requires_grad_(),
            ln_bias=(0.1 * torch.randn(2, 6, dtype=F64)).requires_grad_(),
        )
    leaves = [*x.values(), *state] + ([kw["ln_weight"], kw["ln_bias"]] if kw else [])
    g = torch.Generator().manual_seed(7)
    grads = {}
    for backend in ("torch", "reference"):
        o, final = run(x, state, backend, chunk_size, kind, **kw)
        # A random cotangent on the outputs and on the final state checks both gradient paths.
        loss = (o * torch.randn(o.shape, generator=g, dtype=F64)).sum()
        for t in final:
            loss = loss + (t * torch.randn(t.shape, generator=g, dtype=F64)).sum()
        grads[backend] = torch.autograd.grad(loss, leaves)
        g = torch.Generator().manual_seed(7)
    for i, (a, b) in enumerate(zip(grads["torch"], grads["reference"])):
        assert_rel_close(a, b, 1e-9, f"grad of leaf {i}")


@pytest.mark.parametrize("chunk_size", [1, 4, 16])
def test_dual_equals_closed_form_primal_linear(chunk_size):
    """I1 (chunk 1) and I3: dual form equals a per-token primal loop with explicit weights, incl. final state."""
    x, state = make_inputs(seq=37, heads=4, seed=11)
    o, final = run(x, state, "torch", chunk_size)
    o_p, w_p, s_p = primal_linear(*x.values(), chunk_size, *state)
    assert_rel_close(o, o_p, 1e-11, "o")
    assert_rel_close(final.weight, w_p, 1e-11, "W")
    assert_rel_close(final.momentum, s_p, 1e-11, "S")


def test_online_loop_with_autograd_mlp():
    """I1 for the MLP memory: chunk 1 equals an online loop that differentiates at ``W_{t−1}`` every token."""
    x, state = make_inputs(seq=9, heads=2, memory="mlp", seed=5)
    o, final = run(x, state, "torch", 1, "mlp")
    w1, w2, s1, s2 = (t.clone() for t in state)
    outs = []
    for t in range(9):
        wa, wb = w1.detach().requires_grad_(), w2.detach().requires_grad_()
        pred = torch.nn.functional.gelu(x["k"][:, t, :, None, :] @ wa) @ wb
        ga, gb = torch.autograd.grad(0.5 * (pred.squeeze(-2) - x["v"][:, t]).pow(2).sum(), (wa, wb))
        th, et, al = (x[n][:, t, :, None, None] for n in GATE_NAMES)
        s1, s2 = et * s1 - th * ga, et * s2 - th * gb
        w1, w2 = (1 - al) * w1 + s1, (1 - al) * w2 + s2
        outs.append((torch.nn.functional.gelu(x["q"][:, t, :, None, :] @ w1) @ w2).squeeze(-2))
    assert_rel_close(o, torch.stack(outs, 1), 1e-11, "o")
    assert_rel_close(final.w2, w2, 1e-11, "w2")


def test_chunk_size_is_semantic():
    """Different chunk sizes give different outputs (so I2 per chunk size is not vacuous)."""
    x, state = make_inputs(seq=16, seed=2)
    o1, _ = run(x, state, "torch", 1)
    o16, _ = run(x, state, "torch", 16)
    assert rel_err(o16, o1) > 1e-3


# ---------------------------------------------------------------------------------------------- I4, I5


def _slice(x, a, b):
    return {n: (None if t is None else t[:, a:b]) for n, t in x.items()}


@pytest.mark.parametrize("chunk_size", [4, 16])
@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_split_at_chunk_boundary_with_state(memory, chunk_size):
    """I4: two calls split at a multiple of the chunk size, state carried, equal one call."""
    x, state = make_inputs(seq=3 * chunk_size + 3, heads=2, memory=memory, seed=9)
    o, final = run(x, state, "torch", chunk_size, memory)
    for split in (chunk_size, 2 * chunk_size):
        o1, st1 = run(_slice(x, 0, split), state, "torch", chunk_size, memory)
        o2, st2 = run(_slice(x, split, None), st1, "torch", chunk_size, memory)
        assert_rel_close(torch.cat([o1, o2], 1), o, 1e-12, f"o split {split}")
        for name, a, b in zip(final._fields, st2, final):
            assert_rel_close(a, b, 1e-12, f"{name} split {split}")


def test_token_by_token_decode_equals_prefill():
    """I4 with chunk 1: feeding one token per call, carrying the state, equals one parallel call."""
    x, state = make_inputs(seq=11, heads=2, seed=10)
    o, final = run(x, state, "torch", 1)
    outs, st = [], state
    for t in range(11):
        o_t, st = run(_slice(x, t, t + 1), st, "torch", 1)
        outs.append(o_t)
    assert_rel_close(torch.cat(outs, 1), o, 1e-12, "o")
    assert_rel_close(st.weight, final.weight, 1e-12, "W")


@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_split_mid_chunk_needs_pending_tokens(memory):
    """I4 mid-chunk: a naive split restarts the chunk (differs); replaying the pending tokens from the last
    boundary state (the documented layer contract) reproduces the one-call outputs and final state."""
    b, split, seq = 4, 6, 15
    x, state = make_inputs(seq=seq, heads=2, memory=memory, seed=4)
    o, final = run(x, state, "torch", b, memory)
    o1, st1 = run(_slice(x, 0, split), state, "torch", b, memory)
    o2_naive, _ = run(_slice(x, split, None), st1, "torch", b, memory)
    assert rel_err(o2_naive, o[:, split:]) > 1e-4
    boundary = split - split % b
    _, st_b = run(_slice(x, 0, boundary), state, "torch", b, memory)
    o2, st2 = run(_slice(x, boundary, None), st_b, "torch", b, memory)
    assert_rel_close(torch.cat([o1, o2[:, split - boundary :]], 1), o, 1e-12, "o")
    for name, a, c in zip(final._fields, st2, final):
        assert_rel_close(a, c, 1e-12, name)


@pytest.mark.parametrize("chunk_size", [4, 16])
@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_causality_inside_chunk(memory, chunk_size):
    """I5: perturbing every input after token t (t in mid-chunk) leaves outputs ≤ t bit-identical."""
    x, state = make_inputs(seq=20, heads=2, memory=memory, seed=6)
    t = 9  # mid-chunk for both chunk sizes
    o, _ = run(x, state, "torch", chunk_size, memory)
    y = {n: v.clone() for n, v in x.items()}
    y["q"][:, t + 1 :] += 1.0
    y["k"][:, t + 1 :] -= 0.5
    y["v"][:, t + 1 :] *= 3.0
    y["lr"][:, t + 1 :] = 0.25
    y["momentum"][:, t + 1 :] = 0.5
    y["decay"][:, t + 1 :] = 0.1
    o2, _ = run(y, state, "torch", chunk_size, memory)
    assert torch.equal(o[:, : t + 1], o2[:, : t + 1])
    assert not torch.allclose(o[:, t + 1 :], o2[:, t + 1 :])


# ---------------------------------------------------------------------------------------------- I6, I7, I11


def test_reduces_to_delta_rule():
    """I6: η = 0, α = 0, chunk 1, linear memory = delta rule with β = θ and scale 1."""
    x, state = make_inputs(seq=25, heads=4, gates=False, seed=8)
    w = state.weight
    outs = []
    for t in range(25):
        kt, vt, qt, beta = x["k"][:, t], x["v"][:, t], x["q"][:, t], x["lr"][:, t, :, None]
        u = beta * (vt - torch.einsum("bhkv,bhk->bhv", w, kt))
        w = w + kt.unsqueeze(-1) * u.unsqueeze(-2)
        outs.append(torch.einsum("bhkv,bhk->bhv", w, qt))
    for gates in ("none", "zeros"):
        y = dict(x)
        if gates == "zeros":
            y["momentum"] = torch.zeros_like(x["lr"])
            y["decay"] = torch.zeros_like(x["lr"])
        o, final = run(y, LinearMemoryState(state.weight, torch.zeros_like(w)), "torch", 1)
        assert_rel_close(o, torch.stack(outs, 1), 1e-11, f"o ({gates})")
        assert_rel_close(final.weight, w, 1e-11, f"W ({gates})")


@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_zero_lr_freezes_memory(memory):
    """I7: θ = 0, α = 0 and zero momentum: the memory never changes, ``o = M_0(q)``."""
    x, state = make_inputs(seq=13, heads=2, memory=memory, seed=1)
    x["lr"] = torch.zeros_like(x["lr"])
    x["decay"] = torch.zeros_like(x["lr"])
    state = type(state)(*state[: len(state) // 2], *(torch.zeros_like(t) for t in state[len(state) // 2 :]))
    o, final = run(x, state, "torch", 4, memory)
    if memory == "linear":
        expected = torch.einsum("bthk,bhkv->bthv", x["q"], state.weight)
    else:
        expected = torch.einsum("bthj,bhjv->bthv", torch.nn.functional.gelu(torch.einsum("bthk,bhkj->bthj", x["q"], state.w1)), state.w2)
    assert_rel_close(o, expected, 1e-13, "o")
    for a, b in zip(final, state):
        assert torch.equal(a, b)


def test_full_forget_keeps_only_current_surprise():
    """I7: α = 1 and η = 0, chunk 1: ``W_t = −θ_t k_t (W_{t−1}ᵀ k_t − v_t)ᵀ``."""
    x, state = make_inputs(seq=6, heads=1, gates=False, seed=12)
    x["decay"] = torch.ones_like(x["lr"])
    o, final = run(x, state, "torch", 1)
    w_prev = primal_linear(*_slice(x, 0, 5).values(), 1, *state)[1]
    kt, vt = x["k"][:, 5], x["v"][:, 5]
    err = torch.einsum("bhk,bhkv->bhv", kt, w_prev) - vt
    expected = -x["lr"][:, 5, :, None, None] * kt.unsqueeze(-1) * err.unsqueeze(-2)
    assert_rel_close(final.weight, expected, 1e-12, "W")


@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_extreme_gates_stay_finite(memory):
    """I11: α → 1 − 1e-6 and η → 0 (and exactly 0) in fp32: finite outputs and gradients, close to the oracle."""
    x, state = make_inputs(seq=40, heads=2, memory=memory, dtype=torch.float32, seed=13)
    x["decay"] = torch.full_like(x["lr"], 1 - 1e-6)
    x["decay"][:, ::3] = 0.05
    x["momentum"] = torch.full_like(x["lr"], 1e-7)
    x["momentum"][:, ::4] = 0.0
    x["momentum"][:, 1::4] = 0.9
    x = {n: t.requires_grad_() for n, t in x.items()}
    o, final = run(x, state, "torch", 16, memory)
    grads = torch.autograd.grad(o.square().sum() + final[0].square().sum(), list(x.values()))
    assert torch.isfinite(o).all() and all(torch.isfinite(g).all() for g in grads)
    o_ref, _ = run({n: t.detach() for n, t in x.items()}, state, "reference", 16, memory)
    assert_rel_close(o, o_ref, 1e-4, "o")


# ---------------------------------------------------------------------------------------------- I8


@pytest.mark.parametrize("memory", ["linear", "mlp_ln"])
def test_gradcheck(memory):
    """I8: float64 gradcheck of the chunked op (second-order path through the inner gradient included)."""
    kind = "linear" if memory == "linear" else "mlp"
    x, state = make_inputs(batch=1, seq=5, heads=1, key_dim=3, value_dim=3, hidden=4, memory=kind, seed=14)
    kw = dict(mlp_residual_norm=True, mlp_activation="silu") if memory == "mlp_ln" else {}
    names = list(x)
    n_state = len(state)

    def f(*args):
        xx = dict(zip(names, args[: len(names)]))
        o, final = run(xx, type(state)(*args[len(names) :]), "torch", 2, kind, **kw)
        return o, *final

    inputs = [t.detach().clone().requires_grad_() for t in (*x.values(), *state)]
    assert len(inputs) == len(names) + n_state
    # The MLP's full Jacobian is slow on 2 cores; fast mode checks random directions of it.
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=kind == "mlp")


# ---------------------------------------------------------------------------------------------- dtypes, errors


def test_fp32_and_bf16_inputs():
    """fp32 state whatever the input dtype; fp32 matches fp64 closely; outputs return in the input dtype."""
    x, state = make_inputs(seq=33, heads=2, seed=15)
    o64, _ = run(x, state, "torch", 16)
    x32 = {n: t.float() for n, t in x.items()}
    o32, f32 = run(x32, LinearMemoryState(*(t.float() for t in state)), "torch", 16)
    assert o32.dtype == torch.float32 and f32.weight.dtype == torch.float32
    assert_rel_close(o32, o64, 1e-5, "fp32")
    xb = {n: t.bfloat16() for n, t in x32.items()}
    ob, fb = run(xb, LinearMemoryState(*(t.float() for t in state)), "torch", 16)
    assert ob.dtype == torch.bfloat16 and fb.weight.dtype == torch.float32
    assert_rel_close(ob, o64, 5e-2, "bf16")


def test_default_state_and_no_final_state():
    x, _ = make_inputs(seq=7, seed=16)
    o, final = neural_memory(x["q"], x["k"], x["v"], x["lr"], x["momentum"], x["decay"], chunk_size=4)
    o_ref, _ = run(x, None, "reference", 4)
    assert final is None
    assert_rel_close(o, o_ref, 1e-12)


def _bad_calls():
    x, st = make_inputs(seq=5, heads=2, seed=0)
    _, mst = make_inputs(seq=5, heads=2, memory="mlp", seed=0)
    q, k, v, lr, mo, de = x.values()
    bad_w = LinearMemoryState(st.weight[:, :1], st.momentum)
    return [
        ("q 3-d", dict(q=q[..., 0]), "q must be"),
        ("v heads", dict(v=v[:, :, :1]), "v has shape"),
        ("lr shape", dict(lr=lr[:, :4]), "lr has shape"),
        ("lr negative", dict(lr=-lr), "lr must lie"),
        ("momentum > 1", dict(momentum=mo + 1.5), "momentum must lie"),
        ("decay < 0", dict(decay=de - 1), "decay must lie"),
        ("decay nan", dict(decay=de.clone().fill_(float("nan"))), "decay contains NaN"),
        ("lr int", dict(lr=lr.long()), "floating-point"),
        ("chunk 0", dict(chunk_size=0), "chunk_size"),
        ("chunk float", dict(chunk_size=2.0), "chunk_size"),
        ("memory kind", dict(memory="deep"), "unknown memory"),
        ("backend", dict(backend="cuda"), "unknown backend"),
        ("retrieval", dict(retrieval="segment"), "unknown retrieval"),
        ("state tensor", dict(initial_state=st.weight), "(weight, momentum) pair"),
        ("state shape", dict(initial_state=bad_w), "initial_state.weight has shape"),
        ("mlp no state", dict(memory="mlp"), "needs initial_state"),
        ("mlp linear state", dict(memory="mlp", initial_state=st), "MLPMemoryState"),
        ("mlp w2 shape", dict(memory="mlp", initial_state=mst._replace(w2=mst.w2[..., :3])), "initial_state.w2 has shape"),
        ("mlp activation", dict(memory="mlp", initial_state=mst, mlp_activation="swish"), "mlp_activation"),
        ("ln on linear", dict(mlp_residual_norm=True), "memory='mlp' only"),
        (
            "ln weight shape",
            dict(memory="mlp", initial_state=mst, mlp_residual_norm=True, ln_weight=torch.ones(3, 6, dtype=F64)),
            "ln_weight has shape",
        ),
        ("mlp triton grad", dict(memory="mlp", initial_state=mst, backend="triton", q=q.clone().requires_grad_()), "inference-only"),
    ]


@pytest.mark.parametrize(
    "case",
    # A Triton call on CPU tensors reaches the op's own checks only under the interpreter.
    [pytest.param(c, id=c[0], marks=[pytest.mark.triton] if c[1].get("backend") == "triton" else []) for c in _bad_calls()],
)
def test_input_errors(case):
    _, override, match = case
    x, _ = make_inputs(seq=5, heads=2, seed=0)
    args = {**x, "chunk_size": 4, **override}
    pos = [args.pop(n) for n in ("q", "k", "v", "lr", "momentum", "decay")]
    with checking():  # the value checks (NaN, a positive gate, bad offsets) run in checking mode
        with pytest.raises(OpInputError, match=re.escape(match)) as info:
            neural_memory(*pos, **args)
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- retrieval="chunk"


@pytest.mark.parametrize("chunk_size", [1, 4, 16])
def test_chunk_retrieval_reference_equals_closed_form_primal(chunk_size):
    """The oracle's chunk-granular reads equal a hand-written primal loop (T=21: a partial last chunk)."""
    x, state = make_inputs(seq=21, heads=2, seed=40 + chunk_size)
    o, final = run(x, state, "reference", chunk_size, retrieval="chunk")
    o_p, w_p, s_p = primal_linear(*x.values(), chunk_size, *state, retrieval="chunk")
    assert_rel_close(o, o_p, 1e-12, "o")
    assert_rel_close(final.weight, w_p, 1e-12, "W")
    assert_rel_close(final.momentum, s_p, 1e-12, "S")


@pytest.mark.parametrize("chunk_size", [4, 16])
@pytest.mark.parametrize("memory", ["linear", "mlp_ln"])
def test_chunk_retrieval_chunked_matches_reference_with_gradients(memory, chunk_size):
    kind = "linear" if memory == "linear" else "mlp"
    x, state = make_inputs(seq=19, heads=2, memory=kind, seed=41, requires_grad=True)
    kw = {"retrieval": "chunk"}
    if kind == "mlp":
        kw.update(mlp_residual_norm=True, ln_weight=(1 + 0.3 * torch.randn(2, 6, dtype=F64)).requires_grad_())
    leaves = [*x.values(), *state] + ([kw["ln_weight"]] if kind == "mlp" else [])
    results = {}
    for backend in ("torch", "reference"):
        g = torch.Generator().manual_seed(8)
        o, final = run(x, state, backend, chunk_size, kind, **kw)
        loss = (o * torch.randn(o.shape, generator=g, dtype=F64)).sum()
        loss = loss + sum((t * torch.randn(t.shape, generator=g, dtype=F64)).sum() for t in final)
        results[backend] = (o, torch.autograd.grad(loss, leaves))
    assert_rel_close(results["torch"][0], results["reference"][0], 1e-10, "o")
    for i, (a, b) in enumerate(zip(results["torch"][1], results["reference"][1])):
        assert_rel_close(a, b, 1e-9, f"grad of leaf {i}")


@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_chunk_retrieval_reads_only_completed_chunks(memory):
    """Tokens inside a chunk do not see their own chunk's writes (not even earlier tokens'); its last token
    does; chunk 1 is the per-token read; the writes and final state do not depend on the retrieval."""
    chunk = 4
    x, state = make_inputs(seq=14, heads=2, memory=memory, seed=42)
    o, final = run(x, state, "torch", chunk, memory, retrieval="chunk")
    o_token, final_token = run(x, state, "torch", chunk, memory)
    for a, b in zip(final, final_token):
        assert torch.equal(a, b)
    one, _ = run(x, state, "torch", 1, memory, retrieval="chunk")
    assert_rel_close(one, run(x, state, "torch", 1, memory)[0], 1e-12, "chunk 1")
    assert rel_err(o, o_token) > 1e-3  # the two reads differ at chunk 4
    for j in (4, 5, 12):  # perturb one token's write: tokens 4 (start of chunk 1), 5, 12 (partial last chunk)
        y = {n: t.clone() for n, t in x.items()}
        y["v"][:, j] += 1.0
        o2, _ = run(y, state, "torch", chunk, memory, retrieval="chunk")
        end = (j // chunk + 1) * chunk - 1  # the last token of j's chunk
        changed = (o2 - o).abs().amax(dim=(0, 2, 3)) > 1e-12
        assert not changed[:end].any(), f"write of token {j} was read before its chunk ended"
        if end < 14:
            assert changed[end:].all(), f"write of token {j} is not read from its chunk's last token on"


# ---------------------------------------------------------------------------------------------- Triton


def _grads(x, state, backend, chunk_size, seed=21, retrieval="token"):
    """Outputs, final state and gradients of every input under a random cotangent."""
    x = {n: (None if t is None else t.detach().clone().requires_grad_()) for n, t in x.items()}
    state = LinearMemoryState(*(t.detach().clone().requires_grad_() for t in state))
    o, final = run(x, state, backend, chunk_size, retrieval=retrieval)
    g = torch.Generator().manual_seed(seed)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in (o, *final))
    leaves = [t for t in (*x.values(), *state) if t is not None]
    return o, final, torch.autograd.grad(loss, leaves)


@pytest.mark.triton
@pytest.mark.parametrize(
    "case",
    [
        dict(seq=37, heads=2, key_dim=6, value_dim=6, chunk=16, dtype=torch.float32, gates=True),
        dict(seq=21, heads=1, key_dim=8, value_dim=80, chunk=4, dtype=torch.float32, gates=True),  # 2 value blocks
        dict(seq=21, heads=2, key_dim=5, value_dim=7, chunk=5, dtype=F64, gates=True),
        dict(seq=9, heads=2, key_dim=4, value_dim=4, chunk=1, dtype=torch.float32, gates=False),
        dict(seq=1, heads=1, key_dim=4, value_dim=4, chunk=16, dtype=torch.float32, gates=True),
        dict(seq=21, heads=2, key_dim=6, value_dim=6, chunk=4, dtype=torch.float32, gates=True, retrieval="chunk"),
    ],
    ids=["fp32-c16", "fp32-c4-V80", "fp64-c5", "fp32-c1-nogates", "fp32-T1", "fp32-c4-chunk-read"],
)
def test_triton_matches_reference(case):
    """Triton forward and hand-written backward (interpreter on CPU) equal autograd through the oracle."""
    dtype = case["dtype"]
    x, state = make_inputs(
        batch=2, seq=case["seq"], heads=case["heads"], key_dim=case["key_dim"], value_dim=case["value_dim"],
        gates=case["gates"], dtype=dtype, seed=case["seq"],
    )  # fmt: skip
    tol = 1e-12 if dtype == F64 else 2e-5
    retrieval = case.get("retrieval", "token")
    o, final, grads = _grads(x, state, "triton", case["chunk"], retrieval=retrieval)
    o_ref, final_ref, grads_ref = _grads(x, state, "reference", case["chunk"], retrieval=retrieval)
    assert o.dtype == dtype
    assert_rel_close(o, o_ref, tol, "o")
    for name, a, b in zip(final._fields, final, final_ref):
        assert_rel_close(a, b, tol, name)
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        assert_rel_close(a, b, tol, f"grad of leaf {i}")


@pytest.mark.triton
def test_triton_no_grad_and_gradcheck():
    """Inference path (no saved states) equals the torch path; fp64 gradcheck of the Triton backward."""
    x, state = make_inputs(seq=19, heads=2, dtype=torch.float32, seed=30)
    with torch.no_grad():
        o, final = run(x, state, "triton", 8)
        o_t, final_t = run(x, state, "torch", 8)
    assert_rel_close(o, o_t, 2e-6, "o")
    assert_rel_close(final.weight, final_t.weight, 2e-6, "W")
    # bf16 inputs (computed in fp32 by the interpreter, which gets bf16 math wrong), fp32 state.
    o_b, final_b = run({n: t.bfloat16() for n, t in x.items()}, state, "triton", 8)
    assert o_b.dtype == torch.bfloat16 and final_b.weight.dtype == torch.float32
    assert_rel_close(o_b, o_t, 3e-2, "bf16")

    x, state = make_inputs(batch=1, seq=6, heads=1, key_dim=3, value_dim=3, seed=31)
    names = list(x)

    def f(*args):
        o, final = run(dict(zip(names, args[:6])), LinearMemoryState(*args[6:]), "triton", 4)
        return o, *final

    inputs = [t.detach().clone().requires_grad_() for t in (*x.values(), *state)]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.triton
@pytest.mark.parametrize(
    "case",
    [
        dict(seq=37, key_dim=8, value_dim=8, hidden=32, chunk=16, dtype=torch.float32, act="gelu", ln=False),
        dict(seq=21, key_dim=6, value_dim=6, hidden=20, chunk=5, dtype=F64, act="silu", ln=True),
        dict(seq=21, key_dim=6, value_dim=6, hidden=20, chunk=4, dtype=torch.float32, act="gelu", ln=False, retrieval="chunk"),
    ],
    ids=["fp32-gelu-c16", "fp64-silu-ln-c5", "fp32-gelu-c4-chunk-read"],
)
def test_triton_mlp_forward_matches_reference(case):
    """The forward-only MLP kernel (hidden streamed in blocks, state in global memory) equals the oracle."""
    dtype = case["dtype"]
    x, state = make_inputs(
        batch=2, seq=case["seq"], heads=2, key_dim=case["key_dim"], value_dim=case["value_dim"],
        hidden=case["hidden"], memory="mlp", dtype=dtype, seed=case["seq"],
    )  # fmt: skip
    kw = dict(mlp_activation=case["act"], mlp_residual_norm=case["ln"], retrieval=case.get("retrieval", "token"))
    if case["ln"]:
        kw.update(
            ln_weight=1 + 0.3 * torch.randn(2, case["value_dim"], dtype=dtype), ln_bias=0.1 * torch.randn(2, case["value_dim"], dtype=dtype)
        )
    o, final = run(x, state, "triton", case["chunk"], "mlp", **kw)
    o_ref, final_ref = run(x, state, "reference", case["chunk"], "mlp", **kw)
    tol = 1e-12 if dtype == F64 else 2e-5
    assert_rel_close(o, o_ref, tol, "o")
    for name, a, b in zip(final._fields, final, final_ref):
        assert_rel_close(a, b, tol, name)
    assert final.w1.data_ptr() != state.w1.data_ptr()  # the kernel updates a copy, never the caller's state


@pytest.mark.parametrize("retrieval", ["token", "chunk"])
@pytest.mark.parametrize("memory", ["linear", "mlp"])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_streaming_from_the_middle_of_a_chunk_equals_one_call(memory, retrieval, backend):
    # A decoder keeps the memory now and at its chunk's start; continuing with phase/chunk_start token by token
    # (and once with a 7-token call that crosses a boundary) gives the one-call outputs.
    chunk = 4
    x, state = make_inputs(seq=21, memory=memory, seed=3)
    kw = dict(chunk_size=chunk, memory=memory, retrieval=retrieval)
    if memory == "mlp":
        kw.update(mlp_activation="gelu")
    names = ("q", "k", "v", "lr", "momentum", "decay")
    full, _ = neural_memory(*(x[n] for n in names), initial_state=state, **kw)

    def part(a, b, initial, phase=0, start=None):
        return neural_memory(*(x[n][:, a:b] for n in names), initial_state=initial, output_final_state=True, phase=phase,
                             chunk_start=start, backend=backend, **kw)  # fmt: skip

    outs, seen = [], 0
    start = state
    current = state
    for length in (2, 1, 7, 1, 1, 1, 8):
        phase = seen % chunk
        o, final = part(seen, seen + length, current, phase, start if phase else None)
        # The next chunk start: the state at the last boundary this call reached (from a second call to the op).
        reached = (seen + length) // chunk * chunk
        if reached > seen:
            _, start = part(seen, reached, current, phase, start if phase else None) if reached < seen + length else (None, final)
        outs.append(o)
        current, seen = final, seen + length
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-10, atol=1e-12)


def test_phase_needs_its_chunk_start():
    x, state = make_inputs(seq=3)
    names = ("q", "k", "v", "lr", "momentum", "decay")
    with pytest.raises(OpInputError, match="phase > 0 needs chunk_start"):
        neural_memory(*(x[n] for n in names), chunk_size=4, initial_state=state, phase=2)
    with pytest.raises(OpInputError, match=r"phase must be an int in \[0, chunk_size\)"):
        neural_memory(*(x[n] for n in names), chunk_size=4, initial_state=state, phase=4, chunk_start=state)
