"""SCOUT and RAT layers: cached decoding at every segment phase, the checkpoint cache, causality and locality of the
whole SCOUT block, the compressions, RAT's limits (L = 1 is attention over the EMA outputs, one chunk is an RNN).

The conformance suite (``tests/test_mixer_contract.py``) runs both mixers with their defaults; these tests vary
what the defaults do not: each compression, each local mixer, segment lengths 1 … 5, prompts of every
length mod L.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqzoo.configs import ConfigError
from seqzoo.models import LanguageModel, build_mixer
from seqzoo.models.base import Call
from seqzoo.models.checkpoint_attention import pool_segments
from seqzoo.models.rat import chunk_ema
from seqzoo.ops import affine_scan
from tests.helpers import assert_rel_close

HIDDEN = 16
F64 = torch.float64

SCOUT_VARIANTS = {
    "swa-stride": dict(mixer="attention", mixer_options={"window_size": 5}, compression="stride"),
    "swa-mean": dict(mixer="attention", mixer_options={"window_size": 5, "num_heads": 2}, compression="mean", num_kv_heads=2),
    "mamba-gated": dict(mixer="mamba2", mixer_options={"head_dim": 8, "d_state": 8}, compression="gated"),
}


def _layer(name: str, seed: int = 0, **options) -> torch.nn.Module:
    torch.manual_seed(seed)
    defaults = {"num_heads": 4} if name == "scout" else {"num_heads": 4, "qk_heads": 2}
    return build_mixer(name, HIDDEN, 0, defaults | options).double()


def _x(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, seq, HIDDEN, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _decode(layer, x: torch.Tensor, prompt: int, step: int = 1) -> tuple[torch.Tensor, object]:
    """Prefill ``prompt`` tokens, then the rest ``step`` tokens at a time; returns the outputs and the cache."""
    cache = layer.init_cache(x.shape[0])
    pieces = [layer(x[:, :prompt], cache=cache)]
    for t in range(prompt, x.shape[1], step):
        pieces.append(layer(x[:, t : t + step], cache=cache))
    return torch.cat(pieces, dim=1), cache


def _checkpoints_held(cache) -> int:
    return cache.get("ckpt_key").shape[1]


# --------------------------------------------------------------------------------- cached decoding, every phase


@pytest.mark.parametrize("variant", SCOUT_VARIANTS)
def test_scout_prefill_of_every_length_mod_L_then_decode_equals_parallel(variant):
    segment_len, seq = 4, 19
    layer = _layer("scout", segment_len=segment_len, **SCOUT_VARIANTS[variant])
    x = _x(2, seq)
    with torch.no_grad():
        full = layer(x)
        for prompt in range(1, 2 * segment_len + 1):  # every phase, and a prompt that ends on a boundary twice
            out, cache = _decode(layer, x, prompt, step=1 if prompt % 2 else 3)
            assert_rel_close(out, full, 1e-12, f"{variant}: prefill {prompt}")
            assert _checkpoints_held(cache) == seq // segment_len and cache.nbytes() == layer.state_size(2, seq)


@pytest.mark.parametrize("chunk_size", [1, 3, 5])
def test_rat_prefill_of_every_length_mod_L_then_decode_equals_parallel(chunk_size):
    seq = 17
    layer = _layer("rat", chunk_size=chunk_size)
    x = _x(2, seq)
    with torch.no_grad():
        full = layer(x)
        for prompt in range(1, chunk_size + 2):
            out, cache = _decode(layer, x, prompt, step=2)
            assert_rel_close(out, full, 1e-12, f"rat L={chunk_size}: prefill {prompt}")
            assert _checkpoints_held(cache) == seq // chunk_size and cache.nbytes() == layer.state_size(2, seq)


@pytest.mark.parametrize("name", ["scout", "rat"])
def test_the_cache_holds_one_checkpoint_per_completed_segment(name):
    layer = _layer(name, **({"segment_len": 4} if name == "scout" else {"chunk_size": 4}))
    x = _x(1, 14)
    with torch.no_grad():
        for prompt in range(1, 14):
            cache = layer.init_cache(1)
            layer(x[:, :prompt], cache=cache)
            assert _checkpoints_held(cache) == prompt // 4, f"{name}: after {prompt} tokens"
            for t in range(prompt, 14):
                layer(x[:, t : t + 1], cache=cache)
                assert _checkpoints_held(cache) == (t + 1) // 4
    with pytest.raises(ValueError, match=rf"^{name}: state_size needs seq_len \(the checkpoint cache grows as seq_len / segment_len\)$"):
        layer.state_size()


def test_cached_checkpoints_are_the_segments_last_keys_after_rope():
    """``stride``: checkpoint m is token (m+1)L−1's key, rotated at its own position, whatever the prefill split."""
    layer = _layer("scout", segment_len=3, **SCOUT_VARIANTS["swa-stride"])
    x = _x(1, 11)
    with torch.no_grad():
        cache = layer.init_cache(1)
        layer(x[:, :4], cache=cache)
        for t in range(4, 11):
            layer(x[:, t : t + 1], cache=cache)
        # Recompute the checkpoint sub-layer's input by hand: x + local + MLP.
        h = x + layer.local(layer.local_norm(x))
        h = layer.ckpt_norm(h + layer.mlp(layer.mlp_norm(h)))
        k = layer.ckpt.k_proj(h).unflatten(-1, (4, 4))
        k = layer.ckpt.rotary(k, 0)
    assert_rel_close(cache.get("ckpt_key"), k[:, 2::3], 1e-12, "checkpoint keys")


