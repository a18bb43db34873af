"""Registry, language model, shared modules and the attention mixer (cache == parallel, causality)."""

import pytest
import torch

from seqzoo.models import (
    Attention,
    ConfigError,
    GatedRMSNorm,
    LanguageModel,
    LanguageModelConfig,
    RMSNorm,
    RotaryEmbedding,
    ShortConvolution,
    build_mixer,
    mixer_names,
    register_mixer,
)
from tests.helpers import assert_rel_close


def tiny_lm(pattern=("attention",), **mixer_options) -> LanguageModel:
    torch.manual_seed(0)
    mixers = {"attention": mixer_options} if mixer_options else {}
    return LanguageModel(
        {"vocab_size": 50, "hidden_size": 32, "num_layers": 2, "pattern": list(pattern), "mixers": mixers, "mlp": "swiglu"}
    )


def test_registry_lists_attention_and_rejects_unknown_names():
    assert "attention" in mixer_names()
    with pytest.raises(ConfigError, match=r"unknown mixer 'nope'; known mixers: .*attention"):
        build_mixer("nope", 16, 0)


def test_registry_rejects_unknown_options_and_duplicate_names():
    with pytest.raises(ConfigError, match=r"mixer 'attention' got unknown option\(s\) num_haeds"):
        build_mixer("attention", 16, 0, {"num_haeds": 2})
    with pytest.raises(ConfigError, match="already registered"):
        register_mixer("attention")(type("Other", (torch.nn.Module,), {}))


@pytest.mark.parametrize(
    "values, message",
    [
        ({"vocab_size": 10, "hidden_size": -4}, "hidden_size must be a positive integer"),
        ({"vocab_size": 10, "num_layer": 2}, "unknown key\\(s\\) num_layer"),
        ({"vocab_size": 10, "pattern": ["attention", "mystery"]}, "unknown mixer 'mystery'"),
        ({"vocab_size": 10, "mixers": {"gla": {}}}, "not in pattern"),
        ({"hidden_size": 8}, "vocab_size is required"),
        ({"vocab_size": 10, "mlp": "relu"}, "mlp must be"),
    ],
)
def test_bad_model_configs_fail_with_one_line(values, message):
    with pytest.raises(ConfigError, match=message) as info:
        LanguageModelConfig.from_dict(values)
    assert "\n" not in str(info.value)


def test_pattern_repeats_to_depth_in_order():
    config = LanguageModelConfig.from_dict({"vocab_size": 10, "num_layers": 5, "pattern": ["attention", "attention"]})
    assert config.layer_mixers() == ["attention"] * 5
    model = LanguageModel(config)
    assert [type(b.mixer) for b in model.blocks] == [Attention] * 5


def test_tied_and_untied_heads():
    tied = LanguageModel({"vocab_size": 20, "hidden_size": 8, "tie_embeddings": True})
    untied = LanguageModel({"vocab_size": 20, "hidden_size": 8, "tie_embeddings": False})
    assert tied.head.weight is tied.embed.weight
    assert untied.head.weight is not untied.embed.weight
    assert untied.num_parameters() - tied.num_parameters() == 20 * 8


def test_rmsnorm_and_gated_rmsnorm_match_formulas():
    x, gate = torch.randn(3, 5, 8, dtype=torch.float64), torch.randn(3, 5, 8, dtype=torch.float64)
    norm = RMSNorm(8).double()
    torch.nn.init.normal_(norm.weight)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert_rel_close(norm(x), expected, 1e-12)
    gated = GatedRMSNorm(8).double()
    gated.weight.data.copy_(norm.weight)
    assert_rel_close(gated(x, gate), expected * torch.nn.functional.silu(gate), 1e-12)


