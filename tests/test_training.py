"""Training: config composition and errors, loss goes down, exact resume, DDP on CPU, the CLI itself."""

import csv
import json
import math
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import seqzoo.training as training
from seqzoo.configs import ConfigError, config_names
from seqzoo.models import LanguageModelConfig
from seqzoo.training.checkpoint import AtomicCheckpointIO, load_language_model, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "model.hidden_size=16",
    "data.vocab_size=64",
    "data.train_segments=[{seq_len:16,num_kv_pairs:2,num_examples:48}]",
    "data.test_segments=[{seq_len:16,num_kv_pairs:2,num_examples:16},{seq_len:32,num_kv_pairs:4,num_examples:16}]",
    "data.batch_size=8",
    "data.eval_batch_size=16",
    "trainer.enable_progress_bar=false",
    "trainer.val_check_interval=6",
    "trainer.log_every_n_steps=1",
    "optim.warmup_steps=2",
    "checkpoint_every_n_steps=2",
]


def make_cfg(*overrides):
    return training.compose([*TINY, *overrides])


@pytest.mark.parametrize("model", config_names("model"))
def test_every_model_config_composes_and_validates(model):
    cfg = make_cfg(f"model={model}")
    from omegaconf import OmegaConf

    config = LanguageModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    assert config.vocab_size == 64


@pytest.mark.parametrize("data", config_names("data"))
def test_every_data_config_instantiates(data):
    cfg = training.compose([f"data={data}"])
    assert training.build_datamodule(cfg).vocab_size == cfg.data.vocab_size


@pytest.mark.parametrize("trainer", config_names("trainer"))
def test_every_trainer_config_composes(trainer):
    cfg = make_cfg(f"trainer={trainer}")
    assert cfg.trainer.max_steps > 0 and cfg.trainer.use_distributed_sampler is False


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.max_step=5", "max_step"),
        ("optim.lr=abc", "optim.lr=abc: Value 'abc' of type 'str' could not be converted to Float"),
        ("optim.wamup_steps=3", "wamup_steps"),
        ("model=nope", "model/nope"),
        # Lightning compared the string with an int: "'<' not supported between instances of 'str' and 'int'".
        ("trainer.max_steps=abc", "trainer.max_steps=abc: Value 'abc' of type 'str' could not be converted to Integer"),
        ("trainer.log_every_n_steps=often", "trainer.log_every_n_steps=often: Value 'often'"),
        ("threads=two", "threads=two: Value 'two'"),
    ],
)
def test_composition_rejects_typos_and_wrong_types(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        make_cfg(override)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("+model.depth=3", "unknown key\\(s\\) depth"),
        ("model.hidden_size=-8", "hidden_size must be a positive integer"),
        ("model.pattern=[attention,mystery]", "unknown mixer 'mystery'"),
        ("+model.mixers.attention.heads=2", "unknown option\\(s\\) heads"),
        ("+data.shuffle=true", "data config: .*shuffle"),
        ("+trainer.foo=1", "trainer config: .*foo"),
    ],
)
def test_bad_values_fail_with_one_line(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message) as info:
        training.run(make_cfg(override), tmp_path)
    assert "\n" not in str(info.value)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nope.ckpt"):
        training.run(make_cfg(f"ckpt_path={tmp_path}/nope.ckpt", "trainer.max_steps=1"), tmp_path)


def test_tiny_run_learns_and_writes_its_outputs(tmp_path):
    result = training.run(make_cfg("trainer.max_steps=60", "optim.lr=1e-2", "checkpoint_every_n_steps=30"), tmp_path)
    losses = [loss for _, loss in result["losses"]]
    assert len(losses) == 60
    assert sum(losses[-6:]) / 6 < 0.8 * sum(losses[:6]) / 6
    assert {"test/acc", "test/acc/seq16_kv2", "test/acc/seq32_kv4", "test/loss"} <= set(result["test"])
    assert (tmp_path / "config.resolved.yaml").is_file()
    assert json.loads((tmp_path / "results.json").read_text())["test"] == result["test"]
    model, config = load_language_model(tmp_path / "checkpoints" / "last.ckpt")
    assert config["model"]["hidden_size"] == 16 and model.config.vocab_size == 64
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