# ------------------------------------------------------------------------------------ causality and locality


def _dependence(layer, x: torch.Tensor) -> torch.Tensor:
    """``[seq, seq]`` boolean: whether output ``i`` depends on input ``j``, from the float64 gradient of a random
    projection of output ``i`` (exactly zero where there is no path; a random projection is not orthogonal to a
    real dependence)."""
    x = x.detach().requires_grad_(True)
    out = layer(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    rows = []
    for i in range(out.shape[1]):
        (grad,) = torch.autograd.grad((out[:, i] * weights[:, i]).sum(), x, retain_graph=True)
        rows.append(grad[0].abs().amax(-1) > 0)
    return torch.stack(rows)


def test_the_whole_scout_block_sees_its_window_and_earlier_checkpoints_only_in_training():
    """Output i depends on input j iff j is in i's window, or in the window of a segment end e < i (whose
    mixed token is a checkpoint): a leak through the sliding-window mixer (the released code's unmasked
    training path) or the checkpoints would show up as an extra dependence."""
    window, segment_len, seq = 5, 4, 24
    layer = _layer("scout", segment_len=segment_len, mixer="attention", mixer_options={"window_size": window}).train()
    got = _dependence(layer, _x(1, seq))
    i, j = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    local = (i - j >= 0) & (i - j < window)
    ends = torch.arange(segment_len - 1, seq, segment_len)
    via_ckpt = torch.zeros(seq, seq, dtype=torch.bool)
    for e in ends.tolist():
        via_ckpt |= (e < i) & (e - j >= 0) & (e - j < window)
    assert torch.equal(got, local | via_ckpt)


@pytest.mark.parametrize("variant", SCOUT_VARIANTS)
def test_scout_block_is_causal_in_training(variant):
    layer = _layer("scout", segment_len=3, **SCOUT_VARIANTS[variant]).train()
    got = _dependence(layer, _x(1, 14))
    assert not torch.triu(got, diagonal=1).any(), f"{variant}: an output depends on a later token"


def test_rat_is_causal_and_reads_past_chunks_only_through_their_final_summaries():
    """A token's query sees its own chunk's running summary and earlier chunks' last summaries: output i depends
    on input j iff j <= i (the EMA keeps everything of a chunk in its final summary)."""
    layer = _layer("rat", chunk_size=4).train()
    got = _dependence(layer, _x(1, 13))
    assert torch.equal(got, torch.ones(13, 13, dtype=torch.bool).tril())


# ---------------------------------------------------------------------------------------------- compressions


def test_pooling_with_a_carried_summary_equals_pooling_the_whole_segment():
    """``gated``/``mean`` checkpoints: softmax-weighted means per segment; a call that starts inside a segment
    pools its tokens with the summary of the segment's earlier tokens exactly as one call over all of them."""
    gen = torch.Generator().manual_seed(0)
    seq, L = 14, 4
    k, v = torch.randn(2, seq, 3, 5, generator=gen, dtype=F64), torch.randn(2, seq, 3, 6, generator=gen, dtype=F64)
    w = torch.randn(2, seq, 3, generator=gen, dtype=F64)
    weights = torch.softmax(w[:, :12].unflatten(1, (3, L)), dim=2)
    want_k = torch.einsum("bslh,bslhd->bshd", weights, k[:, :12].unflatten(1, (3, L)))
    call = Call(2, seq, None, None, (0, 0))
    got_k, got_v, partial = pool_segments(k, v, w, call, L)
    assert_rel_close(got_k, want_k, 1e-14, "gated pool")
    assert_rel_close(partial.weight, torch.logsumexp(w[:, 12:], dim=1), 1e-14, "partial weight")
    for split in (1, 5, 6, 9):
        first_k, _, carry = pool_segments(k[:, :split], v[:, :split], w[:, :split], Call(2, split, None, None, (0, 0)), L)
        rest_k, rest_v, rest_partial = pool_segments(
            k[:, split:], v[:, split:], w[:, split:], Call(2, seq - split, None, None, (split, split)), L, carry
        )
        assert_rel_close(torch.cat([first_k, rest_k], dim=1), got_k, 1e-14, f"split at {split}")
        assert_rel_close(rest_partial.value, partial.value, 1e-14, f"split at {split}: partial")
    mean_k, _, _ = pool_segments(k, v, torch.zeros_like(w), call, L)
    assert_rel_close(mean_k, k[:, :12].unflatten(1, (3, L)).mean(2), 1e-14, "mean pool")


def test_compressions_make_different_checkpoints_and_segment_len_one_makes_them_agree():
    x = _x(1, 12)
    outputs = {}
    for compression in ("stride", "mean", "gated"):
        layer = _layer("scout", segment_len=3, mixer="attention", mixer_options={"window_size": 4}, compression=compression)
        with torch.no_grad():
            outputs[compression] = layer(x)
    assert not torch.allclose(outputs["stride"], outputs["mean"]) and not torch.allclose(outputs["mean"], outputs["gated"])
    # With L = 1 a segment is one token: every pool is that token, and the pool's own weights do not matter.
    ones, weights = [], None
    for compression in ("stride", "mean", "gated"):
        layer = _layer("scout", segment_len=1, mixer="attention", mixer_options={"window_size": 4}, compression=compression)
        if weights is None:
            weights = layer.state_dict()
        layer.load_state_dict(weights, strict=False)  # the same weights; gated has its pool projection besides
        with torch.no_grad():
            ones.append(layer(x))
    assert_rel_close(ones[1], ones[0], 1e-12, "mean vs stride at L=1")
    assert_rel_close(ones[2], ones[0], 1e-12, "gated vs stride at L=1")


def test_checkpoint_sublayer_with_segment_len_one_is_the_attention_mixer():
    """At L = 1 every past token is a checkpoint, so SCOUT's sub-layer is causal softmax attention with RoPE at the
    tokens' own positions: the zoo's ``attention`` mixer after a weight copy (same parameter names), dense and packed."""
    scout = _layer("scout", segment_len=1, num_heads=2, num_kv_heads=1, mixer_options={"window_size": 4})
    attention = build_mixer("attention", HIDDEN, 0, {"num_heads": 2, "num_kv_heads": 1, "rope_theta": 10000.0}).double()
    attention.load_state_dict(scout.ckpt.state_dict())
    x = _x(2, 23)
    with torch.no_grad():
        assert_rel_close(scout.ckpt(x, None, Call(2, 23, None, None, (0, 0))), attention(x), 1e-12, "dense")
        offsets = (0, 9, 10, 23)
        packed = scout.ckpt(x[:1], None, Call(1, 23, torch.tensor(offsets), offsets, (0, 0, 0)))
        assert_rel_close(packed, attention(x[:1], cu_seqlens=torch.tensor(offsets)), 1e-12, "packed")


# ------------------------------------------------------------------------------------------------ RAT's limits


def _rat_parts(layer, x):
    z, v, gate_logits, q, k = torch.split(layer.in_proj(x), layer.split_sizes, dim=-1)
    gate = torch.sigmoid(gate_logits + layer.gate_bias)
    heads, d, group = layer.num_heads, layer.head_dim, layer.num_heads // layer.qk_heads
    k = k.unflatten(-1, (layer.qk_heads, d)).repeat_interleave(group, dim=2).flatten(2)
    q = q.unflatten(-1, (layer.qk_heads, d))
    return z, q, gate, k, v, heads, d, group


@pytest.mark.parametrize("start", [0, 2, 5])
def test_chunk_ema_is_affine_scan_cut_at_every_chunk_start(start):
    """RAT's EMA against ``affine_scan`` with a boundary (``cu_seqlens``) at every chunk start, for a dense call
    continuing from position ``start`` with a carried state, and for packed documents."""
    gen = torch.Generator().manual_seed(0)
    L, seq = 4, 15
    a, b = torch.rand(2, seq, 3, 5, generator=gen, dtype=F64), torch.randn(2, seq, 3, 5, generator=gen, dtype=F64)
    initial = torch.randn(2, 3, 5, generator=gen, dtype=F64)
    got = chunk_ema(a, b, Call(2, seq, None, None, (start, start)), L, initial)
    cuts = sorted({0, seq, *range((L - start % L) % L, seq, L)})
    h0 = torch.zeros(2, len(cuts) - 1, 3, 5, dtype=F64)
    if start % L:
        h0[:, 0] = initial  # the first piece continues the carried chunk
    for row in range(2):
        want, _ = affine_scan(a[row : row + 1], b[row : row + 1], initial=h0[row], cu_seqlens=torch.tensor(cuts), backend="reference")
        assert_rel_close(got[row : row + 1], want, 1e-14, f"start {start} row {row}")
    lengths = [6, 1, 8]
    offsets = (0, 6, 7, 15)
    packed = chunk_ema(a[:1], b[:1], Call(1, seq, torch.tensor(offsets), offsets, (0, 0, 0)), L)
    cuts = sorted({o + c for o, n in zip(offsets, lengths) for c in range(0, n, L)} | {seq})
    want, _ = affine_scan(a[:1], b[:1], cu_seqlens=torch.tensor(cuts), backend="reference")
    assert_rel_close(packed, want, 1e-14, "packed")


def test_rat_with_chunk_one_is_attention_over_the_per_token_ema_outputs():
    layer = _layer("rat", chunk_size=1)
    x = _x(2, 15)
    with torch.no_grad():
        z, q, gate, k, v, heads, d, group = _rat_parts(layer, x)
        k_ema = ((1 - gate) * k).unflatten(-1, (heads, d))  # every token starts its own chunk: no memory
        v_ema = ((1 - gate) * v).unflatten(-1, (heads, d))
        positions = torch.arange(15)[None]
        q = layer.rotary(q, positions).repeat_interleave(group, dim=2)
        k_ema = layer.rotary(k_ema, positions)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k_ema.transpose(1, 2), v_ema.transpose(1, 2), is_causal=True)
        want = layer.out_proj(torch.sigmoid(z) * y.transpose(1, 2).flatten(2))
        assert_rel_close(layer(x), want, 1e-12, "RAT L=1 vs attention over (1-g)k, (1-g)v")


