"""seqzoo models in the ecosystem's tools: ``seqzoo-eval export`` (a checkpoint to an HF directory whose logits
equal the checkpoint's) and lm-evaluation-harness end to end on the local tasks, its numbers checked against
seqzoo's own computation on the same text."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from seqzoo.data.text import ByteTokenizer, hf_tokenizer
from seqzoo.eval.cli import main as eval_main
from seqzoo.eval.lm_eval_tasks import TASKS_DIR
from seqzoo.models import LanguageModel
from seqzoo.models.hf import save_hf_directory

EOS = ByteTokenizer.eos_id


def byte_model(seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    model = LanguageModel(
        {"vocab_size": 257, "hidden_size": 32, "num_layers": 2, "pattern": ["gated_deltanet", "attention"], "mlp": "swiglu"}
    )
    with torch.no_grad():
        model.head.weight.mul_(10.0)  # peaked predictions: perplexities far from uniform
    return model.eval()


def fake_checkpoint(model: LanguageModel, path, data: dict) -> None:
    """What training writes, reduced to what ``load_language_model`` reads."""
    config = {"model": {**vars(model.config)}, "data": data}
    torch.save({"hyper_parameters": {"config": config}, "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)


@torch.no_grad()
def document_nll(model: LanguageModel, text: str) -> float:
    """seqzoo's own negative log-likelihood of a document after an end-of-document token, in nats."""
    ids = torch.as_tensor(ByteTokenizer().encode(text).astype("int64"))
    inputs = torch.cat([torch.tensor([EOS]), ids[:-1]])[None]
    return torch.nn.functional.cross_entropy(model(inputs)[0].double(), ids, reduction="sum").item()


def test_export_logits_equal_the_checkpoint(tmp_path):
    model = byte_model()
    fake_checkpoint(model, tmp_path / "last.ckpt", {"_target_": "seqzoo.data.TextDataModule", "tokenizer": "byte"})
    assert eval_main(["export", str(tmp_path / "last.ckpt"), str(tmp_path / "hf")]) == 0
    names = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "modeling_seqzoo.py"} <= names
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([tokenizer("def f(x):\n    return x")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, model(ids))
    assert exported.config.eos_token_id == tokenizer.eos_token_id == EOS
    # A missing checkpoint is one line.
    assert eval_main(["export", str(tmp_path / "nope.ckpt"), str(tmp_path / "x")]) == 1


def test_export_of_a_local_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = "the cat sat on the mat and the dog ran after the cat".split()
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator([" ".join(words)] * 4, trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"]))
    backend.save(str(tmp_path / "tokenizer.json"))
    torch.manual_seed(0)
    model = LanguageModel({"vocab_size": 16, "hidden_size": 16, "num_layers": 1}).eval()
    fake_checkpoint(
        model, tmp_path / "last.ckpt", {"_target_": "seqzoo.data.TextDataModule", "tokenizer": str(tmp_path / "tokenizer.json")}
    )
    assert eval_main(["export", str(tmp_path / "last.ckpt"), str(tmp_path / "hf")]) == 0
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer("the cat sat")["input_ids"] == backend.encode("the cat sat").ids
    assert tokenizer.eos_token == "</s>" and json.loads((tmp_path / "hf" / "config.json").read_text())[
        "eos_token_id"
    ] == backend.token_to_id("</s>")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm_eval")
    model = byte_model()
    save_hf_directory(model, folder / "hf", tokenizer=hf_tokenizer("byte"))
    return model, folder


def test_seqzoo_eval_lm_eval_equals_seqzoo_on_the_local_tasks(exported):
    model, folder = exported
    out = folder / "results"
    assert eval_main(["lm-eval", str(folder / "hf"), "--out", str(out), "--batch-size", "4"]) == 0
    assert {p.name for p in out.iterdir()} == {"lm_eval.json", "lm_eval.md", "lm_eval.png"}
    results = json.loads((out / "lm_eval.json").read_text())["results"]
    # Perplexity task: every document scored whole after the end-of-document token, as seqzoo scores it.
    texts = [json.loads(line)["text"] for line in (TASKS_DIR / "text.jsonl").read_text().splitlines()]
    nll = sum(document_nll(model, t) for t in texts)
    num_bytes = sum(len(t.encode()) for t in texts)
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    text = results["seqzoo_text"]
    assert text["bits_per_byte,none"] == pytest.approx(nll / num_bytes / math.log(2), rel=1e-5)
    assert text["byte_perplexity,none"] == pytest.approx(math.exp(nll / num_bytes), rel=1e-5)
    assert text["word_perplexity,none"] == pytest.approx(math.exp(nll / words), rel=1e-4)
    # Multiple choice: the argmax of seqzoo's log-likelihood of " choice" after the question.
    hits = hits_norm = 0
    questions = [json.loads(line) for line in (TASKS_DIR / "choice.jsonl").read_text().splitlines()]
    tokenizer = ByteTokenizer()
    for q in questions:
        context = tokenizer.encode(f"Question: {q['question']}\nAnswer:").astype("int64").tolist()
        scores = []
        for choice in q["choices"]:
            continuation = tokenizer.encode(" " + choice).astype("int64").tolist()
            ids = torch.tensor(context + continuation)
            with torch.no_grad():
                logp = torch.log_softmax(model(ids[None, :-1])[0].double(), -1)
            scores.append(sum(logp[len(context) - 1 + i, t].item() for i, t in enumerate(continuation)))
        hits += max(range(len(scores)), key=scores.__getitem__) == q["answer"]
        normed = [s / len(c) for s, c in zip(scores, q["choices"])]
        hits_norm += max(range(len(normed)), key=normed.__getitem__) == q["answer"]
    assert results["seqzoo_choice"]["acc,none"] == pytest.approx(hits / len(questions))
    assert results["seqzoo_choice"]["acc_norm,none"] == pytest.approx(hits_norm / len(questions))


def test_the_lm_eval_command_loads_an_exported_directory(exported, tmp_path):
    """``lm_eval --model hf`` in a fresh process that never imports seqzoo itself: the directory's ``auto_map``."""
    model, folder = exported
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={folder / 'hf'},trust_remote_code=True,dtype=float32",
        "--tasks", "seqzoo_text", "--include_path", str(TASKS_DIR), "--limit", "3", "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (result_file,) = (tmp_path / "out").rglob("results_*.json")
    bits = json.loads(result_file.read_text())["results"]["seqzoo_text"]["bits_per_byte,none"]
    texts = [json.loads(line)["text"] for line in (TASKS_DIR / "text.jsonl").read_text().splitlines()][:3]
    expected = sum(document_nll(model, t) for t in texts) / sum(len(t.encode()) for t in texts) / math.log(2)
    assert bits == pytest.approx(expected, rel=1e-5)