def test_norm_and_conv_gradients_match_plain_autograd():
    """GatedRMSNorm and ShortConvolution recompute in backward; their gradients equal plain formulas'."""
    torch.manual_seed(0)
    x, gate = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True), torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    gated = GatedRMSNorm(8).double()
    torch.nn.init.normal_(gated.weight)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * gated.weight * torch.nn.functional.silu(gate)
    cot = torch.randn_like(expected)
    leaves = [x, gate, gated.weight]
    for a, b in zip(torch.autograd.grad((gated(x, gate) * cot).sum(), leaves), torch.autograd.grad((expected * cot).sum(), leaves)):
        assert_rel_close(a, b, 1e-12)

    conv = ShortConvolution(6, kernel_size=4, bias=True).double()
    x = torch.randn(2, 9, 6, dtype=torch.float64, requires_grad=True)
    tail = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    y, new_tail = conv(x, conv_state=tail, output_state=True)
    padded = torch.cat([tail, x], 1).transpose(1, 2)
    expected = torch.nn.functional.silu(torch.nn.functional.conv1d(padded, conv.conv.weight, conv.conv.bias, groups=6)).transpose(1, 2)
    assert_rel_close(y, expected, 1e-12)
    assert torch.equal(new_tail, x[:, -3:]) and new_tail.untyped_storage().nbytes() == new_tail.numel() * 8
    cot = torch.randn_like(y)
    leaves = [x, tail, conv.conv.weight, conv.conv.bias]
    for a, b in zip(torch.autograd.grad((y * cot).sum(), leaves), torch.autograd.grad((expected * cot).sum(), leaves)):
        assert_rel_close(a, b, 1e-12)


def test_short_convolution_streaming_equals_one_call_and_is_causal():
    torch.manual_seed(0)
    conv = ShortConvolution(6, kernel_size=4)
    x = torch.randn(2, 11, 6)
    full, _ = conv(x)
    y1, state = conv(x[:, :5], output_state=True)
    pieces = [y1]
    for t in range(5, 11):
        y, state = conv(x[:, t : t + 1], conv_state=state, output_state=True)
        pieces.append(y)
    assert_rel_close(torch.cat(pieces, 1), full, 1e-6)
    x2 = x.clone()
    x2[:, 7] += 1.0
    assert torch.equal(conv(x2)[0][:, :7], full[:, :7])
    assert conv.state_size(batch=2) == state.numel() * state.element_size()


def test_short_convolution_takes_device_offsets_with_empty_sequences():
    # MoM's routed segments: offsets computed on the device, some sequences empty. Each sequence is convolved
    # alone from its own state, and an empty one hands its state back unchanged.
    torch.manual_seed(0)
    conv = ShortConvolution(5, kernel_size=3, bias=True).double()
    x = torch.randn(1, 9, 5, dtype=torch.float64)
    states = torch.randn(4, 2, 5, dtype=torch.float64)
    offsets = torch.tensor([0, 4, 4, 5, 9])  # sequence 1 is empty
    y, new = conv(x, states, output_state=True, offsets=offsets)
    for i, (a, b) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        alone, tail = conv(x[:, a:b], states[i : i + 1], output_state=True)
        if b > a:
            assert_rel_close(y[:, a:b], alone, 1e-15)
        assert torch.equal(new[i], tail[0])
    assert torch.equal(new[1], states[1])
    same, _ = conv(x, states[[0, 2, 3]], output_state=True, offsets=(0, 4, 5, 9))
    assert torch.equal(y, same)


def test_rotary_is_relative():
    rope = RotaryEmbedding(16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    score = lambda pq, pk: (rope(q, pq) * rope(k, pk)).sum()  # noqa: E731
    assert torch.allclose(score(5, 2), score(13, 10), atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 4), atol=1e-3)


@pytest.mark.parametrize(
    "options", [{}, {"num_heads": 4, "num_kv_heads": 2}, {"num_heads": 2, "window_size": 5}], ids=["mha", "gqa", "swa"]
)
def test_attention_decode_equals_parallel_after_odd_prefill(options):
    torch.manual_seed(0)
    layer = Attention(32, **options).eval()
    x = torch.randn(2, 17, 32)
    full = layer(x)
    cache = layer.init_cache(2)
    pieces = [layer(x[:, :7], cache=cache)]
    pieces += [layer(x[:, t : t + 1], cache=cache) for t in range(7, 17)]
    assert_rel_close(torch.cat(pieces, 1), full, 1e-5)
    assert cache.nbytes() == layer.state_size(batch=2, seq_len=17)


