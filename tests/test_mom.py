"""MoM (Mixture-of-Memories): the invariants of the routed memories, each against a reference that does not run
the packed path it checks.

* M = 1, k = 1, no shared memory is one ``gated_deltanet`` layer with the same weights;
* fixed one-hot routing equals the op run on each memory's own token subsequence (its convs included);
* the packed varlen path equals the padded capacity-1.0 path in float64, outputs and the gradients of every
  parameter (the router's too), for every update rule, with and without the shared memory, packed documents;
* decoding: prefill + steps equal the parallel form; a step leaves the memories it did not route to bitwise as
  they were; routing renormalises to 1;
* the two balance losses equal k under balanced routing and grow when it collapses;
* causality when a later token moves the segment boundaries of the sort;
* fla compatibility: an fla-format ``MomAttention`` state_dict loads, and the layer computes fla's inference path,
  written here token by token from the equations (fla itself needs CUDA);
* the model config's ``balance_loss`` is validated, and a training step logs it with the loads.

The conformance suite (``tests/test_mixer_contract.py``) and ``tests/test_compile.py`` cover ``mom`` as every mixer.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn.functional as F

import seqzoo.training as training
from seqzoo.configs import ConfigError
from seqzoo.models import LanguageModel, LanguageModelConfig, build_mixer
from seqzoo.models.mom import layer_balance_loss, route, routing_loads, switch_balance_loss
from seqzoo.ops import gated_delta_rule
from tests.helpers import assert_rel_close
from tests.test_training import make_cfg

HIDDEN = 24
BASE = {"num_memories": 3, "topk": 2, "num_heads": 2, "head_dim": 6, "expand_v": 1.5, "conv_size": 3}


def make(seed: int = 0, **options) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_mixer("mom", HIDDEN, 0, {**BASE, **options}).double()


def twin(layer: torch.nn.Module, **options) -> torch.nn.Module:
    """A second layer with ``layer``'s weights and other options (e.g. ``path="padded"``)."""
    other = make(**{**_options(layer), **options})
    other.load_state_dict(layer.state_dict())
    return other


def _options(layer) -> dict:
    return {
        "num_memories": layer.num_memories,
        "topk": layer.topk,
        "shared_memory": layer.shared_memory,
        "single_kv_proj": layer.single_kv_proj,
        "update_rule": layer.update_rule,
        "use_short_conv": layer.use_short_conv,
    }


def forward_and_grads(layer, x, cu_seqlens=None):
    """Output and the gradients of the input and of every parameter, for a fixed random cotangent."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = layer(x, cu_seqlens=cu_seqlens)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * weight).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


# --------------------------------------------------------------------------------------- references


def test_one_memory_top1_without_shared_memory_is_gated_deltanet():
    torch.manual_seed(0)
    gdn = build_mixer("gated_deltanet", HIDDEN, 0, {"num_heads": 2, "head_dim": 6, "expand_v": 1.5, "conv_size": 3}).double()
    mom = make(num_memories=1, topk=1, shared_memory=False)
    renamed = {"convs.q.conv.weight": "q_conv1d.conv.weight", "convs.k.conv.weight": "k_conv1d.conv.weight"}
    renamed |= {"convs.v.conv.weight": "v_conv1d.conv.weight"}
    renamed |= {f"{p}_proj.weight": f"{p}_proj.0.weight" for p in "kvab"}
    weights = {renamed.get(name, name): value for name, value in gdn.state_dict().items()}
    missing = mom.load_state_dict(weights, strict=False)
    assert missing.unexpected_keys == [] and missing.missing_keys == ["gate.weight"]  # M = 1: the router is moot

    x = torch.randn(2, 21, HIDDEN, dtype=torch.float64)
    for cu in (None, torch.tensor([0, 7, 8, 21])):
        xs = x[:1] if cu is not None else x
        got, want = forward_and_grads(mom, xs, cu), forward_and_grads(gdn, xs, cu)
        assert_rel_close(got[0], want[0], 1e-12, "output")
        assert_rel_close(got[1], want[1], 1e-12, "input gradient")
        for name, _ in gdn.named_parameters():
            assert_rel_close(got[2][renamed.get(name, name)], want[2][name], 1e-11, name)
    with torch.no_grad():
        cache_a, cache_b = mom.init_cache(2), gdn.init_cache(2)
        steps = [(mom(x[:, t : t + 1], cache=cache_a), gdn(x[:, t : t + 1], cache=cache_b)) for t in range(6)]
    assert all(torch.allclose(a, b, rtol=0, atol=1e-13) for a, b in steps)


def _conv_silu(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Causal depthwise conv of ``x [seq, channels]`` with an ``nn.Conv1d`` weight ``[channels, 1, taps]``, then SiLU."""
    taps = weight.shape[-1]
    padded = torch.cat([x.new_zeros(taps - 1, x.shape[1]), x])
    return F.silu(torch.stack([(padded[t : t + taps].T * weight[:, 0]).sum(-1) for t in range(x.shape[0])]))


