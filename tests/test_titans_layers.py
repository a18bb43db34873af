"""Titans layers (titans_lmm, titans_mag, titans_mal, titans_mac): streaming == one call (also mid-chunk and
mid-segment), token-by-token decode == parallel, causality (inside a chunk and inside a MAC segment),
gradients, cache size, option errors, configs train through ``seqzoo.training.run``."""

import inspect
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from omegaconf import OmegaConf

import seqzoo.training as training
from seqzoo.models import ConfigError, LanguageModel, build_mixer, get_mixer_class
from seqzoo.models import titans as titans_module
from seqzoo.models.cache import LayerCache
from seqzoo.models.titans import MemoryOptions, TitansLMM, TitansMAC
from seqzoo.ops import LinearMemoryState, MLPMemoryState, neural_memory
from tests.helpers import assert_rel_close
from tests.test_training import TINY

HIDDEN = 16
# Small chunks and segments so that 13-token inputs cross several chunk and segment boundaries.
CASES = {
    "lmm_linear": ("titans_lmm", {"chunk_size": 4}),
    "lmm_mlp": ("titans_lmm", {"chunk_size": 4, "memory": "mlp", "mlp_expansion": 2}),
    "lmm_chunk_read": ("titans_lmm", {"chunk_size": 4, "memory": "mlp", "mlp_expansion": 2, "retrieval": "chunk"}),
    "lmm_plain": ("titans_lmm", {"chunk_size": 3, "conv_size": None, "use_momentum": False, "use_decay": False, "num_heads": 1}),
    "mag": ("titans_mag", {"chunk_size": 4, "window_size": 5}),
    "mal_mlp": ("titans_mal", {"chunk_size": 4, "window_size": 5, "memory": "mlp", "mlp_expansion": 2}),
    "mac_linear": ("titans_mac", {"chunk_size": 2, "segment_size": 4}),
    "mac_mlp": ("titans_mac", {"chunk_size": 4, "segment_size": 8, "memory": "mlp", "mlp_expansion": 2, "num_persistent": 2}),
}


@pytest.fixture(autouse=True)
def one_thread():
    # These tensors are tiny: with 2 threads on a shared 2-core machine the op runs ~100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(case):
    name, options = CASES[case]
    torch.manual_seed(0)
    layer = build_mixer(name, HIDDEN, 0, {"num_heads": 2, **options})
    # Non-trivial persistent K/V and output norms (they start at zero / one).
    with torch.no_grad():
        for pname, p in layer.named_parameters():
            if "persistent" in pname or "norm" in pname or "ln_" in pname:
                p.add_(0.3 * torch.randn_like(p))
    return layer


@pytest.mark.parametrize("case", list(CASES))
def test_decode_and_any_split_equal_the_parallel_forward(case):
    layer = make(case)
    torch.manual_seed(1)
    x = torch.randn(2, 13, HIDDEN)
    full = layer(x)
    # Prefill of an odd length (mid-chunk, mid-segment), then token by token.
    cache = layer.init_cache(2)
    pieces = [layer(x[:, :5], cache=cache), layer(x[:, 5:5], cache=cache)]  # an empty call changes nothing
    pieces += [layer(x[:, t : t + 1], cache=cache) for t in range(5, 13)]
    assert_rel_close(torch.cat(pieces, 1), full, 1e-4, f"{case} decode")
    assert cache.seen_tokens == 13
    assert cache.nbytes() == layer.state_size(batch=2, seq_len=13)
    # Splits at every point, each a two-call stream: the second call starts mid-chunk for most s.
    for s in range(1, 13):
        cache = layer.init_cache(2)
        out = torch.cat([layer(x[:, :s], cache=cache), layer(x[:, s:], cache=cache)], 1)
        assert_rel_close(out, full, 1e-4, f"{case} split at {s}")
        assert cache.nbytes() == layer.state_size(batch=2, seq_len=13)
    # Three uneven pieces that each cross chunk boundaries.
    cache = layer.init_cache(2)
    out = torch.cat([layer(x[:, a:b], cache=cache) for a, b in ((0, 3), (3, 10), (10, 13))], 1)
    assert_rel_close(out, full, 1e-4, f"{case} three pieces")