@pytest.mark.parametrize("resume_step", [4, 6, 8], ids=["mid-epoch", "epoch-end", "second-epoch"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, resume_step):
    # 48 examples / batch 8 = 6 steps per epoch; attention dropout makes the RNG matter.
    overrides = ["trainer.max_steps=12", "model.mixers.attention.dropout=0.1", "test_after_fit=false"]
    full = training.run(make_cfg(*overrides), tmp_path / "full")
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "full" / "checkpoints" / f"step={resume_step}.ckpt", resumed_dir / "checkpoints" / "last.ckpt")
    resumed = training.run(make_cfg(*overrides, "ckpt_path=last"), resumed_dir)
    expected = [loss for step, loss in full["losses"] if step > resume_step]
    got = [loss for _, loss in resumed["losses"]]
    assert len(got) == 12 - resume_step
    assert got == expected


def test_ddp_two_cpu_processes(tmp_path):
    # ddp_fork trains in forked workers (in-process "ddp" would re-run pytest); rank 0 writes the metrics.
    result = training.run(make_cfg("trainer=ddp", "trainer.strategy=ddp_fork", "trainer.max_steps=6"), tmp_path)
    with open(tmp_path / "fit" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/loss")]
    assert [int(row["step"]) for row in rows] == list(range(6))
    assert all(math.isfinite(float(row["train/loss"])) for row in rows)
    assert 0.0 <= result["test"]["test/acc"] <= 1.0
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_atomic_checkpoint_io_and_damaged_files(tmp_path):
    io = AtomicCheckpointIO()
    target = tmp_path / "a.ckpt"
    io.save_checkpoint({"x": torch.arange(3)}, target)
    assert torch.equal(io.load_checkpoint(target)["x"], torch.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt"]
    target.write_bytes(target.read_bytes()[:20])
    with pytest.raises(ValueError, match="a.ckpt is not a seqzoo checkpoint") as info:
        read_checkpoint(target)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["random", "truncated", "empty", "foreign pickle", "pickled module", "no run config"])
def test_a_damaged_or_foreign_checkpoint_is_named_and_never_advises_unpickling(tmp_path, kind):
    path = tmp_path / "model.ckpt"
    if kind == "random":
        path.write_bytes(bytes(range(256)) * 16)
    elif kind == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "foreign pickle":
        import pickle

        path.write_bytes(pickle.dumps({"factory": shutil.copy}))
    elif kind == "pickled module":
        torch.save({"model": torch.nn.Linear(2, 2)}, path)
    else:
        torch.save({"state_dict": {}}, path)
    # torch's own message for the pickles says "Re-running torch.load with weights_only set to False will likely
    # succeed": advice to run code from a file that is not what it claims to be.
    with pytest.raises(ValueError, match=r"model\.ckpt is not a seqzoo checkpoint") as info:
        load_language_model(path)
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)


# What every run printed before train.py filtered it (twice: fit and test).
NOISE = ["set_vital", "LeafSpec", "litlogger", "GPU available", "TPU available", "Experiment logs directory", "Warning", "warn("]


