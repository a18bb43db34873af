"""Every command block of README.md runs as written, in order, on what the README's earlier commands produce.

The commands are read from the README's fenced ``bash`` blocks (and its ``python`` block is executed), so the
README cannot drift from the code again. Each command runs on tiny settings: Hydra overrides appended to
``python train.py`` (few steps, few examples; the README's own models and vocabularies are kept, since they
decide what the evaluation commands can do) and flags appended to ``seqzoo-eval`` (short sequences, one
repeat). ``train.py`` runs in-process (``compose`` + ``seqzoo.training.main``, what its Hydra entry point
calls; ``tests/test_training.py`` runs the script itself) and ``seqzoo-eval`` through its ``main``, in a
scratch folder, so ``outputs/run1`` of one command is the input of the next. A command the test does not know
how to run fails the test; only the set-up section's install and CI commands are exempt.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import seqzoo.training as training
from seqzoo.eval.cli import main as eval_main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SETUP_SECTION = "Set-up on a fresh machine"


@dataclass
class Command:
    """One README command: where it is, what it says, and what running it gave."""

    section: str
    line: str
    argv: list[str]
    returncode: int | None = None
    output: str = ""
    written: set[str] = field(default_factory=set)


def readme_blocks(text: str) -> list[tuple[str, str, str]]:
    """``(section heading, language, body)`` of every fenced block, in order."""
    blocks, section, fence = [], "", None
    for line in text.splitlines():
        if fence is None and line.startswith("## "):
            section = line[3:].strip()
        elif fence is None and line.startswith("```"):
            fence, body = line[3:].strip(), []
        elif fence is not None and line.startswith("```"):
            blocks.append((section, fence, "\n".join(body)))
            fence = None
        elif fence is not None:
            body.append(line)
    assert fence is None, "README.md has an unclosed code fence"
    return blocks


def readme_commands(text: str) -> list[Command]:
    """The shell commands of the ``bash`` blocks, ``&&`` chains split, comments dropped."""
    commands = []
    for section, language, body in readme_blocks(text):
        if language != "bash":
            continue
        for line in body.splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                commands.append(Command(section, line.strip(), words[:cut]))
                words = words[cut + 1 :]
    return commands


# ---------------------------------------------------------------- tiny settings


def tiny_train_overrides(cfg) -> list[str]:
    """Overrides that shrink a composed run to seconds, keeping its model and vocabulary."""
    out = [
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "checkpoint_every_n_steps=1",
    ]
    target = str(cfg.data._target_)
    if target.endswith("MQARDataModule"):
        out += [f"data.train_segments.{i}.num_examples=16" for i in range(len(cfg.data.train_segments))]
        out += [f"data.test_segments.{i}.num_examples=16" for i in range(len(cfg.data.test_segments))]
        out += ["data.batch_size=8", "data.eval_batch_size=16"]
    elif target.endswith("NIAHDataModule"):
        out += ["data.num_train=16", "data.num_val=8", "data.batch_size=8", "data.eval_batch_size=8"]
    elif target.endswith("TextDataModule"):
        out += ["data.max_documents=60", "data.block_size=32", "data.batch_size=4", "data.eval_batch_size=4", "data.eval_batches=2"]
    else:
        raise AssertionError(f"the README test cannot shrink data {target}")
    if cfg.ckpt_path is not None:
        out[0] = "trainer.max_steps=4"  # a resume continues the 2-step run for 2 more steps
    return out


def tiny_eval_flags(argv: list[str]) -> list[str]:
    """Flags appended to a ``seqzoo-eval`` command (argparse keeps the last value of a repeated flag)."""
    command = argv[0] if argv[0] not in ("bench", "probe") else f"{argv[0]} {argv[1]}"
    flags = {
        "mqar": ["--num-examples", "16", "--batch-size", "16"],
        "ppl": [],
        "bench models": ["--seq-lens", "16", "32", "--hidden", "16", "--repeats", "1", "--decode-tokens", "2"],
        "bench ops": ["--seq-lens", "16", "--ops", "simple_gla", "--heads", "2", "--head-dim", "8", "--repeats", "1"],
        "bench titans": ["--dims", "8", "--chunks", "4", "--seq-lens", "8", "--heads", "2", "--repeats", "1"],
        "bench pararnn": ["--seq-lens", "8", "--batch", "1", "--hidden", "8", "--repeats", "1", "--cells", "gru"],
        "bench checkpoint_attention": ["--seq-lens", "32", "--segment-lens", "4", "--heads", "2", "--head-dim", "8", "--repeats", "1"],
        "bench varlen": ["--seq-lens", "64", "--batch", "2", "--hidden", "16", "--repeats", "1"],
        "mqar-sweep": ["--steps", "2", "--lr", "1e-2", "--train-examples-scale", "0.0002", "--test-examples", "8", "--batch-size", "8"]
        + ["--max-seq-len", "64"],
        "probe niah": ["--samples", "1", "--depths", "0.5"],
        "probe mqar": ["--num-examples", "4"],
        "probe length": ["--num-sequences", "1"],
        "probe decode": ["--contexts", "16", "32", "--decode-tokens", "2"],
        "bench loss": ["--vocabs", "512", "--tokens", "64", "--hidden", "16", "--repeats", "1"],
        "bench generate": ["--seq-lens", "16", "--decode-tokens", "2", "--hidden", "16", "--repeats", "1"],
        "export": [],
        "lm-eval": ["--limit", "2"],
        "convert-fla": [],
    }
    if command not in flags:
        raise AssertionError(f"the README test does not know how to shrink `seqzoo-eval {command}`")
    return flags[command]


def eval_key(argv: list[str]) -> str:
    """The row of the README's output table for a ``seqzoo-eval`` command: ``mqar``, ``bench ops``, ``probe niah``…"""
    return argv[0] if argv[0] not in ("bench", "probe") else f"{argv[0]} {argv[1]}"