@pytest.mark.parametrize("case", list(CASES))
def test_causal_at_every_position_also_inside_a_chunk(case):
    layer = make(case)
    torch.manual_seed(2)
    x = torch.randn(1, 12, HIDDEN)
    full = layer(x)
    # Position 5 sits mid-chunk for every case and mid-segment for MAC (segments of 4 and 8).
    for t in (1, 5, 6, 10):
        x2 = x.clone()
        x2[:, t:] += torch.randn_like(x2[:, t:])
        out = layer(x2)
        assert torch.equal(out[:, :t], full[:, :t]), f"{case}: outputs before {t} changed"
        assert not torch.allclose(out[:, t], full[:, t]), f"{case}: output {t} ignores its own token"


def test_mac_segment_tokens_do_not_leak_into_earlier_ones():
    # The two leaks of MAC as the paper writes it (docs/titans.md): the memory tokens of a segment (a) and the
    # segment-end memory (b) must not reach earlier tokens of the same segment. One segment of 8 tokens;
    # perturb only the last one.
    layer = make("mac_mlp")
    torch.manual_seed(3)
    x = torch.randn(2, 8, HIDDEN)
    full = layer(x)
    x2 = x.clone()
    x2[:, 7] += 3.0
    out = layer(x2)
    assert torch.equal(out[:, :7], full[:, :7])
    # The next segment does read the memory written by the whole previous segment.
    y = torch.randn(2, 16, HIDDEN)
    y2 = y.clone()
    y2[:, 3] += 3.0
    a, b = layer(y), layer(y2)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-4


def test_mac_reads_the_previous_segment_memory():
    # With the memory output gate forced open (norm gain 0 → sigmoid(0) = 1/2 everywhere) the only route from
    # segment 0 to segment 1 is the memory read h = M_{n−1}(q): zeroing the read weights must cut it.
    layer = make("mac_linear")
    with torch.no_grad():
        layer.combine.norm_m.weight.zero_()
    torch.manual_seed(4)
    x = torch.randn(1, 8, HIDDEN)
    x2 = x.clone()
    x2[:, 1] += 2.0
    assert (layer(x)[:, 4:] - layer(x2)[:, 4:]).abs().max() > 1e-5
    with torch.no_grad():
        layer.h_kv.weight.zero_()
    assert torch.allclose(layer(x)[:, 4:], layer(x2)[:, 4:], atol=1e-6)


@pytest.mark.parametrize("case", ["lmm_linear", "lmm_mlp", "mag", "mal_mlp", "mac_mlp"])
def test_gradients_reach_every_parameter_and_are_finite(case):
    layer = make(case)
    x = torch.randn(2, 10, HIDDEN, requires_grad=True)
    layer(x).square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{case}: bad gradient for {name}"
        assert p.grad.abs().sum() > 0, f"{case}: zero gradient for {name}"


def test_mal_is_its_lmm_sub_layer_then_attention_on_the_sum():
    # o = m + W_o SWA*(RMSNorm(x + m)) with m = titans_lmm(x): the sub-layers run as mixers of their own, with
    # their own caches, give the same numbers, and MAL's cache holds exactly theirs.
    layer = make("mal_mlp")
    torch.manual_seed(6)
    x = torch.randn(2, 11, HIDDEN)
    m = layer.lmm(x)
    assert torch.equal(layer(x), m + layer.attn(layer.attn_norm(x + m)))
    cache, lmm_cache, attn_cache = layer.init_cache(2), layer.lmm.init_cache(2), layer.attn.init_cache(2)
    for a, b in ((0, 6), (6, 7), (7, 11)):
        m = layer.lmm(x[:, a:b], cache=lmm_cache)
        expected = m + layer.attn(layer.attn_norm(x[:, a:b] + m), cache=attn_cache)
        assert torch.equal(layer(x[:, a:b], cache=cache), expected)
    parts = {**lmm_cache.tensors, **attn_cache.tensors}
    assert sorted(cache.tensors) == sorted(parts) and len(parts) == len(lmm_cache.tensors) + len(attn_cache.tensors)
    for name, tensor in parts.items():
        assert torch.equal(cache.get(name), tensor), name


