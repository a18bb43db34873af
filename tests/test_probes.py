"""Long-context probes: S-NIAH generators and scoring, and every ``seqzoo-eval probe`` end to end on a tiny run."""

import json
import re

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgb

import seqzoo.training as training
from seqzoo.data.niah import (
    KINDS,
    SNAP_BYTES,
    VALUE_WORDS,
    NIAHDataModule,
    chance_accuracy,
    generate_niah,
    make_needle_example,
    min_length,
    training_example,
)
from seqzoo.eval.cli import main
from seqzoo.eval.probes import contrast_ratio, default_long_segments, greedy_predictor, needle_prompt_lengths, score_niah, state_norms
from seqzoo.training.checkpoint import load_language_model
from tests.helpers import texts_outside

ANSWER = {
    "passkey": rb"The pass key is (\d+)\. Remember it\.",
    "number": rb"special magic numbers for ([a-z]+-[a-z]+) is: (\d+)\. ",
    "word": rb"special magic words for ([a-z]+-[a-z]+) is: ([a-z]+)\. ",
}
QUESTION_KEY = rb"What is the special magic (?:number|word) for ([a-z]+-[a-z]+)\?"


def recover(prompt: bytes, kind: str) -> bytes:
    """The answer found in a prompt by string search alone (the oracle)."""
    if kind == "passkey":
        return re.search(ANSWER[kind], prompt).group(1)
    key = re.search(QUESTION_KEY, prompt).group(1)
    hits = [m.group(2) for m in re.finditer(ANSWER[kind], prompt) if m.group(1) == key]
    return hits[0] if hits else b""


def oracle(kind):
    return lambda prompts, n: [recover(bytes(p.tolist()), kind) for p in prompts]


def printed_rows(text):
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


@pytest.mark.parametrize("kind", KINDS)
def test_needle_is_where_the_metadata_says_and_lengths_are_exact(kind):
    for length in (min_length(kind), 301):
        for depth in (0.0, 0.3, 1.0):
            examples = generate_niah(kind, 3, length, depth, seed=5)
            for ex in examples:
                prompt, meta = bytes(ex.prompt_ids.tolist()), ex.metadata
                assert len(prompt) == length == meta["length"] and ex.prompt_ids.dtype == torch.int64
                needle = prompt[meta["needle_start"] : meta["needle_end"]]
                assert ex.answer.encode() in needle and re.match(
                    ANSWER[kind], needle[needle.find(b"The pass") :] if kind == "passkey" else needle[needle.find(b"special") :]
                )
                assert recover(prompt, kind) == ex.answer.encode()
                hay = length - len(needle) - len(prompt.rsplit(b"\n", 1)[1]) - 1
                assert abs(meta["needle_start"] - round(depth * hay)) <= SNAP_BYTES
                assert meta["needle_depth"] == pytest.approx(meta["needle_start"] / hay if hay else 0.0)
            again = generate_niah(kind, 3, length, depth, seed=5)
            other = generate_niah(kind, 3, length, depth, seed=6)
            assert all(torch.equal(a.prompt_ids, b.prompt_ids) and a.answer == b.answer for a, b in zip(examples, again))
            assert any(not torch.equal(a.prompt_ids, b.prompt_ids) for a, b in zip(examples, other))
    with pytest.raises(ValueError, match="needs at least"):
        make_needle_example(kind, 50, 0.5, np.random.default_rng(0))
    # min_length bounds the longest needle + question: every draw fits.
    assert all(len(e.prompt_ids) == min_length(kind) for e in generate_niah(kind, 300, min_length(kind), 0.5, seed=0))


@pytest.mark.parametrize("kind", KINDS)
def test_training_example_labels_only_the_answer(kind):
    inputs, labels = training_example(kind, 200, np.random.default_rng(3))
    assert inputs.shape == labels.shape == (200,)
    answer = labels[labels != -100]
    first = int((labels != -100).nonzero()[0])
    assert (labels != -100).sum() == len(answer) and (labels[first:] != -100).all()  # one contiguous run at the end
    prompt = bytes(inputs[: first + 1].tolist())
    assert recover(prompt, kind) == bytes(answer.tolist())
    assert torch.equal(inputs[first + 1 :], labels[first:-1])


def test_oracle_scores_one_and_a_constant_answer_scores_chance():
    for kind in KINDS:
        rows = score_niah(oracle(kind), kind, [200, 400], [0.0, 0.5, 1.0], samples=4, seed=1, batch_size=3)
        assert [r["accuracy"] for r in rows] == [1.0] * 6
    # Words: a fixed guess is right exactly when the drawn word is that word, about 1/64 of the time.
    rows = score_niah(lambda p, n: [b"apple"] * len(p), "word", [200], [0.0, 0.5, 1.0], samples=200, seed=2, batch_size=50)
    expected = [sum(e.answer == "apple" for e in generate_niah("word", 200, 200, d, 2)) / 200 for d in (0.0, 0.5, 1.0)]
    assert [r["accuracy"] for r in rows] == expected
    assert rows[0]["chance"] == 1 / len(VALUE_WORDS) and abs(np.mean(expected) - 1 / 64) < 0.03
    # Numbers: chance is 1/90000 for 5 digits, so a constant guess scores 0 here.
    rows = score_niah(lambda p, n: [b"12345"] * len(p), "passkey", [200], [0.5], samples=50, seed=2, batch_size=50)
    assert rows[0]["accuracy"] == 0.0 and rows[0]["chance"] == chance_accuracy("passkey") == 1 / 90000