# ---------------------------------------------------------------- running


def user_files(folder: Path) -> None:
    """The placeholder inputs the README's `data.source=files` command names, made small and real."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = "the model reads every key and value of the sequence before it answers each query in order".split()
    texts = [" ".join(words[(i + j) % len(words)] for j in range(40 + i % 7)) for i in range(60)]
    (folder / "my").mkdir()
    (folder / "my" / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"]))
    (folder / "path" / "to").mkdir(parents=True)
    tokenizer.save(str(folder / "path" / "to" / "tokenizer.json"))
    # An fla-hub checkpoint in fla's layout (a GLA model), for `seqzoo-eval convert-fla path/to/fla-checkpoint …`.
    from tests.test_fla_convert import CASES, seqzoo_model, write_fla_checkpoint

    fla_options, mixer, options = CASES["gla"]
    write_fla_checkpoint(folder / "path" / "to" / "fla-checkpoint", "gla", fla_options, seqzoo_model(mixer, options, "gla"))


def run_train(argv: list[str], workdir: Path, count: int) -> int:
    """``python train.py <overrides>`` as its Hydra entry point runs it: compose, then ``training.main``."""
    overrides = [a for a in argv if not a.startswith("hydra.run.dir=")]
    run_dirs = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")]
    run_dir = workdir / (run_dirs[-1] if run_dirs else f"outputs/default-{count}")  # Hydra's outputs/<date>/<time>
    cfg = training.compose(overrides)
    cfg = training.compose([*overrides, *tiny_train_overrides(cfg)])
    if cfg.trainer.strategy == "ddp":
        # In-process "ddp" would relaunch pytest as rank 1 (specs/training.md §3); ddp_fork runs the same DDP.
        cfg = training.compose([*overrides, *tiny_train_overrides(cfg), "trainer.strategy=ddp_fork"])
    try:
        training.main(cfg, run_dir)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@dataclass
class ReadmeRun:
    """The scratch folder the README's commands ran in, and the commands with their results."""

    workdir: Path
    commands: list[Command]


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory) -> ReadmeRun:
    """Every README command run in order in one scratch folder (the chain a new user follows)."""
    workdir = tmp_path_factory.mktemp("readme")
    user_files(workdir)
    commands = readme_commands(README.read_text())
    threads, cwd = torch.get_num_threads(), os.getcwd()
    os.chdir(workdir)  # the README's relative paths (outputs/run1, my/corpus.jsonl, results/) resolve here
    try:
        for i, command in enumerate(commands):
            program = command.argv[:2] if command.argv[0] == "python" else command.argv[:1]
            if setup_only(command):
                continue  # pip and the CI command: this test runs inside them
            before = {p: p.stat().st_mtime_ns for p in Path("results").rglob("*") if p.is_file()} if Path("results").exists() else {}
            stdout, stderr = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                if program == ["python", "train.py"]:
                    command.returncode = run_train(command.argv[2:], workdir, i)
                elif program == ["seqzoo-eval"]:
                    command.returncode = eval_main([*command.argv[1:], *tiny_eval_flags(command.argv[1:])])
                else:
                    command.returncode = -1  # unknown: fails test_every_readme_command_is_known
            command.output = stdout.getvalue() + stderr.getvalue()
            after = {p: p.stat().st_mtime_ns for p in Path("results").rglob("*") if p.is_file()} if Path("results").exists() else {}
            command.written = {str(p) for p, t in after.items() if before.get(p) != t and "runs" not in p.parts}
            torch.set_num_threads(threads)  # `threads=1` and `--threads` commands set the count for their run only
    finally:
        os.chdir(cwd)
    return ReadmeRun(workdir, commands)


