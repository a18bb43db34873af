"""Text data: the standard-library corpus, local files in three formats, byte and HF tokenizers, packing."""

import json

import pytest
import torch

from seqzoo.data import ByteTokenizer, HFTokenizer, TextDataModule, load_documents, pack_documents, stdlib_corpus_files

DOCS = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n" * 20, "héllo wörld " * 50, "import os\n" * 30]


@pytest.fixture()
def corpus_files(tmp_path):
    import datasets

    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in DOCS))
    datasets.Dataset.from_dict({"text": DOCS}).to_parquet(str(tmp_path / "docs.parquet"))
    for i, d in enumerate(DOCS):
        (tmp_path / f"doc{i}.txt").write_text(d)
    return tmp_path


def test_stdlib_corpus_is_real_python_without_tests():
    files = stdlib_corpus_files()
    assert len(files) > 100
    assert files == sorted(files)
    assert not any(part in ("test", "tests", "site-packages", "idle_test") for f in files for part in f.parts[-3:-1])
    assert any(f.name == "functools.py" for f in files)


def test_three_file_formats_give_the_same_documents(corpus_files, tmp_path):
    cache = str(tmp_path / "cache")
    jsonl = load_documents("files", str(corpus_files / "docs.jsonl"), cache_dir=cache)["text"]
    parquet = load_documents("files", str(corpus_files / "docs.parquet"), cache_dir=cache)["text"]
    txt = load_documents("files", [str(corpus_files / f"doc{i}.txt") for i in range(4)], cache_dir=cache)["text"]
    assert jsonl == parquet == DOCS
    assert sorted(t.rstrip("\n") for t in txt) == sorted(d.rstrip("\n") for d in DOCS)


def test_packing_makes_exact_blocks_with_document_separators(corpus_files, tmp_path):
    docs = load_documents("files", str(corpus_files / "docs.jsonl"), cache_dir=str(tmp_path / "cache"))
    tok = ByteTokenizer()
    blocks = pack_documents(docs, tok, block_size=31)
    stream = [i for d in DOCS for i in list(d.encode()) + [tok.eos_id]]
    assert len(blocks) == len(stream) // 32
    flat = [i for row in blocks["ids"] for i in row]
    assert flat == stream[: len(flat)]
    assert all(len(row) == 32 for row in blocks["ids"])


def test_byte_tokenizer_round_trips_unicode():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("héllo ∑")) == "héllo ∑"
    assert tok.encode("a").tolist() == [97]


def test_local_hf_tokenizer_file(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "def": 1, "return": 2, "x": 3, "</s>": 4}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    hf = HFTokenizer(tmp_path)
    assert hf.vocab_size == 5 and hf.eos_id == 4
    assert hf.encode("def x return y").tolist() == [1, 3, 2, 0]
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        HFTokenizer(tmp_path / "missing")


def test_text_datamodule_splits_are_disjoint_and_shaped(tmp_path):
    dm = TextDataModule(
        source="stdlib", max_documents=40, block_size=64, batch_size=4, eval_batch_size=4, cache_dir=str(tmp_path), varlen=False
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 64) and batch["labels"].shape == (4, 64) and "cu_seqlens" not in batch
    assert (batch["input_ids"][:, 1:] == batch["labels"][:, :-1]).all()
    assert int(batch["input_ids"].max()) < 257
    sizes = {k: len(v) for k, v in dm.splits.items()}
    assert sizes["train"] > sizes["val"] > 0 and sizes["test"] > 0


def test_missing_data_file_fails_with_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="file not found: .*nope.txt"):
        load_documents("files", str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="unknown source"):
        load_documents("web")


def test_hub_source_reads_a_dataset_repository_folder(corpus_files, tmp_path):
    # `load_dataset(name)` resolves a hub name or a local dataset repository the same way; offline,
    # a folder holding the repository's data files stands in for the hub.
    repo = tmp_path / "org_corpus"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "train.jsonl").write_text((corpus_files / "docs.jsonl").read_text())
    docs = load_documents("hub", name=str(repo), cache_dir=str(tmp_path / "cache"), max_documents=3)
    assert docs["text"] == DOCS[:3]
    with pytest.raises(ValueError, match="needs data.name"):
        load_documents("hub")


def test_varlen_batches_mark_every_document_start():
    from seqzoo.data.text import VarlenCollate

    eos = 9
    blocks = [torch.tensor([1, 2, eos, 3, 4, eos, 5, 6]), torch.tensor([7, eos, 8, 8, 8, 8, 8, eos])]
    batch = VarlenCollate(eos)([{"input_ids": b, "labels": b + 100} for b in blocks])
    assert batch["input_ids"].shape == batch["labels"].shape == (1, 16)
    assert torch.equal(batch["labels"][0], torch.cat(blocks) + 100)
    # Starts: each block, and the token after every end-of-document id (not past the row's end).
    assert batch["cu_seqlens"].tolist() == [0, 3, 6, 8, 10, 16]


def test_varlen_training_batches_keep_documents_apart():
    import datasets

    from seqzoo.data.text import BlockDataset, VarlenCollate
    from seqzoo.models import LanguageModel

    tokenizer = ByteTokenizer()
    docs = datasets.Dataset.from_dict({"text": ["short one", "a second document", "x = 1\n", "def f():\n    pass\n" * 3]})
    blocks = BlockDataset(pack_documents(docs, tokenizer, block_size=16))
    batch = VarlenCollate(tokenizer.eos_id)([blocks[i] for i in range(len(blocks))])
    ids, cu = batch["input_ids"], batch["cu_seqlens"]
    assert ids.shape == (1, 16 * len(blocks)) and len(cu) - 1 > len(blocks)  # documents end inside blocks
    torch.manual_seed(0)
    model = LanguageModel({"vocab_size": 257, "hidden_size": 16, "num_layers": 1, "pattern": ["gated_deltanet"]})
    with torch.no_grad():
        packed = model(ids, cu_seqlens=cu)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            assert torch.allclose(packed[:, a:b], model(ids[:, a:b]), atol=1e-5)