def test_learned_initial_memory_is_used_and_not_zero():
    layer = make("lmm_mlp")
    w1, w2 = layer.memory.init_weights
    assert w1.abs().min() > 0 and w2.abs().min() > 0
    assert all(getattr(p, "_no_weight_decay", False) for p in layer.memory.init_weights)
    x = torch.randn(1, 6, HIDDEN)
    before = layer(x)
    with torch.no_grad():
        w2.mul_(2.0)
    assert not torch.allclose(layer(x), before)


def test_state_size_is_fixed_for_the_memory_and_grows_inside_mac_segments():
    layer = make("mac_linear")  # chunk 2, segment 4
    sizes = [layer.state_size(batch=3, seq_len=n) for n in range(1, 9)]
    # MAC's segment KV grows inside a segment and drops at its end; the memory's state does not change size.
    assert sizes[3] < sizes[2] and sizes[7] == sizes[3] and sizes[4] > sizes[3]
    assert layer.state_size(batch=3) == max(sizes)
    lmm = make("lmm_linear")
    cache = lmm.init_cache(3)
    for n in (1, 3, 8, 9):  # mid-chunk and on a boundary alike: the memory now, and at its chunk's start
        lmm(torch.randn(3, 1 if n == 1 else n - cache.seen[0], HIDDEN), cache=cache)
        assert cache.nbytes() == lmm.state_size(batch=3, seq_len=n) == lmm.state_size(batch=3)
    assert sorted(n for n in cache.tensors if "recurrent" in n) == ["recurrent", "recurrent_chunk_start"]
    assert cache.get("recurrent").dtype == torch.float32
    with pytest.raises(ValueError, match="seq_len"):
        build_mixer("titans_mag", HIDDEN, 0, {"window_size": None}).state_size()


@pytest.mark.parametrize("case", ["lmm_plain", "mag", "mal_mlp", "mac_linear", "mac_mlp"])
def test_typed_state_round_trips_through_the_cache(case):
    # The layers work on a TitansState; _load/_save are the only code that maps it to cache tensors.
    layer = make(case)
    cache = layer.init_cache(2)
    layer(torch.randn(2, 7, HIDDEN), cache=cache)  # mid-chunk and mid-segment for every case
    branch = layer.lmm.memory if case.startswith("mal") else layer.memory
    state = titans_module._load(cache, branch)
    memory_type = MLPMemoryState if "mlp" in case else LinearMemoryState
    assert isinstance(state.stream.memory, memory_type) and isinstance(state.stream.chunk_start, memory_type)
    assert (state.stream.conv is None) == (case == "lmm_plain")
    assert (state.kv.key is None) == case.startswith("lmm")
    assert isinstance(state.segment.memory, memory_type) if case.startswith("mac") else state.segment.memory is None
    copy = LayerCache(2)
    titans_module._save(copy, state)
    assert cache.seen_tokens == 7 and sorted(copy.tensors) == sorted(cache.tensors)
    for name, tensor in cache.tensors.items():
        assert torch.equal(copy.get(name), tensor), name
    assert titans_module._load(None, branch) == titans_module.TitansState()


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("titans_lmm", {"memory": "deep"}, "memory must be"),
        ("titans_lmm", {"chunk_size": 0}, "chunk_size"),
        ("titans_lmm", {"max_lr": 0.0}, "max_lr"),
        ("titans_mag", {"window_size": 0}, "window_size"),
        ("titans_mac", {"chunk_size": 3, "segment_size": 8}, "multiple of chunk_size"),
        ("titans_mal", {"num_persistent": -1}, "num_persistent"),
        ("titans_lmm", {"chunk_sise": 4}, "unknown option"),
    ],
)
def test_bad_options_fail_with_one_line(name, options, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_mixer(name, HIDDEN, 0, options)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_heads": 0}, "num_heads"),
        ({"head_dim": 0}, "head_dim"),
        ({"chunk_size": 2.0}, "chunk_size must be an int"),
        ({"memory": "deep"}, "memory must be"),
        ({"mlp_expansion": 0}, "mlp_expansion"),
        ({"mlp_activation": "elu"}, "mlp_activation"),
        ({"max_lr": -0.1}, "max_lr"),
        ({"conv_size": 0}, "conv_size"),
        ({"retrieval": "segment"}, "retrieval must be one of token, chunk"),
    ],
)
def test_memory_options_reject_bad_values_with_one_line(options, message):
    with pytest.raises(ConfigError, match=message) as info:
        MemoryOptions(**options)
    assert "\n" not in str(info.value)
    # Every mixer checks its memory keywords there, and names itself in the error.
    for name in ("titans_lmm", "titans_mag", "titans_mal", "titans_mac"):
        with pytest.raises(ConfigError, match=rf"^titans_\w+: .*{message}") as info:
            build_mixer(name, HIDDEN, 0, options)
        assert "\n" not in str(info.value)