@pytest.mark.parametrize("single_kv_proj", [False, True])
def test_fixed_one_hot_routing_runs_the_op_on_each_memory_subsequence(single_kv_proj):
    layer = make(topk=1, shared_memory=False, single_kv_proj=single_kv_proj)
    x = torch.randn(2, 19, HIDDEN, dtype=torch.float64)
    assignment = torch.randint(0, 3, (2, 19))
    assignment[0, :4] = 1  # a run on one memory, and memory 2 never used by row 0 below
    assignment[0][assignment[0] == 2] = 0
    # The router is replaced: huge logits on the assigned memory give a one-hot routing with weight exactly 1.
    layer.router = lambda inp: F.one_hot(assignment, 3).to(torch.float64) * 1e3
    got = layer(x)

    o = torch.zeros(2, 19, 2, 9, dtype=torch.float64)
    for b in range(2):
        for m in range(3):
            idx = (assignment[b] == m).nonzero()[:, 0]
            if idx.numel() == 0:
                continue
            xs = x[b, idx]
            k_lin = layer.shared_k if single_kv_proj else layer.k_proj[m]
            v_lin = layer.shared_v if single_kv_proj else layer.v_proj[m]
            b_lin = layer.shared_b if single_kv_proj else layer.b_proj[m]
            a_lin = layer.shared_a if single_kv_proj else layer.a_proj[m]
            q = _conv_silu(layer.q_conv1d.conv.weight, layer.q_proj(xs)).view(1, -1, 2, 6)
            k = _conv_silu(layer.k_conv1d.conv.weight, k_lin(xs)).view(1, -1, 2, 6)
            v = _conv_silu(layer.v_conv1d.conv.weight, v_lin(xs)).view(1, -1, 2, 9)
            beta = torch.sigmoid(b_lin(xs))[None]
            g = (-layer.A_log.exp() * F.softplus(a_lin(xs) + layer.dt_bias))[None]
            o[b, idx] = gated_delta_rule(q, k, v, beta, g, use_qk_l2norm=True, backend="reference")[0][0]
    want = layer.o_proj(layer.o_norm(o, layer.g_proj(x).view(2, 19, 2, 9)).flatten(-2))
    assert_rel_close(got, want, 1e-12, "one-hot routing")


CASES = [
    {},
    {"shared_memory": False},
    {"single_kv_proj": True},
    {"update_rule": "delta_rule"},
    {"update_rule": "simple_gla", "shared_memory": False},
    {"update_rule": "simple_gla", "topk": 3},
    {"topk": 1, "use_short_conv": False},
]