def setup_only(command: Command) -> bool:
    """An install or CI command of the set-up section (this test runs inside the CI command)."""
    return command.argv[0] in ("pip", "ruff") or command.argv[:3] == ["python", "-m", "pytest"]


COMMANDS = readme_commands(README.read_text())
RUNNABLE = [i for i, command in enumerate(COMMANDS) if not setup_only(command)]


def test_the_readme_blocks_are_all_known():
    languages = [language for _, language, _ in readme_blocks(README.read_text())]
    assert set(languages) == {"bash", "python"}, f"a README block the README test cannot run: {languages}"
    for command in COMMANDS:
        program = command.argv[:2] if command.argv[0] == "python" else command.argv[:1]
        assert program in (["python", "train.py"], ["seqzoo-eval"]) or (setup_only(command) and command.section == SETUP_SECTION), (
            f"README command the README test does not know how to run: {command.line}"
        )


@pytest.mark.parametrize("index", RUNNABLE, ids=[f"{i}: {COMMANDS[i].line[:70]}" for i in RUNNABLE])
def test_every_readme_command_runs_as_written(readme_run, index):
    command = readme_run.commands[index]
    lines = [line for line in command.output.splitlines() if line.strip()]
    if command.argv[:2] == ["python", "train.py"] and "trainer=gpu" in command.argv and not torch.cuda.is_available():
        # No GPU here: the README says so, and the answer is one line.
        assert command.returncode == 1 and re.search(r"^error: trainer config: accelerator=gpu needs a GPU", command.output, re.M)
        assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in command.output
        return
    if command.argv[:3] == ["seqzoo-eval", "bench", "titans"] and not _importable("titans_pytorch"):
        assert command.returncode == 1 and "titans-pytorch" in command.output and "Traceback" not in command.output
        return
    assert command.returncode == 0, f"{command.line}\n{command.output[-3000:]}"
    if command.argv[:2] == ["python", "train.py"]:
        assert re.search(r"^test: test/", command.output, re.M), command.output[-2000:]