def test_sliding_window_cache_is_capped_and_matches_explicit_mask():
    torch.manual_seed(0)
    layer = Attention(16, num_heads=2, window_size=4, rope_theta=None).eval()
    x = torch.randn(1, 12, 16)
    cache = layer.init_cache(1)
    layer(x, cache=cache)
    assert cache.get("key").shape[1] == 3
    # Reference: full attention with an explicit band mask, computed by hand.
    q = layer.q_proj(x).view(1, 12, 2, 8).transpose(1, 2)
    k = layer.k_proj(x).view(1, 12, 2, 8).transpose(1, 2)
    v = layer.v_proj(x).view(1, 12, 2, 8).transpose(1, 2)
    i, j = torch.arange(12)[:, None], torch.arange(12)[None, :]
    scores = (q @ k.transpose(-1, -2)) / 8**0.5
    scores = scores.masked_fill(~((j <= i) & (i - j < 4)), float("-inf"))
    ref = layer.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 12, 16))
    assert_rel_close(layer(x), ref, 1e-5)


@pytest.mark.parametrize("options", [{}, {"window_size": 3}], ids=["full", "swa"])
def test_attention_is_causal(options):
    torch.manual_seed(0)
    layer = Attention(16, num_heads=2, **options)
    x = torch.randn(2, 10, 16)
    x2 = x.clone()
    x2[:, 6] += 1.0
    out, out2 = layer(x), layer(x2)
    assert torch.equal(out[:, :6], out2[:, :6])
    assert not torch.allclose(out[:, 6], out2[:, 6])


def test_attention_rejects_bad_input_and_options():
    with pytest.raises(ValueError, match=r"expected input \[batch, seq, 16\]"):
        Attention(16)(torch.randn(2, 3, 8))
    with pytest.raises(ConfigError, match="must divide num_heads"):
        Attention(18, num_heads=3, num_kv_heads=2)
    with pytest.raises(ValueError, match="needs seq_len"):
        Attention(16).state_size()


def persistent_attention_layer(dtype=torch.float32, **options) -> Attention:
    torch.manual_seed(0)
    layer = Attention(16, **{"num_heads": 2, "num_persistent": 3, **options}).to(dtype).eval()
    with torch.no_grad():  # non-trivial slots: they start at zero
        layer.persistent.normal_()
    return layer


@pytest.mark.parametrize(
    "options", [{}, {"window_size": 4}, {"num_heads": 4, "num_kv_heads": 2, "window_size": 5}], ids=["full", "swa", "gqa_swa"]
)
def test_persistent_attention_decode_equals_parallel(options):
    layer = persistent_attention_layer(**options)
    x = torch.randn(2, 13, 16)
    full = layer(x)
    cache = layer.init_cache(2)
    pieces = [layer(x[:, :5], cache=cache)] + [layer(x[:, t : t + 1], cache=cache) for t in range(5, 13)]
    assert_rel_close(torch.cat(pieces, 1), full, 1e-5)
    # Two multi-token calls: the second has both past keys and several queries.
    cache2 = layer.init_cache(2)
    assert_rel_close(torch.cat([layer(x[:, :6], cache=cache2), layer(x[:, 6:], cache=cache2)], 1), full, 1e-5)
    # The persistent slots are parameters, not cache.
    assert cache.nbytes() == cache2.nbytes() == layer.state_size(batch=2, seq_len=13)
    if "window_size" in options:
        assert layer.state_size(batch=2) == layer.state_size(batch=2, seq_len=10**6)


@pytest.mark.parametrize("options", [{}, {"window_size": 3}], ids=["full", "swa"])
def test_persistent_attention_is_causal(options):
    layer = persistent_attention_layer(**options)
    x = torch.randn(2, 10, 16)
    full = layer(x)
    for t in (0, 6):
        x2 = x.clone()
        x2[:, t] += 1.0
        out = layer(x2)
        assert torch.equal(out[:, :t], full[:, :t])
        assert not torch.allclose(out[:, t], full[:, t])