def test_cli_trains_and_reports(tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, "trainer.max_steps=4", f"hydra.run.dir={tmp_path}"]
    done = subprocess.run([*cmd, "trainer.enable_progress_bar=true"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    output = done.stdout + done.stderr
    # What the user needs: what runs where, the progress bar, the metrics; and none of the noise.
    assert "seqzoo: attention ×2 (hidden 16, vocab 64" in done.stdout and "Epoch 0: " in done.stdout
    assert "test: test/acc=" in done.stdout
    assert [noise for noise in NOISE if noise in output] == []
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    # A wrong type failed inside Lightning: "'<' not supported between instances of 'str' and 'int'".
    bad = subprocess.run([*cmd[:2], "trainer.max_steps=abc"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert bad.returncode != 0 and "trainer.max_steps=abc" in bad.stderr and "Value 'abc'" in bad.stderr
    assert "not supported" not in bad.stderr


def metric_rows(run_dir):
    """``fit/metrics.csv`` as a sorted list of ``(step, metric, value)``, empty cells left out."""
    with open(Path(run_dir) / "fit" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return sorted((int(row["step"]), key, value) for row in rows for key, value in row.items() if key != "step" and value != "")


def interrupted_run(cfg, run_dir, stop_at_step, how):
    """Train ``cfg`` until ``stop_at_step``, then stop as a crash does (``"exception"``: Lightning handles it and
    closes its loggers) or as SIGKILL does (``"kill"``: the process ends on the spot, nothing is flushed)."""
    from seqzoo.training.module import LanguageModelModule

    original = LanguageModelModule.on_train_batch_start

    def stop(self, batch, batch_idx):
        if self.trainer.global_step == stop_at_step:
            if how == "kill":
                os._exit(9)
            raise RuntimeError("simulated crash")
        return original(self, batch, batch_idx)

    def child():
        LanguageModelModule.on_train_batch_start = stop
        try:
            training.run(cfg, run_dir)
        except RuntimeError:
            os._exit(1)
        os._exit(0)

    # A forked child: the patch and the hard exit stay out of the test process. Runs that fork use one
    # thread (threads=1): OpenMP's pool does not survive a fork, and a 2-thread child hung in its first matmul.
    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(120)
    assert process.exitcode == (9 if how == "kill" else 1)


@pytest.mark.parametrize("how", ["exception", "kill"])
def test_a_resumed_run_keeps_every_row_of_its_log_once(tmp_path, how):
    # Steps 0-9 are logged, the last checkpoint is at step 8: the resumed run logs 8 and 9 again, and
    # validation ran at step 6 before the crash. Lightning deleted metrics.csv when the resumed run started.
    overrides = [
        "trainer.max_steps=12",
        "model.mixers.attention.dropout=0.1",
        "checkpoint_every_n_steps=4",
        "test_after_fit=false",
        "threads=1",
    ]
    training.run(make_cfg(*overrides), tmp_path / "full")
    interrupted_run(make_cfg(*overrides), tmp_path / "resumed", stop_at_step=10, how=how)
    before = metric_rows(tmp_path / "resumed")
    assert before and max(step for step, _, _ in before) >= (7 if how == "kill" else 9)
    training.run(make_cfg(*overrides, "ckpt_path=last"), tmp_path / "resumed")
    full, resumed = metric_rows(tmp_path / "full"), metric_rows(tmp_path / "resumed")
    keys = [(step, key) for step, key, _ in resumed if key != "epoch"]  # "epoch" is on every row of a step
    assert len(keys) == len(set(keys)), "a step logged twice"
    assert resumed == full  # every row, each once, with the uninterrupted run's values (the resume is exact)


def test_a_fresh_run_in_a_used_folder_starts_a_new_log(tmp_path):
    training.run(make_cfg("trainer.max_steps=6", "test_after_fit=false"), tmp_path)
    training.run(make_cfg("trainer.max_steps=3", "test_after_fit=false"), tmp_path)
    assert max(step for step, _, _ in metric_rows(tmp_path)) == 2


@pytest.mark.parametrize("resume_step", [4, 6], ids=["mid-epoch", "epoch-end"])
def test_the_resumed_progress_bar_names_the_epoch_and_rates_new_batches_only(tmp_path, capsys, monkeypatch, resume_step):
    from seqzoo.training.callbacks import ResumeProgressBar

    overrides = ["trainer.max_steps=8", "test_after_fit=false", "checkpoint_every_n_steps=2"]
    training.run(make_cfg(*overrides), tmp_path / "full")
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "full" / "checkpoints" / f"step={resume_step}.ckpt", tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    seen = []
    original = ResumeProgressBar.on_train_batch_end

    def record(self, trainer, *args):
        original(self, trainer, *args)
        seen.append((self.train_progress_bar.desc, self.train_progress_bar.n, self.train_progress_bar.format_dict["initial"]))

    monkeypatch.setattr(ResumeProgressBar, "on_train_batch_end", record)
    capsys.readouterr()
    training.run(
        make_cfg(*overrides, "ckpt_path=last", "trainer.enable_progress_bar=true", "progress_refresh_rate=1"), tmp_path / "resumed"
    )
    # 6 batches per epoch: step 4 resumes epoch 0 at batch 4, step 6 starts epoch 1.
    epoch, done = divmod(resume_step, 6)
    # Lightning's bar said "Training" and counted the restored batches as done in the first instant.
    assert seen[0] == (f"Epoch {epoch}: ", done + 1, done)
    bars = capsys.readouterr().out.replace("\r", "\n")
    assert not re.search(r"Training: .*\b[1-9]/\?", bars)


def test_ckpt_path_last_without_a_checkpoint_is_an_error_and_auto_starts_fresh(tmp_path, capsys):
    # A misspelt run folder used to train from scratch, exit 0 and say nothing.
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=last: no checkpoint to resume in .*misspelt.*ckpt_path=auto") as info:
        training.run(make_cfg("ckpt_path=last", "trainer.max_steps=1"), tmp_path / "misspelt")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "misspelt" / "checkpoints").exists()
    first = training.run(make_cfg("ckpt_path=auto", "trainer.max_steps=2", "test_after_fit=false"), tmp_path / "auto")
    assert "ckpt_path=auto: no " in capsys.readouterr().out and [s for s, _ in first["losses"]] == [1, 2]
    again = training.run(make_cfg("ckpt_path=auto", "trainer.max_steps=4", "test_after_fit=false"), tmp_path / "auto")
    assert [s for s, _ in again["losses"]] == [3, 4]


def test_last_ckpt_holds_the_final_step(tmp_path):
    # Lightning wrote last.ckpt at the end only if it had never written one: here it held step 4, not 5.
    result = training.run(make_cfg("trainer.max_steps=5", "checkpoint_every_n_steps=2", "test_after_fit=false"), tmp_path)
    assert read_checkpoint(result["checkpoint"])["global_step"] == 5
    assert read_checkpoint(tmp_path / "checkpoints" / "step=4.ckpt")["global_step"] == 4


def test_threads_config_key_sets_the_threads_of_the_run(tmp_path):
    before, env_before = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    result = training.run(make_cfg("threads=1", "trainer.max_steps=1", "test_after_fit=false"), tmp_path / "one")
    assert result["threads"] == 1 and json.loads((tmp_path / "one" / "results.json").read_text())["threads"] == 1
    # The caller's settings come back (mqar-sweep and tests call run() in one process).
    assert torch.get_num_threads() == before and os.environ.get("OMP_NUM_THREADS") == env_before
    default = training.run(make_cfg("trainer.max_steps=1", "test_after_fit=false"), tmp_path / "default")
    assert default["threads"] == before
    with pytest.raises(ConfigError, match="threads must be an integer >= 1 or null"):
        training.run(make_cfg("threads=0"), tmp_path / "zero")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
@pytest.mark.parametrize("trainer", ["gpu", "fsdp"])
def test_a_gpu_trainer_without_a_gpu_is_one_line(tmp_path, trainer):
    # Lightning raised MisconfigurationException("No supported gpu backend found!") under a 24-line traceback.
    with pytest.raises(ConfigError, match=r"trainer config: accelerator=gpu needs a GPU.*trainer=cpu") as info:
        training.run(make_cfg(f"trainer={trainer}"), tmp_path)
    assert "\n" not in str(info.value)


def test_ddp_test_metrics_count_every_example_once(tmp_path, capfd):
    # 3 test batches on 2 ranks: DistributedSampler padded rank 1 with a copy of batch 0, which the test then
    # counted twice; and Lightning warned "It is recommended to use self.log('test/loss', ..., sync_dist=True)".
    segments = "[{seq_len:16,num_kv_pairs:2,num_examples:16},{seq_len:32,num_kv_pairs:4,num_examples:16},{seq_len:32,num_kv_pairs:2,num_examples:16}]"
    cfg = make_cfg("trainer=ddp", "trainer.strategy=ddp_fork", "trainer.max_steps=4", f"data.test_segments={segments}")
    with warnings.catch_warnings():
        # pytest records warnings in a list, which the forked ranks cannot hand back: print them to fd 2 instead.
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, category, *args, **kwargs: os.write(2, f"{category.__name__}: {message}\n".encode())
        result = training.run(cfg, tmp_path)
    assert "sync_dist" not in "".join(capfd.readouterr())
    # The same checkpoint scored in this one process, every test batch once.
    model, _ = load_language_model(result["checkpoint"])
    datamodule = training.build_datamodule(cfg)
    datamodule.setup("test")
    hits, counts, loss_sum = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0.0
    with torch.no_grad():
        for batch in (datamodule.test_set[i] for i in range(len(datamodule.test_set))):
            loss, correct, count = model.loss(batch["input_ids"], batch["labels"])
            hits[batch["segment"]] += correct.item()
            counts[batch["segment"]] += count.item()
            loss_sum += loss.item() * count.item()
    assert result["test"]["test/loss"] == pytest.approx(loss_sum / counts.sum().item(), rel=1e-6)
    assert result["test"]["test/acc"] == pytest.approx((hits.sum() / counts.sum()).item(), abs=1e-9)
    for name, hit, count in zip(datamodule.segment_names, hits, counts):
        assert result["test"][f"test/acc/{name}"] == pytest.approx((hit / count).item(), abs=1e-9)
