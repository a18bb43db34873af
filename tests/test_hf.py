"""seqzoo as a Hugging Face model: the config round trip, safetensors save/load, HF ``generate`` against
``LanguageModel.generate`` for every registered mixer (left padding included), sampling options, EOS stopping,
streaming, beam search, and the byte tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer

from seqzoo.configs import ConfigError
from seqzoo.data.text import ByteTokenizer, hf_tokenizer
from seqzoo.models import LanguageModel, LanguageModelConfig, mixer_names
from seqzoo.models.hf import SeqzooCache, SeqzooConfig, SeqzooForCausalLM, save_hf_directory

VOCAB = 48


def tiny(pattern: list[str], seed: int = 0, **extra) -> LanguageModel:
    torch.manual_seed(seed)
    config = {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 2, "pattern": pattern, "mlp": "swiglu", **extra}
    model = LanguageModel(config).eval()
    with torch.no_grad():  # sharper logits than the 0.02 init: greedy choices that differ from step to step
        model.head.weight.mul_(20.0)
    return model


def left_padded(prompts: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[batch, longest]`` with the prompts right-aligned (HF's left padding)."""
    width = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - p.numel() :] = p
        mask[r, width - p.numel() :] = 1
    return ids, mask


def prompts_of(lengths: list[int], seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


def test_config_round_trip(tmp_path):
    config = LanguageModelConfig.from_dict(
        {
            "vocab_size": 300,
            "hidden_size": 64,
            "num_layers": 4,
            "pattern": ["gated_deltanet", "gated_deltanet", "attention"],
            "mixers": {"attention": {"num_heads": 4, "window_size": 16}, "gated_deltanet": {"num_heads": 2, "expand_v": 1.0}},
            "mlp": "swiglu",
            "intermediate_size": 96,
            "tie_embeddings": False,
            "norm_eps": 1e-5,
            "init_std": 0.01,
        }
    )
    hf = SeqzooConfig.from_language_model_config(config, eos_token_id=256)
    assert hf.language_model_config() == config and hf.num_hidden_layers == 4 and not hf.tie_word_embeddings
    hf.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SeqzooConfig) and loaded.language_model_config() == config and loaded.eos_token_id == 256
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "seqzoo"


def test_config_round_trip_keeps_the_balance_loss(tmp_path):
    config = LanguageModelConfig.from_dict(
        {
            "vocab_size": 64,
            "hidden_size": 32,
            "num_layers": 2,
            "pattern": ["mom", "attention"],
            "balance_loss": {"form": "switch", "weight": 0.02},
        }
    )
    SeqzooConfig.from_language_model_config(config).save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path).language_model_config()
    assert loaded == config and loaded.balance_loss == {"form": "switch", "weight": 0.02}


def test_bad_config_is_one_line():
    with pytest.raises(ConfigError, match="unknown mixer 'nope'"):
        SeqzooConfig(pattern=["nope"])
    with pytest.raises(ConfigError, match="got unknown option"):
        SeqzooForCausalLM(SeqzooConfig(pattern=["attention"], mixers={"attention": {"num_haeds": 2}}))


@pytest.mark.parametrize("tied", [True, False])
def test_save_pretrained_from_pretrained_logits_equal(tmp_path, tied):
    model = tiny(["attention", "retnet"], tie_embeddings=tied, mixers={"attention": {"num_heads": 2, "rope_theta": 10000.0}})
    save_hf_directory(model, tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, SeqzooForCausalLM)
    assert (loaded.model.head.weight is loaded.model.embed.weight) == tied
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids))
    # The non-persistent buffers (RoPE frequencies, RetNet decays) are rebuilt, not left as meta-device garbage.
    assert torch.equal(loaded.model.blocks[0].mixer.rotary.inv_freq, model.blocks[0].mixer.rotary.inv_freq)


@pytest.mark.parametrize("name", mixer_names())
def test_hf_greedy_generate_equals_seqzoo_for_every_mixer(name):
    model = tiny([name])
    hf = SeqzooForCausalLM.from_language_model(model)
    prompts = prompts_of([3, 9, 6])
    ours = model.generate(prompts, max_new_tokens=5, temperature=0)
    ids, mask = left_padded(prompts)
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out[:, ids.shape[1] :], torch.stack([o[-5:] for o in ours])), name
    # One unpadded prompt too (beam search below also runs without a cache).
    alone = hf.generate(prompts[1][None], max_new_tokens=5, do_sample=False)
    assert torch.equal(alone[0, 9:], ours[1][-5:]), name


def test_padded_forward_equals_each_row_alone():
    model = tiny(["gated_deltanet", "attention"])
    hf = SeqzooForCausalLM.from_language_model(model)
    prompts = prompts_of([4, 10])
    ids, mask = left_padded(prompts)
    with torch.no_grad():
        logits = hf(ids, attention_mask=mask).logits
        for r, p in enumerate(prompts):
            alone = model(p[None])[0]
            torch.testing.assert_close(logits[r, ids.shape[1] - p.numel() :], alone, rtol=1e-5, atol=1e-5)
            assert not logits[r, : ids.shape[1] - p.numel()].any()  # pad positions are zero
        # Right padding is cut out the same way.
        right_ids, right_mask = torch.zeros_like(ids), torch.zeros_like(mask)
        for r, p in enumerate(prompts):
            right_ids[r, : p.numel()], right_mask[r, : p.numel()] = p, 1
        right = hf(right_ids, attention_mask=right_mask).logits
        for r, p in enumerate(prompts):
            torch.testing.assert_close(right[r, : p.numel()], logits[r, ids.shape[1] - p.numel() :])