@pytest.mark.parametrize("kind", KINDS)
def test_data_configs_compose_and_give_fixed_length_batches(kind):
    cfg = training.compose([f"data=niah_{kind}", "data.seq_len=200", "data.batch_size=2", "data.num_train=4"])
    datamodule = training.build_datamodule(cfg)
    assert isinstance(datamodule, NIAHDataModule) and datamodule.vocab_size == 257 and cfg.model.vocab_size == 257
    datamodule.setup("fit")
    batch = next(iter(torch.utils.data.DataLoader(datamodule.train_set, batch_size=2)))
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 200)
    with pytest.raises(ValueError, match="needs at least"):
        NIAHDataModule(kind=kind, seq_len=min_length(kind, with_answer=True) - 2)
    NIAHDataModule(kind=kind, seq_len=min_length(kind, with_answer=True) - 1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny decode steps on a shared, oversubscribed 2-core machine: a second OpenMP thread only spins.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def needle_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("niah")
    overrides = [
        "data=niah_passkey",
        "data.seq_len=128",
        "data.num_train=32",
        "data.num_val=8",
        "data.batch_size=8",
        "data.eval_batch_size=8",
        "model.hidden_size=16",
        "trainer.enable_progress_bar=false",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "checkpoint_every_n_steps=3",
    ]
    cfg = training.compose(overrides)
    result = training.run(cfg, out)
    return out / "checkpoints" / "last.ckpt", result


def test_probe_niah_end_to_end(needle_run, tmp_path, capsys, saved_figures):
    checkpoint, result = needle_run
    assert "test/loss" in result["test"]
    argv = ["probe", "niah", str(checkpoint), "--lengths", "128", "192", "--depths", "0", "1", "--samples", "2", "--out", str(tmp_path)]
    assert main(argv) == 0
    payload = json.loads((tmp_path / "niah_passkey.json").read_text())
    printed = printed_rows(capsys.readouterr().out)
    assert [(r["length"], r["depth"]) for r in payload["rows"]] == [(128, 0.0), (128, 1.0), (192, 0.0), (192, 1.0)]
    for row, cells in zip(payload["rows"], printed):
        assert float(cells[4]) == pytest.approx(row["accuracy"], abs=5e-4) and row["accuracy"] in (0.0, 0.5, 1.0)
    assert (tmp_path / "niah_passkey.png").stat().st_size > 0
    # Each cell's number is readable on its colour (black on the dark red of accuracy 0 had a contrast of 2.6).
    heatmap = saved_figures[0].axes[0]
    (image,) = heatmap.images
    numbers = [t for t in heatmap.texts if t.get_text()]
    assert len(numbers) == 4 and texts_outside(saved_figures[0]) == []
    for text in numbers:
        column, row = (round(v) for v in text.get_position())
        cell = image.cmap(image.norm(image.get_array()[row, column]))
        assert contrast_ratio(to_rgb(text.get_color()), cell) >= 4.5, (text.get_text(), text.get_color())
    assert (payload["kind"], payload["haystack"], payload["digits"], payload["trained_length"]) == (
        "passkey",
        "filler",
        5,
        128,
    )  # from the run
    # The cached greedy decode the probe scores agrees with recomputing the whole sequence each step.
    model, _ = load_language_model(checkpoint)
    ex = generate_niah("passkey", 2, 192, 1.0, seed=0)
    prompts = torch.stack([e.prompt_ids for e in ex])
    full = [bytes(t if t < 256 else 0 for t in row.tolist()) for row in model.generate(prompts, 5, temperature=0, use_cache=False)[:, 192:]]
    assert greedy_predictor(model)(prompts, 5) == greedy_predictor(model, prefill_chunk=50)(prompts, 5) == full


def test_probe_mqar_states_what_the_vocabulary_cannot_hold(needle_run, tmp_path, capsys):
    checkpoint, _ = needle_run
    assert main(["probe", "mqar", str(checkpoint), "--segments", "64:8", "512:128", "--num-examples", "8", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "mqar_long.json").read_text())
    printed = printed_rows(capsys.readouterr().out)
    fits, too_long = payload["rows"]
    assert 0.0 <= fits["accuracy"] <= 1.0 and float(printed[0][4]) == pytest.approx(fits["accuracy"], abs=5e-4)
    assert too_long["accuracy"] is None and "vocab_size (257) must exceed seq_len (512)" in too_long["note"] and printed[1][4] == "None"
    assert payload["max_seq_len_for_vocab"] == 256 and payload["max_kv_pairs_for_vocab"] == 127
    model, _ = load_language_model(checkpoint)
    assert fits["state_bytes"] == model.state_size(1, 64)


def test_probe_mqar_defaults_to_segments_beyond_training_that_the_vocabulary_holds(needle_run, tmp_path):
    # The fixed default (512:128 … 4096:1024) gave the README's default model (vocabulary 256) only
    # "does not fit" rows and an empty plot.
    default = {"data": {"vocab_size": 256, "train_segments": [{"seq_len": 64, "num_kv_pairs": 4}, {"seq_len": 64, "num_kv_pairs": 8}]}}
    assert default_long_segments(256, default) == [(128, 16), (254, 31)]
    zoology = {"data": {"train_segments": [{"seq_len": 64, "num_kv_pairs": 4}, {"seq_len": 256, "num_kv_pairs": 64}]}}
    assert default_long_segments(8192, zoology) == [(512, 128), (1024, 256), (2048, 512), (4096, 1024)]
    with pytest.raises(ValueError, match=r"vocabulary of 257 tokens holds no MQAR sequence longer than its training length 256"):
        default_long_segments(257, {"data": {"block_size": 256}})
    checkpoint, _ = needle_run  # vocabulary 257, trained at 128 tokens
    assert main(["probe", "mqar", str(checkpoint), "--num-examples", "4", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "mqar_long.json").read_text())["rows"]
    assert [(r["seq_len"], r["num_kv_pairs"]) for r in rows] == [(256, 64)] and rows[0]["accuracy"] is not None


def test_probe_length_matches_a_parallel_forward(needle_run, tmp_path, capsys):
    checkpoint, _ = needle_run
    argv = [
        "probe",
        "length",
        str(checkpoint),
        "--factor",
        "2",
        "--num-sequences",
        "2",
        "--piece",
        "64",
        "--split",
        "train",
        "--max-documents",
        "20",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    payload = json.loads((tmp_path / "length.json").read_text())
    printed = printed_rows(capsys.readouterr().out)
    assert payload["train_length"] == 128 and payload["state_norm_positions"] == [64, 128, 192, 256]
    per_position = np.asarray(payload["loss_per_position"])
    for k, (row, cells) in enumerate(zip(payload["rows"], printed)):
        assert row["loss"] == pytest.approx(per_position[k * 128 : (k + 1) * 128].mean()) and float(cells[2]) == pytest.approx(
            row["loss"], rel=1e-3
        )
        assert row["state_norm_L1"] == pytest.approx(payload["state_norms"][2 * k + 1][1])
    # Reference: one parallel forward (no cache) over the same blocks, and one-call prefill for the state.
    from seqzoo.data.text import TextDataModule

    model, _ = load_language_model(checkpoint)
    dm = TextDataModule(source="stdlib", vocab_size=257, block_size=256, max_documents=20)
    dm.setup()
    batch = next(iter(torch.utils.data.DataLoader(dm.splits["train"], batch_size=2)))
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(batch["input_ids"]).transpose(1, 2), batch["labels"], reduction="none").mean(0)
        cache = model.init_cache(2)
        model(batch["input_ids"], cache=cache)
    assert np.abs(per_position - nll.numpy()).max() < 1e-4
    assert np.allclose(payload["state_norms"][-1], state_norms(cache), rtol=1e-4)
    assert (tmp_path / "length.png").is_file()


def test_probe_decode_checkpoint_beside_a_registered_mixer(needle_run, tmp_path, capsys):
    checkpoint, _ = needle_run
    argv = [
        "probe",
        "decode",
        "--checkpoints",
        str(checkpoint),
        "--mixers",
        "gated_deltanet",
        "--contexts",
        "16",
        "48",
        "--decode-tokens",
        "2",
        "--hidden",
        "16",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    printed = printed_rows(capsys.readouterr().out)
    assert [(r["model"], r["context"]) for r in rows] == [
        (checkpoint.parent.parent.name, 16),
        (checkpoint.parent.parent.name, 48),
        ("gated_deltanet", 16),
        ("gated_deltanet", 48),
    ]
    for row, cells in zip(rows, printed):
        assert row["cache_bytes"] == row["state_size"] and row["ms_per_token"] > 0
        assert float(cells[2]) == pytest.approx(row["ms_per_token"], rel=1e-3) and int(cells[5]) == row["cache_bytes"]
    assert [r["cache_bytes"] for r in rows[:2]] == [2 * 2 * c * 16 * 4 for c in (16, 48)]  # attention: K and V, 2 layers, fp32
    assert rows[2]["cache_bytes"] == rows[3]["cache_bytes"]  # a recurrent state does not grow
    assert (tmp_path / "decode.png").is_file()
    assert main(["probe", "decode", "--mixers", "warp_drive", "--contexts", "8", "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_default_needle_lengths_put_the_answer_where_training_did():
    # A passkey run at seq_len 128: prompt + 5-digit answer = 129 tokens, so the 1x prompt is 124 tokens.
    assert needle_prompt_lengths(128, "passkey", None) == [124, 252, 508, 1020]
    assert needle_prompt_lengths(100, "number", 3, factors=(1,)) == [98]
    ids, labels = training_example("passkey", 128, np.random.default_rng(0))
    assert (labels != -100).nonzero()[0].item() + 1 == needle_prompt_lengths(128, "passkey", None)[0]
