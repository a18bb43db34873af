"""ParaRNN mixers (pararnn_gru, pararnn_lstm): decode == parallel, Newton == loop, causality, gradients, state size, configs.

Tolerances: the parallel form runs a fixed number of Newton iterations (3 by default), so it equals the
sequential recurrence only up to Newton's residual. With the bounded recurrent vectors of the default
config the Jacobians contract and 3 iterations reach ~1e-7 relative at these lengths (Newton converges
quadratically from the f(0, x) guess), so 1e-4 holds with margin. For parameters far from init (unbounded, large recurrent weights)
only ``max_iters >= seq`` is guaranteed exact; that case is checked with ``max_iters = seq``.
"""

import pytest
import torch
from omegaconf import OmegaConf

import seqzoo.training as training
from seqzoo.models import ConfigError, LanguageModel, LayerCache, build_mixer
from tests.helpers import assert_rel_close
from tests.test_training import TINY

MIXERS = ["pararnn_gru", "pararnn_lstm"]
HIDDEN, SEQ, BATCH = 16, 11, 2


def make(name, seed=0, **options):
    torch.manual_seed(seed)
    return build_mixer(name, HIDDEN, 0, options)


def stress(layer):
    """Push the recurrent vectors far from init (a trained-looking, less contractive cell)."""
    with torch.no_grad():
        for p in layer.cell.recurrent_parameters():
            p.normal_(0.0, 1.5)
    return layer


def decode(layer, x, prefill, chunk=0):
    """Prefill ``prefill`` tokens, then one ``chunk`` of tokens (a Newton solve from the cached state), then one at a time."""
    cache = LayerCache(x.shape[0])
    outs = [layer(x[:, :prefill], cache)] if prefill else []
    if chunk:
        outs.append(layer(x[:, prefill : prefill + chunk], cache))
    for t in range(prefill + chunk, x.shape[1]):
        outs.append(layer(x[:, t : t + 1], cache))
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("name", MIXERS)
@pytest.mark.parametrize("prefill, chunk", [(0, 0), (5, 0), (5, 3)])
def test_decode_equals_parallel_forward(name, prefill, chunk):
    layer = make(name)
    x = torch.randn(BATCH, SEQ, HIDDEN)
    with torch.no_grad():
        full = layer(x)
        stepped, cache = decode(layer, x, prefill, chunk)
    assert_rel_close(stepped, full, 1e-4, f"{name} decode after prefill {prefill}, chunk {chunk}")
    assert cache.seen_tokens == SEQ


@pytest.mark.parametrize("name", MIXERS)
def test_newton_with_seq_iterations_is_the_loop_even_far_from_init(name):
    x = 2.0 * torch.randn(BATCH, SEQ, HIDDEN)
    newton = stress(make(name, recurrent_bound=None, max_iters=SEQ))
    loop = make(name, recurrent_bound=None, backend="reference")
    loop.load_state_dict(newton.state_dict())
    with torch.no_grad():
        assert_rel_close(newton(x), loop(x), 1e-5, f"{name} Newton(K=T) vs loop")
        stepped, _ = decode(newton, x, 4)
        assert_rel_close(stepped, loop(x), 1e-5, f"{name} decode vs loop")


SOLVES = [dict(backend="torch"), dict(backend="cpp"), dict(backend="auto")]  # on CPU: auto is the C++ kernel


@pytest.mark.parametrize(
    "name, solve",
    [(m, s) for m in MIXERS for s in SOLVES] + [pytest.param(m, dict(backend="fused"), marks=pytest.mark.triton) for m in MIXERS],
)
def test_three_newton_iterations_match_the_loop_and_its_gradients(name, solve):
    layer = make(name, **solve)
    loop = make(name, backend="reference")
    loop.load_state_dict(layer.state_dict())
    x = torch.randn(BATCH, SEQ, HIDDEN, requires_grad=True)
    weight = torch.randn(BATCH, SEQ, HIDDEN)
    grads = []
    for module in (layer, loop):
        x.grad = None
        out = module(x)
        (out * weight).sum().backward()
        grads.append((out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in module.named_parameters()}))
    (out_p, dx_p, dp_p), (out_s, dx_s, dp_s) = grads
    assert_rel_close(out_p, out_s, 1e-4, "output")
    assert_rel_close(dx_p, dx_s, 1e-4, "input gradient")
    for n in dp_s:
        assert torch.isfinite(dp_p[n]).all(), f"{n}: non-finite gradient"
        assert_rel_close(dp_p[n], dp_s[n], 1e-4, f"gradient of {n}")


