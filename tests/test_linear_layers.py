"""The linear-attention family of mixers (linear attention / Based, RetNet, GLA, HGRN-2, DeltaNet,
Gated DeltaNet, Mamba-2) and the hybrid configs built from them.

Per mixer: cached decoding equals the parallel form, causality, finite gradients, ``state_size`` equals
the cache's bytes, and one check of the layer's own math that a wrong gate, decay or norm would fail.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import seqzoo.training as training
from seqzoo.models import ConfigError, LanguageModel, build_mixer
from seqzoo.models.base import Call
from seqzoo.models.feature_maps import build_feature_map
from seqzoo.models.retnet import retention_decays
from seqzoo.ops import l2norm
from tests.helpers import assert_rel_close
from tests.test_training import make_cfg

HIDDEN = 32
# Small but not degenerate: several heads, short convs where the paper has them, an odd feature size for Taylor.
MIXERS = {
    "linear_attention": {"num_heads": 2, "feature_map": "elu"},
    "based": {"num_heads": 2, "feature_dim": 5, "feature_map": "taylor", "normalize": True},
    "retnet": {"num_heads": 4},
    "gla": {"num_heads": 2, "use_short_conv": True},
    "hgrn2": {"expand_ratio": 8, "num_layers": 3},
    "deltanet": {"num_heads": 2},
    "gated_deltanet": {"num_heads": 2, "head_dim": 8},
    "mamba2": {"head_dim": 8, "d_state": 8},
}
NAMES = list(MIXERS)


def make(case: str, layer_idx: int = 1, **overrides):
    torch.manual_seed(0)
    name = "linear_attention" if case == "based" else case
    return build_mixer(name, HIDDEN, layer_idx, {**MIXERS[case], **overrides})


@pytest.mark.parametrize("case", NAMES)
def test_decode_equals_parallel_and_state_size_matches_cache(case):
    layer = make(case).eval()
    x = torch.randn(2, 9, HIDDEN)
    with torch.no_grad():
        full = layer(x)
        # Token by token from an empty cache, then an odd prefill (longer than the conv tail) plus tokens.
        cache = layer.init_cache(2)
        steps = torch.cat([layer(x[:, t : t + 1], cache=cache) for t in range(9)], 1)
        cache2 = layer.init_cache(2)
        pieces = [layer(x[:, :5], cache=cache2)] + [layer(x[:, t : t + 1], cache=cache2) for t in range(5, 9)]
    assert_rel_close(steps, full, 1e-4, "token-by-token")
    assert_rel_close(torch.cat(pieces, 1), full, 1e-4, "prefill + decode")
    assert cache.seen_tokens == cache2.seen_tokens == 9
    assert cache.get("recurrent").dtype == torch.float32
    assert all(n == "recurrent" or n.startswith("conv_") for n in cache.tensors)
    assert cache.nbytes() == cache2.nbytes() == layer.state_size(batch=2, seq_len=9) == 2 * layer.state_size()


@pytest.mark.parametrize("case", NAMES)
def test_causal_with_finite_gradients(case):
    layer = make(case)
    x = torch.randn(2, 10, HIDDEN, requires_grad=True)
    x2 = x.detach().clone()
    x2[:, 6] += 1.0
    out = layer(x)
    with torch.no_grad():
        out2 = layer(x2)
    assert torch.allclose(out[:, :6], out2[:, :6], rtol=0, atol=1e-6)
    assert not torch.allclose(out[:, 6], out2[:, 6], atol=1e-4)
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    grads = {n: p.grad for n, p in layer.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), [n for n, g in grads.items() if g is None]


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("linear_attention", {"feature_map": "relu"}, "unknown feature map 'relu'"),
        ("linear_attention", {"feature_map": "identity", "normalize": True}, "needs a positive feature map"),
        ("retnet", {"num_heads": 3}, "must divide key width"),
        ("gla", {"gate_logit_normalizer": 0}, "gate_logit_normalizer must be > 0"),
        ("hgrn2", {"expand_ratio": 5}, "must divide hidden_size"),
        ("gated_deltanet", {"a_init_range": [4.0, 1.0]}, "a_init_range"),
        ("mamba2", {"head_dim": 7}, "must divide expand"),
        ("deltanet", {"heads": 2}, "unknown option"),
    ],
)
def test_bad_options_fail_with_one_line(name, options, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_mixer(name, HIDDEN, 1, options)
    assert "\n" not in str(info.value)


def test_identity_linear_attention_is_masked_qk_v():
    layer = make("linear_attention", feature_map="identity")
    x = torch.randn(2, 9, HIDDEN)
    q, k, v = (p(x).view(2, 9, 2, 16).transpose(1, 2) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    scores = (q @ k.transpose(-1, -2) / 4.0).tril()
    ref = layer.o_proj(layer.o_norm((scores @ v).transpose(1, 2)).reshape(2, 9, HIDDEN))
    assert_rel_close(layer(x), ref, 1e-5)


def test_normalised_taylor_attention_is_the_taylor_softmax_approximation():
    layer = make("based")
    x = torch.randn(1, 8, HIDDEN)
    q, k = (p(x).view(1, 8, 2, 5).transpose(1, 2) for p in (layer.q_proj, layer.k_proj))
    v = layer.v_proj(x).view(1, 8, 2, 16).transpose(1, 2)
    a = q @ k.transpose(-1, -2) / math.sqrt(5)
    # Based's kernel 1 + a + a²/2, normalised over the causal prefix.
    weights = (1 + a + a**2 / 2).tril()
    ref = layer.o_proj(((weights / weights.sum(-1, keepdim=True)) @ v).transpose(1, 2).reshape(1, 8, HIDDEN))
    assert_rel_close(layer(x), ref, 1e-4)
    assert build_feature_map("taylor", 16).feature_size() == 153


def zero_input_state_map(layer, steps: int = 6):
    """The cached state after one random token, and after ``steps`` more all-zero tokens (``k = v = 0``)."""
    cache = layer.init_cache(1)
    with torch.no_grad():
        layer(torch.randn(1, 1, HIDDEN), cache=cache)
        first = cache.get("recurrent").clone()
        layer(torch.zeros(1, steps, HIDDEN), cache=cache)
    return first, cache.get("recurrent")


def test_retnet_decays_are_one_minus_two_to_minus_five_minus_h():
    layer = make("retnet")
    expected = torch.tensor([1 - 2**-5, 1 - 2**-6, 1 - 2**-7, 1 - 2**-8], dtype=torch.float64)
    assert torch.equal(retention_decays(4), expected)
    # Zero inputs write nothing (k = v = 0), so the state must shrink by exactly γ_h per step, per head.
    first, after = zero_input_state_map(layer, steps=6)
    assert_rel_close(after, first * expected.float().pow(6)[None, :, None, None], 1e-5)


def test_gla_gates_decay_each_key_row_of_the_state():
    layer = make("gla", use_short_conv=False)
    with torch.no_grad():
        layer.gk_proj[1].bias.copy_(torch.linspace(-4.0, 4.0, layer.gk_proj[1].bias.numel()))
    g = layer.log_gate(torch.randn(2, 5, HIDDEN))
    assert g.shape == (2, 5, 2, 8) and (g <= 0).all()
    first, after = zero_input_state_map(layer, steps=3)
    # x = 0 leaves only the gate bias: per-key decay logsigmoid(b)/16, applied along the key (row) axis.
    alpha = (F.logsigmoid(layer.gk_proj[1].bias.detach()) / 16).exp().view(2, 8)
    assert_rel_close(after, first * alpha.pow(3)[None, :, :, None], 1e-5)


def test_hgrn2_tied_gates_respect_the_layerwise_lower_bound():
    assert make("hgrn2", layer_idx=0).lower_bound() is None
    layer = make("hgrn2", layer_idx=2)
    lb = layer.lower_bound()
    assert torch.allclose(lb, torch.full_like(lb, 2 / 3), atol=1e-6)
    assert layer.lower_bound_logit._no_weight_decay
    k, log_f = layer.key_and_log_forget(10 * torch.randn(2, 7, layer.forget_dim))
    f = log_f.exp()
    assert (f >= lb - 1e-6).all() and (f <= 1).all()
    assert torch.allclose(k + f, torch.ones_like(f), atol=1e-6)
    # f = lb + (1 − lb) σ(z) in closed form.
    z = torch.randn(3, layer.forget_dim)
    assert torch.allclose(layer.key_and_log_forget(z)[1].exp(), lb + (1 - lb) * torch.sigmoid(z), atol=1e-6)


@pytest.mark.parametrize("case", ["deltanet", "gated_deltanet"])
def test_delta_rule_with_unit_beta_recalls_the_last_value_exactly(case):
    layer = make(case).eval()
    layer.beta = lambda x: torch.ones(*x.shape[:2], layer.num_heads)
    x = torch.randn(1, 7, HIDDEN)
    cache = layer.init_cache(1)
    with torch.no_grad():
        layer(x, cache=cache)
        _, k, v = layer.qkv(x, None, Call.of(case, x, None, None))
    state, k_last = cache.get("recurrent"), l2norm(k[0, -1])
    # Delta rule with normalised k and β = 1: right after the write, Sᵀk = v (the decay acts before it).
    assert_rel_close(torch.einsum("hkv,hk->hv", state[0], k_last), v[0, -1], 1e-4)


def test_gated_deltanet_gate_and_inits():
    layer = make("gated_deltanet")
    g = layer.log_gate(5 * torch.randn(2, 9, HIDDEN))
    assert g.shape == (2, 9, 2) and (g <= 0).all()
    a = layer.A_log.exp()
    assert ((a >= 0) & (a <= 16)).all()
    dt = F.softplus(layer.dt_bias)
    assert ((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 1e-1 * (1 + 1e-5))).all()
    assert layer.A_log._no_weight_decay and layer.dt_bias._no_weight_decay


def test_mamba2_inits_and_vanishing_step_limits():
    layer = make("mamba2")
    a, dt = layer.A_log.exp(), F.softplus(layer.dt_bias)
    assert ((a >= 1) & (a <= 16)).all() and ((dt >= 1e-4) & (dt <= 1e-1 * (1 + 1e-5))).all()
    assert layer.A_log._no_weight_decay and layer.dt_bias._no_weight_decay and layer.D._no_weight_decay
    x = torch.randn(2, 6, HIDDEN)
    with torch.no_grad():
        layer.dt_bias.fill_(-40.0)
        # Δ → 0 silences the SSM: with D = 1 only the skip path D·x is left, through the gated norm.
        z, xbc, _ = torch.split(layer.in_proj(x), layer.in_proj_split, -1)
        xs = layer.convs["xBC"](xbc)[0][..., : layer.d_inner]
        assert_rel_close(layer(x), layer.out_proj(layer.norm(xs, z)), 1e-5)
        layer.D.zero_()
        # ... and with D = 0 nothing is left.
        assert layer(x).abs().max() < 1e-6


def compose_model(name: str, *overrides: str):
    cfg = training.compose([f"model={name}", "data.vocab_size=64", "model.hidden_size=32", *overrides])
    return OmegaConf.to_container(cfg.model, resolve=True)


@pytest.mark.parametrize(
    "config, expected",
    [
        ("hybrid_gdn_3to1", ["gated_deltanet"] * 3 + ["attention"]),
        ("hybrid_hgrn2_6to1", ["hgrn2"] * 6 + ["attention"]),
        ("based", ["linear_attention", "attention"]),
    ],
)
def test_hybrid_patterns_build_in_order_and_only_attention_caches_keys(config, expected):
    torch.manual_seed(0)
    model = LanguageModel(compose_model(config)).eval()
    assert [block.mixer.mixer_name for block in model.blocks] == expected
    ids = torch.randint(0, 64, (2, 7))
    cache = model.init_cache(2)
    with torch.no_grad():
        full = model(ids)
        pieces = [model(ids[:, :5], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(5, 7)]
    assert_rel_close(torch.cat(pieces, 1), full, 1e-4)
    for name, layer_cache in zip(expected, cache.layers):
        has_kv = {"key", "value"} <= set(layer_cache.tensors)
        assert has_kv == (name == "attention")
        assert ("recurrent" in layer_cache.tensors) == (name != "attention")
    assert cache.nbytes() == model.state_size(batch=2, seq_len=7)
    if config == "hybrid_hgrn2_6to1":
        bounds = [model.blocks[i].mixer.lower_bound() for i in range(1, 6)]
        assert all(torch.allclose(lb, torch.full_like(lb, i / 7), atol=1e-6) for i, lb in enumerate(bounds, 1))
    if config == "based":
        assert model.blocks[1].mixer.window_size == 64 and model.blocks[0].mixer.feature_map.feature_size() == 153


NEW_CONFIGS = [*NAMES[:1], *NAMES[2:], "hybrid_gdn_3to1", "hybrid_hgrn2_6to1", "based"]


@pytest.mark.parametrize("config", NEW_CONFIGS)
def test_config_trains_one_step(tmp_path, config):
    cfg = make_cfg(f"model={config}", "trainer.max_steps=1", "test_after_fit=false", "checkpoint_every_n_steps=100")
    result = training.run(cfg, tmp_path)
    assert len(result["losses"]) == 1 and math.isfinite(result["losses"][0][1])


def test_gated_deltanet_without_output_gate_is_deltanet_with_a_decay():
    gated, plain = make("gated_deltanet", use_output_gate=False).eval(), make("deltanet", head_dim=8, expand_v=2.0).eval()
    assert gated.g_proj is None
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if k not in ("a_proj.weight", "A_log", "dt_bias")})
    x = torch.randn(2, 9, HIDDEN)
    with torch.no_grad():
        gated.A_log.fill_(-30.0)  # exp(A_log) ≈ 1e-13: no decay left, so the layer must be DeltaNet exactly
        assert_rel_close(gated(x), plain(x), 1e-5)
        gated.A_log.fill_(0.0)
        assert (gated(x) - plain(x)).abs().max() > 1e-3