def test_rat_with_one_chunk_is_a_gated_rnn():
    """No chunk completes before any query: each token attends only to its running summary, so y_t = ṽ_t."""
    layer = _layer("rat", chunk_size=64)
    x = _x(1, 20)
    with torch.no_grad():
        z, _, gate, _, v, heads, d, _ = _rat_parts(layer, x)
        state, rows = torch.zeros_like(v[:, 0]), []
        for t in range(20):
            state = gate[:, t] * state + (1 - gate[:, t]) * v[:, t]
            rows.append(state)
        want = layer.out_proj(torch.sigmoid(z) * torch.stack(rows, dim=1))
        assert_rel_close(layer(x), want, 1e-12, "RAT one chunk vs the EMA")


# ------------------------------------------------------------------------------------- in a language model, errors


def test_scout_takes_the_raw_residual_stream_in_a_language_model():
    config = {"vocab_size": 30, "hidden_size": HIDDEN, "num_layers": 2, "pattern": ["scout"], "mixers": {"scout": {"num_heads": 2}}}
    torch.manual_seed(0)
    model = LanguageModel(config).double().eval()
    assert all(block.mixer_norm is None and block.mlp is None for block in model.blocks)
    ids = torch.randint(0, 30, (2, 21))
    with torch.no_grad():
        h = model.embed(ids)
        for block in model.blocks:  # the paper's decoder layer, four pre-norm residual sub-layers, one after another
            scout = block.mixer
            h = h + scout.local(scout.local_norm(h))
            h = h + scout.mlp(scout.mlp_norm(h))
            h = h + scout.ckpt(scout.ckpt_norm(h), None, Call(2, 21, None, None, (0, 0)))
            h = h + scout.mlp2(scout.mlp2_norm(h))
        assert_rel_close(model(ids), model.head(model.norm(h)), 1e-12, "LanguageModel vs stacked SCOUT layers")