@pytest.mark.parametrize("options", [{}, {"window_size": 3}, {"num_heads": 4, "num_kv_heads": 2}], ids=["full", "swa", "gqa"])
def test_persistent_attention_matches_hand_written_softmax(options):
    # Reference in float64: per head, softmax over [persistent keys ‖ (windowed) causal keys] / sqrt(d).
    layer = persistent_attention_layer(torch.float64, rope_theta=None, **options)
    heads, kv_heads, d, seq = layer.num_heads, layer.num_kv_heads, layer.head_dim, 9
    x = torch.randn(2, seq, 16, dtype=torch.float64)
    q = layer.q_proj(x).view(2, seq, heads, d).transpose(1, 2)
    k = layer.k_proj(x).view(2, seq, kv_heads, d).transpose(1, 2)
    v = layer.v_proj(x).view(2, seq, kv_heads, d).transpose(1, 2)
    pk, pv = layer.persistent[0].expand(2, -1, -1, -1), layer.persistent[1].expand(2, -1, -1, -1)
    k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
    i, j = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    visible = (j <= i) & (i - j < (options.get("window_size") or seq))
    visible = torch.cat([torch.ones(seq, 3, dtype=torch.bool), visible], 1)
    scores = (q @ k.transpose(-1, -2) / d**0.5).masked_fill(~visible, float("-inf"))
    ref = layer.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, seq, heads * d))
    assert_rel_close(layer(x), ref, 1e-12)


