"""The contract every token mixer meets, checked for every registered mixer and every model config.

A mixer added later is checked here without a test of its own; a mixer that cannot meet a point fails.

For each mixer (float64, so the comparisons are tight):
* parallel == prefill of ``p`` tokens + token-by-token decode, for prompt lengths on and off every chunk
  and segment length;
* causality: changing later tokens leaves earlier outputs unchanged;
* document isolation: a document's outputs and input gradients in a packed row (``cu_seqlens``) equal those
  of the document alone;
* prompts of different lengths prefilled in one packed call, then decoded together, equal each prompt alone;
* ``state_size() == cache.nbytes()`` after every call of the above;
* bf16 autocast: forward and backward finite and close to fp32.

For each ``configs/model/*.yaml``: the language model isolates packed documents and its cached greedy
generation of prompts of different lengths equals generating each alone.
"""

from __future__ import annotations

import pytest
import torch

import seqzoo.training as training
from seqzoo.configs import config_names
from seqzoo.models import LanguageModel, build_mixer, mixer_names
from tests.helpers import assert_rel_close

HIDDEN = 32
SEQ = 37  # not a multiple of any chunk (64, 16) or segment (32) length, and past a Titans segment
# Newton's fixed iterations make ParaRNN's parallel form equal the recurrence only up to its residual.
TOL = {"pararnn_gru": 1e-6, "pararnn_lstm": 1e-6}
DEFAULT_TOL = 1e-9


def _mixer(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_mixer(name, HIDDEN, 0).double()


def _tol(name: str) -> float:
    return TOL.get(name, DEFAULT_TOL)


def _held_bytes(layer: torch.nn.Module, seen: list[int]) -> int:
    """What a cache whose rows have seen ``seen`` tokens holds: rows kept together share one buffer padded to
    the longest (attention's right-aligned KV); a mixer run row by row keeps each row at its own length."""
    if layer.ragged_rows:
        return layer.state_size(batch=len(seen), seq_len=max(seen))
    return sum(layer.state_size(batch=1, seq_len=n) for n in seen)


@pytest.mark.parametrize("prompt", [1, 5, 16, 33])
@pytest.mark.parametrize("name", mixer_names())
def test_prefill_then_decode_equals_parallel(name, prompt):
    layer = _mixer(name)
    x = torch.randn(2, SEQ, HIDDEN, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x)
        cache = layer.init_cache(2)
        pieces = [layer(x[:, :prompt], cache=cache)]
        assert cache.nbytes() == layer.state_size(batch=2, seq_len=prompt)
        for t in range(prompt, SEQ):
            pieces.append(layer(x[:, t : t + 1], cache=cache))
        assert cache.seen == [SEQ, SEQ] and cache.nbytes() == layer.state_size(batch=2, seq_len=SEQ)
    assert_rel_close(torch.cat(pieces, dim=1), full, _tol(name), f"{name} decode after a prefill of {prompt}")


@pytest.mark.parametrize("name", mixer_names())
def test_causality(name):
    layer = _mixer(name)
    x = torch.randn(2, SEQ, HIDDEN, dtype=torch.float64)
    changed = x.clone()
    changed[:, 20:] = torch.randn_like(changed[:, 20:])
    with torch.no_grad():
        before, after = layer(x), layer(changed)
    # Not bit for bit: a chunked path may pick a chunk's numerically equivalent form from its data (GLA).
    assert_rel_close(after[:, :20], before[:, :20], 1e-12, f"{name}: a later token changed an earlier output")
    assert not torch.allclose(before[:, 20:], after[:, 20:])


@pytest.mark.parametrize("name", mixer_names())
def test_packed_documents_are_isolated(name):
    layer = _mixer(name)
    lengths = [9, SEQ, 1, 20]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    x = torch.randn(1, sum(lengths), HIDDEN, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(1, sum(lengths), HIDDEN, dtype=torch.float64)
    packed = layer(x, cu_seqlens=offsets)
    (packed * weight).sum().backward()
    for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        doc = x[:, a:b].detach().clone().requires_grad_(True)
        alone = layer(doc)
        (alone * weight[:, a:b]).sum().backward()
        assert_rel_close(packed[:, a:b], alone, 1e-10, f"{name}: document [{a}, {b}) output")
        assert_rel_close(x.grad[:, a:b], doc.grad, 1e-10, f"{name}: document [{a}, {b}) input gradient")


@pytest.mark.parametrize("name", mixer_names())
def test_prompts_of_different_lengths_prefilled_together_then_decoded(name):
    layer = _mixer(name)
    lengths, steps = [3, 17, 8], 5
    sequences = [torch.randn(1, n + steps, HIDDEN, dtype=torch.float64) for n in lengths]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    with torch.no_grad():
        cache = layer.init_cache(len(lengths))
        prefill = layer(torch.cat([s[:, :n] for s, n in zip(sequences, lengths)], dim=1), cache=cache, cu_seqlens=offsets)
        assert cache.seen == lengths
        assert cache.nbytes() == _held_bytes(layer, lengths)
        decoded = [layer(torch.cat([s[:, n + t : n + t + 1] for s, n in zip(sequences, lengths)]), cache=cache) for t in range(steps)]
        assert cache.nbytes() == _held_bytes(layer, [n + steps for n in lengths])
        for i, (s, n) in enumerate(zip(sequences, lengths)):
            alone = layer(s)
            assert_rel_close(prefill[:, offsets[i] : offsets[i + 1]], alone[:, :n], _tol(name), f"{name}: prompt {i} prefill")
            steps_i = torch.cat([d[i : i + 1] for d in decoded], dim=1)
            assert_rel_close(steps_i, alone[:, n:], _tol(name), f"{name}: prompt {i} decode")


@pytest.mark.parametrize("name", mixer_names())
def test_bf16_autocast_trains_close_to_fp32(name):
    torch.manual_seed(0)
    layer = build_mixer(name, HIDDEN, 0)
    x = torch.randn(2, SEQ, HIDDEN, requires_grad=True)
    reference = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        out.float().square().mean().backward()
    assert torch.isfinite(out.float()).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    # bf16 keeps 8 bits of mantissa; a few roundings through the layer stay well inside 5% of the output's scale.
    assert (out.float() - reference).abs().max() <= 0.05 * reference.abs().max()


def _config_lm(config: str) -> LanguageModel:
    cfg = training.compose([f"model={config}", "data.vocab_size=40", "model.hidden_size=32", "model.num_layers=2"])
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    return LanguageModel(OmegaConf.to_container(cfg.model, resolve=True)).double()


@pytest.mark.parametrize("config", config_names("model"))
def test_every_model_config_isolates_documents_and_generates_prompts_of_different_lengths(config):
    model = _config_lm(config).eval()
    lengths = [5, 23, 2]
    docs = [torch.randint(0, 40, (n,)) for n in lengths]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    with torch.no_grad():
        packed = model(torch.cat(docs)[None], cu_seqlens=offsets)
        for i, doc in enumerate(docs):
            assert_rel_close(packed[:, offsets[i] : offsets[i + 1]], model(doc[None]), 1e-6, f"{config}: document {i}")
    together = model.generate(docs, 4, temperature=0)
    for doc, out in zip(docs, together):
        assert torch.equal(out, model.generate(doc[None], 4, temperature=0)[0]), f"{config}: generation of a {doc.numel()}-token prompt"