def test_the_readme_chain_produced_what_the_evaluation_reads(readme_run):
    commands = readme_run.commands
    run1 = next(c for c in commands if c.argv[:3] == ["python", "train.py", "hydra.run.dir=outputs/run1"])
    resume = next(c for c in commands if "ckpt_path=last" in c.argv)
    assert run1.returncode == 0 and resume.returncode == 0
    # The resume continued run1 from step 2 to 4 and kept the log of steps 0-1, each step once.
    with open(readme_run.workdir / "outputs" / "run1" / "fit" / "metrics.csv") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle) if row["train/loss"]]
    assert steps == [0, 1, 2, 3]
    assert all(c.returncode == 0 for c in commands if c.argv[:2] == ["seqzoo-eval", "mqar"])
    probe = next(c for c in commands if c.argv[:3] == ["seqzoo-eval", "probe", "mqar"])
    # The default model's probe returned only "does not fit" rows: now every row has an accuracy.
    assert "does not fit" not in probe.output and "| seq128_kv16 |" in probe.output and "| seq254_kv31 |" in probe.output


def test_readme_eval_commands_write_the_files_the_readme_names(readme_run):
    table = output_table(README.read_text())
    seen = set()
    for command in readme_run.commands:
        if command.argv[0] != "seqzoo-eval" or command.returncode != 0:
            continue
        if command.argv[1] in WRITES_OUT_DIR:  # an HF directory at its OUT_DIR argument, nothing under results/
            assert (readme_run.workdir / command.argv[3] / "config.json").is_file() and not command.written, command.line
            seen.add(command.argv[1])
            continue
        key = eval_key(command.argv[1:])
        assert key in table, f"the README's output table has no row for `seqzoo-eval {key}`"
        folder, names = table[key]
        expected = {f"{folder}/{name}" for name in names}
        written = {p for p in command.written}
        if "<kind>" in " ".join(names):  # probe niah: one set of files per needle kind
            kinds = {re.sub(r"^.*/niah_(\w+)\.\w+$", r"\1", p) for p in written}
            expected = {e.replace("<kind>", k) for e in expected for k in kinds}
        assert written == expected, f"seqzoo-eval {key}: wrote {sorted(written)}, the README says {sorted(expected)}"
        seen.add(key)
    assert {"mqar", "ppl", "bench ops", "bench pararnn", "probe niah", "probe mqar", "probe length", "probe decode"} <= seen
    assert {"export", "convert-fla", "lm-eval", "bench loss", "bench generate"} <= seen


# seqzoo-eval commands that write an HF model directory at their second argument instead of results/.
WRITES_OUT_DIR = {"export", "convert-fla"}


def test_the_readme_python_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (code,) = [body for _, language, body in readme_blocks(README.read_text()) if language == "python"]
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    assert namespace["y"].shape == (2, 1000, 256) and namespace["tokens"].shape == (1, 22)
    assert torch.allclose(namespace["y_last"], namespace["y"][:, 999:], atol=1e-5)


def output_table(text: str) -> dict[str, tuple[str, list[str]]]:
    """The README's table of eval outputs: command -> (default --out folder, file names)."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| `") else []
        if len(cells) == 3 and cells[1].startswith("`results/"):
            names = re.findall(r"`([^`]+\.(?:json|md|png))`", cells[2])
            rows[cells[0].strip("`")] = (cells[1].strip("`"), names)
    return rows


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_readme_train_commands_compose_to_the_readme_models():
    # The tiny overrides shrink data and steps only: the model and vocabulary the README names are the ones run.
    for command in COMMANDS:
        if command.argv[:2] != ["python", "train.py"]:
            continue
        overrides = [a for a in command.argv[2:] if not a.startswith("hydra.")]
        cfg = training.compose(overrides)
        tiny = training.compose([*overrides, *tiny_train_overrides(cfg)])
        assert OmegaConf.to_container(tiny.model, resolve=True) == OmegaConf.to_container(cfg.model, resolve=True), command.line
