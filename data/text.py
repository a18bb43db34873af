"""Text language modelling through ``datasets``: local files, a cached hub data set, or the embedded
standard-library corpus; a byte-level tokenizer by default; packing into fixed-length blocks.
"""

from __future__ import annotations

import glob
import os
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from seqzoo.data.loading import make_eval_loader, make_train_loader

SKIPPED_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test"}


def stdlib_corpus_files() -> list[Path]:
    """The Python standard library's own ``*.py`` sources on this machine, sorted, tests and site-packages skipped.

    Every machine with Python has them, so this is a real-text corpus that needs no download.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in SKIPPED_STDLIB_DIRS]  # prune: never walk site-packages
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    if not files:
        raise FileNotFoundError(f"text data: no standard-library sources found under {root}")
    return sorted(files)


class ByteTokenizer:
    """UTF-8 bytes as token ids 0–255 and an end-of-document id 256 (vocabulary 257); needs no files."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        """Token ids ``[len(bytes)]`` of ``text`` (uint16)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; the end-of-document id becomes a newline."""
        return bytes(i if i < 256 else 10 for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A local Hugging Face ``tokenizer.json`` (a file, or a folder holding one), loaded with ``tokenizers``."""

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"text data: tokenizer file not found: {path}")
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(path))
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.eos_id = self.vocab_size - 1
        for name in ("</s>", "<|endoftext|>", "<eos>", "[SEP]"):
            token_id = self.tokenizer.token_to_id(name)
            if token_id is not None:
                self.eos_id = token_id
                break

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` (int32)."""
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""
        return self.tokenizer.decode(list(ids))


END_OF_DOCUMENT = "<|endoftext|>"


def hf_tokenizer(tokenizer: str | os.PathLike = "byte"):
    """The tokenizer of text data (``data.tokenizer``) as a ``transformers`` fast tokenizer, to save beside a model.

    ``"byte"``: :class:`ByteTokenizer` exactly: byte ``b`` is id ``b`` (a byte-level BPE without merges over
    GPT-2's byte alphabet, so any text round-trips) and ``<|endoftext|>`` is id 256, the end-of-document and EOS
    token. A path: that local ``tokenizer.json`` (or its folder), with the end-of-document token
    :class:`HFTokenizer` picks as EOS. Adds no special tokens when encoding, as the training data does.
    Returns a ``PreTrainedTokenizerFast``; ``AutoTokenizer.from_pretrained`` reloads what it saves.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if str(tokenizer) == "byte":
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        alphabet = bytes_to_unicode()  # byte -> the printable character byte-level BPE uses for it
        backend = Tokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
        # No regex split: the whole text is one word, so no byte is ever grouped or dropped.
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        fast = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=END_OF_DOCUMENT, model_max_length=10**9)
        if fast.eos_token_id != ByteTokenizer.eos_id:
            raise AssertionError(f"byte tokenizer: end of document is id {fast.eos_token_id}, expected {ByteTokenizer.eos_id}")
        return fast
    local = HFTokenizer(tokenizer)
    fast = PreTrainedTokenizerFast(tokenizer_object=local.tokenizer, model_max_length=10**9)
    fast.eos_token = local.tokenizer.id_to_token(local.eos_id)
    return fast


def load_documents(
    source: str,
    path: str | Sequence[str] | None = None,
    name: str | None = None,
    cache_dir: str | None = None,
    split: str = "train",
    text_field: str = "text",
    max_documents: int | None = None,
):
    """Load a ``datasets.Dataset`` with one document per row in column ``text``.

    ``source``: ``"stdlib"`` (the embedded corpus), ``"files"`` (local ``.txt``/``.json``/``.jsonl``/``.parquet``
    files or globs in ``path``), or ``"hub"`` (a ``datasets`` name ``name`` read from the local ``cache_dir``;
    nothing is downloaded when ``HF_DATASETS_OFFLINE=1``). ``max_documents`` keeps the first N rows.
    """
    import datasets

    datasets.disable_progress_bars()
    if source == "stdlib":
        files = [str(p) for p in stdlib_corpus_files()[:max_documents]]  # one document per file
        return datasets.load_dataset("text", data_files={"train": files}, sample_by="document", cache_dir=cache_dir, split="train")
    if source == "files":
        paths = [path] if isinstance(path, (str, os.PathLike)) else list(path or [])
        if not paths:
            raise ValueError("text data: source 'files' needs data.path")
        missing = [p for p in paths if not glob.glob(str(p))]
        if missing:
            raise FileNotFoundError(f"text data: file not found: {missing[0]}")
        suffix = Path(str(paths[0])).suffix.lower()
        builder = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(suffix)
        if builder is None:
            raise ValueError(f"text data: cannot read {suffix!r} files; use .txt, .json, .jsonl or .parquet")
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files={"train": [str(p) for p in paths]}, cache_dir=cache_dir, split="train", **kwargs)
    elif source == "hub":
        if not name:
            raise ValueError("text data: source 'hub' needs data.name")
        ds = datasets.load_dataset(name, cache_dir=cache_dir, split=split)
    else:
        raise ValueError(f"text data: unknown source {source!r}; choose stdlib, files or hub")
    if text_field not in ds.column_names:
        raise ValueError(f"text data: no column {text_field!r}; columns are {', '.join(ds.column_names)}")
    if max_documents is not None:
        ds = ds.select(range(min(max_documents, len(ds))))
    return ds.rename_column(text_field, "text") if text_field != "text" else ds


def pack_documents(documents, tokenizer, block_size: int, num_proc: int | None = None):
    """Tokenise every document, append the end-of-document id, concatenate and cut into blocks.

    Returns a ``datasets.Dataset`` with column ``ids`` of ``block_size + 1`` tokens per row (inputs are
    the first ``block_size``, targets the last ``block_size``); the ragged tail is dropped.
    """
    import datasets

    dtype = "uint16" if tokenizer.vocab_size <= 2**16 else "int32"

    def pack(batch: dict[str, list[str]]) -> dict[str, Any]:
        pieces = []
        for text in batch["text"]:
            pieces.append(tokenizer.encode(text))
            pieces.append(np.asarray([tokenizer.eos_id], dtype=pieces[-1].dtype))
        stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        n = len(stream) // (block_size + 1)
        return {"ids": stream[: n * (block_size + 1)].reshape(n, block_size + 1).astype(dtype)}

    features = datasets.Features({"ids": datasets.Sequence(datasets.Value(dtype))})
    return documents.map(pack, batched=True, batch_size=256, remove_columns=documents.column_names, features=features, num_proc=num_proc)


class BlockDataset(torch.utils.data.Dataset):
    """Packed token blocks as ``{"input_ids": [block], "labels": [block]}`` (next-token targets)."""

    def __init__(self, blocks) -> None:
        self.blocks = blocks.with_format("numpy")

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(self.blocks[int(idx)]["ids"].astype(np.int64))
        return {"input_ids": ids[:-1], "labels": ids[1:]}


class VarlenCollate:
    """Collate token blocks into one packed row whose documents are marked by ``cu_seqlens``.

    A batch of ``B`` blocks of ``T`` tokens becomes ``input_ids`` and ``labels`` ``[1, B·T]`` (the blocks side by
    side) and ``cu_seqlens`` ``[num_docs + 1]``: a document starts at every block start and after every
    end-of-document token of the inputs, as flame's varlen collator does. A model given ``cu_seqlens`` keeps
    the documents apart: no state or attention crosses an end-of-document token, and positions restart.
    """

    def __init__(self, eos_id: int) -> None:
        self.eos_id = eos_id

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        input_ids = torch.cat([item["input_ids"] for item in items])[None]
        labels = torch.cat([item["labels"] for item in items])[None]
        block = items[0]["input_ids"].numel()
        total = input_ids.shape[1]
        starts = set(range(0, total, block))
        starts.update(int(i) + 1 for i in (input_ids[0] == self.eos_id).nonzero().flatten() if int(i) + 1 < total)
        cu_seqlens = torch.tensor(sorted(starts) + [total], dtype=torch.int32)
        return {"input_ids": input_ids, "labels": labels, "cu_seqlens": cu_seqlens}


class TextDataModule(pl.LightningDataModule):
    """Language modelling on packed text blocks; documents are split into train/val/test by index.

    Args:
        source, path, name, cache_dir, text_field: where the documents come from (:func:`load_documents`).
        tokenizer: ``"byte"`` or a path to a local ``tokenizer.json`` (or its folder).
        vocab_size: model vocabulary; must cover the tokenizer's.
        block_size: tokens per training sequence.
        batch_size / eval_batch_size: sequences per batch.
        val_fraction / test_fraction: share of documents held out (every k-th document, deterministic).
        max_documents: keep only the first N documents (quick runs); ``None`` keeps all.
        seed: shuffling seed.
        varlen: batches as one packed row with the documents marked (``cu_seqlens``, :class:`VarlenCollate`), so
            the model keeps documents apart; ``False``: classic blocks, where a document reads the end of the one
            before it in its block.
        eval_batches: validation and test read at most this many batches, blocks spread evenly over the split
            (:meth:`eval_split`); ``None`` reads the whole split (130 batches and 2.5 CPU minutes per pass for the
            standard-library corpus at the default sizes).
    """

    def __init__(
        self,
        source: str = "stdlib",
        path: str | list[str] | None = None,
        name: str | None = None,
        cache_dir: str | None = None,
        text_field: str = "text",
        tokenizer: str = "byte",
        vocab_size: int = 257,
        block_size: int = 256,
        batch_size: int = 16,
        eval_batch_size: int = 16,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        max_documents: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        eval_batches: int | None = None,
        varlen: bool = True,
    ) -> None:
        super().__init__()
        self.varlen = bool(varlen)
        if block_size < 1 or batch_size < 1 or eval_batch_size < 1:
            raise ValueError("text data: block_size and batch sizes must be positive")
        if eval_batches is not None and (isinstance(eval_batches, bool) or not isinstance(eval_batches, int) or eval_batches < 1):
            raise ValueError(f"text data: eval_batches must be a positive integer or null (the whole split), got {eval_batches!r}")
        self.eval_batches = eval_batches
        if not (0 < val_fraction < 0.5 and 0 < test_fraction < 0.5):
            raise ValueError("text data: val_fraction and test_fraction must lie in (0, 0.5)")
        self.source_args = dict(source=source, path=path, name=name, cache_dir=cache_dir, text_field=text_field)
        self.tokenizer = ByteTokenizer() if tokenizer == "byte" else HFTokenizer(tokenizer)
        if self.tokenizer.vocab_size > vocab_size:
            raise ValueError(f"text data: tokenizer has {self.tokenizer.vocab_size} tokens but vocab_size is {vocab_size}")
        self.vocab_size = vocab_size
        self.block_size, self.batch_size, self.eval_batch_size = block_size, batch_size, eval_batch_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.max_documents, self.seed, self.num_workers = max_documents, seed, num_workers
        self.splits: dict[str, BlockDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        docs = load_documents(**self.source_args, max_documents=self.max_documents)
        # Every k-th document is held out, so the splits are disjoint and stable across runs.
        val_every, test_every = round(1 / self.val_fraction), round(1 / self.test_fraction)
        index = np.arange(len(docs))
        is_test = index % test_every == test_every - 1
        is_val = (index % val_every == val_every // 2) & ~is_test
        parts = {"train": index[~is_val & ~is_test], "val": index[is_val], "test": index[is_test]}
        for split, rows in parts.items():
            blocks = pack_documents(docs.select(rows), self.tokenizer, self.block_size)
            if len(blocks) == 0:
                raise ValueError(f"text data: the {split} split holds less than one block of {self.block_size + 1} tokens")
            self.splits[split] = BlockDataset(blocks)

    def eval_split(self, split: str, batches: int | None = -1) -> torch.utils.data.Dataset:
        """The blocks an evaluation of ``split`` reads: at most ``batches · eval_batch_size`` of them, spread
        evenly over the split (a prefix would only see its first documents); ``batches=None`` reads them all.

        ``batches=-1`` (the default) is this data module's ``eval_batches``.
        """
        blocks = self.splits[split]
        batches = self.eval_batches if batches == -1 else batches
        if batches is None or batches * self.eval_batch_size >= len(blocks):
            return blocks
        keep = np.linspace(0, len(blocks), batches * self.eval_batch_size, endpoint=False).astype(np.int64)
        return torch.utils.data.Subset(blocks, keep.tolist())

    def collate(self) -> VarlenCollate | None:
        """The batch collation: :class:`VarlenCollate` with ``varlen``, else the default stacking."""
        return VarlenCollate(self.tokenizer.eos_id) if self.varlen else None

    def train_dataloader(self):
        return make_train_loader(
            self.splits["train"], self.trainer, self.seed, self.num_workers, batch_size=self.batch_size, collate_fn=self.collate()
        )

    def val_dataloader(self):
        return make_eval_loader(
            self.eval_split("val"), self.trainer, self.num_workers, batch_size=self.eval_batch_size, collate_fn=self.collate()
        )

    def test_dataloader(self):
        return make_eval_loader(
            self.eval_split("test"), self.trainer, self.num_workers, batch_size=self.eval_batch_size, collate_fn=self.collate()
        )