def test_sampling_equals_seqzoo_sampling_for_the_same_seed():
    model = tiny(["gated_deltanet"])
    hf = SeqzooForCausalLM.from_language_model(model)
    prompt = prompts_of([5])[0]
    torch.manual_seed(7)
    ours = model.generate(prompt[None], max_new_tokens=12, temperature=0.8, top_k=10)
    torch.manual_seed(7)
    theirs = hf.generate(prompt[None], max_new_tokens=12, do_sample=True, temperature=0.8, top_k=10, top_p=1.0)
    assert torch.equal(theirs, ours)


def test_top_p_repetition_penalty_and_eos_stopping():
    model = tiny(["attention"])
    hf = SeqzooForCausalLM.from_language_model(model)
    prompt = prompts_of([5])[0][None]
    greedy = hf.generate(prompt, max_new_tokens=10, do_sample=False)
    # top_p this small keeps only the most likely token: sampling becomes greedy.
    nucleus = hf.generate(prompt, max_new_tokens=10, do_sample=True, top_p=1e-6, top_k=0)
    assert torch.equal(nucleus, greedy)
    # A strong repetition penalty never picks a token already in the sequence while unseen ones remain.
    penalised = hf.generate(prompt, max_new_tokens=10, do_sample=False, repetition_penalty=1e9)
    new = penalised[0, 5:].tolist()
    assert len(set(new)) == len(new) and not set(new) & set(prompt[0].tolist())
    # EOS: the third greedy token as end of sequence stops there.
    eos = int(greedy[0, 7])
    first = greedy[0, 5:].tolist().index(eos)
    stopped = hf.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(stopped[0], greedy[0, : 5 + first + 1])


def test_streaming_yields_the_generated_tokens():
    class Collect(BaseStreamer):
        def __init__(self) -> None:
            self.chunks: list[list[int]] = []
            self.ended = False

        def put(self, value: torch.Tensor) -> None:
            self.chunks.append(value.flatten().tolist())

        def end(self) -> None:
            self.ended = True

    model = tiny(["mamba2"])
    hf = SeqzooForCausalLM.from_language_model(model)
    prompt = prompts_of([6])[0][None]
    streamer = Collect()
    out = hf.generate(prompt, max_new_tokens=5, do_sample=False, streamer=streamer)
    assert streamer.ended and streamer.chunks[0] == prompt[0].tolist()
    assert sum(streamer.chunks[1:], []) == out[0, 6:].tolist()


@pytest.mark.parametrize("name", ["attention", "gated_deltanet", "titans_lmm"])
def test_beam_search_with_the_cache_equals_without(name):
    model = tiny([name])
    hf = SeqzooForCausalLM.from_language_model(model)
    ids, mask = left_padded(prompts_of([4, 7]))
    kwargs = dict(attention_mask=mask, max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    cached = hf.generate(ids, **kwargs)
    uncached = hf.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_cache_object_and_bad_inputs():
    model = tiny(["gated_deltanet", "attention"])
    hf = SeqzooForCausalLM.from_language_model(model)
    ids, mask = left_padded(prompts_of([2, 5]))
    out = hf(ids, attention_mask=mask, use_cache=True)
    cache = out.cache if hasattr(out, "cache") and out.cache is not None else out.past_key_values
    assert isinstance(cache, SeqzooCache) and cache.seen == [2, 5] and cache.get_seq_length() == 5
    step = hf(torch.tensor([[1], [2]]), cache=cache)
    assert cache.seen == [3, 6] and step.logits.shape == (2, 1, VOCAB)
    with pytest.raises(ValueError, match="cannot remove tokens"):
        cache.crop(1)
    holes = torch.tensor([[1, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="one run of tokens per row"):
        hf(ids, attention_mask=holes)
    with pytest.raises(ValueError, match="inputs_embeds"):
        hf.generate(inputs_embeds=torch.zeros(1, 3, 32), max_new_tokens=2)


def test_labels_give_the_shifted_loss():
    model = tiny(["attention"])
    hf = SeqzooForCausalLM.from_language_model(model)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        loss = hf(ids, labels=ids).loss
        reference, _, _ = model.loss(ids[:, :-1], ids[:, 1:])
    torch.testing.assert_close(loss, reference)


def test_byte_tokenizer_round_trip(tmp_path):
    tokenizer = hf_tokenizer("byte")
    text = "héllo, wörld — ∑ 🙂\n\tend"
    assert tokenizer(text)["input_ids"] == ByteTokenizer().encode(text).tolist()
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.eos_token_id == ByteTokenizer.eos_id and len(tokenizer) == ByteTokenizer.vocab_size
    model = tiny(["attention"], vocab_size=257)
    save_hf_directory(model, tmp_path, tokenizer=tokenizer)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text)["input_ids"] == ByteTokenizer().encode(text).tolist() and loaded.eos_token_id == 256
    assert AutoConfig.from_pretrained(tmp_path).eos_token_id == 256


def test_bench_generate_runs_on_prompts_that_contain_the_pad_id(tmp_path):
    # A 300-token random prompt over a 4-token vocabulary holds the pad id 0: HF must not read it as padding.
    from seqzoo.eval.bench_hf import bench_generate

    rows = bench_generate(str(tmp_path), ["gated_deltanet"], [300], new_tokens=2, hidden=16, layers=1, vocab=4, repeats=1)
    assert rows[0]["same_tokens"] is True