@pytest.mark.parametrize("options", CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_packed_path_equals_padded_reference_outputs_and_every_gradient(options):
    packed = make(**options)
    padded = twin(packed, path="padded")
    for x, cu in (
        (torch.randn(2, 23, HIDDEN, dtype=torch.float64), None),
        (torch.randn(1, 30, HIDDEN, dtype=torch.float64), torch.tensor([0, 11, 12, 30])),
    ):
        got, want = forward_and_grads(packed, x, cu), forward_and_grads(padded, x, cu)
        assert_rel_close(got[0], want[0], 1e-12, "output")
        assert_rel_close(got[1], want[1], 1e-12, "input gradient")
        assert set(got[2]) == set(want[2])
        for name, grad in want[2].items():
            if name == "gate.weight" and packed.topk == 1:
                # One memory per token has the weight w/w = 1 whatever the logits: no gradient reaches the router.
                assert got[2][name].abs().max() < 1e-13 and grad.abs().max() < 1e-13
                continue
            assert grad is not None and grad.abs().sum() > 0, f"{name}: no gradient"
            assert_rel_close(got[2][name], grad, 1e-11, name)


# ------------------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("options", [{}, {"single_kv_proj": True, "topk": 1}, {"update_rule": "simple_gla"}, {"use_short_conv": False}])
def test_prefill_then_decode_equals_parallel(options):
    layer = make(**options)
    x = torch.randn(3, 17, HIDDEN, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x)
        cache = layer.init_cache(3)
        pieces = [layer(x[:, :6], cache=cache)] + [layer(x[:, t : t + 1], cache=cache) for t in range(6, 17)]
    assert_rel_close(torch.cat(pieces, 1), full, 1e-12, "decode")
    assert cache.nbytes() == layer.state_size(batch=3)


def test_a_decode_step_leaves_the_memories_it_did_not_route_to_bitwise_unchanged():
    layer = make(num_memories=4)
    x = torch.randn(3, 12, HIDDEN, dtype=torch.float64)
    with torch.no_grad():
        cache = layer.init_cache(3)
        layer(x[:, :11], cache=cache)
        before = {name: t.clone() for name, t in cache.tensors.items()}
        chosen = route(layer.router(x[:, 11:]), 2)[1][:, 0]  # [rows, k]
        layer(x[:, 11:], cache=cache)
    after = cache.tensors
    assert set(after) == {"recurrent", "shared", "conv_q", "conv_k", "conv_v", "shared_conv_q", "shared_conv_k", "shared_conv_v"}
    for r in range(3):
        for m in range(4):
            for name in ("recurrent", "conv_q", "conv_k", "conv_v"):
                same = torch.equal(after[name][r, m], before[name][r, m])
                assert same == (m not in chosen[r].tolist()), f"row {r}, memory {m}, {name}"
        assert not torch.equal(after["shared"][r], before["shared"][r])


def test_routing_weights_are_the_renormalised_top_k_probabilities():
    logits = torch.randn(5, 7, 6, dtype=torch.float64)
    weights, memories = route(logits, 3)
    assert torch.allclose(weights.sum(-1), torch.ones(5, 7, dtype=torch.float64), rtol=0, atol=1e-15)
    probs = logits.softmax(-1)
    picked = probs.gather(-1, memories)
    assert torch.allclose(weights, picked / picked.sum(-1, keepdim=True)) and (picked.min(-1).values >= probs.topk(3).values[..., -1]).all()


def test_causal_when_a_later_token_moves_the_segment_boundaries():
    layer = make()
    x = torch.randn(2, 25, HIDDEN, dtype=torch.float64)
    changed = x.clone()
    changed[:, 12:] = torch.randn(2, 13, HIDDEN, dtype=torch.float64) * 3
    with torch.no_grad():
        a, b = layer(x), layer(changed)
        routes = route(layer.router(x), 2)[1], route(layer.router(changed), 2)[1]
    assert not torch.equal(routes[0][:, 12:], routes[1][:, 12:])  # later tokens go to other memories: new segment lengths
    assert torch.allclose(a[:, :12], b[:, :12], rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------------- balance losses


def _balanced_logits(tokens: int, num_memories: int, topk: int) -> torch.Tensor:
    """Token t prefers memories t, t+1, …, t+k−1 (mod M) equally: every memory is picked by k/M of the tokens
    and, by symmetry, has mean probability 1/M."""
    logits = torch.zeros(tokens, num_memories, dtype=torch.float64)
    for t in range(tokens):
        logits[t, [(t + j) % num_memories for j in range(topk)]] = 2.0
    return logits


@pytest.mark.parametrize("num_memories, topk", [(4, 2), (3, 1), (5, 3)])
def test_balance_losses_equal_topk_when_balanced_and_grow_when_routing_collapses(num_memories, topk):
    balanced = [_balanced_logits(4 * num_memories, num_memories, topk).view(2, -1, num_memories) for _ in range(3)]
    assert switch_balance_loss(balanced, topk).item() == pytest.approx(topk, rel=1e-12)
    assert layer_balance_loss(balanced, topk).item() == pytest.approx(topk, rel=1e-12)
    assert torch.allclose(routing_loads(balanced[0], topk), torch.full((num_memories,), topk / num_memories, dtype=torch.float32))
    collapsed = torch.zeros(2, 8, num_memories, dtype=torch.float64)
    collapsed[..., :topk] = 5.0
    for loss in (switch_balance_loss, layer_balance_loss):
        assert loss([collapsed], topk).item() > topk + 0.5 * (num_memories - topk)
    # Layers collapsed onto different memories look balanced to the all-layer (Switch) form, not per layer.
    layers = [torch.zeros(1, num_memories, num_memories, dtype=torch.float64) for _ in range(num_memories)]
    for i, layer_logits in enumerate(layers):
        layer_logits[..., [(i + j) % num_memories for j in range(topk)]] = 8.0
    assert switch_balance_loss(layers, topk).item() == pytest.approx(topk, rel=1e-3)
    assert layer_balance_loss(layers, topk).item() > topk + 0.5 * (num_memories - topk)


def test_switch_form_is_the_switch_formula():
    logits = [torch.randn(2, 9, 4, dtype=torch.float64), torch.randn(2, 9, 4, dtype=torch.float64)]
    flat = torch.cat([x.reshape(-1, 4) for x in logits])
    p = flat.softmax(-1)
    top = p.topk(2, -1).indices
    f = torch.stack([(top == m).double().mean(0).sum() for m in range(4)])  # summed over the k slots
    assert switch_balance_loss(logits, 2).item() == pytest.approx(4 * (f * p.mean(0)).sum().item(), rel=1e-12)


# ------------------------------------------------------------------------------------ fla compatibility


def fla_state_dict(hidden, heads, head_dim, expand_v, memories, conv, shared_mem, single_kv_proj, seed=0):
    """Random weights named and shaped as fla 0.6.0's ``MomAttention`` (use_output_gate, use_short_conv, no conv bias)."""
    gen = torch.Generator().manual_seed(seed)
    key, value = heads * head_dim, int(heads * head_dim * expand_v)

    def w(*shape, scale=0.3):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    sd = {"q_proj.weight": w(key, hidden), "gate.weight": w(memories, hidden, scale=1.0)}
    if single_kv_proj or shared_mem:
        sd |= {"shared_k.weight": w(key, hidden), "shared_v.weight": w(value, hidden)}
        sd |= {"shared_b.weight": w(heads, hidden), "shared_a.weight": w(heads, hidden)}
    if not single_kv_proj:
        for m in range(memories):
            sd |= {f"k_proj.{m}.weight": w(key, hidden), f"v_proj.{m}.weight": w(value, hidden)}
            sd |= {f"b_proj.{m}.weight": w(heads, hidden), f"a_proj.{m}.weight": w(heads, hidden)}
    sd |= {"A_log": w(heads, scale=1.0), "dt_bias": w(heads, scale=1.0)}
    sd |= {
        "q_conv1d.weight": w(key, 1, conv, scale=0.6),
        "k_conv1d.weight": w(key, 1, conv, scale=0.6),
        "v_conv1d.weight": w(value, 1, conv, scale=0.6),
    }
    sd |= {
        "g_proj.weight": w(value, hidden),
        "o_norm.weight": 1 + w(int(head_dim * expand_v), scale=0.1),
        "o_proj.weight": w(hidden, value),
    }
    return sd


def fla_inference(sd, x, heads, head_dim, head_v, memories, topk, shared_mem, single_kv_proj, eps=1e-5):
    """fla's MomAttention inference path for one sequence ``x [seq, hidden]``, one token at a time, in float64.

    Router: softmax of ``gate(x)`` in fp32, top-k, renormalised. Memory m keeps its own state and the raw
    projections of the tokens routed to it (its conv window); the shared memory keeps its own over every token.
    Per visit: SiLU(conv) of q/k/v over that window, β = σ(b), g = −exp(A_log)·softplus(a + dt_bias),
    L2-normalised q/k (eps 1e-6 inside the root), S ← e^g S, S ← S + β k (v − Sᵀk)ᵀ, o = Sᵀ q / √d.
    Output: routed outputs weighted, plus the shared one; per head RMSNorm ⊙ weight ⊙ silu(g_proj x); o_proj.
    """

    def lin(name, v):
        return sd[name] @ v

    def proj(kind, m):
        return f"shared_{kind}.weight" if (m is None or single_kv_proj) else f"{kind}_proj.{m}.weight"

    def conv(name, window):
        weight = sd[f"{name}_conv1d.weight"][:, 0]  # [channels, taps]: tap j reads x_{t − taps + 1 + j}
        taps = weight.shape[1]
        stacked = torch.stack(window[-taps:], dim=1)
        stacked = torch.cat([stacked.new_zeros(stacked.shape[0], taps - stacked.shape[1]), stacked], dim=1)
        z = (weight * stacked).sum(1)
        return z * torch.sigmoid(z)

    def l2(v):
        return v / torch.sqrt((v * v).sum(-1, keepdim=True) + 1e-6)

    slots = list(range(memories)) + ([None] if shared_mem else [])
    states = {m: torch.zeros(heads, head_dim, head_v, dtype=torch.float64) for m in slots}
    windows = {m: {"q": [], "k": [], "v": []} for m in slots}
    outputs = []
    for xt in x:
        probs = torch.softmax(sd["gate.weight"] @ xt, -1)
        w, idx = torch.topk(probs, topk)
        w = w / w.sum()
        visits = [(int(m), float(wm)) for m, wm in zip(idx, w)] + ([(None, 1.0)] if shared_mem else [])
        o = torch.zeros(heads, head_v, dtype=torch.float64)
        for m, weight in visits:
            windows[m]["q"].append(lin("q_proj.weight", xt))
            windows[m]["k"].append(lin(proj("k", m), xt))
            windows[m]["v"].append(lin(proj("v", m), xt))
            q = l2(conv("q", windows[m]["q"]).view(heads, head_dim)) * head_dim**-0.5
            k = l2(conv("k", windows[m]["k"]).view(heads, head_dim))
            v = conv("v", windows[m]["v"]).view(heads, head_v)
            beta = torch.sigmoid(lin(proj("b", m), xt))
            g = -sd["A_log"].exp() * F.softplus(lin(proj("a", m), xt) + sd["dt_bias"])
            for h in range(heads):
                s = states[m][h] * torch.exp(g[h])
                s = s + beta[h] * torch.outer(k[h], v[h] - s.T @ k[h])
                states[m][h] = s
                o[h] += weight * (s.T @ q[h])
        gate = (sd["g_proj.weight"] @ xt).view(heads, head_v)
        normed = o * torch.rsqrt((o * o).mean(-1, keepdim=True) + eps) * sd["o_norm.weight"]
        outputs.append(sd["o_proj.weight"] @ (normed * gate * torch.sigmoid(gate)).flatten())
    return torch.stack(outputs)


@pytest.mark.parametrize("shared_mem, single_kv_proj", [(True, False), (False, False), (True, True)])
def test_an_fla_mom_state_dict_loads_and_computes_flas_inference_path(shared_mem, single_kv_proj):
    dims = dict(hidden=HIDDEN, heads=2, head_dim=6, expand_v=1.5, memories=3, conv=4)
    sd = fla_state_dict(**dims, shared_mem=shared_mem, single_kv_proj=single_kv_proj)
    layer = build_mixer(
        "mom", HIDDEN, 0,
        {"num_memories": 3, "topk": 2, "shared_memory": shared_mem, "single_kv_proj": single_kv_proj, "num_heads": 2,
         "head_dim": 6, "expand_v": 1.5, "conv_size": 4},
    ).double()  # fmt: skip
    assert {k: v.shape for k, v in layer.fla_state_dict().items()} == {k: v.shape for k, v in sd.items()}
    layer.load_state_dict(dict(sd), strict=True)
    assert torch.equal(layer.q_conv1d.conv.weight, sd["q_conv1d.weight"])

    torch.manual_seed(3)
    docs = [torch.randn(n, HIDDEN, dtype=torch.float64) for n in (14, 5)]
    want = [fla_inference(sd, d, 2, 6, 9, 3, 2, shared_mem, single_kv_proj) for d in docs]
    with torch.no_grad():
        packed = layer(torch.cat(docs)[None], cu_seqlens=torch.tensor([0, 14, 19]))[0]
        cache = layer.init_cache(1)
        steps = torch.cat([layer(docs[0][None, t : t + 1], cache=cache)[0] for t in range(14)])
    assert_rel_close(packed[:14], want[0], 1e-12, "document 0")
    assert_rel_close(packed[14:], want[1], 1e-12, "document 1")
    assert_rel_close(steps, want[0], 1e-12, "token by token")


# ----------------------------------------------------------------------------------- config, training


def test_bad_options_and_balance_loss_configs_fail_in_one_line():
    cases = [
        ({"topk": 5}, r"^mom: topk must be an integer in \[1, num_memories=3\], got 5$"),
        ({"update_rule": "gla"}, r"^mom: update_rule must be one of gated_delta_rule, delta_rule, simple_gla, got 'gla'$"),
        ({"path": "dense"}, r"^mom: path must be 'packed' or 'padded', got 'dense'$"),
        ({"num_memories": 0}, r"^mom: num_memories must be an integer >= 1, got 0$"),
    ]
    for options, message in cases:
        with pytest.raises(ConfigError, match=message):
            build_mixer("mom", HIDDEN, 0, {**BASE, **options})
    base = {"vocab_size": 16, "hidden_size": 16, "pattern": ["mom"]}
    bad = [
        ({"form": "layer", "weight": 0.01, "scale": 1}, r"^model config: balance_loss: unknown key\(s\) scale; known: form, weight$"),
        ({"form": "mixtral", "weight": 0.01}, r"^model config: balance_loss.form must be one of layer, switch, got 'mixtral'$"),
        ({"form": "switch", "weight": -1}, r"^model config: balance_loss.weight must be a number >= 0, got -1$"),
    ]
    for spec, message in bad:
        with pytest.raises(ConfigError, match=message):
            LanguageModelConfig.from_dict({**base, "balance_loss": spec})
    with pytest.raises(ConfigError, match=r"^model config: balance_loss needs a routed mixer \(mom\) in the pattern"):
        LanguageModelConfig.from_dict({**base, "pattern": ["attention"], "balance_loss": {"form": "layer", "weight": 0.1}})


@pytest.mark.parametrize("form", ["layer", "switch"])
def test_routing_stats_collect_every_routed_layer_once(form):
    torch.manual_seed(0)
    model = LanguageModel(
        {
            "vocab_size": 32,
            "hidden_size": 16,
            "num_layers": 3,
            "pattern": ["mom", "attention"],
            "balance_loss": {"form": form, "weight": 0.5},
        }
    )
    ids = torch.randint(0, 32, (2, 9))
    model.loss(ids, ids)
    stats = model.routing_stats()
    assert sorted(stats.loads) == [0, 2] and stats.weight == 0.5
    assert all(load.shape == (4,) and load.sum().item() == pytest.approx(2) for load in stats.loads.values())
    assert model.routing_stats() is None  # cleared: nothing of a forward outlives its step
    logits = [model.blocks[i].mixer.router(model.blocks[i].mixer_norm(h)) for i, h in _layer_inputs(model, ids)]
    want = (switch_balance_loss if form == "switch" else layer_balance_loss)(logits, 2)
    assert stats.loss.item() == pytest.approx(want.item(), rel=1e-6)
    stats.loss.backward()
    assert model.blocks[0].mixer.gate.weight.grad.abs().sum() > 0


def _layer_inputs(model, ids):
    """The residual stream entering every routed block (recomputed, for an independent balance loss)."""
    x, out = model.embed(ids), []
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            if block.mixer.mixer_name == "mom":
                out.append((i, x))
            x = block(x)
    return out


def test_training_adds_the_balance_loss_and_logs_it_with_the_loads(tmp_path):
    cfg = make_cfg("model=mom", "model.num_layers=1", "trainer.max_steps=2", "test_after_fit=false", "checkpoint_every_n_steps=100")
    result = training.run(cfg, tmp_path)
    assert len(result["losses"]) == 2 and all(math.isfinite(loss) for _, loss in result["losses"])
    with open(tmp_path / "fit" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/balance_loss")]
    assert len(rows) == 2
    loads = [float(rows[-1][f"train/load/layer0/mem{m}"]) for m in range(4)]
    assert sum(loads) == pytest.approx(2.0) and float(rows[-1]["train/balance_loss"]) >= 1.0
    # The objective is the LM loss plus weight · balance loss; train/loss logs the LM loss alone.
    total = result["losses"][-1][1]
    assert total == pytest.approx(float(rows[-1]["train/loss"]) + 0.01 * float(rows[-1]["train/balance_loss"]), rel=1e-5)