def test_attention_without_persistent_slots_or_output_projection():
    # Plain attention's parameters are unchanged by the new options; project_output=False stops before o_proj.
    assert sorted(Attention(16, num_heads=2).state_dict()) == ["k_proj.weight", "o_proj.weight", "q_proj.weight", "v_proj.weight"]
    torch.manual_seed(0)
    layer = Attention(16, num_heads=2, head_dim=4, num_persistent=2)
    bare = Attention(16, num_heads=2, head_dim=4, num_persistent=2, project_output=False)
    bare.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("o_proj")})
    x = torch.randn(1, 5, 16)
    assert bare(x).shape == (1, 5, 8) and "o_proj.weight" not in bare.state_dict()
    assert torch.equal(layer.o_proj(bare(x)), layer(x))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_persistent": -1}, "num_persistent must be >= 0"),
        ({"head_dim": 3}, "RoPE needs an even head_dim"),
        ({"window_size": 0}, "window_size"),
    ],
)
def test_attention_bad_options_fail_with_one_line(options, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_mixer("attention", 16, 0, options)
    assert "\n" not in str(info.value)


def test_language_model_cache_equals_parallel_and_generate_agrees():
    model = tiny_lm(num_heads=2).eval()
    ids = torch.randint(0, 50, (2, 12))
    full = model(ids)
    cache = model.init_cache(2)
    pieces = [model(ids[:, :5], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(5, 12)]
    assert_rel_close(torch.cat(pieces, 1), full, 1e-5)
    assert cache.nbytes() == model.state_size(batch=2, seq_len=12)
    greedy = model.generate(ids[:, :4], 10, temperature=0)
    assert greedy.shape == (2, 14) and torch.equal(greedy[:, :4], ids[:, :4])
    assert torch.equal(greedy, model.generate(ids[:, :4], 10, temperature=0, use_cache=False))


def test_generate_sampling_respects_top_k_and_seed():
    model = tiny_lm().eval()
    ids = torch.randint(0, 50, (1, 3))
    a = model.generate(ids, 8, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, model.generate(ids, 8, temperature=0))
    b1 = model.generate(ids, 8, temperature=2.0, generator=torch.Generator().manual_seed(3))
    b2 = model.generate(ids, 8, temperature=2.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(b1, b2)


def test_language_model_rejects_bad_token_ids():
    model = tiny_lm()
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 50\)"):
        model(torch.tensor([[1, 50]]))
    with pytest.raises(ValueError, match="input_ids must be integer"):
        model(torch.randn(1, 3))


def test_no_weight_decay_covers_norms_embeddings_and_flagged_parameters():
    model = tiny_lm()
    names = model.no_weight_decay_names()
    assert "embed.weight" in names and "norm.weight" in names and "blocks.0.mixer_norm.weight" in names
    assert "blocks.0.mixer.q_proj.weight" not in names


@pytest.mark.parametrize("name", mixer_names())
def test_cache_after_prefill_holds_only_its_own_bytes(name):
    """A cache entry that is a view of a prefill buffer (a conv tail, the last state) would keep that
    whole buffer alive while ``nbytes`` and ``state_size`` count only the view."""
    torch.manual_seed(0)
    layer = build_mixer(name, 32, 0)
    cache = layer.init_cache(2)
    with torch.no_grad():
        layer(torch.randn(2, 45, 32), cache=cache)
        layer(torch.randn(2, 1, 32), cache=cache)
    held = sum(t.untyped_storage().nbytes() for t in cache.tensors.values())
    assert held == cache.nbytes() == layer.state_size(batch=2, seq_len=46)


def _mixers_with_a_backend_option():
    import inspect

    from seqzoo.models import get_mixer_class

    return [n for n in mixer_names() if "backend" in inspect.signature(get_mixer_class(n).__init__).parameters]


def test_every_mixer_that_runs_an_op_takes_its_backend_from_config():
    # The linear family and ParaRNN run one op each; attention has no op to configure.
    assert {"linear_attention", "retnet", "gla", "hgrn2", "deltanet", "gated_deltanet", "mamba2", "pararnn_gru"} <= set(
        _mixers_with_a_backend_option()
    )


@pytest.mark.parametrize("name", _mixers_with_a_backend_option())
def test_a_mixer_runs_the_backend_its_config_names(name, monkeypatch):
    from seqzoo.ops.core import OpInputError
    from seqzoo.ops.core import dispatch as dispatch_module

    with pytest.raises(ConfigError, match=f"^{name}: backend: .*unknown backend 'cuda'") as info:
        build_mixer(name, 32, 0, {"backend": "cuda"})
    assert "\n" not in str(info.value)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    outputs = {}
    for backend in ("reference", "torch"):
        torch.manual_seed(0)
        layer = build_mixer(name, 32, 0, {"backend": backend}).double()
        with torch.no_grad():
            outputs[backend] = layer(x)
    assert_rel_close(outputs["torch"], outputs["reference"], 1e-8)
    # Triton on CPU tensors without the interpreter: the op reports it, in one line, when the layer runs.
    monkeypatch.setattr(dispatch_module, "TRITON_INTERPRET", False)
    layer = build_mixer(name, 32, 0, {"backend": "triton"}).double()
    with pytest.raises(OpInputError, match="backend='triton' needs CUDA tensors") as info:
        layer(x)
    assert "\n" not in str(info.value)


def _head_count_options(name):
    """``{"num_heads": 4}`` for every mixer with a head count (mamba2 sizes its heads by ``head_dim`` instead)."""
    import inspect

    from seqzoo.models.registry import get_mixer_class

    return "num_heads" in inspect.signature(get_mixer_class(name).__init__).parameters


@pytest.mark.parametrize("name", [n for n in mixer_names() if _head_count_options(n)])
def test_every_mixer_refuses_a_head_count_that_does_not_divide_the_width(name):
    # 66 = 4·16 + 2: deltanet, gated_deltanet, linear_attention, attention (even head_dim 16) and titans built it,
    # silently projecting to 64 channels; one rule for every mixer.
    with pytest.raises(ConfigError, match=r"num_heads \(4\) must .*divide") as info:
        build_mixer(name, 66, 0, {"num_heads": 4})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["attention", "deltanet", "gated_deltanet", "linear_attention", "titans_lmm"])
def test_an_explicit_head_dim_sets_the_projected_width(name):
    layer = build_mixer(name, 66, 0, {"num_heads": 4, "head_dim": 16})
    assert layer(torch.randn(1, 8, 66)).shape == (1, 8, 66)
    with pytest.raises(ConfigError, match=r"num_heads must be an integer >= 1, got 0"):
        build_mixer(name, 64, 0, {"num_heads": 0})