@pytest.mark.parametrize("name", MIXERS)
def test_causality(name):
    layer = make(name)
    x = torch.randn(BATCH, SEQ, HIDDEN)
    t = 6
    x2 = x.clone()
    x2[:, t + 1 :] += torch.randn_like(x2[:, t + 1 :])
    with torch.no_grad():
        y, y2 = layer(x), layer(x2)
    assert torch.equal(y[:, : t + 1], y2[:, : t + 1])
    assert not torch.allclose(y[:, t + 1 :], y2[:, t + 1 :])


@pytest.mark.parametrize("name", MIXERS)
@pytest.mark.parametrize("conv_size, expand", [(4, 1.0), (1, 2.0)])
def test_state_size_equals_cache_bytes(name, conv_size, expand):
    layer = make(name, conv_size=conv_size, expand=expand)
    with torch.no_grad():
        _, cache = decode(layer, torch.randn(3, 7, HIDDEN), 7)
    inner = int(expand * HIDDEN)
    state = inner * (2 if name == "pararnn_lstm" else 1)
    assert layer.state_size(batch=3) == cache.nbytes() == 3 * 4 * (state + (conv_size - 1) * inner)
    assert cache.get("recurrent").dtype == torch.float32 and cache.get("recurrent").shape == (3, state)
    # Constant in the prompt length: a recurrent layer.
    assert layer.state_size(batch=3, seq_len=1000) == layer.state_size(batch=3)


@pytest.mark.parametrize("name", MIXERS)
def test_language_model_cache_bytes_and_greedy_generation(name):
    torch.manual_seed(0)
    model = LanguageModel({"vocab_size": 40, "hidden_size": HIDDEN, "num_layers": 2, "pattern": [name], "mlp": "swiglu"})
    prompt = torch.randint(0, 40, (2, 5))
    cache = model.init_cache(2)
    with torch.no_grad():
        model(prompt, cache=cache)
    assert model.state_size(batch=2, seq_len=5) == cache.nbytes()
    cached = model.generate(prompt, 4, temperature=0)
    uncached = model.generate(prompt, 4, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)
    names = model.no_weight_decay_names()
    assert {"blocks.0.mixer.cell.recurrent", "blocks.0.mixer.cell.bias"} <= names
    assert "blocks.0.mixer.cell.proj" not in names


@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_heads": 3}, "num_heads \\(3\\) must be >= 1 and divide"),
        ({"backend": "newton"}, "backend: pararnn: unknown backend 'newton'"),
        ({"backend": "cuda"}, "unknown backend 'cuda'"),
        ({"max_iters": -1}, "max_iters must be"),
        ({"init_guess": "ones"}, "init_guess must be one of"),
        ({"conv_size": 0}, "conv_size must be >= 1"),
        ({"recurrent_bound": 0.0}, "recurrent_bound must be > 0"),
        ({"num_head": 2}, "unknown option\\(s\\) num_head"),
    ],
)
def test_bad_options_fail_with_one_line(options, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_mixer("pararnn_gru", HIDDEN, 0, options)
    assert "\n" not in str(info.value)


def test_bad_input_shape_is_one_line():
    with pytest.raises(ValueError, match="expected input \\[batch, seq, 16\\]"):
        make("pararnn_lstm")(torch.randn(2, 3, 8))


@pytest.mark.parametrize("name", MIXERS)
def test_config_trains_one_step(tmp_path, name):
    cfg = training.compose([f"model={name}", *TINY, "trainer.max_steps=2", "test_after_fit=false"])
    assert OmegaConf.to_container(cfg.model, resolve=True)["pattern"] == [name]
    result = training.run(cfg, tmp_path)
    losses = [loss for _, loss in result["losses"]]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