def test_memory_options_resolve_head_dim_from_the_layer_width():
    assert MemoryOptions().head_dim is None
    assert MemoryOptions.resolve("titans_lmm", 24, {"num_heads": 3}).head_dim == 8
    assert MemoryOptions.resolve("titans_lmm", 24, {"num_heads": 3, "head_dim": 5}).head_dim == 5
    with pytest.raises(TypeError, match="titans_lmm: unknown option.* chunk_sise"):
        MemoryOptions.resolve("titans_lmm", 24, {"chunk_sise": 4})
    with pytest.raises(TypeError, match="chunk_sise"):
        TitansLMM(HIDDEN, chunk_sise=4)  # a typo fails outside the registry too


MEMORY_DEFAULTS = {
    "num_heads": 2, "head_dim": None, "chunk_size": 16, "memory": "linear", "mlp_expansion": 4, "mlp_activation": "gelu",
    "mlp_residual_norm": True, "max_lr": 0.1, "conv_size": 4, "use_momentum": True, "use_decay": True, "retrieval": "token",
    "backend": "auto",
}  # fmt: skip
OWN_DEFAULTS = {
    "titans_lmm": {},
    "titans_mag": {"window_size": 64, "num_persistent": 4, "rope_theta": 10000.0},
    "titans_mal": {"window_size": 64, "num_persistent": 4, "rope_theta": 10000.0},
    "titans_mac": {"segment_size": 32, "num_persistent": 4, "rope_theta": 10000.0},
}


@pytest.mark.parametrize("name", list(OWN_DEFAULTS))
def test_constructor_signature_lists_every_option_with_its_default_in_config_order(name):
    # The registry checks config keys against this signature (a ``**`` parameter would let typos through).
    params = inspect.signature(get_mixer_class(name).__init__).parameters
    assert not any(p.kind is p.VAR_KEYWORD for p in params.values())
    options = {n: p.default for n, p in params.items() if n not in ("self", "hidden_size", "layer_idx")}
    assert options == {**MEMORY_DEFAULTS, **OWN_DEFAULTS[name]}
    config = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "model" / f"{name}.yaml")
    assert list(config.mixers[name]) == list(options)


def test_language_model_generate_with_cache_equals_without():
    torch.manual_seed(0)
    model = LanguageModel(
        {
            "vocab_size": 30,
            "hidden_size": HIDDEN,
            "num_layers": 2,
            "pattern": ["titans_mac", "titans_mag"],
            "mixers": {"titans_mac": {"chunk_size": 2, "segment_size": 4}, "titans_mag": {"chunk_size": 4, "window_size": 3}},
            "mlp": "swiglu",
        }
    )
    prompt = torch.randint(0, 30, (2, 7))
    a = model.generate(prompt, 6, temperature=0)
    b = model.generate(prompt, 6, temperature=0, use_cache=False)
    assert torch.equal(a, b)
    assert isinstance(model.blocks[0].mixer, TitansMAC)


@pytest.mark.parametrize("model", ["titans_lmm", "titans_mag", "titans_mal", "titans_mac"])
def test_config_composes_and_trains_one_step(model, tmp_path):
    cfg = training.compose([*TINY, f"model={model}", "trainer.max_steps=2", "test_after_fit=false"])
    result = training.run(cfg, tmp_path)
    losses = [loss for _, loss in result["losses"]]
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses)