@pytest.mark.triton
def test_scout_and_rat_run_the_triton_backend():
    x = _x(1, 40)
    for name, options in (("scout", {"segment_len": 3}), ("rat", {"chunk_size": 3})):
        torch.manual_seed(0)
        fast = _layer(name, backend="triton", **options)
        ref = _layer(name, backend="torch", **options)
        assert_rel_close(fast(x), ref(x), 1e-12, f"{name} triton vs torch")


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("scout", {"mixer": "gated_deltanet"}, r"scout: mixer must be one of attention, mamba2, got 'gated_deltanet'"),
        (
            "scout",
            {"mixer_options": {"num_heads": 2}},
            r"scout: the sliding-window mixer needs an integer mixer_options.window_size >= 1, got None",
        ),
        (
            "scout",
            {"mixer_options": {"window_size": 8, "windw": 3}},
            r"scout: mixer_options: mixer 'attention' got unknown option\(s\) windw",
        ),
        ("scout", {"compression": "max"}, r"scout: compression must be one of stride, mean, gated, got 'max'"),
        ("scout", {"segment_len": 0}, r"scout: segment_len must be an integer >= 1, got 0"),
        ("scout", {"backend": "fused"}, r"scout: backend: checkpoint_attention: has no 'fused' backend"),
        ("rat", {"qk_heads": 3}, r"rat: qk_heads \(3\) must divide num_heads \(4\)"),
        ("rat", {"chunk_size": 0}, r"rat: chunk_size must be an integer >= 1, got 0"),
    ],
)
def test_bad_options_are_one_line_config_errors(name, options, message):
    with pytest.raises(ConfigError, match=rf"^{message}"):
        _layer(name, **options)