def test_lmm_wiring_matches_the_op_on_hand_built_features():
    # Independent of the streaming code: projections, SiLU, L2 on q/k, θ = max_lr·σ, η = σ, α = σ in the
    # order (head, gate), the op from the learned init, per-head gated RMSNorm and the output projection.
    torch.manual_seed(5)
    layer = build_mixer("titans_lmm", HIDDEN, 0, {"num_heads": 2, "chunk_size": 3, "conv_size": None, "max_lr": 0.7})
    with torch.no_grad():
        layer.memory.gate_proj.weight.normal_(std=0.5)
    mem = layer.memory
    x = torch.randn(2, 7, HIDDEN)
    split = lambda t: rearrange(t, "b t (h d) -> b t h d", h=2)  # noqa: E731
    l2 = lambda t: t / t.norm(dim=-1, keepdim=True)  # noqa: E731
    q, k, v = l2(split(F.silu(mem.q_proj(x)))), l2(split(F.silu(mem.k_proj(x)))), split(F.silu(mem.v_proj(x)))
    gates = torch.sigmoid(rearrange(mem.gate_proj(x), "b t (h g) -> b t h g", g=3))
    w0 = mem.init_weights[0].expand(2, -1, -1, -1)
    o, _ = neural_memory(
        q, k, v, 0.7 * gates[..., 0], gates[..., 1], gates[..., 2], chunk_size=3, initial_state=LinearMemoryState(w0, torch.zeros_like(w0))
    )
    normed = o / o.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * layer.out_norm.weight
    expected = layer.o_proj(rearrange(normed * torch.sigmoid(split(layer.g_proj(x))), "b t h d -> b t (h d)"))
    out = layer(x)
    assert_rel_close(out, expected, 1e-5)
    # Gradients too: the layer recomputes its features and norms in backward (checkpointing), the
    # hand-built path above does not.
    params = list(layer.parameters())
    cotangent = torch.randn_like(out)
    grads = torch.autograd.grad((out * cotangent).sum(), params, allow_unused=True)
    expected_grads = torch.autograd.grad((expected * cotangent).sum(), params, allow_unused=True)
    for (name, _), a, b in zip(layer.named_parameters(), grads, expected_grads):
        assert (a is None) == (b is None), name
        if a is not None:
            assert_rel_close(a, b, 1e-5, name)


def test_lmm_keeps_few_activations_for_backward(monkeypatch):
    """Saved-for-backward bytes per token of a training forward (dim 64, 2 heads, chunk 16, linear memory).

    The memory states at chunk boundaries (2·2·32·32 floats per 16 tokens), the op's chunk-major q/k/v, the
    output norm's inputs, the layer input and the output projection's input come to about 3.1 KB per token;
    before the features, convs, norm and coefficients were recomputed in backward it was 6.0 KB.
    """
    import seqzoo.models.modules as modules

    torch.manual_seed(0)
    layer = build_mixer("titans_lmm", 64, 0, {"num_heads": 2, "chunk_size": 16})
    x = torch.randn(1, 512, 64)

    def saved_per_token() -> float:
        storages = {}

        def keep(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            layer(x)
        return sum(storages.values()) / x.shape[1]

    # Small activations are kept (recomputing them costs more than their memory); from the threshold on, recomputed.
    kept = saved_per_token()
    monkeypatch.setattr(modules, "RECOMPUTE_MIN_NUMEL", 0)
    recomputed = saved_per_token()
    assert recomputed < 3500 < kept


def test_titans_module_cites_only_files_in_the_repository():
    # The reasons behind the layers' choices are written into the docstrings or docs/, not left in notes elsewhere.
    root = Path(__file__).resolve().parents[1]
    text = (root / "models" / "titans.py").read_text()
    assert "§" not in text and "specs/" not in text
    cited = re.findall(r"docs/[\w./-]+\.md", text)
    assert cited and all((root / name).is_file() for name in cited), cited
